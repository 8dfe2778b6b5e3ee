"""FP8 for frozen linear layers (LoRA's base weights, `train.fp8 = tensorwise` with `lora.rank > 0`).

A frozen layer needs two GEMMs per step, the output and the input gradient; both run on FP8 tensor
cores here, and there is no weight-gradient GEMM. torchao's `Float8Linear` (what `train.fp8` uses for
trainable layers) would run all three (its autograd function computes the weight gradient whether or
not the weight needs one) and cast the weight to FP8 in every forward. A frozen weight never changes,
so its FP8 copies are made once, when the weights are loaded: the row-major one for the forward and its
transpose for the input gradient (`torch._scaled_mm` takes its second operand column-major), kept as
non-persistent buffers, so checkpoints, merging and the PEFT export still see the bf16 weight. Under
FSDP the weight exists whole only while gathered (bf16, per block): there it is cast at each use.

Numerics are torchao's tensorwise recipe: E4M3 input and weight, E5M2 output gradient, one dynamic
scale per tensor (the weight's computed once, as it would be at every forward). The adapters stay bf16
(their rank is below any FP8 GEMM's worth), and so does the output layer (its loss is fused).
"""

from __future__ import annotations

import torch
from torch import nn

from llamatron.errors import LlamatronError
from llamatron.fp8_gemm import fp8_mm, to_fp8, to_fp8_rowwise


def _output(x: torch.Tensor, w8: torch.Tensor, w_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x W^T with x cast to E4M3 (tensorwise) and W's E4M3 copy [out, in]."""
    x8, x_inv = to_fp8(x.reshape(-1, x.shape[-1]), torch.float8_e4m3fn)
    out = fp8_mm(x8, x_inv, w8.t(), w_inv, out_dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _input_grad(grad: torch.Tensor, w8_t: torch.Tensor, w_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dx = g W with g cast to E5M2 and W's E4M3 transpose [in, out] (row-major)."""
    g8, g_inv = to_fp8(grad.reshape(-1, grad.shape[-1]), torch.float8_e5m2)
    dx = fp8_mm(g8, g_inv, w8_t.t(), w_inv, grad.dtype)
    return dx.reshape(*grad.shape[:-1], dx.shape[-1]).to(dtype)


class _FrozenFP8Linear(torch.autograd.Function):
    """x W^T from W's FP8 copies; backward: the input gradient only. Saves only those copies (no x)."""

    @staticmethod
    def forward(ctx, x, w8, w8_t, w_inv, out_dtype):
        ctx.save_for_backward(w8_t, w_inv)
        ctx.x_dtype = x.dtype
        return _output(x, w8, w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        w8_t, w_inv = ctx.saved_tensors
        return _input_grad(grad, w8_t, w_inv, ctx.x_dtype), None, None, None, None


class _GatheredFrozenFP8Linear(torch.autograd.Function):
    """The same GEMMs from a weight cast at each use: under FSDP the frozen weight is gathered (bf16)
    per block, so no copy can be kept. Saves the weight itself (FSDP frees and re-gathers it around
    backward, as for any linear), not its FP8 casts."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        w8, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        return _output(x, w8, w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        w8, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        return _input_grad(grad, w8.t().contiguous(), w_inv, ctx.x_dtype), None, None


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
        if torch.is_grad_enabled():
            out = _FrozenFP8Linear.apply(x, self.w8, self.w8_t, self.w_inv, self.out_dtype)
        else:  # scoring: the forward GEMM alone, nothing saved
            out = _output(x, self.w8, self.w_inv, self.out_dtype)
        return out if bias is None else out + bias.to(out.dtype)


class FP8RowwiseScoringWeight(nn.Module):
    """A scoring-only FP8 copy of a weight, one scale per output row, for inputs cast with one scale per
    token (torchao's rowwise recipe): the forward GEMM only, so no transposed copy is kept. Rowwise,
    each token's scale is a reduction along its own row, which compile fuses into the kernel making
    the input: the tensorwise amax over a whole [tokens, 14336] SwiGLU output was 16% of the 8B's FP8
    scoring time (H100, 2026-12-06). Per-row scales also round closer to bf16 than one per tensor."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w8, w_inv = to_fp8_rowwise(weight.detach())
        self.register_buffer("w8", w8, persistent=False)  # [out, in] row-major: its .t() is the GEMM's B
        self.register_buffer("w_inv", w_inv.t().contiguous(), persistent=False)  # [1, out]
        self.out_dtype = torch.bfloat16

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x8, x_inv = to_fp8_rowwise(x.reshape(-1, x.shape[-1]))
        out = fp8_mm(x8, x_inv, self.w8.t(), self.w_inv, self.out_dtype).reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias.to(out.dtype)


class FP8FrozenLinear(nn.Linear):
    """A frozen nn.Linear without an adapter whose GEMMs run in FP8 (`base_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(self, x)


def base_linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b of a (possibly) frozen layer: from its FP8 copy once `quantize_frozen_linears` made one,
    or in FP8 from the weight at each use where `gather_frozen_linears` marked it (FSDP)."""
    base = mod._modules.get("fp8_base")
    if base is not None:
        return base(x, mod.bias)
    if getattr(mod, "fp8_gathered", False):
        out = _GatheredFrozenFP8Linear.apply(x, mod.weight, torch.bfloat16)
        return out if mod.bias is None else out + mod.bias.to(out.dtype)
    return nn.functional.linear(x, mod.weight, mod.bias)


def refresh(mod: nn.Linear) -> None:
    """Re-make a layer's FP8 copy after its weight changed (LoRA's merge and unmerge)."""
    if mod._modules.get("fp8_base") is not None:
        mod.fp8_base = FP8FrozenWeight(mod.weight)


def _eligible_frozen(model: nn.Module, min_features: int):
    """(clean name, module) of every frozen nn.Linear of `model` that FP8 GEMMs can take (both
    dimensions multiples of 16 and at least `min_features`; not the output layer)."""
    from llamatron.parallel.parallelize import clean_name
    from llamatron.transforms.fp8 import fp8_module_filter

    keep = fp8_module_filter(min_features, include_output=False)
    for name, mod in model.named_modules():
        name = clean_name(name)
        if isinstance(mod, nn.Linear) and not mod.weight.requires_grad and keep(mod, name):
            yield name, mod


def gather_frozen_linears(model: nn.Module, min_features: int) -> list[str]:
    """Under FSDP: mark the eligible frozen linears to run their GEMMs in FP8 from the gathered weight,
    cast at each use. Applied before FSDP wraps the model. Returns the names marked."""
    done = []
    for name, mod in _eligible_frozen(model, min_features):
        mod.fp8_gathered = True
        if type(mod) is nn.Linear:
            mod.__class__ = FP8FrozenLinear
        done.append(name)
    return done


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module, min_features: int, copy=FP8FrozenWeight) -> list[str]:
    """Give every frozen nn.Linear of `model` that FP8 GEMMs can take (both dimensions multiples of 16
    and at least `min_features`; not the output layer) its FP8 copies (`copy`, made from its current
    weight): call it after the weights are loaded. Returns the clean names of the layers converted."""
    done = []
    for name, mod in _eligible_frozen(model, min_features):
        if type(mod.weight.data) is not torch.Tensor:  # a DTensor shard
            raise LlamatronError(f"config key 'train.fp8': LoRA's FP8 base layers need whole weights on one "
                                 f"rank; {name} is sharded (no FSDP or tensor parallelism with LoRA and FP8)")
        mod.fp8_base = copy(mod.weight)
        if type(mod) is nn.Linear:
            mod.__class__ = FP8FrozenLinear
        done.append(name)
    return done


SCORING_RECIPES = ("rowwise", "tensorwise")


@torch.no_grad()
def quantize_for_scoring(model: nn.Module, min_features: int = 1024, recipe: str = "rowwise") -> list[str]:
    """Evaluation in FP8 (`llamatron evaluate --fp8`): every weight is frozen for scoring, so each
    eligible block linear gets an FP8 copy once and scores from it (the output layer stays bf16, as
    in training's recipes without it). `recipe`: rowwise (a scale per token and per output row, the
    default: faster and closer) or tensorwise (one scale per tensor: LoRA's frozen layers' copies).
    Blocks compiled before are returned to eager (the next scoring compiles them with their FP8
    layers). Returns the names converted."""
    from llamatron.transforms.compile import drop_compiled

    if recipe not in SCORING_RECIPES:
        raise LlamatronError(f"--fp8 {recipe!r}: expected one of {', '.join(SCORING_RECIPES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    drop_compiled(model)
    copy = FP8FrozenWeight if recipe == "tensorwise" else FP8RowwiseScoringWeight
    return quantize_frozen_linears(model, min_features, copy)


def fp8_frozen_linears(parts: list[nn.Module], cfg, fsdp: bool) -> int:
    """LoRA under train.fp8, once the weights are loaded: without FSDP the FP8 copies are made now;
    under FSDP `parallelize` marked the layers already. Returns how many frozen linears run in FP8."""
    if not cfg.lora.rank or cfg.train.fp8 == "none":
        return 0
    if fsdp:
        return sum(getattr(m, "fp8_gathered", False) for part in parts for m in part.modules())
    return sum(len(quantize_frozen_linears(part, cfg.train.fp8_min_features)) for part in parts)


def check_lora_fp8(train, lora, frozen_dtype: torch.dtype | None, fsdp_dtype: torch.dtype | None = None) -> None:
    """LoRA with FP8 needs bf16 compute: bf16 frozen weights (`lora.base_dtype`, one GPU: FP8 copies
    made once) or FSDP gathering bf16 (`fsdp_dtype`: cast at each use). Tensor parallelism is refused
    at config time."""
    if train.fp8 == "none" or not lora.rank or frozen_dtype == torch.bfloat16 or fsdp_dtype == torch.bfloat16:
        return
    raise LlamatronError("config key 'train.fp8': LoRA's FP8 base layers need bf16 compute (train.precision = "
                         "bf16, or auto on a GPU) and, without FSDP, lora.base_dtype auto or bf16")
