"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, schedule position, data
position and RNG, saved together so a run resumes exactly.

Layout of one checkpoint, `OUT/checkpoints/step_00000100/`:
    .metadata, __*.distcp     DCP shards: {"model": ..., "optim": ...} keyed by clean parameter names
                              (the optimizer state flattened as "state.NAME.exp_avg", ...)
    rng_rank{r}.pt            each rank's RNG states (plain tensors, loaded with weights_only=True)
    trainer_state.json        step, consumed samples, ...
    config.yaml               the resolved run config (what `eval` needs to rebuild the model)
    COMPLETE                  written last; a directory without it is never resumed from

A checkpoint is written under a temporary name and renamed once complete, so a crash at any moment
leaves the previous checkpoint usable.

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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llamatron.errors import LlamatronError

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
def _quiet():
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


def _state_dicts(model, optimizer) -> list[tuple[dict, dict]]:
    """(model, optimizer) state dicts of each part; the parts hold disjoint names."""
    return [get_state_dict(m, o, options=_OPTIONS) for m, o in zip(_as_list(model), _as_list(optimizer))]


def save_checkpoint(
    out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, config_yaml: str, keep: int
) -> Path:
    """model, optimizer: a module and its optimizer, or lists of them (pipeline stages of a rank)."""
    root = checkpoints_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    parts = _state_dicts(model, optimizer)
    model_sd = {k: v for m, _ in parts for k, v in m.items()}
    optim_sd = {k: v for _, o in parts for k, v in o.items()}
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / MARKER, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / "trainer_state.json"
    if not f.is_file():
        raise LlamatronError(f"{path}: not a llamatron checkpoint (no trainer_state.json)")
    return json.loads(f.read_text())


def read_checkpoint_config(path: str | Path) -> str:
    f = Path(path) / "config.yaml"
    if not f.is_file():
        raise LlamatronError(f"{path}: not a llamatron checkpoint (no config.yaml)")
    return f.read_text()


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state. The checkpoint
    may come from any layout; model and optimizer as for `save_checkpoint`."""
    path = Path(path)
    state = read_trainer_state(path)
    parts = _state_dicts(model, optimizer)
    sd = {"model": {k: v for m, _ in parts for k, v in m.items()},
          "optim": {k: v for _, o in parts for k, v in o.items()}}
    with _quiet():
        dcp.load(sd, checkpoint_id=str(path))
    # dcp.load filled the tensors in place; non-tensor entries (step counts, hyperparameters) it
    # replaced in the merged dicts, so each part takes its keys back from there.
    for (m, o), mod, opt in zip(parts, _as_list(model), _as_list(optimizer)):
        set_state_dict(mod, opt, model_state_dict={k: sd["model"][k] for k in m},
                       optim_state_dict={k: sd["optim"][k] for k in o}, options=_OPTIONS)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def load_model_weights(path: str | Path, model) -> None:
    """Only the model weights (for evaluation, or to start training from a checkpoint); `model` a
    module or a list of parts."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise LlamatronError(f"{path}: not a checkpoint directory (no DCP .metadata file)")
    parts = [get_model_state_dict(m) for m in _as_list(model)]
    sd = {"model": {k: v for p in parts for k, v in p.items()}}
    with _quiet():
        dcp.load(sd, checkpoint_id=str(path))
    for p, mod in zip(parts, _as_list(model)):
        set_model_state_dict(mod, {k: sd["model"][k] for k in p}, options=StateDictOptions(strict=True))


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
    with _quiet():
        dcp.load(flat, checkpoint_id=str(path))
    return {k[len("model."):]: (v.to(dtype) if dtype is not None else v) for k, v in flat.items()}


def save_consolidated(path: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """`consolidated_state_dict` written with torch.save (loads with torch.load(weights_only=True))."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_state_dict(path, dtype), out_file)
    return out_file
