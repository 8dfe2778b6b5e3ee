"""The residual stream in the autocast dtype (`train.bf16_residual`), as Megatron keeps it by default.

Under bf16 autocast over fp32 weights (one GPU, no FSDP) the embedding's output is fp32, and so is
every block's residual sum after it: `x + attention(...)` adds a bf16 product to an fp32 stream. The
residual then costs 4 bytes a value in every kernel that reads or writes it (the residual adds, the
norms forward and backward, their gradients) and in what backward keeps. Megatron keeps the stream in
bf16 unless `--fp32-residual-connection`; FSDP's bf16 gather here does too (its embedding is bf16). This
casts the embeddings' and the blocks' outputs to the autocast dtype, so the blocks receive and add in
bf16; the norms still take their statistics in fp32. Without autocast (fp32 runs, FSDP's mixed
precision) it does nothing: the outputs are already in the compute dtype. Measured on an H100: -1.2% a
step in BF16, -2.5% in FP8; over 2,000 steps on real tokens the losses ended 0.2-0.4% below the fp32
stream's (docs/performance.md), so it is on by default (`train.bf16_residual = false` turns it off).
"""

from __future__ import annotations

import torch
from torch import nn


def _to_autocast_dtype(module: nn.Module, args, output):
    # Only the stream ([batch, seq, dim]): GLaM's tied embedding also unembeds, returning the loss (0-d).
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() >= 2:
        device = output.device.type
        if torch.is_autocast_enabled(device):
            return output.to(torch.get_autocast_dtype(device))
    return output


def apply_bf16_residual(model: nn.Module) -> list[str]:
    """Cast the outputs of the modules that start `model`'s residual stream (its `first_stage`: the token
    embedding, and GPT's with its position embedding) and of every block to the autocast dtype; returns
    the names of the modules hooked. A block whose sum comes out in fp32 (GLaM's MoE blocks: the router's
    fp32 weights scale the experts' outputs) would hand fp32 on to the rest; in the others the cast is
    the identity. Under train.compile dynamo compiles a block's hook as a small graph of its own, after
    the block's (a separate cast kernel only where the block's sum is fp32: GLaM's MoE blocks)."""
    names = [n for n in getattr(type(model), "first_stage", ()) if isinstance(getattr(model, n, None), nn.Module)]
    names += [f"layers.{i}" for i in getattr(model, "layers", {})]
    for name in names:
        model.get_submodule(name).register_forward_hook(_to_autocast_dtype)
    return names
