"""Checkpoint import and export: Hugging Face (safetensors + config.json) and Meta (`consolidated.*.pth`).

Each family's state-dict adapter (`llamatron/models/<family>/hf.py`: the key map, the Llama q/k row
permutation, config.json <-> args) does the mapping; this module does the I/O for all of them, picking
the family by config.json's `model_type` on import and by the checkpoint's model on export:

    import_hf(SRC, DST)     HF directory  -> llamatron checkpoint (weights only, for init_from and eval)
    import_meta(SRC, DST)   Meta directory (params.json + consolidated.NN.pth, any model-parallel degree)
                            -> llamatron checkpoint
    export_hf(SRC, DST)     llamatron checkpoint (or run directory) -> HF directory that transformers'
                            LlamaForCausalLM (or, for the GPT family, GPT2LMHeadModel).from_pretrained loads

Checkpoints from elsewhere are untrusted: safetensors files are read with the safetensors library and
Meta's `.pth` files with `torch.load(weights_only=True)`; nothing else from a user-supplied path is
unpickled. (A llamatron checkpoint's DCP `.metadata` is a pickle written by torch itself, as in every
DCP checkpoint; export reads it, so export trusts its source as `train` and `eval` do.)

Memory is bounded by a few tensors, whatever the model size:
  * Writing the llamatron (DCP) side, every tensor is produced on demand. `dcp.save` is given a state
    dict of meta-device placeholders (shapes and dtypes only) and a planner whose `resolve_data`, the
    hook DCP calls when it is about to write an item, reads that one tensor from the source, permutes
    and casts it. `FileSystemWriter(single_file_per_rank=False)` writes one file per tensor; with one
    file per rank its writer keeps every tensor of the file alive until the file is closed (it collects
    them for the safetensors serialisation path), i.e. the whole model. Peak: one source tensor plus
    its converted copy.
  * Reading a HF or Meta source, `safe_open` and `torch.load(mmap=True)` map the files; a tensor is
    read when it is converted. Meta model-parallel slices are concatenated one parameter at a time.
  * Writing the HF side, one output shard is assembled, one tensor read at a time, and written: peak is
    about max(--max-shard-size, the largest tensor) plus one tensor (5 GB by default; the 405B
    embedding is 4.3 GB in bf16). safetensors' `save_file` writes from the tensors' own memory.
Outputs are written under a temporary name next to DST and renamed when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llamatron.errors import LlamatronError
from llamatron.models import registry
from llamatron.models.llama import hf as llama_hf
from llamatron.train.checkpoint import quiet_dcp, verify_checkpoint, write_checksums
from llamatron.transforms.lora import is_adapter_key

# --------------------------------------------------------------------------------------------------
# What every family shares: the parameters of a shape, and the run config that rebuilds it


def expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model of `args` (built on the meta device), in its order: for Llama
    the HF checkpoint order (embedding, layers, norm, output). Tied parameters appear once."""
    with torch.device("meta"):
        model = registry.family_of(args).build(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def model_config_for(args, where: str | None = None):
    """The `[model]` config section whose model is exactly `args`: the closest named size of its
    family, with every field set explicitly (so the checkpoint does not depend on a preset staying the
    same)."""
    from llamatron.config import ModelConfig

    entry = registry.closest(args)
    return ModelConfig(size=entry.name, overrides=dataclasses.asdict(args))


def model_overrides(args) -> list[str]:
    """`--set` overrides that give a training run this model shape."""
    entry = registry.closest(args)
    return [f"model.size={entry.name}"] + [f"model.{k}={v}" for k, v in registry.differing_fields(entry, args).items()]


def _adapter(model_type: str, where: str):
    """The HF adapter (models/<family>/hf.py) of the family whose config.json model_type this is."""
    for family in registry.families().values():
        if family.hf is not None and family.hf.MODEL_TYPE == model_type:
            return family.hf
    known = sorted(f.hf.MODEL_TYPE for f in registry.families().values() if f.hf is not None)
    raise LlamatronError(f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(known)})")


# Optional adapter hooks, for formats that are not one HF tensor per parameter (GPT-2's fused c_attn,
# its transposed Conv1D weights); an adapter without them (Llama) maps tensors one to one.


def _hf_targets(hf_module, hf: str, args) -> list[str]:
    """The llamatron parameters HF tensor `hf` supplies (several for a fused one)."""
    if hasattr(hf_module, "llamatron_names"):
        return hf_module.llamatron_names(hf, args)
    name = hf_module.llamatron_name(hf)
    return [] if name is None else [name]


def _from_hf(hf_module, name: str, hf: str, w: torch.Tensor, args) -> torch.Tensor:
    if hasattr(hf_module, "from_hf_part"):
        return hf_module.from_hf_part(name, hf, w, args)
    return hf_module.from_hf(hf, w, args)[1]


def _hf_shape(hf_module, name: str, shape: tuple[int, ...], args) -> tuple[int, ...]:
    return hf_module.hf_shape(name, shape, args) if hasattr(hf_module, "hf_shape") else shape


def _hf_groups(hf_module, names: list[str], args) -> list[list[str]]:
    """The llamatron parameters that make each HF tensor, in order."""
    return hf_module.hf_groups(names, args) if hasattr(hf_module, "hf_groups") else [[n] for n in names]


def _to_hf(hf_module, names: list[str], tensors: list[torch.Tensor], args) -> tuple[str, torch.Tensor]:
    if hasattr(hf_module, "to_hf_group"):
        return hf_module.to_hf_group(names, tensors, args)
    return hf_module.to_hf(names[0], tensors[0], args)


def hf_state_dict(params: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """A model's parameters (clean names) -> the Hugging Face tensors `export_hf` writes for them, in
    memory: an HF twin of a model without a checkpoint on disk (benchmarks)."""
    hf_module = registry.family_of(args).hf
    if hf_module is None:
        raise LlamatronError(f"the {registry.family_of(args).name} family has no Hugging Face format")
    return dict(_to_hf(hf_module, names, [params[n] for n in names], args)
                for names in _hf_groups(hf_module, list(params), args))


# --------------------------------------------------------------------------------------------------
# Common pieces

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass
class TensorSpec:
    """One output tensor: what it will be, and how to produce it when the writer asks."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shape(s) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def _out_dtype(dtype: str | None, source: torch.dtype, where: str) -> torch.dtype:
    if dtype in (None, "keep"):
        if not source.is_floating_point:
            raise LlamatronError(f"{where}: dtype {source} is not a floating-point weight type")
        return source
    if dtype not in DTYPES:
        raise LlamatronError(f"dtype {dtype!r}: expected keep or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_shape(name: str, got, want, where: str, why: str) -> None:
    if tuple(got) != tuple(want):
        raise LlamatronError(f"{name}: shape {_shape(got)} in {where}, expected {_shape(want)} from {why}")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '100KB' or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise LlamatronError(f"size {text!r}: expected a byte count such as 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _check_dst(dst: str | Path) -> None:
    if Path(dst).exists():
        raise LlamatronError(f"{dst}: already exists; remove it or choose another destination")


@contextlib.contextmanager
def _staging(dst: Path) -> Iterator[Path]:
    """A temporary directory beside DST, renamed to DST only when the body completes."""
    dst = Path(dst)
    _check_dst(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp"
    if tmp.exists():  # left by an interrupted conversion
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dst)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Writing a llamatron checkpoint, one tensor in memory at a time


def write_llamatron_checkpoint(dst: str | Path, tensors: list[TensorSpec], args, source: str,
                               progress: bool = True) -> Path:
    """A weights-only llamatron checkpoint (`{"model": ...}` in DCP, config.yaml, trainer_state.json,
    COMPLETE) whose tensors are produced by their `load` one at a time, as DCP writes them."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from llamatron.config import Config, dump_config

    model_cfg = model_config_for(args)
    if {t.name: t.shape for t in tensors} != expected_shapes(args):
        raise ValueError("write_llamatron_checkpoint: the tensors are not exactly the parameters of the model")

    class StreamingPlanner(DefaultSavePlanner):
        """Materialises each placeholder only when DCP writes it (DCP's documented extension point)."""

        def __init__(self, sources: dict[str, TensorSpec], bar):
            super().__init__()
            self.sources, self.bar = sources, bar
            self.failed: tuple[str, Exception] | None = None

        def resolve_data(self, write_item):
            spec = self.sources.get(write_item.index.fqn)
            if spec is None:
                return super().resolve_data(write_item)
            try:
                t = spec.load().to(spec.dtype).contiguous()
            except Exception as e:
                self.failed = (spec.name, e)  # DCP wraps what is raised here in a multi-line report
                raise
            if tuple(t.shape) != spec.shape:  # the checks before writing make this unreachable
                raise LlamatronError(f"{spec.name}: produced shape {_shape(t.shape)}, expected {_shape(spec.shape)}")
            self.bar.update(spec.nbytes)
            return t

    placeholders = {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors}
    sources = {f"model.{t.name}": t for t in tensors}
    with _staging(Path(dst)) as tmp, _bar(sum(t.nbytes for t in tensors), "convert", progress) as bar, quiet_dcp():
        writer = FileSystemWriter(str(tmp), single_file_per_rank=False)
        planner = StreamingPlanner(sources, bar)
        try:
            dcp_save({"model": placeholders}, storage_writer=writer, planner=planner, no_dist=True)
        except BaseException:  # DCP's CheckpointException derives from BaseException
            if planner.failed is None:
                raise
            name, e = planner.failed
            if isinstance(e, LlamatronError):
                raise e from None
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise LlamatronError(f"{name}: cannot read it from {source}: {first}") from None
        cfg = Config()
        cfg.model = model_cfg
        cfg.data.seq_len = min(cfg.data.seq_len, args.max_seq_len)
        (tmp / "config.yaml").write_text(dump_config(cfg))
        state = {"step": 0, "consumed_samples": 0, "weights_only": True, "converted_from": source}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        write_checksums(tmp)  # verified as a trained checkpoint's are, at eval and init_from
        (tmp / "COMPLETE").write_text(f"converted from {source}\n")
    return Path(dst)


# --------------------------------------------------------------------------------------------------
# Hugging Face -> llamatron


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - a file the library cannot parse is the input's fault
        raise LlamatronError(f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0]})") from None


def _hf_files(src: Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name, from the index (or the single model.safetensors)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LlamatronError(f"{index}: not a safetensors index ({e.__class__.__name__}: {e})") from None
        for fname in sorted(set(weight_map.values())):
            if not (src / fname).is_file():
                raise LlamatronError(f"{src / fname}: missing shard (listed in {index.name})")
        return dict(weight_map)
    if (src / "model.safetensors").is_file():
        with _safe_open(src / "model.safetensors") as f:
            return {k: "model.safetensors" for k in f.keys()}
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pth"))
    hint = ""
    if pickles:
        hint = f" (found {', '.join(pickles[:2])}: pickle files are not loaded; save the model as safetensors)"
    raise LlamatronError(f"{src}: no model.safetensors.index.json or model.safetensors{hint}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LlamatronError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlamatronError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LlamatronError(f"{path}: expected a JSON object")
    return data


def import_hf(src: str | Path, dst: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """A Hugging Face Llama directory (config.json + safetensors) -> llamatron checkpoint at `dst`."""
    src = Path(src)
    if not src.is_dir():
        raise LlamatronError(f"{src}: not a directory")
    _check_dst(dst)
    config = _read_json(src / "config.json")
    hf_module = _adapter(config.get("model_type", llama_hf.MODEL_TYPE), str(src / "config.json"))
    args = hf_module.args_from_hf_config(config, str(src / "config.json"))
    files = _hf_files(src)
    shapes = expected_shapes(args)
    why = f"{src / 'config.json'}"

    with contextlib.ExitStack() as stack:
        handles, keys = {}, {}
        for fname in sorted(set(files.values())):
            handles[fname] = stack.enter_context(_safe_open(src / fname))
            keys[fname] = set(handles[fname].keys())
        found: dict[str, tuple[str, str]] = {}  # llamatron name -> (HF name, file)
        for fname in handles:
            for hf in sorted(keys[fname]):
                if hf_module.hf_ignored(hf, args):
                    continue
                if files.get(hf) != fname:
                    if hf in files:  # also listed elsewhere: the index decides which copy is read
                        continue
                    raise LlamatronError(f"{src / fname}: tensor {hf!r} is not in the index")
                names = _hf_targets(hf_module, hf, args)
                if not names or any(name not in shapes for name in names):
                    raise LlamatronError(f"{src / fname}: unexpected tensor {hf!r} for the model in {why}")
                for name in names:
                    found[name] = (hf, fname)
        for hf, fname in files.items():
            if not hf_module.hf_ignored(hf, args) and hf not in keys[fname]:
                raise LlamatronError(f"{src / fname}: tensor {hf!r} listed in the index is missing")

        tensors = []
        for name, want in shapes.items():
            if name not in found:
                raise LlamatronError(f"{hf_module.hf_name(name)}: missing from {src}")
            hf, fname = found[name]
            sl = handles[fname].get_slice(hf)
            where = f"{src / fname}"
            _check_shape(hf, sl.get_shape(), _hf_shape(hf_module, name, tuple(want), args), where, why)
            st = sl.get_dtype()
            if st not in _SAFETENSORS_DTYPES:
                raise LlamatronError(f"{hf}: dtype {st} in {where} is not a floating-point weight type")
            out = _out_dtype(dtype, _SAFETENSORS_DTYPES[st], where)

            def load(h=handles[fname], hf=hf, name=name):
                return _from_hf(hf_module, name, hf, h.get_tensor(hf), args)

            tensors.append(TensorSpec(name, tuple(want), out, load))
        # Read in file order so each shard is mapped and paged in once.
        order = {f: i for i, f in enumerate(handles)}
        tensors.sort(key=lambda t: order[found[t.name][1]])
        return write_llamatron_checkpoint(dst, tensors, args, f"hf:{src}", progress)


# --------------------------------------------------------------------------------------------------
# Meta -> llamatron

_META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def _torch_load_reason(e: Exception) -> str:
    """The informative line of torch.load's multi-paragraph error (never its advice to unpickle)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "mmap" in line:
            return line.split(". Please")[0]
    return lines[0] if lines else e.__class__.__name__


def import_meta(src: str | Path, dst: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """Meta's format (params.json + consolidated.NN.pth model-parallel shards) -> llamatron checkpoint.

    Meta's layout is llamatron's, so no permutation: the slices are concatenated per REFERENCE C.2."""
    src = Path(src)
    if not src.is_dir():
        raise LlamatronError(f"{src}: not a directory")
    _check_dst(dst)
    # Only the Llama family has a Meta format.
    params = _read_json(src / "params.json")
    # Every key checked before any shard is read (a Llama 2 vocabulary, -1, is read from the shards below).
    llama_hf.args_from_meta_params(params, str(src / "params.json"), vocab_size=1)
    numbered = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := _META_SHARD.match(p.name)))
    if not numbered:
        raise LlamatronError(f"{src}: no consolidated.NN.pth files")
    width = len(numbered[0][1].name.split(".")[1])
    for want, (got, _) in enumerate(numbered):
        if got != want:
            raise LlamatronError(f"{src / f'consolidated.{want:0{width}d}.pth'}: missing shard "
                                 f"({len(numbered)} of consolidated.*.pth found)")
    paths = [p for _, p in numbered]
    shards = []
    for p in paths:
        try:
            # mmap: shapes now, bytes when a tensor is used. weights_only: a pickle may not run code.
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the input's fault
            raise LlamatronError(f"{p}: cannot load safely with torch.load(weights_only=True, mmap=True): "
                                 f"{_torch_load_reason(e)}") from None
        if not isinstance(shards[-1], dict):
            raise LlamatronError(f"{p}: expected a dict of tensors, got {type(shards[-1]).__name__}")

    # Llama 2's params.json leaves the vocabulary to the checkpoint (vocab_size -1).
    embedding = shards[0].get("tok_embeddings.weight")
    vocab = embedding.shape[0] if isinstance(embedding, torch.Tensor) and embedding.dim() == 2 else None
    args = llama_hf.args_from_meta_params(params, str(src / "params.json"), vocab_size=vocab)
    llama2 = llama_hf.is_llama2_params(params)
    shapes = expected_shapes(args)
    why = f"{src / 'params.json'} ({len(paths)} consolidated.*.pth shard(s) found)"
    for p, sd in zip(paths, shards):
        for k, v in sd.items():
            if k in llama_hf.META_IGNORED:
                continue
            if k not in shapes or not isinstance(v, torch.Tensor):
                raise LlamatronError(f"{p}: unexpected entry {k!r} for the model in {src / 'params.json'}")

    tensors = []
    for name, want in shapes.items():
        parts = []
        for p, sd in zip(paths, shards):
            if name not in sd:
                raise LlamatronError(f"{name}: missing from {p}")
            parts.append(sd[name])
        cat = llama_hf.meta_cat_dim(name, llama2)
        if cat is None:  # replicated (norms): every shard holds the whole tensor
            for p, t in zip(paths, parts):
                _check_shape(name, t.shape, want, str(p), why)
        else:
            got = list(parts[0].shape)
            if any(t.dim() != len(got) or any(t.shape[d] != got[d] for d in range(t.dim()) if d != cat) for t in parts):
                raise LlamatronError(f"{name}: shard shapes {', '.join(_shape(t.shape) for t in parts)} "
                                     f"do not concatenate along dim {cat}")
            got[cat] = sum(t.shape[cat] for t in parts)
            _check_shape(name, got, want, f"{len(parts)} shard(s) concatenated along dim {cat}", why)
        out = _out_dtype(dtype, parts[0].dtype, str(paths[0]))

        def load(parts=parts, cat=cat):
            return parts[0] if cat is None or len(parts) == 1 else torch.cat(parts, dim=cat)

        tensors.append(TensorSpec(name, tuple(want), out, load))
    return write_llamatron_checkpoint(dst, tensors, args, f"meta:{src}", progress)


# --------------------------------------------------------------------------------------------------
# llamatron -> Hugging Face


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    from llamatron.train import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise LlamatronError(f"{path}: no such checkpoint")
    if (path / ".metadata").is_file():
        if not (path / ckpt.MARKER).is_file():
            raise LlamatronError(f"{path}: incomplete checkpoint (no {ckpt.MARKER} marker)")
        return path
    newest = ckpt.latest_checkpoint(path)
    if newest is None:
        raise LlamatronError(f"{path}: neither a checkpoint nor a run directory with a complete checkpoint")
    return newest


def checkpoint_model_args(path: str | Path):
    import yaml

    from llamatron.config import config_from_dict, resolve_model
    from llamatron.train import checkpoint as ckpt

    return resolve_model(config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(path))).model)[1]


def _read_stored(path: Path, name: str, shape, dtype, dcp_load, exc_type, reader_type) -> torch.Tensor:
    """One tensor of a llamatron checkpoint. One tensor per DCP read (DCP reads only the requested
    keys): the shard being assembled plus one tensor in its stored dtype, never a whole shard in fp32."""
    sd = {"model": {name: torch.empty(shape, dtype=dtype)}}
    try:
        dcp_load(sd, storage_reader=reader_type(str(path)), no_dist=True)
    except exc_type as e:  # a BaseException, with each rank's error inside
        inner = next(iter(e.failures.values()), e)
        inner = inner[0] if isinstance(inner, tuple) else inner  # (exception, stack)
        first = (str(inner).strip().splitlines() or [""])[0]
        raise LlamatronError(f"{path}: cannot read {name}: {inner.__class__.__name__}: {first}") from None
    return sd["model"].pop(name)


class _LoRAMerge:
    """A LoRA run's export: each adapted weight leaves merged, W + (alpha / r) B A in fp32, and the
    frozen base of an adapter-only checkpoint (checkpoint.save_frozen=false) comes from where the run
    took it: its checkpoint.init_from, or the run's seeded initial values (as `llamatron evaluate`).
    A checkpoint of a run without LoRA reads every tensor from itself."""

    def __init__(self, scaling: float = 0.0, base: Path | None = None, base_stored: dict | None = None,
                 seeded=None, adapters: dict | None = None):
        self.scaling, self.base, self.base_stored, self.seeded, self.adapters = \
            scaling, base, base_stored or {}, seeded, adapters or {}

    @classmethod
    def of(cls, path: Path, args, reader_type) -> "_LoRAMerge":
        from llamatron import evaluate

        cfg = evaluate.checkpoint_config(path)
        if not cfg.lora.rank:
            return cls()
        saved = {k[len("model."):]: md for k, md in reader_type(str(path)).read_metadata().state_dict_metadata.items()
                 if k.startswith("model.")}
        # name -> (shape, stored dtype) of each adapter matrix
        adapters = {k: (tuple(md.size), md.properties.dtype) for k, md in saved.items() if is_adapter_key(k)}
        if not adapters:
            raise LlamatronError(f"{path}: holds no LoRA adapter, though its config.yaml sets lora.rank = {cfg.lora.rank}")
        scaling = cfg.lora.alpha / cfg.lora.rank
        if all(name in saved for name in expected_shapes(args)):
            return cls(scaling, adapters=adapters)
        base = cfg.checkpoint.init_from
        if base:
            if not (Path(base) / ".metadata").is_file():
                raise LlamatronError(f"{path}: holds only LoRA adapters; the frozen base weights come from its run's "
                                     f"checkpoint.init_from, {base}, which is not a checkpoint directory (no DCP .metadata file)")
            verify_checkpoint(Path(base), log=lambda line: print(line, file=sys.stderr))
            stored = reader_type(str(base)).read_metadata().state_dict_metadata
            return cls(scaling, Path(base), {k: v for k, v in stored.items() if k.startswith("model.")},
                       adapters=adapters)
        with torch.device("meta"):
            model = registry.family_of(args).build(args)
        return cls(scaling, seeded=(model, cfg.train.seed), adapters=adapters)

    def read(self, path: Path, name: str, shape, dtype: torch.dtype, read_stored) -> torch.Tensor:
        if self.seeded is not None:
            model, seed = self.seeded
            t = model.initial_value(name, shape, seed).to(dtype)
        else:
            t = read_stored(path if self.base is None else self.base, name, shape, dtype)
        stem = name[: -len(".weight")]
        if f"{stem}.lora_A.weight" not in self.adapters:
            return t
        a, b = (read_stored(path, key, *self.adapters[key]) for key in (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"))
        return (t.float() + self.scaling * (b.float() @ a.float())).to(t.dtype)


def export_hf(src: str | Path, dst: str | Path, dtype: str | None = None, max_shard_size: str | int = "5GB",
              progress: bool = True) -> Path:
    """A llamatron checkpoint (or run directory) -> Hugging Face directory: config.json,
    model-0000i-of-0000N.safetensors and model.safetensors.index.json."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve_checkpoint(src)
    _check_dst(dst)
    verify_checkpoint(path, log=lambda line: print(line, file=sys.stderr))
    args = checkpoint_model_args(path)
    hf_module = registry.family_of(args).hf
    if hf_module is None:
        raise LlamatronError(f"{path}: the {registry.family_of(args).name} family has no Hugging Face format")
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise LlamatronError(f"max shard size {max_shard_size!r}: must be positive")
    lora = _LoRAMerge.of(path, args, FileSystemReader)
    stored = {**lora.base_stored, **FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    why = f"{path / 'config.yaml'}"
    shapes = expected_shapes(args)
    extra = sorted(k for k in stored if k.startswith("model.") and k[len("model."):] not in shapes
                   and not (lora.scaling and is_adapter_key(k)))
    if extra:
        raise LlamatronError(f"{path}: holds {extra[0][len('model.'):]!r} ({len(extra)} unexpected tensor(s)), "
                             f"which the model of {why} does not have")
    specs = []  # (name, shape, stored dtype, output dtype)
    for name, want in shapes.items():
        md = stored.get(f"model.{name}")
        if not isinstance(md, TensorStorageMetadata) and lora.seeded is None:
            raise LlamatronError(f"{name}: missing from checkpoint {path}")
        stored_dtype = md.properties.dtype if md is not None else torch.float32
        if md is not None:
            _check_shape(name, md.size, want, str(path), why)
        specs.append((name, tuple(want), stored_dtype, _out_dtype(dtype, stored_dtype, str(path))))

    # Shards planned up front (file names carry the count), in HF's order, filled to the limit. Each
    # entry is the group of parameters one HF tensor is made of (one, or GPT-2's q, k, v).
    by_name = {spec[0]: spec for spec in specs}
    shards: list[list[list[tuple]]] = [[]]
    used = 0
    for names in _hf_groups(hf_module, [spec[0] for spec in specs], args):
        group = [by_name[name] for name in names]
        size = sum(math.prod(spec[1]) * spec[3].itemsize for spec in group)
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(group)
        used += size
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = sum(math.prod(s[1]) * s[3].itemsize for s in specs)
    out_dtype = specs[0][3]

    with _staging(Path(dst)) as tmp, _bar(total, "export", progress) as bar, quiet_dcp():
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            out = {}
            for group in shard:
                tensors = [lora.read(path, name, shape, st, lambda src, n, shp, d: _read_stored(
                               src, n, shp, d, dcp_load, CheckpointException, FileSystemReader))
                           for name, shape, st, _ in group]
                hf, t = _to_hf(hf_module, [spec[0] for spec in group], tensors, args)
                out[hf] = t.to(group[0][3]).contiguous()
                del tensors
                weight_map[hf] = fname
                bar.update(out[hf].nbytes)
            save_file(out, str(tmp / fname), metadata={"format": "pt"})
            del out
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_module.hf_config(args, out_dtype), indent=2) + "\n")
    return Path(dst)


# --------------------------------------------------------------------------------------------------

CONVERSIONS = {("hf", "llamatron"), ("meta", "llamatron"), ("llamatron", "hf")}


def convert(src: str | Path, dst: str | Path, from_format: str, to_format: str, dtype: str | None = None,
            max_shard_size: str | int = "5GB", progress: bool = True) -> Path:
    """What `llamatron convert --from F --to T SRC DST` runs."""
    if (from_format, to_format) not in CONVERSIONS:
        pairs = ", ".join(f"{a}->{b}" for a, b in sorted(CONVERSIONS))
        raise LlamatronError(f"--from {from_format} --to {to_format}: not supported (supported: {pairs})")
    if dtype not in (None, "keep") and dtype not in DTYPES:
        raise LlamatronError(f"--dtype {dtype!r}: expected keep or one of {', '.join(DTYPES)}")
    if from_format == "hf":
        return import_hf(src, dst, dtype, progress)
    if from_format == "meta":
        return import_meta(src, dst, dtype, progress)
    return export_hf(src, dst, dtype, max_shard_size, progress)
