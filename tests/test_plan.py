"""The layout planner (`llamatron plan`, llamatron/plan.py): its picks against what the repo has
measured, every family, HSDP, expert parallelism, FP8 and LoRA, the answer when nothing fits, every
printed layout through the config's own checks, calibration tables (`--calibrate` on the CPU), and the
memory estimate against the measured peak of small CPU runs."""

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llamatron import calibration, flops, plan
from llamatron.calibration import measure
from llamatron.cli import main
from llamatron.config import ParallelConfig, load_config, resolve_model, validate_config
from llamatron.models import attention_ops, registry
from llamatron.models.glam import attention as glam_attention
from llamatron.parallel.dims import ParallelDims
from llamatron.parallel.layout import Layout
from llamatron.transforms.fp8_frozen import quantize_frozen_linears
from llamatron.transforms.lora import frozen_dtype
from llamatron.parallel.memory import estimate_memory, parameter_counts
from llamatron.testing.bench import load_bench
from llamatron.testing.compiled import inductor_partitioner
from llamatron.train.optim import build_optimizer
from llamatron.train.step import train_step
from llamatron.transforms import compile as compile_transform

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
H200 = plan.Hardware(1, memory_gib=139.0)
H200_FP8 = plan.Hardware(1, memory_gib=139.0, fp8=True, fp8_speedup=plan.FP8_GEMM_SPEEDUP["H200"])


def _sets(text: str) -> list[tuple[str | None, list[str]]]:
    """The lines the planner printed, one (config, overrides) per layout."""
    out = []
    for line in text.splitlines():
        if re.match(r"#\d+: --(set|config)", line):
            words = shlex.split(line.split(": ", 1)[1])
            config = words[words.index("--config") + 1] if "--config" in words else None
            out.append((config, [words[i + 1] for i, x in enumerate(words) if x == "--set"]))
    return out


def _measured(variant: str) -> dict[int, dict]:
    """docs/bench's one-H200 rows of the 4-layer 8B proxy, by micro batch."""
    return {r["micro_batch"]: r for name in ("h200_l4_mbs4.json", "h200_l4_mbs8.json")
            for r in json.loads((DOCS / "bench" / name).read_text())["results"] if r["variant"] == variant}


def _as_measured(w: plan.Workload) -> plan.Workload:
    """The workload as docs/bench's H200 rows of 2026-12-0x ran it: the residual stream in fp32 (before
    train.bf16_residual became the default)."""
    return dataclasses.replace(w, bf16_residual=False)


def test_8b_proxy_on_one_h200_ranks_the_measured_runs_as_measured():
    """docs/bench (h200_l4_mbs4/8.json): 4 layers of the 8B at seq 8192 on one H200 ran at micro batch 4
    and 8 without activation checkpointing, micro batch 8 the faster (2.098 s against 2.121 s); the
    planner ranks them so, each within 10% of the measured step and peak. First it ranks micro batch 16
    (one micro-batch per step), which the compiled memory estimate fits (113.6 of the 125 GiB it allows)
    and docs/bench has not measured yet (docs/planner.md gives the command)."""
    p = plan.plan(_as_measured(plan.workload("llama3.1-8b", 8192, 16, 4)), H200)
    plain = [e for e in p.ranked if not e.layout.activation_checkpointing]
    assert all((e.layout.tp, e.layout.pp, e.layout.cp, e.layout.dp_shard) == (1, 1, 1, 1) for e in p.ranked)
    assert [e.layout.micro_batch for e in plain] == [16, 8, 4, 2, 1] and p.ranked[0] is plain[0]
    assert plain[0].memory_gib == pytest.approx(113.6, abs=0.1) and plain[0].memory_gib < 0.9 * 139
    measured = _measured("compile+cudnn")
    assert measured[8]["step_time_s"] < measured[4]["step_time_s"]
    for e in plain:
        if e.layout.micro_batch in measured:
            row = measured[e.layout.micro_batch]
            assert e.step_s == pytest.approx(row["step_time_s"], rel=0.10)
            assert e.memory_gib == pytest.approx(row["peak_mem_gib"], rel=0.10)


def test_what_plan_gpu_h200_computes_with_keeps_the_measured_runs():
    """`llamatron plan --gpu H200` computes from llamatron/calibration/h200.json when it is shipped,
    else from the fitted model: either way the one-H200 runs of docs/bench stay within 10% and the
    first choice is the largest micro batch that fits, without activation checkpointing."""
    table = calibration.default_table("H200")
    hw = H200 if table is None else table.apply(H200)
    p = plan.plan("llama3.1-8b", hw, seq_len=8192, global_batch=16, layers=4)
    assert (p.ranked[0].layout.micro_batch, p.ranked[0].layout.activation_checkpointing) == (16, False)
    measured = _measured("compile+cudnn")
    steps = {e.layout.micro_batch: e.step_s for e in p.ranked if not e.layout.activation_checkpointing}
    for micro, row in measured.items():
        assert steps[micro] == pytest.approx(row["step_time_s"], rel=0.10)


def test_the_kernel_ceiling_is_above_every_planned_and_measured_step():
    """bench/gemm_ceiling.py: the step's GEMMs and attention alone, from the shipped H200 table, give
    an MFU above the planner's (which adds element-wise work, the loss and the optimizer) and above
    every measured H200 run of that layout, and its GEMM rate is the table's for those shapes."""
    module = load_bench("gemm_ceiling")
    path = REPO / "llamatron" / "calibration" / "h200.json"
    table = calibration.load(path)
    c = module.ceiling("llama3.1-8b", 4, 8192, 8, str(path), 989e12)
    assert c["gemm_tflops"] * 1e12 == pytest.approx(2 * 65536 * 4096 * 4096 / table.gemm("fwd", 65536, 4096, 4096),
                                                   rel=0.15)
    p = plan.plan("llama3.1-8b", table.apply(H200), seq_len=8192, global_batch=8, layers=4)
    planned = next(e for e in p.ranked if e.layout.micro_batch == 8 and not e.layout.fp8
                   and not e.layout.activation_checkpointing)
    assert planned.mfu < c["mfu_ceiling"] < 1
    assert all(row["mfu"] < c["mfu_ceiling"] for row in _measured("compile+cudnn").values())


def _plan_vs_measured():
    return load_bench("plan_vs_measured")


def test_every_single_gpu_run_within_10_percent_of_the_memory_estimate_as_docs_planner_md_shows():
    """Every single-GPU run of docs/bench and docs/performance.md's H200 tables, compiled or eager, BF16
    or FP8, pretraining or fine-tuning: the memory estimate within 10% of the measured peak (and the
    fine-tuning runs' planned step, attention within each packed document, within 3% of theirs); the
    tables in docs/planner.md are what
    bench/plan_vs_measured.py prints from them."""
    tables = _plan_vs_measured()
    runs = tables.bench_runs()
    assert len(runs) >= 25 and any(r.compiled and r.fp8 != "none" for r in runs) and any(not r.compiled for r in runs)
    for run, measured in runs.items():
        assert tables.estimate_gib(run) == pytest.approx(max(measured["peaks"]), rel=0.10), run
    for label, model, layers, seq, micro, gbs, variant, gqa, _, peak in tables.PERFORMANCE_MD:
        fp8 = variant == "compile+fp8-all"
        run = tables.Run("H200", model, layers, seq, micro, gbs, True, True, "tensorwise" if fp8 else "none", fp8, gqa)
        assert tables.estimate_gib(run) == pytest.approx(peak, rel=0.10), label
    for r in tables.finetune_rows():  # fine-tuning on one H200: memory, and the step where the planner models it
        assert r["estimate"] == pytest.approx(r["peak"], rel=0.10), r
        # within 3% on the H200 table of 2026-12-04, -3.9% to +0.1% on that of 2026-12-06
        assert r["planned"] is None or r["planned"] == pytest.approx(r["step"], rel=0.05), r
    moe = tables.moe_rows()  # MoE runs: memory, the fitted step of the 64B proxy, the calibrated one
    # Every run of code this tree still has (the superseded rows ran split's band as batched products,
    # replaced on 2026-12-05; their notes say so), every attention kernel: the memory estimate (flex's
    # attention; split_triton keeps as much, split and split_cudnn 5% more) within 10%.
    current = [r for r in moe if not r["superseded"]]
    assert {r["attention"] for r in current} == set(glam_attention.KERNELS) and len(moe) - len(current) == 4
    assert all(r["estimate"] == pytest.approx(r["peak"], rel=0.10) for r in current), current
    # The fitted step of the H200 64B proxy (the fitted model's GLaM point); GLaM 126M's fitted step, 0.5 s
    # against 0.76-1.34, is the fitted model's known miss (GPUs without a table): it has no term for the
    # biased attention's or the experts' speed.
    assert all(r["fitted"] == pytest.approx(r["step"], rel=0.10) for r in moe if r["model"] == "glam-64b-64e"), moe
    # The calibrated step of every such run, with GLaM's own element-wise factor (models/glam/cost.py,
    # fitted on an H100 profile of split_triton): within 10%. From its kernel's rows where its GPU's table
    # timed it: h100.json (2026-12-06 08:47 UTC) times all four kernels; h200.json (06:34) split_triton
    # only, and a run of another kernel is planned from those rows times h100.json's ratio of the two.
    timed = [r for r in current if r["timed"]]
    assert all(r["calibrated"] == pytest.approx(r["step"], rel=0.10) for r in current), current
    assert {r["stand_in"] for r in current if not r["timed"]} == {("split_triton", "h100.json")}
    h100 = [r for r in current if r["gpu"] == "H100" and r["model"] == "glam-126m-64e"]
    assert all(r["timed"] for r in h100) and {r["attention"] for r in h100} == set(glam_attention.KERNELS)
    assert len({r["gpu"] for r in timed if r["model"] == "glam-126m-64e"}) == 2
    doc = (DOCS / "planner.md").read_text()
    assert all(line in doc for line in tables.bench_table() + tables.performance_table() + tables.finetune_table()
               + tables.moe_table())


def test_every_compiled_run_within_10_percent_of_its_gpus_calibrated_step():
    """With the shipped tables (h200.json and h100.json, both measured on 2026-12-06), the calibrated step of
    every compiled single-GPU 8B-proxy run of docs/bench with the fused loss is within 10% of the
    median measured step, BF16 or FP8 of either recipe (rowwise planned with its own, smaller speedup:
    plan.FP8_ROWWISE_RELATIVE_SPEEDUP; with tensorwise's it was -11.0%)."""
    tables = _plan_vs_measured()
    checked = set()
    for run, measured in tables.bench_runs().items():
        planned = tables.planned_step(run, calibrated=True)
        if planned is None or run.superseded:  # the FP8 output layer's runs before 2026-12-06: shown, not held
            continue
        assert planned == pytest.approx(statistics.median(measured["steps"]), rel=0.10), (run, measured["names"])
        checked.add((run.gpu, run.fp8))
    assert {("H100", "none"), ("H200", "none"), ("H100", "tensorwise"), ("H100", "rowwise"),
            ("H200", "tensorwise")} <= checked
    assert any(run.fp8_output and not run.superseded for run in tables.bench_runs())


@pytest.mark.parametrize("fusion", [False, True])
def test_casting_weights_once_takes_the_per_micro_batch_parameter_passes_off_the_calibrated_step(tmp_path, fusion):
    """train.cast_weights_once: the casts once per step instead of per micro-batch (GLaM 126M's 1.9B
    parameters over 16 micro-batches: 234 ms of an H100 step), and with the fused weight gradient the
    accumulation in the GEMM's epilogue; a config's keys reach the workload."""
    table = calibration.default_table("H200")
    hw = table.apply(H200)
    w = plan.workload("glam-126m-64e", 2048, 128)
    lay = plan.Layout(1, 1, 1, 1, 1, 8, False)
    once = dataclasses.replace(w, cast_weights_once=True, gradient_accumulation_fusion=fusion)
    params = plan._stage(w, lay).params
    m = 128 // 8
    per_micro = plan.FUSED_WGRAD_MICRO_BYTES if fusion else plan.CAST_ONCE_MICRO_BYTES
    saved = (m * plan.PARAM_PASS_BYTES - plan.CAST_ONCE_BYTES - m * per_micro) * params / table.bandwidth()
    assert saved > 0.03  # seconds: 1.9B parameters
    assert plan.evaluate(w, lay, hw).step_s - plan.evaluate(once, lay, hw).step_s == pytest.approx(saved, rel=1e-6)
    cfg = tmp_path / "glam.toml"
    cfg.write_text('[model]\nsize = "glam-126m-64e"\n[data]\nseq_len = 2048\n[train]\nglobal_batch_size = 128\n'
                   f'cast_weights_once = true\ngradient_accumulation_fusion = {str(fusion).lower()}\n')
    from_config = plan.workload_from_config(str(cfg))
    assert (from_config.cast_weights_once, from_config.gradient_accumulation_fusion) == (True, fusion)


def test_full_8b_on_two_h200_uses_fsdp_as_the_docs_show_fits():
    """The full 8B under FSDP 2 at micro batch 1, compiled, global batch 16 (8 micro-batches: the
    gradients accumulate, unlike docs/parallelism.md's 85.8 GiB with one), is 100.8 GiB per rank and
    fits an H200; on one H200 the fp32 state alone (120 GiB) leaves too little."""
    p = plan.plan("llama3.1-8b", plan.Hardware(2, memory_gib=139.0), seq_len=8192, global_batch=16)
    best = p.ranked[0]
    assert best.layout.dp_shard * best.layout.cp == 2 and best.layout.tp == 1 and best.layout.pp == 1
    assert best.memory_gib <= 0.9 * 139
    fsdp2 = [e for e in p.ranked if e.layout.dp_shard == 2 and e.layout.micro_batch == 1
             and not e.layout.activation_checkpointing]
    assert fsdp2 and fsdp2[0].memory_gib == pytest.approx(100.8, abs=0.1)
    assert not plan.plan("llama3.1-8b", H200, seq_len=8192, global_batch=16).ranked


def test_405b_on_8_gpus_says_why_nothing_fits(capsys):
    assert main(["plan", "--model", "llama3.1-405b", "--gpus", "8"]) == 1
    out = capsys.readouterr().out
    assert "nothing fits" in out and "405.9B parameters" in out and "756.0 GiB per GPU" in out
    assert "at least 84 GPUs" in out and "--set" not in out


def test_1024_gpus_keep_tensor_parallelism_inside_a_node():
    p = plan.plan("llama3.1-405b", plan.Hardware(1024), seq_len=8192, global_batch=1024)
    assert p.ranked and p.ranked[0].layout.tp <= 8
    # Tensor parallelism over the network is priced, not forbidden: the same layout with tp 16 is slower.
    lay = p.ranked[0].layout
    slower = [e for e in p.ranked if e.layout.tp == 16]
    assert not slower or min(e.step_s for e in slower) > p.ranked[0].step_s
    assert lay.dp_shard * lay.tp * lay.pp * lay.cp == 1024


@pytest.mark.parametrize("argv,world", [
    (["--model", "llama3.1-8b", "--layers", "4", "--gpus", "1", "--gpu-memory-gib", "139", "--global-batch", "16"], 1),
    (["--model", "llama3.1-70b", "--gpus", "64", "--global-batch", "256", "--top", "8"], 64),
    (["--model", "llama3.1-405b", "--gpus", "1024", "--top", "8"], 1024),
    (["--model", "llama3.1-70b", "--gpus", "16", "--nodes", "2", "--gpu-memory-gib", "139", "--global-batch", "64",
      "--top", "8"], 16),
    (["--model", "gpt-126m", "--gpus", "8", "--seq-len", "2048", "--global-batch", "256", "--top", "10"], 8),
    (["--model", "gpt-5b", "--gpus", "16", "--nodes", "2", "--seq-len", "2048", "--global-batch", "64", "--top", "10"], 16),
    (["--model", "glam-126m-64e", "--gpus", "8", "--gpu", "H200", "--seq-len", "2048", "--global-batch", "256",
      "--top", "10"], 8),
    (["--model", "glam-64b-64e", "--gpus", "256", "--gpu", "H200", "--seq-len", "2048", "--global-batch", "512",
      "--top", "10"], 256),
    (["--config", "llama31-8b-boolq-lora", "--gpus", "8", "--gpu", "H200", "--top", "10"], 8),
    (["--config", "llama31-8b-boolq-lora", "--gpus", "1", "--gpu", "H200", "--top", "10"], 1),
    (["--config", "llama2-7b", "--gpus", "8", "--gpu", "H200", "--global-batch", "64", "--top", "10"], 8),
])
def test_every_printed_layout_passes_config_validation(capsys, argv, world):
    """Every family (Llama, GPT, GLaM), configs and presets (LoRA fine-tuning): what is printed runs."""
    assert main(["plan", *argv]) == 0
    layouts = _sets(capsys.readouterr().out)
    assert layouts
    for config, sets in layouts:
        cfg = load_config(config, sets + ["data.mock=true"])
        validate_config(cfg, world)  # raises LlamatronError naming the key if the layout were impossible
        assert cfg.train.micro_batch_size >= 1 and cfg.parallel.dp_shard >= 1


def test_every_enumerated_layout_passes_config_validation():
    """Not only the printed ones: pipeline (with virtual stages), context and tensor parallel layouts,
    HSDP and FP8."""
    p = plan.plan("llama3.1-70b", plan.Hardware(32, fp8=True), seq_len=4096, global_batch=64)
    estimates = [plan.evaluate(p.workload, lay, p.hardware) for lay in plan.layouts(p.workload, p.hardware)]
    assert {e.layout.virtual for e in estimates} >= {1, 2, 4} and {e.layout.cp for e in estimates} >= {1, 2, 4}
    assert {e.layout.dp_replicate for e in estimates} >= {1, 2, 4} and {e.layout.fp8 for e in estimates} == {False, True}
    for e in estimates[::7]:
        plan.check_overrides(p, e)


def test_bad_input_is_one_line(capsys, tmp_path):
    assert main(["plan", "--model", "llama9", "--gpus", "8"]) == 2
    assert "unknown; known sizes" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3.1-8b", "--gpus", "8", "--nodes", "3"]) == 2
    assert main(["plan", "--gpus", "8"]) == 2
    assert "give --model SIZE or --config" in capsys.readouterr().err
    assert main(["plan", "--config", "no-such-preset", "--gpus", "8"]) == 2
    assert "no such file, and no preset" in capsys.readouterr().err
    assert main(["plan", "--model", "debug", "--gpus", "1", "--calibration", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": calibration.FORMAT, "gemm": [{"op": "fwd", "m": 0}]}))
    assert main(["plan", "--model", "debug", "--gpus", "1", "--calibration", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.json: calibration key 'gemm[0]'" in err and len(err.splitlines()) == 1
    assert main(["plan", "--calibrate", "--model", "llama9", "--out", str(tmp_path / "t.json")]) == 2
    assert not (tmp_path / "t.json").exists()  # refused before anything was measured


# --------------------------------------------------------------------------------------------------
# Every family, HSDP, expert parallelism, FP8, LoRA


@pytest.mark.parametrize("size", ["llama3.1-8b", "llama2-7b", "gpt-126m", "glam-126m-64e"])
def test_family_shapes_agree_with_the_flop_formula_and_the_parameters(size):
    """Family.shapes lists the products flops_per_token counts (6 FLOPs per weight and row, attention's
    12 x seq x heads x head_dim, the output layer) and the block's weight matrices."""
    entry = registry.get(size)
    args, shapes = entry.args, entry.family.shapes(entry.args)
    seq = 2048
    gemms = sum(6 * g.k * g.n * g.rows * g.share for g in shapes.gemms) * args.n_layers
    attention = 12 * seq * shapes.heads * shapes.head_dim * args.n_layers
    assert gemms + attention + 6 * args.vocab_size * args.dim == pytest.approx(flops.flops_per_token(args, seq), rel=1e-9)
    weights = sum(g.k * g.n * g.groups * g.share for g in shapes.gemms)
    assert weights == pytest.approx(parameter_counts(args).block_matrices, rel=1e-4)


def test_gpt_pipelines_with_its_tied_copy_and_glam_plans_expert_parallelism():
    """GPT ties its embeddings: pipelined, the last stage holds a copy of the token embedding, which
    its memory counts; GLaM has neither pp nor cp, and its EP layouts (ep dividing dp_shard, with
    replicas or tp or neither) gather only their own experts and pay the all-to-all."""
    gpt = plan.plan("gpt-5b", plan.Hardware(16), seq_len=2048, global_batch=64)
    assert any(e.layout.tp > 1 for e in gpt.ranked)
    piped = [e for e in gpt.ranked if e.layout.pp > 1]
    assert piped
    counts = parameter_counts(gpt.workload.args)
    assert counts.tied == gpt.workload.args.vocab_size * gpt.workload.args.dim
    assert counts.ends(2) == max(counts.first, counts.last + counts.tied) > counts.last
    plan.check_overrides(gpt, piped[0])
    glam = plan.plan("glam-126m-64e", plan.Hardware(8), seq_len=2048, global_batch=256)
    assert all(e.layout.pp == e.layout.cp == 1 for e in glam.ranked)
    with_ep = [e for e in glam.ranked if e.layout.ep > 1]
    assert all(e.layout.dp_shard % e.layout.ep == 0 for e in with_ep)
    kinds = {(e.layout.ep < e.layout.dp_shard, e.layout.dp_replicate > 1, e.layout.tp > 1) for e in with_ep}
    assert {(False, False, False), (True, False, False), (False, True, False), (False, False, True)} <= kinds
    by_layout = {e.layout: e for e in glam.ranked}
    for e in with_ep:
        plain = by_layout[dataclasses.replace(e.layout, ep=1)]
        assert e.parts["ep"] > 0 and plain.parts["ep"] == 0
        if e.layout.ep < e.layout.dp_shard or e.layout.dp_replicate > 1:
            assert e.memory.working < plain.memory.working  # FSDP gathers E/ep experts, not E
        else:  # FSDP leaves them alone: no experts gathered, but every block's own experts cast for backward
            counts = parameter_counts(glam.workload.args)
            experts = counts.block_experts * glam.workload.args.n_layers
            assert e.memory.working - plain.memory.working == pytest.approx(
                2 * (experts / e.layout.ep - 2 * counts.block_experts))
        assert e.memory.weights == pytest.approx(plain.memory.weights)  # experts / (ep x dp_shard/ep), the rest / dp_shard
    for kind in kinds:
        plan.check_overrides(glam, next(e for e in with_ep if (e.layout.ep < e.layout.dp_shard, e.layout.dp_replicate > 1,
                                                               e.layout.tp > 1) == kind))


def test_tensor_parallelism_leaves_glams_experts_whole_in_compute_and_memory():
    """GLaM's TP plan (models/glam/sharding.py) keeps routers and experts whole: every TP rank runs
    all of its tokens through them. At tp 2 the expert and router GEMMs take a rank as long as at
    tp 1 while the dense ones take half; the fitted compute is the dense FLOPs / 2 plus all the
    expert FLOPs; and the memory estimate keeps the experts' bf16 copies and the MoE blocks'
    activations whole."""
    w = plan.workload("glam-126m-64e", seq_len=2048, global_batch=8)
    args = w.args
    rate = 100e12  # every GEMM at one rate: its time is its FLOPs / rate
    gemm = [{"op": op, "m": 4096, "k": 768, "n": 3072, "seconds": 2 * 4096 * 768 * 3072 / rate}
            for op in ("fwd", "dgrad", "wgrad")]
    table = calibration.Table({"format": calibration.FORMAT, "gemm": gemm, "attention": [], "elementwise": [],
                               "optimizer": [], "comm": []}, "flat")
    hw = table.apply(plan.Hardware(2))
    one, two = (plan.block_gemm_seconds(w, plan.Layout(1, tp, 1, 1, 1, 2, False), hw) for tp in (1, 2))
    for name, (fwd, bwd) in one.items():
        whole = name.startswith(("feed_forward.router", "feed_forward.experts"))
        assert two[name][0] == pytest.approx(fwd if whole else fwd / 2, rel=1e-9), name
        assert two[name][1] == pytest.approx(bwd if whole else bwd / 2, rel=1e-9), name

    # Fitted: tp 2 on 2 GPUs runs every token through all experts, and the (replicated, tied) output
    # layer, on each rank; tp 1 (FSDP 2) half the tokens on each. The experts', routers' and output
    # layer's FLOPs from the model's shape (models/glam/cost.py).
    M, d = args.n_moe_layers, args.dim
    experts = M * (args.top_k * 12 * d * args.expert_ffn_dim + 6 * d * args.n_experts) + 6 * args.vocab_size * d
    total = flops.flops_per_token(args, w.seq_len)
    fsdp2, tp2 = (plan.fitted_compute(w, plan.Layout(dp, tp, 1, 1, 1, 2, False), plan.Hardware(2))
                  for dp, tp in ((2, 1), (1, 2)))
    assert tp2 / fsdp2 == pytest.approx(((total - experts) / 2 + experts) / (total / 2), rel=1e-9)

    # Memory without FSDP (tp 2 on 2 GPUs): the experts' bf16 casts whole, the MoE blocks' activations
    # whole; the rest of the block matrices split; the tied output layer's copy whole (its plan
    # replicates the embedding).
    counts = parameter_counts(args)
    mem = {tp: estimate_memory(args, w.seq_len, 2, tp=tp, bf16=True, compiled=True, fused_cross_entropy=False)
           for tp in (1, 2)}
    split = args.n_layers * (counts.block_matrices - counts.block_experts)
    assert mem[1].working - mem[2].working == pytest.approx(2 * split / 2, rel=1e-9)
    # Whole on each rank too (no sequence parallelism): per block the residual input (fp32 under
    # autocast), the normalised inputs of wq/wk/wv and of a dense block's w1/w3, the norms' rstd; after
    # the blocks the final norm's tensors and the output's input gradient.
    tokens, a, r, L = 2 * w.seq_len, 2, 4, args.n_layers
    moe = 4 * d + 8 * args.n_experts + args.top_k * (2 * a * d + (a + 1) * args.expert_ffn_dim)  # compiled, per token
    whole = L * (r * d + a * d + 8) + M * moe + (L - M) * a * d
    head = (4 + r + a) * d
    assert mem[2].activations - mem[1].activations / 2 == pytest.approx((whole + head) * tokens / 2, rel=1e-9)


def test_hsdp_layouts_appear_and_hold_more_per_rank():
    """HSDP (dp_replicate x dp_shard): sharded within a replica, so more state per rank than FSDP over all."""
    p = plan.plan("llama3.1-8b", plan.Hardware(16, gpus_per_node=8), seq_len=8192, global_batch=64)
    hsdp = [e for e in p.ranked if e.layout.dp_replicate > 1]
    assert hsdp
    by_layout = {e.layout: e for e in p.ranked}
    e = hsdp[0]
    fsdp = by_layout.get(dataclasses.replace(e.layout, dp_replicate=1, dp_shard=e.layout.dp))
    if fsdp is not None:
        assert e.memory.optimizer > fsdp.memory.optimizer
    config = load_config(None, plan.check_overrides(p, e) + ["data.mock=true"])
    assert config.parallel.dp_replicate == e.layout.dp_replicate > 1


def test_fp8_rows_where_the_gpu_and_layout_allow_them():
    """On the H200 the 8B proxy's first choice is still micro batch 8 without activation checkpointing,
    now with FP8, its step within 10% of the measured FP8 ("FP8 everywhere") step; FP8 never with
    tensor parallelism, and never on a GPU without FP8 or for a model whose linears are too narrow."""
    p = plan.plan(_as_measured(plan.workload("llama3.1-8b", 8192, 16, 4)), H200_FP8)
    best = p.ranked[0].layout
    assert (best.micro_batch, best.activation_checkpointing, best.fp8) == (16, False, True)
    measured = _measured("compile+fp8-all")
    for e in p.ranked:
        if e.layout.fp8 and not e.layout.activation_checkpointing and e.layout.micro_batch in measured:
            row = measured[e.layout.micro_batch]
            assert e.step_s == pytest.approx(row["step_time_s"], rel=0.10)
            assert e.memory_gib == pytest.approx(row["peak_mem_gib"], rel=0.10)
    bf16 = {e.layout.micro_batch: e for e in p.ranked if not e.layout.fp8 and not e.layout.activation_checkpointing}
    fp8 = {e.layout.micro_batch: e for e in p.ranked if e.layout.fp8 and not e.layout.activation_checkpointing}
    assert fp8[8].memory.total < bf16[8].memory.total  # Float8Linear keeps no bf16 cast of its weight
    assert "train.fp8=tensorwise" in plan.check_overrides(p, p.ranked[0])
    multi = plan.plan("llama3.1-70b", plan.Hardware(32, fp8=True), seq_len=4096, global_batch=64)
    assert any(e.layout.fp8 for e in multi.ranked) and all(e.layout.tp == 1 for e in multi.ranked if e.layout.fp8)
    assert not any(e.layout.fp8 for e in plan.plan("llama3.1-8b", H200, seq_len=8192, global_batch=16, layers=4).ranked)
    narrow = plan.plan("gpt-126m", H200_FP8, seq_len=2048, global_batch=64)
    assert not any(e.layout.fp8 for e in narrow.ranked)  # width 768 < train.fp8_min_features: nothing converts


def test_fp8_experts_are_costed_in_fp8():
    """A MoE's grouped expert GEMMs (train.fp8_experts) count in the FP8 step by their active share
    (top_k of E experts per token), by the linears' width rule; not in the memory (their bf16 copy
    stays), and not with fp8_experts off."""
    from llamatron.parallel.memory import fp8_counts

    args = registry.get("glam-126m-64e").args
    f8 = fp8_counts(args, 768)
    per_block = args.n_moe_layers * args.top_k * 2 * args.dim * args.expert_ffn_dim / args.n_layers
    assert f8.expert_active_params == per_block
    assert f8.expert_names == {"feed_forward.experts.w1", "feed_forward.experts.w2"}
    assert fp8_counts(args, 1024).expert_active_params == 0  # 768 wide: below the default rule
    assert fp8_counts(args, 768, experts=False).expert_active_params == 0
    w = dataclasses.replace(plan.workload("glam-126m-64e", seq_len=2048, global_batch=32), fp8_min_features=768)
    lay = next(e.layout for e in plan.plan(w, H200_FP8).ranked if e.layout.fp8)
    on, off = plan.evaluate(w, lay, H200_FP8), plan.evaluate(dataclasses.replace(w, fp8_experts=False), lay, H200_FP8)
    assert on.step_s < off.step_s and on.memory_gib == off.memory_gib


def test_a_rowwise_config_plans_its_own_slower_fp8_and_keeps_its_recipe():
    """train.fp8=rowwise in the config: its FP8 layouts run the GEMMs at the rowwise speedup (slower
    than tensorwise's, faster than BF16), and the printed --set line keeps rowwise."""
    w = plan.workload("llama3.1-8b", seq_len=8192, global_batch=16, layers=4)
    lay = plan.Layout(1, 1, 1, 1, 1, 4, False, fp8=True)
    bf16 = plan.evaluate(w, dataclasses.replace(lay, fp8=False), H200_FP8).step_s
    tensorwise = plan.evaluate(dataclasses.replace(w, fp8="tensorwise"), lay, H200_FP8).step_s
    rowwise_w = dataclasses.replace(w, fp8="rowwise")
    assert tensorwise < plan.evaluate(rowwise_w, lay, H200_FP8).step_s < bf16
    p = plan.plan(rowwise_w, H200_FP8)
    assert p.ranked and all(e.layout.fp8 for e in p.ranked)
    assert "train.fp8=rowwise" in plan.check_overrides(p, p.ranked[0])


def test_fp8_option_pins_it(capsys):
    argv = ["plan", "--model", "llama3.1-8b", "--layers", "4", "--gpus", "1", "--gpu", "H200", "--global-batch", "16",
            "--top", "20"]
    for choice, expected in (("off", {"off"}), ("on", {"on"}), ("auto", {"on", "off"})):
        assert main([*argv, "--fp8", choice]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\d+ +1 GPU", line)]
        assert {r[5] for r in rows} == expected  # the fp8 column
    assert main(["plan", "--model", "llama3.1-8b", "--gpus", "8", "--gpu", "A100", "--fp8", "on"]) == 2
    assert "no FP8" in capsys.readouterr().err


def test_lora_config_plans_and_its_memory_drops_the_frozen_state():
    """The LoRA preset: the base is frozen (fp32 weights only), the adapters have gradients and AdamW
    state; fine-tuning data refuses pp and cp; tp is planned (LoRA runs under TP), FP8 (the frozen
    base layers' GEMMs) without it."""
    w = plan.workload_from_config("llama31-8b-boolq-lora")
    assert w.lora.rank == 32 and w.finetune and (w.seq_len, w.global_batch) == (4096, 16)
    p = plan.plan(w, plan.Hardware(8, memory_gib=139.0, fp8=True))
    assert p.ranked and all(e.layout.pp == e.layout.cp == 1 for e in p.ranked)
    assert any(e.layout.tp > 1 for e in p.ranked) and any(e.layout.fp8 for e in p.ranked)
    assert all(e.layout.tp == 1 for e in p.ranked if e.layout.fp8)
    sharded = plan.Layout(8, 1, 1, 1, 1, 2, False)
    assert plan.memory_of(w, sharded).total == plan.memory_of(w, dataclasses.replace(sharded, fp8=True)).total
    lay = plan.Layout(8, 1, 1, 1, 1, 2, False)
    lora, full = plan.memory_of(w, lay), plan.memory_of(dataclasses.replace(w, lora=None), lay)
    shapes, args = w.shapes, w.args
    adapters = 32 * sum(g.k + g.n for g in shapes.gemms) * args.n_layers  # rank x (in + out), every linear
    assert lora.gradients == pytest.approx(4 * adapters / 8) and lora.optimizer == pytest.approx(8 * adapters / 8)
    assert lora.weights == pytest.approx(full.weights + 4 * adapters / 8)
    assert lora.working == pytest.approx(full.working + 2 * 2 * adapters / args.n_layers)  # two gathered blocks, bf16
    # The frozen base's AdamW state is gone (and its gradients, which with one micro-batch per step
    # fill memory backward frees: not at the peak either way).
    assert full.reused == full.gradients and lora.gradients < full.gradients / 50
    assert full.total - lora.total > 0.9 * 8 * (parameter_counts(args).total - adapters) / 8
    assert lora.activations > full.activations  # the adapters' rank-wide hidden states
    full_step = plan.evaluate(dataclasses.replace(w, lora=None), lay, p.hardware)
    assert plan.evaluate(w, lay, p.hardware).parts["compute"] < full_step.parts["compute"]  # no frozen weight gradients


def test_8bit_adamw_in_the_config_plans_its_smaller_state(tmp_path):
    """optim.name = adamw8bit in a config: the planner's memory counts 2.03 bytes of moments per
    matrix parameter. On one H200 the full 8B at seq 4096 fits with AdamW only with every block
    checkpointed (measured: 125.9 GiB at micro batch 1, docs/performance.md); with 8-bit moments at
    micro batch 1 and 2, and without checkpointing too."""
    cfg = tmp_path / "sft8.toml"
    cfg.write_text('[model]\nsize = "llama3.1-8b"\n[data]\nseq_len = 4096\n[train]\nglobal_batch_size = 8\n'
                   '[optim]\nname = "adamw8bit"\n')
    w = plan.workload_from_config(str(cfg))
    assert w.optim == "adamw8bit"
    lay = plan.Layout(1, 1, 1, 1, 1, 1, True)
    eight, plain = plan.memory_of(w, lay), plan.memory_of(dataclasses.replace(w, optim="adamw"), lay)
    assert plain.optimizer - eight.optimizer == pytest.approx((8 - 2.03125) * 8.0e9, rel=0.01)
    assert plain.total - eight.total == pytest.approx(plain.optimizer - eight.optimizer)
    one_gpu = plan.plan(w, plan.Hardware(1, memory_gib=139.0, fp8=False))
    assert eight.total < one_gpu.hardware.margin * 139.0 * 2**30 < plain.total  # it fits where AdamW does not
    assert {e.layout.micro_batch for e in one_gpu.ranked} >= {1, 2}
    with_adamw = plan.plan(dataclasses.replace(w, optim="adamw"), one_gpu.hardware).ranked
    assert with_adamw and all(e.layout.activation_checkpointing for e in with_adamw)
    assert not all(e.layout.activation_checkpointing for e in one_gpu.ranked)


def test_nothing_fits_names_what_8bit_moments_make_fit(capsys):
    """The 8B's full training on one 100 GiB GPU: no layout fits with AdamW (16 bytes per parameter of
    state), so the answer says which fit with optim.name=adamw8bit, with their commands."""
    args = ["plan", "--model", "llama3.1-8b", "--gpus", "1", "--seq-len", "4096", "--global-batch", "8",
            "--gpu-memory-gib", "100", "--top", "1"]
    assert main(args) == 1  # what was asked does not fit
    out = capsys.readouterr().out
    first, _, second = out.partition("With optim.name=adamw8bit")
    assert "nothing fits" in first and "16 bytes each" in first
    assert second and "nothing fits" not in second
    assert "--set optim.name=adamw8bit" in second and "#1:" in second


def test_lora_on_one_gpu_plans_fp8_frozen_bases():
    """On one GPU (bf16 frozen weights) LoRA's base layers may run in FP8: two FP8 copies more per frozen
    weight, the same activations, and faster base GEMMs (forward and input gradient only)."""
    w = plan.workload_from_config("llama31-8b-boolq-lora")
    p = plan.plan(w, plan.Hardware(1, memory_gib=139.0, fp8=True))
    assert {e.layout.fp8 for e in p.ranked} == {False, True}
    bf16, fp8 = plan.Layout(1, 1, 1, 1, 1, 2, False), plan.Layout(1, 1, 1, 1, 1, 2, False, fp8=True)
    m16, m8 = plan.memory_of(w, bf16), plan.memory_of(w, fp8)
    converted = w.args.n_layers * w.fp8_layers().block_params
    assert m8.weights - m16.weights == pytest.approx(2 * converted) and m8.activations == m16.activations
    t16, t8 = plan.evaluate(w, bf16, p.hardware), plan.evaluate(w, fp8, p.hardware)
    assert t8.parts["compute"] < t16.parts["compute"]
    assert not w.fp8_output  # the frozen output layer stays bf16 in the fused loss


# --------------------------------------------------------------------------------------------------
# Document masking (packed fine-tuning batches)


def _attention_table(rate: float) -> calibration.Table:
    """A table whose causal attention runs at `rate` "formula" FLOP/s (4 b h s^2 d), backward twice the
    forward, at every size."""
    rows = [{"batch": 1, "heads": 32, "seq": seq, "head_dim": 128, "mask": "causal",
             "fwd_seconds": 4.0 * 32 * seq * seq * 128 / rate, "bwd_seconds": 8.0 * 32 * seq * seq * 128 / rate}
            for seq in (1024, 4096)]
    return calibration.Table({"format": calibration.FORMAT, "attention": rows,
                              "gemm": [{"op": op, "m": 4096, "k": 4096, "n": 4096, "seconds": 2 * 4096**3 / 600e12}
                                       for op in calibration.GEMM_OPS],
                              "elementwise": [{"op": "add", "bytes": 3 << 30, "seconds": (3 << 30) / 4e12}],
                              "optimizer": [{"params": 1e9, "seconds": 1e-2}], "comm": []}, "rate")


@pytest.mark.parametrize("calibrated", [False, True])
def test_one_document_per_sequence_is_the_causal_estimate(calibrated):
    """Document masking over documents as long as the sequence changes nothing, in either model."""
    w = plan.workload("llama3.1-8b", seq_len=4096, global_batch=8, layers=4)
    hw = _attention_table(500e12).apply(H200) if calibrated else H200
    for lay in (plan.Layout(1, 1, 1, 1, 1, 2, False), plan.Layout(1, 1, 1, 1, 1, 1, True)):
        assert plan.evaluate(plan.with_documents(w, 4096), lay, hw) == plan.evaluate(w, lay, hw)


def test_shorter_documents_cost_their_share_of_attention():
    """Documents of 1,024 tokens in sequences of 4,096 leave sum(len^2) / seq^2 = 4 x 1024^2 / 4096^2 = 1/4
    of causal attention. Calibrated, at 500 TFLOP/s: one sequence's attention in one 8B block is
    4 x 32 heads x 4096^2 x 128 = 2.749e11 FLOP, 0.550 ms forward and 1.100 ms backward; 3/4 of those
    1.649 ms, in 4 blocks, 8 micro-batches, is 39.58 ms saved (micro 1, no recomputation). Fitted: 3/4
    of the attention term 12 x L x d x seq = 12 x 4 x 4096 x 4096 = 8.053e8 FLOP per token, 6.040e8, over 8 x 4096
    tokens at 989 TFLOP/s x eff(4096) = 0.6475 x 4096 / 4896 = 0.5417, is 36.93 ms. The reported MFU
    keeps the spec's FLOPs, so MFU x step is unchanged."""
    w = plan.workload("llama3.1-8b", seq_len=4096, global_batch=8, layers=4)
    short = plan.with_documents(w, 1024)
    assert short.attention_share == 0.25
    lay = plan.Layout(1, 1, 1, 1, 1, 1, False)
    for hw, saved in ((_attention_table(500e12).apply(H200), 39.58e-3), (H200, 36.93e-3)):
        full, docs = plan.evaluate(w, lay, hw), plan.evaluate(short, lay, hw)
        assert full.parts["compute"] - docs.parts["compute"] == pytest.approx(saved, rel=1e-3)
        assert docs.mfu * docs.step_s == pytest.approx(full.mfu * full.step_s, rel=1e-12)


def test_document_tokens_option(capsys):
    argv = ["plan", "--model", "llama3.1-8b", "--layers", "4", "--gpus", "1", "--gpu", "H200", "--seq-len", "4096",
            "--global-batch", "8"]
    assert main([*argv, "--document-tokens", "1285"]) == 0
    assert "attention within documents of 1,285 positions" in capsys.readouterr().out
    assert main([*argv, "--document-tokens", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--document-tokens 5000: must be between 1 and the sequence length 4096" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Calibration


@pytest.fixture(scope="module")
def cpu_table(tmp_path_factory):
    """`llamatron plan --calibrate --quick` on this machine's CPU."""
    out = tmp_path_factory.mktemp("calibration") / "cpu.json"
    assert main(["plan", "--calibrate", "--quick", "--model", "debug", "--out", str(out)]) == 0
    return out


def test_calibrate_on_cpu_writes_the_table_the_planner_needs(cpu_table):
    table = json.loads(cpu_table.read_text())
    assert table["format"] == calibration.FORMAT and table["device_type"] == "cpu" and table["dtype"] == "float32"
    assert table["torch"] == torch.__version__ and table["date"][:2] == "20" and table["comm"] == []
    assert (table["warmup"], table["repeats"], table["models"]) == (measure.WARMUP, measure.REPEATS, ["debug"])
    args = registry.get("debug").args
    shapes = registry.get("debug").family.shapes(args)
    wanted = {(g.k, g.n) for g in shapes.gemms} | {(args.dim, args.vocab_size)}
    for op in ("fwd", "dgrad", "wgrad"):
        rows = [r for r in table["gemm"] if r["op"] == op]
        assert {(r["k"], r["n"]) for r in rows} == wanted and {r["m"] for r in rows} == set(measure.QUICK_ROWS)
    assert all(r["seconds"] > 0 for r in table["gemm"])
    assert {(r["heads"], r["head_dim"], r["mask"]) for r in table["attention"]} == {(4, 16, "causal")}
    assert {(r["batch"] * r["seq"], r["seq"]) for r in table["attention"]} == {
        (tokens, seq) for tokens in measure.QUICK_ATTENTION_TOKENS for seq in measure.QUICK_SEQS}
    assert all(r["fwd_seconds"] > 0 and r["bwd_seconds"] > 0 for r in table["attention"])
    assert {r["op"] for r in table["elementwise"]} == {"copy", "add"} and table["optimizer"][0]["params"] > 0
    t = calibration.load(cpu_table)
    for r in table["gemm"][:6]:  # a measured shape is read back as measured
        assert t.gemm(r["op"], r["m"], r["k"], r["n"]) == pytest.approx(r["seconds"])


def test_calibration_times_glams_biased_attention_as_the_model_trains_it(tmp_path):
    """GLaM's attention rows time what its blocks run: the flex path (CUDA's) computes the SDPA
    reference's output (forward on the CPU: flex has no CPU backward), the reference's gradient reaches
    the bias table, and a quick calibration of glam-debug writes its bias rows after the GEMMs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 160, 16, requires_grad=True) for _ in range(3))
    flex, table_f = measure._biased_attention(q.detach(), k.detach(), v.detach(), flex=True)
    sdpa, table_s = measure._biased_attention(q, k, v, flex=False)
    table_s.data.copy_(table_f.data)
    torch.testing.assert_close(flex(), sdpa(), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(sdpa().square().sum(), table_s)
    assert grad.abs().sum() > 0 and grad.shape == (32, 4)
    out = tmp_path / "glam.json"
    assert main(["plan", "--calibrate", "--quick", "--model", "glam-debug", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["attention"]
    assert {r["mask"] for r in rows} == {"bias"} and all(r["bwd_seconds"] > 0 for r in rows)
    assert {r["kernel"] for r in rows} == {"sdpa"}  # the CPU's way, named in each row
    assert len(rows) == len(measure.QUICK_SEQS) * len(measure.QUICK_ATTENTION_TOKENS)


def test_calibration_begins_no_biased_attention_compile_it_has_no_time_for():
    """On CUDA each biased attention shape compiles first (tens of seconds): with less than
    BIAS_COMPILE_S of the budget left none is begun (a run killed past its budget loses the whole
    table), and what is left out counts as skipped."""
    clock = measure.Clock(torch.device("cuda"), budget_s=measure.BIAS_COMPILE_S - 1)
    assert measure._measure_all_attention(clock, torch.bfloat16, ["glam-126m-64e"], False, 1e12, biased=True) == []
    assert clock.skipped == len(glam_attention.KERNELS) * len(measure.BIAS_TOKENS) * len(measure.BIAS_SEQS)


def test_calibration_holds_the_gpu_only_while_the_host_queues_a_host_bound_window():
    """A call the host launches about as slowly as the GPU runs it gets the GPU held for 1.5 times the
    window's launch time (capped), so the window times its kernels; a GPU-bound call none, so its
    windows stay back to back at the step's sustained rate."""
    assert measure.hold_seconds(2.4e-3, 1.5e-3, 3) == pytest.approx(1.5 * 2.4e-3 * 3)  # GLaM's batch-8 attention
    assert measure.hold_seconds(12e-6, 20e-6, 250) == pytest.approx(1.5 * 12e-6 * 250)  # the shortest GEMMs
    assert measure.hold_seconds(15e-6, 1.2e-3, 4) == 0.0  # a large GEMM: the host is far ahead
    assert measure.hold_seconds(1.0, 1.5, 1000) == measure.HOLD_MAX_S


def test_calibration_times_every_glam_kernel_the_default_first_and_the_plan_reads_the_runs_own(monkeypatch):
    """On CUDA the biased shapes are timed with each kernel GLaM's blocks can run (the default first:
    a short budget keeps its rows), each row naming its kernel, the default restored after; a plan
    reads the rows of the kernel its blocks run, and a kernel the table did not time is planned with
    the default's rows and said so under the plan."""
    asked = []

    def fake(clock, dtype, shapes, seqs, calls, limit):
        asked.append((glam_attention.KERNEL, calls[0]))
        return [{"batch": calls[0] // seqs[0], "heads": 12, "seq": seqs[0], "head_dim": 64, "mask": "bias",
                 "fwd_seconds": 1e-3, "bwd_seconds": 2e-3}]

    monkeypatch.setattr(measure, "measure_attention", fake)
    monkeypatch.setattr(glam_attention, "KERNEL", "split")
    rows = measure._measure_all_attention(measure.Clock(torch.device("cuda"), budget_s=1e4), torch.bfloat16,
                                          ["glam-126m-64e"], False, 1e12, biased=True)
    assert [k for k, _ in asked[::len(measure.BIAS_TOKENS)]] == ["split", "flex", "split_cudnn", "split_triton"]
    assert [r["kernel"] for r in rows] == [k for k, _ in asked] and glam_attention.KERNEL == "split"
    # A table whose flex rows are twice split_triton's: each kernel's plan reads its own; split, which it
    # did not time, is planned from split_triton's rows times the shipped h100.json's split / split_triton.
    data = json.loads((Path(calibration.__file__).parent / "h100.json").read_text())
    bias = [r for r in data["attention"] if r["mask"] == "bias" and r["kernel"] == "split_triton"]
    flex = [{**r, "kernel": "flex", "fwd_seconds": 2 * r["fwd_seconds"], "bwd_seconds": 2 * r["bwd_seconds"]}
            for r in bias]
    data["attention"] = [r for r in data["attention"] if r["mask"] != "bias"] + bias + flex
    hw = plan.Hardware(1, memory_gib=80.0)
    steps, notes = {}, {}
    for kernel in ("split_triton", "flex", "split"):
        monkeypatch.setattr(glam_attention, "KERNEL", kernel)
        p = plan.plan("glam-126m-64e", calibration.Table(data, "two.json").apply(hw), 2048, 128)
        steps[kernel], notes[kernel] = p.ranked[0].step_s, plan.render(p)
    assert steps["flex"] > steps["split"] > steps["split_triton"]
    assert "note:" not in notes["split_triton"] + notes["flex"]
    assert ("two.json timed GLaM's biased attention as flex, split_triton; its blocks now run split on CUDA, planned "
            "from split_triton's rows times h100.json's split / split_triton ratio") in notes["split"]
    table = calibration.Table(data, "two.json")
    shipped = calibration.default_table("H100")
    call = (16, 12, 2048, 2048, 64, "bias")
    ratio = [s / t for s, t in zip(shipped.attention(*call, "split"), shipped.attention(*call, "split_triton"))]
    assert list(table.attention(*call, "split")) == pytest.approx(
        [t * r for t, r in zip(table.attention(*call, "split_triton"), ratio)], rel=1e-12)


def test_calibration_leaves_the_biased_attention_its_time_and_the_plan_says_when_a_table_lacks_it(monkeypatch):
    """The GEMM sweep stops early enough for GLaM's compiled biased shapes (a 65 s run on an H200 on
    2026-12-06 spent it all on GEMMs), at most half the budget; and a table without rows of the
    attention a model needs plans it at causal speed and says so under the plan (a kernel it has no
    rows of: the previous test)."""
    assert measure.bias_reserve(["glam-126m-64e"], False, True, 300.0) == measure.BIAS_COMPILE_S * len(measure.BIAS_TOKENS)
    assert measure.bias_reserve(["llama3.1-8b", "glam-126m-64e"], False, True, 60.0) == 30.0
    assert measure.bias_reserve(["llama3.1-8b", "gpt-126m"], False, True, 140.0) == 0.0
    assert measure.bias_reserve(["glam-126m-64e"], False, False, 140.0) == 0.0  # the CPU compiles none
    data = json.loads((Path(calibration.__file__).parent / "h100.json").read_text())
    hw = plan.Hardware(1, memory_gib=80.0)
    with_bias = plan.render(plan.plan("glam-126m-64e", calibration.Table(data, "h100.json").apply(hw), 2048, 128))
    data["attention"] = [r for r in data["attention"] if r["mask"] != "bias"]
    without = plan.plan("glam-126m-64e", calibration.Table(data, "cut.json").apply(hw), 2048, 128)
    assert "note: cut.json has no bias attention timings" in plan.render(without)
    assert "attention timings" not in with_bias
    # The shipped H100 table timed every kernel the blocks can run: no plan of any says it lacks rows.
    for kernel in glam_attention.KERNELS:
        monkeypatch.setattr(glam_attention, "KERNEL", kernel)
        again = plan.render(plan.plan("glam-126m-64e", calibration.Table(
            json.loads((Path(calibration.__file__).parent / "h100.json").read_text()), "h100.json").apply(hw), 2048, 128))
        assert "note:" not in again, kernel
    llama = plan.plan("llama3.1-8b", calibration.Table(data, "cut.json").apply(hw), 8192, 16, layers=4)
    assert "note:" not in plan.render(llama)


def test_calibration_times_the_experts_batched_gemm_and_the_planner_costs_them_by_it(tmp_path):
    """A MoE model's table has its experts' products as one batched GEMM over E experts (what the
    capacity path runs), read back as measured; the planner's expert time follows those rows, and a
    table without them (the shipped ones before) costs E separate GEMMs as before."""
    out = tmp_path / "glam.json"
    assert main(["plan", "--calibrate", "--quick", "--model", "glam-debug", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    args = registry.get("glam-debug").args
    wanted = {(args.n_experts, args.dim, args.expert_ffn_dim), (args.n_experts, args.expert_ffn_dim, args.dim)}
    assert {(r["groups"], r["k"], r["n"]) for r in data["grouped"]} == wanted
    assert {(r["op"], r["m"]) for r in data["grouped"]} == {
        (op, m) for op in calibration.GEMM_OPS for m in measure.QUICK_GROUP_ROWS}
    table = calibration.load(out)
    for r in data["grouped"]:
        assert table.grouped(r["op"], r["groups"], r["m"], r["k"], r["n"]) == pytest.approx(r["seconds"])
    w = plan.workload("glam-debug", seq_len=128, global_batch=8)
    lay = plan.Layout(1, 1, 1, 1, 1, 2, False)

    def experts_ms(grouped_scale: float | None) -> float:
        d = {key: rows for key, rows in data.items() if key != "grouped"}
        if grouped_scale is not None:
            d["grouped"] = [dict(r, seconds=r["seconds"] * grouped_scale) for r in data["grouped"]]
        seconds = plan.block_gemm_seconds(w, lay, calibration.Table(d).apply(plan.Hardware(1)))
        return sum(sum(seconds[name]) for name in ("feed_forward.experts.w1", "feed_forward.experts.w2"))

    assert experts_ms(2.0) == pytest.approx(2 * experts_ms(1.0), rel=1e-9)
    rows = 2 * 128 * args.top_k // args.n_experts
    products = [(args.dim, args.expert_ffn_dim), (args.expert_ffn_dim, args.dim)]  # w1, w2 (equal in glam-debug)
    separate = sum(args.n_experts * table.gemm(op, rows, k, n) for k, n in products for op in calibration.GEMM_OPS)
    assert experts_ms(None) == pytest.approx(separate * w.shapes.gemms[-1].share, rel=1e-9)


def test_the_planner_computes_from_the_table(cpu_table, tmp_path, capsys):
    """Compute time is linear in the table's GEMM and attention timings: doubling them adds the
    same again; without a table the fitted model answers something else."""
    table = json.loads(cpu_table.read_text())
    w = plan.workload("debug", seq_len=256, global_batch=16)
    lay = plan.Layout(1, 1, 1, 1, 1, 4, False)

    def compute(gemm: float = 1.0, attention: float = 1.0) -> float:
        scaled = dict(table, gemm=[dict(r, seconds=r["seconds"] * gemm) for r in table["gemm"]],
                      attention=[dict(r, fwd_seconds=r["fwd_seconds"] * attention, bwd_seconds=r["bwd_seconds"] * attention)
                                 for r in table["attention"]])
        return plan.step_time(w, lay, calibration.Table(scaled).apply(plan.Hardware(1)))["compute"]

    one = compute()
    assert compute(gemm=2) - one == pytest.approx(compute(gemm=3) - compute(gemm=2), rel=1e-9)
    assert compute(gemm=2) > one and compute(attention=2) > one
    assert one != pytest.approx(plan.step_time(w, lay, plan.Hardware(1))["compute"], rel=1e-3)
    assert main(["plan", "--model", "debug", "--gpus", "1", "--seq-len", "256", "--global-batch", "16",
                 "--calibration", str(cpu_table)]) == 0
    assert f"compute from calibration {cpu_table.name} (cpu, torch {torch.__version__}" in capsys.readouterr().out


def test_a_shipped_table_is_the_default_for_its_gpu_kind(cpu_table, tmp_path, monkeypatch, capsys):
    (tmp_path / "b200.json").write_text(cpu_table.read_text())
    monkeypatch.setattr(calibration, "DIR", tmp_path)
    argv = ["plan", "--model", "debug", "--gpus", "1", "--seq-len", "256", "--global-batch", "16"]
    assert main([*argv, "--gpu", "NVIDIA B200"]) == 0
    assert "compute from calibration b200.json (cpu" in capsys.readouterr().out
    assert main([*argv, "--gpu", "H100"]) == 0
    assert "compute from the fitted model (no calibration table)" in capsys.readouterr().out


def test_calibrated_model_with_the_h200_profile_rates_gives_the_measured_steps():
    """A table holding what docs/performance.md's H200 profile measured inside the step (block and output
    GEMMs at 698 TFLOP/s, attention at 780 "formula" TFLOP/s split 64:199 ms forward:backward, 4.3 TB/s,
    AdamW 22.4 ms for 1.92B parameters) gives the measured steps of the 8B proxy within 5%, micro batch 8
    before 4 as measured, and first the largest micro batch that fits (16, as the fitted model): the
    calibrated model's structure, apart from what a run of --calibrate measures."""
    shapes = measure.gemm_shapes(["llama3.1-8b"], quick=False)
    gemm = [{"op": op, "m": m, "k": k, "n": n, "seconds": 2 * m * k * n / 698e12}
            for m in measure.ROWS for k, n in shapes for op in ("fwd", "dgrad", "wgrad")]
    attention = []
    for seq in measure.SEQS:
        batch = 8192 // seq
        total = 3 * 4 * batch * 32 * seq * seq * 128 / 780e12  # forward + backward at the formula rate
        attention.append({"batch": batch, "heads": 32, "seq": seq, "head_dim": 128, "mask": "causal",
                          "fwd_seconds": total * 64 / 263, "bwd_seconds": total * 199 / 263})
    table = calibration.Table({"format": calibration.FORMAT, "gemm": gemm, "attention": attention,
                               "elementwise": [{"op": "add", "bytes": 3 << 30, "seconds": (3 << 30) / 4.3e12}],
                               "optimizer": [{"params": 1.92e9, "seconds": 22.4e-3}], "comm": []}, "profile")
    p = plan.plan("llama3.1-8b", table.apply(H200), seq_len=8192, global_batch=16, layers=4)
    assert (p.ranked[0].layout.micro_batch, p.ranked[0].layout.activation_checkpointing) == (16, False)
    steps = {e.layout.micro_batch: e.step_s for e in p.ranked if not e.layout.activation_checkpointing}
    assert steps[16] < steps[8] < steps[4]
    for micro, row in _measured("compile+cudnn").items():
        assert steps[micro] == pytest.approx(row["step_time_s"], rel=0.05)


def _attention_rows(seconds, tokens: int, heads: int = 12, head_dim: int = 64) -> list[dict]:
    """Causal SDPA rows at measure.SEQS with `tokens` rows a call, forward seconds(batch, seq) and
    backward twice that."""
    rows = []
    for seq in measure.SEQS:
        batch = tokens // seq
        rows.append({"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "mask": "causal",
                     "fwd_seconds": seconds(batch, seq), "bwd_seconds": 2 * seconds(batch, seq)})
    return rows


def test_attention_is_read_at_the_size_of_the_call():
    """Small calls measured at a floor (the launch time of h200.json's GPT rows: 0.14 ms whatever the work)
    and large ones at a kernel rate: a call of the large size is costed at the large rate, a small one
    as measured, one between them in between; a table measured at one size gives every call that
    size's rate (the tables before windowed attention timings)."""
    rate = 600e12  # a 4 x 12 x 2048 call: 86 us of kernel
    kernel = lambda batch, seq: 4.0 * batch * 12 * seq * seq * 64 / rate  # noqa: E731
    floored = _attention_rows(lambda batch, seq: max(0.14e-3, kernel(batch, seq)), 8192)
    rows = floored + _attention_rows(kernel, 131072)
    base = {"format": calibration.FORMAT, "gemm": [{"op": op, "m": 8192, "k": 768, "n": 768, "seconds": 1e-5}
                                                   for op in calibration.GEMM_OPS],
            "elementwise": [{"op": "add", "bytes": 3 << 30, "seconds": 1e-3}],
            "optimizer": [{"params": 1e6, "seconds": 1e-5}], "comm": []}
    table, old = calibration.Table(dict(base, attention=rows)), calibration.Table(dict(base, attention=floored))
    fwd, bwd = table.attention(64, 12, 2048, 2048, 64, "causal")  # 131,072 rows: measured at the kernel rate
    assert (fwd, bwd) == pytest.approx((kernel(64, 2048), 2 * kernel(64, 2048)))
    assert table.attention(4, 12, 2048, 2048, 64, "causal")[0] == pytest.approx(0.14e-3)  # 8,192: as measured
    middle = table.attention(16, 12, 2048, 2048, 64, "causal")[0]
    assert kernel(16, 2048) < middle < 4 * 0.14e-3
    assert old.attention(16, 12, 2048, 2048, 64, "causal")[0] == pytest.approx(4 * 0.14e-3)
    w = plan.workload("gpt-126m", seq_len=2048, global_batch=64)
    lay = plan.Layout(1, 1, 1, 1, 1, 32, False)
    steps = [plan.step_time(w, lay, t.apply(H200))["compute"] for t in (table, old)]
    assert steps[0] < steps[1]


@pytest.mark.slow
def test_calibrate_under_torchrun_measures_collectives(tmp_path):
    """Two CPU processes (gloo): all-gather, reduce-scatter, all-to-all and ring send/receive at the quick
    sizes, which the planner turns into its bandwidths and latency."""
    out = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llamatron",
           "plan", "--calibrate", "--quick", "--model", "debug", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["world_size"] == 2
    assert {(r["op"], r["bytes"]) for r in table["comm"]} == {
        (op, size) for op in ("all_gather", "reduce_scatter", "all_to_all", "p2p") for size in measure.QUICK_COMM_BYTES}
    hw = calibration.load(out).apply(plan.Hardware(2))
    links = [calibration.load(out).link(op) for op in ("all_gather", "reduce_scatter")]
    assert hw.intra_node_bw == pytest.approx(sum(x.bandwidth for x in links) / 2) and hw.intra_node_bw != 300e9
    assert hw.a2a_bw > 0 and hw.p2p_bw > 0


# --------------------------------------------------------------------------------------------------
# The memory estimate against measured peaks


class PeakBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active: every storage an operator returns
    is counted from then until it is freed (a weakref finalizer), each once however many views share it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.finalize] = {}
        self.now = self.peak = 0

    def _free(self, key: int, size: int) -> None:
        self.live.pop(key, None)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.live:
                    size = storage.nbytes()
                    self.live[id(storage)] = weakref.finalize(storage, self._free, id(storage), size)
                    self.now += size
                    self.peak = max(self.peak, self.now)
        return out


LLAMA = ["model.size=debug", "model.dim=192", "model.n_layers=3", "model.ffn_dim=512", "model.vocab_size=512"]
GPT = ["model.size=gpt-debug", "model.dim=192", "model.n_layers=3", "model.ffn_dim=768", "model.vocab_size=512",
       "model.n_positions=128"]
GLAM = ["model.size=glam-debug", "model.dim=192", "model.n_layers=3", "model.ffn_dim=512", "model.expert_ffn_dim=192",
        "model.vocab_size=512"]


@pytest.mark.parametrize("sets", [LLAMA, GPT, GLAM, LLAMA + ["train.activation_checkpointing=true"],
                                  LLAMA + ["lora.rank=8"]], ids=["llama", "gpt", "glam-moe", "llama-ac", "llama-lora"])
def test_memory_estimate_within_15_percent_of_the_measured_peak(sets):
    """Two optimizer steps of two micro-batches (gradients accumulate, AdamW's state exists) through the
    trainer's own layout, optimizer and step, fp32 on the CPU, every storage counted while they run."""
    seq, micro, accum = 128, 2, 2
    cfg = load_config(None, ["data.mock=true", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                             f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * accum}", *sets])
    family, args = resolve_model(cfg.model)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, args.vocab_size, (micro, seq), generator=gen) for _ in range(2)) for _ in range(accum)]
    with PeakBytes() as peak:
        layout = Layout.build(family, args, cfg.train, ParallelDims(), cpu, None, accum, lora=cfg.lora)
        optimizer = build_optimizer(layout.model, cfg.optim, "cpu")
        for _ in range(2):
            train_step(layout, optimizer, batches, accum, lr=1e-3, device=cpu)
    est = estimate_memory(args, seq, micro, n_microbatches=accum, bf16=False, lora=cfg.lora if cfg.lora.rank else None,
                          activation_checkpointing=cfg.train.activation_checkpointing)
    assert est.total == pytest.approx(peak.peak, rel=0.15), est.describe()


@pytest.fixture
def fake_two_ranks():
    """A process group of two ranks in this process whose collectives do nothing (torch's fake
    backend): enough to build rank 0's tensor-parallel shards and run its forward for their shapes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("sets", [LLAMA, GPT, GLAM], ids=["llama", "gpt", "glam-moe"])
def test_tensor_parallel_rank_holds_and_saves_what_the_estimate_counts(sets, amp, fake_two_ranks):
    """Rank 0 of TP 2, built by the family's own plan: its parameter bytes equal the estimate's
    weights within 1% (GPT's position embedding and GLaM's tied embedding whole on every rank, the
    rest split), and what its forward keeps for backward is counted as closely as without TP (the
    inputs of the column-parallel linears, gathered along the sequence or never split, are whole on
    every rank). With the fp32 residual stream: eager, a bf16 one (the default) keeps a mix of bf16 and of
    the norms' fp32 upcasts that the estimate counts within 15% but not as evenly across ranks."""
    seq, micro = 32, 8
    cfg, family, args, tokens, labels = _small_run([*sets, "train.bf16_residual=false"], seq, micro, accum=1)
    ratios = []
    for tp in (1, 2):
        dims = ParallelDims.from_config(ParallelConfig(tp=tp), 2 if tp > 1 else 1)
        if tp > 1:
            dims.build_mesh("cpu")
        layout = Layout.build(family, args, cfg.train, dims, torch.device("cpu"), None, 1)
        est = estimate_memory(args, seq, micro, tp=tp, bf16=amp is not None, fsdp=False, fused_cross_entropy=False,
                              bf16_residual=cfg.train.bf16_residual)
        held = sum(_local(p).numel() * 4 for p in layout.model.parameters())
        assert est.weights == pytest.approx(held, rel=0.01), tp
        ratios.append(est.saved / _saved_bytes(layout, tokens, labels, amp, fused=False))
    assert ratios[1] == pytest.approx(ratios[0], abs=0.05) and 0.85 < ratios[1] < 1.15, ratios


@pytest.mark.parametrize("sets, parallel", [
    (LLAMA, {"dp_shard": 2}), (LLAMA, {"cp": 2}), (LLAMA, {"pp": 2}), (GPT, {"pp": 2}), (GLAM, {"dp_shard": 2}),
    (GLAM, {"dp_shard": 2, "ep": 2})], ids=["llama-fsdp", "llama-cp", "llama-pp", "gpt-pp", "glam-fsdp", "glam-ep"])
def test_every_parallel_dimension_holds_the_estimated_parameters_per_rank(sets, parallel, fake_two_ranks):
    """Rank 0 of two, laid out by the trainer's own `Layout.build` (FSDP shards, CP's whole copy, the
    first pipeline stage, expert parallelism's half of the experts): the parameter bytes it holds are
    the estimate's weights, exactly."""
    cfg = load_config(None, ["data.mock=true", "data.seq_len=32", "model.max_seq_len=32", "model.n_layers=4",
                             "train.micro_batch_size=2", "train.global_batch_size=4", *sets])
    family, args = resolve_model(cfg.model)
    dims = ParallelDims.from_config(ParallelConfig(**parallel), 2)
    dims.build_mesh("cpu")
    layout = Layout.build(family, args, cfg.train, dims, torch.device("cpu"), None, 2)
    held = sum(_local(p).numel() * 4 for part in layout.parts for p in part.parameters())
    est = estimate_memory(args, 32, 2, dp_shard=dims.dp_shard, cp=dims.cp, pp=dims.pp, ep=dims.ep, n_microbatches=2,
                          bf16=False, fsdp=dims.fsdp_enabled)
    assert est.weights == pytest.approx(held, rel=1e-3)
    assert held < sum(p.numel() * 4 for p in family.build(args).parameters())  # really split (CP: FSDP over cp)


@pytest.mark.parametrize("sets", [LLAMA, GPT], ids=["llama", "gpt"])
def test_context_parallel_rank_keeps_the_whole_sequences_keys_and_values(sets, fake_two_ranks):
    """Rank 0 of CP 2 (torch's ring attention, all-gather rotation) keeps, per block, K and V of the
    whole sequence for backward; the estimate counts the other rank's half of them on top of the
    family's count for its own tokens."""
    from llamatron.models.family import Saving
    from llamatron.parallel import memory

    seq, micro, cp = 32, 8, 2
    cfg, family, args, tokens, labels = _small_run(sets, seq, micro, accum=2)
    dims = ParallelDims.from_config(ParallelConfig(cp=cp), cp)
    dims.build_mesh("cpu")
    layout = Layout.build(family, args, cfg.train, dims, torch.device("cpu"), None, 2)
    shapes = family.shapes(args)
    whole = (micro, shapes.heads, seq, shapes.head_dim)  # K and V as SDPA gets them here (expanded on the CPU)
    kept = _saved_bytes(layout, tokens, labels, None, fused=False, keep=lambda t: tuple(t.shape) == whole)
    assert kept == 2 * args.n_layers * math.prod(whole) * 4
    counts, saving = parameter_counts(args), Saving(seq_len=seq // cp, micro_batch=micro)
    extra = (memory._per_token(args, counts, None, 4, 4, saving, cp) - memory._per_token(args, counts, None, 4, 4, saving))
    assert extra * args.n_layers * micro * seq // cp == kept * (cp - 1) / cp


def test_fsdp_rank_keeps_one_process_activations_and_the_weights_it_does_not_reshard(fake_two_ranks):
    """Rank 0 of FSDP 2 keeps what one process keeps for backward, plus the gathered weights of the
    units FSDP does not reshard after the forward (the last block's, the root's output layer and
    final norm): the estimate has the first as activations and the second in its working copies
    (two blocks in flight, the output copy)."""
    seq, micro = 32, 8
    cfg, family, args, tokens, labels = _small_run(LLAMA, seq, micro, accum=2)
    saved, est = {}, {}
    for name, world in (("one", 1), ("fsdp", 2)):
        dims = ParallelDims.from_config(ParallelConfig(dp_shard=world), world)
        if world > 1:
            dims.build_mesh("cpu")
        layout = Layout.build(family, args, cfg.train, dims, torch.device("cpu"), None, 2)
        saved[name] = _saved_bytes(layout, tokens, labels, None, fused=False)
        est[name] = estimate_memory(args, seq, micro, dp_shard=world, n_microbatches=2, bf16=False,
                                    fused_cross_entropy=False)
    model = family.build(args)
    unresharded = sum(p.numel() * 4 for p in [*model.layers[str(args.n_layers - 1)].parameters(),
                                                 model.output.weight, model.norm.weight])
    assert saved["fsdp"] - saved["one"] == unresharded
    assert est["fsdp"].activations == est["one"].activations and est["fsdp"].working >= unresharded


def _small_run(sets, seq: int, micro: int, accum: int):
    """(config, family, args, tokens, labels) of a small CPU run: `accum` micro-batches of `micro`."""
    cfg = load_config(None, ["data.mock=true", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                             f"train.micro_batch_size={micro}", f"train.global_batch_size={accum * micro}", *sets])
    family, args = resolve_model(cfg.model)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, args.vocab_size, (micro, seq), generator=gen) for _ in range(2))
    return cfg, family, args, tokens, labels


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


# What autograd keeps from a forward for its backward, against the estimate's count of it. Compiled
# blocks use inductor's partitioner without its code generation (llamatron/testing/compiled.py): the
# partitioner alone decides what is saved, and a case takes seconds instead of a CPU inductor build's
# minute. bf16 is CPU autocast over fp32 weights, as on a GPU; fp32 is the CPU trainer's precision.
FP8 = ["train.fp8=tensorwise", "train.fp8_min_features=16"]
SHORT = ["data.seq_len=32", "model.max_seq_len=32", "train.micro_batch_size=8", "train.global_batch_size=8"]
SAVED = {  # case: (overrides, K/V path, autocast dtype, compiled)
    "llama-fp32": (LLAMA, "expand", None, True),
    "llama-bf16-native-gqa": (LLAMA, "native", torch.bfloat16, True),
    "gpt-bf16": (GPT, "expand", torch.bfloat16, True),
    # A short sequence: the CPU's attention with a bias keeps the S x S probabilities, CUDA's kernels do not.
    "glam-moe-bf16": (GLAM + SHORT, "expand", torch.bfloat16, True),
    "llama-fp8-bf16": (LLAMA + FP8, "expand", torch.bfloat16, True),
    "llama-lora-bf16": (LLAMA + ["lora.rank=8"], "expand", torch.bfloat16, True),
    "llama-lora-fp8": (LLAMA + ["lora.rank=8", "train.fp8=tensorwise", "train.fp8_min_features=16"], "expand",
                       torch.bfloat16, True),
    "llama-bf16-eager": (LLAMA, "expand", torch.bfloat16, False),
    "llama-lora-bf16-eager": (LLAMA + ["lora.rank=8"], "expand", torch.bfloat16, False),
    "llama-ac-bf16": (LLAMA + ["train.activation_checkpointing=true"], "expand", torch.bfloat16, True),
    "llama-ac-bf16-eager": (LLAMA + ["train.activation_checkpointing=true"], "expand", torch.bfloat16, False),
    "gpt-bf16-eager": (GPT, "expand", torch.bfloat16, False),
    "glam-moe-bf16-eager": (GLAM + SHORT, "expand", torch.bfloat16, False),
}


def _saved_bytes(layout: Layout, tokens: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None,
                 fused: bool = True, keep=lambda t: True) -> int:
    """Bytes of the storages autograd keeps from one forward with the fused loss (or the plain one)
    until its backward, each once, as large as they are when the forward ends (FSDP frees the
    gathered weights it reshards); a DTensor's local shard; `keep`: only those tensors. Parameters
    and buffers, which exist anyway, are not counted. Without a real process group (a fake one)
    there is no backward."""
    model = layout.model
    skip = {_local(t).untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in skip and keep(_local(t)):
            kept[storage.data_ptr()] = storage
        return t

    precision = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision, layout.loss_context(), \
            layout.sequence_context(tokens, labels):
        loss = layout.loss(tokens, labels, fused=fused)
    total = sum(storage.nbytes() for storage in kept.values())
    if not dist.is_initialized():
        loss.backward()
    return total


@pytest.mark.parametrize("case", list(SAVED))
def test_what_a_forward_saves_for_backward_within_15_percent_of_the_estimate(case, monkeypatch):
    """The estimate's `saved` (activations, the weights' compute-dtype copies, the loss's saved
    gradients) against the storages the trainer's model keeps, compiled as the trainer compiles it
    (with its FP8 layers, LoRA adapters and GQA path), for every family."""
    sets, gqa, amp, compiled = SAVED[case]
    if "train.fp8=tensorwise" in sets:
        pytest.importorskip("torchao.float8")
    torch._dynamo.reset()  # this test's blocks, not earlier tests' cached graphs
    monkeypatch.setattr(compile_transform, "BACKEND", inductor_partitioner())
    monkeypatch.setattr(attention_ops, "_mode", gqa)
    seq, micro = 128, 2
    cfg = load_config(None, ["data.mock=true", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                             f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", *sets,
                             f"train.compile={str(compiled).lower()}"])
    family, args = resolve_model(cfg.model)
    seq, micro = cfg.data.seq_len, cfg.train.micro_batch_size
    # LoRA's frozen linears stored as the trainer stores them (lora.base_dtype: bf16 under bf16 autocast)
    layout = Layout.build(family, args, cfg.train, ParallelDims(), torch.device("cpu"), None, 1, lora=cfg.lora,
                          frozen_dtype=frozen_dtype(cfg.lora, amp))
    if cfg.lora.rank and cfg.train.fp8 != "none":  # as the trainer does once the weights are loaded
        quantize_frozen_linears(layout.model, cfg.train.fp8_min_features)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, args.vocab_size, (micro, seq), generator=gen) for _ in range(2))
    saved = _saved_bytes(layout, tokens, labels, amp)
    est = estimate_memory(args, seq, micro, bf16=amp is not None, lora=cfg.lora if cfg.lora.rank else None,
                          fp8=cfg.train.fp8, fp8_min_features=cfg.train.fp8_min_features, compiled=compiled,
                          native_gqa=gqa == "native", activation_checkpointing=cfg.train.activation_checkpointing,
                          bf16_residual=cfg.train.bf16_residual)
    assert est.saved == pytest.approx(saved, rel=0.15), est.describe()
    if compiled and not cfg.train.activation_checkpointing:  # and the compiled count is not the eager one: inductor keeps a third less here
        eager = estimate_memory(args, seq, micro, bf16=amp is not None, lora=cfg.lora if cfg.lora.rank else None,
                                fp8=cfg.train.fp8, fp8_min_features=cfg.train.fp8_min_features,
                                native_gqa=gqa == "native", bf16_residual=cfg.train.bf16_residual)
        assert eager.saved > 1.15 * saved


@pytest.mark.slow
def test_the_partitioner_backend_saves_what_inductor_saves(monkeypatch):
    """The premise of the test above: a block compiled by inductor itself (C++ code generated and built,
    a minute on a CPU) keeps the same storages, of the same shapes and dtypes, as with the backend that
    stops after inductor's partitioner."""
    cfg = load_config(None, ["data.mock=true", *LLAMA, "train.compile=true"])
    family, args = resolve_model(cfg.model)
    shapes = {}
    for backend in ("inductor", inductor_partitioner()):
        monkeypatch.setattr(compile_transform, "BACKEND", backend)
        torch._dynamo.reset()
        layout = Layout.build(family, args, cfg.train, ParallelDims(), torch.device("cpu"), None, 1)
        block = layout.model.layers["0"]
        x = torch.randn(2, 64, args.dim, requires_grad=True)
        cos, sin = layout.model.rope_cos[:64], layout.model.rope_sin[:64]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, cos, sin).sum().backward()
        shapes[str(backend)] = sorted((tuple(t.shape), str(t.dtype)) for t in kept)
    assert shapes["inductor"] and len(set(map(tuple, shapes.values()))) == 1, shapes


def test_unset_cast_once_is_planned_as_the_trainer_chooses_it(tmp_path):
    """A config that leaves train.cast_weights_once and gradient_accumulation_fusion unset gets both where
    the trainer turns them on (one GPU, several micro-batches, no activation checkpointing), neither
    elsewhere (weight_cast.wanted)."""
    w = plan.workload("glam-126m-64e", 2048, 128)
    cfg = tmp_path / "glam.toml"
    cfg.write_text('[model]\nsize = "glam-126m-64e"\n[data]\nseq_len = 2048\n[train]\nglobal_batch_size = 128\n')
    auto = plan.workload_from_config(str(cfg))
    assert (auto.cast_weights_once, auto.gradient_accumulation_fusion) == (None, None)
    on = dataclasses.replace(w, cast_weights_once=True, gradient_accumulation_fusion=True)
    params = plan._stage(w, plan.Layout(1, 1, 1, 1, 1, 8, False)).params
    one_gpu, checkpointed, fsdp = plan.Layout(1, 1, 1, 1, 1, 8, False), plan.Layout(1, 1, 1, 1, 1, 8, True), \
        plan.Layout(2, 1, 1, 1, 1, 8, False)
    assert plan.parameter_passes(auto, params, 16, one_gpu) == plan.parameter_passes(on, params, 16, one_gpu)
    for lay, m in ((checkpointed, 16), (fsdp, 8), (one_gpu, 1)):
        assert plan.parameter_passes(auto, params, m, lay) == plan.parameter_passes(w, params, m, lay)
