"""One training run per train.out_dir (issue 17, defect 1): a second run on the directory of a live
one is refused before it touches anything there (it used to delete the first's in-flight save as a
crash's leftover); the lock of a killed run is gone with the process."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from llamatron.cli import main
from llamatron.config import load_config
from llamatron.errors import LlamatronError
from llamatron.train import checkpoint as ckpt
from llamatron.train import run_lock
from llamatron.train.trainer import train


def _cfg(out_dir, steps=2):
    return load_config(None, ["model.size=debug", "data.mock=true", "data.seq_len=16", f"train.steps={steps}",
                              "train.global_batch_size=2", "train.micro_batch_size=2", "train.device=cpu",
                              "train.threads=1", "eval.samples=0", f"train.out_dir={out_dir}"])


def test_second_lock_refused_with_holder_then_free_after_release(tmp_path):
    lock = run_lock.acquire(tmp_path / "run")
    with pytest.raises(LlamatronError) as e:
        run_lock.acquire(tmp_path / "run")
    msg = str(e.value)
    assert str(tmp_path / "run") in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert "\n" not in msg
    lock.release()
    run_lock.acquire(tmp_path / "run").release()  # free again


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    code = (f"from llamatron.train import run_lock; run_lock.acquire({str(out)!r}); print('held', flush=True); "
            "import time; time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LlamatronError, match=f"pid {p.pid}"):
            run_lock.acquire(out)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert f"pid {p.pid}" in (out / run_lock.LOCK_NAME).read_text()  # the stale file stays ...
    run_lock.acquire(out).release()  # ... and does not matter


def test_second_training_run_leaves_the_first_alone(tmp_path, capsys):
    out = tmp_path / "run"
    in_flight = ckpt.checkpoints_root(out) / ".step_00000004.tmp"  # the first run's save in progress
    in_flight.mkdir(parents=True)
    with run_lock.acquire(out):
        with pytest.raises(LlamatronError, match="in use by another training run"):
            train(_cfg(out), progress=False, log=lambda *_: None)
        assert in_flight.is_dir()  # not removed as a "leftover"
        assert not (out / "config.yaml").exists()
        args = ["train", "--config", "demo", "--set", "model.size=debug", "--set", "data.mock=true",
                "--set", f"train.out_dir={out}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and f"pid {os.getpid()}" in err[0]
    result = train(_cfg(out), progress=False, log=lambda *_: None)  # free once the holder is gone
    assert result.steps == 2 and not in_flight.exists()  # now the leftover is removed, under the lock
    run_lock.acquire(out).release()  # and the run released its lock


def test_nonfinite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    cp = ckpt.Checkpointer(_cfg(tmp_path).checkpoint, tmp_path, log=lambda *_: None)
    cp.attach([model], [opt], "")
    good = cp.save(1, {"step": 1, "consumed_samples": 0})
    with torch.no_grad():
        model.bias[2] = float("inf")
    with pytest.raises(LlamatronError, match=r"step 2: not saving .*NaN/inf.*bias.*step_00000001"):
        cp.save(2, {"step": 2, "consumed_samples": 0})
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.remove_incomplete(tmp_path) == []  # nothing half-written either


def test_filesystem_without_flock_warns_and_runs(tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers ENOSYS: a warning, not a refusal to train."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lines = []
    lock = run_lock.acquire(tmp_path / "run", log=lines.append)
    lock.release()
    assert len(lines) == 1 and "cannot lock" in lines[0] and "Function not implemented" in lines[0]
