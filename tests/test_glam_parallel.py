"""GLaM under expert parallelism, FSDP and TP (CPU, gloo, under torchrun): EP 2 (experts split over
the two FSDP ranks, tokens exchanged by all-to-all), FSDP 2 and TP 2 on 2 processes, and on 4 EP 2 x
FSDP 2 (the experts FSDP-sharded over the 2 ranks holding the same ones), EP 2 with 2 HSDP replicas
and EP 2 with TP 2, give the single-process losses, gradient norms and router statistics within fp32
rounding; EP checkpoints resume in one process and under another ep (the expert DTensors reshard)."""

import json
import shutil

import pytest
from test_parallel_layouts import torchrun

from llamatron.config import load_config
from llamatron.train.trainer import train

CONFIG = """
[model]
size = "glam-debug"
[data]
mock = true
seq_len = 32
[train]
steps = 3
global_batch_size = 8
micro_batch_size = 2    # 4 micro-batches on one process, 2 per rank on two
device = "cpu"
log_every = 1
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 1
schedule_steps = 8
[eval]
samples = 4
micro_batch_size = 2
every = 3
[checkpoint]
every = 3
"""

REL = 1e-5
KEYS = ("loss", "grad_norm", "moe_aux_loss", "moe_dropped_fraction", "moe_max_load")


def _rows(out_dir):
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {(r["kind"], r["step"]): r for r in rows if r["kind"] in ("train", "eval")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glam")
    config = tmp / "glam.toml"
    config.write_text(CONFIG)
    out = tmp / "reference"
    train(load_config(str(config), [f"train.out_dir={out}", "train.steps=4"]), progress=False, log=lambda *_: None)
    return config, _rows(out)


def _assert_same(got, want, steps):
    for step in steps:
        for key in KEYS:
            a, b = got[("train", step)][key], want[("train", step)][key]
            assert a == pytest.approx(b, rel=REL), (step, key, a, b)
    for step in (0, 3):
        assert got[("eval", step)]["val_loss"] == pytest.approx(want[("eval", step)]["val_loss"], rel=REL)


def _assert_resumed_step(out, want):
    got = _rows(out)
    resumes = [json.loads(line) for line in open(out / "metrics.jsonl") if '"resume"' in line]
    assert [r["step"] for r in resumes] == [3]
    for key in KEYS:
        assert got[("train", 4)][key] == pytest.approx(want[("train", 4)][key], rel=REL), key


@pytest.mark.slow  # five torchrun launches (about 60 s of CPU)
@pytest.mark.parametrize("name,n,overrides", [
    ("ep2", 2, ["parallel.ep=2"]), ("fsdp2", 2, []), ("tp2", 2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    ("hsdp2_ep2", 4, ["parallel.dp_replicate=2", "parallel.ep=2"]), ("tp2_ep2", 4, ["parallel.tp=2", "parallel.ep=2"])])
def test_glam_layout_matches_single_process(name, n, overrides, setup, tmp_path):
    config, want = setup
    out = tmp_path / name
    torchrun(n, config, out, *overrides)
    _assert_same(_rows(out), want, (1, 2, 3))
    if name == "ep2":
        # The EP checkpoint of step 3 (experts sharded over the ranks) resumes in one process.
        train(load_config(str(config), [f"train.out_dir={out}", "train.steps=4"]), progress=False, log=lambda *_: None)
        _assert_resumed_step(out, want)


@pytest.mark.slow  # two 4-process torchrun launches (about 25 s of CPU)
def test_ep2_by_fsdp2_matches_single_process_and_reshards(setup, tmp_path):
    """EP 2 x FSDP 2 on 4 ranks: each block's experts split over the two ranks of an ep group and
    FSDP-sharded over the two ranks holding the same ones, everything else FSDP over all four. Its
    step-3 checkpoint resumes in one process and under EP 4 with the single process's step 4."""
    config, want = setup
    out = tmp_path / "ep2_fsdp2"
    torchrun(4, config, out, "parallel.ep=2")
    _assert_same(_rows(out), want, (1, 2, 3))
    one, ep4 = tmp_path / "one", tmp_path / "ep4"
    shutil.copytree(out, one)
    shutil.copytree(out, ep4)
    train(load_config(str(config), [f"train.out_dir={one}", "train.steps=4"]), progress=False, log=lambda *_: None)
    _assert_resumed_step(one, want)
    torchrun(4, config, ep4, "parallel.ep=4", "train.steps=4")
    _assert_resumed_step(ep4, want)


@pytest.mark.slow  # one torchrun launch and one process, in bf16 on the CPU
def test_ep2_under_bf16_autocast_matches_single_process(setup, tmp_path):
    """In bf16, every GPU run's precision (one process: fp32 weights under autocast; EP 2: FSDP's
    bf16 mixed precision, the experts' all-to-alls in bf16), EP 2 gives the single process's losses
    within bf16 rounding."""
    config, _ = setup
    bf16 = ["train.precision=bf16", "train.steps=2"]
    one = tmp_path / "one"
    train(load_config(str(config), [f"train.out_dir={one}", *bf16]), progress=False, log=lambda *_: None)
    torchrun(2, config, tmp_path / "ep2", "parallel.ep=2", *bf16)
    got, want = _rows(tmp_path / "ep2"), _rows(one)
    for step in (1, 2):
        assert got[("train", step)]["loss"] == pytest.approx(want[("train", step)]["loss"], rel=1e-2), step
