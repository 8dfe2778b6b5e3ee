"""Stop signals where they used to wait or escape (issue 17, defects 10 and 13): SIGTERM during a
validation ends it between batches (then checkpoint, exit 75) instead of waiting for the whole
validation plus a step; the last step's validation is still completed; an in-process torchrun puts
the signal handlers back, so a later SIGTERM cannot reach the caller through torch's handler."""

import json
import os
import signal

import torch

from llamatron import hooks
from llamatron.cli import main
from llamatron.errors import REQUEUE_EXIT_CODE
from llamatron.train import checkpoint as ckpt

torch.set_num_threads(1)


def _argv(out_dir, steps, *sets):
    argv = ["train", "--config", "demo"]
    for s in ["model.size=debug", "data.mock=true", "data.seq_len=16", f"train.steps={steps}",
              "train.global_batch_size=2", "train.micro_batch_size=2", "train.device=cpu", "train.threads=1",
              "eval.samples=8", "eval.micro_batch_size=2", "eval.at_start=false", "train.log_every=1", f"train.out_dir={out_dir}", *sets]:
        argv += ["--set", s]
    return argv


def _sigterm_at_batch(n):
    """A hook that sends this process SIGTERM as the n-th validation batch (counted over the run) starts."""
    calls = []

    def on_batch(start):
        calls.append(start)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)

    return calls, hooks.add("eval_batch", on_batch)


def _rows(out_dir, kind):
    return [r for r in map(json.loads, open(out_dir / "metrics.jsonl")) if r["kind"] == kind]


def test_sigterm_during_validation_stops_it_checkpoints_and_exits_75(tmp_path, capsys):
    out = tmp_path / "run"
    calls, remove = _sigterm_at_batch(2)
    try:
        code = main(_argv(out, 6, "eval.every=2"))
    finally:
        remove()
    assert code == REQUEUE_EXIT_CODE
    assert calls == [0, 2]  # the signal came in batch 2 of 4; batch 3 never started, nor did step 3
    assert ckpt.latest_checkpoint(out).name == "step_00000002"
    assert _rows(out, "eval") == [] and max(r["step"] for r in _rows(out, "train")) == 2
    assert "SIGTERM during validation" in capsys.readouterr().out
    assert main(_argv(out, 6, "eval.every=2")) == 0  # the same command resumes and finishes
    assert [r["step"] for r in _rows(out, "eval")] == [4, 6]


def test_sigterm_during_the_last_validation_lets_it_finish(tmp_path):
    out = tmp_path / "run"
    calls, remove = _sigterm_at_batch(2)
    try:
        code = main(_argv(out, 2))
    finally:
        remove()
    assert code == 0 and calls == [0, 2, 4, 6]
    assert [r["step"] for r in _rows(out, "eval")] == [2]


def test_in_process_torchrun_restores_signal_handlers(tmp_path):
    from llamatron.launch import torchrun

    script = tmp_path / "ok.py"
    script.write_text("pass\n")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                                               signal.SIGUSR1)}
    assert torchrun([str(script)], 1, log=lambda *_: None) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_during_start_up_checkpoints_after_the_first_step_and_exits_75(tmp_path):
    """A SIGTERM while the config loads (before the trainer exists) used to end the process with -15;
    the handler is now installed before the slow imports. A subprocess in its own session: before the
    fix the signal would have killed the test process itself."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    code = ("import os, signal, sys\n"
            "import llamatron.config as c\n"
            "real = c.load_config\n"
            "def load(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "c.load_config = load\n"
            "from llamatron.cli import main\n"
            f"sys.exit(main({_argv(out, 4)!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-2000:]
    assert ckpt.latest_checkpoint(out).name == "step_00000001"
