"""The Llama family's Hugging Face and Meta formats: parameter names both ways, the q/k permutation, and
config.json / params.json <-> ModelArgs. `llamatron/convert.py` does the I/O (streaming, temporary names,
errors) for every family through these functions.

Meta's parameter names are llamatron's (the model keeps Meta's layout, q/k rows interleaved); Hugging
Face's q/k rows are half-split per head (REFERENCE C.2), hence `permute_to_hf` / `permute_from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

import torch

from llamatron.errors import LlamatronError
from llamatron.models.llama.model import ModelArgs, llama_ffn_dim

MODEL_TYPE = "llama"  # config.json's model_type
ARCHITECTURE = "LlamaForCausalLM"

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
META_IGNORED = {"rope.freqs"}

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


def hf_ignored(hf: str, args: ModelArgs | None = None) -> bool:
    """Tensors some HF checkpoints carry that are not weights (recomputed from the config)."""
    return bool(_HF_IGNORED.search(hf))


def meta_cat_dim(name: str, llama2: bool = False) -> int | None:
    """The dimension Meta's model-parallel shards split parameter `name` along; None: replicated.
    Llama 2 (fairscale `ParallelEmbedding`) splits the embedding by columns (dim 1), Llama 3 by rows."""
    if llama2 and name == "tok_embeddings.weight":
        return 1
    m = _LAYER.match(name)
    return _META_CAT_DIM.get(m.group(2) if m else name)


# --------------------------------------------------------------------------------------------------
# Configs: HF config.json and Meta params.json <-> ModelArgs

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


# Meta does not store a context length; Llama 3.1 (scaled RoPE) is trained to 128K, Llama 3 to 8K,
# Llama 2 to 4K.
META_CONTEXT_SCALED, META_CONTEXT, LLAMA2_CONTEXT = 131072, 8192, 4096
LLAMA2_ROPE_THETA = 10000.0  # Llama 2's params.json has no rope_theta (its reference hard-codes 10,000)


def is_llama2_params(params: Mapping) -> bool:
    """Llama 2's params.json (meta-llama/llama `ModelArgs`): no rope_theta, vocab_size -1."""
    return "rope_theta" not in params


def args_from_meta_params(params: Mapping, where: str = "params.json", vocab_size: int | None = None) -> ModelArgs:
    """Meta's params.json (llama-models ModelArgs, or Llama 2's) -> ModelArgs. vocab_size: the
    checkpoint's, for a Llama 2 params.json (which says -1: the tokenizer decided it)."""
    dim = int(_need(params, "dim", where))
    n_heads = int(_need(params, "n_heads", where))
    scaled = bool(params.get("use_scaled_rope", False))
    llama2 = is_llama2_params(params)
    vocab = int(_need(params, "vocab_size", where))
    if vocab <= 0 and vocab_size:
        vocab = vocab_size
    args = dataclasses.replace(
        ModelArgs(),
        dim=dim,
        n_layers=int(_need(params, "n_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        vocab_size=vocab,
        ffn_dim=llama_ffn_dim(dim, int(_need(params, "multiple_of", where)), params.get("ffn_dim_multiplier")),
        norm_eps=float(_need(params, "norm_eps", where)),
        rope_theta=float(params["rope_theta"]) if not llama2 else LLAMA2_ROPE_THETA,
        # Meta's apply_scaling hard-codes low 1, high 4, original context 8192; newer params carry the factor.
        rope_scaling_factor=float(params.get("rope_scaling_factor", 8.0)) if scaled else 0.0,
        max_seq_len=META_CONTEXT_SCALED if scaled else LLAMA2_CONTEXT if llama2 else META_CONTEXT,
    )
    if args.vocab_size <= 0:
        raise LlamatronError(f"{where}: vocab_size {args.vocab_size}, and no tok_embeddings.weight to read it from")
    _check_args(args, where)
    return args
