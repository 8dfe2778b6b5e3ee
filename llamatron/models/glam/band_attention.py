"""GLaM's biased attention as the causal kernel without any bias plus a correction over the band.

T5's relative bias is one value per head for every distance from the band width W on (113 for 32
buckets up to distance 128): the last bucket's. A bias that is the same for every key of a row cancels
in the softmax, so only delta = bias - bias[last], zero beyond the band, matters. With s the scaled
scores and P the causal softmax of the unbiased scores (its log-sum-exp L),

    sum_k e^(s + delta) v = e^L (O + sum_band r v),   sum_k e^(s + delta) = e^L z,
    r = P (e^delta - 1) over the band,   z = 1 + sum_band r,

so the output is (O + sum_band r v) / z and its log-sum-exp L + log z: the causal kernel (cuDNN's on
CUDA, the fastest there is) and a correction over the band's W keys per query, about 4 W / S of the
attention's products (`Windows`, as the bias table's gradient in attention.py).

Backward: the causal kernel's backward, given the biased attention's output and log-sum-exp, computes
P' = e^(s - L - log z) (the true P without e^delta), D = rowsum(dO O) and from them dq, dk, dv: right
for every pair beyond the band, where delta is 0 (torch's ring attention calls these kernels with a
merged output and log-sum-exp the same way). Over the band the true P is P' e^delta, so the
correction adds dP = P' (e^delta - 1) times dO to dv, and dS = dP (dO V^T - D) through q and k; the
bias table's gradient is the band's true dS summed by bucket.

`LLAMATRON_GLAM_ATTENTION=cudnn_band` makes GLaM's training blocks use it on CUDA (default `flex`,
until bench/bench_glam_attention.py has measured both); on the CPU the causal kernel is torch's
flash attention for CPU, which the tests use.
"""

from __future__ import annotations

import math

import torch

from llamatron.models.glam.attention import Windows, band_products

aten = torch.ops.aten


def band_corrected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                             dist_bucket: torch.Tensor, band: int) -> torch.Tensor:
    """Causal attention of q, k, v [B, H, S, D] with bias table [buckets, H] at each distance's bucket
    (dist_bucket [>= S]; distances from `band` on all in the last bucket): `sdpa_attention`'s numbers."""
    return _BandCorrected.apply(q, k, v, table, dist_bucket, band)


def _causal(q, k, v):
    """The unbiased causal kernel: (output, log-sum-exp as the kernel keeps it, the tensors and the sizes
    its backward needs besides: cuDNN's RNG state and sequence offsets, and its maximum lengths)."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False)
        return out, lse, (seed, offset, cum_q, cum_k), (max_q, max_k)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse, (), ()


def _causal_backward(grad, q, k, v, out, lse, tensors, sizes):
    if q.is_cuda:
        seed, offset, cum_q, cum_k = tensors
        return aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None,
                                                                 cum_q, cum_k, *sizes, 0.0, True)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True)


def _delta(w: Windows, table: torch.Tensor) -> torch.Tensor:
    """e^delta - 1 over the windows [H, n, T, 2T] (0 where not in the band)."""
    bias = w.bias(table)  # [H, 1, T, 2T]
    return torch.expm1(bias - table.detach().float()[-1].view(-1, 1, 1, 1)).masked_fill(~w.valid, 0.0)


class _BandCorrected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, dist_bucket, band: int):
        out_c, lse_c, kernel_tensors, kernel_sizes = _causal(q, k, v)
        w = Windows(q, dist_bucket, band)
        scale = 1.0 / math.sqrt(w.D)
        lse_b = w.blocks(lse_c.reshape(w.B, w.H, w.S).float())
        s = band_products(w.blocks(q), w.with_previous(k).transpose(-1, -2)) * scale
        r = torch.exp((s - lse_b).masked_fill(~w.valid, float("-inf"))) * _delta(w, table)
        z = 1.0 + r.sum(-1, keepdim=True)
        corrected = (w.blocks(out_c).float() + band_products(r.to(v.dtype), w.with_previous(v))) / z
        out = torch.empty_like(out_c).copy_(w.unblock(corrected))  # the causal kernel's layout, for its backward
        lse = (lse_b + torch.log(z)).reshape(w.B, w.H, -1)[:, :, : w.S].reshape(lse_c.shape).to(lse_c.dtype)
        # Every tensor through save_for_backward (torch.compile traces this function), sizes as attributes.
        ctx.save_for_backward(q, k, v, out, lse, table, dist_bucket, *kernel_tensors)
        ctx.band, ctx.kernel_sizes = band, kernel_sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, table, dist_bucket, *kernel_tensors = ctx.saved_tensors
        if grad.stride() != out.stride():  # the kernel's backward reads dO in its output's layout
            grad = torch.empty_like(out).copy_(grad)
        dq, dk, dv = _causal_backward(grad, q, k, v, out, lse, kernel_tensors, ctx.kernel_sizes)
        w = Windows(q, dist_bucket, ctx.band)
        scale = 1.0 / math.sqrt(w.D)
        qb, gb, kw, vw = w.blocks(q), w.blocks(grad), w.with_previous(k), w.with_previous(v)
        s = band_products(qb, kw.transpose(-1, -2)) * scale
        p0 = torch.exp((s - w.blocks(lse.reshape(w.B, w.H, w.S).float())).masked_fill(~w.valid, float("-inf")))
        dp = p0 * _delta(w, table)  # the true P minus what the causal kernel took
        dpd = band_products(gb, vw.transpose(-1, -2)) - (gb.float() * w.blocks(out).float()).sum(-1, keepdim=True)
        ds = dp * dpd
        dq = dq + w.unblock(band_products(ds.to(q.dtype), kw) * scale).to(dq.dtype)
        dk = dk + w.fold(band_products(ds.transpose(-1, -2).to(q.dtype), qb) * scale).to(dk.dtype)
        dv = dv + w.fold(band_products(dp.transpose(-1, -2).to(grad.dtype), gb)).to(dv.dtype)
        d_table = w.table_grad(((p0 + dp) * dpd).sum((0, 2)), table)
        return dq, dk, dv, d_table, None, None
