"""llamatron's own Triton kernels compiled for an H100/H200 (sm_90) to PTX, on the CPU: no GPU needed.

The CPU tests run these kernels under Triton's interpreter, which accepts what the compiler refuses
(a plain Python global read inside a kernel ran there and would have failed on the first GPU call).
Compiling them here catches that before a GPU does, and checks that the GPU's casts are the hardware's
conversions (loss_kernels.HARDWARE_CASTS) while the interpreter's path keeps its arithmetic."""

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without its CUDA backend
    pytest.skip("this Triton has no CUDA backend to compile for", allow_module_level=True)

from llamatron import loss_kernels, swiglu_kernels  # noqa: E402

SM90 = GPUTarget("cuda", 90, 64)
HW_E5M2 = "cvt.rn.satfinite.e5m2x2.f32"  # sm_90's fp32 -> E5M2 conversion, two at a time, rounded to nearest


def _ptx(fn, types: dict, constexprs: dict) -> str:
    signature = {**types, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=SM90).asm["ptx"]


def _loss_grad(hw: bool, fp8: bool = True) -> str:
    types = {"X": "*bf16", "LABELS": "*i64", "LSE": "*fp32", "G": "*fp8e5" if fp8 else "*bf16", "R": "i32",
             "V": "i32", "stride_x": "i32", "stride_g": "i32", "scale": "fp32"}
    return _ptx(loss_kernels._grad, types, {"IGNORE": -100, "HW_CAST": hw, "FP8": fp8, "BM": 32, "BN": 256})


def _swiglu_cast(hw: bool) -> str:
    types = {name: "*bf16" for name in "GAB"} | {"SCALES": "*fp32"} | {n: "*fp8e5" for n in ("DA", "DB", "DAT", "DBT")}
    return _ptx(swiglu_kernels._cast, types | {"M": "i32", "N": "i32"},
                {"DTYPE": 1, "TRANSPOSED": True, "HW_CAST": hw, "BM": 64, "BN": 128})


def _swiglu_amax(hw: bool) -> str:
    types = {"G": "*bf16", "A": "*bf16", "B": "*bf16", "PART": "*fp32", "n": "i32"}
    return _ptx(swiglu_kernels._amax, types, {"DTYPE": 1, "HW_CAST": hw, "BLOCK": 8192})


@pytest.mark.parametrize("kernel", [_loss_grad, _swiglu_cast])
def test_e5m2_casts_are_the_hardware_conversion_on_the_gpu_only(kernel):
    assert HW_E5M2 in kernel(True)
    assert HW_E5M2 not in kernel(False)  # the interpreter's arithmetic, compiled as it is


def test_the_bf16_loss_gradient_rounds_by_the_hardware_on_the_gpu():
    """The BF16 loss's gradient (loss.BF16_LOSS_KERNELS = "triton"): the GPU's round-to-nearest conversion,
    the interpreter's bit arithmetic elsewhere; no E5M2 cast either way."""
    gpu, interpreted = _loss_grad(True, fp8=False), _loss_grad(False, fp8=False)
    assert "cvt.rn.bf16.f32" in gpu and HW_E5M2 not in gpu
    # The arithmetic's rounding increment and mask (0x7FFF, -0x10000) are in the interpreter's path only.
    assert all(c in interpreted and c not in gpu for c in ("32767", "-65536"))


def test_swiglu_amax_rounds_to_bf16_by_the_hardware_on_the_gpu():
    assert "cvt.rn.bf16.f32" in _swiglu_amax(True)
    assert "cvt.rn.bf16.f32" not in _swiglu_amax(False)


def test_the_loss_statistics_kernels_compile():
    stats = _ptx(loss_kernels._row_stats, {"X": "*bf16", "PART_M": "*fp32", "PART_S": "*fp32", "R": "i32", "V": "i32",
                                           "stride_x": "i32"}, {"SLICE": 4096, "BM": 64, "BN": 128})
    combine = _ptx(loss_kernels._combine, {"X": "*bf16", "LABELS": "*i64", "PART_M": "*fp32", "PART_S": "*fp32",
                                           "LSE": "*fp32", "ROW_LOSS": "*fp32", "R": "i32", "stride_x": "i32",
                                           "SLICES": "i32"}, {"IGNORE": -100, "SP": 32, "BR": 128})
    assert ".entry _row_stats" in stats and ".entry _combine" in combine
