"""SwiGLU's backward with its E5M2 casts, in Triton kernels of its own (the FP8 feed-forward,
`llamatron.transforms.fp8_swiglu`, CUDA).

h = silu(a) * b, with a and b the gate and up projections [M, N] (bf16 under autocast). Backward gets dh and needs
da and db as the operands of four FP8 GEMMs: E5M2 with one scale each (tensorwise, as torchao's
`Float8Linear` casts a gradient), row-major for the input gradient and token-major for the weight
gradient. Compiled by inductor from torchao's graph that is a reduction over dh, a and b for the two
amaxes, then one kernel that recomputes da and db and writes all four copies, two of them a byte at a
stride: 2.3 + 4.7 ms a micro-batch of 65,536 x 14,336 on an H200, 2.0-2.5 TB/s. Here:

- `_amax`: the largest |da| and |db| of each block of the flat tensors, into a small buffer whose
  maximum (torch) gives the two scales;
- `_cast`: each tile's da and db, scaled and cast, row-major; and with TRANSPOSED, token-major too
  (else the caller copies them: bench/bench_fp8_swiglu.py times both). Its tile and warps are timed
  once per shape on the GPU (`triton.autotune`).

da and db are rounded to the activations' dtype where eager autograd rounds them (dh * b, silu(a), and
the two results), so the E5M2 values are exactly those of eager torchao on the bf16 gradients
(tests/test_fp8_swiglu.py, under Triton's CPU interpreter). Both roundings are the GPU's conversions on
CUDA (`loss_kernels.HARDWARE_CASTS`), and arithmetic giving the same bits in the interpreter. The GPU's
exp differs from the CPU's in the last bit now and then, and so, rarely, does an E5M2 value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamatron.loss_kernels import _to_e5m2, hardware_casts

# Elements per program of the amax pass; rows x columns per tile of the cast where it is not tuned (the
# CPU interpreter: tests). On CUDA the cast's tile and warps are timed once per shape (`_cast_tuned`).
AMAX_BLOCK = 8192
TILE_ROWS, TILE_COLS = 64, 128
E5M2_MAX = 57344.0
_E5M2_MAX = tl.constexpr(E5M2_MAX)  # the kernels' copy: a compiled kernel reads constexpr globals only
_CAST_CONFIGS = [triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in (
    (32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8), (128, 128, 8))]


@triton.jit
def _bf16(x, HW_CAST: tl.constexpr):
    """x (fp32) rounded to bf16's precision, to nearest with ties to even, as torch's cast: the GPU's
    conversion (HW_CAST), else integer arithmetic (Triton's CPU interpreter truncates in its own cast)."""
    if HW_CAST:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)


@triton.jit
def _round(x, DTYPE: tl.constexpr, HW_CAST: tl.constexpr):
    """x (fp32) rounded to the activations' precision: 1 bf16, 2 fp16, 0 none (fp32)."""
    if DTYPE == 1:
        x = _bf16(x, HW_CAST)
    elif DTYPE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _grads(g, a, b, DTYPE: tl.constexpr, HW_CAST: tl.constexpr):
    """da, db (fp32, each rounded to the activations' dtype where eager's kernels round them) for
    h = silu(a) * b."""
    e = 1.0 + tl.exp(-a)
    sig = 1.0 / e
    db = _round(g * _round(a / e, DTYPE, HW_CAST), DTYPE, HW_CAST)  # silu(a) as torch's kernel computes it
    gb = _round(g * b, DTYPE, HW_CAST)
    da = _round(gb * sig * (1.0 + a * (1.0 - sig)), DTYPE, HW_CAST)  # torch's silu_backward, in its order
    return da, db


@triton.jit
def _amax(G, A, B, PART, n, DTYPE: tl.constexpr, HW_CAST: tl.constexpr, BLOCK: tl.constexpr):
    """PART [programs, 2]: the largest |da| and |db| over the program's block of the flat tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    da, db = _grads(g, a, b, DTYPE, HW_CAST)
    tl.store(PART + tl.program_id(0) * 2, tl.max(tl.abs(da), 0))
    tl.store(PART + tl.program_id(0) * 2 + 1, tl.max(tl.abs(db), 0))


@triton.jit
def _cast(G, A, B, SCALES, DA, DB, DAT, DBT, M, N, DTYPE: tl.constexpr, TRANSPOSED: tl.constexpr,
          HW_CAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """DA, DB [M, N] = E5M2(da * SCALES[0]), E5M2(db * SCALES[1]); with TRANSPOSED also DAT, DBT [N, M]."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    at = rows[:, None].to(tl.int64) * N + cols[None, :]
    g = tl.load(G + at, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + at, mask=mask, other=0.0).to(tl.float32)
    da, db = _grads(g, a, b, DTYPE, HW_CAST)
    da8 = _to_e5m2(tl.minimum(tl.maximum(da * tl.load(SCALES), -_E5M2_MAX), _E5M2_MAX), HW_CAST)
    db8 = _to_e5m2(tl.minimum(tl.maximum(db * tl.load(SCALES + 1), -_E5M2_MAX), _E5M2_MAX), HW_CAST)
    tl.store(DA + at, da8, mask=mask)
    tl.store(DB + at, db8, mask=mask)
    if TRANSPOSED:
        at_t = cols[None, :].to(tl.int64) * M + rows[:, None]
        tl.store(DAT + at_t, da8, mask=mask)
        tl.store(DBT + at_t, db8, mask=mask)


_cast_tuned = triton.autotune(_CAST_CONFIGS, key=["M", "N", "DTYPE", "TRANSPOSED", "HW_CAST"])(_cast)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def swiglu_grad_scales(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[2] fp32: the E5M2 scales of da and db (E5M2's largest finite value over each's amax)."""
    n = g.numel()
    programs = triton.cdiv(n, AMAX_BLOCK)
    part = torch.empty((programs, 2), dtype=torch.float32, device=g.device)
    _amax[(programs,)](g, a, b, part, n, DTYPE=_DTYPES[a.dtype], HW_CAST=hardware_casts(g), BLOCK=AMAX_BLOCK,
                       num_warps=8)
    return E5M2_MAX / part.amax(0).clamp(min=1e-12)


def swiglu_grad_e5m2(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool = True):
    """For g, a, b [M, N] contiguous, of one dtype (bf16, fp16 or fp32): (da8, db8, da8_t, db8_t, scales), the E5M2 gradients
    row-major [M, N] and (with `transposed`, else None) token-major [N, M], and their two scales."""
    assert g.is_contiguous() and a.is_contiguous() and b.is_contiguous() and g.shape == a.shape == b.shape
    assert g.dtype == a.dtype == b.dtype
    M, N = g.shape
    scales = swiglu_grad_scales(g, a, b)
    da8 = torch.empty((M, N), dtype=torch.float8_e5m2, device=g.device)
    db8 = torch.empty_like(da8)
    da8_t = torch.empty((N, M), dtype=torch.float8_e5m2, device=g.device) if transposed else da8
    db8_t = torch.empty_like(da8_t) if transposed else db8
    args = (g, a, b, scales, da8, db8, da8_t, db8_t, M, N, _DTYPES[a.dtype], transposed, hardware_casts(g))
    if g.is_cuda:
        _cast_tuned[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))](*args)
    else:
        _cast[(triton.cdiv(M, TILE_ROWS), triton.cdiv(N, TILE_COLS))](*args, BM=TILE_ROWS, BN=TILE_COLS)
    return da8, db8, (da8_t if transposed else None), (db8_t if transposed else None), scales
