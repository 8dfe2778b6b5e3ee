"""One optimizer step: forward and backward of each micro-batch (accumulating gradients), the global
gradient norm and clipping, then the update unless the guard says no."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch

from llamatron.parallel.layout import Layout, plain
from llamatron.parallel.reduce import clip_grad_norm_, sum_over
from llamatron.runtime import Precision, attention_backend
from llamatron.train.optim import clip_in_step, folds_clip, set_lr


def train_step(model, optimizer, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accum: int, *,
               lr: float, device, precision: Precision | None = None, fused_cross_entropy: bool = True,
               grad_clip: float = 0.0, attention: str = "auto",
               before_update: Callable[[torch.Tensor | None, torch.Tensor], bool] | None = None,
               token_counts: Sequence[int] | None = None):
    """One optimizer step over `accum` micro-batches. Returns (loss, grad norm) as device tensors,
    unread, so the step never waits for the GPU.

    before_update(loss, grad_norm), if given, runs once the gradients are reduced and their norm taken
    (the clip scales them then, or, with torch's fused AdamW, inside its step: `optim.folds_clip`);
    when it returns False the optimizer step is not taken and the gradients are dropped.

    model: a module or a `Layout`; optimizer: one optimizer or a list, one per part. The loss is
    this rank's (None on a pipeline stage without the loss); `global_mean_loss` reduces it.

    token_counts: the tokens with a label (not IGNORE_INDEX) in each of this rank's micro-batches
    (fine-tuning). The loss is then the sum over every valid token of the global batch divided by
    their number over all micro-batches and data-parallel ranks, not a mean of micro-batch means; a
    micro-batch may also be (tokens, labels, extras), extras passed to the model (positions,
    document ids). None: every micro-batch has the same number of valid tokens (pretraining).
    """
    layout = model if isinstance(model, Layout) else Layout.single(model)
    precision = precision or Precision(None, None)
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in optimizers:
        set_lr(opt, lr)
    for part in layout.parts:
        if hasattr(part, "set_loss_scale"):  # auxiliary losses (MoE routers): a mean over micro-batches too
            part.set_loss_scale(1.0 / accum)
    # Weight gradients accumulated in fp32 buffers inside the GEMMs (transforms/weight_cast.py)
    wgrad = [part.wgrad_buffers for part in layout.parts if hasattr(part, "wgrad_buffers")]
    for buffers in wgrad:
        buffers.begin()
    with attention_backend(attention):
        if layout.pipeline is not None:
            loss_sum = _pipeline_forward_backward(layout, micro_batches, device, precision)
        else:
            shares = None if token_counts is None else _token_shares(token_counts, layout, device)
            loss_sum = _forward_backward(layout, micro_batches, accum, device, precision,
                                         layout.fused_loss(fused_cross_entropy), shares)
    for buffers in wgrad:
        buffers.attach()
    fold = grad_clip > 0 and folds_clip(optimizers)
    grad_norm = clip_grad_norm_(layout.parameters(), 0.0 if fold else grad_clip, layout.dims,
                                duplicates=layout.tied_copies())
    if before_update is None or before_update(loss_sum, grad_norm):
        with clip_in_step(optimizers, grad_norm, grad_clip) if fold else nullcontext():
            for opt in optimizers:
                opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _token_shares(counts: Sequence[int], layout: Layout, device) -> list[float | None]:
    """Per micro-batch, the divisor that turns its mean loss into its share of the global token mean:
    global count / (its count x data-parallel ranks), since the gradient reduction averages over
    those ranks. With every micro-batch full this is exactly `accum`, as in pretraining. None: a
    micro-batch with no valid token (it contributes nothing)."""
    total = torch.tensor(float(sum(counts)), device=device)
    total = float(sum_over(total, layout.dims, "dp_cp").item())
    dp = layout.dims.dp * layout.dims.cp
    return [total / (c * dp) if c > 0 else None for c in counts]


def _forward_backward(layout: Layout, micro_batches, accum: int, device, precision: Precision, fused: bool,
                      shares: list[float | None] | None = None):
    loss_sum = torch.zeros((), device=device)
    for m, (tokens, labels, *extra) in enumerate(micro_batches):
        with layout.sequence_context(tokens, labels), layout.loss_context():
            with precision.autocast(device):
                loss = layout.loss(tokens, labels, fused, **(extra[0] if extra else {}))
            if shares is None:
                # Every micro-batch has the same token count, so the mean of micro-batch means is the
                # global-batch token mean.
                loss = loss / accum
            else:
                loss = loss / shares[m] if shares[m] is not None else loss * 0.0
            loss.backward()
        loss_sum += plain(loss.detach())
    return loss_sum


def _pipeline_forward_backward(layout: Layout, micro_batches, device, precision: Precision):
    # The schedule splits the concatenated micro-batches back into `accum` of them, in order.
    batches = list(micro_batches)
    tokens = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    with layout.sequence_context(tokens, labels), layout.loss_context(), precision.autocast(device):
        return layout.pipeline.train_step(tokens, labels)
