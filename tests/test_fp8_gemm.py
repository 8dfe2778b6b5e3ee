"""llamatron/fp8_gemm.py on the CPU: fp8_mm's upcast product against torch's own CPU `_scaled_mm`."""

import pytest
import torch

from llamatron.fp8_gemm import fp8_mm, to_fp8, to_fp8_rowwise


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rowwise", [False, True])
def test_cpu_fp8_mm_gives_scaled_mm_up_to_the_order_of_its_fp32_sums(rowwise, out_dtype):
    """Both multiply the FP8 values exactly and sum in fp32; only the order of the sums differs, so the
    results agree to fp32 rounding (one bf16 step where the output is bf16), and a wrong scale, layout
    or transpose would be off by far more."""
    g = torch.Generator().manual_seed(0)
    cast = to_fp8_rowwise if rowwise else to_fp8
    a, a_inv = cast(torch.randn(37, 48, generator=g) * 3)
    b, b_inv = cast(torch.randn(40, 48, generator=g))  # [n, k]: the weight as a linear layer keeps it
    b, b_inv = b.t(), b_inv.t()  # column-major [k, n], the scales [1, n]
    ours = fp8_mm(a, a_inv, b, b_inv, out_dtype)
    torchs = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)
    assert ours.dtype == torchs.dtype == out_dtype and ours.shape == (37, 40)
    eps = torch.finfo(out_dtype).eps
    torch.testing.assert_close(ours.float(), torchs.float(), rtol=2 * eps, atol=2 * eps * torchs.float().abs().max().item())
    exact = (a.float() * a_inv) @ (b.float() * b_inv)  # the scaled operands in fp32: what both approximate
    torch.testing.assert_close(ours.float(), exact, rtol=2 * eps, atol=2 * eps * exact.abs().max().item())
