"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, schedule position, data
position and RNG, saved together so a run resumes exactly.

Layout of one checkpoint, `OUT/checkpoints/step_00000100/`:
    .metadata, __*.distcp     DCP shards: {"model": ..., "optim": ...} keyed by clean parameter names
                              (the optimizer state flattened as "state.NAME.exp_avg", ...)
    rng_rank{r}.pt            each rank's RNG states (plain tensors, loaded with weights_only=True)
    trainer_state.json        step, consumed samples, ...
    config.yaml               the resolved run config (what `eval` needs to rebuild the model)
    checksums.json            size and CRC32 of each file above (`verify_checkpoint`)
    COMPLETE                  written last; a directory without it is never resumed from

A checkpoint is written under a temporary name (`.step_00000100.tmp`), fsynced, marked COMPLETE and
renamed, so a crash at any moment leaves the previous checkpoint usable; directories without the
marker and hidden leftovers of crashed saves are never resumed from and are removed by the next run
or save. Old checkpoints are renamed to a hidden name before they are deleted, for the same reason.

An asynchronous save (`checkpoint.async_save`, `save_checkpoint_async`) writes the same files in the
same order: the state is copied to host memory while training waits (`HostStager`: host buffers
kept for the run, allocated in a background thread after the first step, filled at PCIe speed), a
DCP writer thread writes the shards, and the marker and rename follow in that thread (rank 0) once
every rank's shards are written.
One save is in flight at a time; `Checkpointer` waits for it before the next save and at the end.

Every tensor is stored by its name in the whole model, whatever the layout that saved it: DCP records
which slice of it each rank wrote (FSDP or TP shards, or a pipeline stage's layers), and a load
reads whatever slices the loading layout needs. So a run saved with one layout (FSDP over 2 ranks,
say) resumes with another (TP 2, pipeline stages, or a single process), and `consolidated_state_dict`
reads any checkpoint back as one plain state dict.

Each rank checksums the files it wrote right after writing them (in the writer thread of an
asynchronous save) and rank 0 merges the lists into checksums.json before the marker. Resume, eval,
init_from and export check every file against it first (`verify_checkpoint`, spread over the ranks),
so bytes changed after the save fail the load naming the file instead of loading silently; a damaged
newest checkpoint at resume names the one before, and `checkpoint.fallback` resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llamatron.errors import LlamatronError
from llamatron import hooks
from llamatron.train.host_staging import HostStager, size_text
from llamatron.train.resume_check import check_optimizer_state, check_resume_config

MARKER = "COMPLETE"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _aside_name(path: Path) -> Path:
    """Where a damaged checkpoint is moved: a name that resume never reads and no clean-up removes."""
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged{n}")
    return aside


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def finished_run(out_dir: str | Path, steps: int, resume: bool = True, log=print) -> tuple[int, Path] | None:
    """(step, newest checkpoint) of a run already at `steps` (a later job of a chain, the same command
    or `train()` call again), after saying so; None when there is training left. Going on would
    reload, validate again and append a duplicate eval row."""
    newest = latest_checkpoint(out_dir) if resume else None
    if newest is None:
        return None
    step = int(read_trainer_state(newest)["step"])
    if step < steps:
        return None
    log(f"run {out_dir} already finished: checkpoint at step {step} (train.steps = {steps}); nothing to train")
    return step, newest


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def quiet_dcp():
    # DCP warns that it runs without a process group in single-process use; that is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# Optimizer state by parameter name ("state.layers.0.attention.wq.weight.exp_avg"), not by position in
# the optimizer: the positions differ between layouts (a pipeline stage has some of the parameters).
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# Frozen parameters (LoRA's base weights) left out: adapter-only checkpoints (checkpoint.save_frozen=false).
# Not strict on load: the frozen keys are absent by design (every trainable one is read, or dcp.load fails).
_OPTIONS_TRAINABLE = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


def _state_dicts(model, optimizer, frozen: bool = True) -> list[tuple[dict, dict]]:
    """(model, optimizer) state dicts of each part; the parts hold disjoint names. frozen=False: only
    the parameters that require gradients."""
    options = _OPTIONS if frozen else _OPTIONS_TRAINABLE
    return [get_state_dict(m, o, options=options) for m, o in zip(_as_list(model), _as_list(optimizer))]


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# Checksums: CRC32 (zlib's: 1-4 GB/s on one core, docs/reliability.md; it releases the GIL, so a few
# files hash at once).
_HASH_THREADS = 4
_HASH_CHUNK = 16 << 20


class CheckpointDamaged(LlamatronError):
    """A checkpoint whose files are not what was saved (`reason` names the first bad file)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: damaged: {reason}; its files changed after the save (a disk, copy or transfer "
                         "error): use another checkpoint")


def _crc32_file(path: Path) -> dict:
    crc, size, buf = 0, 0, bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc, size = zlib.crc32(view[:n], crc), size + n
    return {"crc32": crc, "bytes": size}


def _map_threads(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_HASH_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def file_checksums(directory: Path, names) -> dict[str, dict]:
    """{name: {"crc32": ..., "bytes": ...}} of these files of `directory`."""
    names = sorted(names)
    return dict(zip(names, _map_threads(lambda n: _crc32_file(directory / n), names)))


def _write_checksums(path: Path, files: dict[str, dict]) -> None:
    # One line per file: {"algorithm": "crc32", "files": {name: {"crc32": ..., "bytes": ...}, ...}}
    lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(files[name])}" for name in sorted(files))
    text = f'{{"algorithm": "crc32", "files": {{\n{lines}\n}}}}\n'
    _write_synced(path, lambda f: f.write(text.encode()))


def write_checksums(directory: str | Path) -> None:
    """checksums.json of every file in a checkpoint directory written by one process (`convert`)."""
    directory = Path(directory)
    names = [p.name for p in directory.iterdir() if p.is_file() and p.name not in (MARKER, CHECKSUMS)]
    _write_checksums(directory / CHECKSUMS, file_checksums(directory, names))


def _rank_checksums(tmp: Path, rank: int) -> Path:
    return tmp / f"checksums_rank{rank}.json"


def _merge_checksums(tmp: Path, world: int) -> None:
    """Rank 0, before the marker: every rank's list and the files written after the shards, in one
    checksums.json (a rank's missing list fails the save)."""
    files = {}
    for r in range(world):
        files.update(json.loads(_rank_checksums(tmp, r).read_text())["files"])
    files.update(file_checksums(tmp, [".metadata", "trainer_state.json", "config.yaml"]))
    _write_checksums(tmp / CHECKSUMS, files)
    for r in range(world):
        _rank_checksums(tmp, r).unlink()


class _ChecksummingWriter(dcp.FileSystemWriter):
    """DCP's file writer (each shard fsynced before .metadata is written) that checksums this rank's
    files once they are written: its shards and its RNG file (written before them), listed in
    checksums_rank{r}.json for rank 0 to merge. In an asynchronous save this runs in the writer
    thread, so training does not wait for the hashing."""

    def __init__(self, path: Path, rank: int):
        super().__init__(str(path), sync_files=True)
        self.dir, self.rank = Path(path), rank

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)  # DCP's file writer returns it completed
        names = {r.storage_data.relative_path for r in future.wait()}
        rng = f"rng_rank{self.rank}.pt"
        if (self.dir / rng).is_file():
            names.add(rng)
        _write_checksums(_rank_checksums(self.dir, self.rank), file_checksums(self.dir, names))
        return future


def _read_manifest(path: Path) -> dict[str, dict] | None:
    """checksums.json's files (None: the checkpoint has none); unreadable: CheckpointDamaged."""
    f = path / CHECKSUMS
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        if data["algorithm"] != "crc32":
            raise ValueError(f"algorithm {data['algorithm']!r}, expected 'crc32'")
        return {str(k): {"crc32": int(v["crc32"]), "bytes": int(v["bytes"])} for k, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamaged(path, f"{CHECKSUMS} is unreadable ({type(e).__name__}: {e})") from None


def _mismatch(path: Path, name: str, saved: dict) -> str | None:
    f = path / name
    if not f.is_file():
        return f"{name} is missing"
    size = f.stat().st_size
    if size != saved["bytes"]:
        return f"{name} has {size} bytes but was saved with {saved['bytes']}"
    crc = _crc32_file(f)["crc32"]
    if crc != saved["crc32"]:
        return f"{name} has crc32 {crc} but was saved with {saved['crc32']}"
    return None


def _gather_objects(obj) -> list:
    """Every rank's `obj` on every rank (a collective: every rank must call it)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def verify_checkpoint(path: str | Path, log=None) -> int | None:
    """Check the size and CRC32 of every file checksums.json lists; raise CheckpointDamaged naming the
    first bad one. Returns the bytes verified, or None for a checkpoint without checksums.json
    (saved by an older llamatron: loaded unverified, with a warning through `log`). With several
    ranks, rank r checks every world-th file and all ranks agree on the outcome (a collective: every
    rank must call it), so all raise together and with the same message."""
    path = Path(path)
    rank, world = _rank(), _world()
    try:
        files, bad = _read_manifest(path), []
        if files is not None:
            mine = list(enumerate(sorted(files)))[rank::world]
            found = _map_threads(lambda item: _mismatch(path, item[1], files[item[1]]), mine)
            bad = [(i, why) for (i, _), why in zip(mine, found) if why]
    except CheckpointDamaged as e:
        files, bad = {}, [(-1, e.reason)]
    results = _gather_objects((files is None, bad))
    bad = sorted(item for _, found in results for item in found)
    if bad:
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise CheckpointDamaged(path, bad[0][1] + more)
    if any(unlisted for unlisted, _ in results):
        if log is not None and rank == 0:
            log(f"warning: {path}: no {CHECKSUMS} (saved by an older llamatron): its files cannot be verified")
        return None
    return sum(f["bytes"] for f in files.values())


def _warn(message: str) -> None:
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory so that no crash leaves it half-deleted under a name that
    counts: rename it to a hidden name first (atomic), then remove the files."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_incomplete(out_dir: str | Path) -> list[Path]:
    """Remove what crashed saves left behind: temporary and half-deleted directories (hidden names),
    and step_* directories without the completion marker. Only one save runs at a time per run
    directory, so at the start of a run or a save nothing of this is in use. Returns what it removed."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        hidden = p.name.startswith(".step_") or p.name.startswith(".trash-")
        if p.is_dir() and (hidden or (_NAME.match(p.name) and not (p / MARKER).is_file())):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _describe_error(e: BaseException) -> str:
    """One line for an exception from a save; DCP wraps each rank's in a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _save_failed(root: Path, tmp: Path, final: Path, error: BaseException | None) -> LlamatronError:
    newest = list_checkpoints(root.parent)
    try:
        free = f"{shutil.disk_usage(root).free / 1e9:.1f} GB free there"
    except OSError:
        free = "free space unknown"
    reason = _describe_error(error) if error is not None else "failed on another rank"
    previous = f"the newest complete checkpoint {newest[-1]} is untouched" if newest else "no earlier checkpoint exists"
    return LlamatronError(
        f"checkpoint {final}: save failed ({reason}; {free}); the partial save under {tmp.name} was removed and {previous}"
    )


def _fail_together(error: BaseException | None, rank: int, root: Path, tmp: Path, final: Path) -> None:
    """Every rank raises the same save error if any rank had one (an all-reduce, so none waits on a
    rank that gave up); rank 0 removes the partial save first."""
    if _any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(root, tmp, final, error) from error


def _begin(out_dir: str | Path, step: int) -> tuple[Path, Path, Path, int]:
    """(root, final, tmp, rank) of the save of `step`; rank 0 has made the empty temporary directory."""
    root = checkpoints_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_incomplete(out_dir)
        tmp.mkdir()
    _barrier()
    return root, final, tmp, rank


def _gather(model, optimizer, frozen: bool = True) -> dict:
    parts = _state_dicts(model, optimizer, frozen)
    return {"model": {k: v for m, _ in parts for k, v in m.items()},
            "optim": {k: v for _, o in parts for k, v in o.items()}}


def _write_rng(tmp: Path, rank: int) -> None:
    rng = _rng_state()
    _write_synced(tmp / f"rng_rank{rank}.pt", lambda f: torch.save(rng, f))


def _finalize(root: Path, tmp: Path, final: Path, step: int, state_json: str, config_yaml: str) -> None:
    """Rank 0, once every rank's shards are written: trainer state, config, checksums, marker, rename."""
    _write_synced(tmp / "trainer_state.json", lambda f: f.write(state_json.encode()))
    _write_synced(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    _merge_checksums(tmp, _world())
    hooks.fire("save", phase="before_marker", step=step, rank=0)
    _write_synced(tmp / MARKER, lambda f: f.write(f"step {step}\n".encode()))
    _fsync_dir(tmp)
    hooks.fire("save", phase="before_rename", step=step, rank=0)
    if final.exists():  # the same step saved again (a run restarted with checkpoint.resume=false)
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _prune(out_dir: str | Path, final: Path, keep: int) -> None:
    """Rank 0, after the rename: only complete checkpoints are counted and removed."""
    hooks.fire("save", phase="after_rename", step=int(_NAME.match(final.name).group(1)), rank=0)
    for old in list_checkpoints(out_dir)[:-keep]:
        if old != final:
            _discard(old)


def save_checkpoint(
    out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, config_yaml: str, keep: int,
    frozen: bool = True,
) -> Path:
    """Save under a temporary name, mark complete, rename: a crash at any moment leaves either no
    step_NNNNNNNN directory or a complete one. Every rank writes its DCP shards; rank 0 writes the
    rest and renames once all ranks are done. A failed write (disk full, I/O error) on any rank
    raises a LlamatronError naming the path on every rank, and leaves earlier checkpoints as they
    were. Keeps the newest `keep` complete checkpoints.

    model, optimizer: a module and its optimizer, or lists of them (pipeline stages of a rank).
    frozen=False: frozen parameters are left out (LoRA: the adapters and their optimizer state only)."""
    root, final, tmp, rank = _begin(out_dir, step)
    hooks.fire("save", phase="before_data", step=step, rank=rank)
    error: BaseException | None = None
    try:
        sd = _gather(model, optimizer, frozen)
        hooks.fire("save", phase="during_data", step=step, rank=rank)
        _write_rng(tmp, rank)  # before the shards, as in the asynchronous save: the writer checksums both
        with quiet_dcp():
            dcp.save(sd, storage_writer=_ChecksummingWriter(tmp, rank))
        hooks.fire("save", phase="after_data", step=step, rank=rank)
    except (Exception, CheckpointException) as e:  # DCP raises CheckpointException, a BaseException
        error = e
    _fail_together(error, rank, root, tmp, final)
    if rank == 0:
        try:
            _finalize(root, tmp, final, step, json.dumps(trainer_state, indent=2), config_yaml)
        except Exception as e:
            error = e
    _fail_together(error, rank, root, tmp, final)
    if rank == 0:
        _prune(out_dir, final, keep)
    _barrier()
    return final


class _BackgroundWriter(_ChecksummingWriter):
    """The checksumming writer, with the hook point of the background write (fault tests kill it there)."""

    def __init__(self, path: Path, step: int, rank: int):
        super().__init__(path, rank)
        self.step = step

    def write_data(self, plan, planner):
        hooks.fire("save", phase="async_write", step=self.step, rank=self.rank)
        return super().write_data(plan, planner)


class AsyncSave:
    """A checkpoint being written by a background thread: the snapshot is taken, the files are not
    complete until `wait` returns. The marker and the rename happen in that thread on rank 0 once
    DCP's write has finished on every rank (DCP ends its save with a collective: rank 0 writes
    .metadata only after every rank reported its shards written)."""

    def __init__(self, out_dir, step, root, final, tmp, rank, state_json, config_yaml, keep, started):
        self.out_dir, self.step, self.root, self.final, self.tmp, self.rank = out_dir, step, root, final, tmp, rank
        self.state_json, self.config_yaml, self.keep = state_json, config_yaml, keep
        self.started, self.finished, self.stall_s = started, None, 0.0
        self.parts: dict[str, float] = {}  # seconds of each part of the snapshot (save_checkpoint_async)
        self.error: BaseException | None = None
        self._done = threading.Event()

    def _written(self, future) -> None:
        """Runs in DCP's writer thread when its save ends (exceptions there would be swallowed)."""
        try:
            future.result()
            hooks.fire("save", phase="after_data", step=self.step, rank=self.rank)
            if self.rank == 0:
                _finalize(self.root, self.tmp, self.final, self.step, self.state_json, self.config_yaml)
                _prune(self.out_dir, self.final, self.keep)
        except BaseException as e:  # CheckpointException is a BaseException
            self.error = e
            if self.rank == 0 and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self.finished = time.perf_counter()
            self._done.set()

    def done(self) -> bool:
        """This rank's part is over (local: no collective)."""
        return self._done.is_set()

    def wait(self) -> Path:
        """Every rank: block until written, then raise on every rank if any rank failed (a collective)."""
        self._done.wait()
        _fail_together(self.error, self.rank, self.root, self.tmp, self.final)
        return self.final


class _Laps(dict):
    """Seconds of each part of a save, by name, in order (bench_checkpoint prints them)."""

    def __init__(self):
        super().__init__()
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self[name], self._t = now - self._t, now


def save_checkpoint_async(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, config_yaml: str,
                          keep: int, stager, process_group, frozen: bool = True) -> AsyncSave:
    """`save_checkpoint` with the write in a background thread: this call returns once the state is
    staged (copied to host memory by `stager`, a HostStager) and this rank's RNG file written;
    `AsyncSave.wait` returns once the checkpoint is complete. The layout on disk and the guarantees
    are those of `save_checkpoint`. `process_group`: a gloo group of all ranks for DCP's collectives
    in the writer thread (None in a single process), apart from the training's own. The returned
    save's `parts` holds the seconds of each part of this call (`stage_s` is inside `async_save_s`,
    and inside it `alloc_s` and `prealloc_wait_s`, the wait for the stager's background allocation)."""
    started, laps = time.perf_counter(), _Laps()
    root, final, tmp, rank = _begin(out_dir, step)
    laps("begin_s")  # rank 0's clean-up and mkdir, and a barrier
    hooks.fire("save", phase="before_data", step=step, rank=rank)
    pending = AsyncSave(out_dir, step, root, final, tmp, rank, json.dumps(trainer_state, indent=2), config_yaml,
                        keep, started)
    error: BaseException | None = None
    try:
        sd = _gather(model, optimizer, frozen)
        laps("gather_s")
        hooks.fire("save", phase="during_data", step=step, rank=rank)
        _write_rng(tmp, rank)  # the RNG of now, before training draws from it again
        laps("rng_s")
        with quiet_dcp():
            future = dcp.async_save(sd, storage_writer=_BackgroundWriter(tmp, step, rank), async_stager=stager,
                                    process_group=process_group, no_dist=process_group is None)
        laps("async_save_s")
    except (Exception, CheckpointException) as e:
        error = e
    _fail_together(error, rank, root, tmp, final)
    laps("agree_s")
    pending.parts = {**laps, "stage_s": stager.stage_s, "alloc_s": stager.alloc_s, "prealloc_wait_s": stager.wait_s}
    future.add_done_callback(pending._written)
    return pending


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / "trainer_state.json"
    if not f.is_file():
        raise LlamatronError(f"{path}: not a llamatron checkpoint (no trainer_state.json)")
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LlamatronError(f"{f}: unreadable ({e}); move {path.name} aside to resume from the checkpoint before") from e


def check_writable(out_dir: str | Path, checkpoint_bytes: int) -> str | None:
    """Fail now, not at the first save hours later, if checkpoints cannot be written; a warning if
    the filesystem has less free space than one more checkpoint needs."""
    root = checkpoints_root(out_dir)
    probe = root / f".step_probe.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_synced(probe, lambda f: f.write(b"ok"))
        probe.unlink()
        free = shutil.disk_usage(root).free
    except OSError as e:
        raise LlamatronError(f"{root}: checkpoints cannot be written there ({e.strerror or e}); "
                             "set train.out_dir to a writable directory or checkpoint.enabled=false") from e
    if free < checkpoint_bytes:
        return (f"{root}: {free / 1e9:.1f} GB free, less than the ~{checkpoint_bytes / 1e9:.1f} GB a checkpoint "
                "takes; saves will fail (the previous checkpoint stays usable)")
    return None


def read_checkpoint_config(path: str | Path) -> str:
    f = Path(path) / "config.yaml"
    if not f.is_file():
        raise LlamatronError(f"{path}: not a llamatron checkpoint (no config.yaml)")
    return f.read_text()


def load_checkpoint(path: str | Path, model, optimizer, frozen: bool = True) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state. The checkpoint
    may come from any layout; model and optimizer as for `save_checkpoint`. The files are not verified
    here (`verify_checkpoint`, which `Checkpointer.restore` runs first); a load that fails on any rank
    raises CheckpointDamaged on every rank."""
    path = Path(path)
    state = read_trainer_state(path)
    options = _OPTIONS if frozen else _OPTIONS_TRAINABLE  # frozen=False: the frozen parameters are left as they are
    parts = _state_dicts(model, optimizer, frozen)
    sd = {"model": {k: v for m, _ in parts for k, v in m.items()},
          "optim": {k: v for _, o in parts for k, v in o.items()}}
    _check_shapes(path, sd["model"])  # another model is not a damaged checkpoint
    error, rng = None, None
    try:
        with quiet_dcp():
            dcp.load(sd, checkpoint_id=str(path))
        # dcp.load filled the tensors in place; non-tensor entries (step counts, hyperparameters) it
        # replaced in the merged dicts, so each part takes its keys back from there.
        for (m, o), mod, opt in zip(parts, _as_list(model), _as_list(optimizer)):
            set_state_dict(mod, opt, model_state_dict={k: sd["model"][k] for k in m},
                           optim_state_dict={k: sd["optim"][k] for k in o}, options=options)
        rng_file = path / f"rng_rank{_rank()}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (Exception, CheckpointException) as e:
        error = e
    if _any_rank(error is not None):  # the RNG file is read by one rank: the others learn of its failure here
        reason = _describe_error(error) if error is not None else "failed on another rank"
        raise CheckpointDamaged(path, f"cannot load it ({reason})") from error
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def stored_model_keys(path: str | Path) -> set[str]:
    """The names of the model tensors a checkpoint holds (without DCP's "model." prefix)."""
    saved = _read_metadata(Path(path)).state_dict_metadata
    return {k[len("model."):] for k in saved if k.startswith("model.")}


def load_model_weights(path: str | Path, model, frozen: bool = True, verify: bool = True, log=_warn) -> None:
    """Only the model weights (for evaluation, or to start training from a checkpoint); `model` a
    module or a list of parts. frozen=False: only the parameters that require gradients, from an
    adapter-only checkpoint (checkpoint.save_frozen=false) whose frozen base was loaded before.
    verify: check the files against their checksums first (a collective with several ranks)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise LlamatronError(f"{path}: not a checkpoint directory (no DCP .metadata file)")
    if verify:
        verify_checkpoint(path, log)
    options = StateDictOptions() if frozen else StateDictOptions(ignore_frozen_params=True, strict=False)
    parts = [get_model_state_dict(m, options=options) for m in _as_list(model)]
    # A model with LoRA adapters starts from a base checkpoint without them: they keep their initial values.
    from llamatron.transforms.lora import is_adapter_key

    saved = _read_metadata(path).state_dict_metadata
    strict = all(f"model.{k}" in saved for p in parts for k in p)
    parts = [{k: v for k, v in p.items() if f"model.{k}" in saved or not is_adapter_key(k)} for p in parts]
    sd = {"model": {k: v for p in parts for k, v in p.items()}}
    _check_shapes(path, sd["model"])
    try:
        with quiet_dcp():
            dcp.load(sd, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise LlamatronError(f"{path}: cannot load this checkpoint's weights ({_describe_error(e)}); its files are "
                             "damaged or incomplete") from e
    for p, mod in zip(parts, _as_list(model)):
        set_model_state_dict(mod, {k: sd["model"][k] for k in p}, options=StateDictOptions(strict=strict and frozen))


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointDamaged(path, f".metadata is unreadable ({_describe_error(e)})") from e


def _check_shapes(path: Path, model_sd: dict) -> None:
    """A checkpoint of another model (size) fails naming a tensor and both shapes, not inside DCP."""
    saved = _read_metadata(path).state_dict_metadata
    differ = []
    for name, t in model_sd.items():
        m = saved.get(f"model.{name}")
        if m is None:
            differ.append(f"{name} is missing there")
        elif isinstance(m, TensorStorageMetadata) and tuple(m.size) != tuple(t.shape):
            differ.append(f"{name} is {list(m.size)} there but {list(t.shape)} in this model")
    if differ:
        raise LlamatronError(f"{path}: holds another model ({len(differ)} of {len(model_sd)} tensors differ: "
                             f"{differ[0]}); check model.size and the model.* keys")


def consolidated_state_dict(path: str | Path, dtype: torch.dtype | None = None,
                            verify: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one plain state dict on the CPU (single process, no process
    group, whatever layout saved it): the keys of `Transformer.state_dict()`, loadable with
    `load_state_dict(strict=True)`. `dtype` converts them (e.g. torch.bfloat16 for export);
    verify: check the files against their checksums first."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise LlamatronError(f"{path}: not a checkpoint directory (no DCP .metadata file)")
    if verify:
        verify_checkpoint(path, _warn)
    metadata = _read_metadata(path)
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with quiet_dcp():
        dcp.load(flat, checkpoint_id=str(path))
    return {k[len("model."):]: (v.to(dtype) if dtype is not None else v) for k, v in flat.items()}


def save_consolidated(path: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """`consolidated_state_dict` written with torch.save (loads with torch.load(weights_only=True))."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_state_dict(path, dtype), out_file)
    return out_file


def _nonfinite_tensors(parts) -> list[str]:
    """Names of this rank's parameters holding NaN/inf: such weights must never become the newest
    checkpoint, which the next run would resume from. One host read for all of them."""
    named = [(n, p.detach()) for part in parts for n, p in part.named_parameters()]
    if not named:
        return []
    local = [t.to_local() if hasattr(t, "to_local") else t for _, t in named]  # DTensor shards
    finite = torch.stack([torch.isfinite(t).all() for t in local]).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


class Checkpointer:
    """A run's checkpoints: the start (leftovers of crashed saves removed, the directory checked
    writable, resume from the newest complete checkpoint or start from `init_from`), the cadence
    (every `checkpoint.every` steps), and the saves at the end and on halting.

    The `parts`/`optimizers` it saves are this rank's (pipeline stages: several); `config_yaml` is
    stored with each checkpoint (what `eval` rebuilds the model from)."""

    def __init__(self, cfg, out_dir: str | Path, log=print, report=None, device_type: str = "cpu"):
        self.cfg, self.out_dir, self.log = cfg, Path(out_dir), log
        self.report = report or (lambda kind, step, values: None)  # metrics rows ("checkpoint")
        self.parts, self.optimizers, self.config_yaml, self.sharding = [], [], "", None
        self.last: Path | None = None  # the newest complete checkpoint of this run
        # Asynchronous by default on CUDA only: there the staging copy goes to host memory the GPU run
        # does not use; on the CPU it would double the memory of model and optimizer and the writer
        # thread would compete with training for the same cores.
        self.asynchronous = cfg.async_save if cfg.async_save is not None else device_type == "cuda"
        self.pinned = device_type == "cuda"
        self.pending: AsyncSave | None = None  # the save in flight
        self._stager = self._group = None
        self._prealloc = None  # None, then "started" (the staging buffers), then "reported"

    def attach(self, parts, optimizers, config_yaml: str, sharding: dict | None = None) -> None:
        """What every checkpoint holds, once the model is built; `sharding`: this run's (`ParallelDims.sharding`)."""
        self.parts, self.optimizers, self.config_yaml, self.sharding = parts, optimizers, config_yaml, sharding

    def prepare(self, n_params: int) -> None:
        """Rank 0, before anything is allocated: what crashed saves left is removed, and a directory
        that cannot take a checkpoint fails now rather than at the first save hours later."""
        if not self.cfg.enabled:
            return
        for p in remove_incomplete(self.out_dir):
            self.log(f"removed {p}: left behind by a checkpoint save that did not complete")
        # fp32 weights and AdamW's two fp32 moments: 12 bytes per parameter.
        warning = check_writable(self.out_dir, 12 * n_params)
        if warning:
            self.log(f"warning: {warning}")

    def restore(self) -> dict:
        """The trainer state to continue from ({} for a fresh start), the weights (and optimizer) loaded.
        A damaged newest checkpoint fails naming the one before, or with `checkpoint.fallback` is
        moved aside and the one before is taken (every rank decides alike: the checks are collectives)."""
        candidates = list_checkpoints(self.out_dir)[::-1] if self.cfg.resume else []
        for i, path in enumerate(candidates):
            try:
                return self._resume(path)
            except CheckpointDamaged as e:
                self._set_aside(e, candidates[i + 1] if i + 1 < len(candidates) else None)
        if self.cfg.init_from:
            self._init_from()
            self.log(f"initialised model weights from {self.cfg.init_from}")
        return {}

    def _resume(self, path: Path) -> dict:
        verified = self.cfg.verify and self._verify(path)
        saved_yaml = read_checkpoint_config(path)
        check_resume_config(path, saved_yaml, self.config_yaml, self.cfg.allow_config_change, self.log)
        check_optimizer_state(path, saved_yaml, self.config_yaml, read_trainer_state(path).get("sharding"),
                              self.sharding)
        frozen = self.cfg.save_frozen
        if self.cfg.init_from and not frozen:
            self._init_from()  # adapter-only checkpoints: the frozen base weights come from init_from again
        try:
            state = load_checkpoint(path, self.parts, self.optimizers, frozen)
        except CheckpointDamaged as e:
            if verified:  # intact files that do not load: not something an older checkpoint cures
                raise LlamatronError(f"{path}: {e.reason}, although its files match their checksums; the model or "
                                     "the torch release differs from the one that saved it") from None
            raise
        self.last = path
        self.log(f"resumed from {path} at step {state['step']} ({state['consumed_samples']} samples consumed)")
        return {**state, "resumed_from": str(path)}

    def _verify(self, path: Path) -> bool:
        t0 = time.perf_counter()
        verified = verify_checkpoint(path, self.log)
        if verified is not None:
            size = f"{verified / 1e9:.1f} GB" if verified >= 1e9 else f"{verified / 1e6:.1f} MB"
            self.log(f"{path}: its {size} match their checksums (checked in {time.perf_counter() - t0:.2f} s)")
        return verified is not None

    def _init_from(self) -> None:
        # Its errors name the key, and are never taken for the damage of the checkpoint resumed from.
        try:
            load_model_weights(self.cfg.init_from, self.parts, verify=self.cfg.verify, log=self.log)
        except LlamatronError as e:
            raise LlamatronError(f"config key 'checkpoint.init_from': {e}") from None

    def _set_aside(self, damaged: CheckpointDamaged, older: Path | None) -> None:
        """With checkpoint.fallback, move a damaged checkpoint out of resume's way (rank 0, once every
        rank knows); without it, fail naming the checkpoint before."""
        path, aside = damaged.path, _aside_name(damaged.path)
        if older is None:
            raise LlamatronError(f"{path}: damaged ({damaged.reason}); no complete checkpoint before it is left: move "
                                 "it aside to start from the beginning") from None
        if not self.cfg.fallback:
            raise LlamatronError(f"{path}: damaged ({damaged.reason}); the checkpoint before it is {older.name}: resume "
                                 f"from it with --set checkpoint.fallback=true (this one is then moved aside as "
                                 f"{aside.name})") from None
        self.log(f"warning: {path}: damaged ({damaged.reason}); moved aside as {aside.name}, resuming from "
                 f"{older.name} (checkpoint.fallback=true)")
        if _rank() == 0:
            os.replace(path, aside)
            _fsync_dir(path.parent)
        _barrier()

    def due(self, step: int, total_steps: int) -> bool:
        """A save on the cadence after step `step` (the last step's save is the end of the run's)."""
        every = self.cfg.every
        return self.cfg.enabled and every > 0 and step % every == 0 and step < total_steps

    def save(self, step: int, state: dict) -> Path:
        """Save after `step`; asynchronous: the path the checkpoint will have once complete."""
        waited = self.wait()  # one save in flight: the next waits for the previous
        t0 = time.perf_counter()
        bad = _nonfinite_tensors(self.parts)
        if _any_rank(bool(bad)):  # every rank refuses together (a collective)
            where = f" ({len(bad)} on this rank, the first {bad[0]})" if bad else " (on another rank)"
            raise LlamatronError(f"step {step}: not saving a checkpoint, the model weights hold NaN/inf values{where}; "
                                 f"the newest complete checkpoint stays {self.last or 'none (no checkpoint yet)'}")
        if self.asynchronous:
            return self._save_async(step, state, waited, t0)
        path = save_checkpoint(self.out_dir, step, self.parts, self.optimizers, state, self.config_yaml,
                               self.cfg.keep, frozen=self.cfg.save_frozen)
        seconds = time.perf_counter() - t0
        self._saved(step, path, seconds, waited + seconds)
        return path

    def _save_async(self, step: int, state: dict, waited: float, t0: float) -> Path:
        checked = time.perf_counter() - t0
        p = self.pending = save_checkpoint_async(self.out_dir, step, self.parts, self.optimizers, state,
                                                 self.config_yaml, self.cfg.keep, self._staging(),
                                                 self._writer_group(), frozen=self.cfg.save_frozen)
        snapshot = time.perf_counter() - t0
        p.stall_s, p.parts = waited + snapshot, {"wait_s": waited, "check_s": checked, **p.parts}
        alloc, prealloc_wait = p.parts["alloc_s"], p.parts["prealloc_wait_s"]
        first = f" (host buffers allocated in {alloc:.2f} s, by the first save only)" if alloc >= 0.01 else ""
        if prealloc_wait >= 0.01:
            first += f" (of which {prealloc_wait:.2f} s waiting for the host buffers being allocated in the background)"
        self.log(f"step {step:6d} | checkpoint staged in {snapshot:.2f} s{first}; writing {p.final.name} in the "
                 "background")
        return p.final

    def poll(self) -> None:
        """Between steps: start allocating the staging buffers once the state has its final shapes,
        and report that allocation and a background save once they have completed (local: no collective)."""
        self._preallocate()
        self._report_preallocation()
        p = self.pending
        if p is None or not p.done() or p.stall_s is None:
            return
        if p.error is None:
            self._saved(p.step, p.final, p.finished - p.started, p.stall_s)
        else:  # raised on every rank at the next wait (an agreement needs all ranks: not here)
            self.log(f"warning: the background save of {p.final.name} failed ({_describe_error(p.error)}); "
                     "the run stops with this error at the next checkpoint or at its end")
        p.stall_s = None  # reported

    def _preallocate(self) -> None:
        """Async saves: once, allocate the host buffers of the staging copy in a background thread, so
        that the first save only copies. From the first optimizer step on every state-dict entry has its
        final shape; before it AdamW has no state, and get_state_dict would make it with a step of lr 0
        (a step count of 1 that changes the run)."""
        if self._prealloc is not None or not (self.asynchronous and self.cfg.enabled and self.optimizers):
            return
        if not all(o.state for o in self.optimizers):
            return
        self._prealloc = "started"
        self._staging().preallocate(_gather(self.parts, self.optimizers, self.cfg.save_frozen))

    def _report_preallocation(self) -> None:
        stager = self._stager
        if self._prealloc != "started" or stager is None or not stager.preallocated():
            return
        self._prealloc, record = "reported", stager.prealloc
        size = f"{size_text(record['bytes'])} of host buffers for the checkpoint staging"
        if record["error"] is None:
            self.log(f"{size} allocated in the background in {record['s']:.2f} s")
        else:  # raised on every rank by the next save (an agreement needs all ranks: not here)
            self.log(f"warning: allocating {size} in the background failed ({_describe_error(record['error'])}); "
                     "the run stops with this error at the next checkpoint")

    def wait(self) -> float:
        """Block until the save in flight, if any, is complete (every rank; raises the save's error on
        every rank if it failed on any). Returns the seconds this waited: training stalled that long."""
        p, t0 = self.pending, time.perf_counter()
        if p is None:
            return 0.0
        self.pending = None
        p.wait()
        waited = time.perf_counter() - t0
        if p.stall_s is not None:
            self._saved(p.step, p.final, p.finished - p.started, p.stall_s + waited)
        self.last = p.final
        return waited

    def _saved(self, step: int, path: Path, save_s: float, stall_s: float) -> None:
        self.last = path
        # A background save completes some steps later: the line names the step it holds, not the current one.
        mode = "written in the background" if self.asynchronous else "synchronous"
        self.log(f"checkpoint of step {step} saved to {path} in {save_s:.2f} s ({mode}; training stalled "
                 f"{stall_s:.2f} s)")
        self.report("checkpoint", step, {"path": str(path), "async": self.asynchronous, "save_s": round(save_s, 4),
                                         "stall_s": round(stall_s, 4)})

    def _staging(self) -> HostStager:
        if self._stager is None:
            # The writer thread's dcp.save runs outside quiet_dcp (a main-thread context): the same
            # filter, process-wide, for the one message a single-process save prints.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            self._stager = HostStager(self.pinned)
        return self._stager

    def _writer_group(self):
        """A gloo group for DCP's collectives in the writer thread: collectives of two threads on one
        group could interleave differently on different ranks; async_save also needs a CPU backend
        when training runs on NCCL. Made at the first save (all ranks save together)."""
        if self._group is None and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def close(self) -> None:
        """Wait for the save in flight and free the staging buffers."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def save_unless_saved(self, step: int, state: dict) -> Path | None:
        """At the end or on halting: keep the work since the last checkpoint, unless it is this step's;
        returns once every checkpoint is complete."""
        self.wait()
        if self.cfg.enabled and step > 0 and (self.last is None or self.last.name != f"step_{step:08d}"):
            self.save(step, state)
        self.close()
        return self.last


def check_init_from(path: str | None) -> None:
    """`checkpoint.init_from`, checked at start-up: a checkpoint directory."""
    if path and not (Path(path) / ".metadata").is_file():
        raise LlamatronError(f"config key 'checkpoint.init_from': {path} is not a checkpoint directory "
                             "(no DCP .metadata file)")
