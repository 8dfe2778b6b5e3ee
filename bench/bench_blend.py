"""BlendedDataset index build: `build_blending_indices` against megatron-core's C++ helper (when
installed, checking the outputs are equal) and the exact Python loop (`_blend_loop`, which built
blends of 3+ datasets before; timed on a prefix and checked against ours there).

    python bench/bench_blend.py --weights 20,30,50 --num-samples 100000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

from llamatron.data import gpt_dataset as G


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def megatron_helper():
    try:
        import warnings

        warnings.filterwarnings("ignore")
        from megatron.core.datasets import helpers
    except ImportError:
        return None

    def build(w, size):
        di, dsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers.build_blending_indices(di, dsi, np.asarray(w, np.float64), len(w), size, False)
        return di, dsi

    return build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="20,30,50", help="comma-separated; normalised as the builder does")
    p.add_argument("--num-samples", type=int, default=100_000_000)
    p.add_argument("--loop-samples", type=int, default=2_000_000, help="prefix the Python loop is timed on")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    w = G.normalize_weights(G.normalize_weights([float(v) for v in args.weights.split(",")]))
    ours, t_ours = timed(G.build_blending_indices, w, args.num_samples)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "numpy": np.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "weights": w,
        "num_samples": args.num_samples,
        "ours": t_ours,
    }
    n = min(args.loop_samples, args.num_samples)
    loop, t_loop = timed(G._blend_loop, w, n)
    result["python_loop"] = {**t_loop, "samples": n, "us_per_sample": t_loop["cpu_s"] / max(n, 1) * 1e6}
    result["python_loop"]["equal_on_prefix"] = bool(
        np.array_equal(loop[0], ours[0][:n]) and np.array_equal(loop[1], ours[1][:n])
    )
    build = megatron_helper()
    if build is not None:
        ref, t_ref = timed(build, w, args.num_samples)
        equal = np.array_equal(ref[0], ours[0]) and np.array_equal(ref[1], ours[1])
        result["megatron_cpp"] = {**t_ref, "equal": bool(equal)}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
