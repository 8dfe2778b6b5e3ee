"""The GPT family's Hugging Face format (`GPT2LMHeadModel`): names both ways and config.json <-> GPTArgs.

Two differences from a plain key map, both handled by the optional adapter hooks `llamatron/convert.py`
uses: HF's `Conv1D` stores weights as [in, out] (transposed vs nn.Linear), and HF fuses q, k and v
into one `attn.c_attn` ([dim, 3*dim] weight, [3*dim] bias), which llamatron keeps as three
projections (so tensor parallelism splits heads). Import slices c_attn once per projection; export
concatenates them back (`hf_groups` / `to_hf_group`). Tied embeddings: no `lm_head.weight` is
written (transformers ties it on load) and one found on import is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

import torch

from llamatron.errors import LlamatronError
from llamatron.models.gpt.model import GPTArgs

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"

_TOP_TO_HF = {
    "embeddings.tok.weight": "transformer.wte.weight",
    "embeddings.pos.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "head.proj.weight": "lm_head.weight",
}
# Per block; (llamatron suffix -> HF suffix). q/k/v map to slices of c_attn (below).
_LAYER_TO_HF = {
    "attention_norm.weight": "ln_1.weight",
    "attention_norm.bias": "ln_1.bias",
    "attention.wo.weight": "attn.c_proj.weight",
    "attention.wo.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "feed_forward.w1.weight": "mlp.c_fc.weight",
    "feed_forward.w1.bias": "mlp.c_fc.bias",
    "feed_forward.w2.weight": "mlp.c_proj.weight",
    "feed_forward.w2.bias": "mlp.c_proj.bias",
}
_QKV = ("wq", "wk", "wv")  # order of the slices of c_attn
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_QKV_NAME = re.compile(r"^attention\.(wq|wk|wv)\.(weight|bias)$")
# The causal-mask buffers older GPT-2 checkpoints carry (attn.bias is a [1,1,n,n] mask, not a weight).
_HF_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


def _canonical(hf: str) -> str:
    """Old GPT-2 checkpoints (the original `gpt2` upload) name the transformer's tensors without prefix."""
    return hf if hf.startswith(("transformer.", "lm_head.")) else f"transformer.{hf}"


def _conv1d(name: str) -> bool:
    """A matrix HF stores as Conv1D ([in, out]): every block matrix; not embeddings or lm_head."""
    return name.startswith("layers.") and name.endswith("weight") and "norm" not in name


def hf_name(name: str) -> str:
    """llamatron parameter name -> HF name (q/k/v: the fused c_attn they are slices of)."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    m = _LAYER.match(name)
    if m:
        if q := _QKV_NAME.match(m.group(2)):
            return f"transformer.h.{m.group(1)}.attn.c_attn.{q.group(2)}"
        if m.group(2) in _LAYER_TO_HF:
            return f"transformer.h.{m.group(1)}.{_LAYER_TO_HF[m.group(2)]}"
    raise LlamatronError(f"parameter {name!r} has no Hugging Face name")


def llamatron_names(hf: str, args: GPTArgs) -> list[str]:
    """The llamatron parameters HF tensor `hf` supplies ([] for a name that is not a GPT-2 parameter)."""
    hf = _canonical(hf)
    if hf in _TOP_FROM_HF:
        return [_TOP_FROM_HF[hf]]
    m = _HF_LAYER.match(hf)
    if not m:
        return []
    i, rest = m.groups()
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        return [f"layers.{i}.attention.{w}.{rest.rsplit('.', 1)[1]}" for w in _QKV]
    return [f"layers.{i}.{_LAYER_FROM_HF[rest]}"] if rest in _LAYER_FROM_HF else []


def llamatron_name(hf: str) -> str | None:
    names = llamatron_names(hf, GPTArgs())
    return names[0] if len(names) == 1 else None


def hf_ignored(hf: str, args: GPTArgs | None = None) -> bool:
    """Mask buffers, and lm_head.weight when the embeddings are tied (a copy of wte)."""
    if _HF_IGNORED.match(hf):
        return True
    return hf == "lm_head.weight" and (args is None or args.tie_embeddings)


def hf_shape(name: str, shape: tuple[int, ...], args: GPTArgs) -> tuple[int, ...]:
    """The shape of the HF tensor holding llamatron parameter `name` (of `shape`)."""
    if _QKV_NAME.match(name.split(".", 2)[-1]):
        return (args.dim, 3 * args.dim) if name.endswith("weight") else (3 * args.dim,)
    return tuple(reversed(shape)) if _conv1d(name) else tuple(shape)


def from_hf_part(name: str, hf: str, w: torch.Tensor, args: GPTArgs) -> torch.Tensor:
    """llamatron parameter `name` from HF tensor `hf` (its slice of c_attn; Conv1D transposed back)."""
    q = _QKV_NAME.match(name.split(".", 2)[-1])
    if q:
        # c_attn's output columns are [q | k | v]; weight [dim, 3*dim], bias [3*dim].
        part = w.chunk(3, dim=-1)[_QKV.index(q.group(1))]
        return part.t().contiguous() if w.dim() == 2 else part.contiguous()
    return w.t().contiguous() if _conv1d(name) else w


def hf_groups(names: list[str], args: GPTArgs) -> list[list[str]]:
    """llamatron parameters grouped by the HF tensor they make, in the parameters' order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(hf_name(name), []).append(name)
    return list(groups.values())


def to_hf_group(names: list[str], tensors: list[torch.Tensor], args: GPTArgs) -> tuple[str, torch.Tensor]:
    """One HF tensor from its llamatron parameters (q, k, v concatenated into c_attn; Conv1D transposed)."""
    hf = hf_name(names[0])
    if len(names) > 1:
        order = sorted(range(len(names)), key=lambda i: _QKV.index(_QKV_NAME.match(names[i].split(".", 2)[-1]).group(1)))
        parts = [tensors[i] for i in order]
        return hf, torch.cat([p.t() for p in parts], dim=1) if parts[0].dim() == 2 else torch.cat(parts)
    return hf, tensors[0].t() if _conv1d(names[0]) else tensors[0]


# --------------------------------------------------------------------------------------------------
# config.json <-> GPTArgs

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


def _need(cfg: Mapping, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise LlamatronError(f"{where}: missing key '{key}'")
    return cfg[key]


def args_from_hf_config(cfg: Mapping, where: str = "config.json") -> GPTArgs:
    """A Hugging Face GPT2Config (as a dict) -> GPTArgs. Dropout probabilities are not kept (llamatron
    trains without dropout, as Pax's GPT presets)."""
    if cfg.get("model_type") != MODEL_TYPE:
        raise LlamatronError(f"{where}: model_type {cfg.get('model_type')!r} is not {MODEL_TYPE!r}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise LlamatronError(f"{where}: activation_function {act!r} is not supported (expected one of "
                             f"{', '.join(_TANH_GELUS)}: GELU, tanh approximation)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if key in cfg and cfg[key] != want:
            raise LlamatronError(f"{where}: {key}={json.dumps(cfg[key])} is not supported (GPT-2 has {json.dumps(want)})")
    dim = int(_need(cfg, "n_embd", where))
    n_heads = int(_need(cfg, "n_head", where))
    if dim % n_heads:
        raise LlamatronError(f"{where}: n_embd {dim} is not divisible by n_head {n_heads}")
    n_positions = int(_need(cfg, "n_positions", where))
    return dataclasses.replace(
        GPTArgs(),
        dim=dim,
        n_layers=int(_need(cfg, "n_layer", where)),
        n_heads=n_heads,
        vocab_size=int(_need(cfg, "vocab_size", where)),
        ffn_dim=int(cfg.get("n_inner") or 4 * dim),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        n_positions=n_positions,
        max_seq_len=n_positions,
        init_std=float(cfg.get("initializer_range", GPTArgs.init_std)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def hf_config(args: GPTArgs, dtype: torch.dtype) -> dict:
    """The config.json of a GPT2LMHeadModel with these shapes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "n_embd": args.dim,
        "n_layer": args.n_layers,
        "n_head": args.n_heads,
        "n_inner": args.ffn_dim,
        "n_positions": args.n_positions,
        "vocab_size": args.vocab_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": args.norm_eps,
        "initializer_range": args.init_std,
        "tie_word_embeddings": args.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
