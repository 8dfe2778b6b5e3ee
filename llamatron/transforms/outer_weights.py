"""The token embedding and the output layer under `train.cast_weights_once` (transforms/weight_cast.py
does the blocks' linears).

Outside the blocks sit the two largest weights of a Llama-shaped model, [vocab, dim] each (128,256 x 4,096
in fp32 at 8B: 2.1 GB apiece), and in every micro-batch autograd runs them as if they were small:
- the embedding's backward makes a dense fp32 gradient of the whole table (a 2.1 GB fill and a scatter of
  the micro-batch's rows: 2.2 ms a micro-batch on an H100), which autograd then adds into `.grad` (6.3 GB
  more), for the few thousand rows the micro-batch touched;
- the fused loss (llamatron/loss.py) casts the fp32 output weight to bf16 (3.2 GB), or to E4M3 and its
  transpose with FP8, and its backward scales the fp32 gradient (4.2 GB) before autograd adds it into
  `.grad`.
Here the output weight's copies are made once per step (`loss.keep_output_weight`: at the first
micro-batch after each refresh), and with gradient-accumulation fusion both gradients go into fp32
buffers that become the weights' `.grad` as the blocks' do (`WgradBuffers`): the embedding's backward
adds just its rows (`index_put_` with accumulate: sorted by row, so deterministic on CUDA too), the
loss adds its scaled gradient in one pass. A weight used elsewhere too (GPT's tied output layer reads
the embedding's table) still gets that use's gradient from autograd, and `WgradBuffers.attach` adds it.

Only modules outside `layers` with a trainable weight not in the compute dtype: exact `nn.Embedding`s with
their default options, and `nn.Linear`s without bias (the output projection; in FP8 torchao's `Float8Linear`,
whose weight the fused loss reads and casts to E4M3 itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamatron import loss


class _EmbeddingGradIntoBuffer(torch.autograd.Function):
    """The rows of `weight`; backward: their gradients added into `main_grad` at those rows, no weight
    gradient returned."""

    @staticmethod
    def forward(ctx, tokens, weight, main_grad):
        ctx.save_for_backward(tokens)
        ctx.main_grad = main_grad
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).to(ctx.main_grad.dtype)
        ctx.main_grad.index_put_((tokens.reshape(-1),), rows, accumulate=True)
        return None, None, None


class BufferedGradEmbedding(nn.Embedding):
    """An nn.Embedding whose weight gradient, while it has a `main_grad` buffer and grad is on, goes
    straight into that buffer."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        main_grad = self._buffers.get("main_grad")
        if main_grad is not None and torch.is_grad_enabled() and self.weight.requires_grad:
            return _EmbeddingGradIntoBuffer.apply(tokens, self.weight, main_grad)
        return super().forward(tokens)


def _plain_embedding(mod: nn.Module) -> bool:
    return (type(mod) is nn.Embedding and mod.padding_idx is None and mod.max_norm is None
            and not mod.scale_grad_by_freq and not mod.sparse)


def convert(part: nn.Module, dtype: torch.dtype, fuse_wgrad: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Keep the output weights' copies of `part` (outside its `layers`) and, with `fuse_wgrad`, give them
    and the embeddings fp32 gradient buffers; the module names go to `part.outer_weights`. Returns the
    (weight, fp32 buffer) pairs."""
    names, grads, kept = [], [], []
    for name, mod in part.named_modules():
        if name == "layers" or name.startswith("layers."):
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad or weight.dtype == dtype:
            continue
        # torchao's Float8Linear is an nn.Linear too: the FP8 loss reads its weight.
        output, embedding = isinstance(mod, nn.Linear) and mod.bias is None, _plain_embedding(mod) and fuse_wgrad
        if not (output or embedding):
            continue
        buffer = torch.zeros_like(weight) if fuse_wgrad else None
        if output:
            kept.append(loss.keep_output_weight(weight, buffer))
        else:
            mod.__class__ = BufferedGradEmbedding
            mod.register_buffer("main_grad", buffer, persistent=False)
        names.append(name)
        if buffer is not None:
            grads.append((weight, buffer))
    part.outer_weights, part.kept_output_weights = names, kept
    return grads


def refresh(parts: list[nn.Module]) -> None:
    """The weights changed: the output weights' copies are made again when next needed."""
    for part in parts:
        for kept in getattr(part, "kept_output_weights", ()):
            kept.invalidate()
