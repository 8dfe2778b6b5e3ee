"""Model families (one folder each) and the registry of named sizes (`registry.py`)."""

from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(family, args) -> int:
    """Parameters of the model of `args`, counted on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        return count_parameters(family.build(args))
