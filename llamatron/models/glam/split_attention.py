"""GLaM's relative-bias attention as two disjoint parts merged by their log-sum-exp, so that the bulk
runs in a fused causal kernel that takes no bias (flash's, or cuDNN's with `far="cudnn"`).

Every distance from the band width W on is in T5's last bucket, so its bias is one constant per head,
and softmax is unchanged by a constant added to a whole row: with the bias less the last bucket's,

- the far part (distance >= W) has no bias at all. Query i sees keys 0 .. i - W: causal attention of
  the queries W .. S-1 over the keys 0 .. S-1-W, the fused kernels' own case on shifted views;
- the near part (distance < W) is the band: each block of T >= W queries against its own and the
  previous block of keys (`attention.Windows`), one attention call over all windows at once with
  the bias as an additive mask (-inf off the band): on CUDA the memory-efficient kernel, which takes
  a bias and gives its gradient, so the band's scores never leave the chip; on the CPU the same
  formulas in fp32. Or (`near="triton"`, `_SplitTriton`) band_kernel.py's kernels, which read q, k
  and v in place, look the bias up themselves and merge the two parts as they write;
- out = (o_far e^lse_far + o_near e^lse_near) / (e^lse_far + e^lse_near), lse = logaddexp of the two.

Backward: each part's gradient is the flash backward's formula dS = P (dP - rowsum(dO o out)) with the
merged output and log-sum-exp (as ring attention does per block), so each kernel's own backward
computes it when given the merged output and log-sum-exp: the fused backward for the far part, the
memory-efficient one for the windows, whose bias gradient (dS over the band) gives the bias table's
gradient (`Windows.table_grad`). Exact in exact arithmetic; no term cancels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llamatron.models.glam.attention import Windows, table_grad_by_distance

aten = torch.ops.aten


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                    dist_bucket: torch.Tensor, band: int, far: str = "flash", near: str = "efficient") -> torch.Tensor:
    """As `attention.sdpa_attention`: q, k, v [B, H, S, D], table [buckets, H], dist_bucket [>= S] the
    bucket of each distance, band its `band_width`; `far` the far part's CUDA kernel, "flash" or
    "cudnn" (the CPU has one); `near` the band's, "efficient" (the memory-efficient kernel) or "triton"
    (band_kernel.py's, merged there with the far part: needs Triton, and a head dim of 16 to 128, a
    power of 2)."""
    if near == "triton":
        return _SplitTriton.apply(q, k, v, table, dist_bucket, band, far)
    return _SplitAttention.apply(q, k, v, table, dist_bucket, band, far)


def _causal(q, k, v, scale: float, far: str):
    """Causal attention without a bias -> (out, lse [B, H, S] fp32, what its backward needs)."""
    if q.is_cuda and far == "cudnn":
        out, lse, _, _, mq, mk, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse.squeeze(-1), ((seed, offset), (mq, mk))
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse[..., :q.shape[2]], ((cq, ck, seed, offset), (mq, mk))  # kept to the queries, whatever its padding
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ((), ())


def _causal_backward(grad, q, k, v, out, lse, tensors, sizes, scale: float, far: str):
    """`lse` [B, H, S] fp32, contiguous."""
    if q.is_cuda and far == "cudnn":
        (seed, offset), (mq, mk) = tensors, sizes
        grad, out = _layout_of(grad, q), _layout_of(out, q)
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, mq, mk, 0.0, True, scale=scale)
    if q.is_cuda:
        (cq, ck, seed, offset), (mq, mk) = tensors, sizes
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True,
                                                                    scale=scale)


def _layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t [B, H, S, D] dense in ref's order of dimensions in memory, the heads inside the rows
    ([B, S, H, D], as the model's projections lay q, k and v out) or outside: cuDNN's backward gets the
    output and its gradient as SDPA's own autograd hands them over, in the layout its forward wrote the
    output in, that of q. Besides, torch's cuDNN binding (aten/src/ATen/native/cudnn/MHA.cpp) caches
    the backward's graph by q, k and v's sizes and strides alone, with the strides of the output, its
    gradient and the log-sum-exp baked into it: those must be a function of q's, or a later call could
    run a graph built for another layout. Dense, they are: handing over a slice as it is (its batch
    stride that of the whole) was tried on 2026-12-06, and compiled, where inductor may lay a copy out
    densely in the same order, split_cudnn's graph then gave split_triton wrong dq and dk in one
    process (an H200, the attention benchmark; right dv: the graph read the output's rows wrongly)."""
    return _heads_inside(t) if ref.stride(1) < ref.stride(2) else t.contiguous()


def _heads_inside(t: torch.Tensor) -> torch.Tensor:
    """t [B, heads, rows, D] laid out [B, rows, heads, D] in memory (a copy unless it is already)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _shifted(table: torch.Tensor) -> torch.Tensor:
    """The bias less the last bucket's: zero from the band on (the far part's, which flash adds none of)."""
    table = table.detach().float()
    return table - table[-1]


class _Near:
    """The band's windows as one attention call: queries [B, H n, T, D] against keys and values
    [B, H n, 2T, D] (block i - 1, then block i), the bias [B, H n, T, 2T] in the inputs' dtype, -inf off
    the band (a padding row past S keeps its band, so that no row is all -inf)."""

    def __init__(self, q: torch.Tensor, table: torch.Tensor, dist_bucket: torch.Tensor, band: int):
        self.w = w = Windows(q, dist_bucket, band)
        bias = w.bias(_shifted(table)).expand(w.H, w.n, w.T, 2 * w.T)
        bias = bias.masked_fill(~w.in_band, float("-inf")).to(q.dtype)
        self.bias = bias.view(1, w.H * w.n, w.T, 2 * w.T).expand(w.B, -1, -1, -1)

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] (or a log-sum-exp [B, H, S]) -> [B, H n, T, D] ([B, H n, T])."""
        shape = (self.w.B, -1, self.w.T) if t.dim() == 3 else (self.w.B, -1, self.w.T, self.w.D)
        return self.w.blocks(t).reshape(shape)

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        return self.w.with_previous(t).reshape(self.w.B, -1, 2 * self.w.T, self.w.D)

    def unblock(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H n, T, x] -> [B, H, S, x]."""
        return self.w.unblock(t.reshape(self.w.B, self.w.H, self.w.n, self.w.T, -1))

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """A gradient over the keys' windows [B, H n, 2T, D] -> [B, H, S, D]."""
        return self.w.fold(t.reshape(self.w.B, self.w.H, self.w.n, 2 * self.w.T, -1))

    def table_grad(self, d_bias: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The bias's gradient [B, H n, T, 2T] (dS of the band) -> the table's."""
        w = self.w
        return w.table_grad(d_bias.view(w.B, w.H, w.n, w.T, 2 * w.T), table)


def _scores(q, k, bias, scale: float) -> torch.Tensor:
    """The CPU's stand-in for the memory-efficient kernel: its scores in fp32."""
    return (q.float() @ k.float().transpose(-1, -2)) * scale + bias.float()


def _near_forward(q, k, v, bias, scale: float):
    """-> (out, log-sum-exp [B, H n, >= T] fp32 (the kernel's rows are padded to 32), its rng state)."""
    if q.is_cuda:
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale)
        return out, lse, (seed, offset)
    s = _scores(q, k, bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse, ()


def _near_backward(grad, q, k, v, bias, out, lse, rng, scale: float):
    """-> dq, dk, dv, d bias; `out` and `lse` the merged ones (the module doc)."""
    if q.is_cuda:
        seed, offset = rng
        # The kernel reads the output as its forward wrote it, [B, T, heads, D] in memory: it is given
        # the output's batch and head strides but not its row stride (an output laid out otherwise
        # gives rowsum(dO o out) from the wrong rows: wrong dq, dk and bias gradient, right dv).
        out = _heads_inside(out)
        return aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, True], False, scale=scale)
    p = torch.exp(_scores(q, k, bias, scale) - lse[..., : q.shape[2]].unsqueeze(-1))
    dp = grad.float() @ v.float().transpose(-1, -2)
    ds = p * (dp - (grad.float() * out.float()).sum(-1, keepdim=True))
    return ds @ k.float() * scale, ds.transpose(-1, -2) @ q.float() * scale, p.transpose(-1, -2) @ grad.float(), ds


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, dist_bucket, band: int, far: str):
        S, D = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(D)
        near = _Near(q, table, dist_bucket, band)
        o_near, lse_near, rng = _near_forward(near.queries(q), near.keys(k), near.keys(v), near.bias, scale)
        out = near.unblock(o_near).float()  # [B, H, S, D]
        lse = near.unblock(lse_near[..., : near.w.T].unsqueeze(-1)).squeeze(-1)  # [B, H, S]
        flash, sizes = (), ()
        if S > band:  # the far part: queries band .. S-1 over keys 0 .. S-1-band
            o_far, lse_far, (flash, sizes) = _causal(q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band],
                                                     scale, far)
            lse_both = torch.logaddexp(lse[:, :, band:], lse_far)
            merged = (out[:, :, band:] * torch.exp(lse[:, :, band:] - lse_both).unsqueeze(-1)
                      + o_far.float() * torch.exp(lse_far - lse_both).unsqueeze(-1))
            out = torch.cat([out[:, :, :band], merged], dim=2)
            lse = torch.cat([lse[:, :, :band], lse_both], dim=2)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, table, dist_bucket, out, lse, *rng, *flash)
        ctx.band, ctx.scale, ctx.sizes, ctx.n_rng, ctx.far = band, scale, sizes, len(rng), far
        ctx.lse_rows = lse_near.shape[-1]
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, table, dist_bucket, out, lse, *rest = ctx.saved_tensors
        rng, flash = rest[: ctx.n_rng], rest[ctx.n_rng:]
        band, scale, S = ctx.band, ctx.scale, q.shape[2]
        grad = grad.contiguous()
        near = _Near(q, table, dist_bucket, band)
        # The kernel's padded rows, contiguous: it takes the log-sum-exp's batch and head strides only.
        lse_w = F.pad(near.queries(lse), (0, ctx.lse_rows - near.w.T)).contiguous()
        dq_w, dk_w, dv_w, d_bias = _near_backward(
            near.queries(grad), near.queries(q), near.keys(k), near.keys(v), near.bias,
            near.queries(out), lse_w, rng, scale)
        dq, dk, dv = near.unblock(dq_w).float(), near.fold(dk_w.float()), near.fold(dv_w.float())
        if S > band:
            dq_f, dk_f, dv_f = _causal_backward(
                grad[:, :, band:], q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band],
                out[:, :, band:], lse[:, :, band:].contiguous(), flash, ctx.sizes, scale, ctx.far)
            dq = dq + F.pad(dq_f.float(), (0, 0, band, 0))
            dk = dk + F.pad(dk_f.float(), (0, 0, 0, band))
            dv = dv + F.pad(dv_f.float(), (0, 0, 0, band))
        d_table = near.table_grad(d_bias, table)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_table, None, None, None


def _bias_by_distance(table: torch.Tensor, dist_bucket: torch.Tensor, band: int, width: int) -> torch.Tensor:
    """[buckets, H] -> the shifted bias at each distance below `band`, [H, width] fp32 (zeros after)."""
    by_distance = _shifted(table)[dist_bucket[:band]].t()
    return F.pad(by_distance, (0, width - band)).contiguous()


class _SplitTriton(torch.autograd.Function):
    """The far part as `_SplitAttention`'s, the band in band_kernel.py's kernels, which merge the two."""

    @staticmethod
    def forward(ctx, q, k, v, table, dist_bucket, band: int, far: str):
        from llamatron.models.glam import band_kernel

        S, band = q.shape[2], min(band, q.shape[2])
        scale = 1.0 / math.sqrt(q.shape[3])
        bias = _bias_by_distance(table, dist_bucket, band, band_kernel.slot_width(band))
        o_far, lse_far, state, sizes = q.new_empty(0), q.new_empty(0, dtype=torch.float32), (), ()
        if S > band:
            o_far, lse_far, (state, sizes) = _causal(q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band], scale, far)
        out, lse = band_kernel.band_forward(q, k, v, bias, o_far, lse_far, band, scale)
        ctx.save_for_backward(q, k, v, table, dist_bucket, bias, out, lse, *state)
        ctx.band, ctx.scale, ctx.sizes, ctx.far = band, scale, sizes, far
        return out

    @staticmethod
    def backward(ctx, grad):
        from llamatron.models.glam import band_kernel

        q, k, v, table, dist_bucket, bias, out, lse, *state = ctx.saved_tensors
        band, scale, S = ctx.band, ctx.scale, q.shape[2]
        grad = _layout_of(grad, q)
        delta = (grad.float() * out.float()).sum(-1).contiguous()  # [B, H, S], as the kernels index it
        far = (q.new_empty(0),) * 3
        if S > band:
            far = _causal_backward(grad[:, :, band:], q[:, :, band:], k[:, :, :S - band], v[:, :, :S - band],
                                   out[:, :, band:], lse[:, :, band:].contiguous(), state, ctx.sizes, scale, ctx.far)
        dq, dk, dv, by_distance = band_kernel.band_backward(grad, q, k, v, lse, delta, bias, *far[:3], band, scale)
        d_table = table_grad_by_distance(by_distance[:, :band], table, dist_bucket)
        return dq, dk, dv, d_table, None, None, None
