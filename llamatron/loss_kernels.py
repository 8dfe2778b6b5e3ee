"""The FP8 fused loss's cross-entropy and E5M2 softmax gradient in Triton kernels of its own
(`llamatron.loss`, CUDA); the same kernels give the BF16 loss its bf16 gradient where
`loss.BF16_LOSS_KERNELS` asks for them (`loss_and_grad`, the default for bf16 logits since 2026-12-07).

For each chunk of logits [R, V] (bf16, V = 128,256 for Llama 3.1) the FP8 output layer needs the loss
and the gradient softmax - one_hot, scaled and cast to E5M2. Compiled by inductor that is one kernel
with a row per program: 2.71 ms a chunk of 8,192 rows on an H100. Here, three kernels, over tiles of
rows x vocabulary, 2.27 ms:

- `_row_stats`: the running max and sum of exponentials of each row over a slice of the vocabulary
  (a 2-D grid: 8,192 rows alone are too few programs to keep every SM reading): 0.87 ms, 2.4 TB/s;
- `_combine`: each row's log-sum-exp from its slices, and its loss lse - x[label];
- `_grad`: each tile's gradient.

The token-major copy that the weight gradient's FP8 GEMM reads stays inductor's transposing copy
(`loss._copy_transposed`): written from `_grad`'s tiles too (`tl.trans` of the E5M2 tile, or of the
fp32 tile before its cast), the chunk took 5.65 and 4.25 ms against 3.20 with the copy
(docs/performance.md, "The FP8 loss's gradient in Triton kernels").

The E5M2 cast rounds to nearest with ties to even, as torch's cast does. On the GPU that is the
hardware's conversion (HW_CAST); under Triton's CPU interpreter, whose own float-to-FP8 cast does not
round, arithmetic of its own (`_to_e5m2`) that gives the same bits: the tests run the kernels there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamatron.loss import IGNORE_INDEX

# Rows x columns per tile of the gradient, and columns per slice of the statistics' grid:
# bench/bench_fp8_loss.py times the kernels.
TILE_ROWS, TILE_COLS, SLICE_COLS = 64, 128, 4096
# On CUDA the casts are the hardware's (HARDWARE_CASTS; false: the interpreter's arithmetic, to time it).
HARDWARE_CASTS = True
# On CUDA the gradient's tile is timed once per shape instead (TUNE_GRAD): 64 x 128 was the fastest on
# the H100, 32 x 256 on the H200 (2.84 against 2.94 ms a chunk). Every tile writes the same bits.
TUNE_GRAD = True
_GRAD_CONFIGS = [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in (
    (64, 128, 4), (32, 256, 4), (32, 256, 8), (64, 256, 8), (128, 64, 4), (128, 128, 8))]


@triton.jit
def _row_stats(X, PART_M, PART_S, R, V, stride_x, SLICE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """PART_M, PART_S [slices, R]: max and sum of exp(x - max) of rows over the program's slice."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    first = tl.program_id(1) * SLICE
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    base = X + rows[:, None].to(tl.int64) * stride_x
    # Constant bounds: Triton 3.6's interpreter (torch 2.11's) cannot take a program id in range().
    for offset in range(0, SLICE, BN):
        cols = first + offset + tl.arange(0, BN)
        mask = (rows < R)[:, None] & (cols < V)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no inf - inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m = m_new
    out = tl.program_id(1) * R + rows
    tl.store(PART_M + out, m, mask=rows < R)
    tl.store(PART_S + out, s, mask=rows < R)


@triton.jit
def _combine(X, LABELS, PART_M, PART_S, LSE, ROW_LOSS, R, stride_x, SLICES, IGNORE: tl.constexpr,
             SP: tl.constexpr, BR: tl.constexpr):
    """LSE [R]: each row's log-sum-exp from its slices; ROW_LOSS [R]: lse - x[label] (0 if ignored)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    live = rows < R
    slices = tl.arange(0, SP)
    at = slices[:, None] * R + rows[None, :]
    mask = (slices < SLICES)[:, None] & live[None, :]
    pm = tl.load(PART_M + at, mask=mask, other=float("-inf"))
    ps = tl.load(PART_S + at, mask=mask, other=0.0)
    m = tl.max(pm, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(ps * tl.exp(pm - m_safe[None, :]), 0))
    label = tl.load(LABELS + rows, mask=live, other=IGNORE)
    valid = live & (label != IGNORE)
    target = tl.load(X + rows.to(tl.int64) * stride_x + tl.where(valid, label, 0), mask=valid, other=0.0)
    tl.store(LSE + rows, lse, mask=live)
    tl.store(ROW_LOSS + rows, tl.where(valid, lse - target.to(tl.float32), 0.0), mask=live)


@triton.jit
def _to_e5m2(x, HW_CAST: tl.constexpr):
    """x (fp32, |x| < 57344) in E5M2, rounded to nearest, ties to even, as torch's cast. HW_CAST: the
    GPU's conversion. Else by arithmetic, for the CPU interpreter: first to a value E5M2 holds exactly,
    in fp32 (its mantissa rounded to 2 bits; below 2^-14, E5M2's subnormals, to a multiple of 2^-16 by
    adding and subtracting 2^23), then exactly to fp16, of which E5M2 is the top byte."""
    if HW_CAST:
        return x.to(tl.float8e5, fp_downcast_rounding="rtne")
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0xFFFFF + ((bits >> 21) & 1)) & -0x200000).to(tl.float32, bitcast=True)
    subnormal = ((a * 65536.0 + 8388608.0) - 8388608.0) * (1.0 / 65536.0)
    r = tl.where(a < 6.103515625e-05, subnormal, normal)
    negative = x.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 stays -0.0, as torch's cast keeps it
    half = tl.where(negative, -r, r).to(tl.float16).to(tl.int16, bitcast=True)
    return (half >> 8).to(tl.int8).to(tl.float8e5, bitcast=True)


@triton.jit
def _to_bf16(x, HW_CAST: tl.constexpr):
    """x (fp32, finite) in bf16, rounded to nearest, ties to even, as torch's cast. HW_CAST: the GPU's
    conversion; else by arithmetic on the bits (the CPU interpreter's own cast truncates)."""
    if HW_CAST:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
    return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _grad(X, LABELS, LSE, G, R, V, stride_x, stride_g, scale,
          IGNORE: tl.constexpr, HW_CAST: tl.constexpr, FP8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """G [R, V] = E5M2((softmax - one_hot) * scale), zero in ignored rows; FP8 false: in G's own dtype
    (bf16), unscaled."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < R)[:, None] & (cols < V)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=rows < R, other=0.0)
    label = tl.load(LABELS + rows, mask=rows < R, other=IGNORE)
    p = tl.exp(x - lse[:, None])
    p = tl.where(cols[None, :] == label[:, None], p - 1.0, p)
    p = tl.where((label != IGNORE)[:, None], p, 0.0)
    if FP8:
        g = _to_e5m2(p * scale, HW_CAST)
    else:
        g = _to_bf16(p, HW_CAST)
    tl.store(G + rows[:, None].to(tl.int64) * stride_g + cols[None, :], g, mask=mask)


_grad_tuned = triton.autotune(_GRAD_CONFIGS, key=["R", "V", "HW_CAST", "FP8"])(_grad)


def hardware_casts(x: torch.Tensor) -> bool:
    """Whether the kernels' casts on x's device are the GPU's conversions (HW_CAST)."""
    return x.is_cuda and HARDWARE_CASTS


def loss_and_grad_e5m2(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of logits [R, V] (row-major) against labels [R] (IGNORE_INDEX: no loss,
    no gradient), and (softmax - one_hot) * scale in E5M2 [R, V], row-major."""
    return _loss_and_grad(logits, labels, scale, torch.float8_e5m2)


def loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for the BF16 loss (llamatron.loss.BF16_LOSS_KERNELS): softmax - one_hot in logits' dtype."""
    return _loss_and_grad(logits, labels, 1.0, logits.dtype)


def _loss_and_grad(logits, labels, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    R, V = logits.shape
    assert logits.stride(1) == 1 and labels.is_contiguous()
    slices = triton.cdiv(V, SLICE_COLS)
    part_m = torch.empty((slices, R), dtype=torch.float32, device=logits.device)
    part_s = torch.empty_like(part_m)
    _row_stats[(triton.cdiv(R, TILE_ROWS), slices)](
        logits, part_m, part_s, R, V, logits.stride(0), SLICE=SLICE_COLS, BM=TILE_ROWS, BN=TILE_COLS)
    lse = torch.empty(R, dtype=torch.float32, device=logits.device)
    row_loss = torch.empty_like(lse)
    _combine[(triton.cdiv(R, 128),)](
        logits, labels, part_m, part_s, lse, row_loss, R, logits.stride(0), slices, IGNORE=IGNORE_INDEX,
        SP=triton.next_power_of_2(slices), BR=128)
    grad = torch.empty((R, V), dtype=dtype, device=logits.device)
    args = (logits, labels, lse, grad, R, V, logits.stride(0), grad.stride(0), scale, IGNORE_INDEX,
            hardware_casts(logits), dtype == torch.float8_e5m2)
    if logits.is_cuda and TUNE_GRAD:
        _grad_tuned[lambda meta: (triton.cdiv(R, meta["BM"]), triton.cdiv(V, meta["BN"]))](*args)
    else:
        _grad[(triton.cdiv(R, TILE_ROWS), triton.cdiv(V, TILE_COLS))](*args, BM=TILE_ROWS, BN=TILE_COLS)
    return row_loss.sum(), grad
