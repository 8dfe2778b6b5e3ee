"""Fine-tuning benchmark on one device: LoRA and full SFT steps of the trainer's own pieces, every
variant in one process.

What runs is what `llamatron train` runs for a `[finetune]` config: the model built on the meta device
and transformed by `parallelize` (LoRA adapters, activation checkpointing, per-block compile, in the
trainer's order), LoRA's frozen linears stored as `lora.base_dtype` says (`frozen_dtype`), the
trainer's AdamW, and `train_step` with the global trained-token normalisation, the fused
cross-entropy with its ignore index and the attention the model picks for packed batches
(flex_attention's document BlockMask on CUDA, a dense SDPA mask on the CPU). The batches come from
the SFT data path itself (`SFTDataset` over a real token + mask cache, packed as `--packing` says, positions
restarting per example, document ids, `load_sft_batch`), written from synthetic examples: lengths
uniform in [--min-len, --max-len] tokens, the first --prompt-frac of each (uniform in the range)
masked as prompt. Only the initial values differ from a run: parameters are filled on the device
(normal, std 0.02; LoRA's B zero as in a run) instead of the CPU-seeded values `materialize` draws,
which cost seconds per variant at 8B and do not change the speed.

    python bench/bench_finetune.py                                     # Llama 3.1 8B, seq 4096, the default list
    python bench/bench_finetune.py --variants lora+compile@micro=2,sft+compile+ac@micro=1
    python bench/bench_finetune.py --model debug --seq-len 256 --min-len 16 --max-len 120 --device cpu \\
        --steps 2 --warmup 1 --global-batch 2                          # smoke test (any CPU)

Variants: lora, sft, each with +compile and/or +ac (activation checkpointing of every block) and/or
+fp8 (train.fp8 = tensorwise: LoRA's frozen base layers from FP8 copies, transforms/fp8_frozen.py;
SFT's linears as torchao's Float8Linear) and/or +adam8bit (optim.name = adamw8bit: torchao's AdamW8bit,
8-bit moments), and
`@micro=N` (micro batch), `@base=fp32|bf16|auto` (LoRA's frozen weights: lora.base_dtype). Each
prints one line `SUMMARY {json}`: median step time, tokens/s over all positions, over non-padding
positions and over trained (label) positions, peak memory, and MFU against the dense BF16 peak by
`llamatron/flops.py` (LoRA: the LoRA formula; SFT: the family's 6N formula), also with the attention
term over each token's own document (`mfu_doc_attention`, what the document mask computes). A
variant that runs out of memory or fails prints that, and the next one runs. --budget-s skips the
variants that would end after that many seconds (by a per-variant allowance, ALLOWANCE_S).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench_train_step's profile helpers
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llamatron import flops  # noqa: E402
from llamatron.config import LoraConfig, OptimConfig, TrainConfig  # noqa: E402
from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype  # noqa: E402
from llamatron.data.sampler import micro_batch_indices  # noqa: E402
from llamatron.data.sft import SFTCache, SFTDataset, load_sft_batch  # noqa: E402
from llamatron.models import registry  # noqa: E402
from llamatron.parallel.dims import ParallelDims  # noqa: E402
from llamatron.parallel.layout import Layout  # noqa: E402
from llamatron.models.attention_ops import native_gqa  # noqa: E402
from llamatron.parallel.memory import estimate_memory  # noqa: E402
from llamatron.parallel.parallelize import parallelize  # noqa: E402
from llamatron.runtime import Precision  # noqa: E402
from llamatron.train.optim import build_optimizer  # noqa: E402
from llamatron.train.step import train_step  # noqa: E402
from llamatron.transforms.fp8_frozen import check_lora_fp8, quantize_frozen_linears  # noqa: E402
from llamatron.transforms.lora import cast_frozen_linears, frozen_dtype  # noqa: E402

# Seconds a variant of the 8B at seq 4096 is allowed for (build, compilation, 8 steps of 4 sequences on an
# H200; a guess, generous for compilation): --budget-s starts a variant only if it then ends in time.
ALLOWANCE_S = {"compile": 100.0, "eager": 30.0}
# Ordered by what the figures need first: under --budget-s the last ones are the ones skipped.
DEFAULT_VARIANTS = ("lora+compile@micro=2,lora+compile+fp8@micro=2,sft+compile+ac@micro=1,lora@micro=1,lora@micro=2,"
                    "lora@micro=4,"
                    "lora@micro=1@base=fp32,lora+compile@micro=4,lora+compile@micro=1,sft+compile+ac@micro=2,"
                    "sft+compile+ac+adam8bit@micro=2")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    lora: bool
    compile: bool
    ac: bool
    fp8: bool
    micro: int | None  # None: --micro-batch
    base: str  # lora.base_dtype
    optim: str = "adamw"  # optim.name: +adam8bit is torchao's AdamW8bit


def parse_variant(spec: str) -> Variant:
    """"lora+compile@micro=2@base=fp32" -> Variant; SystemExit naming the bad part otherwise."""
    name, *conds = spec.split("@")
    kind, *flags = name.split("+")
    if kind not in ("lora", "sft") or any(f not in ("compile", "ac", "fp8", "adam8bit") for f in flags):
        raise SystemExit(f"--variants: {name!r} in {spec!r}: expected lora or sft, then +compile, +ac, +fp8 "
                         "and/or +adam8bit")
    micro, base = None, "auto"
    for c in conds:
        key, _, value = c.partition("=")
        if key == "micro" and value.isdigit() and int(value) > 0:
            micro = int(value)
        elif key == "base" and value in ("auto", "fp32", "bf16") and kind == "lora":
            base = value
        else:
            raise SystemExit(f"--variants: {c!r} in {spec!r}: expected micro=N or (lora) base=auto|fp32|bf16")
    return Variant(spec, kind == "lora", "compile" in flags, "ac" in flags, "fp8" in flags, micro, base,
                   "adamw8bit" if "adam8bit" in flags else "adamw")


# --------------------------------------------------------------------------------------------------
# Data: synthetic examples through the real SFT cache, dataset and batch


def write_examples(prefix: str, n: int, vocab: int, min_len: int, max_len: int, prompt_frac: tuple[float, float],
                   seed: int) -> SFTCache:
    """n examples of uniform length in [min_len, max_len] tokens, random ids (never 0: the pad id), the
    first prompt_frac of each masked, as `build_sft_cache` writes them (tokens and a uint8 mask)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(f"{prefix}_tokens", token_dtype(vocab)) as tok, \
            IndexedDatasetWriter(f"{prefix}_mask", np.uint8) as msk:
        for _ in range(n):
            length = int(rng.integers(min_len, max_len + 1))
            prompt = int(length * rng.uniform(*prompt_frac))
            tok.add_document(rng.integers(1, vocab, length))
            msk.add_document((np.arange(length) >= max(prompt, 1)).astype(np.uint8))
    return SFTCache(IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_mask"), prefix)


def step_batches(dataset: SFTDataset, step: int, gbs: int, micro: int, device, vocab: int):
    """The micro-batches of one step as the trainer loads them, and their trained-token counts."""
    loaded = [load_sft_batch(dataset, micro_batch_indices(step, m, gbs, micro), device, vocab)
              for m in range(gbs // micro)]
    return [b for b, _ in loaded], [n for _, n in loaded]


def batch_stats(batches) -> dict:
    """Positions, non-padding positions (document id >= 0), trained labels, and the sum over
    sequences of the squared document lengths (the padding run counted as one: the mask lets it
    attend to itself), for the attention term over documents."""
    out = {"positions": 0, "non_padding": 0, "trained": 0, "doc_sq": 0}
    for tokens, labels, extras in batches:
        doc = extras["document_ids"].cpu()
        out["positions"] += tokens.numel()
        out["non_padding"] += int((doc >= 0).sum())
        out["trained"] += int((labels != -100).sum())
        for row in doc:
            out["doc_sq"] += int((torch.unique_consecutive(row, return_counts=True)[1].long() ** 2).sum())
    return out


# --------------------------------------------------------------------------------------------------
# Model and step


def build_layout(margs, v: Variant, lora: LoraConfig | None, device, amp, fp8_min_features: int = 1024) -> Layout:
    """The trainer's model for one device: `parallelize` (adapters, checkpointing, compile), then
    parameters filled on the device and LoRA's frozen linears in `frozen_dtype`."""
    family = registry.family_of(margs)
    train = TrainConfig(compile=v.compile, activation_checkpointing=v.ac, fp8="tensorwise" if v.fp8 else "none",
                        fp8_min_features=fp8_min_features)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = family.build(margs)
    (part,), _, _ = parallelize(model, family, train, ParallelDims(), None, lora)
    part.to_empty(device=device)
    with torch.no_grad():
        for name, p in part.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            elif ".lora_B." in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    part.init_buffers()
    dtype = frozen_dtype(lora, amp)
    if dtype is not None:
        cast_frozen_linears(part, dtype)
    if v.fp8 and lora is not None:  # as the trainer does once the weights are loaded
        check_lora_fp8(train, lora, dtype)
        part.fp8_frozen_layers = len(quantize_frozen_linears(part, train.fp8_min_features))
    return Layout.single(part)


def lora_config(v: Variant, cli) -> LoraConfig | None:
    if not v.lora:
        return None
    return LoraConfig(rank=cli.lora_rank, alpha=cli.lora_alpha, targets=cli.lora_targets.split(","), base_dtype=v.base)


def run_variant(v: Variant, margs, cli, device, dataset) -> dict:
    micro = v.micro or cli.micro_batch
    lora = lora_config(v, cli)
    precision = Precision.choose(cli.precision, device, fsdp=False)
    if v.compile:
        torch._dynamo.reset()  # a fresh cache per variant: no recompile limits, no dynamic shapes from the last
    layout = build_layout(margs, v, lora, device, precision.amp, cli.fp8_min_features)
    opt = build_optimizer(layout.model, OptimConfig(lr=cli.lr, min_lr=cli.lr, name=v.optim), device.type)
    n_trainable = sum(p.numel() for p in layout.parameters() if p.requires_grad)
    accum = cli.global_batch // micro
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, stats = [], [], []
    for step in range(cli.warmup + cli.steps):
        _sync(device)
        t0 = time.perf_counter()  # loading the batches included, as the trainer's step does it
        batches, counts = step_batches(dataset, step, cli.global_batch, micro, device, margs.vocab_size)
        loss, _ = train_step(layout, opt, batches, accum, lr=cli.lr, device=device, precision=precision,
                             fused_cross_entropy=True, grad_clip=1.0, attention=cli.attention, token_counts=counts)
        _sync(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if step >= cli.warmup:
            times.append(dt)
            stats.append(batch_stats(batches))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    profile = profile_step(layout, opt, dataset, cli, micro, device, precision) if cli.profile == v.label else None
    base = {p.dtype for n, p in layout.model.named_parameters() if n.endswith("wq.weight")}
    return {"micro_batch": micro, "accum": accum, "step_times_s": times, "losses": losses, "peak_mem_gib": peak,
            "trainable_params": n_trainable, "frozen_linear_dtype": str(base.pop()).removeprefix("torch.") if v.lora
            else None, "fp8_frozen_layers": getattr(layout.model, "fp8_frozen_layers", 0),
            **{k: sum(s[k] for s in stats) for k in stats[0]}, "lora": lora,
            **({"profile": profile} if profile else {})}


def profile_step(layout, opt, dataset, cli, micro: int, device, precision) -> dict:
    """One more step under torch.profiler: device time by kernel bucket and the top kernels, as
    bench_train_step.py's --profile reports them."""
    from torch.profiler import ProfilerActivity, profile

    from bench_train_step import profile_summary

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches, counts = step_batches(dataset, cli.warmup + cli.steps, cli.global_batch, micro, device,
                                   layout.model.args.vocab_size)
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        train_step(layout, opt, batches, cli.global_batch // micro, lr=cli.lr, device=device, precision=precision,
                   fused_cross_entropy=True, grad_clip=1.0, attention=cli.attention, token_counts=counts)
        _sync(device)
        wall = time.perf_counter() - t0
    return profile_summary(prof, wall)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(v: Variant, r: dict, margs, cli, peak_flops: float | None, est_gib: float) -> dict:
    med = statistics.median(r["step_times_s"])
    n = len(r["step_times_s"])
    seq, gbs, lora = cli.seq_len, cli.global_batch, r.pop("lora")
    # The attention term over each token's own document: the family's formula at the sequence length
    # whose per-token attention equals the batches' (sum of squared document lengths / positions).
    doc_seq = r["doc_sq"] / r["positions"]
    per_seq = flops.flops_per_sequence(margs, seq, lora)
    doc_per_seq = seq * flops.flops_per_token(margs, doc_seq, lora)
    return {
        "variant": v.label, "kind": "lora" if v.lora else "sft", "compile": v.compile, "ac": v.ac, "fp8": v.fp8,
        "optim": v.optim,
        "micro_batch": r["micro_batch"], "global_batch": gbs, "seq_len": seq, "layers": margs.n_layers,
        "step_time_s": med, "tokens_per_s": seq * gbs / med,
        "non_padding_tokens_per_s": r["non_padding"] / n / med, "trained_tokens_per_s": r["trained"] / n / med,
        "padding_fraction": 1 - r["non_padding"] / r["positions"], "trained_fraction": r["trained"] / r["positions"],
        "tflops": gbs * per_seq / med / 1e12,
        "mfu": gbs * per_seq / med / peak_flops if peak_flops else None,
        "mfu_doc_attention": gbs * doc_per_seq / med / peak_flops if peak_flops else None,
        "gflop_per_token": per_seq / seq / 1e9, "doc_attention_seq": doc_seq,
        "peak_mem_gib": r["peak_mem_gib"], "estimate_gib": est_gib, "trainable_params": r["trainable_params"],
        "frozen_linear_dtype": r["frozen_linear_dtype"], "fp8_frozen_layers": r["fp8_frozen_layers"],
        "losses": r["losses"], "step_times_s": r["step_times_s"], **({"profile": r["profile"]} if "profile" in r else {}),
    }


def estimate(margs, v: Variant, cli, device) -> float:
    """The trainer's memory estimate for the variant, as the trainer makes it (its micro-batches per
    step, compiled or eager count, the GQA path of the device), GiB."""
    lora = lora_config(v, cli)
    bf16 = Precision.choose(cli.precision, device, fsdp=False).compute == torch.bfloat16
    micro = v.micro or cli.micro_batch
    return estimate_memory(margs, cli.seq_len, micro, n_microbatches=cli.global_batch // micro, bf16=bf16,
                           fsdp=False, activation_checkpointing=v.ac, lora=lora,
                           fp8="tensorwise" if v.fp8 else "none", compiled=v.compile, native_gqa=native_gqa(device),
                           optim=v.optim).total / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-8b", help="any registered size (debug for a smoke test)")
    p.add_argument("--layers", type=int, default=0, help="proxy: this many layers (0: the size's own)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1, help="for variants without @micro=N")
    p.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation happens here)")
    p.add_argument("--min-len", type=int, default=256, help="shortest example, tokens")
    p.add_argument("--max-len", type=int, default=2048, help="longest example, tokens")
    p.add_argument("--prompt-frac", default="0.2,0.8", help="range of each example's masked prompt share")
    p.add_argument("--packing", default="best_fit_decreasing", help="finetune.packing_algorithm (greedy: in order)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--fp8-min-features", type=int, default=1024, help="train.fp8_min_features (+fp8 variants)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="train.precision")
    p.add_argument("--attention", default="auto", help="train.attention_backend (SDPA; packed CUDA batches use flex)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=340.0,
                   help="start a variant only if it should end (ALLOWANCE_S) within this many seconds of the start")
    p.add_argument("--profile", default=None, metavar="VARIANT", help="profile one more step of this variant")
    p.add_argument("--json", default=None, help="write every result here")
    cli = p.parse_args()
    t_start = time.perf_counter()

    variants = [parse_variant(s) for s in cli.variants.split(",")]
    for v in variants:
        if cli.global_batch % (v.micro or cli.micro_batch):
            raise SystemExit(f"--global-batch {cli.global_batch}: not a multiple of {v.label}'s micro batch")
    device = torch.device(cli.device)
    base = registry.get(cli.model).args
    margs = dataclasses.replace(base, n_layers=cli.layers or base.n_layers,
                                max_seq_len=max(cli.seq_len, base.max_seq_len))
    registry.family_of(margs).validate(margs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = flops.peak_flops(name, "bf16")
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    lo, hi = (float(x) for x in cli.prompt_frac.split(","))
    max_micro = max(v.micro or cli.micro_batch for v in variants)
    n_seqs = (cli.warmup + cli.steps) * cli.global_batch + max_micro
    with tempfile.TemporaryDirectory() as tmp:
        # Enough examples for every sequence the steps read (a packed sequence holds at most seq/min_len).
        n_examples = n_seqs * max(1, cli.seq_len // cli.min_len) + 1
        cache = write_examples(os.path.join(tmp, "synthetic"), n_examples, margs.vocab_size, cli.min_len,
                               min(cli.max_len, cli.seq_len + 1), (lo, hi), seed=1234)
        dataset = SFTDataset(cache, cli.seq_len, packing=True, seed=1234, packing_algorithm=cli.packing)
        print(f"device {name}; torch {torch.__version__}; {cli.model} x {margs.n_layers} layers; seq {cli.seq_len}; "
              f"global batch {cli.global_batch}; {dataset.describe()}; LoRA rank {cli.lora_rank} alpha "
              f"{cli.lora_alpha} targets {cli.lora_targets}", flush=True)
        meta = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(sys.argv)}
        results = []
        for v in variants:
            results.append(one(v, margs, cli, device, dataset, peak_flops, capacity, t_start))
            if cli.json:  # after every variant: a run cut short still leaves what it measured
                with open(cli.json + ".tmp", "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)
                os.replace(cli.json + ".tmp", cli.json)
    print_table(results)
    from bench_train_step import print_profile

    for r in results:
        if "profile" in r:
            print_profile(r["profile"], f"one {r['variant']} step, global batch {cli.global_batch}")
    return 0


def one(v: Variant, margs, cli, device, dataset, peak_flops, capacity, t_start) -> dict:
    """Run one variant; its result row, or a row saying why it has none (skipped, OOM, failed)."""
    est = estimate(margs, v, cli, device)
    head = {"variant": v.label, "estimate_gib": est}
    allowance = ALLOWANCE_S["compile" if v.compile else "eager"]
    if time.perf_counter() - t_start + allowance > cli.budget_s:
        print(f"{v.label}: skipped (its {allowance:g} s would end past --budget-s {cli.budget_s:g})", flush=True)
        return {**head, "error": "skipped"}
    t0 = time.perf_counter()
    try:
        row = summarize(v, run_variant(v, margs, cli, device, dataset), margs, cli, peak_flops, est)
    except torch.OutOfMemoryError as e:
        row = {**head, "error": "OOM", "detail": str(e).splitlines()[0]}
    except Exception as e:  # a variant that fails (a compile error, say) must not cost the others
        traceback.print_exc()
        row = {**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    # Out of the except blocks: the traceback (and the variant's model it holds) is gone; compiled
    # graphs and their guards go too.
    if v.compile:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - t0
    if "error" in row:
        cap = f" of {capacity:.1f}" if capacity else ""
        print(f"{v.label}: {row['error']} (estimate {est:.1f}{cap} GiB) after {row['wall_s']:.0f} s", flush=True)
        print("SUMMARY " + json.dumps(row), flush=True)
        return row
    keys = ("variant", "micro_batch", "global_batch", "step_time_s", "tokens_per_s", "non_padding_tokens_per_s",
            "trained_tokens_per_s", "padding_fraction", "mfu", "mfu_doc_attention", "peak_mem_gib", "estimate_gib",
            "frozen_linear_dtype", "wall_s")
    print("SUMMARY " + json.dumps({k: row[k] for k in keys}), flush=True)
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
    print(f"{v.label:28s} {row['step_time_s'] * 1e3:8.1f} ms {row['tokens_per_s']:9,.0f} tok/s "
          f"({row['non_padding_tokens_per_s']:,.0f} non-padding) MFU {mfu} mem {row['peak_mem_gib'] or 0:.1f} GiB "
          f"(estimate {est:.1f}) loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f} [{row['wall_s']:.0f} s]",
          flush=True)
    return row


def print_table(results: list[dict]) -> None:
    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    print()
    print("| variant | micro | step ms | tokens/s | non-padding tokens/s | trained tokens/s | padding | MFU | "
          "MFU (doc attention) | peak mem GiB | estimate GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | | {r['error']} | | | | | | | | {r['estimate_gib']:.1f} |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"| {r['variant']} | {r['micro_batch']} | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['non_padding_tokens_per_s']:,.0f} | {r['trained_tokens_per_s']:,.0f} | "
              f"{pct(r['padding_fraction'])} | "
              f"{pct(r['mfu'])} | {pct(r['mfu_doc_attention'])} | {mem} | {r['estimate_gib']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
