"""The experts of one MoE layer as batched weights, computed with grouped GEMMs.

Weights are stacked per expert, w1 [E, d, f] and w2 [E, f, d] (GLaM's experts are ungated: ReLU by
Pax's default, which is what reproduces the published 1.9B / 1.14T parameter counts). Tokens arrive
sorted by expert with `counts[e]` rows for expert e; one grouped GEMM (`torch._grouped_mm`, int32
cumulative offsets, as torchtitan) does every expert's rows at once. Where grouped GEMM is not
available (older torch, or CUDA below bf16/alignment rules) a per-expert loop of plain matmuls does the
same arithmetic; `grouped=False` forces the loop (the reference the tests compare with). The capacity
path (equal rows per expert) passes an [E, C, d] buffer instead: one batched matmul per matrix.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward fails
    on a zero-stride grad_output (e.g. from `y.sum().backward()`, torch 2.11)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@torch.compiler.disable  # a host-side probe: never traced into a compiled block
@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs `_grouped_mm` on this device and dtype (a tiny probe, once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda" and dtype != torch.bfloat16:
        return False  # CUDA grouped GEMM is bf16 (and FP8) only
    try:
        a = torch.ones(16, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
    """Rows of x [T, k] sorted by expert (counts [E], summing to T) times w [E, k, n] -> [T, n]."""
    if grouped is None:
        grouped = _grouped_mm_works(x.device.type, x.dtype) and x.shape[1] % 16 == 0 and w.shape[2] % 16 == 0
        # Under torch.compile the op's shape rules are CUDA's (bf16 only), whatever the device.
        grouped = grouped and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))
    # The loop: one matmul per expert over its rows (the counts read on the host once).
    pieces = torch.split(x, counts.tolist())
    return torch.cat([piece @ w[e] for e, piece in enumerate(pieces)]) if pieces else x.new_zeros(0, w.shape[2])


class GroupedExperts(nn.Module):
    """E ungated ReLU FFNs: y = relu(x w1[e]) w2[e] for the rows of expert e."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None, w1: torch.Tensor | None = None,
                w2: torch.Tensor | None = None, grouped: bool | None = None) -> torch.Tensor:
        """x [T, d] sorted by expert, counts [E'] -> [T, d] (grouped GEMM); or x [E', n, d], n rows for
        every expert (the capacity buffer), -> [E', n, d] by batched matmul: equal groups need no
        grouped GEMM, and the shapes stay static. w1/w2: the weights to use instead of the module's
        (expert parallelism passes this rank's shard of them)."""
        w1 = self.w1 if w1 is None else w1
        w2 = self.w2 if w2 is None else w2
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not cover _grouped_mm: cast by hand, as it would for a linear layer.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        else:
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
        if x.dim() == 3:
            return torch.bmm(F.relu(torch.bmm(x, w1)), w2)
        h = F.relu(grouped_matmul(x, w1, counts, grouped))
        return grouped_matmul(h, w2, counts, grouped)
