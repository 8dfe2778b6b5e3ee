"""Single-device transformations applied to a built model, in place."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from llamatron.model import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    Checkpoint FQNs stay clean: `torch.distributed.checkpoint.state_dict` strips the wrapper's prefix.
    """
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """torch.compile each transformer block separately: the blocks are identical, so one compiled
    graph is reused for all of them, and compile time does not grow with depth."""
    for block in model.layers.values():
        block.compile(fullgraph=True)
