"""FP8 training: swap the model's large `nn.Linear` layers for torchao's `Float8Linear`.

The three GEMMs of each swapped layer (output, input gradient, weight gradient) run on FP8 tensor
cores with E4M3 operands, with scales computed from the current tensors ("dynamic" scaling): one scale
per tensor (`tensorwise`, the fastest) or one per row (`rowwise`, more robust to outliers, a little
slower). Master weights, gradients and optimizer state keep their dtypes; only the GEMM operands are
cast. Applied to the meta-device model before tensor parallel, compile and FSDP (llamatron.parallel.parallelize).

What stays in BF16, and why:
- the output layer (`output`) where its loss is not fused (tensor or pipeline parallelism), with the
  rowwise recipe, and when `fp8_include_output = false`: its logits feed a softmax over 128K classes.
  By default (`fp8_output`) tensorwise FP8 runs its three GEMMs in FP8 inside the fused cross-entropy
  (`llamatron.loss`), which `apply_fp8` reports by naming "output" among the converted layers: the
  fastest configuration measured, and it converged within 0.6% of BF16 (docs/performance.md); an
  explicit `fp8_include_output = true` without the fused loss makes it a Float8Linear;
- layers with a dimension below `fp8_min_features`: the cast and scale kernels cost more than the
  smaller GEMM saves (users report FP8 slower than BF16 on small models for this reason);
- layers whose dimensions are not multiples of 16, which FP8 GEMMs cannot take.

A mixture of experts' grouped GEMMs (a module with `fp8_grouped_mm`, e.g. GLaM's experts) are turned
to FP8 by the same width rule (`apply_fp8_experts`, on unless `experts=False`): torchao's only FP8
grouped recipe is rowwise, so they run it whichever recipe the linears use (models/glam/experts.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llamatron.config import FP8_GEMMS, FP8_RECIPES
from llamatron.errors import LlamatronError
from llamatron.fp8_gemm import FastAccum


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """Why FP8 training cannot run on `device` here, or None if it can."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "the torchao package is not installed (pip install torchao; its release must match torch's)"
    if device.type == "cpu":
        return None  # torch emulates the FP8 GEMMs on the CPU: same numerics, for tests only
    if device.type != "cuda":
        return f"FP8 GEMMs need an NVIDIA GPU of compute capability 8.9 or newer (H100, H200, B200, L40S), or the CPU; this run's device is {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"FP8 GEMMs need compute capability 8.9 or newer; {name} has {cap[0]}.{cap[1]}"
    return None


def check_fp8(recipe: str, device: torch.device) -> None:
    if recipe == "none":
        return
    reason = fp8_unavailable_reason(device)
    if reason:
        raise LlamatronError(f"config key 'train.fp8': {recipe} FP8 training asked for, but {reason}")


def fp8_output(train, tp: int, pp: int, lora: bool) -> bool:
    """Whether the output layer runs in FP8: `train.fp8_include_output`, or when it is unset (None),
    for tensorwise FP8 where the loss is fused (no tp or pp), the output layer trains (no LoRA) and
    FSDP gathers bf16 weights (no `fp8_all_gather`)."""
    if train.fp8 == "none" or lora:
        return False
    if train.fp8_include_output is not None:
        return train.fp8_include_output
    # Not with FP8 all-gather: FSDP would hand the fused loss the output weight as torchao's FP8 tensor.
    return train.fp8 == "tensorwise" and train.fused_cross_entropy and tp == 1 and pp == 1 and not train.fp8_all_gather


def fp8_module_filter(min_features: int, include_output: bool, skip: frozenset[str] = frozenset()):
    """The filter torchao calls with (module, fully qualified name): True converts the layer. `skip`:
    layers already in FP8 another way (`FP8SwiGLU`'s projections)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn in skip:
            return False
        if fqn == "output" and not include_output:
            return False
        dims = (module.in_features, module.out_features)
        return all(d % 16 == 0 and d >= min_features for d in dims)

    return keep


def apply_fp8_experts(model: nn.Module, min_features: int = 1024, load_kernels: bool = True) -> list[str]:
    """Turn on the FP8 grouped GEMMs of every module that offers them (`fp8_grouped_mm`) and whose
    feature dimensions are multiples of 16 and at least `min_features`; returns their names.
    `load_kernels=False`: only count them (the memory and step-time estimates), importing nothing."""
    names = []
    for name, m in model.named_modules():
        if hasattr(m, "fp8_grouped_mm") and all(d % 16 == 0 and d >= min_features for d in m.gemm_features):
            m.fp8_grouped_mm = True
            names.append(name)
    if names and load_kernels and torch.cuda.is_available():
        # Imported now, not first inside a compiled block; a torchao without it is a config error.
        try:
            import torchao.prototype.moe_training  # noqa: F401
        except ImportError as e:
            raise LlamatronError(f"config key 'train.fp8_experts': FP8 experts need torchao's "
                                 f"prototype.moe_training (torchao 0.17 or newer): {e}; or set it to false") from e
    return names


def check_fp8_experts(train, args, device: torch.device) -> None:
    """torchao's FP8 grouped GEMM (`torch._scaled_grouped_mm`) runs on compute capability 9.0 and newer
    (H100, H200, B200), not on the 8.9 GPUs FP8 linears run on; the CPU runs an emulation."""
    if train.fp8 == "none" or not train.fp8_experts or device.type != "cuda":
        return
    from llamatron.parallel.memory import fp8_counts

    if not fp8_counts(args, train.fp8_min_features).expert_names:
        return  # no expert passes the width rule (or no experts): nothing to check
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        raise LlamatronError(f"config key 'train.fp8_experts': FP8 experts need compute capability 9.0 or newer; "
                             f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]} (set it to false to keep "
                             "them in BF16)")


def apply_fp8(model: nn.Module, recipe: str, *, min_features: int = 1024, include_output: bool = False,
              fsdp_all_gather: bool = False, experts: bool = True, fused_swiglu: bool = False,
              fast_accum: FastAccum = FastAccum()) -> list[str]:
    """Convert `model`'s eligible linear layers in place (and, with `experts`, its grouped experts:
    `apply_fp8_experts`); returns the names of those converted.

    fused_swiglu (tensorwise, without fsdp_all_gather): the SwiGLU feed-forwards' gate and up
    projections as `FP8SwiGLU` (transforms/fp8_swiglu.py), whose backward makes their E5M2 gradients in
    kernels of its own; their down projections stay torchao's.

    fast_accum: which GEMMs of the converted layers sum without fp32 promotion (train.fp8_fast_accum).

    fsdp_all_gather (tensorwise only): FSDP2 gathers the weights already cast to FP8, halving the
    all-gather traffic against BF16; needs `precompute_fp8_scales` after each optimizer step.
    """
    if recipe == "none":
        return []
    if recipe not in FP8_RECIPES:
        raise LlamatronError(f"config key 'train.fp8': must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise LlamatronError(f"config key 'train.fp8': {recipe} asked for, but torchao is not importable ({e})") from e
    if recipe != "tensorwise" and fsdp_all_gather:
        raise LlamatronError("config key 'train.fp8_all_gather': FP8 all-gather works with the tensorwise recipe only")
    config = torchao_config(recipe, fast_accum, fsdp_all_gather)
    fused = []
    if fused_swiglu and recipe == "tensorwise" and not fsdp_all_gather:
        from llamatron.transforms.fp8_swiglu import apply_fp8_swiglu

        fused = apply_fp8_swiglu(model, min_features, fast_accum)
    keep = fp8_module_filter(min_features, include_output, frozenset(fused))
    converted = [name for name, m in model.named_modules() if keep(m, name)]
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return converted + fused + (apply_fp8_experts(model, min_features) if experts else [])


def torchao_config(recipe: str, fast_accum: FastAccum, fsdp_all_gather: bool = False):
    """torchao's `Float8LinearConfig` of `recipe`, its three GEMMs accumulating as `fast_accum` says."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import Float8GemmConfig

    config = (Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_all_gather) if recipe == "tensorwise"
              else Float8LinearConfig.from_recipe_name(recipe))
    return dataclasses.replace(config, **{f"gemm_config_{gemm}": Float8GemmConfig(use_fast_accum=getattr(fast_accum, gemm))
                                          for gemm in FP8_GEMMS})


def precompute_fp8_scales(model: nn.Module) -> None:
    """With FP8 all-gather: compute every sharded weight's scale in one fused pass after the optimizer
    step, instead of one small all-reduce per layer inside the next forward."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
