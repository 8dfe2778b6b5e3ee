"""Does cuBLAS's default pick of kernel leave speed behind on the step's GEMMs? Each GEMM of the Llama
3.1 8B block and output layer (forward, input gradient, weight gradient, laid out as nn.Linear's
autograd runs them), timed with cuBLAS's heuristic choice, then with torch's TunableOp (which times
every cuBLASLt algorithm for the shape and keeps the fastest), in one process on one GPU. BF16, and
FP8 tensorwise (`torch._scaled_mm`, E4M3 operands, A row-major and B column-major as torchao calls it).
Medians of CUDA-event windows, random inputs.

    python bench/bench_gemm_tuning.py --rows 16384,65536 --json OUT.json
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


def fp8_ops(m: int, k: int, n: int) -> dict:
    """torchao's three tensorwise GEMMs: each A row-major, each B column-major (a transposed row-major copy)."""
    def e4m3(*shape):
        return (torch.randn(*shape, device="cuda") * 8).to(torch.float8_e4m3fn)

    one = torch.ones((), device="cuda")
    x, w_t, dy, w_nk_t, dy_t, x_t = e4m3(m, k), e4m3(n, k).t(), e4m3(m, n), e4m3(k, n).t(), e4m3(n, m), e4m3(k, m).t()
    mm = torch._scaled_mm
    return {"fwd": lambda: mm(x, w_t, one, one, out_dtype=torch.bfloat16),
            "dgrad": lambda: mm(dy, w_nk_t, one, one, out_dtype=torch.bfloat16),
            "wgrad": lambda: mm(dy_t, x_t, one, one, out_dtype=torch.bfloat16)}


def time_all(rows, precision: str) -> dict:
    make = bf16_ops if precision == "bf16" else fp8_ops
    out = {}
    for m in rows:
        for name, (k, n) in SHAPES.items():
            for op, fn in make(m, k, n).items():
                ms = median_ms(fn)
                out[(precision, m, name, op)] = (ms, 2 * m * k * n / ms / 1e9)
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16384,65536")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--tuning-ms", type=int, default=10, help="TunableOp's time per candidate kernel")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    precisions = args.precisions.split(",")
    default = {k: v for p in precisions for k, v in time_all(rows, p).items()}
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)
    torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")
    torch.cuda.tunable.set_max_tuning_duration(args.tuning_ms)  # per candidate kernel
    tuned = {k: v for p in precisions for k, v in time_all(rows, p).items()}
    results = []
    for key, (ms, tflops) in default.items():
        t_ms, t_tflops = tuned[key]
        row = dict(zip(("precision", "rows", "gemm", "op"), key), default_ms=round(ms, 4), tuned_ms=round(t_ms, 4),
                   default_tflops=round(tflops), tuned_tflops=round(t_tflops), speedup=round(ms / t_ms, 3))
        print("ROW", json.dumps(row), flush=True)
        results.append(row)
    print("tuned entries:", len(torch.cuda.tunable.get_results()))
    from bench_train_step import write_json  # written whole or not at all, with the date and command

    write_json(args.json, torch.cuda.get_device_name(), results)


if __name__ == "__main__":
    main()
