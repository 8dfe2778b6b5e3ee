"""The fused loss's FP8 output layer on the Llama 3.1 output shape (128,256 x 4,096), on one GPU, in one
process: how its chunk's softmax gradient gets its transposed copy (the weight gradient's FP8 GEMM
reads it token-major), and the whole layer forward + backward, FP8 against BF16.

    python bench/bench_fp8_loss.py --tokens 65536 --json OUT.json

Ways of making one chunk's E5M2 gradient and its transpose from bf16 logits [8192, 128256]:
  separate     llamatron.loss's: the loss and gradient compiled (one kernel), then a compiled transposing copy
  fused        the transposed gradient written by the loss's own compiled kernel as well
  eager        the loss and gradient compiled, then eager's .t().contiguous() (the code before 2026-12-06)
  none         the loss and gradient only (the floor)
Medians of CUDA-event timings after warm-up; never on zeros (random logits and hidden states).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from llamatron import loss as L


def _fused(logits, labels):
    loss, g8 = L._loss_and_grad_e5m2(logits, labels)
    return loss, g8, g8.t().contiguous()


def _cast_only(x):
    return L.to_fp8(x, torch.float8_e4m3fn)


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def chunk_ways(logits, labels, repeats: int) -> dict:
    grad_only = torch.compile(L._loss_and_grad_e5m2, dynamic=False)
    fused = torch.compile(_fused, dynamic=False)
    transposed = torch.compile(L._transposed, dynamic=False)
    ways = {
        "separate": lambda: transposed(grad_only(logits, labels)[1]),
        "fused": lambda: fused(logits, labels),
        "eager": lambda: grad_only(logits, labels)[1].t().contiguous(),
        "none": lambda: grad_only(logits, labels),
    }
    out = {name: median_ms(fn, repeats) for name, fn in ways.items()}
    g8 = grad_only(logits, labels)[1]
    bits = [x.view(torch.uint8) for x in (g8.t().contiguous(), transposed(g8), fused(logits, labels)[1], g8)]
    out["separate_transpose_exact"] = bool(torch.equal(bits[0], bits[1]))
    out["fused_gradient_equals_separate"] = bool(torch.equal(bits[2], bits[3]))
    return out


def _wgrad_add(acc, g8_t, g_inv, h8_t, h_inv):
    return acc + L.fp8_mm(g8_t, g_inv, h8_t.t(), h_inv, torch.float32)


def wgrad_ways(g8_t, h8_t, repeats: int) -> dict:
    """One chunk's output-weight gradient added into the fp32 accumulator: cuBLAS's FP8 GEMM then an add
    (llamatron.loss's), against the sum compiled with max-autotune (a Triton GEMM may take the add as
    its epilogue)."""
    one = torch.ones((), device=g8_t.device)
    acc = torch.zeros(g8_t.shape[0], h8_t.shape[0], device=g8_t.device)
    tuned = torch.compile(_wgrad_add, mode="max-autotune-no-cudagraphs", dynamic=False)
    ways = {"gemm_then_add": lambda: acc.add_(L.fp8_mm(g8_t, one, h8_t.t(), one, torch.float32)),
            "gemm_only": lambda: L.fp8_mm(g8_t, one, h8_t.t(), one, torch.float32),
            "max_autotune_sum": lambda: tuned(acc, g8_t, one, h8_t, one)}
    out = {name: median_ms(fn, repeats) for name, fn in ways.items()}
    a, b = tuned(acc, g8_t, one, h8_t, one), acc + L.fp8_mm(g8_t, one, h8_t.t(), one, torch.float32)
    out["max_autotune_rel_diff"] = float((a - b).abs().max() / b.abs().max())
    return out


def layer(h, w, labels, fp8: bool, repeats: int) -> tuple[float, dict]:
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        hh.grad = ww.grad = None
        L.linear_cross_entropy(hh, ww, labels, fp8=fp8).backward()
    ms = median_ms(step, repeats)
    step()
    with torch.no_grad():
        value = float(L.linear_cross_entropy(hh, ww, labels, fp8=fp8))
    return ms, {"loss": value, "grad_h": hh.grad, "grad_w": ww.grad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--wgrad", action="store_true", help="also time the weight gradient's add (max-autotune: slow)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=g)
    logits = (4 * torch.randn(8192, args.vocab, device="cuda", generator=g)).bfloat16()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "chunk_ms": chunk_ways(logits, labels[:8192], args.repeats)}
    if args.wgrad:
        grad_only = torch.compile(L._loss_and_grad_e5m2, dynamic=False)
        g8_t = L._transposed(grad_only(logits, labels[:8192])[1])
        h8_t = L.to_fp8(torch.randn(args.dim, 8192, device="cuda", generator=g))[0]
        result["wgrad_ms"] = wgrad_ways(g8_t, h8_t, args.repeats)
        del g8_t, h8_t
    del logits
    h = torch.randn(args.tokens, args.dim, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (0.02 * torch.randn(args.vocab, args.dim, device="cuda", generator=g)).bfloat16()
    both, alone = (torch.compile(fn, dynamic=False)(w)[0].view(torch.uint8) for fn in (L._to_e4m3, _cast_only))
    result["cast_with_transpose_equals_cast_alone"] = bool(torch.equal(both, alone))
    bf16_ms, bf16 = layer(h, w, labels, False, args.repeats)
    fp8_ms, fp8 = layer(h, w, labels, True, args.repeats)
    cos = torch.nn.functional.cosine_similarity
    result["layer_ms"] = {"bf16": bf16_ms, "fp8": fp8_ms}
    result["fp8_vs_bf16"] = {"loss_rel": abs(fp8["loss"] - bf16["loss"]) / bf16["loss"],
                             **{f"cos_{k}": float(cos(fp8[k].float().flatten(), bf16[k].float().flatten(), dim=0))
                                for k in ("grad_h", "grad_w")}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
