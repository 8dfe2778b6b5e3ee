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

With `train.gradient_accumulation_fusion` (Megatron's name) the other half goes too: the weight
gradient of each micro-batch is accumulated into an fp32 buffer per layer inside the GEMM (cuBLAS
with an fp32 output, `torch.addmm(..., out_dtype=torch.float32)`), instead of a bf16 product that
autograd casts and adds into the fp32 `.grad` in a separate pass; the buffers become the weights'
`.grad` once the step's backward is done (`WgradBuffers`, which `train_step` drives). On a device
without that kernel (the CPU) the product is bf16 and added in fp32, which is autocast's arithmetic.
The buffers persist across steps: with one micro-batch per step they take memory that backward
would otherwise free.

A mixture of experts' weights (GLaM's `GroupedExperts`, [E, d, f] each, cast by hand in every
micro-batch as autocast would) get the same bf16 copies (`CastOnceExperts`); their gradients still
add into fp32 `.grad` per micro-batch.

Not for FSDP (its mixed precision casts at the all-gather), tensor parallelism (DTensor weights), FP8
layers (Float8Linear, not an exact nn.Linear) or LoRA's frozen bf16 bases (no fp32 weight to cast).
"""

from __future__ import annotations

import torch
from torch import nn

from llamatron.models.glam.experts import GroupedExperts


class _CachedCast(torch.autograd.Function):
    """Forward: the weight's bf16 copy; backward: the gradient, in the weight's dtype."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


@torch.library.custom_op("llamatron::accumulate_wgrad", mutates_args=("main_grad",))
def accumulate_wgrad(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad += grad_out^T x (2-D), in fp32 inside the GEMM where the device has the kernel (the
    fused loss's accumulation of the output weight's gradient). An opaque op that mutates its first
    argument, so that compiled blocks call it as it is."""
    from llamatron.loss import accumulate_weight_grad

    total = accumulate_weight_grad(main_grad, grad_out, x, several=True)
    if total is not main_grad:  # a device whose fp32-output GEMM cannot write into its own input
        main_grad.copy_(total)


@accumulate_wgrad.register_fake
def _(main_grad, grad_out, x) -> None:
    return None


class _FusedWgradLinear(torch.autograd.Function):
    """x W^T + b from W's compute-dtype copy; backward: the input gradient from the copy, the weight's
    accumulated into its fp32 buffer (none returned: `WgradBuffers.attach` makes it the `.grad`)."""

    @staticmethod
    def forward(ctx, x, weight, copy, main_grad, bias):
        xc = x.to(copy.dtype)
        ctx.save_for_backward(xc, copy, main_grad)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return nn.functional.linear(xc, copy, None if bias is None else bias.to(copy.dtype))

    @staticmethod
    def backward(ctx, grad):
        xc, copy, main_grad = ctx.saved_tensors
        grad = grad.to(copy.dtype)
        accumulate_wgrad(main_grad, grad.reshape(-1, grad.shape[-1]), xc.reshape(-1, xc.shape[-1]))
        grad_bias = None if ctx.bias_dtype is None else grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad @ copy).to(ctx.x_dtype), None, None, None, grad_bias


class CastOnceLinear(nn.Linear):
    """An nn.Linear whose forward uses `weight_copy`, its weight in the compute dtype (`refresh`), and
    with a `main_grad` buffer accumulates its weight gradient there (gradient-accumulation fusion)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main_grad = self._buffers.get("main_grad")
        if main_grad is not None and torch.is_grad_enabled():
            return _FusedWgradLinear.apply(x, self.weight, self.weight_copy, main_grad, self.bias)
        return nn.functional.linear(x, _CachedCast.apply(self.weight, self.weight_copy), self.bias)


class CastOnceExperts(GroupedExperts):
    """GroupedExperts whose w1, w2 come from their compute-dtype copies (`w1_copy`, `w2_copy`), unless
    expert parallelism passes this rank's shards instead."""

    def compute_weights(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
        if w1 is self.w1 and w2 is self.w2 and dtype == self.w1_copy.dtype:
            return _CachedCast.apply(w1, self.w1_copy), _CachedCast.apply(w2, self.w2_copy)
        return super().compute_weights(w1, w2, dtype)


class WgradBuffers:
    """The fp32 weight-gradient buffers of a part's fused layers: zeroed before a step's first
    backward (`begin`), made the weights' `.grad` after its last (`attach`)."""

    def __init__(self, mods: list[CastOnceLinear]):
        self.mods = mods

    def begin(self) -> None:
        torch._foreach_zero_([m.main_grad for m in self.mods])

    def attach(self) -> None:
        for m in self.mods:
            if m.weight.grad is not None:  # also used other than through forward (GLaM's router: F.linear)
                m.main_grad.add_(m.weight.grad)
            m.weight.grad = m.main_grad


def cast_weights_once(parts: list[nn.Module], dtype: torch.dtype, fuse_wgrad: bool = False) -> list[str]:
    """Make every trainable exact nn.Linear inside the parts' blocks a `CastOnceLinear` with its copy in
    `dtype`, from the current weights; `fuse_wgrad`: with an fp32 weight-gradient buffer each, driven
    by the part's `wgrad_buffers` (train_step). Exact GroupedExperts become `CastOnceExperts` (copies
    only). Returns the module names converted."""
    done = []
    for part in parts:
        mods, copies = [], []  # copies: (copy, weight), what `refresh` copies, found once rather than every step
        for name, mod in part.layers.named_modules():
            if type(mod) is nn.Linear and mod.weight.requires_grad and mod.weight.dtype != dtype:
                mod.__class__ = CastOnceLinear
                mod.register_buffer("weight_copy", torch.empty_like(mod.weight, dtype=dtype), persistent=False)
                if fuse_wgrad:
                    mod.register_buffer("main_grad", torch.zeros_like(mod.weight), persistent=False)
                mods.append(mod)
                copies.append((mod.weight_copy, mod.weight))
                done.append(f"layers.{name}")
            elif _casts_experts(mod, dtype):
                mod.__class__ = CastOnceExperts
                for w in ("w1", "w2"):
                    mod.register_buffer(f"{w}_copy", torch.empty_like(getattr(mod, w), dtype=dtype), persistent=False)
                    copies.append((getattr(mod, f"{w}_copy"), getattr(mod, w)))
                done.append(f"layers.{name}")
        part.cast_once_linears, part.cast_once_copies = mods, copies
        if fuse_wgrad and mods:
            part.wgrad_buffers = WgradBuffers(mods)
    refresh(parts)
    return done


@torch.no_grad()
def refresh(parts: list[nn.Module]) -> None:
    """Copy the current weights into their compute-dtype copies (after loading, after each optimizer step)."""
    pairs = [pair for part in parts for pair in getattr(part, "cast_once_copies", ())]
    if pairs:
        torch._foreach_copy_([copy for copy, _ in pairs], [weight for _, weight in pairs])


def _casts_experts(mod: nn.Module, dtype: torch.dtype) -> bool:
    """Exact GroupedExperts with trainable weights not in `dtype`, not in FP8 (its own bf16 copies)."""
    return (type(mod) is GroupedExperts and not mod.fp8_grouped_mm and mod.w1.requires_grad
            and mod.w1.dtype != dtype)
