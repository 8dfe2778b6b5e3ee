"""SwiGLU's backward with its E5M2 casts on the Llama 3.1 8B FFN shape, on one GPU, in one process: the
ways of making da and db in E5M2, row-major and token-major, from dh, a and b [M, 14336] (bf16).

    python bench/bench_fp8_swiglu.py --tokens 65536 --json OUT.json

  inductor      the gradients and their tensorwise casts compiled from torch ops, as torchao's graph is
                (one amax reduction, then a kernel writing all four copies)
  triton        llamatron.swiglu_kernels: the amax pass, then the cast writing both layouts
  triton_copy   the same kernels writing row-major only, then inductor's transposing copy of each
  amax_only     the kernels' amax pass alone
  triton_arith  `triton` with the roundings by the interpreter's arithmetic instead of the GPU's conversions
The cast kernel's tile is timed per shape (triton.autotune); the JSON names the ones it chose.
Medians of CUDA-event timings after warm-up; never on zeros (random inputs). Each way's bytes moved per
call are in the JSON, with its bandwidth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_fp8_loss import median_ms  # noqa: E402
from bench_train_step import write_json  # noqa: E402
from llamatron import loss_kernels  # noqa: E402
from llamatron import swiglu_kernels as K  # noqa: E402
from llamatron.fp8_gemm import to_fp8  # noqa: E402
from llamatron.loss import _copy_transposed  # noqa: E402


def _inductor_way(g, a, b):
    """What inductor makes of torchao's graph: eager autograd's gradients (bf16), each cast with one
    scale, row-major and transposed."""
    a32 = a.float()
    sig = torch.sigmoid(a32)
    db = (g.float() * F.silu(a32).bfloat16().float()).bfloat16()
    da = ((g.float() * b.float()).bfloat16().float() * sig * (1 + a32 * (1 - sig))).bfloat16()
    out = []
    for x in (da, db):
        x8, inv = to_fp8(x, torch.float8_e5m2)
        out += [x8, x8.t().contiguous(), inv]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=14336)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    M, N = args.tokens, args.hidden
    a = (2 * torch.randn(M, N, device="cuda")).bfloat16()
    b = torch.randn(M, N, device="cuda").bfloat16()
    g = (1e-4 * torch.randn(M, N, device="cuda")).bfloat16()
    compiled = torch.compile(_inductor_way, dynamic=False)
    copy = torch.compile(_copy_transposed, dynamic=False)

    def triton_copy():
        da8, db8, _, _, scales = K.swiglu_grad_e5m2(g, a, b, transposed=False)
        da8_t, db8_t = da8.new_empty(N, M), db8.new_empty(N, M)
        copy(da8_t, da8)
        copy(db8_t, db8)
        return da8, db8, da8_t, db8_t, scales

    def arithmetic_casts():
        loss_kernels.HARDWARE_CASTS = False
        try:
            return K.swiglu_grad_e5m2(g, a, b)
        finally:
            loss_kernels.HARDWARE_CASTS = True

    ways = {
        "inductor": lambda: compiled(g, a, b),
        "triton": lambda: K.swiglu_grad_e5m2(g, a, b),
        "triton_copy": triton_copy,
        "triton_rowmajor_only": lambda: K.swiglu_grad_e5m2(g, a, b, transposed=False),
        "amax_only": lambda: K.swiglu_grad_scales(g, a, b),
        "triton_arith": arithmetic_casts,
    }
    gbytes = {"inductor": 16, "triton": 16, "triton_copy": 18, "triton_rowmajor_only": 14, "amax_only": 6,
              "triton_arith": 16}
    results = []
    for name, fn in ways.items():
        ms = median_ms(fn, args.repeats)
        moved = gbytes[name] * M * N / 1e9  # the least each way must read and write
        results.append({"way": name, "tokens": M, "hidden": N, "ms": round(ms, 4), "gb": round(moved, 2),
                        "tb_per_s": round(moved / ms, 3)})
        print(f"{name:24s} {ms:8.3f} ms  {moved / ms:6.2f} TB/s (of {moved:.1f} GB)", flush=True)
    ref = compiled(g, a, b)
    got = K.swiglu_grad_e5m2(g, a, b)
    agree = {
        name: float((x.view(torch.uint8) == y.view(torch.uint8)).float().mean())
        for name, x, y in (("da", got[0], ref[0]), ("db", got[1], ref[3]), ("da_t", got[2], ref[1]), ("db_t", got[3], ref[4]))
    }
    arith = arithmetic_casts()
    # The share of equal bytes per tensor (a bool said only "not all" on the H200, 2026-12-07), and the scales.
    agree["hardware_casts_vs_arithmetic"] = [float((x.view(torch.uint8) == y.view(torch.uint8)).float().mean())
                                             for x, y in zip(got[:4], arith[:4])]
    agree["hardware_casts_vs_arithmetic_scales_equal"] = bool(torch.equal(got[4], arith[4]))
    print("bits equal to inductor's:", agree)
    chosen = {str(key): str(config) for key, config in K._cast_tuned.cache.items()}
    print("tiles chosen:", chosen)
    results.append({"bits_equal_to_inductor": agree, "tiles_chosen": chosen})
    write_json(args.json, torch.cuda.get_device_name(), results)


if __name__ == "__main__":
    main()
