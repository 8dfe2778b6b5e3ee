"""`llamatron launch` against a real Slurm: Debian's slurm-wlm on a one-node cluster on this machine
(scripts/slurm-localhost.sh installs it with apt-get when it is missing and we are root).

A tiny CPU run of two consecutive jobs is pre-empted mid-training with `scontrol requeue`; the job
comes back under the same id, resumes from the newest complete checkpoint, and the run ends with the
same losses, step for step, as the same run trained without interruption."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "scripts" / "slurm-localhost.sh"
STEPS = 60

pytestmark = pytest.mark.slow


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    # A session of its own: no signal aimed at the child's process group (torch elastic's) reaches pytest.
    return subprocess.run(cmd, start_new_session=True, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster; skips (with the reason) where none can be had."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the Slurm test needs Linux")
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("Slurm is not installed, and installing it needs root and apt-get")
    if os.geteuid() != 0:
        pytest.skip("a localhost Slurm cluster needs root (slurmd starts jobs as their users)")
    res = _run(["bash", str(HELPER), "install"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"cannot install Slurm: {res.stderr.strip()[-500:]}")
    state = tmp_path_factory.mktemp("slurm")
    res = _run(["bash", str(HELPER), "start", str(state)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        _run(["bash", str(HELPER), "stop", str(state)])
        pytest.skip(f"cannot start a localhost Slurm cluster: {res.stderr.strip()[-500:]}")
    conf = str(state / "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        yield env
    finally:
        jobs = _run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        if jobs:
            _run(["scancel", *jobs], env=env)
            time.sleep(2)
        _run(["bash", str(HELPER), "stop", str(state)])


def _config(path: Path, port: int) -> Path:
    path.write_text(textwrap.dedent(f"""\
        [model]
        size = "debug"
        [data]
        mock = true
        seq_len = 64
        [optim]
        lr = 1e-2
        min_lr = 1e-3
        warmup_steps = 5
        [train]
        steps = {STEPS}
        global_batch_size = 16
        micro_batch_size = 2
        device = "cpu"
        threads = 1
        log_every = 1
        [eval]
        samples = 4
        at_start = false
        [checkpoint]
        every = 5
        keep = 2
        [launch]
        nodes = 1
        gpus_per_node = 0
        nproc_per_node = 2
        jobs = 2
        time = "00:15:00"
        job_name = "llamatron-test"
        rdzv_port = {port}
        env = {{PYTHONPATH = "{REPO}"}}
        """))
    return path


def _losses(run: Path) -> dict[int, float]:
    """Loss per step; a step trained again after a resume overwrites the earlier record."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _newest_step(run: Path) -> int:
    done = [int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    return max(done, default=0)


def _squeue(env, *jobs) -> dict[str, str]:
    out = _run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T"], env=env,
               capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_two_chained_jobs_preempted_by_requeue_match_an_uninterrupted_run(slurm, tmp_path):
    cfg = _config(tmp_path / "run.toml", _free_port())
    env = {**slurm, "PYTHONPATH": str(REPO)}
    llamatron = [sys.executable, "-m", "llamatron"]

    # The uninterrupted reference: the same two processes under torchrun, no Slurm.
    ref = tmp_path / "reference"
    res = _run([*llamatron, "train", "--config", str(cfg), "--nproc-per-node", "2",
                "--set", f"train.out_dir={ref}"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    run = tmp_path / "slurm-run"
    res = _run([*llamatron, "launch", "--config", str(cfg), "--set", f"train.out_dir={run}"],
               env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = re.findall(r"submitted job (\d+)", res.stdout)
    assert len(jobs) == 2, res.stdout
    first, second = jobs

    # Pre-empt the first job once it has written a checkpoint, well before the end.
    deadline = time.monotonic() + 300
    while _newest_step(run) < 5:
        assert time.monotonic() < deadline, f"no checkpoint in 300 s; squeue: {_squeue(env, *jobs)}"
        time.sleep(0.1)
    step_at_requeue = _newest_step(run)
    assert step_at_requeue < STEPS, "the run finished before it could be pre-empted"
    _run(["scontrol", "requeue", first], env=env, check=True, capture_output=True)

    while _squeue(env, *jobs):
        assert time.monotonic() < deadline + 300, f"jobs still queued after 10 minutes: {_squeue(env, *jobs)}"
        time.sleep(1)

    logs = run / "logs"
    first_log = (logs / f"slurm-{first}.out").read_text()
    second_log = (logs / f"slurm-{second}.out").read_text()
    assert sorted(p.name for p in logs.iterdir()) == sorted([f"slurm-{first}.out", f"slurm-{second}.out"])
    assert "DUE TO JOB REQUEUE" in first_log
    assert f"job {first} (start 2)" in first_log  # the same job again, appended to its log
    resumed = re.search(r"resumed from .*step_(\d+) at step (\d+)", first_log)
    assert resumed and step_at_requeue <= int(resumed.group(2)) < STEPS, first_log[-3000:]
    assert "training exited with status 0" in first_log
    assert "already finished" in second_log and "torchrun" not in second_log  # no retraining

    a, b = _losses(ref), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in a] == [a[s] for s in a]  # bit-identical, the final loss included
    assert len(set(a.values())) > STEPS // 2  # a real trajectory, not a constant


def test_a_job_whose_training_exits_75_requeues_itself(slurm, tmp_path):
    """The batch script's side of pre-emption: training that stopped with a checkpoint (exit 75)
    has its job requeued, same id, same log. A stand-in for the trainer exits 75 on the job's
    first start and 0 on the second."""
    cfg = _config(tmp_path / "run.toml", _free_port())
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/bash\necho "stand-in trainer: $*"\n'
                        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] || exit 75\n')
    stand_in.chmod(0o755)
    run = tmp_path / "run"
    res = _run([sys.executable, "-m", "llamatron", "launch", "--config", str(cfg), "--set", f"train.out_dir={run}",
                "--set", "launch.jobs=1", "--set", f"launch.python={stand_in}"],
               env={**slurm, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    (job,) = re.findall(r"submitted job (\d+)", res.stdout)
    deadline = time.monotonic() + 300
    while _squeue(slurm, job):
        assert time.monotonic() < deadline, f"job still queued after 5 minutes: {_squeue(slurm, job)}"
        time.sleep(1)
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert f"exit 75); requeueing job {job}" in log
    assert f"job {job} (start 2)" in log and "training exited with status 0" in log
    assert log.count("stand-in trainer: -m llamatron train --config") == 2
    state = _run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state and "Restarts=1" in state
