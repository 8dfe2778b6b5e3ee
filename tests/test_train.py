import json

import pytest

from llamatron.config import load_config
from llamatron.errors import LlamatronError
from llamatron.train import checkpoint as ckpt
from llamatron.train.trainer import train


def _cfg(out_dir, steps, extra=()):
    return load_config(None, [
        "model.size=debug", "data.mock=true", "data.seq_len=32", f"train.steps={steps}",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.device=cpu",
        "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=2", "optim.schedule_steps=8",
        "eval.samples=4", "eval.every=0", f"train.out_dir={out_dir}", *extra,
    ])


def _losses(out_dir):
    rows = [json.loads(l) for l in open(out_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_is_exact(tmp_path):
    """2N steps in one run == N steps, stop, resume in a new trainer, N more steps: identical losses."""
    straight = tmp_path / "straight"
    train(_cfg(straight, 8), progress=False, log=lambda *_: None)

    split = tmp_path / "split"
    first = train(_cfg(split, 4), progress=False, log=lambda *_: None)
    assert first.steps == 4 and ckpt.latest_checkpoint(split).name == "step_00000004"
    second = train(_cfg(split, 8), progress=False, log=lambda *_: None)
    assert second.steps == 8

    a, b = _losses(straight), _losses(split)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit-identical
    assert len(set(a.values())) == 8  # the comparison is not between constants

    assert json.loads((split / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())["consumed_samples"] == 32


def test_resume_with_8bit_adamw_is_exact(tmp_path):
    """optim.name = adamw8bit (torchao): its 8-bit moments saved asynchronously at step 4 and resumed
    give the straight run's losses bit for bit."""
    pytest.importorskip("torchao.optim")
    extra = ["optim.name=adamw8bit", "checkpoint.async_save=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(straight, 8, extra), progress=False, log=lambda *_: None)
    train(_cfg(split, 4, extra), progress=False, log=lambda *_: None)
    lines = []
    train(_cfg(split, 8, extra), progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("resumed from" in line for line in lines)
    a, b = _losses(straight), _losses(split)
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)] and len(set(a.values())) == 8
    plain = _losses(train(_cfg(tmp_path / "plain", 8), progress=False, log=lambda *_: None).out_dir)
    assert a[1] == plain[1] and a[8] != plain[8]  # the same first loss; then 8-bit moments, not AdamW's


def test_cast_weights_once_computes_what_autocast_computes(tmp_path, monkeypatch):
    """train.cast_weights_once under bf16 autocast: the block linears' bf16 copies made once per step
    give autocast's losses bit for bit, resume exactly, and are what the blocks compute with (left
    stale after the first step, the losses part from autocast's)."""
    from llamatron.transforms import weight_cast

    bf16, once = ["train.precision=bf16"], ["train.precision=bf16", "train.cast_weights_once=true"]
    train(_cfg(tmp_path / "autocast", 6, bf16), progress=False, log=lambda *_: None)
    lines = []
    train(_cfg(tmp_path / "once", 6, once), progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    want = _losses(tmp_path / "autocast")
    assert _losses(tmp_path / "once") == want and len(set(want.values())) == 6
    assert any("14 block linears' bf16 weight copies made once per step; outside the blocks: output" in line
               for line in lines)  # 2 x 7; the embedding joins them with the fused weight gradients
    train(_cfg(tmp_path / "split", 3, once), progress=False, log=lambda *_: None)
    train(_cfg(tmp_path / "split", 6, once), progress=False, log=lambda *_: None)
    assert _losses(tmp_path / "split") == want
    # With the weight gradients accumulated in fp32 buffers (on the CPU: bf16 products added in fp32,
    # autocast's arithmetic), through the trainer: the same losses.
    train(_cfg(tmp_path / "fused", 6, [*once, "train.gradient_accumulation_fusion=true"]), progress=False,
          log=lambda *_: None)
    assert _losses(tmp_path / "fused") == want
    real, calls = weight_cast.refresh, []

    def first_only(parts):
        calls.append(parts)
        if len(calls) == 1:
            real(parts)

    monkeypatch.setattr(weight_cast, "refresh", first_only)
    train(_cfg(tmp_path / "stale", 3, once), progress=False, log=lambda *_: None)
    stale = _losses(tmp_path / "stale")
    assert stale[1] == want[1] and stale[3] != want[3] and len(calls) == 4
    with pytest.raises(LlamatronError, match="'train.cast_weights_once'"):
        train(_cfg(tmp_path / "fp32", 1, ["train.cast_weights_once=true"]), progress=False, log=lambda *_: None)


def test_bf16_residual_trains_beside_the_fp32_stream(tmp_path):
    """train.bf16_residual (the default) under bf16 autocast: the run's losses part from the fp32
    stream's (false) by bf16 rounding only; without autocast (fp32) the option changes nothing."""
    bf16 = ["train.precision=bf16"]
    for name, extra in (("fp32_stream", [*bf16, "train.bf16_residual=false"]), ("bf16_stream", bf16),
                        ("fp32", []), ("fp32_flag", ["train.bf16_residual=false"])):
        train(_cfg(tmp_path / name, 4, extra), progress=False, log=lambda *_: None)
    want, got = _losses(tmp_path / "fp32_stream"), _losses(tmp_path / "bf16_stream")
    assert got != want and all(abs(got[s] - want[s]) <= 0.02 * want[s] for s in want)
    assert _losses(tmp_path / "fp32_flag") == _losses(tmp_path / "fp32")


def test_train_called_again_on_a_finished_run_does_nothing(tmp_path):
    out = tmp_path / "run"
    first = train(_cfg(out, 2), progress=False, log=lambda *_: None)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    said = []
    again = train(_cfg(out, 2), progress=False, log=said.append)
    assert said == [f"run {out} already finished: checkpoint at step 2 (train.steps = 2); nothing to train"]
    assert again.already_finished and not first.already_finished
    assert (again.steps, again.checkpoint, again.eval_history) == (2, first.checkpoint, [])
    # Nothing reloaded, validated or appended: metrics.jsonl, config.yaml and the checkpoint as they were.
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files
    assert train(_cfg(out, 3), progress=False, log=lambda *_: None).steps == 3  # more steps: it goes on


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    a = train(_cfg(tmp_path / "a", 3, ["train.micro_batch_size=1"]), progress=False, log=lambda *_: None)
    b = train(_cfg(tmp_path / "b", 3, ["train.micro_batch_size=4"]), progress=False, log=lambda *_: None)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for s in (1, 2, 3):
        assert la[s] == pytest.approx(lb[s], rel=1e-5)
    assert a.eval_history[-1][1] == pytest.approx(b.eval_history[-1][1], rel=1e-4)


def test_checkpoint_retention_and_incomplete_ignored(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, 6, ["checkpoint.every=2", "checkpoint.keep=2"]), progress=False, log=lambda *_: None)
    names = [p.name for p in ckpt.list_checkpoints(out)]
    assert names == ["step_00000004", "step_00000006"]
    # A directory without the completion marker is never picked for resume.
    broken = ckpt.checkpoints_root(out) / "step_00000099"
    broken.mkdir()
    assert ckpt.latest_checkpoint(out).name == "step_00000006"


def test_metrics_and_tensorboard_written(tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(out, 2), progress=False, log=lambda *_: None)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "consumed_samples"} <= set(train_rows[0])
    assert train_rows[-1]["consumed_samples"] == 8
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    assert any((out / "tensorboard").iterdir())
    assert (out / "config.yaml").read_text().startswith("model:")
    assert res.eval_history[0][1] > 0
