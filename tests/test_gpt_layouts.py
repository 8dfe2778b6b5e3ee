"""The GPT family under every parallel layout trains exactly like one process (CPU, gloo, torchrun), as
test_parallel_layouts.py does for Llama: FSDP (tied embeddings in the root unit), HSDP (two
replicas, gradients all-reduced across them), TP+SP (vocabulary-
sharded tied output, replicated position embedding), CP (the position ids sharded with the tokens, so
each rank looks up its global positions), PP 1F1B and interleaved with the tied embedding (the last
stage's copy, gradients summed with the first stage's, counted once in the norm) and untied, and
checkpoints saved under TP and PP resumed in one process and the reverse."""

from pathlib import Path

import pytest
import torch
from test_parallel_layouts import REL, _trajectory, torchrun

from llamatron.config import load_config
from llamatron.train import checkpoint as ckpt
from llamatron.train.trainer import train

# Six torchrun launches of 2 processes (~10 s each of CPU on an idle machine): long by nature.
pytestmark = pytest.mark.slow

CONFIG = """
[model]
size = "gpt-debug"
n_layers = 4            # pp 2 = 2 stages of two layers
[data]
mock = true
seq_len = 32            # divisible by tp 2 and by 2 x cp 2
[train]
steps = 3
global_batch_size = 8
micro_batch_size = 2
device = "cpu"
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 1
schedule_steps = 8
[eval]
samples = 6
micro_batch_size = 2
every = 3
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    p = tmp_path_factory.mktemp("gpt") / "layout.toml"
    p.write_text(CONFIG)
    return p


def _single(config, out, *overrides):
    train(load_config(str(config), [f"train.out_dir={out}", *overrides]), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    return _single(config, tmp_path_factory.mktemp("ref") / "run")


def _assert_same(got, want, keys):
    for key in keys:
        assert key in got, f"{key} missing"
        (gl, gn), (wl, wn) = got[key], want[key]
        assert gl == pytest.approx(wl, rel=REL), f"{key}: loss {gl} != {wl}"
        if wn is not None:
            assert gn == pytest.approx(wn, rel=REL), f"{key}: grad norm {gn} != {wn}"


KEYS = [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]


@pytest.mark.parametrize("overrides", [["parallel.dp_shard=2"], ["parallel.dp_replicate=2"], ["parallel.cp=2"]],
                         ids=["fsdp", "hsdp", "cp"])
def test_gpt_layout_matches_single_process(overrides, config, reference, tmp_path):
    torchrun(2, config, tmp_path / "run", *overrides)
    _assert_same(_trajectory(tmp_path / "run"), _trajectory(reference), KEYS)


def test_gpt_tensor_parallel_then_resumed_in_one_process(config, reference, tmp_path):
    out = tmp_path / "run"
    torchrun(2, config, out, "train.steps=2", "parallel.tp=2")
    _single(config, out)  # resumes the TP checkpoint of step 2, runs step 3
    _assert_same(_trajectory(out), _trajectory(reference), KEYS)


def test_gpt_pipeline_1f1b_untied(config, tmp_path):
    want = _trajectory(_single(config, tmp_path / "ref", "model.tie_embeddings=false"))
    torchrun(2, config, tmp_path / "run", "parallel.pp=2", "model.tie_embeddings=false")
    _assert_same(_trajectory(tmp_path / "run"), want, KEYS)


PROBE = Path(__file__).with_name("tied_copies_probe.py")


def test_gpt_pipeline_1f1b_tied_then_resumed_in_one_process(config, reference, tmp_path):
    """Tied embeddings under PP 1F1B: the single-process losses and gradient norms, the first and last
    stage's copies equal after every step, and a checkpoint of one process's format (the weight once,
    under its one name) that one process resumes."""
    out, copies = tmp_path / "run", tmp_path / "copies"
    copies.mkdir()
    torchrun(2, config, out, "train.steps=2", "parallel.pp=2", entry=(str(PROBE), str(copies)))
    for step in (1, 2):
        first, last = (torch.load(copies / f"step{step}_rank{rank}.pt", weights_only=True) for rank in (0, 1))
        assert torch.equal(first, last), f"step {step}: the copies differ by up to {(first - last).abs().max()}"
    saved = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(out))
    want = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(reference))
    assert sorted(saved) == sorted(want) and torch.equal(saved["embeddings.tok.weight"], last)
    _single(config, out)  # resumes the PP checkpoint of step 2, runs step 3
    _assert_same(_trajectory(out), _trajectory(reference), KEYS)


def test_gpt_interleaved_pipeline_tied_resumes_a_one_process_checkpoint(config, reference, tmp_path):
    """Step 1 in one process, steps 2-3 under interleaved PP (2 x 2 stages of one layer): both copies of
    the tied weight (and their optimizer state) load from the one tensor of the checkpoint."""
    out = tmp_path / "run"
    _single(config, out, "train.steps=1")
    log = torchrun(2, config, out, "parallel.pp=2", "parallel.pp_virtual_stages=2")
    assert "resumed from" in log and "step_00000001" in log
    _assert_same(_trajectory(out), _trajectory(reference), KEYS)
