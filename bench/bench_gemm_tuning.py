"""Does cuBLAS's default pick of kernel leave speed behind on the step's GEMMs? Each GEMM of the Llama
3.1 8B block and output layer (forward, input gradient, weight gradient, laid out as nn.Linear's
autograd runs them), timed with cuBLAS's heuristic choice, then with torch's TunableOp (which times
every cuBLASLt algorithm for the shape and keeps the fastest), in one process on one GPU. BF16, and
FP8 tensorwise (`torch._scaled_mm`, E4M3 operands, A row-major and B column-major as torchao calls it).
Medians of CUDA-event windows, random inputs. `--against fast-accum` times the FP8 GEMMs as torchao's recipe
runs them (fast accumulation in the forward only) against all three fast-accumulated (train.fp8_fast_accum).

    python bench/bench_gemm_tuning.py --rows 16384,65536 --json OUT.json
    python bench/bench_gemm_tuning.py --rows 65536 --precisions fp8 --against fast-accum --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = {"wq/wo": (4096, 4096), "wk/wv": (4096, 1024), "w1/w3": (4096, 14336), "w2": (14336, 4096),
          "output": (4096, 128256)}


def median_ms(fn, repeats: int = 7, calls: int = 5) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bf16_ops(m: int, k: int, n: int) -> dict:
    x, w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    return {"fwd": lambda: torch.mm(x, w.t()), "dgrad": lambda: torch.mm(dy, w), "wgrad": lambda: torch.mm(dy.t(), x)}


def fp8_ops(m: int, k: int, n: int, fast_grads: bool = False) -> dict:
    """torchao's three tensorwise GEMMs: each A row-major, each B column-major (a transposed row-major copy);
    the forward fast-accumulated, the two gradients' too with `fast_grads`."""
    def e4m3(*shape):
        return (torch.randn(*shape, device="cuda") * 8).to(torch.float8_e4m3fn)

    one = torch.ones((), device="cuda")
    x, w_t, dy, w_nk_t, dy_t, x_t = e4m3(m, k), e4m3(n, k).t(), e4m3(m, n), e4m3(k, n).t(), e4m3(n, m), e4m3(k, m).t()
    mm = torch._scaled_mm
    return {"fwd": lambda: mm(x, w_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
            "dgrad": lambda: mm(dy, w_nk_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast_grads),
            "wgrad": lambda: mm(dy_t, x_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast_grads)}


def time_all(rows, precision: str, fast_grads: bool = False) -> dict:
    out = {}
    for m in rows:
        for name, (k, n) in SHAPES.items():
            ops = bf16_ops(m, k, n) if precision == "bf16" else fp8_ops(m, k, n, fast_grads)
            for op, fn in ops.items():
                ms = median_ms(fn)
                out[(precision, m, name, op)] = (ms, 2 * m * k * n / ms / 1e9)
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16384,65536")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--tuning-ms", type=int, default=10, help="TunableOp's time per candidate kernel")
    ap.add_argument("--against", choices=("tunableop", "fast-accum"), default="tunableop",
                    help="what the default GEMMs are timed against (fast-accum: FP8 only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    precisions = args.precisions.split(",")
    default = {k: v for p in precisions for k, v in time_all(rows, p).items()}
    if args.against == "fast-accum":  # the same GEMMs, the gradients' fast-accumulated too ("tuned" below)
        tuned = {k: v for p in precisions if p == "fp8" for k, v in time_all(rows, p, fast_grads=True).items()}
        default = {k: v for k, v in default.items() if k in tuned}
    else:
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")
        torch.cuda.tunable.set_max_tuning_duration(args.tuning_ms)  # per candidate kernel
        tuned = {k: v for p in precisions for k, v in time_all(rows, p).items()}
    results = []
    for key, (ms, tflops) in default.items():
        t_ms, t_tflops = tuned[key]
        row = dict(zip(("precision", "rows", "gemm", "op"), key), default_ms=round(ms, 4), tuned_ms=round(t_ms, 4),
                   default_tflops=round(tflops), tuned_tflops=round(t_tflops), speedup=round(ms / t_ms, 3),
                   against=args.against)
        print("ROW", json.dumps(row), flush=True)
        results.append(row)
    if args.against == "tunableop":
        print("tuned entries:", len(torch.cuda.tunable.get_results()))
    from bench_train_step import write_json  # written whole or not at all, with the date and command

    write_json(args.json, torch.cuda.get_device_name(), results)


if __name__ == "__main__":
    main()
