"""Cost of checkpoint checksums (docs/reliability.md, "Checksums"), on the CPU:

    python bench/bench_checksums.py --out-dir /tmp/llamatron-bench-checksums    # ~1.5 GB checkpoint
    python bench/bench_checksums.py --layers 1 --vocab 4096 --repeats 1         # smoke test

1. CRC32 (zlib.crc32) of a buffer in memory, one thread: GB/s.
2. A synchronous save of a Llama-shaped model and its AdamW state (`save_checkpoint`, the trainer's
   path), alternately with the checksums and with the hashing switched off: the extra seconds per GB
   of checkpoint, and the seconds spent hashing inside the save.
3. `verify_checkpoint` of that checkpoint (every file read back and hashed): seconds per GB. The
   files are in the page cache, as right after a save; from a cold cache the disk's read speed
   bounds it.

Medians over --repeats (and the best of them: on a shared machine others' load only slows a run
down). One line `SUMMARY {json}` at the end. The checkpoint goes to --out-dir and
is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from llamatron.models.llama.model import ModelArgs, Transformer
from llamatron.train import checkpoint as ckpt


def crc32_gb_per_s(size: int = 1 << 30) -> float:
    buf = os.urandom(size)
    t0 = time.perf_counter()
    zlib.crc32(buf)
    return size / 1e9 / (time.perf_counter() - t0)


def model_and_optimizer(cli):
    args = ModelArgs(dim=cli.dim, n_layers=cli.layers, n_heads=16, n_kv_heads=8, vocab_size=cli.vocab,
                     ffn_dim=int(3.5 * cli.dim), max_seq_len=256)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step: the two AdamW moments exist, as in a training checkpoint
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return model, opt


class HashTimer:
    """`file_checksums` timed (on: the real one; off: lists nothing, so nothing is hashed)."""

    def __init__(self):
        self.real, self.seconds, self.on = ckpt.file_checksums, 0.0, True

    def __call__(self, directory, names):
        if not self.on:
            return {}
        t0 = time.perf_counter()
        out = self.real(directory, names)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out-dir", default="/tmp/llamatron-bench-checksums")
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    out = Path(cli.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    model, opt = model_and_optimizer(cli)
    timer = HashTimer()
    ckpt.file_checksums = timer

    crcs = [crc32_gb_per_s() for _ in range(cli.repeats)]
    crc = statistics.median(crcs)
    saves: dict[bool, list[float]] = {True: [], False: []}
    hashing, verify = [], []
    step = 0
    for _ in range(cli.repeats):
        for on in (True, False):
            step += 1
            timer.on, timer.seconds = on, 0.0
            t0 = time.perf_counter()
            path = ckpt.save_checkpoint(out, step, model, opt, {"step": step}, "", keep=1)
            saves[on].append(time.perf_counter() - t0)
            if on:
                hashing.append(timer.seconds)
                size = sum(f.stat().st_size for f in path.iterdir())
                t0 = time.perf_counter()
                assert ckpt.verify_checkpoint(path) is not None
                verify.append(time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)

    gb = size / 1e9
    with_s, without_s = statistics.median(saves[True]), statistics.median(saves[False])
    result = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "checkpoint_gb": round(gb, 3), "crc32_gb_per_s": round(crc, 2), "crc32_gb_per_s_best": round(max(crcs), 2),
        "save_s_with": round(with_s, 3), "save_s_without": round(without_s, 3),
        "extra_s_per_gb": round((with_s - without_s) / gb, 3),
        "hashing_s_per_gb_in_save": round(statistics.median(hashing) / gb, 3),
        "hashing_s_per_gb_in_save_best": round(min(hashing) / gb, 3),
        "verify_s_per_gb": round(statistics.median(verify) / gb, 3),
        "verify_s_per_gb_best": round(min(verify) / gb, 3),
        "load_average": round(os.getloadavg()[0], 1),
        "save_s_all": {"with": [round(x, 3) for x in saves[True]], "without": [round(x, 3) for x in saves[False]]},
    }
    print(f"checkpoint {gb:.2f} GB: crc32 {crc:.2f} GB/s; sync save {with_s:.2f} s with checksums, "
          f"{without_s:.2f} s without ({result['extra_s_per_gb']:+.3f} s/GB; hashing inside the save "
          f"{result['hashing_s_per_gb_in_save']:.3f} s/GB); verify {result['verify_s_per_gb']:.3f} s/GB")
    print("SUMMARY " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
