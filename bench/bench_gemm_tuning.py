"""Does cuBLAS's default pick of kernel leave speed behind on the step's GEMMs? Each GEMM of the Llama
3.1 8B block and output layer (forward, input gradient, weight gradient, laid out as nn.Linear's
autograd runs them), timed with cuBLAS's heuristic choice, then with torch's TunableOp (which times
every cuBLASLt algorithm for the shape and keeps the fastest), in one process on one GPU. BF16, and
FP8 tensorwise (`torch._scaled_mm`, E4M3 operands, A row-major and B column-major as torchao calls it).
Medians of CUDA-event windows, random inputs. `--against fast-accum` times the FP8 GEMMs as torchao's recipe
runs them (fast accumulation in the forward only) against all three fast-accumulated (train.fp8_fast_accum),
then how far each gradient GEMM lands from the fp32 product of its operands either way (`fast_accum_errors`).

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
        return random_fp8(shape, torch.float8_e4m3fn)

    one = torch.ones((), device="cuda")
    x, w_t, dy, w_nk_t, dy_t, x_t = e4m3(m, k), e4m3(n, k).t(), e4m3(m, n), e4m3(k, n).t(), e4m3(n, m), e4m3(k, m).t()
    mm = torch._scaled_mm
    return {"fwd": lambda: mm(x, w_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
            "dgrad": lambda: mm(dy, w_nk_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast_grads),
            "wgrad": lambda: mm(dy_t, x_t, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast_grads)}


def random_fp8(shape, dtype, device: str = "cuda", rows: int = 8192) -> torch.Tensor:
    """N(0, 8^2) cast to `dtype`, drawn a slab of rows at a time: the output layer's 65,536 x 128,256 gradient
    would need 34 GB in fp32 at once (out of memory on an H100)."""
    out = torch.empty(*shape, device=device, dtype=dtype)
    for r in range(0, shape[0], rows):
        out[r : r + rows] = (torch.randn(min(rows, shape[0] - r), *shape[1:], device=device) * 8).to(dtype)
    return out


def _fp32_product(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """a @ b of FP8 operands in true fp32 (no TF32), over K in chunks: the reference the GEMMs are held to."""
    out = torch.zeros(a.shape[0], b.shape[1], device=a.device)
    for k in range(0, a.shape[1], chunk):
        out += a[:, k : k + chunk].float() @ b[k : k + chunk].float()
    return out


@torch.no_grad()
def fast_accum_errors(rows, shapes: dict = SHAPES, device: str = "cuda") -> list[dict]:
    """How far each gradient GEMM lands from the fp32 product of its own E4M3 operands, promoted (torchao's
    default) and fast-accumulated: relative Frobenius errors, the outputs in fp32 so that no bf16 rounding
    hides the accumulator's. Random operands (N(0, 8^2) cast to E4M3): an order of magnitude, not a
    gradient's own distribution."""
    torch.backends.cuda.matmul.allow_tf32 = False
    one, out = torch.ones((), device=device), []
    for m in rows:
        for name, (k, n) in shapes.items():
            for op, (ka, kb) in {"dgrad": ((m, n), (n, k)), "wgrad": ((n, m), (m, k))}.items():
                a = random_fp8(ka, torch.float8_e5m2, device)  # the gradient, E5M2 as torchao's
                b = random_fp8((kb[1], kb[0]), torch.float8_e4m3fn, device).t()  # column-major
                ref = _fp32_product(a, b)
                errs = {f"rel_err_{mode}": float((torch._scaled_mm(a, b, one, one, out_dtype=torch.float32,
                                                                   use_fast_accum=fast) - ref).norm() / ref.norm())
                        for mode, fast in (("promoted", False), ("fast", True))}
                row = dict(precision="fp8", rows=m, gemm=name, op=op, k=ka[1], **errs)
                print("ERR", json.dumps(row), flush=True)
                out.append(row)
                del a, b, ref
                if device == "cuda":
                    torch.cuda.empty_cache()
    return out


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
    # BF16 GEMMs have no accumulation to choose: against fast accumulation only the FP8 ones are timed
    precisions = ["fp8"] if args.against == "fast-accum" else args.precisions.split(",")
    default = {k: v for p in precisions for k, v in time_all(rows, p).items()}
    if args.against == "fast-accum":  # the same GEMMs, the gradients' fast-accumulated too ("tuned" below)
        tuned = time_all(rows, "fp8", fast_grads=True)
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
    else:
        results += fast_accum_errors(rows)
    from bench_train_step import write_json  # written whole or not at all, with the date and command

    write_json(args.json, torch.cuda.get_device_name(), results)


if __name__ == "__main__":
    main()
