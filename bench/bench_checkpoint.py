"""Checkpoint stall benchmark: synchronous vs asynchronous saves (checkpoint.async_save) of a model
and its AdamW state in the middle of training, as the trainer makes them (`Checkpointer`).

    python bench/bench_checkpoint.py                    # GPU: 2 layers of the Llama 3.1 8B shape (~1.9B parameters)
    python bench/bench_checkpoint.py --size debug --layers 0 --seq-len 64 --device cpu --out-dir /tmp/ck  # smoke test

For each mode and each of --saves saves: the time inside the save call (training blocked), the
time until the checkpoint is complete (save_s), and the extra time of the training steps that ran
while the background write was going on (against the median step before the save: the writer
thread competes for CPU, memory bandwidth and the GIL). stall_s = the save call + that extra time.
Before the first asynchronous save, as in a run, the poll after a step starts allocating the (pinned)
host buffers every save reuses in a background thread; steps run until it has finished (at most
--max-steps-during), and the line `prealloc: ...` (and `prealloc` in the first save's SUMMARY) says
after which step it started, during which it ended, its time, and the steps' extra time meanwhile;
what the first save still waits for it is its `prealloc_wait_s`, part of its stall.
Each asynchronous save's call is also printed part by part (`save N: ...` and a second table): the
wait for the previous save, the NaN/inf check, begin (mkdir, barrier), the state-dict gather, the
RNG file, the async_save call and, inside it, the staging copy (stage_s) and inside that the
allocation of host buffers (alloc_s) and the wait for the background allocation (prealloc_wait_s),
and the ranks' agreement that the snapshot succeeded.
Each result is one line `SUMMARY {json}`. The checkpoints go to --out-dir (a fast local disk:
the write speed is the disk's); each is deleted once measured, so the disk needs room for one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_train_step import VARIANTS, build_dataset, build_layout  # noqa: E402
from llamatron.config import CheckpointConfig, OptimConfig  # noqa: E402
from llamatron.data.sampler import micro_batch_indices  # noqa: E402
from llamatron.models import registry  # noqa: E402
from llamatron.runtime import Precision, load_batch  # noqa: E402
from llamatron.train.checkpoint import Checkpointer  # noqa: E402
from llamatron.train.optim import build_optimizer  # noqa: E402
from llamatron.train.step import train_step  # noqa: E402


class Run:
    """The model, its optimizer and a step function that returns its wall time."""

    def __init__(self, cli, device):
        base = registry.get(cli.size).args
        self.margs = dataclasses.replace(base, n_layers=cli.layers or base.n_layers,
                                         max_seq_len=max(cli.seq_len, base.max_seq_len))
        self.opts = VARIANTS["compile+cudnn" if device.type == "cuda" else "fused-ce"] | {"compile": cli.compile}
        self.layout = build_layout(self.margs, self.opts, device)
        self.opt = build_optimizer(self.layout.model, OptimConfig(fused=device.type == "cuda"), device.type)
        self.amp = Precision(torch.bfloat16 if device.type == "cuda" else None, None)
        self.cli, self.device, self.step = cli, device, 0
        self.data = build_dataset(cli, self.margs.vocab_size, 4096)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> float:
        cli = self.cli
        batches = (load_batch(self.data, micro_batch_indices(self.step % 256, m, cli.micro_batch, cli.micro_batch),
                              self.device) for m in range(1))
        self.sync()
        t0 = time.perf_counter()
        train_step(self.layout, self.opt, batches, 1, lr=1e-4, device=self.device, precision=self.amp,
                   fused_cross_entropy=self.opts["fused_ce"], grad_clip=1.0, attention=self.opts["attention"])
        self.sync()
        self.step += 1
        return time.perf_counter() - t0

    def state_bytes(self) -> int:
        tensors = list(self.layout.model.parameters()) + [t for s in self.opt.state.values() for t in s.values()
                                                          if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def preallocate(run: Run, ck: Checkpointer, cli) -> dict | None:
    """The background allocation of the staging buffers, as in a run: started by the poll after a
    step, steps running meanwhile until it has finished (at most --max-steps-during)."""
    before = statistics.median(run.train_step() for _ in range(cli.steps_between))
    ck.poll()
    stager, started_after, during = ck._stager, run.step, []
    if stager is None:
        return None
    while not stager.preallocated() and len(during) < cli.max_steps_during:
        during.append(run.train_step())
    record = stager.prealloc
    done = record["s"] is not None
    result = {"started_after_step": started_after, "finished": done,
              "prealloc_s": record["s"], "gb": record["bytes"] / 1e9, "buffers": record["buffers"],
              "steps_during": len(during), "step_s": before, "extra_step_s": sum(max(t - before, 0.0) for t in during),
              "error": repr(record["error"]) if record["error"] is not None else None}
    ended = (f"not finished after {len(during)} steps (the first save waits for the rest)" if not done else
             f"in {record['s']:.2f} s, ended during step {run.step}" if during else
             f"in {record['s']:.2f} s, ended before step {run.step + 1} began")
    print(f"prealloc: {result['gb']:.2f} GB of host buffers ({record['buffers']}) allocated in the background, started "
          f"after step {started_after}, {ended}; {len(during)} step(s) ran meanwhile, {result['extra_step_s']:.2f} s "
          f"slower in all than the median step of {before:.3f} s" + (f"; failed: {result['error']}" if result["error"]
                                                                      else ""), flush=True)
    return result


def measure(run: Run, asynchronous: bool, cli, out_dir: Path, pinned: bool = True) -> list[dict]:
    rows = []
    ck = Checkpointer(CheckpointConfig(enabled=True, keep=1, async_save=asynchronous), out_dir, log=lambda *_: None,
                      report=lambda kind, step, values: rows.append(values), device_type=run.device.type)
    ck.pinned = ck.pinned and pinned  # async-unpinned: staging into pageable host memory
    ck.attach([run.layout.model], [run.opt], "")
    prealloc = preallocate(run, ck, cli) if asynchronous else None
    results = []
    for i in range(cli.saves):
        before = statistics.median(run.train_step() for _ in range(cli.steps_between))
        t0 = time.perf_counter()
        ck.save(run.step, {"step": run.step, "consumed_samples": 0})
        in_call = time.perf_counter() - t0
        parts = dict(ck.pending.parts) if ck.pending is not None else {}
        after = []
        while ck.pending is not None and not ck.pending.done() and len(after) < cli.max_steps_during:
            after.append(run.train_step())
        waited = ck.wait()  # the end of the run, or the next save, would wait here
        extra = sum(max(t - before, 0.0) for t in after)
        row = rows[-1]
        results.append({
            "mode": ("async" if pinned else "async-unpinned") if asynchronous else "sync", "save": i + 1, "state_gb": run.state_bytes() / 1e9,
            "step_s": before, "save_call_s": in_call, "save_s": row["save_s"], "steps_during_write": len(after),
            "first_step_after_s": after[0] if after else None, "extra_step_s": extra, "wait_s": waited,
            "stall_s": in_call + extra + waited,
            "write_gb_per_s": run.state_bytes() / 1e9 / row["save_s"], "parts": parts,
            **({"prealloc": prealloc} if prealloc is not None and i == 0 else {}),
        })
        if parts:
            print(f"save {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
        print("SUMMARY " + json.dumps(results[-1]), flush=True)
        # Untimed: the checkpoint is deleted, so the disk holds at most one (2 layers of 8B: ~23 GB).
        shutil.rmtree(row["path"], ignore_errors=True)
    ck.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def _print_parts(results: list[dict]) -> None:
    """The asynchronous saves' call, part by part (stage_s is inside async_save_s, alloc_s and
    prealloc_wait_s inside stage_s)."""
    rows = [r for r in results if r["parts"]]
    if not rows:
        return
    names = list(rows[0]["parts"])
    print("\n| mode | save | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['mode']} | {r['save']} | " + " | ".join(f"{r['parts'][n]:.3f}" for n in names) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama3.1-8b")
    p.add_argument("--layers", type=int, default=2, help="proxy: this many layers (0: the size's own)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--saves", type=int, default=2, help="saves per mode")
    p.add_argument("--steps-between", type=int, default=3, help="steps before each save (their median is the baseline)")
    p.add_argument("--max-steps-during", type=int, default=200, help="most steps to run while a background write runs")
    p.add_argument("--modes", default="sync,async", help="sync, async (pinned staging on CUDA), async-unpinned")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (as the trainer can)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None)
    p.add_argument("--out-dir", default="/tmp/llamatron-bench-checkpoint")
    p.add_argument("--json", default=None, help="write results here")
    cli = p.parse_args()
    device = torch.device(cli.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device needs an index
        torch.cuda.set_device(device)
    run = Run(cli, device)
    run.train_step()  # AdamW state exists from here
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {cli.size} x {run.margs.n_layers} "
          f"layers; {sum(p.numel() for p in run.layout.model.parameters()) / 1e9:.2f} B parameters; model + AdamW "
          f"state {run.state_bytes() / 1e9:.1f} GB; checkpoints to {cli.out_dir}", flush=True)
    results = []
    for mode in cli.modes.split(","):
        results += measure(run, mode.startswith("async"), cli, Path(cli.out_dir) / mode, pinned=mode != "async-unpinned")
    print("\n| mode | save | state GB | step s | save call s | save s (complete) | steps during write | "
          "extra step s | stall s | write GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['save']} | {r['state_gb']:.1f} | {r['step_s']:.3f} | {r['save_call_s']:.2f} | "
              f"{r['save_s']:.2f} | {r['steps_during_write']} | {r['extra_step_s']:.2f} | {r['stall_s']:.2f} | "
              f"{r['write_gb_per_s']:.2f} |")
    _print_parts(results)
    if cli.json:
        meta = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        with open(cli.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
