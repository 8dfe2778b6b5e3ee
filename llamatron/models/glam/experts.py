"""The experts of one MoE layer as batched weights, computed with grouped GEMMs.

Weights are stacked per expert, w1 [E, d, f] and w2 [E, f, d] (GLaM's experts are ungated: ReLU by
Pax's default, which is what reproduces the published 1.9B / 1.14T parameter counts). Tokens arrive
sorted by expert with `counts[e]` rows for expert e; one grouped GEMM (`torch._grouped_mm`, int32
cumulative offsets, as torchtitan) does every expert's rows at once. Where grouped GEMM is not
available (older torch, or CUDA below bf16/alignment rules) a per-expert loop of plain matmuls does the
same arithmetic; `grouped=False` forces the loop (the reference the tests compare with). The capacity
path (equal rows per expert) passes an [E, C, d] buffer instead: one batched matmul per matrix.

FP8 (`train.fp8` with `train.fp8_experts`; `llamatron/transforms/fp8.py` sets `fp8_grouped_mm`): both
GEMMs through torchao's rowwise-scaled FP8 grouped GEMM (`_to_fp8_rowwise_then_scaled_grouped_mm`,
its three GEMMs per matrix in FP8 with E4M3 operands and power-of-two row scales; torchao has no
tensorwise grouped recipe). Its contract: the left operand row-major with every group's rows
starting at a multiple of 16, the right operand column-major ([E, k, n], strides k*n, 1, k), int32
offsets. The padding is done here on the device (no host sync: a static upper bound of rows), since
torchao 0.17/0.18 refuse to pad themselves; the capacity buffer needs none when its rows per expert
are a multiple of 16. On the CPU an emulation with the same contract and the same forward rounding
(straight-through backward) stands in for torchao's CUDA kernels: for tests of this plumbing.
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


FP8_ROWS = 16  # FP8 grouped GEMMs take each group's rows from a multiple of 16


def column_major(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w [E, k, n] copied to `dtype` in the column-major layout (strides k*n, 1, k) an FP8 grouped GEMM's
    right operand needs: one strided copy, differentiable."""
    E, k, n = w.shape
    return torch.empty_strided((E, k, n), (k * n, 1, k), dtype=dtype, device=w.device).copy_(w)


def _fake_fp8(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x rounded through E4M3 with one power-of-two scale per slice along `dim` (torchao's rowwise
    rounding), returned in fp32; the gradient passes straight through."""
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(torch.float8_e4m3fn).max / amax)))
    q = (xf * scale).to(torch.float8_e4m3fn).float() / scale
    return xf + (q - xf).detach()


def check_fp8_grouped_operands(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> None:
    """torchao's contract for `_to_fp8_rowwise_then_scaled_grouped_mm` without its own padding."""
    if a.dim() != 2 or a.stride(-1) != 1 or a.shape[1] % FP8_ROWS or a.shape[0] % FP8_ROWS:
        raise ValueError(f"FP8 grouped GEMM: the left operand must be row-major [M, K], M and K multiples of 16, got {tuple(a.shape)} strides {a.stride()}")
    if b_t.dim() != 3 or b_t.stride(1) != 1 or b_t.shape[1] % 16 or b_t.shape[2] % 16:
        raise ValueError(f"FP8 grouped GEMM: the right operand must be column-major [E, K, N], K and N multiples of 16, got {tuple(b_t.shape)} strides {b_t.stride()}")
    if offs.dtype != torch.int32 or offs.shape != (b_t.shape[0],):
        raise ValueError(f"FP8 grouped GEMM: offsets must be int32 [E], got {offs.dtype} {tuple(offs.shape)}")


def _emulated_fp8_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The CPU's stand-in for torchao's kernel: the same operands and forward rounding, a bf16 grouped
    GEMM of the rounded values (E4M3 values times powers of two are exact in bf16) where this torch
    has one (traceable: compiled blocks keep one graph), else a loop. Rows past the last offset are
    not computed (the kernel leaves them unwritten too; no caller reads them)."""
    check_fp8_grouped_operands(a, b_t, offs)
    if not torch.compiler.is_compiling():
        bounds = offs.tolist()
        if any(b % FP8_ROWS for b in bounds):
            raise ValueError(f"FP8 grouped GEMM: every group must start at a multiple of 16 rows, offsets {bounds}")
    qa, qb = _fake_fp8(a, dim=-1).to(torch.bfloat16), _fake_fp8(b_t, dim=-2).to(torch.bfloat16)
    # The probe runs eagerly (a compiled block traces the op, which this torch has if it ran before).
    if hasattr(torch, "_grouped_mm") and (torch.compiler.is_compiling() or _grouped_mm_works(a.device.type, torch.bfloat16)):
        return _ContiguousGrad.apply(torch._grouped_mm(qa, qb, offs=offs)).to(out_dtype)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    y = grouped_matmul(qa[: int(offs[-1])], qb, counts, grouped=False)
    return torch.cat([y, y.new_zeros(a.shape[0] - y.shape[0], y.shape[1])]).to(out_dtype)


def _fp8_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cuda":
        return _emulated_fp8_grouped_mm(a, b_t, offs, torch.bfloat16)
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    return _to_fp8_rowwise_then_scaled_grouped_mm(a, b_t, offs, out_dtype=torch.bfloat16,
                                                  pad_token_groups_for_grouped_mm=False)


def fp8_grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul` through the FP8 grouped GEMM: rows x [T, k] sorted by expert (counts [E]) times
    w [E, k, n] -> [T, n] bf16. Each expert's rows move to a start at a multiple of 16 in a zero
    buffer of the most rows that can take (T + E x 15, rounded up), computed on the device."""
    T, E = x.shape[0], counts.shape[0]
    padded = (counts + FP8_ROWS - 1) // FP8_ROWS * FP8_ROWS
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # each group's start moves by this
    dest = torch.arange(T, device=x.device) + shift.repeat_interleave(counts, output_size=T)
    rows = -(-(T + E * (FP8_ROWS - 1)) // FP8_ROWS) * FP8_ROWS
    buf = x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)
    y = _fp8_grouped_mm(buf, column_major(w, x.dtype), padded.cumsum(0).to(torch.int32))
    return y[dest]  # the gather's backward hands the kernel a dense gradient


def fp8_batched_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [E, n, k] (n rows for every expert) times w [E, k, n'] through the FP8 grouped GEMM, the rows
    padded to a multiple of 16 only where n is not one (static shapes: one graph)."""
    E, n, k = x.shape
    pad = -n % FP8_ROWS
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    offs = torch.arange(1, E + 1, device=x.device, dtype=torch.int32) * (n + pad)
    y = _fp8_grouped_mm(xp.reshape(E * (n + pad), k), column_major(w, x.dtype), offs)
    y = _ContiguousGrad.apply(y).view(E, n + pad, -1)
    return y[:, :n].contiguous() if pad else y


class GroupedExperts(nn.Module):
    """E ungated ReLU FFNs: y = relu(x w1[e]) w2[e] for the rows of expert e."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        # Set by the FP8 transform (llamatron/transforms/fp8.py: `apply_fp8_experts`).
        self.fp8_grouped_mm = False

    def compute_weights(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
        """The weights in the compute dtype (transforms/weight_cast.py's subclass: its copies made once per step)."""
        return w1.to(dtype), w2.to(dtype)

    @property
    def gemm_features(self) -> tuple[int, int]:
        """The GEMMs' feature dimensions (model, hidden): what the FP8 filter judges."""
        return self.w1.shape[1], self.w1.shape[2]

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None, w1: torch.Tensor | None = None,
                w2: torch.Tensor | None = None, grouped: bool | None = None) -> torch.Tensor:
        """x [T, d] sorted by expert, counts [E'] -> [T, d] (grouped GEMM); or x [E', n, d], n rows for
        every expert (the capacity buffer), -> [E', n, d] by batched matmul: equal groups need no
        grouped GEMM, and the shapes stay static. w1/w2: the weights to use instead of the module's
        (expert parallelism passes this rank's shard of them)."""
        w1 = self.w1 if w1 is None else w1
        w2 = self.w2 if w2 is None else w2
        if self.fp8_grouped_mm:
            # bf16 in and out, whatever the autocast; the weights go to bf16 in the column-major copy.
            x = x.to(torch.bfloat16)
            if x.dim() == 3:
                return fp8_batched_matmul(F.relu(fp8_batched_matmul(x, w1)), w2)
            return fp8_grouped_matmul(F.relu(fp8_grouped_matmul(x, w1, counts)), w2, counts)
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not cover _grouped_mm: cast by hand, as it would for a linear layer.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w2 = self.compute_weights(w1, w2, x.dtype)
        if x.dim() == 3:
            return torch.bmm(F.relu(torch.bmm(x, w1)), w2)
        h = F.relu(grouped_matmul(x, w1, counts, grouped))
        return grouped_matmul(h, w2, counts, grouped)
