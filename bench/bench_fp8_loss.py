"""The fused loss's FP8 output layer on the Llama 3.1 output shape (128,256 x 4,096), on one GPU, in one
process: how a chunk's softmax gradient is made in E5M2 in both layouts (the weight gradient's FP8 GEMM
reads it token-major), and the whole layer forward + backward, FP8 (both ways) against BF16.

    python bench/bench_fp8_loss.py --tokens 65536 --json OUT.json

Ways of making one chunk's E5M2 gradient, row-major and transposed, from bf16 logits [8192, 128256]:
  triton       llamatron.loss's: the loss and row-major gradient by llamatron.loss_kernels, then inductor's
               transposing copy; also with each tiling of --tiles (rows x columns per tile x columns per
               statistics slice); triton_rowmajor_only: the kernels alone; ..._arith: with the E5M2 cast
               by the CPU interpreter's arithmetic instead of the GPU's conversion
  inductor     the loss and gradient compiled (one kernel), then the same copy (the way before the kernels)
  none         the compiled loss and gradient only, row-major (inductor's floor)
Medians of CUDA-event timings after warm-up; never on zeros (random logits and hidden states).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from llamatron import loss as L
from llamatron import loss_kernels as K


_copy = torch.compile(L._copy_transposed, dynamic=False)


def _transposed(g8):
    """g8 token-major, by llamatron.loss's compiled transposing copy, as the FP8 loss makes it."""
    gt = torch.empty(g8.shape[1], g8.shape[0], dtype=g8.dtype, device=g8.device)
    _copy(gt, g8)
    return gt


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


def _triton(logits, labels, tiles=None, copy=True, hardware_casts=True):
    """loss_kernels' way with the tiling `tiles` (rows, columns, slice columns) for this call, then (copy)
    inductor's transposing copy, as llamatron.loss runs them; hardware_casts=False: the E5M2 cast by the
    interpreter's arithmetic."""
    saved = K.TILE_ROWS, K.TILE_COLS, K.SLICE_COLS, K.TUNE_GRAD, K.HARDWARE_CASTS
    K.HARDWARE_CASTS = hardware_casts
    if tiles:  # this tiling for both kernels, the gradient's not timed per shape
        K.TILE_ROWS, K.TILE_COLS, K.SLICE_COLS = tiles
        K.TUNE_GRAD = False
    try:
        loss, g8 = K.loss_and_grad_e5m2(logits, labels, L._DLOGITS_SCALE)
        return loss, g8, (_transposed(g8) if copy else None)
    finally:
        K.TILE_ROWS, K.TILE_COLS, K.SLICE_COLS, K.TUNE_GRAD, K.HARDWARE_CASTS = saved


def chunk_ways(logits, labels, repeats: int, tilings: list[tuple[int, int, int]]) -> dict:
    grad_only = torch.compile(L._loss_and_grad_e5m2, dynamic=False)
    ways = {
        "triton": lambda: _triton(logits, labels),
        "triton_rowmajor_only": lambda: _triton(logits, labels, copy=False),
        "triton_rowmajor_only_arith": lambda: _triton(logits, labels, copy=False, hardware_casts=False),
        "inductor": lambda: _transposed(grad_only(logits, labels)[1]),
        "none": lambda: grad_only(logits, labels),
    }
    ways.update({f"triton_{r}x{c}x{sl}": (lambda t=(r, c, sl): _triton(logits, labels, t)) for r, c, sl in tilings})
    out = {name: median_ms(fn, repeats) for name, fn in ways.items()}
    ref_loss, ref = grad_only(logits, labels)
    loss, g8, gt = _triton(logits, labels)
    out["hardware_cast_equals_arithmetic"] = bool(torch.equal(
        g8.view(torch.uint8), _triton(logits, labels, copy=False, hardware_casts=False)[1].view(torch.uint8)))
    out["triton_transposed_exact"] = bool(torch.equal(gt.view(torch.uint8), g8.t().contiguous().view(torch.uint8)))
    out["triton_vs_inductor_bits_equal_fraction"] = float((g8.view(torch.uint8) == ref.view(torch.uint8)).float().mean())
    out["triton_vs_inductor_max_abs_diff"] = float((g8.float() - ref.float()).abs().max())
    out["triton_vs_inductor_loss_rel"] = float((loss - ref_loss).abs() / ref_loss)
    out["grad_tile_chosen"] = {str(key): str(config) for key, config in K._grad_tuned.cache.items()}
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
    p.add_argument("--tiles", default="128x64x4096,32x256x4096",
                   help="other tilings of the Triton kernels to time, ROWSxCOLSxSLICE, comma-separated")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    tilings = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=g)
    logits = (4 * torch.randn(8192, args.vocab, device="cuda", generator=g)).bfloat16()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "chunk_ms": chunk_ways(logits, labels[:8192], args.repeats, tilings)}
    if args.wgrad:
        grad_only = torch.compile(L._loss_and_grad_e5m2, dynamic=False)
        g8_t = _transposed(grad_only(logits, labels[:8192])[1])
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
    result["layer_ms"] = {"bf16": bf16_ms, "fp8": fp8_ms}
    L.FP8_LOSS_KERNELS = "inductor"
    result["layer_ms"]["fp8_inductor"], fp8_inductor = layer(h, w, labels, True, args.repeats)
    L.FP8_LOSS_KERNELS = "triton"
    cos = torch.nn.functional.cosine_similarity
    for name, other in (("fp8_vs_bf16", bf16), ("fp8_vs_fp8_inductor", fp8_inductor)):
        result[name] = {"loss_rel": abs(fp8["loss"] - other["loss"]) / other["loss"],
                        **{f"cos_{k}": float(cos(fp8[k].float().flatten(), other[k].float().flatten(), dim=0))
                           for k in ("grad_h", "grad_w")}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
