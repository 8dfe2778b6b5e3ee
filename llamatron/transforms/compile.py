"""torch.compile, applied per block."""

from __future__ import annotations

from torch import nn

# The backend every block compiles with. Tests swap in inductor's partitioner without its code
# generation (llamatron/testing/compiled.py): the same saved tensors, in a fraction of the time.
BACKEND = "inductor"


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block (`model.layers`) separately: the blocks are identical, so one compiled
    graph is reused for all of them, and compile time does not grow with depth."""
    for block in model.layers.values():
        # A block may say it cannot be one graph (GLaM's MoE blocks: data-dependent token counts);
        # it is then compiled with graph breaks around those operations.
        block.compile(fullgraph=getattr(block, "compile_fullgraph", True), backend=BACKEND)
