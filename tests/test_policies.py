"""The trainer's policy objects on their own, without a run: the step guard (non-finite, skips,
spikes, stop signals), the validation cadence, the checkpoint cadence and the throughput rows."""

import math

import pytest
import torch

from llamatron.config import CheckpointConfig, EvalConfig
from llamatron.eval.perplexity import Cadence
from llamatron.models.llama import SIZES
from llamatron.train import metrics
from llamatron.train.checkpoint import Checkpointer
from llamatron.train.reliability import SPIKE_MIN_HISTORY, StepGuard


def _guard(**kw):
    reports, lines = [], []
    guard = StepGuard(batch_of=lambda step: (8 * step, 8 * step + 8, [8 * step, 8 * step + 1]),
                      report=lambda kind, step, values: reports.append((kind, step, values)),
                      log=lines.append, **kw)
    return guard, reports, lines


def test_finite_steps_are_taken():
    guard, reports, _ = _guard()
    assert all(guard.decide(step, False, None, 1.0) for step in range(5))
    assert guard.halt is None and guard.skipped == 0 and reports == []


def test_nonfinite_stop_halts_and_names_the_batch():
    guard, reports, _ = _guard(nonfinite="stop")
    assert guard.decide(2, True, None, float("nan")) is False
    assert "step 3" in guard.halt and "samples 16-23" in guard.halt and "16-17" in guard.halt
    assert reports[0][0] == "nonfinite" and reports[0][1] == 3
    assert guard.skipped == 0  # a halted step is redone on resume, not counted


def test_nonfinite_skip_counts_then_halts_after_max_in_a_row():
    guard, _, lines = _guard(nonfinite="skip", max_skips=3)
    assert guard.decide(0, True, None, math.inf) is False
    assert guard.decide(1, False, None, 1.0) is True  # a finite step resets the run of skips
    assert guard.decide(2, True, None, math.inf) is False
    assert guard.decide(3, True, None, math.inf) is False
    assert guard.skipped == 3 and guard.halt is None
    assert guard.decide(4, True, None, math.inf) is False
    assert guard.halt and "3 steps in a row" in guard.halt
    assert sum("optimizer step skipped" in line for line in lines) == 3


def test_spike_is_reported_against_the_running_median():
    guard, reports, lines = _guard(spike_factor=5.0)
    for step in range(SPIKE_MIN_HISTORY):
        guard.decide(step, False, None, 1.0)
    assert reports == []
    assert guard.decide(SPIKE_MIN_HISTORY, False, None, 6.0) is True  # reported, still taken
    assert reports == [("grad_spike", SPIKE_MIN_HISTORY + 1, {"grad_norm": 6.0, "median": 1.0})]
    assert "spike" in lines[-1]


def test_state_round_trips_and_stop_signal_sticks():
    guard, _, _ = _guard(nonfinite="skip")
    guard.decide(0, True, None, math.inf)
    guard.decide(1, False, "SIGTERM", 2.0)
    guard.decide(2, False, None, 2.0)
    assert guard.stop_signal == "SIGTERM"
    other, _, _ = _guard()
    other.load_state_dict(guard.state_dict())
    assert other.skipped == 1 and other.grad_history == [2.0, 2.0]


def test_call_uses_the_agreed_numbers():
    seen = []
    guard = StepGuard(agree_fn=lambda loss, norm, stop: (seen.append(float(norm)) or (False, None, float(norm))))
    assert guard(0, torch.tensor(2.0), torch.tensor(0.5)) is True
    assert seen == [0.5] and guard.grad_history == [0.5]


@pytest.mark.parametrize("every, first, steps", [(2, 1, [2, 4, 6]), (2, 2, [4, 6]), (0, 1, [])])
def test_validation_cadence(every, first, steps):
    cadence = Cadence(every, first_interval=first)
    assert [s for s in range(1, 7) if cadence.due(s)] == steps


def test_validation_cadence_in_samples_rounds_up_to_steps():
    cfg = EvalConfig(every=0, every_samples=100)
    assert Cadence.from_config(cfg, global_batch_size=32).every == 4  # ceil(100 / 32)


def test_checkpoint_cadence_leaves_the_last_step_to_the_end_save(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(every=3), tmp_path, log=lambda *_: None)
    assert [s for s in range(1, 10) if ckpt.due(s, total_steps=9)] == [3, 6]
    off = Checkpointer(CheckpointConfig(every=3, enabled=False), tmp_path, log=lambda *_: None)
    assert not any(off.due(s, 9) for s in range(1, 10))


def test_throughput_row(monkeypatch):
    times = iter([100.0, 102.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(times))
    args = SIZES["debug"]
    meter = metrics.ThroughputMeter(args, seq_len=64, global_batch=8, n_gpus=1, device=torch.device("cpu"),
                                    device_name="NVIDIA H200", fp8=False, step=0)
    row = meter.row(step=4, loss=1.5, lr=1e-3, grad_norm=0.3, consumed=32, skipped=0)
    assert row["step_time_s"] == pytest.approx(0.5)
    assert row["tokens_per_s"] == pytest.approx(8 * 64 / 0.5)
    from llamatron import flops

    assert row["mfu"] == pytest.approx(flops.flops_per_sequence(args, 64) * 8 / 0.5 / flops.peak_flops("NVIDIA H200", "bf16"))
    assert "500 ms/step" in metrics.ThroughputMeter.line(4, row)
