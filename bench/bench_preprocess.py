"""Preprocessing throughput: tokens/s per core, gzip + JSON + tokenize + write included.

Builds a synthetic C4-like `json.gz` of real English text (the default corpus' documents cut into
C4-sized pieces at paragraph breaks, repeated to the requested size), then runs `preprocess` with
each worker count and checks that all outputs are identical.

    python bench/bench_preprocess.py --mb 64 --workers 1 2
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from llamatron.data.corpus import write_default_corpus
from llamatron.data.preprocess import preprocess
from llamatron.tokenizer import load_tokenizer

C4_MEAN_CHARS = 2200  # C4 en averages ~2.2k characters per document


def c4_like_pieces(corpus_dir: Path) -> list[str]:
    paths = write_default_corpus(corpus_dir)
    pieces = []
    for p in paths["train"] + paths["valid"]:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                buf = []
                size = 0
                for para in text.split("\n\n"):
                    buf.append(para)
                    size += len(para) + 2
                    if size >= C4_MEAN_CHARS:
                        pieces.append("\n\n".join(buf))
                        buf, size = [], 0
                if buf:
                    pieces.append("\n\n".join(buf))
    return pieces


def build_input(path: Path, pieces: list[str], target_bytes: int) -> tuple[int, int]:
    """Write JSON lines of C4's shape until target_bytes uncompressed. Returns (documents, bytes)."""
    n = written = 0
    with gzip.open(path, "wb", compresslevel=6) as f:
        while written < target_bytes:
            for text in pieces:
                line = json.dumps(
                    {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/doc/{n}"}
                ).encode() + b"\n"
                f.write(line)
                written += len(line)
                n += 1
                if written >= target_bytes:
                    break
    return n, written


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64, help="uncompressed size of the synthetic input, MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        pieces = c4_like_pieces(tmp / "corpus")
        src = tmp / "c4-bench.json.gz"
        docs, raw = build_input(src, pieces, int(args.mb * 1e6))
        print(f"input: {docs} documents, {raw / 1e6:.1f} MB JSON, {src.stat().st_size / 1e6:.1f} MB gzip "
              f"(built in {time.perf_counter() - t:.1f}s)")
        load_tokenizer("llama3")  # load once so the first run does not pay for it
        print(f"load average before: {os.getloadavg()[0]:.2f} (other processes compete for the {os.cpu_count()} CPUs when > 0)")
        for w in args.workers:
            cpu0 = _cpu_seconds()
            r = preprocess([str(src)], str(tmp / f"out_w{w}"), "llama3", workers=w, progress=False)
            # CPU seconds of this process and its reaped workers (gzip, JSON, tokenizing, IPC, writing):
            # tokens per CPU-second is the per-core rate, and it does not depend on other load.
            cpu = _cpu_seconds() - cpu0
            print(
                f"workers={w}: {r['tokens']:,} tokens in {r['seconds']:.2f}s wall = {r['tokens_per_s'] / 1e6:.2f}M tokens/s, "
                f"{raw / r['seconds'] / 1e6:.1f} MB/s JSON; {cpu:.2f} CPU-s = {r['tokens'] / cpu / 1e6:.2f}M tokens per CPU-second"
            )
        first = tmp / f"out_w{args.workers[0]}_text_document"
        for w in args.workers[1:]:
            other = tmp / f"out_w{w}_text_document"
            for ext in (".bin", ".idx"):
                assert filecmp.cmp(f"{first}{ext}", f"{other}{ext}", shallow=False), f"workers={w} output differs"
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"peak RSS: main process {own.ru_maxrss / 1024:.0f} MB, largest worker {children.ru_maxrss / 1024:.0f} MB")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print("outputs identical across worker counts")


if __name__ == "__main__":
    main()
