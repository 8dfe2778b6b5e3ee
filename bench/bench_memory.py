"""Where a training step's memory goes on one GPU: the peak of each phase and what each block saves.

For each variant (bench_train_step.py's names, NAME@micro=N@gqa=MODE), one process builds the model as
the trainer does, runs two optimizer steps of `--global-batch / micro` micro-batches (the first
compiles), and in the second records, per micro-batch, the allocated bytes before the forward, the peak
during forward + loss, what stays after it (the saved tensors), the peak during backward, and the peak
of the optimizer step (`torch.cuda.max_memory_allocated`, reset between phases). The last forward also
runs under `saved_tensors_hooks`, counting every storage autograd keeps (parameters excluded) by the
block that saved it, or "outside" (final norm, loss). `llamatron/parallel/memory.py` is checked against
these (docs/planner.md, "Against measured runs").

    python bench/bench_memory.py --layers 4 --seq-len 8192 --global-batch 8 \
        --variants compile+cudnn@micro=4,compile+fp8-all@micro=4 --out mem.jsonl
    python bench/bench_memory.py --size debug --layers 2 --seq-len 128 --global-batch 4 --micro-batch 2 \
        --variants compile --device cpu      # smoke test (the CPU runs fp32)

One JSON line per variant goes to --out as soon as it is measured (a later out-of-memory keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_train_step import build_layout, parse_variant  # noqa: E402
from llamatron.config import OptimConfig  # noqa: E402
from llamatron.data.gpt_dataset import MockDataset  # noqa: E402
from llamatron.data.sampler import micro_batch_indices  # noqa: E402
from llamatron.models import registry  # noqa: E402
from llamatron.models.attention_ops import native_gqa, set_gqa_mode  # noqa: E402
from llamatron.parallel.reduce import clip_grad_norm_  # noqa: E402
from llamatron.runtime import Precision, attention_backend, load_batch  # noqa: E402
from llamatron.train.optim import build_optimizer  # noqa: E402

GiB = 2**30


class _Region(nn.Module):
    """Runs a block, naming it as the one whose saved tensors the pack hook now sees."""

    def __init__(self, block: nn.Module, name: str, state: dict):
        super().__init__()
        self.block, self.name, self.state = block, name, state

    def forward(self, *args, **kwargs):
        self.state["region"] = self.name
        try:
            return self.block(*args, **kwargs)
        finally:
            self.state["region"] = "outside"


class SavedCount:
    """Storages autograd saves while active, once each, by region; parameters are not counted."""

    def __init__(self, model: nn.Module):
        self.state = {"region": "outside"}
        for name, block in list(model.layers.items()):
            model.layers[name] = _Region(block, name, self.state)
        self.model = model
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int, tuple, str]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen[key] = (self.state["region"], storage.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def summary(self) -> dict:
        regions: dict[str, int] = {}
        for region, nbytes, _, _ in self.seen.values():
            regions[region] = regions.get(region, 0) + nbytes
        biggest = sorted(self.seen.values(), key=lambda v: -v[1])
        detail = {r: [[n, list(s), dt] for reg, n, s, dt in biggest if reg == r][:40] for r in ("0", "outside")}
        return {"bytes_by_region": regions, "largest": detail}


def _now(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure(name: str, opts: dict, margs, cli, device) -> dict:
    set_gqa_mode(opts.get("gqa", "auto"))
    layout = build_layout(margs, opts, device)
    opt = build_optimizer(layout.model, OptimConfig(fused=opts["fused_adam"]), device.type)
    amp = Precision(torch.bfloat16 if device.type == "cuda" else None, None)
    accum = cli.global_batch // cli.micro_batch
    data = MockDataset(margs.vocab_size, cli.seq_len, 4 * cli.global_batch, seed=1234)
    counter = SavedCount(layout.model)
    phases = []
    for step in range(2):
        record = step == 1
        _reset(device)
        for m in range(accum):
            tokens, labels = load_batch(data, micro_batch_indices(step, m, cli.global_batch, cli.micro_batch), device)
            _reset(device)
            before = _now(device)
            count = counter.hooks() if record and m == accum - 1 else contextlib.nullcontext()
            with attention_backend(opts["attention"]), amp.autocast(device), count:
                loss = layout.loss(tokens, labels, opts["fused_ce"]) / accum
            fwd_peak, after_fwd = _peak(device), _now(device)
            _reset(device)
            with attention_backend(opts["attention"]):
                loss.backward()
            bwd_peak = _peak(device)
            del loss
            if record:
                phases.append({"micro": m, "before": before, "forward_peak": fwd_peak, "after_forward": after_fwd,
                               "backward_peak": bwd_peak, "after_backward": _now(device)})
        _reset(device)
        clip_grad_norm_(layout.parameters(), 1.0, layout.dims, duplicates=layout.tied_copies())
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_peak = _peak(device)
    row = {"variant": name, **{k: v for k, v in opts.items()}, "model": cli.size, "layers": margs.n_layers,
           "seq_len": cli.seq_len, "micro_batch": cli.micro_batch, "global_batch": cli.global_batch,
           "native_gqa": native_gqa(device), "params": sum(p.numel() for p in layout.model.parameters()),
           "phases": phases, "optimizer_peak": opt_peak, "after_step": _now(device), "saved": counter.summary()}
    del layout, opt, counter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _report(row: dict) -> str:
    peak = max(max(p["forward_peak"], p["backward_peak"]) for p in row["phases"])
    peak = max(peak, row["optimizer_peak"])
    last = row["phases"][-1]
    regions = row["saved"]["bytes_by_region"]
    blocks = [v for k, v in regions.items() if k != "outside"]
    tokens = row["micro_batch"] * row["seq_len"]
    return (f"{row['variant']:28s} peak {peak / GiB:6.2f} GiB (forward {last['forward_peak'] / GiB:6.2f}, backward "
            f"{last['backward_peak'] / GiB:6.2f}, optimizer {row['optimizer_peak'] / GiB:6.2f}); before forward "
            f"{last['before'] / GiB:6.2f}; saved per block {sum(blocks) / max(1, len(blocks)) / tokens:,.0f} B/token, "
            f"outside {regions.get('outside', 0) / tokens:,.0f} B/token")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", "--model", dest="size", default="llama3.1-8b")
    p.add_argument("--layers", type=int, default=4, help="proxy: this many layers (0: the size's own)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--variants", default="compile+cudnn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append one JSON line per variant here")
    cli = p.parse_args()
    device = torch.device(cli.device)
    base = registry.get(cli.size).args
    margs = dataclasses.replace(base, n_layers=cli.layers or base.n_layers,
                                max_seq_len=max(cli.seq_len, base.max_seq_len))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {cli.size} x {margs.n_layers} layers; seq {cli.seq_len}",
          flush=True)
    for vname, opts, over in map(parse_variant, cli.variants.split(",")):
        run = argparse.Namespace(**{**vars(cli), **over})
        t0 = time.perf_counter()
        try:
            row = measure(vname, opts, margs, run, device)
        except torch.OutOfMemoryError:
            print(f"{vname}: out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        row.update(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                   seconds=time.perf_counter() - t0)
        print(_report(row), flush=True)
        if cli.out:
            with open(cli.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
