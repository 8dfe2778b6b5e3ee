"""The layout planner (`llamatron plan`, llamatron/plan.py): its picks against what the repo has
measured, the answer when nothing fits, and every printed layout through the config's own checks."""

import json
import re
import shlex
from pathlib import Path

import pytest

from llamatron import plan
from llamatron.cli import main
from llamatron.config import load_config, validate_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
H200 = plan.Hardware(1, memory_gib=139.0)


def _sets(text: str) -> list[list[str]]:
    """The --set lines the planner printed, one list of overrides per layout."""
    return [[w for w in shlex.split(line.split(": ", 1)[1]) if w != "--set"]
            for line in text.splitlines() if re.match(r"#\d+: --set", line)]


def test_8b_proxy_on_one_h200_picks_the_measured_fastest_fitting_layout():
    """docs/performance.md (h200_l4_mbs4/8.json): 4 layers of the 8B at seq 8192 on one H200 ran at
    micro batch 4 and 8 without activation checkpointing; micro batch 8 was the faster (2.098 s)."""
    p = plan.plan("llama3.1-8b", H200, seq_len=8192, global_batch=16, layers=4)
    best = p.ranked[0].layout
    assert (best.tp, best.pp, best.cp, best.dp_shard, best.micro_batch, best.activation_checkpointing) == \
        (1, 1, 1, 1, 8, False)
    measured = {r["micro_batch"]: r for name in ("h200_l4_mbs4.json", "h200_l4_mbs8.json")
                for r in json.loads((DOCS / "bench" / name).read_text())["results"] if r["variant"] == "compile+cudnn"}
    for e in p.ranked:
        if not e.layout.activation_checkpointing and e.layout.micro_batch in measured:
            row = measured[e.layout.micro_batch]
            assert e.step_s == pytest.approx(row["step_time_s"], rel=0.10)
            assert e.memory_gib >= row["peak_mem_gib"]  # the estimate errs on the safe side under compile


def test_full_8b_on_two_h200_uses_fsdp_as_the_docs_show_fits():
    """docs/parallelism.md: the full 8B under FSDP 2 at micro batch 1 is 114.6 GiB per rank, "fits an
    H200"; on one H200 the fp32 state alone (120 GiB) leaves too little."""
    p = plan.plan("llama3.1-8b", plan.Hardware(2, memory_gib=139.0), seq_len=8192, global_batch=16)
    best = p.ranked[0]
    assert best.layout.dp_shard * best.layout.cp == 2 and best.layout.tp == 1 and best.layout.pp == 1
    assert best.memory_gib <= 0.9 * 139
    fsdp2 = [e for e in p.ranked if e.layout.dp_shard == 2 and e.layout.micro_batch == 1
             and not e.layout.activation_checkpointing]
    assert fsdp2 and fsdp2[0].memory_gib == pytest.approx(114.6, abs=0.1)
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
])
def test_every_printed_layout_passes_config_validation(capsys, argv, world):
    assert main(["plan", *argv]) == 0
    layouts = _sets(capsys.readouterr().out)
    assert layouts
    for sets in layouts:
        cfg = load_config(None, sets + ["data.mock=true"])
        validate_config(cfg, world)  # raises LlamatronError naming the key if the layout were impossible
        assert cfg.train.micro_batch_size >= 1 and cfg.parallel.dp_shard >= 1


def test_every_enumerated_layout_passes_config_validation():
    """Not only the printed ones: pipeline (with virtual stages), context and tensor parallel layouts."""
    p = plan.plan("llama3.1-70b", plan.Hardware(32), seq_len=4096, global_batch=64)
    estimates = [plan.evaluate(p.args, lay, p.hardware, p.seq_len, p.global_batch)
                 for lay in plan.layouts(plan.registry_family(p.model), p.args, 32, 4096, 64)]
    assert {e.layout.virtual for e in estimates} >= {1, 2, 4} and {e.layout.cp for e in estimates} >= {1, 2, 4}
    for e in estimates[::3]:
        plan.check_overrides(p, e)


def test_bad_input_is_one_line(capsys):
    assert main(["plan", "--model", "llama9", "--gpus", "8"]) == 2
    assert "unknown; known sizes" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3.1-8b", "--gpus", "8", "--nodes", "3"]) == 2
