"""Cross-entropy over the 128K-token vocabulary without materialising the full fp32 logits.

At 8192 tokens the logits of Llama 3.1 are 8192 x 128256: 2.1 GB in bf16 and 4.2 GB again when
upcast for a numerically safe softmax, plus as much for their gradient. Here the output projection and
the loss are computed together in chunks of rows; since the loss is a scalar, the gradients with
respect to the hidden states and the output weight can be computed in the same pass (softmax minus
one-hot, times the chunk's inputs), so backward only rescales them. Same three GEMMs as the plain path,
no recomputation, the logits kept in the compute dtype (bf16) and only one chunk of them alive.
"""

from __future__ import annotations

import torch


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a chunk and d(sum)/d(logits) = softmax - one_hot, in logits' dtype.

    The statistics are fp32 whatever the logits' dtype. On CUDA this runs compiled: one reduction and
    one element-wise kernel over the chunk instead of a handful of eager passes over gigabytes.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, labels[:, None]).squeeze(1)).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    grad = (torch.exp(x - lse[:, None]) - one_hot.to(x.dtype)).to(logits.dtype)
    return loss, grad


def _loss_and_grad_inplace(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, eagerly, overwriting the fp32 logits with their gradient: no temporaries the size
    of the chunk, which on a CPU cost more in page faults than the arithmetic."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, labels[:, None]).squeeze(1)).sum()
    x.sub_(lse[:, None]).exp_()
    x[torch.arange(x.shape[0], device=x.device), labels] -= 1.0
    return loss, x.to(logits.dtype)


_compiled_loss_and_grad = None


def _loss_and_grad_fn(device: torch.device):
    global _compiled_loss_and_grad
    if device.type != "cuda":
        return _loss_and_grad_inplace
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_loss_and_grad, dynamic=False)
    return _compiled_loss_and_grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size):
        n = h.shape[0]
        loss_and_grad = _loss_and_grad_fn(h.device)
        grad_h = torch.empty_like(h)
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk_size):
            hc = h[start : start + chunk_size]
            loss, dlogits = loss_and_grad(hc @ weight.t(), labels[start : start + chunk_size])
            total += loss
            grad_h[start : start + chunk_size] = dlogits @ weight
            if grad_w is None:  # one chunk (the usual case on GPU): no fp32 accumulator needed
                grad_w = dlogits.t() @ hc
            elif grad_w.dtype == dlogits.dtype == torch.float32:
                grad_w.addmm_(dlogits.t(), hc)
            else:
                grad_w = grad_w.float().add_(dlogits.t() @ hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """mean_i CE(h_i @ weight.T, labels_i) for h [..., dim], weight [vocab, dim], labels [...].

    chunk_size rows at a time; by default 8192 on GPU (one chunk per 8K-token sequence) and, on CPU,
    chunks of fp32 logits of about 16 MB, which the allocator recycles instead of mapping fresh pages.
    """
    if chunk_size is None:
        chunk_size = 8192 if h.is_cuda else max(1, (16 << 20) // (4 * weight.shape[0]))
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h2, w = h2.to(dtype), weight.to(dtype)
    else:
        w = weight
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            return _FusedLinearCrossEntropy.apply(h2, w, lab, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h2.shape[0], chunk_size):
        logits = (h2[start : start + chunk_size] @ w.t()).float()
        total += torch.nn.functional.cross_entropy(logits, lab[start : start + chunk_size], reduction="sum")
    return total / h2.shape[0]
