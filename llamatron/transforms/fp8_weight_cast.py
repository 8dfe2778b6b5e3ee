"""Tensorwise FP8 weights cast once per optimizer step (`train.cast_weights_once` with `train.fp8 =
tensorwise`, one GPU).

torchao's `Float8Linear` casts its fp32 master weight to E4M3 inside every micro-batch: an amax pass and
a cast in the forward, and the cast again in the backward (the compiled graph keeps the scale, not the
FP8 copy): about 14 bytes of traffic per parameter and micro-batch, all giving the same values, since
the weights change only at the optimizer step. Here each tensorwise `Float8Linear` keeps its E4M3 copy
and scale in buffers, made by torchao's own scale and cast functions after the weights change
(`refresh`, which `weight_cast.refresh` calls), and hands torchao's FP8 matmul that copy as an already
cast weight. Forward and backward run the same GEMMs on the same FP8 values: only the casts go.

With `train.gradient_accumulation_fusion` the weight gradient (bf16, from the FP8 weight-gradient GEMM)
is added into an fp32 buffer in one pass per micro-batch, instead of cast to fp32 and added by autograd
in two; the buffers become the `.grad` after backward (`weight_cast.WgradBuffers`). torch's FP8 GEMM
has no accumulating output, so the add stays a pass of its own.

Not for the rowwise recipe (a scale per row, its own layouts) or FSDP's FP8 all-gather (which casts at
the gather). Memory: one byte per parameter for the copies. Measured on an H200 (2026-12-07): 0.25% slower
than the per-micro-batch casts at micro 8, so opt-in. The likely cost: torchao's matmul reads one FP8 weight
for both GEMMs, so the backward copies it into the input-gradient GEMM's layout, which the per-micro-batch
path did inside its cast; keeping that layout too at the refresh needs a matmul function of llamatron's own.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from llamatron.models.attention_ops import compiled_on_cuda


@torch.library.custom_op("llamatron::add_into", mutates_args=("main_grad",))
def add_into(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """main_grad += grad (fp32 += bf16 in one pass); an opaque op that mutates its first argument, so that
    a compiled backward calls it as it is (transforms/weight_cast.py's accumulate_wgrad, without the GEMM)."""
    main_grad.add_(grad)


@add_into.register_fake
def _(main_grad, grad) -> None:
    return None


@torch._dynamo.allow_in_graph
class _CachedFloat8Weight(torch.autograd.Function):
    """Forward: the weight's cached E4M3 copy as torchao's FP8 tensor, reporting `dtype` (the matmul
    input's, which the weight-gradient GEMM returns, so that autograd casts nothing on the way back);
    backward: the gradient to the fp32 weight, or added into its fp32 buffer (then none returned)."""

    @staticmethod
    def forward(ctx, weight, data, scale, dtype, mm_config, main_grad):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(main_grad)
        return Float8TrainingTensor(data, scale, dtype, linear_mm_config=mm_config,
                                    gemm_input_role=GemmInputRole.WEIGHT)

    @staticmethod
    def backward(ctx, grad):
        (main_grad,) = ctx.saved_tensors
        if main_grad is None:
            return grad.to(ctx.weight_dtype), None, None, None, None, None
        add_into(main_grad, grad)
        return None, None, None, None, None, None


@functools.cache
def cast_once_class() -> type:
    """`CastOnceFloat8Linear`, made on first use: torchao is imported only where FP8 runs."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    class CastOnceFloat8Linear(Float8Linear):
        """A tensorwise Float8Linear whose forward hands torchao's FP8 matmul its cached E4M3 weight
        (`weight_fp8`, `weight_scale`) and, with a `main_grad` buffer, adds its weight gradient there."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():  # Float8Linear's own rule: the GPU's autocast dtype
                x = x.to(torch.get_autocast_dtype("cuda"))
            main_grad = self._buffers.get("main_grad") if torch.is_grad_enabled() else None
            w8 = _CachedFloat8Weight.apply(self.weight, self.weight_fp8, self.weight_scale, x.dtype,
                                           self.linear_mm_config, main_grad)
            out = matmul_with_hp_or_float8_args.apply(x, w8.t(), self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return CastOnceFloat8Linear


def castable(mod: nn.Module) -> bool:
    """A trainable `Float8Linear` (torchao) with dynamic tensorwise weight scaling, scales not rounded to
    powers of two (llamatron's tensorwise config) and a plain weight (not FSDP's FP8 all-gather wrapper)."""
    if "torchao.float8" not in sys.modules:  # no FP8 layer without torchao imported: none to import here
        return False
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_linear import Float8Linear

    if type(mod) is not Float8Linear or not mod.weight.requires_grad:
        return False
    casts = (mod.config.cast_config_weight, mod.config.cast_config_weight_for_grad_input)
    return (all(c.scaling_granularity is ScalingGranularity.TENSORWISE and c.scaling_type is ScalingType.DYNAMIC
                for c in casts)
            and not mod.config.round_scales_to_power_of_2 and not mod.config.enable_fsdp_float8_all_gather
            and type(mod.weight.data) is torch.Tensor)


def convert(mod: nn.Module, fuse_wgrad: bool) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Make `mod` (`castable`) a CastOnceFloat8Linear; returns ((copy, scale, weight): what `refresh`
    casts into, not yet made; its fp32 gradient buffer or None)."""
    mod.__class__ = cast_once_class()
    fp8 = mod.config.cast_config_weight.target_dtype
    mod.register_buffer("weight_fp8", torch.empty_like(mod.weight, dtype=fp8), persistent=False)
    mod.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=mod.weight.device),
                        persistent=False)
    if fuse_wgrad:
        mod.register_buffer("main_grad", torch.zeros_like(mod.weight), persistent=False)
    return (mod.weight_fp8, mod.weight_scale, mod.weight), mod._buffers.get("main_grad")


def _cast_all(copies: list[torch.Tensor], scales: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Each weight's tensorwise scale and E4M3 (or E5M2) copy by torchao's functions, the arithmetic of
    its in-graph cast (`_ToFloat8ConstrFunc`: upcast, scale, saturate), written into the buffers."""
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    for copy, scale, weight in zip(copies, scales, weights):
        s = tensor_to_scale(weight, copy.dtype)
        scale.copy_(s)
        copy.copy_(to_fp8_saturated(weight.to(torch.float32) * s, copy.dtype))


@torch.no_grad()
def refresh(triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Cast the current weights into their FP8 copies: one compiled function over all of them on CUDA
    (an amax pass and a cast pass per weight, ~9 bytes a parameter; eager's abs, max, scale, clamp and
    convert would be ~33), eager elsewhere."""
    if not triples:
        return
    copies, scales, weights = (list(t) for t in zip(*triples))
    compiled_on_cuda(_cast_all, weights[0].device)(copies, scales, weights)
