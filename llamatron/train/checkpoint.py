"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, schedule position, data
position and RNG, saved together so a run resumes exactly.

Layout of one checkpoint, `OUT/checkpoints/step_00000100/`:
    .metadata, __*.distcp     DCP shards: {"model": ..., "optim": ...} keyed by clean parameter names
                              (the optimizer state flattened as "state.NAME.exp_avg", ...)
    rng_rank{r}.pt            each rank's RNG states (plain tensors, loaded with weights_only=True)
    trainer_state.json        step, consumed samples, ...
    config.yaml               the resolved run config (what `eval` needs to rebuild the model)
    COMPLETE                  written last; a directory without it is never resumed from

A checkpoint is written under a temporary name (`.step_00000100.tmp`), fsynced, marked COMPLETE and
renamed, so a crash at any moment leaves the previous checkpoint usable; directories without the
marker and hidden leftovers of crashed saves are never resumed from and are removed by the next run
or save. Old checkpoints are renamed to a hidden name before they are deleted, for the same reason.

An asynchronous save (`checkpoint.async_save`, `save_checkpoint_async`) writes the same files in the
same order: the state is copied to host memory while training waits, a DCP writer thread writes the
shards, and the marker and rename follow in that thread (rank 0) once every rank's shards are written.
One save is in flight at a time; `Checkpointer` waits for it before the next save and at the end.

Every tensor is stored by its name in the whole model, whatever the layout that saved it: DCP records
which slice of it each rank wrote (FSDP or TP shards, or a pipeline stage's layers), and a load
reads whatever slices the loading layout needs. So a run saved with one layout (FSDP over 2 ranks,
say) resumes with another (TP 2, pipeline stages, or a single process), and `consolidated_state_dict`
reads any checkpoint back as one plain state dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import warnings
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
from llamatron.train.resume_check import check_resume_config

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


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
    """Rank 0, once every rank's shards are written: trainer state, config, marker, rename."""
    _write_synced(tmp / "trainer_state.json", lambda f: f.write(state_json.encode()))
    _write_synced(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
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
        with quiet_dcp():
            # sync_files (the default): each shard is fsynced before DCP writes .metadata.
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        hooks.fire("save", phase="after_data", step=step, rank=rank)
        _write_rng(tmp, rank)
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


class _BackgroundWriter(dcp.FileSystemWriter):
    """DCP's file writer, with the hook point of the background write (fault tests kill it there)."""

    def __init__(self, path: Path, step: int, rank: int):
        super().__init__(str(path), sync_files=True)  # each shard fsynced before .metadata is written
        self.step, self.rank = step, rank

    def write_data(self, plan, planner):
        hooks.fire("save", phase="async_write", step=self.step, rank=self.rank)
        return super().write_data(plan, planner)


def make_stager(pinned: bool):
    """The staging copy of an asynchronous save: every tensor (weights, optimizer moments, step
    counts) copied to host memory before training goes on and changes them. The host buffers are
    kept and reused by the next save (pinned on CUDA: a 17 GB copy runs at PCIe speed, ~1 s), so a
    stager serves one save at a time: the next save waits for the write of the previous."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    # The writer thread's dcp.save runs outside quiet_dcp (a main-thread context): the same filter,
    # process-wide, for the one message a single-process save prints.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    class KeptStager(DefaultStager):
        # torch 2.11's async_save closes the stager it is given after every save (2.13 leaves a
        # caller's stager open), which drops the pinned buffers the next save would reuse: each save
        # then allocated ~18 GB of pinned memory again (6 s of stall on the H200). Closing is the
        # Checkpointer's, at the end of the run (`release`).
        def close(self) -> None:
            pass

        def release(self) -> None:
            DefaultStager.close(self)

    # Positional: (pinned memory, shared memory, asynchronous staging, non-blocking copy); the last is
    # named use_cuda_non_blocking_copy in earlier releases.
    return KeptStager(StagingOptions(pinned, False, False, pinned))


class AsyncSave:
    """A checkpoint being written by a background thread: the snapshot is taken, the files are not
    complete until `wait` returns. The marker and the rename happen in that thread on rank 0 once
    DCP's write has finished on every rank (DCP ends its save with a collective: rank 0 writes
    .metadata only after every rank reported its shards written)."""

    def __init__(self, out_dir, step, root, final, tmp, rank, state_json, config_yaml, keep, started):
        self.out_dir, self.step, self.root, self.final, self.tmp, self.rank = out_dir, step, root, final, tmp, rank
        self.state_json, self.config_yaml, self.keep = state_json, config_yaml, keep
        self.started, self.finished, self.stall_s = started, None, 0.0
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


def save_checkpoint_async(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, config_yaml: str,
                          keep: int, stager, process_group, frozen: bool = True) -> AsyncSave:
    """`save_checkpoint` with the write in a background thread: this call returns once the state is
    staged (copied to host memory) and this rank's RNG file written; `AsyncSave.wait` returns once the
    checkpoint is complete. The layout on disk and the guarantees are those of `save_checkpoint`.
    `process_group`: a gloo group of all ranks for DCP's collectives in the writer thread (None
    in a single process), apart from the training's own."""
    started = time.perf_counter()
    root, final, tmp, rank = _begin(out_dir, step)
    hooks.fire("save", phase="before_data", step=step, rank=rank)
    pending = AsyncSave(out_dir, step, root, final, tmp, rank, json.dumps(trainer_state, indent=2), config_yaml,
                        keep, started)
    error: BaseException | None = None
    try:
        sd = _gather(model, optimizer, frozen)
        hooks.fire("save", phase="during_data", step=step, rank=rank)
        _write_rng(tmp, rank)  # the RNG of now, before training draws from it again
        with quiet_dcp():
            future = dcp.async_save(sd, storage_writer=_BackgroundWriter(tmp, step, rank), async_stager=stager,
                                    process_group=process_group, no_dist=process_group is None)
    except (Exception, CheckpointException) as e:
        error = e
    _fail_together(error, rank, root, tmp, final)
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
    may come from any layout; model and optimizer as for `save_checkpoint`."""
    path = Path(path)
    state = read_trainer_state(path)
    options = _OPTIONS if frozen else _OPTIONS_TRAINABLE  # frozen=False: the frozen parameters are left as they are
    parts = _state_dicts(model, optimizer, frozen)
    sd = {"model": {k: v for m, _ in parts for k, v in m.items()},
          "optim": {k: v for _, o in parts for k, v in o.items()}}
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
        raise LlamatronError(
            f"{path}: cannot load this checkpoint ({_describe_error(e)}); its files were damaged after the save, "
            "or the model differs from the one that saved it. Move it aside to resume from the one before"
        ) from e
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def stored_model_keys(path: str | Path) -> set[str]:
    """The names of the model tensors a checkpoint holds (without DCP's "model." prefix)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("model."):] for k in saved if k.startswith("model.")}


def load_model_weights(path: str | Path, model, frozen: bool = True) -> None:
    """Only the model weights (for evaluation, or to start training from a checkpoint); `model` a
    module or a list of parts. frozen=False: only the parameters that require gradients, from an
    adapter-only checkpoint (checkpoint.save_frozen=false) whose frozen base was loaded before."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise LlamatronError(f"{path}: not a checkpoint directory (no DCP .metadata file)")
    options = StateDictOptions() if frozen else StateDictOptions(ignore_frozen_params=True, strict=False)
    parts = [get_model_state_dict(m, options=options) for m in _as_list(model)]
    # A model with LoRA adapters starts from a base checkpoint without them: they keep their initial values.
    from llamatron.transforms.lora import is_adapter_key

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
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


def _check_shapes(path: Path, model_sd: dict) -> None:
    """A checkpoint of another model (size) fails naming a tensor and both shapes, not inside DCP."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
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


def consolidated_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one plain state dict on the CPU (single process, no process
    group, whatever layout saved it): the keys of `Transformer.state_dict()`, loadable with
    `load_state_dict(strict=True)`. `dtype` converts them (e.g. torch.bfloat16 for export)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise LlamatronError(f"{path}: not a checkpoint directory (no DCP .metadata file)")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
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


def _stager_closed(stager) -> bool:
    """Whether a DefaultStager was closed (its deep-copy dispatch table is emptied by close())."""
    inner = getattr(stager, "_state_dict_stager", None)
    return inner is not None and not getattr(inner, "_deepcopy_dispatch", True)


class Checkpointer:
    """A run's checkpoints: the start (leftovers of crashed saves removed, the directory checked
    writable, resume from the newest complete checkpoint or start from `init_from`), the cadence
    (every `checkpoint.every` steps), and the saves at the end and on halting.

    The `parts`/`optimizers` it saves are this rank's (pipeline stages: several); `config_yaml` is
    stored with each checkpoint (what `eval` rebuilds the model from)."""

    def __init__(self, cfg, out_dir: str | Path, log=print, report=None, device_type: str = "cpu"):
        self.cfg, self.out_dir, self.log = cfg, Path(out_dir), log
        self.report = report or (lambda kind, step, values: None)  # metrics rows ("checkpoint")
        self.parts, self.optimizers, self.config_yaml = [], [], ""
        self.last: Path | None = None  # the newest complete checkpoint of this run
        # Asynchronous by default on CUDA only: there the staging copy goes to host memory the GPU run
        # does not use; on the CPU it would double the memory of model and optimizer and the writer
        # thread would compete with training for the same cores.
        self.asynchronous = cfg.async_save if cfg.async_save is not None else device_type == "cuda"
        self.pinned = device_type == "cuda"
        self.pending: AsyncSave | None = None  # the save in flight
        self._stager = self._group = None

    def attach(self, parts, optimizers, config_yaml: str) -> None:
        """What every checkpoint holds, once the model is built."""
        self.parts, self.optimizers, self.config_yaml = parts, optimizers, config_yaml

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
        """The trainer state to continue from ({} for a fresh start), the weights (and optimizer) loaded."""
        resume_from = latest_checkpoint(self.out_dir) if self.cfg.resume else None
        frozen = self.cfg.save_frozen
        if resume_from is not None:
            check_resume_config(resume_from, read_checkpoint_config(resume_from), self.config_yaml,
                                self.cfg.allow_config_change, self.log)
            if self.cfg.init_from and not frozen:
                # Adapter-only checkpoints: the frozen base weights come from init_from again.
                load_model_weights(self.cfg.init_from, self.parts)
            state = load_checkpoint(resume_from, self.parts, self.optimizers, frozen)
            self.last = resume_from
            self.log(f"resumed from {resume_from} at step {state['step']} ({state['consumed_samples']} samples consumed)")
            return {**state, "resumed_from": str(resume_from)}
        if self.cfg.init_from:
            try:
                load_model_weights(self.cfg.init_from, self.parts)
            except LlamatronError as e:
                raise LlamatronError(f"config key 'checkpoint.init_from': {e}") from None
            self.log(f"initialised model weights from {self.cfg.init_from}")
        return {}

    def due(self, step: int, total_steps: int) -> bool:
        """A save on the cadence after step `step` (the last step's save is the end of the run's)."""
        every = self.cfg.every
        return self.cfg.enabled and every > 0 and step % every == 0 and step < total_steps

    def save(self, step: int, state: dict) -> Path:
        """Save after `step`; asynchronous: the path the checkpoint will have once complete."""
        waited = self.wait()  # one save in flight: the next waits for the previous
        bad = _nonfinite_tensors(self.parts)
        if _any_rank(bool(bad)):  # every rank refuses together (a collective)
            where = f" ({len(bad)} on this rank, the first {bad[0]})" if bad else " (on another rank)"
            raise LlamatronError(f"step {step}: not saving a checkpoint, the model weights hold NaN/inf values{where}; "
                                 f"the newest complete checkpoint stays {self.last or 'none (no checkpoint yet)'}")
        t0 = time.perf_counter()
        if self.asynchronous:
            self.pending = save_checkpoint_async(self.out_dir, step, self.parts, self.optimizers, state,
                                                 self.config_yaml, self.cfg.keep, self._staging(), self._writer_group(),
                                                 frozen=self.cfg.save_frozen)
            self.pending.stall_s = waited + time.perf_counter() - t0
            self.log(f"step {step:6d} | checkpoint staged in {time.perf_counter() - t0:.2f} s; "
                     f"writing {self.pending.final.name} in the background")
            return self.pending.final
        path = save_checkpoint(self.out_dir, step, self.parts, self.optimizers, state, self.config_yaml,
                               self.cfg.keep, frozen=self.cfg.save_frozen)
        seconds = time.perf_counter() - t0
        self._saved(step, path, seconds, waited + seconds)
        return path

    def poll(self) -> None:
        """Between steps: report a background save that has completed (local: no collective)."""
        p = self.pending
        if p is None or not p.done() or p.stall_s is None:
            return
        if p.error is None:
            self._saved(p.step, p.final, p.finished - p.started, p.stall_s)
        else:  # raised on every rank at the next wait (an agreement needs all ranks: not here)
            self.log(f"warning: the background save of {p.final.name} failed ({_describe_error(p.error)}); "
                     "the run stops with this error at the next checkpoint or at its end")
        p.stall_s = None  # reported

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

    def _staging(self):
        # torch 2.11's async_save closes the stager it is given (2.13 leaves a caller's stager open);
        # a closed one has lost its copy tables and its buffers, so a new one is made.
        if self._stager is None or _stager_closed(self._stager):
            self._stager = make_stager(self.pinned)
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
            self._stager.release()
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
