"""Causal self-attention with GLaM's T5 relative position bias, ways that give the same numbers.

- `sdpa_attention` (the reference, and the CPU path): the bias of every (query, key) pair looked up
  into a [heads, S, S] float mask for SDPA. It costs an [S, S] embedding lookup per block, its
  scatter backward, and the slow memory-efficient kernel (an additive float mask rules out flash).
- `flex_attention_biased` (CUDA): flex_attention with a causal block mask (the upper half skipped)
  and a `score_mod` that adds bias[head, q - kv], read from a [heads, S] table of the bias at each
  distance; no [S, S] tensor exists. The bias table's gradient is computed apart (`_TableGrad`),
  since flex's own gradient for a captured tensor scatters every score's gradient with atomics onto
  a few addresses (most distances share the last bucket).

The table's gradient without the full [S, S] score gradient dS: d table[b, h] is the sum of dS over
the pairs whose distance falls in bucket b. Each softmax row's dS sums to zero (sum_kv P (dP - delta)
= delta - delta), and every distance from the band width W on is in the last bucket, so
    d table[b] = sum of dS over the band (distance < W) in bucket b, for the other buckets,
    d table[last] = - (sum of those),
and the band is recomputed from q, k, v, the output, its gradient and the log-sum-exp, a block of
queries against its own and the previous block of keys (W <= block): about W / S of the full cost.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as fa

from llamatron.errors import LlamatronError
from llamatron.models.attention_ops import compiled_on_cuda


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                   buckets: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, H, S, D], table [buckets, H], buckets [>= S, >= S] (bucket of query - key)."""
    seqlen = q.shape[2]
    bias = table[buckets[:seqlen, :seqlen]].permute(2, 0, 1).to(q.dtype)  # [H, S, S]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    bias = bias.masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_block_mask(seqlen: int, device: torch.device):
    return fa.create_block_mask(_causal, None, None, seqlen, seqlen, device=device)


# Inductor's Hopper default for head dim 64 (128 x 128 tiles, 3 stages) asks for 240 KiB of shared
# memory with this score_mod, over the H200's 227 KiB: 64-key tiles, as its Ampere default.
_HEAD_DIM_64_TILES = {"BLOCK_M": 128, "BLOCK_N": 64}


def _flex_with_lse(q, k, v, bias, block_mask, options=None):
    """flex_attention adding bias[h, q - kv] (bias [H, S], fp32) -> (output, log-sum-exp [B, H, S]);
    `options` flex's kernel options (default: `_HEAD_DIM_64_TILES` where they apply)."""
    if options is None:
        options = _HEAD_DIM_64_TILES if q.is_cuda and q.shape[-1] <= 64 else None

    def score_mod(score, b, h, q_idx, kv_idx):
        # Masked pairs of a partly masked block are computed too: keep their index in range.
        return score + bias[h, torch.clamp(q_idx - kv_idx, min=0)]

    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                     kernel_options=options, return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=options,
                             return_lse=True)


def _flex(device: torch.device):
    """Compiled on CUDA (flex is a slow reference implementation eager), once: the score_mod is built
    inside, so the captured bias is a graph input, not a new function per call."""
    return compiled_on_cuda(_flex_with_lse, device)


def band_width(dist_bucket: torch.Tensor, n_buckets: int) -> int:
    """Distances 0 .. W-1 are in the buckets before the last (T5 buckets grow with the distance)."""
    return int((dist_bucket < n_buckets - 1).sum())


# How the model runs it on CUDA (`kernel()`): "flex" (`flex_attention_biased`), "split" (split_attention.py:
# the flash kernel beyond the band, the memory-efficient kernel within it), "split_cudnn" (cuDNN's
# fused causal kernel beyond the band) or "split_triton" (cuDNN's beyond the band, band_kernel.py's
# Triton kernels within it, head dims 16-128 of a power of 2; the memory-efficient kernel where Triton
# is missing). bench/bench_glam_attention.py checks each against fp32 and times them, and
# bench/compare_glam_kernel_grads.py compares the model's gradients under each. On an H100 on
# 2026-12-06 GLaM 126M's step at micro 16 took 0.876 s with split_triton, 0.916 with split_cudnn, 0.98
# with split and 1.07 with flex (docs/moe.md); split_triton's attention is as close to fp32 as flex's
# (its table gradient closer: fp32 dS), its model gradients lie nearest flex's, and it keeps no more
# memory than flex.
KERNELS = ("flex", "split", "split_cudnn", "split_triton")
KERNEL = os.environ.get("LLAMATRON_GLAM_ATTENTION", "split_triton")  # compiled blocks guard on it


def kernel() -> str:
    if KERNEL not in KERNELS:
        raise LlamatronError(f"LLAMATRON_GLAM_ATTENTION={KERNEL!r}: expected one of {', '.join(KERNELS)}")
    return KERNEL


def flex_attention_biased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          dist_bucket: torch.Tensor, band: int, block_mask, flex=None) -> torch.Tensor:
    """As `sdpa_attention`; dist_bucket [>= S] the bucket of each distance, band its `band_width`;
    `flex` a compiled `_flex_with_lse` with other kernel options (the benchmark's)."""
    seqlen = q.shape[2]
    bias = table.detach().float()[dist_bucket[:seqlen]].t().contiguous()  # [H, S]
    out, lse = (flex or _flex(q.device))(q, k, v, bias, block_mask)
    return _TableGrad.apply(out, table, q.detach(), k.detach(), v.detach(), lse.detach(), dist_bucket, band)


class _TableGrad(torch.autograd.Function):
    """Identity on the attention output whose backward also gives the bias table its gradient (the
    module doc); q, k and v get theirs from flex_attention's own backward."""

    @staticmethod
    def forward(ctx, out, table, q, k, v, lse, dist_bucket, band: int):
        ctx.save_for_backward(out, table, q, k, v, lse, dist_bucket)
        ctx.band = band
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        out, table, q, k, v, lse, dist_bucket = ctx.saved_tensors
        d_table = table_grad(q, k, v, out, lse, grad, table, dist_bucket, ctx.band)
        return grad, d_table, None, None, None, None, None, None


class Windows:
    """The band of distances below `band` as windows: each block of T queries (T = the band rounded up to
    16) against its own block of keys and the previous one, where all of its band lies."""

    def __init__(self, q: torch.Tensor, dist_bucket: torch.Tensor, band: int):
        self.B, self.H, self.S, self.D = q.shape
        self.T = min(self.S, -(-band // 16) * 16)
        self.n = -(-self.S // self.T)
        self.pad = self.n * self.T - self.S
        T, n, S = self.T, self.n, self.S
        r = torch.arange(T, device=q.device)
        c = torch.arange(2 * T, device=q.device)
        i = torch.arange(n, device=q.device).view(n, 1, 1)
        dist = T + r[:, None] - c[None, :]  # [T, 2T] query - key within a window
        self.in_band = (dist >= 0) & (dist < band) & ((i - 1) * T + c >= 0)  # [n, T, 2T]
        self.valid = self.in_band & (i * T + r[:, None] < S)  # and a query, not a padding row
        self.W = min(band, T)  # the band's distances that a window holds (all of them unless S < band)
        self.dist_bucket = dist_bucket
        self.bucket = dist_bucket[dist.clamp(0, self.W - 1)]  # [T, 2T]; off the band masked by the users

    def blocks(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] -> [B, H, n, T, D] (zero rows past S); [B, H, S] (a log-sum-exp) -> [B, H, n, T, 1]."""
        if t.dim() == 3:
            return F.pad(t, (0, self.pad)).view(self.B, self.H, self.n, self.T, 1)
        return F.pad(t, (0, 0, 0, self.pad)).view(self.B, self.H, self.n, self.T, self.D)

    def with_previous(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] -> [B, H, n, 2T, D]: block i - 1 (zeros for 0), then block i."""
        b = self.blocks(t)
        return torch.cat([F.pad(b[:, :, :-1], (0, 0, 0, 0, 1, 0)), b], dim=3)

    def unblock(self, b: torch.Tensor) -> torch.Tensor:
        """[B, H, n, T, x] -> [B, H, S, x]."""
        return b.reshape(self.B, self.H, self.n * self.T, -1)[:, :, : self.S]

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """A gradient over `with_previous`'s windows [B, H, n, 2T, D] -> over the keys [B, H, S, D]: each
        block's own half, plus the next window's first half (where it was the previous block)."""
        T = self.T
        return self.unblock(w[:, :, :, T:] + F.pad(w[:, :, 1:, :T], (0, 0, 0, 0, 0, 1)))

    def bias(self, table: torch.Tensor) -> torch.Tensor:
        """[buckets, H] -> the bias of each window position, [H, 1, T, 2T] fp32."""
        return table.detach().float()[self.bucket].permute(2, 0, 1).unsqueeze(1)

    def distance_sums(self, ds: torch.Tensor) -> torch.Tensor:
        """Windows [..., T, 2T] -> [..., W] fp32: the sum over the rows at each distance d, at W - 1 - d.
        Row r's entries at distances W-1 .. 0 (keys T + r - W + 1 .. T + r) start 2T + 1 further on in
        memory than row r - 1's: flattened, rows 0 .. T-2 of the band are the first W columns of a
        [T - 1, 2T + 1] view, the last row a slice. Views and one reduction: no copy, no scatter."""
        T, W = self.T, self.W
        start = T - W + 1
        body = ds.flatten(-2)[..., start: start + (T - 1) * (2 * T + 1)].unflatten(-1, (T - 1, 2 * T + 1))
        return body[..., :W].sum(-2, dtype=torch.float32) + ds[..., T - 1, 2 * T - W:].float()

    def table_grad(self, ds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """dS over the windows [B, H, n, T, 2T] (zero off the band and on padding rows) -> d table.
        Summed along each distance's diagonal first (a plain reduction), then into its bucket: every
        pair beyond the band is in the last bucket, and each row's dS sums to zero."""
        by_distance = self.distance_sums(ds).sum((0, 2)).flip(-1)  # [H, W], distance 0 first
        return table_grad_by_distance(by_distance, table, self.dist_bucket)


def table_grad_by_distance(by_distance: torch.Tensor, table: torch.Tensor, dist_bucket: torch.Tensor) -> torch.Tensor:
    """dS summed at each distance of the band [H, W] (distance 0 first) -> d table [buckets, H] (module
    doc: each distance into its bucket, the last bucket minus the others' sum)."""
    d_table = torch.zeros(table.shape, dtype=torch.float32, device=by_distance.device)
    d_table = d_table.index_add(0, dist_bucket[: by_distance.shape[1]], by_distance.float().t())
    return torch.cat([d_table[:-1], -d_table[:-1].sum(0, keepdim=True)]).to(table.dtype)


def table_grad(q, k, v, out, lse, grad_out, table, dist_bucket, band: int) -> torch.Tensor:
    """d loss / d table [buckets, H] from the band of distances < band (module doc), in fp32."""
    w = Windows(q, dist_bucket, band)
    qb, ob, gb = w.blocks(q), w.blocks(out), w.blocks(grad_out)  # the inputs' dtype: `band_products` upcasts
    kw, vw = w.with_previous(k), w.with_previous(v)
    scores = band_products(qb, kw.transpose(-1, -2)) / math.sqrt(w.D) + w.bias(table)
    p = torch.exp((scores - w.blocks(lse.float())).masked_fill(~w.valid, float("-inf")))
    dp = band_products(gb, vw.transpose(-1, -2))
    delta = (gb.float() * ob.float()).sum(-1, keepdim=True)
    return w.table_grad(p * (dp - delta), table)


# How `table_grad` multiplies half-precision operands on CUDA: "tensor_cores" (bf16/fp16 operands, fp32
# accumulation and result, as flash attention's own backward recomputes its scores) or "fp32" (upcast
# first: the same products, exact in fp32 either way, summed in another order, at the CUDA cores'
# ~1/10 of the rate). bench/bench_glam_attention.py times both.
BAND_MATMUL = os.environ.get("LLAMATRON_GLAM_BAND_MATMUL", "tensor_cores")


def band_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., m, k] @ b [..., k, n] in fp32 (`BAND_MATMUL`); the CPU and fp32 inputs upcast."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and BAND_MATMUL == "tensor_cores":
        lead = a.shape[:-2]
        y = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return y.view(*lead, a.shape[-2], b.shape[-1])
    return a.float() @ b.float()
