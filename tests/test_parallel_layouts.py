"""Every parallel layout trains exactly like one process: CPU, gloo, 2 to 4 processes under torchrun.

Each layout runs `llamatron train` under torchrun (the real entry point, env:// rendezvous) for 3
steps of the debug model (4 layers, fp32, synthetic tokens) from the same seed; its losses, gradient
norms and validation losses must equal a single-process run's within fp32 rounding (the layouts
only change the order of additions). Also: only rank 0 reports, and checkpoints saved by one layout
resume in another.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from llamatron.config import load_config
from llamatron.train import checkpoint as ckpt
from llamatron.train.trainer import train

CONFIG = """
[model]
size = "debug"
n_layers = 4            # pp 2 x 2 virtual stages = 4 stages of one layer
[data]
mock = true
seq_len = 32            # divisible by tp 2 and by 2 x cp 2
[train]
steps = 3
global_batch_size = 8
micro_batch_size = 2    # 4 micro-batches on one process, 2 per rank with 2 data-parallel ranks
device = "cpu"
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 1
schedule_steps = 8      # the LR schedule does not depend on train.steps: runs can be split
[eval]
samples = 6             # not a multiple of micro x dp: the padding path of evaluation runs too
micro_batch_size = 2
every = 3               # at steps 0 and 3 in every run, also the 4-step reference
"""

REL = 1e-5  # observed: at most 5e-7 relative


def _config(tmp_path):
    p = tmp_path / "layout.toml"
    p.write_text(CONFIG)
    return p


def _rows(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def _trajectory(out_dir):
    return {(r["kind"], r["step"]): (r.get("loss", r.get("val_loss")), r.get("grad_norm")) for r in _rows(out_dir)}


def torchrun(n: int, config, out_dir, *overrides: str, entry: tuple[str, ...] = ("-m", "llamatron")) -> str:
    """`llamatron train` under torchrun; `entry`: what torchrun runs instead of `-m llamatron` (a script
    and its own arguments, taking the train command after them)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           *entry, "train", "--config", str(config), "--set", f"train.out_dir={out_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 steps (the layouts run 3; the resharding test uses the 4th)."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    train(load_config(str(_config(tmp)), [f"train.out_dir={out}", "train.steps=4"]), progress=False,
          log=lambda *_: None)
    return out


def _assert_same(got: dict, want: dict, steps):
    for key in [("eval", 0), ("eval", 3), *[("train", s) for s in steps]]:
        assert key in got, f"{key} missing"
        (gl, gn), (wl, wn) = got[key], want[key]
        assert gl == pytest.approx(wl, rel=REL), f"{key}: loss {gl} != {wl}"
        if wn is not None:
            assert gn == pytest.approx(wn, rel=REL), f"{key}: grad norm {gn} != {wn}"


LAYOUTS = {
    "fsdp": (2, ["parallel.dp_shard=2"]),
    "tp_sp": (2, ["parallel.tp=2"]),
    "pp_1f1b": (2, ["parallel.pp=2"]),
    "pp_interleaved": (2, ["parallel.pp=2", "parallel.pp_virtual_stages=2"]),
    "cp": (2, ["parallel.cp=2"]),
    "fsdp_x_tp": (4, ["parallel.tp=2"]),  # dp_shard=-1 fills: 2 x 2
    "pp_x_fsdp": (4, ["parallel.pp=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    n, overrides = LAYOUTS[name]
    out = tmp_path / "run"
    log = torchrun(n, _config(tmp_path), out, *overrides)
    got, want = _trajectory(out), _trajectory(reference)
    _assert_same(got, want, steps=(1, 2, 3))
    # Reported once: only rank 0 prints and writes metrics; memory is there for every rank.
    assert log.count("step      1 | loss") == 1
    assert log.count("run summary") == 1
    train_rows = [r for r in _rows(out) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert len(train_rows[0]["peak_mem_gib_per_rank"]) == n and all(m > 0 for m in train_rows[0]["peak_mem_gib_per_rank"])


def test_checkpoint_resharding_fsdp_to_tp_to_one_process(reference, tmp_path):
    """Steps 1-2 with FSDP over 2 ranks, step 3 resumed with TP 2, step 4 resumed in one process: the
    same trajectory as 4 steps in one process, and the same final weights."""
    config, out = _config(tmp_path), tmp_path / "run"
    torchrun(2, config, out, "train.steps=2", "parallel.dp_shard=2")
    log = torchrun(2, config, out, "train.steps=3", "parallel.tp=2")
    assert "resumed from" in log and "step_00000002" in log
    train(load_config(str(config), [f"train.out_dir={out}", "train.steps=4"]), progress=False, log=lambda *_: None)
    got, want = _trajectory(out), _trajectory(reference)
    _assert_same(got, want, steps=(1, 2, 3, 4))
    assert got[("eval", 4)][0] == pytest.approx(want[("eval", 4)][0], rel=REL)
    assert json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())["world_size"] == 2

    # Any checkpoint reads back as one plain state dict, loadable into the plain model.
    mine = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(out))
    ref = ckpt.consolidated_state_dict(ckpt.latest_checkpoint(reference))
    assert sorted(mine) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    from llamatron.models.llama import SIZES
    from llamatron.models.llama.model import Transformer
    import dataclasses

    model = Transformer(dataclasses.replace(SIZES["debug"], n_layers=4))
    model.load_state_dict(ckpt.consolidated_state_dict(ckpt.latest_checkpoint(out), dtype=torch.float32), strict=True)
    exported = ckpt.save_consolidated(ckpt.latest_checkpoint(out), tmp_path / "model.pt", dtype=torch.bfloat16)
    sd = torch.load(exported, weights_only=True)
    assert sd["output.weight"].dtype == torch.bfloat16 and sd["output.weight"].shape == (512, 64)


CLIP = "optim.grad_clip=0.02"  # below the debug model's gradient norm at every step: the clip always scales


@pytest.fixture(scope="module")
def clipped_reference(tmp_path_factory):
    """One process, for-each AdamW: the clip scales the gradients in a pass of its own, then the step."""
    tmp = tmp_path_factory.mktemp("clipped_reference")
    out = tmp / "run"
    train(load_config(str(_config(tmp)), [f"train.out_dir={out}", CLIP, "optim.fused=false"]), progress=False,
          log=lambda *_: None)
    return out


@pytest.mark.parametrize("name", ["fsdp", "tp_sp", "pp_1f1b"])
def test_fused_adamw_takes_the_clip_in_parallel_layouts(name, clipped_reference, tmp_path):
    """Fused AdamW with the clip's factor as its grad_scale (train_step), over DTensor parameters (FSDP,
    TP) and with an optimizer per pipeline stage, trains as one process clipping the gradients first."""
    n, overrides = LAYOUTS[name]
    out = tmp_path / "run"
    torchrun(n, _config(tmp_path), out, *overrides, CLIP, "optim.fused=true")
    want = _trajectory(clipped_reference)
    assert all(want[("train", s)][1] > 0.02 * 5 for s in (1, 2, 3))  # clipped at every step, by 5x or more
    _assert_same(_trajectory(out), want, steps=(1, 2, 3))


@pytest.mark.slow  # three CPU runs, two under torchrun
def test_8bit_adamw_under_fsdp_and_its_resume_in_another_layout_refused(tmp_path, monkeypatch):
    """optim.name = adamw8bit over 2 FSDP ranks: each rank's shards quantized in its own blocks (and
    shards under 4096 values keep fp32 moments), so within 1e-3 of one process rather than fp32
    rounding; its checkpoint resumes in that layout only, and TP 2 is refused in one line, exit 2."""
    pytest.importorskip("torchao.optim")
    # torchao compiles its step once per parameter shape in every process: half this test's time on a CPU
    # (57 s against 29), and nothing it checks. Its eager step is the same arithmetic.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    config, eight = _config(tmp_path), "optim.name=adamw8bit"
    one = tmp_path / "one"
    train(load_config(str(config), [f"train.out_dir={one}", "train.steps=3", eight]), progress=False,
          log=lambda *_: None)
    out = tmp_path / "two"
    torchrun(2, config, out, eight, "train.steps=2", "parallel.dp_shard=2")
    torchrun(2, config, out, eight, "train.steps=3", "parallel.dp_shard=2")  # resumed in its layout
    got, want = _trajectory(out), _trajectory(one)
    for s in (1, 2, 3):
        assert got[("train", s)][0] == pytest.approx(want[("train", s)][0], rel=1e-3), s
        assert got[("train", s)][1] == pytest.approx(want[("train", s)][1], rel=1e-2), s
    with pytest.raises(AssertionError) as failed:
        torchrun(2, config, out, eight, "train.steps=4", "parallel.tp=2")
    assert ("optim.name=adamw8bit state resumes only where its tensors are sharded as when saved (dp_shard x cp "
            "2, tp 1, ep 1; this run: dp_shard x cp 1, tp 2, ep 1)") in str(failed.value)
    assert "exitcode  : 2" in str(failed.value)


def test_pipeline_stages_pass_the_bf16_residual_stream_under_autocast(tmp_path):
    """Under bf16 autocast (no FSDP) the blocks hand on a bf16 stream (train.bf16_residual, the default):
    the pipeline's stages, which learn the shapes and dtypes they exchange from a first forward (here the
    validation at step 0, eval's own pass), send and receive it, activations and gradients, and train as
    one process does within bf16 rounding."""
    config, out = _config(tmp_path), tmp_path / "pp"
    bf16 = ["train.precision=bf16", "train.steps=3"]
    torchrun(2, config, out, *bf16, "parallel.pp=2", "parallel.pp_virtual_stages=2")
    train(load_config(str(config), [f"train.out_dir={tmp_path / 'one'}", *bf16]), progress=False, log=lambda *_: None)
    got, want = _trajectory(out), _trajectory(tmp_path / "one")
    for key in [("eval", 0), *[("train", s) for s in (1, 2, 3)]]:
        assert got[key][0] == pytest.approx(want[key][0], rel=2e-3), key
