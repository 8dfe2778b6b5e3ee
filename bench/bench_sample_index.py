"""GPTDataset index build and cache-hit load at C4 scale.

Writes a synthetic `.idx` of N documents with C4 en_6-like lengths (lognormal, mean ~500 tokens,
sigma 1.0) next to a sparse `.bin` of the matching size (no token data is read), then times
`GPTDataset(...)` cold (document index, sample index, shuffle index, cache write), a cache-hit load
in a fresh process, random item lookups, and (if megatron-core is installed) Megatron's C++
`build_sample_idx` on the same document index, checking it equals ours.

    python bench/bench_sample_index.py --docs 8000000 --num-samples 100000000 --seq-len 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from llamatron.data import gpt_dataset as G
from llamatron.data.indexed import MAGIC, IndexedDataset


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def write_synthetic(prefix: str, docs: int, mean_len: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = np.log(mean_len) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2/2)
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, docs)), 1, 2**31 - 1).astype(np.int32)
    itemsize = 2  # uint16, as the 405B (Mixtral) files
    pointers = np.zeros(docs, np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", 1, 8, docs, docs + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(docs + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * itemsize)  # sparse: sizes check out, no disk used
    return lengths


def timed(fn, store: dict, key: str):
    depth = [0]  # build_document_index recurses when the final epoch is separate: time the outer call

    def wrapper(*a, **k):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                store[key] = store.get(key, 0.0) + time.perf_counter() - t

    return wrapper


def cold_build(args, prefix: str, cache: str) -> dict:
    phases: dict[str, float] = {}
    # Time the phases inside the real constructor by wrapping the module functions it calls.
    for name in ("build_document_index", "build_sample_index", "build_shuffle_index", "_write_cache"):
        setattr(G, name, timed(getattr(G, name), phases, name))
    t = time.perf_counter()
    ds = G.GPTDataset(IndexedDataset(prefix), args.seq_len, args.num_samples, args.seed, cache_dir=cache)
    total = time.perf_counter() - t
    return {
        "tokens_per_epoch": ds.tokens_per_epoch,
        "epochs": ds.num_epochs,
        "separate_final_epoch": bool(ds.separate_final_epoch),
        "document_index_len": int(len(ds.document_index)),
        "samples": len(ds),
        "sample_index_dtype": str(ds.sample_index.dtype),
        "shuffle_index_dtype": str(ds.shuffle_index.dtype),
        "cache_bytes": sum(os.path.getsize(p) for p in ds.cache_paths.values()),
        "seconds": {"total": total, **phases},
        "peak_rss_gb": rss_peak_gb(),
    }


def proc_rss_gb() -> dict:
    """Resident memory now, split into anonymous (heap) and file-backed (mapped page cache) parts."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 2**20
    return out


def warm_load(args, prefix: str, cache: str) -> dict:
    """Runs in a fresh process so its memory is the cache-hit cost alone."""
    t = time.perf_counter()
    ds = G.GPTDataset(IndexedDataset(prefix), args.seq_len, args.num_samples, args.seed, cache_dir=cache)
    load = time.perf_counter() - t
    assert ds.cache_hit
    out = {"load_seconds": load, "rss_after_load_gb": proc_rss_gb()}
    picks = np.random.default_rng(0).integers(0, len(ds), 10_000)
    for key in ("item_us_cold_pages", "item_us_hot_pages"):  # first pass faults pages in; second is CPU
        t = time.perf_counter()
        for i in picks:
            ds[int(i)]
        out[key] = (time.perf_counter() - t) / len(picks) * 1e6
    # File-backed RSS here is mmap readahead of the index/.bin pages touched: clean, reclaimable.
    out["rss_after_10k_items_gb"] = proc_rss_gb()
    try:
        import warnings

        warnings.filterwarnings("ignore")
        from megatron.core.datasets import helpers
    except ImportError:
        return out
    sizes = ds.indexed.sequence_lengths.copy()  # megatron copies it too when the index is dense
    doc = np.ascontiguousarray(ds.document_index)
    t = time.perf_counter()
    ref = helpers.build_sample_idx(sizes, doc, args.seq_len, ds.num_epochs, ds.tokens_per_epoch, True, True)
    out["megatron_cpp_sample_index_seconds"] = time.perf_counter() - t
    out["megatron_cpp_sample_index_equal"] = bool(ref.dtype == ds.sample_index.dtype and np.array_equal(ref, ds.sample_index))
    out["rss_after_megatron_gb"] = proc_rss_gb()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=8_000_000)
    p.add_argument("--mean-len", type=float, default=500.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=100_000_000)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workdir", default=None, help="where the .idx, sparse .bin and cache go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)  # the fresh-process half
    args = p.parse_args()

    if args.warm_only:
        print(json.dumps(warm_load(args, os.path.join(args.workdir, "synth"), os.path.join(args.workdir, "cache"))))
        return

    work = args.workdir or tempfile.mkdtemp(prefix="bench_sample_index.")
    os.makedirs(work, exist_ok=True)
    prefix, cache = os.path.join(work, "synth"), os.path.join(work, "cache")
    try:
        t = time.perf_counter()
        lengths = write_synthetic(prefix, args.docs, args.mean_len, args.sigma, args.seed)
        setup = time.perf_counter() - t
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "numpy": np.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "docs": args.docs,
            "mean_doc_tokens": float(lengths.mean()),
            "setup_seconds": setup,
        }
        result["cold"] = cold_build(args, prefix, cache)
        cmd = [sys.executable, os.path.abspath(__file__), "--warm-only", "--workdir", work,
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
        warm = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result["warm"] = json.loads(warm.stdout.strip().splitlines()[-1])
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
