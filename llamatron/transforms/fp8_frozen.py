"""FP8 for frozen linear layers (LoRA's base weights, `train.fp8 = tensorwise` with `lora.rank > 0`).

A frozen layer needs two GEMMs per step, the output and the input gradient; both run on FP8 tensor
cores here, and there is no weight-gradient GEMM. torchao's `Float8Linear` (what `train.fp8` uses for
trainable layers) would run all three (its autograd function computes the weight gradient whether or
not the weight needs one) and cast the weight to FP8 in every forward. A frozen weight never changes,
so its FP8 copies are made once, when the weights are loaded: the row-major one for the forward and its
transpose for the input gradient (`torch._scaled_mm` takes its second operand column-major), kept as
non-persistent buffers, so checkpoints, merging and the PEFT export still see the bf16 weight.

Numerics are torchao's tensorwise recipe: E4M3 input and weight, E5M2 output gradient, one dynamic
scale per tensor (the weight's computed once, as it would be at every forward). The adapters stay bf16
(their rank is below any FP8 GEMM's worth), and so does the output layer (its loss is fused).
"""

from __future__ import annotations

import torch
from torch import nn

from llamatron.errors import LlamatronError
from llamatron.fp8_gemm import fp8_mm, to_fp8


class _FrozenFP8Linear(torch.autograd.Function):
    """x W^T with E4M3 x and W; backward: dx = g W with E5M2 g. Saves only W's FP8 copy (no x)."""

    @staticmethod
    def forward(ctx, x, w8, w8_t, w_inv, out_dtype):
        x8, x_inv = to_fp8(x.reshape(-1, x.shape[-1]), torch.float8_e4m3fn)
        out = fp8_mm(x8, x_inv, w8.t(), w_inv, out_dtype)
        ctx.save_for_backward(w8_t, w_inv)
        ctx.x_dtype = x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        w8_t, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad.reshape(-1, grad.shape[-1]), torch.float8_e5m2)
        dx = fp8_mm(g8, g_inv, w8_t.t(), w_inv, grad.dtype)
        return dx.reshape(*grad.shape[:-1], dx.shape[-1]).to(ctx.x_dtype), None, None, None, None


class FP8FrozenWeight(nn.Module):
    """A frozen weight's FP8 copies and its inverse scale; called as `base(x, bias)` for x W^T + b."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w8, w_inv = to_fp8(weight.detach(), torch.float8_e4m3fn)
        self.register_buffer("w8", w8, persistent=False)  # [out, in] row-major: its .t() is the forward's B
        self.register_buffer("w8_t", w8.t().contiguous(), persistent=False)  # its .t() is the input gradient's B
        self.register_buffer("w_inv", w_inv, persistent=False)
        self.out_dtype = torch.bfloat16

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = _FrozenFP8Linear.apply(x, self.w8, self.w8_t, self.w_inv, self.out_dtype)
        return out if bias is None else out + bias.to(out.dtype)


class FP8FrozenLinear(nn.Linear):
    """A frozen nn.Linear without an adapter whose GEMMs run from its FP8 copy (`fp8_base`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8_base(x, self.bias)


def base_linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b of a (possibly) frozen layer: from its FP8 copy once `quantize_frozen_linears` made one."""
    base = mod._modules.get("fp8_base")
    return nn.functional.linear(x, mod.weight, mod.bias) if base is None else base(x, mod.bias)


def refresh(mod: nn.Linear) -> None:
    """Re-make a layer's FP8 copy after its weight changed (LoRA's merge and unmerge)."""
    if mod._modules.get("fp8_base") is not None:
        mod.fp8_base = FP8FrozenWeight(mod.weight)


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module, min_features: int) -> list[str]:
    """Give every frozen nn.Linear of `model` that FP8 GEMMs can take (both dimensions multiples of 16
    and at least `min_features`; not the output layer) its FP8 copies, from its current weight: call
    it after the weights are loaded. Returns the clean names of the layers converted."""
    from llamatron.parallel.parallelize import clean_name
    from llamatron.transforms.fp8 import fp8_module_filter

    keep = fp8_module_filter(min_features, include_output=False)
    done = []
    for name, mod in model.named_modules():
        name = clean_name(name)
        if not isinstance(mod, nn.Linear) or mod.weight.requires_grad or not keep(mod, name):
            continue
        if type(mod.weight.data) is not torch.Tensor:  # a DTensor shard
            raise LlamatronError(f"config key 'train.fp8': LoRA's FP8 base layers need whole weights on one "
                                 f"rank; {name} is sharded (no FSDP or tensor parallelism with LoRA and FP8)")
        mod.fp8_base = FP8FrozenWeight(mod.weight)
        if type(mod) is nn.Linear:
            mod.__class__ = FP8FrozenLinear
        done.append(name)
    return done


def check_lora_fp8(train, lora, frozen_dtype: torch.dtype | None) -> None:
    """LoRA with FP8 needs bf16 frozen weights (`lora.base_dtype`: bf16 autocast, no FSDP, no TP)."""
    if train.fp8 != "none" and lora.rank and frozen_dtype != torch.bfloat16:
        raise LlamatronError("config key 'train.fp8': LoRA's FP8 base layers need bf16 frozen weights: bf16 "
                             "autocast (train.precision = bf16, or auto on a GPU) without FSDP or tensor "
                             "parallelism (parallel.dp_shard, dp_replicate, cp and tp all 1), lora.base_dtype auto or bf16")
