"""Single-device transformations applied to a model, in place: activation checkpointing, compile,
and the choice of attention kernel."""

from __future__ import annotations

import contextlib

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from llamatron.model import Transformer


def apply_activation_checkpointing(model: Transformer, layers: int | None = None) -> None:
    """Recompute transformer blocks in the backward pass instead of keeping their activations: all of
    them, or `layers` of them spread evenly (each checkpointed block saves its activations and costs
    one more forward of it, so checkpoint as few as memory allows).

    Checkpoint FQNs stay clean: `torch.distributed.checkpoint.state_dict` strips the wrapper's prefix.
    """
    names = list(model.layers.keys())
    n = len(names) if layers is None else min(layers, len(names))
    chosen = {names[(i * len(names)) // n] for i in range(n)} if n else set()
    for name in names:
        if name in chosen:
            model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)


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
