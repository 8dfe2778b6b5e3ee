"""Activation checkpointing: recompute blocks in the backward pass instead of keeping their activations."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, layers: int | None = None) -> None:
    """Checkpoint the model's blocks (`model.layers`): all of them, or `layers` of them spread evenly
    (each checkpointed block saves only its input and costs one more forward of it, so checkpoint as
    few as memory allows).

    Checkpoint FQNs stay clean: `torch.distributed.checkpoint.state_dict` strips the wrapper's prefix.
    """
    names = list(model.layers.keys())
    n = len(names) if layers is None else min(layers, len(names))
    chosen = {names[(i * len(names)) // n] for i in range(n)} if n else set()
    for name in names:
        if name in chosen:
            model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)
