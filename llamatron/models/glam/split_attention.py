"""GLaM's relative-bias attention as two disjoint parts merged by their log-sum-exp, so that the bulk
runs in the flash kernel, which takes no bias.

Every distance from the band width W on is in T5's last bucket, so its bias is one constant per head,
and softmax is unchanged by a constant added to a whole row: with the bias less the last bucket's,

- the far part (distance >= W) has no bias at all. Query i sees keys 0 .. i - W: causal attention of
  the queries W .. S-1 over the keys 0 .. S-1-W, the flash kernel's own case on shifted views;
- the near part (distance < W) is the band: each block of T >= W queries against its own and the
  previous block of keys (`attention.Windows`), dense batched products with the bias;
- out = (o_far e^lse_far + o_near e^lse_near) / (e^lse_far + e^lse_near), lse = logaddexp of the two.

Backward: each part's gradient is the flash backward's formula dS = P (dP - rowsum(dO o out)) with the
merged output and log-sum-exp (as ring attention does per block): the flash backward kernel for the
far part, the same products over the windows for the near part, whose dS also gives the bias table's
gradient (`Windows.table_grad`). Exact in exact arithmetic; no term cancels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llamatron.models.glam.attention import Windows, band_products

aten = torch.ops.aten


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                    dist_bucket: torch.Tensor, band: int) -> torch.Tensor:
    """As `attention.sdpa_attention`: q, k, v [B, H, S, D], table [buckets, H], dist_bucket [>= S] the
    bucket of each distance, band its `band_width`."""
    return _SplitAttention.apply(q, k, v, table, dist_bucket, band)


def _flash(q, k, v, scale: float):
    """Causal flash attention -> (out, lse [B, H, S] fp32, the tensors and the sizes its backward needs)."""
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse[..., :q.shape[2]], (cq, ck, seed, offset), (mq, mk)  # kept to the queries, whatever its padding
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, (), ()


def _flash_backward(grad, q, k, v, out, lse, tensors, sizes, scale: float):
    if q.is_cuda:
        (cq, ck, seed, offset), (mq, mk) = tensors, sizes
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True,
                                                                    scale=scale)


def _near_scores(w: Windows, q, k, table, scale: float) -> torch.Tensor:
    """The band's scores with the (shifted) bias, fp32 [B, H, n, T, 2T], -inf off the band."""
    scores = band_products(w.blocks(q), w.with_previous(k).transpose(-1, -2)) * scale + w.bias(table)
    return scores.masked_fill(~w.valid, float("-inf"))


def _shifted(table: torch.Tensor) -> torch.Tensor:
    """The bias less the last bucket's: zero from the band on (the far part's, which flash adds none of)."""
    table = table.detach().float()
    return table - table[-1]


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, dist_bucket, band: int):
        S, D = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(D)
        shifted = _shifted(table)
        w = Windows(q, dist_bucket, band)
        s = _near_scores(w, q, k, shifted, scale)
        lse_near = torch.logsumexp(s, dim=-1, keepdim=True)
        lse_near = lse_near.masked_fill(torch.isinf(lse_near), 0.0)  # the padding rows past S
        p = torch.exp(s - lse_near).to(v.dtype)
        out = w.unblock(band_products(p, w.with_previous(v))).float()  # [B, H, S, D]
        lse = w.unblock(lse_near).squeeze(-1)  # [B, H, S]
        flash, sizes = (), ()
        if S > band:  # the far part: queries band .. S-1 over keys 0 .. S-1-band
            o_far, lse_far, flash, sizes = _flash(q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band], scale)
            lse_both = torch.logaddexp(lse[:, :, band:], lse_far)
            merged = (out[:, :, band:] * torch.exp(lse[:, :, band:] - lse_both).unsqueeze(-1)
                      + o_far.float() * torch.exp(lse_far - lse_both).unsqueeze(-1))
            out = torch.cat([out[:, :, :band], merged], dim=2)
            lse = torch.cat([lse[:, :, :band], lse_both], dim=2)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, table, dist_bucket, out, lse, *flash)
        ctx.band, ctx.scale, ctx.sizes = band, scale, sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, table, dist_bucket, out, lse, *flash = ctx.saved_tensors
        band, scale, S = ctx.band, ctx.scale, q.shape[2]
        grad = grad.contiguous()
        shifted = _shifted(table)
        w = Windows(q, dist_bucket, band)
        p = torch.exp(_near_scores(w, q, k, shifted, scale) - w.blocks(lse))
        gb = w.blocks(grad)
        dp = band_products(gb, w.with_previous(v).transpose(-1, -2))
        delta = w.blocks((grad.float() * out.float()).sum(-1))
        ds = p * (dp - delta)  # fp32 [B, H, n, T, 2T]
        ds_lo = ds.to(q.dtype)
        dq = w.unblock(band_products(ds_lo, w.with_previous(k))) * scale
        dk = w.fold(band_products(ds_lo.transpose(-1, -2), w.blocks(q))) * scale
        dv = w.fold(band_products(p.to(q.dtype).transpose(-1, -2), gb))
        if S > band:
            dq_f, dk_f, dv_f = _flash_backward(
                grad[:, :, band:], q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band],
                out[:, :, band:], lse[:, :, band:].contiguous(), flash, ctx.sizes, scale)
            dq = dq + F.pad(dq_f.float(), (0, 0, band, 0))
            dk = dk + F.pad(dk_f.float(), (0, 0, 0, band))
            dv = dv + F.pad(dv_f.float(), (0, 0, 0, band))
        d_table = w.table_grad(ds.sum((0, 2)), table)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_table, None, None
