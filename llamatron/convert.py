"""Checkpoint import and export: Hugging Face (safetensors + config.json) and Meta (`consolidated.*.pth`).

One state-dict adapter does the work both ways: a key map between Meta's parameter names (which
llamatron's model uses unchanged) and Hugging Face's, and the q/k row permutation between Meta's
interleaved rotary pairs and Hugging Face's half-split ones (REFERENCE C.2). Everything else is I/O:

    import_hf(SRC, DST)     HF directory  -> llamatron checkpoint (weights only, for init_from and eval)
    import_meta(SRC, DST)   Meta directory (params.json + consolidated.NN.pth, any model-parallel degree)
                            -> llamatron checkpoint
    export_hf(SRC, DST)     llamatron checkpoint (or run directory) -> HF directory that transformers'
                            LlamaForCausalLM.from_pretrained loads

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamatron.errors import LlamatronError
from llamatron.train.checkpoint import quiet_dcp
from llamatron.model import MODEL_SIZES, ModelArgs

# --------------------------------------------------------------------------------------------------
# The state-dict adapter: names and the q/k permutation

_TOP_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some older HF checkpoints carry; they are recomputed from the config, not weights.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_META_IGNORED = {"rope.freqs"}

# Meta model-parallel shards: the dimension each parameter is split along (REFERENCE C.2); the norms,
# absent here, are replicated. Llama 3 splits the embedding by vocabulary rows (dim 0).
_META_CAT_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,
}


def hf_name(name: str) -> str:
    """llamatron/Meta parameter name -> Hugging Face name."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{_LAYER_TO_HF[m.group(2)]}"
    raise LlamatronError(f"parameter {name!r} has no Hugging Face name")


def llamatron_name(hf: str) -> str | None:
    """Hugging Face name -> llamatron/Meta name; None for a name that is not a Llama parameter."""
    if hf in _TOP_FROM_HF:
        return _TOP_FROM_HF[hf]
    m = _HF_LAYER.match(hf)
    if m and m.group(2) in _LAYER_FROM_HF:
        return f"layers.{m.group(1)}.{_LAYER_FROM_HF[m.group(2)]}"
    return None


def _rope_heads(name: str, args: ModelArgs) -> int | None:
    """Heads of a q/k projection (whose rows are permuted between the two layouts), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs (x[2i], x[2i+1]) -> HF's half-split ones (x[i], x[i+hd/2]), per head."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def to_hf(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One llamatron parameter -> (HF name, HF tensor)."""
    heads = _rope_heads(name, args)
    return hf_name(name), (permute_to_hf(w, heads) if heads else w)


def from_hf(hf: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF parameter -> (llamatron name, llamatron tensor)."""
    name = llamatron_name(hf)
    if name is None:
        raise LlamatronError(f"{hf!r} is not a Llama parameter")
    heads = _rope_heads(name, args)
    return name, (permute_from_hf(w, heads) if heads else w)


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """In memory, for small models and tests; the converters below stream the same per-tensor maps."""
    return dict(to_hf(k, v, args) for k, v in sd.items())


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return dict(from_hf(k, v, args) for k, v in sd.items() if not _HF_IGNORED.search(k))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of `Transformer(args)`, in HF checkpoint order (embedding, layers, norm, output)."""
    d, hd, f = args.dim, args.head_dim, args.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


# --------------------------------------------------------------------------------------------------
# Configs: HF config.json and Meta params.json <-> ModelArgs <-> llamatron's model config

LLAMA3_ROPE = "llama3"


def _need(cfg: Mapping, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise LlamatronError(f"{where}: missing key '{key}'")
    return cfg[key]


def args_from_hf_config(cfg: Mapping, where: str = "config.json") -> ModelArgs:
    """A Hugging Face LlamaConfig (as a dict) -> ModelArgs. Reads transformers v4's `rope_theta` +
    `rope_scaling` and v5's `rope_parameters`."""
    if cfg.get("model_type", "llama") != "llama":
        raise LlamatronError(f"{where}: model_type {cfg['model_type']!r} is not 'llama'")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("tie_word_embeddings", False)):
        if key in cfg and cfg[key] != want:
            raise LlamatronError(
                f"{where}: {key}={json.dumps(cfg[key])} is not supported (Llama 3.1 has {json.dumps(want)})")
    n_heads = int(_need(cfg, "num_attention_heads", where))
    dim = int(_need(cfg, "hidden_size", where))
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise LlamatronError(f"{where}: rope_scaling {rope!r} is not a mapping")
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise LlamatronError(f"{where}: missing key 'rope_theta'")
    args = dataclasses.replace(
        ModelArgs(),
        dim=dim,
        n_layers=int(_need(cfg, "num_hidden_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        vocab_size=int(_need(cfg, "vocab_size", where)),
        ffn_dim=int(_need(cfg, "intermediate_size", where)),
        norm_eps=float(_need(cfg, "rms_norm_eps", where)),
        rope_theta=float(theta),
        max_seq_len=int(_need(cfg, "max_position_embeddings", where)),
        init_std=float(cfg.get("initializer_range", ModelArgs.init_std)),
    )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == LLAMA3_ROPE:
        sub = f"{where} rope_scaling"
        args = dataclasses.replace(
            args,
            rope_scaling_factor=float(_need(rope, "factor", sub)),
            rope_low_freq_factor=float(_need(rope, "low_freq_factor", sub)),
            rope_high_freq_factor=float(_need(rope, "high_freq_factor", sub)),
            rope_original_context=int(_need(rope, "original_max_position_embeddings", sub)),
        )
    elif kind == "default":
        args = dataclasses.replace(args, rope_scaling_factor=0.0)
    else:
        raise LlamatronError(f"{where}: rope_scaling type {kind!r} is not supported; llamatron implements "
                             f"{LLAMA3_ROPE!r} (Llama 3.1) or none")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != args.head_dim:
        raise LlamatronError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads = {args.head_dim}; "
                             f"llamatron derives head_dim from them")
    _check_args(args, where)
    return args


def _check_args(args: ModelArgs, where: str) -> None:
    if args.dim % args.n_heads or args.head_dim % 2 or args.n_heads % args.n_kv_heads:
        raise LlamatronError(f"{where}: inconsistent heads: dim {args.dim}, {args.n_heads} heads, "
                             f"{args.n_kv_heads} KV heads (dim/heads must be even, heads a multiple of KV heads)")


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The config.json of a Llama 3.1 checkpoint with these shapes (REFERENCE C.2 fields)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": args.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.rope_scaling_factor:
        cfg["rope_scaling"] = {
            "rope_type": LLAMA3_ROPE,
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    # Llama 3.1's special tokens, where the vocabulary holds them (the test models' does not).
    if args.vocab_size > 128001:
        cfg["bos_token_id"], cfg["eos_token_id"] = 128000, 128001
    return cfg


# Meta does not store a context length; Llama 3.1 (scaled RoPE) is trained to 128K, Llama 3 to 8K.
META_CONTEXT_SCALED, META_CONTEXT = 131072, 8192


def args_from_meta_params(params: Mapping, where: str = "params.json") -> ModelArgs:
    """Meta's params.json (llama-models ModelArgs) -> ModelArgs."""
    from llamatron.model import llama_ffn_dim

    dim = int(_need(params, "dim", where))
    n_heads = int(_need(params, "n_heads", where))
    scaled = bool(params.get("use_scaled_rope", False))
    args = dataclasses.replace(
        ModelArgs(),
        dim=dim,
        n_layers=int(_need(params, "n_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        vocab_size=int(_need(params, "vocab_size", where)),
        ffn_dim=llama_ffn_dim(dim, int(_need(params, "multiple_of", where)), params.get("ffn_dim_multiplier")),
        norm_eps=float(_need(params, "norm_eps", where)),
        rope_theta=float(_need(params, "rope_theta", where)),
        # Meta's apply_scaling hard-codes low 1, high 4, original context 8192; newer params carry the factor.
        rope_scaling_factor=float(params.get("rope_scaling_factor", 8.0)) if scaled else 0.0,
        max_seq_len=META_CONTEXT_SCALED if scaled else META_CONTEXT,
    )
    if args.vocab_size <= 0:
        raise LlamatronError(f"{where}: vocab_size {args.vocab_size} (a Llama 2 params.json?); Llama 3 gives it")
    _check_args(args, where)
    return args


# ModelArgs fields that the run config does not carry and that are irrelevant to the weights.
_NOT_MODEL_SHAPE = {"init_std"}


def model_config_for(args: ModelArgs, where: str | None = None):
    """The `[model]` config section whose `llamatron.config.model_args` is `args`: the closest named
    size, with every field the section has set explicitly (so the checkpoint does not depend on a
    preset staying the same). A ModelArgs field the section lacks must equal that size's value."""
    from llamatron.config import ModelConfig

    keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "size"]
    size = min(MODEL_SIZES, key=lambda s: sum(getattr(MODEL_SIZES[s], k) != getattr(args, k) for k in keys))
    base = MODEL_SIZES[size]
    for f in dataclasses.fields(ModelArgs):
        if f.name in keys or f.name in _NOT_MODEL_SHAPE:
            continue
        if getattr(args, f.name) != getattr(base, f.name):
            prefix = f"{where}: " if where else ""
            raise LlamatronError(
                f"{prefix}{f.name} = {getattr(args, f.name)} cannot be expressed in a llamatron model config: "
                f"[model] has no such key and every model.size uses {getattr(base, f.name)}")
    return ModelConfig(size=size, **{k: getattr(args, k) for k in keys})


def model_overrides(args: ModelArgs) -> list[str]:
    """`--set` overrides that give a training run this model shape."""
    mc = model_config_for(args)
    base = MODEL_SIZES[mc.size]
    keys = [k for k in dataclasses.asdict(mc) if k != "size"]
    return [f"model.size={mc.size}"] + [f"model.{k}={getattr(args, k)}" for k in keys
                                        if getattr(args, k) != getattr(base, k)]


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


def write_llamatron_checkpoint(dst: str | Path, tensors: list[TensorSpec], args: ModelArgs, source: str,
                               progress: bool = True) -> Path:
    """A weights-only llamatron checkpoint (`{"model": ...}` in DCP, config.yaml, trainer_state.json,
    COMPLETE) whose tensors are produced by their `load` one at a time, as DCP writes them."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from llamatron.config import Config, dump_config

    model_cfg = model_config_for(args)  # fails before anything is written if the shape is not expressible
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
    args = args_from_hf_config(_read_json(src / "config.json"), str(src / "config.json"))
    model_config_for(args, str(src / "config.json"))
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
                if _HF_IGNORED.search(hf):
                    continue
                if files.get(hf) != fname:
                    if hf in files:  # also listed elsewhere: the index decides which copy is read
                        continue
                    raise LlamatronError(f"{src / fname}: tensor {hf!r} is not in the index")
                name = llamatron_name(hf)
                if name is None or name not in shapes:
                    raise LlamatronError(f"{src / fname}: unexpected tensor {hf!r} for the model in {why}")
                found[name] = (hf, fname)
        for hf, fname in files.items():
            if not _HF_IGNORED.search(hf) and hf not in keys[fname]:
                raise LlamatronError(f"{src / fname}: tensor {hf!r} listed in the index is missing")

        tensors = []
        for name, want in shapes.items():
            if name not in found:
                raise LlamatronError(f"{hf_name(name)}: missing from {src}")
            hf, fname = found[name]
            sl = handles[fname].get_slice(hf)
            where = f"{src / fname}"
            _check_shape(hf, sl.get_shape(), want, where, why)
            st = sl.get_dtype()
            if st not in _SAFETENSORS_DTYPES:
                raise LlamatronError(f"{hf}: dtype {st} in {where} is not a floating-point weight type")
            out = _out_dtype(dtype, _SAFETENSORS_DTYPES[st], where)

            def load(h=handles[fname], hf=hf):
                return from_hf(hf, h.get_tensor(hf), args)[1]

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
    args = args_from_meta_params(_read_json(src / "params.json"), str(src / "params.json"))
    model_config_for(args, str(src / "params.json"))
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

    shapes = expected_shapes(args)
    why = f"{src / 'params.json'} ({len(paths)} consolidated.*.pth shard(s) found)"
    for p, sd in zip(paths, shards):
        for k, v in sd.items():
            if k in _META_IGNORED:
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
        suffix = _LAYER.match(name).group(2) if name.startswith("layers.") else name
        cat = _META_CAT_DIM.get(suffix)
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


def checkpoint_model_args(path: str | Path) -> ModelArgs:
    import yaml

    from llamatron.config import config_from_dict, model_args
    from llamatron.train import checkpoint as ckpt

    return model_args(config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(path))).model)


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
    args = checkpoint_model_args(path)
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise LlamatronError(f"max shard size {max_shard_size!r}: must be positive")
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    why = f"{path / 'config.yaml'}"
    shapes = expected_shapes(args)
    extra = sorted(k for k in stored if k.startswith("model.") and k[len("model."):] not in shapes)
    if extra:
        raise LlamatronError(f"{path}: holds {extra[0][len('model.'):]!r} ({len(extra)} unexpected tensor(s)), "
                             f"which the model of {why} does not have")
    specs = []  # (name, shape, stored dtype, output dtype)
    for name, want in shapes.items():
        md = stored.get(f"model.{name}")
        if not isinstance(md, TensorStorageMetadata):
            raise LlamatronError(f"{name}: missing from checkpoint {path}")
        _check_shape(name, md.size, want, str(path), why)
        specs.append((name, tuple(want), md.properties.dtype, _out_dtype(dtype, md.properties.dtype, str(path))))

    # Shards planned up front (file names carry the count), in HF's order, filled to the limit.
    shards: list[list[tuple]] = [[]]
    used = 0
    for spec in specs:
        size = math.prod(spec[1]) * spec[3].itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = sum(math.prod(s[1]) * s[3].itemsize for s in specs)
    out_dtype = specs[0][3]

    with _staging(Path(dst)) as tmp, _bar(total, "export", progress) as bar, quiet_dcp():
        for i, group in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            out = {}
            for name, shape, st, od in group:
                # One tensor per DCP read (DCP reads only the requested keys): the shard being
                # assembled plus one tensor in its stored dtype, never a whole shard in fp32.
                sd = {"model": {name: torch.empty(shape, dtype=st)}}
                try:
                    dcp_load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
                except CheckpointException as e:  # a BaseException, with each rank's error inside
                    inner = next(iter(e.failures.values()), e)
                    inner = inner[0] if isinstance(inner, tuple) else inner  # (exception, stack)
                    first = (str(inner).strip().splitlines() or [""])[0]
                    raise LlamatronError(f"{path}: cannot read {name}: {inner.__class__.__name__}: {first}") from None
                hf, t = to_hf(name, sd["model"].pop(name), args)
                out[hf] = t.to(od).contiguous()
                weight_map[hf] = fname
                bar.update(out[hf].nbytes)
            save_file(out, str(tmp / fname), metadata={"format": "pt"})
            del out
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(args, out_dtype), indent=2) + "\n")
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
