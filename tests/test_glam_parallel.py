"""GLaM under expert parallelism, FSDP and TP (CPU, gloo, 2 processes under torchrun): EP 2 (experts
split over the two FSDP ranks, tokens exchanged by all-to-all), FSDP 2 and TP 2 give the single-process losses,
gradient norms and router statistics within fp32 rounding, and an EP 2 checkpoint resumes in one
process (the expert DTensors reshard)."""

import json

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


@pytest.mark.slow  # three torchrun launches (about 60 s of CPU)
@pytest.mark.parametrize("name,overrides", [("ep2", ["parallel.ep=2"]), ("fsdp2", []),
                                            ("tp2", ["parallel.tp=2", "parallel.dp_shard=1"])])
def test_glam_layout_matches_single_process(name, overrides, setup, tmp_path):
    config, want = setup
    out = tmp_path / name
    torchrun(2, config, out, *overrides)
    _assert_same(_rows(out), want, (1, 2, 3))
    if name == "ep2":
        # The EP checkpoint of step 3 (experts sharded over the ranks) resumes in one process.
        train(load_config(str(config), [f"train.out_dir={out}", "train.steps=4"]), progress=False, log=lambda *_: None)
        got = _rows(out)
        resumes = [json.loads(line) for line in open(out / "metrics.jsonl") if '"resume"' in line]
        assert [r["step"] for r in resumes] == [3]
        for key in KEYS:
            assert got[("train", 4)][key] == pytest.approx(want[("train", 4)][key], rel=REL), key
