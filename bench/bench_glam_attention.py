"""GLaM's relative-bias attention on one GPU: the ways to train the T5 bias, checked against each
other and timed (forward + backward of one block's attention).

    python bench/bench_glam_attention.py                      # GLaM 126M: batch 8, 12 x 64 heads, seq 2048
    python bench/bench_glam_attention.py --heads 64 --head-dim 128 --batch 1   # GLaM 64B's heads

- sdpa:       the [heads, S, S] bias looked up and passed to SDPA as a float mask (the reference);
- flex+band:  what the model runs on CUDA (llamatron/models/glam/attention.py): flex_attention with
              the bias in a score_mod, the table's gradient from the band of near distances;
- flex+atomics: flex_attention differentiating the captured bias itself (its backward scatters
              every score's gradient into the table with atomic adds);
- split:      split_attention.py: the flash kernel beyond the band (no bias there, after a shift),
              the memory-efficient kernel with the bias over the band's windows, merged by their
              log-sum-exp;
- split_cudnn: the same with cuDNN's fused causal kernel beyond the band;
- split_triton: cuDNN's beyond the band, band_kernel.py's Triton kernels within it (the bias looked up
              in the kernel, the two parts merged there);
- flex+band, split, split_cudnn, split_triton, compiled: compiled whole, as inside a compiled block;
- timed only, each checked against fp32 sdpa: flex+band with other tiles (flex's kernel options), and
  as max-autotune picks;
- timed only: flex+band with the band's products in fp32 on the CUDA cores (before 2026-12-05; now
  bf16 operands on the tensor cores with fp32 accumulation), and causal SDPA and flex without any
  bias: the floors (cuDNN's or flash's kernel) against which the biased ways' cost is judged.
Differences are the largest absolute ones against sdpa in fp32 (the same inputs), then bf16 timings;
`--profile WAY` then lists that way's kernels by time.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

from llamatron.models.glam import attention as A
from llamatron.models.glam.model import relative_position_bucket
from llamatron.models.glam.split_attention import split_attention


def sdpa(q, k, v, table, buckets, band, mask):
    return A.sdpa_attention(q, k, v, table, buckets)


def flex_band(q, k, v, table, buckets, band, mask):
    return A.flex_attention_biased(q, k, v, table, buckets[:, 0], band, mask)


def _flex_atomics(q, k, v, bias, mask):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, torch.clamp(q_idx - kv_idx, min=0)]

    # The model's tiles: the Hopper default for head dim 64 overflows shared memory with a bias score_mod.
    options = A._HEAD_DIM_64_TILES if q.shape[-1] <= 64 else None
    return A.fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options)


_atomics = torch.compile(_flex_atomics, dynamic=False)


def flex_atomics(q, k, v, table, buckets, band, mask):
    return _atomics(q, k, v, table[buckets[: q.shape[2], 0]].t(), mask)


def causal(q, k, v, table, buckets, band, mask):
    """No bias at all: SDPA's causal kernel (its own choice), the floor any biased way is measured against."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) + 0 * table.sum()


# As in a compiled block, where inductor fuses the band's element-wise work (flex itself is compiled
# either way).
_flex_band_compiled = torch.compile(flex_band, dynamic=False)


def flex_causal(q, k, v, table, buckets, band, mask):
    """flex with the causal block mask and no score_mod: the floor of flex's own kernels."""
    return _flex_causal(q, k, v, mask) + 0 * table.sum()


_flex_causal = torch.compile(lambda q, k, v, mask: A.fa.flex_attention(q, k, v, block_mask=mask), dynamic=False)


def tuned(options: dict | None, mode: str | None = None):
    """flex+band with flex's kernel `options` (fwd_ and bwd_ prefixed, as flex reads them; None: the
    model's), or `mode` (max-autotune tries flex's configs)."""
    flex = torch.compile(functools.partial(A._flex_with_lse, options=options), dynamic=False, mode=mode)

    def fn(q, k, v, table, buckets, band, mask):
        return A.flex_attention_biased(q, k, v, table, buckets[:, 0], band, mask, flex=flex)
    return fn


_FWD_128 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8}
_FWD_64 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 8}
_BWD_64 = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
           "bwd_num_stages": 3, "bwd_num_warps": 4}
_BWD_32 = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
           "bwd_num_stages": 3, "bwd_num_warps": 4}
# Flex's tiles, each a candidate for the model's default (timed only; the bf16
# comparison above checks the model's).
TUNINGS = {
    "fwd 128x128 s2 w8": ({**A._HEAD_DIM_64_TILES, **_FWD_128},),
    "fwd 128x64 w8": (_FWD_64,),
    "bwd 64/64": ({**A._HEAD_DIM_64_TILES, **_BWD_64},),
    "bwd 32/128": ({**A._HEAD_DIM_64_TILES, **_BWD_32},),
    "TMA": ({**A._HEAD_DIM_64_TILES, "USE_TMA": True},),
    "max-autotune": (None, "max-autotune-no-cudagraphs"),
}

def split(q, k, v, table, buckets, band, mask):
    return split_attention(q, k, v, table, buckets[:, 0], band)


def split_cudnn(q, k, v, table, buckets, band, mask):
    return split_attention(q, k, v, table, buckets[:, 0], band, far="cudnn")


def split_triton(q, k, v, table, buckets, band, mask):
    return split_attention(q, k, v, table, buckets[:, 0], band, far="cudnn", near="triton")


def cudnn_causal(q, k, v, table, buckets, band, mask):
    """`causal` in cuDNN's kernel (SDPA picks flash's for these shapes): split_cudnn's floor."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        return causal(q, k, v, table, buckets, band, mask)


# --quick: what decides the model's kernel.
QUICK = {"flex+band, compiled", "split", "split, compiled", "split_cudnn, compiled", "split_triton, compiled", "causal, no bias",
         "cudnn causal, no bias"}
WAYS = {"sdpa": sdpa, "flex+band": flex_band, "flex+atomics": flex_atomics, "split": split,
        "split_cudnn": split_cudnn, "split_triton": split_triton}
COMPILED = {"flex+band, compiled": _flex_band_compiled, "split, compiled": torch.compile(split, dynamic=False),
            "split_cudnn, compiled": torch.compile(split_cudnn, dynamic=False),
            "split_triton, compiled": torch.compile(split_triton, dynamic=False)}
FLOOR = {"causal, no bias": causal, "cudnn causal, no bias": cudnn_causal, "flex causal, no bias": flex_causal}  # timed, not compared: it computes something else
# Timed too: flex+band with the band's products on the CUDA cores (fp32 operands), as before 2026-12-05.
BAND_FP32 = "flex+band, fp32 band"


def inputs(args, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # q, k, v as the model lays them out: [B, S, H, D] in memory, seen as [B, H, S, D]
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    qkv = [torch.randn(shape, device="cuda", dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()
           for _ in range(3)]
    table = torch.randn(args.buckets, args.heads, device="cuda", generator=gen).requires_grad_()
    grad = torch.randn(shape, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    return qkv, table, grad


def run(fn, qkv, table, grad, buckets, band, mask):
    for t in (*qkv, table):
        t.grad = None
    out = fn(*qkv, table, buckets, band, mask)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in (*qkv, table)]


def time_ms(fn, qkv, table, grad, buckets, band, mask, iters: int) -> float:
    for _ in range(3):
        run(fn, qkv, table, grad, buckets, band, mask)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(fn, qkv, table, grad, buckets, band, mask)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile(fn, qkv, table, grad, buckets, band, mask, top: int = 12) -> None:
    """One forward + backward under torch.profiler: the kernels by CUDA time (where a way's time goes)."""
    run(fn, qkv, table, grad, buckets, band, mask)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(fn, qkv, table, grad, buckets, band, mask)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 1e3
    print(f"profile of one call: {total:.2f} ms of kernels")
    for e in events[:top]:
        print(f"  {e.device_time_total / 1e3:7.3f} ms  x{e.count:<3d} {e.key[:110]}")


def tile_options(args, qkv, table, grad, buckets, band, mask) -> None:
    """split_triton compiled with other tiles and launch options of band_kernel.py's kernels."""
    from llamatron.models.glam import band_kernel

    default = dict(band_kernel.TILES)
    for blk, warps, stages in ((64, 4, 2), (64, 8, 3), (64, 4, 4), (32, 4, 3), (128, 8, 3), (128, 4, 2)):
        band_kernel.TILES.update(BLK=blk, num_warps=warps, num_stages=stages)
        try:
            ms = time_ms(COMPILED["split_triton, compiled"], qkv, table, grad, buckets, band, mask, args.iters)
            print(f"bf16 split_triton, tiles {blk} warps {warps} stages {stages} forward + backward {ms:7.2f} ms")
        except Exception as e:  # noqa: BLE001 - a tile that does not fit the shared memory
            print(f"bf16 split_triton, tiles {blk} warps {warps} stages {stages}: failed: {type(e).__name__}: {str(e)[:200]}")
    band_kernel.TILES.update(default)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--buckets", type=int, default=32)
    p.add_argument("--max-distance", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="only the compiled ways and the causal floor (bf16; a short device call)")
    p.add_argument("--profile", default=None, metavar="WAY",
                   help="then profile this way's kernels (e.g. 'split, compiled')")
    args = p.parse_args()
    keep = (lambda name: name in QUICK) if args.quick else (lambda name: True)
    pos = torch.arange(args.seq_len, device="cuda")
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], args.buckets, args.max_distance)
    band = A.band_width(buckets[:, 0], args.buckets)
    mask = A.causal_block_mask(args.seq_len, torch.device("cuda"))
    print(f"torch {torch.__version__}; batch {args.batch}, {args.heads} x {args.head_dim} heads, seq {args.seq_len}; "
          f"band {band}")
    qkv, table, grad = inputs(args, torch.float32)
    ref = run(sdpa, qkv, table, grad, buckets, band, mask) if not args.quick else None
    for name in ("flex+band", "flex+atomics", "split") if not args.quick else ():
        try:
            got = run(WAYS[name], qkv, table, grad, buckets, band, mask)
        except Exception as e:  # noqa: BLE001 - report it and compare the others
            print(f"fp32 {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        diffs = ", ".join(f"{what} {float((a - b).abs().max()):.2e} (of {float(b.abs().max()):.2e})"
                          for what, a, b in zip(("out", "dq", "dk", "dv", "dtable"), got, ref))
        print(f"fp32 {name:13s} vs sdpa: {diffs}")
    qkv, table, grad = inputs(args, torch.bfloat16)
    ref32 = run(sdpa, [t.detach().float().requires_grad_() for t in qkv], table, grad.float(), buckets, band, mask)
    errors = {}
    for name, fn in {"flex+band": flex_band, "split": split, "split_cudnn": split_cudnn, "split_triton": split_triton,
                     **COMPILED}.items():
        if not keep(name):
            continue
        try:
            got = run(fn, qkv, table, grad, buckets, band, mask)
        except Exception as e:  # noqa: BLE001 - report it and time the others
            print(f"bf16 {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        errors[name] = [float((a.float() - b).abs().max()) for a, b in zip(got, ref32)]
        diffs = ", ".join(f"{what} {e:.2e} (of {float(b.abs().max()):.2e})"
                          for what, e, b in zip(("out", "dq", "dk", "dv", "dtable"), errors[name], ref32))
        print(f"bf16 {name:13s} vs fp32 sdpa: {diffs}")
    flex_c = errors.get("flex+band, compiled")
    for way in ("split", "split_cudnn", "split_triton"):  # the CUDA test's rule (tests/test_glam.py); pending_h200.sh reads this line
        split_c = errors.get(f"{way}, compiled")
        if split_c and flex_c:
            ok = all(a <= 3 * b + 1e-3 for a, b in zip(split_c, flex_c))
            print(f"{way} as close to fp32 as flex (each error within 3x flex's): {'yes' if ok else 'no'}")
    for name, fn in {**WAYS, **COMPILED, BAND_FP32: flex_band, **FLOOR}.items():
        if not keep(name):
            continue
        A.BAND_MATMUL = "fp32" if name == BAND_FP32 else "tensor_cores"  # read in backward: set around both
        try:
            ms = time_ms(fn, qkv, table, grad, buckets, band, mask, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"bf16 {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        print(f"bf16 {name:13s} forward + backward {ms:7.2f} ms")
    A.BAND_MATMUL = "tensor_cores"
    tile_options(args, qkv, table, grad, buckets, band, mask)
    if args.profile:
        profile({**WAYS, **COMPILED, **FLOOR}[args.profile], qkv, table, grad, buckets, band, mask)
    for name, args_ in TUNINGS.items():
        if not keep(name):
            continue
        fn = tuned(*args_)
        try:
            got = run(fn, qkv, table, grad, buckets, band, mask)
            ms = time_ms(fn, qkv, table, grad, buckets, band, mask, args.iters)
        except Exception as e:  # noqa: BLE001 - a tile that does not fit: report it, time the others
            print(f"bf16 flex+band, {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        diffs = ", ".join(f"{what} {float((a.float() - b).abs().max()):.2e}"
                          for what, a, b in zip(("out", "dq", "dk", "dv", "dtable"), got, ref32))
        print(f"bf16 flex+band, {name}: forward + backward {ms:7.2f} ms (vs fp32 sdpa: {diffs})")
    if args.quick:
        return 0
    got = run(flex_band, qkv, table, grad, buckets, band, mask)[-1]
    A.BAND_MATMUL = "fp32"
    want = run(flex_band, qkv, table, grad, buckets, band, mask)[-1]
    print(f"bf16 table gradient, tensor-core band vs fp32 band: max |diff| {float((got - want).abs().max()):.2e} "
          f"(of {float(want.abs().max()):.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
