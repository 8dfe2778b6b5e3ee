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
micro-batch as autocast would) get the same bf16 copies (`CastOnceExperts`) and, on the capacity
path's batched matmuls, the same fp32 accumulation inside the GEMM (`torch.baddbmm(..., out_dtype=
torch.float32)`); the dropless path's gradients reach their buffers after backward.

Tensorwise FP8 layers (torchao's Float8Linear) keep an E4M3 copy instead, made once per step the same
way (transforms/fp8_weight_cast.py), and with `fuse_wgrad` add their bf16 weight gradients into the same
kind of fp32 buffers; the fused FP8 SwiGLU's gate and up projections too (`FP8SwiGLU.cast_once`).

Not for FSDP (its mixed precision casts at the all-gather), tensor parallelism (DTensor weights), rowwise
FP8 layers or LoRA's frozen bf16 bases (no fp32 weight to cast). Left unset, the two options are on where
`pays` says they were measured faster and cost no memory at the peak (`wanted`). The embedding and the
output layer outside the blocks: transforms/outer_weights.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamatron.models.glam.experts import GroupedExperts
from llamatron.transforms import fp8_weight_cast, outer_weights
from llamatron.transforms.fp8_swiglu import FP8SwiGLU


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


@torch.library.custom_op("llamatron::accumulate_expert_wgrad", mutates_args=("main_grad",))
def accumulate_expert_wgrad(main_grad: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """main_grad [E, k, n] += x^T grad_out, expert by expert, in fp32 inside the GEMM where the device has
    the kernel; an opaque op that mutates its first argument, as `accumulate_wgrad`."""
    from llamatron.loss import accumulate_batched_weight_grad

    accumulate_batched_weight_grad(main_grad, x, grad_out)


@accumulate_expert_wgrad.register_fake
def _(main_grad, x, grad_out) -> None:
    return None


class _FusedWgradBmm(torch.autograd.Function):
    """x @ W per expert from W's compute-dtype copy; backward: the input gradient from the copy, the
    weight's accumulated into its fp32 buffer (none returned: `WgradBuffers.attach` makes it the `.grad`)."""

    @staticmethod
    def forward(ctx, x, weight, copy, main_grad):
        ctx.save_for_backward(x, copy, main_grad)
        return torch.bmm(x, copy)

    @staticmethod
    def backward(ctx, grad):
        x, copy, main_grad = ctx.saved_tensors
        grad = grad.contiguous()  # torch's batched GEMMs refuse some zero-stride gradients
        accumulate_expert_wgrad(main_grad, x, grad)
        return torch.bmm(grad, copy.transpose(1, 2)), None, None, None


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
    expert parallelism passes this rank's shards instead; with `w1_grad`, `w2_grad` buffers the capacity
    path's weight gradients accumulate there inside the GEMM."""

    def forward(self, x, counts=None, w1=None, w2=None, grouped=None):
        fused = (w1 is None and w2 is None and x.dim() == 3 and "w1_grad" in self._buffers
                 and torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type))
        if not fused:
            return super().forward(x, counts, w1, w2, grouped)
        x = x.to(self.w1_copy.dtype)
        h = F.relu(_FusedWgradBmm.apply(x, self.w1, self.w1_copy, self.w1_grad))
        return _FusedWgradBmm.apply(h, self.w2, self.w2_copy, self.w2_grad)

    def compute_weights(self, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
        if w1 is self.w1 and w2 is self.w2 and dtype == self.w1_copy.dtype:
            return _CachedCast.apply(w1, self.w1_copy), _CachedCast.apply(w2, self.w2_copy)
        return super().compute_weights(w1, w2, dtype)


class WgradBuffers:
    """The fp32 weight-gradient buffers of a part's fused layers: zeroed before a step's first
    backward (`begin`), made the weights' `.grad` after its last (`attach`)."""

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = pairs  # (weight, its fp32 buffer)

    def begin(self) -> None:
        torch._foreach_zero_([buffer for _, buffer in self.pairs])

    def attach(self) -> None:
        for weight, buffer in self.pairs:
            if weight.grad is not None:  # also used other than through the fused GEMM (GLaM's router: F.linear)
                buffer.add_(weight.grad)
            weight.grad = buffer


def pays(*, cuda: bool, autocast: bool, world_size: int, accum: int, activation_checkpointing: bool, lora: bool,
         fp8: str, fp8_all_gather: bool = False) -> bool:
    """Whether a run is one where cast-once and the fused weight gradients were measured faster and cost no
    memory at the peak (`wanted`'s `pays`): one CUDA GPU under bf16 autocast, several micro-batches a step,
    no activation checkpointing (which would otherwise drop the blocks' bf16 copies), no LoRA, train.fp8
    none or tensorwise without FP8 all-gather. The trainer and the planner both ask it."""
    return (cuda and autocast and world_size == 1 and accum > 1 and not activation_checkpointing and not lora
            and fp8 in ("none", "tensorwise") and not fp8_all_gather)


def wanted(cast: bool | None, fuse: bool | None, pays: bool) -> tuple[bool, bool]:
    """(cast once, fuse the weight gradients) from `train.cast_weights_once` and
    `train.gradient_accumulation_fusion`: what they say, and where they are unset (None), `pays`: the
    trainer's (and the planner's) judgement that the run is one where both were measured faster and cost
    no memory at the peak (one CUDA GPU under bf16 autocast, several micro-batches a step, no activation
    checkpointing, which would otherwise not keep the blocks' bf16 copies, no LoRA, train.fp8 none or
    tensorwise; docs/performance.md). An explicit fusion implies cast-once."""
    cast = (pays or bool(fuse)) if cast is None else cast
    return cast, cast and (pays if fuse is None else fuse)


def cast_weights_once(parts: list[nn.Module], dtype: torch.dtype, fuse_wgrad: bool = False,
                      outer: bool = True) -> list[str]:
    """Make every trainable exact nn.Linear inside the parts' blocks a `CastOnceLinear` with its copy in
    `dtype`, from the current weights; `fuse_wgrad`: with an fp32 weight-gradient buffer each, driven
    by the part's `wgrad_buffers` (train_step). Exact GroupedExperts become `CastOnceExperts`, and
    tensorwise Float8Linears `CastOnceFloat8Linear` (their copies in E4M3), likewise. `outer`: the output
    layer's copies and the embedding's and output layer's gradient buffers too (transforms/outer_weights.py;
    their names go to each part's `outer_weights`). Returns the block modules' names converted."""
    done = []
    for part in parts:
        copies, grads = [], []  # (copy, weight): what `refresh` copies, found once; (weight, fp32 buffer)
        fp8 = []  # (E4M3 copy, scale, weight) of the tensorwise FP8 layers (transforms/fp8_weight_cast.py)
        own = set()  # the linears whose weights their parent casts itself (FP8SwiGLU's gate and up projections)
        for name, mod in part.layers.named_modules():
            if isinstance(mod, FP8SwiGLU):
                fp8 += mod.cast_once()
                own |= {id(mod.w1), id(mod.w3)}
                done += [f"layers.{name}.w1", f"layers.{name}.w3"]
            if id(mod) in own:
                continue
            if fp8_weight_cast.castable(mod):
                triple, grad = fp8_weight_cast.convert(mod, fuse_wgrad)
                fp8.append(triple)
                if grad is not None:
                    grads.append((mod.weight, grad))
                done.append(f"layers.{name}")
                continue
            if type(mod) is nn.Linear and mod.weight.requires_grad and mod.weight.dtype != dtype:
                mod.__class__ = CastOnceLinear
                weights = {"weight": ("weight_copy", "main_grad")}
            elif _casts_experts(mod, dtype):
                mod.__class__ = CastOnceExperts
                weights = {"w1": ("w1_copy", "w1_grad"), "w2": ("w2_copy", "w2_grad")}
            else:
                continue
            for w, (copy, grad) in weights.items():
                weight = getattr(mod, w)
                mod.register_buffer(copy, torch.empty_like(weight, dtype=dtype), persistent=False)
                copies.append((getattr(mod, copy), weight))
                if fuse_wgrad:
                    mod.register_buffer(grad, torch.zeros_like(weight), persistent=False)
                    grads.append((weight, getattr(mod, grad)))
            done.append(f"layers.{name}")
        part.cast_once_copies, part.cast_once_fp8 = copies, fp8
        if outer:
            grads += outer_weights.convert(part, dtype, fuse_wgrad)
        if grads:
            part.wgrad_buffers = WgradBuffers(grads)
    refresh(parts)
    return done


@torch.no_grad()
def refresh(parts: list[nn.Module]) -> None:
    """Copy the current weights into their compute-dtype copies (after loading, after each optimizer step)."""
    pairs = [pair for part in parts for pair in getattr(part, "cast_once_copies", ())]
    if pairs:
        torch._foreach_copy_([copy for copy, _ in pairs], [weight for _, weight in pairs])
    fp8_weight_cast.refresh([triple for part in parts for triple in getattr(part, "cast_once_fp8", ())])
    outer_weights.refresh(parts)


def _casts_experts(mod: nn.Module, dtype: torch.dtype) -> bool:
    """Exact GroupedExperts with trainable weights not in `dtype`, not in FP8 (its own bf16 copies)."""
    return (type(mod) is GroupedExperts and not mod.fp8_grouped_mm and mod.w1.requires_grad
            and mod.w1.dtype != dtype)
