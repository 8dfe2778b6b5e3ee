"""FlashAttention 4's kernels (the flash-attn-4 package, NVIDIA's CuTe DSL) as torch's FA4 slot calls them.

torch's flash attention registry (`torch.nn.attention.activate_flash_attention_impl`, torch >= 2.10)
puts FA4 behind its own flash SDPA ops, eager and compiled alike, importing a module that exposes
`_flash_attn_fwd` -> (out, lse) and `_flash_attn_bwd` -> (dq, dk, dv). flash-attn-4's recent
releases (4.0.0b36) return more from both (the forward also three auxiliaries), which torch 2.11's
slot cannot unpack ("too many values to unpack"): this module passes each call through and returns
what the slot expects. llamatron.runtime.activate_fa4 registers it.
"""

from __future__ import annotations

from flash_attn.cute import interface as _fa4


def _flash_attn_fwd(*args, **kwargs):
    result = _fa4._flash_attn_fwd(*args, **kwargs)
    return result[0], result[1]


def _flash_attn_bwd(*args, **kwargs):
    grads = _fa4._flash_attn_bwd(*args, **kwargs)
    return grads[0], grads[1], grads[2]
