"""torch.compile, applied per block."""

from __future__ import annotations

import torch
from torch import nn

# The backend every block compiles with. Tests swap in inductor's partitioner without its code
# generation (llamatron/testing/compiled.py): the same saved tensors, in a fraction of the time.
BACKEND = "inductor"

# Inductor options of the scoring compile. multi_kernel lets a row reduction up to 16x longer than
# inductor's one-pass limit (1,024) be generated both ways, one pass and looped, and keeps whichever
# runs faster: the per-token amax of FP8 scoring's SwiGLU output spans 14,336 values, and in one pass
# its kernel took 206 ms of the 8B's 2.7 s scoring pass on an H100, looped 273 ms (docs/performance.md).
EVAL_INDUCTOR_OPTIONS = {"triton.multi_kernel": 1}
# Inductor options of train.compile_tuning: the generated kernels' block sizes timed at compile. Not
# max-autotune, which also tries Triton GEMM templates: its FP8 GEMMs ran at half cuBLAS's speed on an
# H100 (docs/performance.md).
TUNING_OPTIONS = {"coordinate_descent_tuning": True}


def compile_tuning(train, lora: bool) -> bool:
    """Whether the compiles tune their kernels: `train.compile_tuning`, or when it is unset (None), for
    FP8 training without LoRA, the step it was measured to speed up (0.6-1.7% at micro 8, H100 and
    H200); BF16's step gained nothing and would only pay the ~100 s of compile."""
    if train.compile_tuning is not None:
        return train.compile_tuning
    return train.fp8 != "none" and not lora


def apply_compile(model: nn.Module, tuning: bool = False) -> None:
    """torch.compile each block (`model.layers`) separately: the blocks are identical, so one compiled
    graph is reused for all of them, and compile time does not grow with depth. The final norm too:
    eager, it is about ten passes over the [tokens, dim] activations in fp32 forward and backward, once
    per micro-batch; compiled, one kernel each way. `tuning` (train.compile_tuning): inductor times
    block sizes for each kernel it generates (its coordinate-descent tuning)."""
    extra = {"options": dict(TUNING_OPTIONS)} if tuning else {}
    for block in model.layers.values():
        # A block may say it cannot be one graph (GLaM's MoE blocks: data-dependent token counts);
        # it is then compiled with graph breaks around those operations.
        block.compile(fullgraph=getattr(block, "compile_fullgraph", True), backend=BACKEND, **extra)
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.Module):
        norm.compile(fullgraph=True, backend=BACKEND, **extra)


def compile_for_eval(model: nn.Module) -> int:
    """torch.compile each block of `model.layers` for scoring, in place and once (blocks already
    compiled, by this or by training's `train.compile`, are left as they are); returns how many
    blocks are compiled. Shapes are dynamic from the start: every batch has its own padded length
    and the last its own size, and one graph must serve them all rather than recompiling for each.
    A block that cannot be one graph (`compile_fullgraph = False`: GLaM's MoE blocks, whose
    data-dependent shapes would recompile with every batch) stays eager, as does a model without
    `layers` (not the module protocol)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        return 0
    count = 0
    for block in layers.values():
        if getattr(block, "_compiled_call_impl", None) is None and getattr(block, "compile_fullgraph", True):
            block.compile(dynamic=True, fullgraph=True, options=dict(EVAL_INDUCTOR_OPTIONS))
        count += getattr(block, "_compiled_call_impl", None) is not None
    return count


def drop_compiled(model: nn.Module) -> int:
    """Return `model`'s compiled blocks to eager and clear dynamo's caches: after a transform swaps
    modules inside a compiled block (FP8 scoring's copies), the cached graphs may keep running the old
    ones (torch 2.11 on CUDA did: its FP8 rows scored exactly as bf16), so the next `compile_for_eval`
    must trace the blocks afresh. Returns how many blocks were compiled."""
    layers = getattr(model, "layers", None)
    blocks = [b for b in (layers.values() if isinstance(layers, nn.ModuleDict) else ())
              if getattr(b, "_compiled_call_impl", None) is not None]
    for block in blocks:
        block._compiled_call_impl = None
    if blocks:
        torch._dynamo.reset()
    return len(blocks)
