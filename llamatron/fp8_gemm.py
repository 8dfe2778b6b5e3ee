"""The FP8 primitives llamatron's own FP8 GEMMs share (the fused loss's output layer, LoRA's frozen
base layers, FP8 scoring): a tensor cast to FP8 with one dynamic scale or one per row, and
`torch._scaled_mm` on such operands.
torchao's `Float8Linear` does the same for trainable layers; these are for GEMMs it does not cover.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llamatron.config import FP8_GEMMS


@dataclass(frozen=True)
class FastAccum:
    """Which of a layer's FP8 GEMMs sum in the tensor cores alone (`use_fast_accum`), without cuBLAS's
    periodic promotion of the partial sums to fp32: faster, and less exact over long sums
    (train.fp8_fast_accum). The default is torchao's recipe: the forward product only."""

    output: bool = True
    grad_input: bool = False
    grad_weight: bool = False

    @classmethod
    def of(cls, gemms: Iterable[str]) -> "FastAccum":
        """From the GEMMs' names (FP8_GEMMS), as train.fp8_fast_accum lists them."""
        gemms = set(gemms)
        return cls(*(g in gemms for g in FP8_GEMMS))


def to_fp8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so its largest magnitude is `dtype`'s largest finite value, saturated and cast; and the
    inverse scale (fp32 scalar), which `fp8_mm` takes (torchao's tensorwise dynamic scaling)."""
    return _scaled_cast(x, x.abs().amax(), dtype)


def to_fp8_rowwise(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] with one dynamic scale per row (torchao's rowwise recipe), and the inverse scales
    [rows, 1] in fp32. A row's largest magnitude is a reduction along the row only, which compile fuses
    with the cast (and with the kernel making x) rather than a pass over the whole tensor first."""
    return _scaled_cast(x, x.abs().amax(dim=-1, keepdim=True), dtype)


def _scaled_cast(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so that `amax` (broadcast over x) meets `dtype`'s largest finite value, saturated and
    cast; and the inverse scale in fp32."""
    fmax = torch.finfo(dtype).max
    scale = fmax / amax.float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def fp8_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a @ b for FP8 a (row-major) and b (column-major), as torch._scaled_mm takes them; the inverse
    scales are scalars (tensorwise) or a_inv [m, 1] and b_inv [1, n] (rowwise). `fast_accum`: the
    tensor cores' own accumulation, without cuBLAS's periodic promotion to fp32 (faster; torchao's
    `Float8Linear` uses it for its forward GEMM, not for the two gradients').
    On the CPU (tests) the operands are upcast and multiplied in fp32: the same exact products and fp32
    sums as torch's CPU `_scaled_mm`, summed in another order, and 100-400x faster (its CPU kernel took
    87 ms for a 512 x 64 x 64 product; tests/test_fp8_gemm.py)."""
    if a.device.type == "cpu":
        return ((a.float() @ b.float()) * (a_inv * b_inv)).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
