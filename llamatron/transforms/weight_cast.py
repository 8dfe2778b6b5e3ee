"""The block linears' bf16 weight copies made once per optimizer step (`train.cast_weights_once`).

Under bf16 autocast over fp32 master weights (one GPU, no FSDP), autocast casts every linear's weight
to bf16 in every micro-batch's forward: with 8 micro-batches per step, 8 reads of 4 bytes and writes
of 2 per weight, all of them giving the same values, since the weights change only at the optimizer
step. Here each exact `nn.Linear` inside the blocks keeps its bf16 copy in a buffer, refreshed after
the weights change (`refresh`: the trainer calls it once the weights are loaded and after every
optimizer step), and its forward multiplies by that copy; the gradient goes to the fp32 weight cast
back to fp32, as autocast's cast does. Forward and backward compute exactly what autocast computes
(the same bf16 values in the same GEMMs): only the casts per micro-batch go. This is the cast half of
Megatron's bf16-parameters lever; the fp32 gradient accumulation stays as it is.

Not for FSDP (its mixed precision casts at the all-gather), tensor parallelism (DTensor weights), FP8
layers (Float8Linear, not an exact nn.Linear) or LoRA's frozen bf16 bases (no fp32 weight to cast).
"""

from __future__ import annotations

import torch
from torch import nn


class _CachedCast(torch.autograd.Function):
    """Forward: the weight's bf16 copy; backward: the gradient, in the weight's dtype."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class CastOnceLinear(nn.Linear):
    """An nn.Linear whose forward uses `weight_copy`, its weight in the compute dtype (`refresh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, _CachedCast.apply(self.weight, self.weight_copy), self.bias)


def cast_weights_once(parts: list[nn.Module], dtype: torch.dtype) -> list[str]:
    """Make every trainable exact nn.Linear inside the parts' blocks a `CastOnceLinear` with its copy in
    `dtype`, from the current weights. Returns the module names converted."""
    done = []
    for part in parts:
        for name, mod in part.layers.named_modules():
            if type(mod) is nn.Linear and mod.weight.requires_grad and mod.weight.dtype != dtype:
                mod.__class__ = CastOnceLinear
                mod.register_buffer("weight_copy", torch.empty_like(mod.weight, dtype=dtype), persistent=False)
                done.append(f"layers.{name}")
    refresh(parts)
    return done


@torch.no_grad()
def refresh(parts: list[nn.Module]) -> None:
    """Copy the current weights into their compute-dtype copies (after loading, after each optimizer step)."""
    mods = [m for part in parts for m in part.modules() if isinstance(m, CastOnceLinear)]
    if mods:
        torch._foreach_copy_([m.weight_copy for m in mods], [m.weight for m in mods])
