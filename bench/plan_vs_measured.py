"""The planner against every single-GPU run the repository measured: docs/planner.md's tables.

For each run in docs/bench/*.json (one row per configuration; the files that hold it listed) and each
one-H200 row of docs/performance.md's family and GQA tables: the planner's step time for that layout
(compiled runs with the fused loss only, the runs it models) from the fitted model of llamatron/plan.py
and, where llamatron/calibration/ ships a table for the GPU (h200.json), from that table, which is what
`llamatron plan --gpu H200` computes with; and the memory estimate of llamatron/parallel/memory.py for
the run as it ran (compiled or eager, fused or plain loss, FP8, K/V expanded or not), beside the
measured step time and peak (`torch.cuda.max_memory_allocated`).

    PYTHONPATH=. python bench/plan_vs_measured.py            # markdown tables on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from llamatron import calibration, plan
from llamatron.models import registry
from llamatron.parallel.memory import GiB, estimate_memory

DOCS = Path(__file__).resolve().parents[1] / "docs"

# docs/performance.md, one H200, 2026-12-02 ("Grouped-query attention without expanding K/V" and "Model
# families, MoE and zero-shot scoring"): label, model, layers (0: all), seq, micro, global, variant,
# GQA path, measured tokens/s/GPU, measured peak GiB.
PERFORMANCE_MD = [
    ("8B proxy, K/V expanded", "llama3.1-8b", 4, 8192, 8, 16, "compile+cudnn", "expand", 62_999, 82.2),
    ("8B proxy, native GQA", "llama3.1-8b", 4, 8192, 8, 16, "compile+cudnn", "native", 63_186, 79.2),
    ("8B proxy, native GQA, FP8 everywhere", "llama3.1-8b", 4, 8192, 8, 16, "compile+fp8-all", "native", 86_254, 69.6),
    ("GPT 126M, micro 16", "gpt-126m", 0, 2048, 16, 64, "compile+cudnn", "native", 463_007, 14.5),
    ("GPT 126M, micro 32", "gpt-126m", 0, 2048, 32, 64, "compile+cudnn", "native", 478_252, 24.3),
    ("GPT 5B proxy", "gpt-5b", 4, 2048, 8, 16, "compile+cudnn", "native", 91_077, 29.5),
    ("LLaMA-2 7B proxy", "llama2-7b", 4, 4096, 8, 16, "compile+cudnn", "native", 93_272, 38.8),
    ("LLaMA-2 7B proxy, FP8 everywhere", "llama2-7b", 4, 4096, 8, 16, "compile+fp8-all", "native", 126_100, 33.4),
    # 2026-12-05 (docs/performance.md, "LLaMA-2 7B proxy at micro 16")
    ("LLaMA-2 7B proxy, global 32, micro 8", "llama2-7b", 4, 4096, 8, 32, "compile+cudnn", "native", 94_453, 38.8),
    ("LLaMA-2 7B proxy, global 32, micro 16", "llama2-7b", 4, 4096, 16, 32, "compile+cudnn", "native", 95_401, 57.9),
]


@dataclasses.dataclass(frozen=True)
class Run:
    gpu: str
    model: str
    layers: int
    seq: int
    micro: int
    global_batch: int
    compiled: bool
    fused_loss: bool
    fp8: str  # none, tensorwise, rowwise
    fp8_output: bool
    gqa: str  # expand (every docs/bench run predates native GQA) or native
    superseded: bool = False  # a run of code this tree no longer has (its JSON's note says which): shown, not held
    bf16_residual: bool = False  # the residual stream in bf16 (train.bf16_residual): fewer bytes kept
    fa4: bool = False  # attention on FlashAttention 4's kernels (train.attention_backend=fa4): not modelled


def _args(run: Run):
    base = registry.get(run.model).args
    args = dataclasses.replace(base, n_layers=run.layers or base.n_layers)
    return dataclasses.replace(args, max_seq_len=max(run.seq, args.max_seq_len))


def estimate_gib(run: Run) -> float:
    est = estimate_memory(_args(run), run.seq, run.micro, n_microbatches=run.global_batch // run.micro,
                          fused_cross_entropy=run.fused_loss, fp8=run.fp8, fp8_include_output=run.fp8_output,
                          compiled=run.compiled, native_gqa=run.gqa == "native", bf16_residual=run.bf16_residual)
    return est.total / GiB


def planned_step(run: Run, calibrated: bool = False) -> float | None:
    """The planner's step for this single-GPU layout, from the fitted model or from the GPU's shipped
    calibration table; None where it models no such run (eager, the plain loss) or ships no table."""
    table = calibration.default_table(run.gpu) if calibrated else None
    if not run.compiled or not run.fused_loss or (calibrated and table is None):
        return None
    w = plan.workload(run.model, run.seq, run.global_batch, run.layers or None)
    w = dataclasses.replace(w, fp8_output=run.fp8_output, fp8=None if run.fp8 == "none" else run.fp8,
                            bf16_residual=run.bf16_residual)
    hw = plan.Hardware(1, memory_gib=139.0 if run.gpu == "H200" else 80.0, fp8=True,
                       fp8_speedup=plan.FP8_GEMM_SPEEDUP[run.gpu])
    lay = plan.Layout(1, 1, 1, 1, 1, run.micro, False, fp8=run.fp8 != "none")
    return plan.evaluate(w, lay, table.apply(hw) if table is not None else hw).step_s


def bench_runs() -> dict[Run, dict]:
    """Each configuration of docs/bench's single-GPU rows: the files and variants, the measured step
    times (every file's) and peak."""
    runs: dict[Run, dict] = {}
    for path, data in _training_runs():
        gpu = "H200" if "H200" in data.get("meta", {}).get("device", "") else "H100"
        if _other_model(data.get("meta", {}).get("command", "")):
            continue  # another family's proxy (docs/moe.md), or its shapes changed by --set
        for r in data.get("results", []):
            if "fused_ce" not in r or "peak_mem_gib" not in r or r.get("layout", "1 device") != "1 device":
                continue  # fine-tuning rows: `finetune_table`
            if r.get("fp8_fused_swiglu", "0") != "0":
                continue  # train.fp8_fused_swiglu (opt-in) is not modelled
            gqa = r.get("gqa", "expand")
            run = Run(gpu, "llama3.1-8b", r["layers"], r["seq_len"], r["micro_batch"], r["global_batch"], r["compile"],
                      r["fused_ce"], r.get("fp8", "none"), r.get("fp8_output", False),
                      "native" if gqa == "auto" else gqa, bool(r.get("superseded")), bool(r.get("bf16_residual")),
                      r.get("attention") == "fa4")
            entry = runs.setdefault(run, {"names": [], "steps": [], "peaks": []})
            entry["names"].append(f"{path.name} {r['variant']}")
            entry["steps"].append(r["step_time_s"])
            entry["peaks"].append(r["peak_mem_gib"])
    return runs


def _training_runs():
    """docs/bench's JSON files of runs with a meta and results (not zero-shot scoring's lists of rows)."""
    for path in sorted((DOCS / "bench").glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # without the results a note voids (a run whose numbers are wrong)
            yield path, {**data, "results": [r for r in data.get("results", []) if "void" not in r]}


def _command_model(command: str) -> tuple[list[str], list[str]]:
    """A bench_train_step command's named sizes (--size / --model) and its --set values."""
    words = command.split()
    named = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--size", "--model")]
    return named, [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def _other_model(command: str) -> bool:
    named, sets = _command_model(command)
    return any(n != "llama3.1-8b" for n in named) or bool(sets)


def _bench_module(name: str):
    """A script beside this one (also when a test loads this one by path)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def moe_rows() -> list[dict]:
    """docs/bench's runs of a MoE family's proxy (bench_train_step.py --size glam-..., its `--set model.*`
    applied), compiled BF16 ones: the planner's step (fitted and from the shipped H200 table) and the
    memory estimate beside the measured step and peak."""
    rows = []
    for path, data in _training_runs():
        named, sets = _command_model(data.get("meta", {}).get("command", ""))
        if not named or registry.get(named[0]).family.name != "glam":
            continue
        gpu = "H200" if "H200" in data["meta"].get("device", "") else "H100"
        for r in data["results"]:
            if not r.get("compile") or "fp8" in r["variant"] or "step_time_s" not in r:
                continue  # eager, FP8 (linears or experts), or a variant that failed
            w = plan.workload(named[0], r["seq_len"], r["global_batch"], r["layers"] or None)
            # The model as the bench built it: its --set keys read as the trainer reads them.
            args = _bench_module("bench_train_step").model_args(
                argparse.Namespace(size=named[0], layers=r["layers"], seq_len=r["seq_len"], sets=sets))
            w = dataclasses.replace(w, args=args, cast_weights_once=bool(r.get("castonce")),
                                    gradient_accumulation_fusion=bool(r.get("fused_wgrad")))
            lay = plan.Layout(1, 1, 1, 1, 1, r["micro_batch"], False)
            hw = plan.Hardware(1, memory_gib=139.0 if gpu == "H200" else 80.0, fp8=True, fp8_speedup=plan.FP8_GEMM_SPEEDUP[gpu])
            table = calibration.default_table(gpu)
            # GLaM's attention kernel (the runs before 2026-12-05 ran flex): planned with that kernel's
            # rows of the table (its default's where it timed no other); the memory estimate models
            # flex's (split_triton keeps as much, split's and split_cudnn's band 5% more: docs/moe.md).
            kernel = r.get("glam_attention", "flex")
            with _glam_kernel(kernel):
                fitted = plan.evaluate(w, lay, hw).step_s
                calibrated = plan.evaluate(w, lay, table.apply(hw)).step_s if table is not None else None
            # A kernel the table did not time: the rows that stood in, and the table whose ratio scaled them.
            stand_in = table.other_kernel.get(("bias", kernel)) if table is not None else None
            est = estimate_memory(args, r["seq_len"], r["micro_batch"], n_microbatches=r["global_batch"] // r["micro_batch"],
                                  fused_cross_entropy=r["fused_ce"], compiled=True, native_gqa=True)
            rows.append({"file": path.name, "variant": r["variant"], "model": named[0], "gpu": gpu,
                         "date": data["meta"].get("date", ""),
                         "sets": dict(x.removeprefix("model.").split("=", 1) for x in sets),
                         "layers": r["layers"], "micro": r["micro_batch"], "global": r["global_batch"],
                         "step": r["step_time_s"], "fitted": fitted, "calibrated": calibrated,
                         "peak": r["peak_mem_gib"], "estimate": est.total / GiB, "attention": kernel,
                         "timed": table is not None and kernel in table.kernels("bias"), "stand_in": stand_in,
                         # a run of code this tree no longer has (its note says which): shown, not held
                         "superseded": r.get("superseded")})
    return rows


@contextlib.contextmanager
def _glam_kernel(kernel: str):
    """GLaM's blocks (and so the planner's shapes) set to run `kernel`, as the run did."""
    from llamatron.models.glam import attention

    saved, attention.KERNEL = attention.KERNEL, kernel
    try:
        yield
    finally:
        attention.KERNEL = saved


def moe_table() -> list[str]:
    lines = ["| run (docs/bench/) | GPU | model | layers | micro | global | measured step s | planned step s "
             "(fitted) | error | calibrated step s | error | measured peak GiB | estimate GiB | estimate / measured |",
             "|" + "---|" * 14]
    for r in moe_rows():
        model = r["model"] + "".join(f", {k}={v}" for k, v in r["sets"].items())
        model += f", {r['attention']} attention"
        if not r["timed"] and r["stand_in"]:
            base, peer = r["stand_in"]
            model += f" (the table's {base} rows" + (f" x {peer}'s {r['attention']} / {base} ratio)" if peer else ")")
        run = f"{r['file']} {r['variant']}" + (" (code since replaced)" if r["superseded"] else "")
        lines.append(f"| {run} | {r['gpu']} | {model} | {r['layers']} | {r['micro']} | {r['global']} | "
                     f"{r['step']:.3f} | {_step_cells(r['fitted'], r['step'])} | {_step_cells(r['calibrated'], r['step'])} | "
                     f"{r['peak']:.1f} | {r['estimate']:.1f} | {r['estimate'] / r['peak']:.2f} |")
    return lines


def finetune_rows() -> list[dict]:
    """The fine-tuning benchmark's rows (bench/bench_finetune.py, full 8B, one H200): the trainer's
    memory estimate with today's model (the run printed the one of its day) and, for compiled runs,
    the planner's step from the shipped H200 table."""
    import torch

    bench_finetune = _bench_module("bench_finetune")
    Variant, estimate, parse_variant = bench_finetune.Variant, bench_finetune.estimate, bench_finetune.parse_variant
    from llamatron.config import LoraConfig

    table = calibration.default_table("H200")
    hw = table.apply(plan.Hardware(1, memory_gib=139.0, fp8=True, fp8_speedup=plan.FP8_GEMM_SPEEDUP["H200"]))
    rows = []
    for path in sorted((DOCS / "bench").glob("finetune*.json")):
        for r in json.loads(path.read_text())["results"]:
            if "peak_mem_gib" not in r:
                continue
            base = registry.get("llama3.1-8b").args
            margs = dataclasses.replace(base, n_layers=r["layers"], max_seq_len=max(r["seq_len"], base.max_seq_len))
            cli = argparse.Namespace(seq_len=r["seq_len"], micro_batch=r["micro_batch"], global_batch=r["global_batch"],
                                     lora_rank=32, lora_alpha=32.0, lora_targets="all", precision="bf16")
            v: Variant = parse_variant(r["variant"])
            planned = None
            if v.compile:  # the runs the step-time model describes
                # The batches' document masking: bench_finetune records sum(len_i^2) / positions over the
                # steps' sequences (the padding run one document) as doc_attention_seq.
                w = dataclasses.replace(plan.workload("llama3.1-8b", r["seq_len"], r["global_batch"]), finetune=True,
                                        lora=LoraConfig(rank=32, alpha=32.0) if v.lora else None, optim=v.optim,
                                        document_tokens=r["doc_attention_seq"])
                planned = plan.evaluate(w, plan.Layout(1, 1, 1, 1, 1, r["micro_batch"], v.ac, fp8=v.fp8), hw).step_s
            rows.append({"file": path.name, "variant": r["variant"], "micro": r["micro_batch"], "step": r["step_time_s"],
                         "planned": planned, "peak": r["peak_mem_gib"], "estimate": estimate(margs, v, cli, torch.device("cuda"))})
    return rows


def finetune_table() -> list[str]:
    lines = ["| run (docs/bench/) | variant | micro | measured step s | calibrated step s | error | "
             "measured peak GiB | estimate GiB | estimate / measured |", "|" + "---|" * 9]
    for r in finetune_rows():
        lines.append(f"| {r['file']} | {r['variant']} | {r['micro']} | {r['step']:.3f} | "
                     f"{_step_cells(r['planned'], r['step'])} | {r['peak']:.1f} | {r['estimate']:.1f} | "
                     f"{r['estimate'] / r['peak']:.2f} |")
    return lines


def _describe(run: Run) -> str:
    kind = ("compiled" if run.compiled else "eager") + ("" if run.fused_loss else ", plain loss")
    if run.fp8 != "none":
        kind += f", FP8 {run.fp8}" + (" + output" if run.fp8_output else "")
    return kind


def _step_cells(planned: float | None, measured: float) -> str:
    return f"{planned:.3f} | {100 * (planned / measured - 1):+.1f}%" if planned is not None else "| "


def bench_table() -> list[str]:
    lines = ["| run (docs/bench/) | GPU | layers | micro | global | mode | measured step s | planned step s (fitted) | "
             "error | calibrated step s | error | measured peak GiB | estimate GiB | estimate / measured |",
             "|" + "---|" * 14]
    def key(kv):
        r = kv[0]
        return not r.compiled, r.fp8 != "none", r.gpu, r.layers, r.micro, r.global_batch, r.fp8_output, r.superseded

    order = sorted(bench_runs().items(), key=key)
    for run, e in order:
        measured = sorted(e["steps"])[len(e["steps"]) // 2]
        steps = " | ".join(_step_cells(planned_step(run, calibrated), measured) for calibrated in (False, True))
        peak = max(e["peaks"])
        est = estimate_gib(run)
        names = "<br>".join(e["names"]) + (" (code since replaced)" if run.superseded else "")
        lines.append(f"| {names} | {run.gpu} | {run.layers} | {run.micro} | {run.global_batch} | "
                     f"{_describe(run)} | {measured:.3f} | {steps} | {peak:.1f} | {est:.1f} | {est / peak:.2f} |")
    return lines


def performance_table() -> list[str]:
    lines = ["| run (docs/performance.md, one H200) | measured tok/s/GPU | planned tok/s/GPU (fitted) | step error | "
             "calibrated tok/s/GPU | step error | measured peak GiB | estimate GiB | estimate / measured |",
             "|" + "---|" * 9]
    for label, model, layers, seq, micro, gbs, variant, gqa, tokens, peak in PERFORMANCE_MD:
        fp8 = variant == "compile+fp8-all"
        run = Run("H200", model, layers, seq, micro, gbs, True, True, "tensorwise" if fp8 else "none", fp8, gqa)
        planned = [gbs * seq / planned_step(run, calibrated) for calibrated in (False, True)]
        speeds = " | ".join(f"{p:,.0f} | {100 * (tokens / p - 1):+.1f}%" for p in planned)  # error of the step time
        est = estimate_gib(run)
        lines.append(f"| {label} | {tokens:,} | {speeds} | {peak:.1f} | {est:.1f} | {est / peak:.2f} |")
    return lines


def main() -> int:
    print("\n".join(bench_table()))
    print()
    print("\n".join(performance_table()))
    print()
    print("\n".join(finetune_table()))
    print()
    print("\n".join(moe_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
