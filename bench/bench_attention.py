"""Causal grouped-query attention alone, forward and forward + backward, with each SDPA kernel in one
process: the step's attention at a model's shape, and how close each kernel's outputs and gradients
are to the first one's (cuDNN's by default).

    python bench/bench_attention.py                                  # Llama 3.1 8B: 32 heads, 8 KV heads, 128, seq 8192
    python bench/bench_attention.py --batch 8 --kernels cudnn,flash,fa4-direct,fa4 --json out.json

Kernels are those of `train.attention_backend` (llamatron/runtime.py): cudnn, flash (torch's FA2),
fa4 (FlashAttention 4's kernels behind torch's flash ops; once on, for the rest of the process, so it
runs last), efficient; and fa4-direct, FA4's own `flash_attn_func` (no torch registry needed). The
first kernel listed is the reference the others' outputs and gradients are compared with. TFLOP/s
count the work a causal kernel does (half the square), forward 4·b·h·s²·d/2, backward 2.5 times that;
medians of CUDA-event timings after warm-up, on random normal inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_fp8_loss import median_ms  # noqa: E402
from bench_train_step import write_json  # noqa: E402
from llamatron.runtime import attention_backend, fa4_unavailable_reason  # noqa: E402


def attend(kernel: str, q, k, v):
    """Causal GQA of q, k, v in the projections' layout [batch, seq, heads, head_dim], as the model
    calls it (llamatron/models/attention_ops.py); "fa4-direct": FA4's own entry point, no torch slot."""
    if kernel == "fa4-direct":
        from flash_attn.cute.interface import flash_attn_func

        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    with attention_backend(kernel):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def run_kernel(kernel: str, q, k, v, dout, iters: int, warmup: int):
    """(forward ms, forward + backward ms, out, (dq, dk, dv)) with attention on `kernel`."""
    def forward():
        return attend(kernel, q, k, v)

    def forward_backward():
        out = forward()
        return out, torch.autograd.grad(out, (q, k, v), dout)

    with torch.no_grad():
        fwd_ms = median_ms(forward, iters, warmup)
    both_ms = median_ms(forward_backward, iters, warmup)
    out, grads = forward_backward()
    return fwd_ms, both_ms, out.detach(), [g.detach() for g in grads]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--kernels", default="cudnn,flash,fa4-direct,fa4")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    cli = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    kernels = cli.kernels.split(",")
    if "fa4" in kernels:  # FA4 replaces torch's flash kernels for the rest of the process: last
        kernels = [x for x in kernels if x != "fa4"] + ["fa4"]
    torch.manual_seed(0)
    b, h, hk, s, d = cli.batch, cli.heads, cli.kv_heads, cli.seq_len, cli.head_dim
    q = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, s, hk, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16)
    fwd_flop = 4 * b * h * s * s * d / 2
    name = torch.cuda.get_device_name(device)
    print(f"device {name}; torch {torch.__version__}; q [{b}, {h}, {s}, {d}], {hk} KV heads, causal, bf16", flush=True)
    results, reference = [], None
    for kernel in kernels:
        reason = fa4_unavailable_reason(device) if kernel == "fa4" else None
        if kernel == "fa4-direct" and importlib.util.find_spec("flash_attn") is None:
            reason = "the flash-attn-4 package is not installed"
        if reason:
            print(f"{kernel}: skipped: {reason}", flush=True)
            results.append({"kernel": kernel, "error": reason})
            continue
        t0 = time.perf_counter()
        try:
            fwd_ms, both_ms, out, grads = run_kernel(kernel, q, k, v, dout, cli.iters, cli.warmup)
        except Exception as e:  # noqa: BLE001 - one kernel that cannot run must not end the others
            print(f"{kernel}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            results.append({"kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            continue
        bwd_ms = both_ms - fwd_ms
        row = {"kernel": kernel, "forward_ms": fwd_ms, "backward_ms": bwd_ms, "forward_backward_ms": both_ms,
               "forward_tflops": fwd_flop / fwd_ms / 1e9, "backward_tflops": 2.5 * fwd_flop / bwd_ms / 1e9,
               "first_call_s": time.perf_counter() - t0}
        if reference is None:
            reference = (kernel, out, grads)
        else:
            row["vs"] = reference[0]
            row["out_rel_diff"] = rel_diff(out, reference[1])
            row["grad_rel_diff"] = [rel_diff(g, r) for g, r in zip(grads, reference[2])]
        results.append(row)
        print(f"ATTN {kernel}: forward {fwd_ms:.2f} ms ({row['forward_tflops']:.0f} TFLOP/s), backward {bwd_ms:.2f} ms "
              f"({row['backward_tflops']:.0f} TFLOP/s)"
              + (f"; vs {row['vs']}: out {row['out_rel_diff']:.2e}, dq/dk/dv "
                 + "/".join(f"{x:.2e}" for x in row["grad_rel_diff"]) if "vs" in row else ""), flush=True)
        write_json(cli.json, name, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
