"""Grouped-query attention for any family: scaled_dot_product_attention with fewer key/value heads
than query heads.

Two paths, the same mathematics:
- expand: K and V repeated to one head per query head (`repeat_interleave`), then SDPA. Copies
  n_heads/n_kv_heads times the K/V activations (at the 8B shape, 4x) and their gradients.
- native: SDPA's `enable_gqa=True` (torch >= 2.5): the kernels (flash, cuDNN) read each KV head for its
  group of query heads, no copy.

LLAMATRON_GQA picks one: auto (default: native on CUDA, expand elsewhere), native, expand. The CPU
default stays expand: the golden-loss tests hold the losses of that path bit for bit; the native path
agrees within fp32 rounding (tests/test_attention_ops.py). The value is read once, at import (a
constant to torch.compile); `set_gqa_mode` changes it in process (benchmarks).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llamatron.errors import LlamatronError

ENV = "LLAMATRON_GQA"
MODES = ("auto", "native", "expand")
HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
_mode = os.environ.get(ENV, "auto")


def set_gqa_mode(mode: str) -> None:
    global _mode
    _mode = mode
    native_gqa(torch.device("cpu"))  # checks the name


def native_gqa(device: torch.device) -> bool:
    if _mode not in MODES:
        raise LlamatronError(f"{ENV}={_mode!r}: expected one of {', '.join(MODES)}")
    return HAS_ENABLE_GQA and (_mode == "native" or (_mode == "auto" and device.type == "cuda"))


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa_kwargs) -> torch.Tensor:
    """SDPA of q [batch, seq, n_heads, head_dim] over k, v [batch, seq, n_kv_heads, head_dim] (the
    projections' layout); returns [batch, seq, n_heads, head_dim]. Query head h uses KV head
    h // (n_heads / n_kv_heads), as Llama's repeat_kv. Keyword arguments go to SDPA, which is looked
    up at each call: context parallelism replaces it."""
    n_rep = q.shape[2] // k.shape[2]
    native = n_rep > 1 and native_gqa(q.device)
    if n_rep > 1 and not native:
        # Expanded in this layout, before the transpose: the kernels then see the strides they
        # always saw (the golden losses are bit-identical to the code before this module).
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    if native:
        sdpa_kwargs["enable_gqa"] = True
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **sdpa_kwargs)
    return out.transpose(1, 2)


_COMPILED: dict = {}


def compiled_on_cuda(fn, device: torch.device):
    """`fn` (a flex_attention call, or another function that is fast only compiled: the FP8 weight
    copies' refresh) compiled once, with static shapes, on CUDA, where flex_attention is fast compiled
    and a slow reference implementation eager; `fn` itself elsewhere. Made once per
    function, outside any compiled or checkpointed block (made inside one, torch.compile refuses the
    side effect)."""
    if device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]
