"""Faults on purpose (docs/reliability.md): processes killed in the middle of a checkpoint save, a
failing disk, damaged data files, NaN losses, pre-emption signals. Each test checks what survives:
the run resumes from the newest complete checkpoint and its losses continue exactly as an
uninterrupted run's, or it stops with a one-line error naming the culprit.

Runs that must die are subprocesses (`python -m llamatron train`, this checkout's package); the rest
run in process. Model: the debug size, synthetic tokens, 6 steps of batch 4, fp32 on the CPU.
"""

import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llamatron.cli import main
from llamatron.config import load_config
from llamatron.data.indexed import IndexedDatasetWriter
from llamatron.errors import REQUEUE_EXIT_CODE, LlamatronError
from llamatron.train import checkpoint as ckpt
from llamatron.runtime import load_batch
from llamatron.testing import faults
from llamatron.train import reliability
from llamatron.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _overrides(out_dir, steps=STEPS, extra=()):
    return ["model.size=debug", "data.mock=true", "data.seq_len=32", f"train.steps={steps}",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.device=cpu", "train.threads=1",
            "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=2", "optim.schedule_steps=8",
            "eval.samples=0", "eval.every=0", "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=2",
            f"train.out_dir={out_dir}", *extra]


def _train(out_dir, steps=STEPS, extra=()):
    # The same config as the subprocess runs': the demo preset with these overrides.
    return train(load_config("demo", _overrides(out_dir, steps, extra)), progress=False, log=lambda *_: None)


def _run(out_dir, steps=STEPS, extra=(), fault=None, preexec_fn=None, wait=True):
    """`llamatron train` in a subprocess of this checkout."""
    cmd = [sys.executable, "-m", "llamatron", "train", "--config", "demo"]
    for o in _overrides(out_dir, steps, extra):
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    # Its own session: a signal meant for the run (or sent by it) can never reach the test process.
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=preexec_fn, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn,
                          start_new_session=True)


def _rows(out_dir, kind=None):
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _losses(out_dir) -> dict[int, list[float]]:
    """Every loss logged for each step, in order (a step redone after a crash appears twice)."""
    out: dict[int, list[float]] = {}
    for r in _rows(out_dir, "train"):
        out.setdefault(r["step"], []).append(r["loss"])
    return out


def _hidden(out_dir):
    return sorted(p.name for p in ckpt.checkpoints_root(out_dir).iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: loss of each of the 6 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _train(out)
    losses = {s: v[0] for s, v in _losses(out).items()}
    assert sorted(losses) == list(range(1, STEPS + 1)) and len(set(losses.values())) == STEPS
    return losses


def _assert_continues_exactly(out_dir, reference):
    """Every loss the run logged, before and after its crash, equals the uninterrupted run's, bit for bit."""
    got = _losses(out_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, values in got.items():
        assert all(v == reference[step] for v in values), (step, values, reference[step])


# --------------------------------------------------------------------------------------------------
# kill -9 during a checkpoint save


KILL_PHASES = {
    # phase: (how the process dies, the checkpoint the next run resumes from)
    "before_data": (-signal.SIGKILL, 2),
    "during_data": (-signal.SIGXFSZ, 2),
    "after_data": (-signal.SIGKILL, 2),
    "before_marker": (-signal.SIGKILL, 2),
    "before_rename": (-signal.SIGKILL, 2),
    "after_rename": (-signal.SIGKILL, 4),
}


@pytest.mark.parametrize("phase", list(KILL_PHASES))
def test_killed_during_save_resumes_from_newest_complete(phase, reference, tmp_path):
    out = tmp_path / "run"
    died = _run(out, fault=f"kill@save={phase}@step=4")
    status, resume_step = KILL_PHASES[phase]
    assert died.returncode == status, died.stderr[-3000:]
    assert ckpt.latest_checkpoint(out).name == f"step_{resume_step:08d}"
    if resume_step == 2:  # the interrupted save is there, under its temporary name only
        assert _hidden(out) == [".step_00000004.tmp"]
    assert max(_losses(out)) == 4  # steps 3 and 4 were done, and are lost unless the save completed

    _train(out)  # the same command again
    resumed = _rows(out, "resume")
    assert [r["step"] for r in resumed] == [resume_step]
    _assert_continues_exactly(out, reference)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert _hidden(out) == []  # the leftover was removed


ASYNC = ["checkpoint.async_save=true"]
# An asynchronous save dies where each phase runs: the training thread up to the staging copy, the
# writer thread from the shard write on (training has gone on meanwhile: steps 5 and 6 may be done).
ASYNC_KILL_PHASES = {**{p: KILL_PHASES[p] for p in ("during_data", "after_data", "before_marker", "before_rename",
                                                    "after_rename")},
                     "async_write": (-signal.SIGKILL, 2)}


@pytest.mark.parametrize("phase", list(ASYNC_KILL_PHASES))
def test_killed_during_async_save_resumes_from_newest_complete(phase, reference, tmp_path):
    out = tmp_path / "run"
    died = _run(out, extra=ASYNC, fault=f"kill@save={phase}@step=4")
    status, resume_step = ASYNC_KILL_PHASES[phase]
    assert died.returncode == status, died.stderr[-3000:]
    assert ckpt.latest_checkpoint(out).name == f"step_{resume_step:08d}"
    if resume_step == 2:
        assert _hidden(out) == [".step_00000004.tmp"]
    assert max(_losses(out)) in (4, 5, 6)

    _train(out, extra=ASYNC)
    assert [r["step"] for r in _rows(out, "resume")] == [resume_step]
    _assert_continues_exactly(out, reference)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert _hidden(out) == []


def test_async_save_is_a_snapshot_and_resumes_like_sync(reference, tmp_path, monkeypatch):
    """The writer of step 2's save is held until training has finished step 3 (weights, moments, step
    counts and RNG all moved on): the checkpoint still holds step 2, and resuming from it continues
    exactly as the synchronous run did. The staging buffers were allocated in the background, from
    after step 1 on: no save allocated one."""
    from llamatron import hooks

    out, gate, saves_began, stagers = tmp_path / "run", threading.Event(), [], []
    staging = ckpt.Checkpointer._staging
    monkeypatch.setattr(ckpt.Checkpointer, "_staging", lambda self: stagers.append(staging(self)) or stagers[-1])

    def hold_writer(phase, step, rank):
        if phase == "before_data":
            saves_began.append(time.perf_counter())
        if phase == "async_write" and step == 2:
            assert gate.wait(120)

    def release(step, rank, model):
        if step == 3:
            gate.set()

    removers = [hooks.add("save", hold_writer), hooks.add("step_end", release)]
    try:
        _train(out, extra=[*ASYNC, "checkpoint.keep=3"])
    finally:
        [remove() for remove in removers]
    assert gate.is_set()
    stager = stagers[0]
    assert all(s is stager for s in stagers) and len(saves_began) == 3
    assert stager.prealloc["error"] is None and stager.prealloc["started"] < saves_began[0]
    assert stager.prealloc["buffers"] > 0 and stager.allocated == 0  # three saves, not one buffer allocated by them
    assert {s: v[0] for s, v in _losses(out).items()} == reference  # async saves change no loss
    rows = _rows(out, "checkpoint")
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["async"] and r["save_s"] > 0 for r in rows)
    assert json.loads((ckpt.checkpoints_root(out) / "step_00000002" / "trainer_state.json").read_text())["step"] == 2
    for later in ("step_00000004", "step_00000006"):  # resume from the held save of step 2
        ckpt._discard(ckpt.checkpoints_root(out) / later)
    _train(out)  # synchronous this time
    assert [r["step"] for r in _rows(out, "resume")] == [2]
    _assert_continues_exactly(out, reference)


@pytest.mark.slow
def test_async_save_two_ranks(tmp_path):
    """2 ranks (FSDP over gloo), asynchronous saves; resuming from step 2's checkpoint repeats the
    losses of steps 3 and 4 bit for bit."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "llamatron", "train", "--config", "demo"]
    for o in _overrides(out, steps=4, extra=[*ASYNC, "checkpoint.keep=3", "parallel.dp_shard=2",
                                             "train.micro_batch_size=1"]):
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        if _ == 0:
            assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002", "step_00000004"]
            assert [r["step"] for r in _rows(out, "checkpoint") if r["async"]] == [2, 4]
            first = {s: v[0] for s, v in _losses(out).items()}
            ckpt._discard(ckpt.checkpoints_root(out) / "step_00000004")
    assert [r["step"] for r in _rows(out, "resume")] == [2]
    assert {s: v[-1] for s, v in _losses(out).items()} == first and len(_losses(out)[3]) == 2


def test_async_save_failure_is_reported_and_keeps_previous(reference, tmp_path):
    """A write error in the background (RLIMIT_FSIZE, as for a full disk) fails the run at the next
    wait with the same one-line error; the previous checkpoint is untouched."""
    out = tmp_path / "run"
    assert _run(out, steps=2, extra=ASYNC).returncode == 0

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    failed = _run(out, steps=4, extra=ASYNC, preexec_fn=small_files)
    assert failed.returncode == 2, failed.stderr[-3000:]
    err = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr and f"{out}/checkpoints/step_00000004: save failed" in err[-1]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002"] and _hidden(out) == []


def test_async_staging_allocation_failure_fails_the_first_save(tmp_path, monkeypatch, capsys):
    """The background allocation of the staging buffers fails (ENOMEM in its thread, as on a host out
    of memory): training goes on to the first save, which fails with the one-line save error naming
    it, and leaves nothing behind."""
    out = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "staging_nomem")
    assert main(["train", "--config", "demo", *(a for o in _overrides(out, extra=ASYNC) for a in ("--set", o))]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert err[-1].startswith(f"llamatron train: error: checkpoint {out}/checkpoints/step_00000002: save failed "
                              "(RuntimeError: allocating the ")
    assert "in the background failed (OSError: [Errno 12] Cannot allocate memory)" in err[-1]
    assert "no earlier checkpoint exists" in err[-1]
    assert ckpt.list_checkpoints(out) == [] and _hidden(out) == [] and max(_losses(out)) == 2


def test_save_fails_on_full_disk_and_keeps_previous_checkpoint(reference, tmp_path, capsys):
    """A real write error from the kernel: RLIMIT_FSIZE makes writes past 1 MiB fail (EFBIG), as a
    full disk fails them (ENOSPC); a checkpoint shard of the debug model is 2.2 MB."""
    out = tmp_path / "run"
    assert _run(out, steps=2).returncode == 0

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    failed = _run(out, steps=4, preexec_fn=small_files)
    assert failed.returncode == 2
    err = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr and err[-1].startswith("llamatron train: error: checkpoint ")
    assert f"{out}/checkpoints/step_00000004: save failed" in err[-1]
    assert "step_00000002 is untouched" in err[-1]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002"] and _hidden(out) == []

    _train(out)  # space again: resumes from step 2
    _assert_continues_exactly(out, reference)


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    _train(out, steps=2)
    shard = next((out / "checkpoints" / "step_00000002").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    # Its checksums name the file; nothing older to fall back to (tests/test_checksums.py has the rest).
    with pytest.raises(LlamatronError, match=r"step_00000002: damaged \(__0_0.distcp has \d+ bytes but was saved "
                                             r"with \d+\); no complete checkpoint before it is left"):
        _train(out, steps=4)


def test_unwritable_checkpoint_directory_fails_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoint directory should be")
    with pytest.raises(LlamatronError, match=r"checkpoints: checkpoints cannot be written there"):
        _train(out, steps=2)
    assert not (out / "metrics.jsonl").exists()  # before any training


# --------------------------------------------------------------------------------------------------
# Non-finite losses


@pytest.fixture
def inject():
    """Faults in this process for the test (the hook points of llamatron/hooks.py): inject(spec)
    installs them and returns their remover; whatever is left is removed at the end."""
    removers = []

    def install(spec):
        removers.append(faults.install(spec))
        return removers[-1]

    yield install
    for remove in removers:
        remove()


def test_nan_stop_names_step_and_samples_and_loses_nothing(reference, tmp_path, inject):
    out = tmp_path / "run"
    remove = inject("nan_loss@step=3")
    with pytest.raises(LlamatronError) as e:
        _train(out, extra=["checkpoint.every=0"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "step 3: non-finite loss" in msg and "training samples 8-11" in msg and "this rank read 8-11" in msg
    assert "no update was applied" in msg and "step_00000002" in msg
    # The work before the bad step was checkpointed: resuming (here without the fault: a transient
    # NaN) continues exactly as if nothing had happened.
    assert ckpt.latest_checkpoint(out).name == "step_00000002"
    assert [r["step"] for r in _rows(out, "nonfinite")] == [3]
    remove()
    _train(out)
    _assert_continues_exactly(out, reference)


def test_nan_skip_drops_the_batch_and_counts_it(reference, tmp_path, inject):
    out = tmp_path / "run"
    inject("nan_loss@step=3")
    result = _train(out, extra=["train.nonfinite=skip"])
    assert result.steps == STEPS and result.skipped_steps == 1
    rows = {r["step"]: r for r in _rows(out, "train")}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert np.isnan(rows[3]["loss"])
    assert [rows[s]["loss"] for s in (1, 2)] == [reference[1], reference[2]]
    # Steps 4-6 train on from the weights of step 2 (the step-3 update was never applied).
    assert all(np.isfinite(rows[s]["loss"]) and rows[s]["loss"] != reference[s] for s in (4, 5, 6))
    assert json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())["skipped_steps"] == 1


def test_nan_skip_stops_after_too_many_in_a_row(tmp_path, inject):
    inject("nan_loss@step=3,nan_loss@step=4")
    with pytest.raises(LlamatronError, match=r"step 4: .*2 steps in a row were non-finite"):
        _train(tmp_path / "run", extra=["train.nonfinite=skip", "train.nonfinite_max_skips=2"])


def test_gradient_norm_spike_is_logged(tmp_path, inject):
    out = tmp_path / "run"
    inject("spike@step=13")
    _train(out, steps=14, extra=["optim.schedule_steps=14"])
    spikes = _rows(out, "grad_spike")
    assert [r["step"] for r in spikes] == [13]
    assert spikes[0]["grad_norm"] > 5 * spikes[0]["median"]


def test_grad_spike_rule():
    history: list[float] = []
    assert [reliability.grad_spike(history, x, 5.0) for x in [1.0] * 10] == [None] * 10
    assert reliability.grad_spike(history, 4.9, 5.0) is None
    assert reliability.grad_spike(history, 6.0, 5.0) == 1.0
    assert reliability.grad_spike(history, 100.0, 0.0) is None  # off
    assert reliability.describe_indices([5, 0, 1, 2, 9, 10]) == "0-2, 5, 9-10"


# --------------------------------------------------------------------------------------------------
# Pre-emption


@pytest.mark.parametrize("sig", ["sigterm", "sigusr1"])
def test_stop_signal_checkpoints_and_exits_for_requeue(sig, reference, tmp_path):
    out = tmp_path / "run"
    stopped = _run(out, fault=f"{sig}@step=3")
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stderr[-3000:]
    assert f"stopped early by {sig.upper()}" in stopped.stdout
    assert ckpt.latest_checkpoint(out).name == "step_00000003"  # the step in flight finished, then saved
    assert max(_losses(out)) == 3
    _train(out)
    _assert_continues_exactly(out, reference)


def test_external_sigterm_mid_run(tmp_path):
    """A real SIGTERM from outside, at whatever step the run has reached."""
    out = tmp_path / "run"
    proc = _run(out, steps=100000, extra=["optim.schedule_steps=100000"], wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and _rows(out, "train")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    last = max(r["step"] for r in _rows(out, "train"))
    assert ckpt.latest_checkpoint(out).name == f"step_{last:08d}"


def test_cli_exit_code_on_stop_signal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "sigterm@step=1")
    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: earlier tests may have run torchrun in-process
    code = main(["train", "--config", "demo", *sum((["--set", o] for o in _overrides(tmp_path / "run", 3)), [])])
    assert code == REQUEUE_EXIT_CODE
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000001"
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer put the handler back


@pytest.mark.slow
def test_ranks_agree_on_skip_and_stop(tmp_path):
    """Two ranks (FSDP over gloo): the NaN and the SIGTERM reach rank 1 only; both ranks skip the
    same step and stop after the same step, with one complete checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "llamatron", "train", "--config", "demo"]
    for o in _overrides(out, extra=["train.nonfinite=skip", "parallel.dp_shard=2", "train.micro_batch_size=1"]):
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           faults.ENV: "nan_loss@step=2@rank=1,sigterm@step=3@rank=1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    log = proc.stdout + proc.stderr
    # torchrun turns a worker's non-zero exit into its own failure (exit 1) and stops the other worker
    # (by then past the checkpoint); its report names the worker's exit code.
    assert re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}\b", log), log[-4000:]
    assert "step 2: non-finite loss" in log and "stopping after this step" in log
    state = json.loads((ckpt.latest_checkpoint(out) / "trainer_state.json").read_text())
    assert ckpt.latest_checkpoint(out).name == "step_00000003" and state["skipped_steps"] == 1


# --------------------------------------------------------------------------------------------------
# Damaged data files: one line naming the file, never a traceback


def _tokenizer(tmp_path) -> Path:
    """A tiktoken BPE of the 256 bytes: with its 256 special tokens, the debug model's 512 entries."""
    import base64

    p = tmp_path / "tokenizer.model"
    p.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return p


def _data(tmp_path, dtype=np.uint16, top=512) -> str:
    rng = np.random.default_rng(0)
    prefix = tmp_path / "data"
    with IndexedDatasetWriter(prefix, dtype) as w:
        for _ in range(40):
            w.add_document(rng.integers(0, top, size=int(rng.integers(20, 60))))
    return str(prefix)


def _data_cli(tmp_path, prefix, extra=()):
    args = ["train", "--config", "demo"]
    for o in [*_overrides(tmp_path / "run", 2), "data.mock=false", f"data.train={prefix}",
              f"data.tokenizer={_tokenizer(tmp_path)}", f"data.cache_dir={tmp_path / 'cache'}", *extra]:
        args += ["--set", o]
    return args


def _set_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


DAMAGE = {
    "bin truncated": (lambda p: _truncate(p + ".bin", os.path.getsize(p + ".bin") - 10), "data.bin: size"),
    "idx truncated": (lambda p: _truncate(p + ".idx", 100), "data.idx: 100 bytes"),
    "idx empty": (lambda p: _truncate(p + ".idx", 0), "data.idx: 0 bytes"),
    "idx bad magic": (lambda p: _set_bytes(p + ".idx", 0, b"GARBAGE!!"), "data.idx: bad magic"),
    "idx bad version": (lambda p: _set_bytes(p + ".idx", 9, struct.pack("<Q", 7)), "data.idx: index version 7"),
    # the pointer of sequence 5 (after the 34-byte header and 40 int32 lengths) points past the .bin
    "idx bad pointer": (lambda p: _set_bytes(p + ".idx", 34 + 4 * 40 + 8 * 5, struct.pack("<q", 1 << 40)),
                        "data.idx: sequence 5"),
    "idx negative length": (lambda p: _set_bytes(p + ".idx", 34 + 4 * 7, struct.pack("<i", -3)), "data.idx: sequence 7"),
    "token beyond vocab": (lambda p: _set_bytes(p + ".bin", 100, struct.pack("<H", 40000)),
                           "data.bin: token id 40000 is outside the model vocabulary [0, 512)"),
    "bin random bytes": (lambda p: _set_bytes(p + ".bin", 0, np.random.default_rng(1).bytes(os.path.getsize(p + ".bin"))),
                         "is outside the model vocabulary"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_data_is_a_one_line_error(damage, tmp_path, capsys):
    prefix = _data(tmp_path)
    spoil, needle = DAMAGE[damage]
    spoil(prefix)
    code = main(_data_cli(tmp_path, prefix))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("llamatron train: error: ") and needle in line, line


def test_good_data_trains(tmp_path, capsys):
    assert main(_data_cli(tmp_path, _data(tmp_path))) == 0


def test_float_tokens_rejected(tmp_path, capsys):
    prefix = _data(tmp_path, dtype=np.float32, top=10)
    assert main(_data_cli(tmp_path, prefix)) == 2
    assert "data.idx: tokens stored as float32; token ids must be integers" in capsys.readouterr().err


def test_dtype_too_narrow_for_tokenizer(tmp_path, capsys):
    """uint16 files cannot hold the Llama 3.1 tokenizer's 128,256 ids: tokenized with something else."""
    prefix = _data(tmp_path)
    assert main(_data_cli(tmp_path, prefix, ["data.tokenizer=llama3", "model.vocab_size=128256"])) == 2
    assert "tokens stored as uint16 (at most 65535) cannot hold the 128,256 ids" in capsys.readouterr().err


def test_bad_token_missed_by_sampled_scan_caught_at_batch_load(tmp_path, capsys, monkeypatch):
    """Large files are only sampled at start-up; every batch is checked as it is read."""
    from llamatron.data import build

    prefix = _data(tmp_path)
    monkeypatch.setattr(build, "TOKEN_SCAN_BYTES", 4)  # 4 bytes: sample 2 tokens at the file's ends
    _set_bytes(prefix + ".bin", 1000, struct.pack("<H", 9999))
    code = main(_data_cli(tmp_path, prefix, ["train.global_batch_size=40", "train.micro_batch_size=20"]))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "holds token id 9999, outside the model vocabulary [0, 512)" in err.strip().splitlines()[-1]


def test_load_batch_vocab_guard():
    data = [np.array([1, 2, 3]), np.array([4, 700, 6])]
    load_batch(data, [0], torch.device("cpu"), vocab_size=512)
    with pytest.raises(LlamatronError, match="training sample 1 .* token id 700"):
        load_batch(data, [0, 1], torch.device("cpu"), vocab_size=512)


# --------------------------------------------------------------------------------------------------
# Config and fault-spec validation


@pytest.mark.parametrize("override, needle", [
    ("train.nonfinite=ignore", "'train.nonfinite'"),
    ("train.nonfinite_max_skips=0", "'train.nonfinite_max_skips'"),
    ("train.grad_spike_factor=0.5", "'train.grad_spike_factor'"),
    ("checkpoint.keep=0", "'checkpoint.keep'"),
    ("optim.beta2=1.5", "'optim.beta2'"),
    ("optim.grad_clip=-1", "'optim.grad_clip'"),
    ("optim.name=adam", "'optim.name': must be one of adamw, adamw8bit, got 'adam'"),
    ("optim.name=adamw8bit optim.fused=true", "'optim.fused'"),
    ("train.cast_weights_once=false train.gradient_accumulation_fusion=true",
     "'train.gradient_accumulation_fusion': needs train.cast_weights_once"),
    ("train.fp8=rowwise train.cast_weights_once=true", "'train.cast_weights_once': casts tensorwise FP8 weights once"),
])
def test_new_config_keys_validated(override, needle):
    with pytest.raises(LlamatronError, match=needle):
        load_config(None, ["data.mock=true", *override.split()])


@pytest.mark.parametrize("spec", ["explode@step=1", "kill@save=sometime", "nan_loss@step=x", "nan_loss@when=3"])
def test_bad_fault_spec_names_the_variable(spec):
    with pytest.raises(LlamatronError, match=faults.ENV):
        faults.parse(spec)


def test_init_from_checked_before_start(tmp_path):
    with pytest.raises(LlamatronError, match="'checkpoint.init_from'"):
        _train(tmp_path / "run", extra=[f"checkpoint.init_from={tmp_path / 'nothing'}"])
