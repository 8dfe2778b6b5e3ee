"""Checkpoint checksums (docs/reliability.md, "Checksums"): every file's CRC32 is written at the save
and checked before resume, eval, init_from and export, so bytes changed after the save are an error
naming the file instead of a silently different model; a damaged newest checkpoint names the one
before, and `checkpoint.fallback=true` resumes from it exactly.

The damage is the issue's: 16 bytes flipped inside a tensor's data in a `.distcp` shard (the lowest
byte of 16 float32 values, so that the values stay finite and DCP loads them without complaint).
Model: the debug size, synthetic tokens, fp32 on the CPU, in process except the two-rank test.
"""

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from llamatron.cli import main
from llamatron.config import load_config
from llamatron.data.indexed import IndexedDatasetWriter
from llamatron.errors import LlamatronError
from llamatron.testing import faults
from llamatron.train import checkpoint as ckpt
from llamatron.train.trainer import train

from test_reliability import STEPS, _overrides  # the same tiny run as the crash tests

REPO = Path(__file__).resolve().parents[1]


def _train(out_dir, steps=STEPS, extra=(), log=None):
    return train(load_config("demo", _overrides(out_dir, steps, extra)), progress=False,
                 log=log or (lambda *_: None))


def _cli(out_dir, steps=STEPS, extra=()):
    return ["train", "--config", "demo", *sum((["--set", o] for o in _overrides(out_dir, steps, extra)), [])]


def _losses(out_dir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in open(Path(out_dir) / "metrics.jsonl"):
        r = json.loads(line)
        if r["kind"] == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def _resumed(out_dir) -> list[int]:
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return [r["step"] for r in rows if r["kind"] == "resume"]


def _step(out_dir, step) -> Path:
    return ckpt.checkpoints_root(out_dir) / f"step_{step:08d}"


def _flip(checkpoint: Path, shard: str = "__0_0.distcp", fqn: str = "model.tok_embeddings.weight") -> str:
    """Flip the lowest byte of 16 float32 values of `fqn`'s chunk stored in `shard`; returns the shard."""
    md = FileSystemReader(str(checkpoint)).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == fqn and v.relative_path == shard)
    data = bytearray((checkpoint / shard).read_bytes())
    tensor = torch.load(io.BytesIO(bytes(data[info.offset:info.offset + info.length])), weights_only=True)
    start = data.index(tensor.numpy().tobytes(), info.offset)  # the values, inside DCP's torch.save record
    for i in range(16):
        data[start + 4 * i] ^= 0xFF
    (checkpoint / shard).write_bytes(data)
    return shard


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: loss of each step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _train(out)
    return {s: v[0] for s, v in _losses(out).items()}


@pytest.fixture
def damaged_run(tmp_path):
    """A run of 4 steps (checkpoints of steps 2 and 4), step 4's shard damaged."""
    out = tmp_path / "run"
    _train(out, steps=4)
    _flip(_step(out, 4))
    return out


def test_checkpoint_lists_every_file_and_loads_verified(tmp_path):
    out = tmp_path / "run"
    _train(out, steps=2)
    path = _step(out, 2)
    manifest = json.loads((path / ckpt.CHECKSUMS).read_text())
    assert manifest["algorithm"] == "crc32"
    on_disk = {p.name for p in path.iterdir()}
    assert set(manifest["files"]) == on_disk - {ckpt.MARKER, ckpt.CHECKSUMS}
    assert {"__0_0.distcp", ".metadata", "rng_rank0.pt", "trainer_state.json", "config.yaml"} <= set(manifest["files"])
    for name, saved in manifest["files"].items():
        data = (path / name).read_bytes()
        assert saved == {"crc32": zlib.crc32(data), "bytes": len(data)}, name
    assert ckpt.verify_checkpoint(path) == sum(f["bytes"] for f in manifest["files"].values())
    lines = []
    _train(out, steps=3, log=lines.append)  # resume verifies first
    assert any(f"{path}: its" in line and "match their checksums" in line for line in lines), lines
    assert _resumed(out) == [2]


def test_flipped_bytes_fail_resume_naming_the_file_and_the_checkpoint_before(damaged_run, capsys):
    out = damaged_run
    with pytest.raises(LlamatronError) as e:
        _train(out)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{_step(out, 4)}: damaged (__0_0.distcp has crc32 ")
    assert "the checkpoint before it is step_00000002: resume from it with --set checkpoint.fallback=true" in msg
    assert "moved aside as step_00000004.damaged" in msg
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002", "step_00000004"]  # nothing moved

    capsys.readouterr()
    assert main(_cli(out)) == 2  # the CLI: exit 2, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"llamatron train: error: {msg}"


def _tokens(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "v", np.uint16) as w:
        for _ in range(8):
            w.add_document(rng.integers(0, 512, size=40))
    return tmp_path / "v"


def test_flipped_bytes_fail_eval_naming_the_file(damaged_run, tmp_path, capsys):
    data = _tokens(tmp_path)
    assert main(["eval", "--checkpoint", str(_step(damaged_run, 2)), "--data", str(data)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(damaged_run), "--data", str(data)]) == 2  # the newest: step 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"llamatron eval: error: {_step(damaged_run, 4)}: damaged: __0_0.distcp has crc32 ")


def test_verify_false_loads_the_damaged_checkpoint(damaged_run):
    """What the checks prevent: without them the damaged weights load without an error."""
    path = _step(damaged_run, 4)
    loaded = ckpt.consolidated_state_dict(path, verify=False)["tok_embeddings.weight"]
    with pytest.raises(LlamatronError, match="damaged: __0_0.distcp has crc32"):
        ckpt.consolidated_state_dict(path)
    _flip(path)  # flipped back (an XOR): intact again, and verified
    intact = ckpt.consolidated_state_dict(path)["tok_embeddings.weight"]
    assert (loaded != intact).sum().item() == 16 and torch.isfinite(loaded).all()
    _flip(path)

    result = _train(damaged_run, extra=["checkpoint.verify=false"])
    assert result.steps == STEPS and _resumed(damaged_run) == [4]


def test_fallback_resumes_from_the_checkpoint_before_exactly(damaged_run, reference):
    out, lines = damaged_run, []
    _train(out, extra=["checkpoint.fallback=true"], log=lines.append)
    assert _resumed(out) == [2]
    assert any(line.startswith(f"warning: {_step(out, 4)}: damaged (__0_0.distcp has crc32 ") and
               "moved aside as step_00000004.damaged, resuming from step_00000002" in line for line in lines), lines
    got = _losses(out)  # steps 3 and 4 twice: before the damage and after the fallback
    assert sorted(got) == list(range(1, STEPS + 1)) and len(got[3]) == 2
    for step, values in got.items():
        assert all(v == reference[step] for v in values), (step, values, reference[step])
    root = ckpt.checkpoints_root(out)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    aside = root / "step_00000004.damaged"  # kept for inspection: pruning and clean-up leave it alone
    assert (aside / "__0_0.distcp").is_file() and (aside / ckpt.MARKER).is_file()
    with pytest.raises(LlamatronError, match="damaged"):
        ckpt.verify_checkpoint(aside)


def test_fallback_with_nothing_intact_left_fails_in_one_line(damaged_run):
    _flip(_step(damaged_run, 2))
    with pytest.raises(LlamatronError) as e:
        _train(damaged_run, extra=["checkpoint.fallback=true"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{_step(damaged_run, 2)}: damaged (__0_0.distcp has crc32 ")
    assert "no complete checkpoint before it is left" in msg
    names = sorted(p.name for p in ckpt.checkpoints_root(damaged_run).iterdir())
    assert names == ["step_00000002", "step_00000004.damaged"]


def test_async_save_writes_the_same_checksums(tmp_path):
    sync, asynchronous = tmp_path / "sync", tmp_path / "async"
    _train(sync, steps=2)
    _train(asynchronous, steps=2, extra=["checkpoint.async_save=true"])
    a, b = (json.loads((_step(o, 2) / ckpt.CHECKSUMS).read_text())["files"] for o in (sync, asynchronous))
    assert set(a) == set(b) and not list(_step(asynchronous, 2).glob("checksums_rank*"))
    # The same state in the same bytes (the snapshot is exact): shard, RNG and trainer state; .metadata
    # differs by DCP's save id, config.yaml by the keys of the two runs.
    same = {"__0_0.distcp", "rng_rank0.pt", "trainer_state.json"}
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert ckpt.verify_checkpoint(_step(asynchronous, 2)) == sum(f["bytes"] for f in b.values())
    _flip(_step(asynchronous, 2))
    with pytest.raises(LlamatronError, match="__0_0.distcp has crc32"):
        ckpt.verify_checkpoint(_step(asynchronous, 2))


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path, reference):
    """Saved by an older llamatron: resumed unverified, exactly as before."""
    out, lines = tmp_path / "run", []
    _train(out, steps=4)
    for step in (2, 4):
        (_step(out, step) / ckpt.CHECKSUMS).unlink()
    assert ckpt.verify_checkpoint(_step(out, 4)) is None
    _train(out, log=lines.append)
    assert _resumed(out) == [4]
    assert f"warning: {_step(out, 4)}: no checksums.json (saved by an older llamatron): its files cannot be verified" \
        in lines
    assert {s: v[-1] for s, v in _losses(out).items()} == reference


@pytest.mark.slow
def test_two_ranks_merge_their_checksums_and_all_refuse_a_damaged_shard(tmp_path):
    """2 ranks (FSDP over gloo): each rank's shard and RNG file in the one checksums.json; a shard
    that rank 1 checks is damaged, and both ranks fail with the same line (exit 2, no hang)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)

    def run(steps):
        cmd = [sys.executable, "-m", "llamatron", "train", "--nproc-per-node", "2", "--config", "demo"]
        for o in _overrides(out, steps, ["parallel.dp_shard=2", "train.micro_batch_size=1"]):
            cmd += ["--set", o]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)

    first = run(4)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    path = _step(out, 4)
    files = sorted(json.loads((path / ckpt.CHECKSUMS).read_text())["files"])
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "config.yaml", "rng_rank0.pt", "rng_rank1.pt",
                     "trainer_state.json"]
    assert not list(path.glob("checksums_rank*"))
    assert files[1::2][0] == _flip(path, "__0_0.distcp")  # rank 1 checks files[1::2]
    failed = run(STEPS)
    assert failed.returncode == 2, (failed.stdout + failed.stderr)[-4000:]
    line = (f"llamatron train: error: {path}: damaged (__0_0.distcp has crc32 ")
    errors = [x for x in failed.stderr.splitlines() if x.startswith(line)]
    assert len(errors) == 2 and errors[0] == errors[1], failed.stderr[-4000:]  # both ranks, the same line
    assert "the checkpoint before it is step_00000002" in errors[0]
