"""Single-device transformations applied to a built model, in place."""

from __future__ import annotations

import contextlib

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


def attention_backend(name: str):
    """A context that pins scaled_dot_product_attention to one kernel (forward and backward), e.g.
    cuDNN, which on Hopper runs about twice as fast as the flash backend; "auto" leaves torch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])
