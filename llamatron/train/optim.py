"""AdamW with Megatron's weight-decay rule, and NeMo's warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from llamatron.config import OptimConfig
from llamatron.errors import LlamatronError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases or any 1-D tensor (norm weights), as Megatron's optimizer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # An empty group (LoRA: every adapter is 2-D) breaks torch's name-keyed optimizer state dict.
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """`optim.name`: torch's AdamW, or torchao's AdamW8bit (the same update, with each moment of a
    tensor of 4096 values or more stored as 8-bit codes and one fp32 scale per block of 256)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise LlamatronError(f"config key 'optim.name': adamw8bit needs torchao ({e}); "
                                 "pip install 'llamatron[fp8]'") from e
        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def folds_clip(optimizers) -> bool:
    """Whether the clip's scaling can run inside the optimizers' own kernels: torch's fused Adam and
    AdamW divide every gradient by their `grad_scale` as they read it (GradScaler's unscaling; they
    write the divided gradient back as they go), so the clip needs no pass of its own over the fp32
    gradients: -11.6 ms a step for the 8-layer 8B proxy on an H100 (docs/performance.md). With DTensor
    gradients (FSDP, TP) the scale, a plain 0-d tensor, is taken as replicated on every rank."""
    return all(type(opt) in (torch.optim.Adam, torch.optim.AdamW) and all(g.get("fused") for g in opt.param_groups)
               for opt in optimizers)


@contextmanager
def clip_in_step(optimizers, total_norm: torch.Tensor, max_norm: float):
    """The optimizers' steps taken inside divide each gradient by max(1, (total_norm + 1e-6) / max_norm):
    the factor torch's clip_grad_norm_ multiplies by, inverted (not bit-equal where it clips: one
    rounding of a division instead of a multiplication; equal where it does not, the factor being 1)."""
    scale = torch.clamp((total_norm.float() + 1e-6) / max_norm, min=1.0)
    for opt in optimizers:
        opt.grad_scale = scale
    try:
        yield
    finally:
        for opt in optimizers:
            del opt.grad_scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """torchao's optimizers hold the learning rate as a tensor (a new float would recompile their
    step): it is filled in place; torch's take the float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for the optimizer step that follows `step` completed steps.

    NeMo WarmupAnnealHoldPolicy + CosineAnnealing: with W warmup and M schedule steps,
      s <= W (W > 0): peak * (s + 1) / (W + 1)
      s > M:          min_lr
      otherwise:      min_lr + (peak - min_lr) * (1 + cos(pi * (s - W) / (M - W))) / 2
    """
    w = cfg.warmup_steps
    m = cfg.schedule_steps if cfg.schedule_steps is not None else total_steps
    if w > 0 and step <= w:
        return cfg.lr * (step + 1) / (w + 1)
    if step > m or m <= w:
        return cfg.min_lr
    progress = (step - w) / (m - w)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
