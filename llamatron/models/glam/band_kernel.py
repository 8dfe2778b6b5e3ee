"""The band of split attention (split_attention.py) in Triton kernels of its own, merged in the kernel
with the far part's output: `split_triton`'s near part.

The memory-efficient kernel that `split` and `split_cudnn` run the band in is CUTLASS's Ampere kernel;
it takes the bias as a dense [B, H n, T, 2T] tensor, computes a block of T queries against 2T keys
(W <= T of which are in any row's band) and writes the bias's gradient as another dense tensor, and its
inputs and the merge around it are copies and element-wise passes of their own. Here:

- the bias is looked up in the kernel from a [H, W] vector of the bias at each distance (the table less
  its last bucket's, `_shifted`), and the keys of a block of queries are the 64-key blocks its band
  touches (3 for W = 113);
- the forward merges the band's output with the far part's by their log-sum-exps as it writes it (one
  pass: no fp32 copy of either);
- the backward adds the far part's dq, dk and dv to the band's as it writes them, and sums each
  block of queries' dS at each distance (through a scratch [B, H, S, 128] fp32 that each block writes
  its rows to by distance and reads back: a row's pairs are at distinct distances), whose sum over
  the blocks is the table's gradient by distance (`attention.table_grad_by_distance`).

The kernels are torch custom ops (opaque to dynamo, shapes from their fake implementations), launched on
CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Queries and keys per tile (64 at GLaM's shapes: 3 tiles of keys per block of queries for W = 113),
# and Triton's launch options: bench/bench_glam_attention.py times others.
TILES = {"BLK": 64, "num_warps": 4, "num_stages": 3}


def slot_width(band: int) -> int:
    """The distances a row's dS is written at: the band rounded up to a power of 2."""
    return triton.next_power_of_2(band)


@triton.jit
def _tile(ptr, rows, d, S, sb, sh, ss, b, h):
    """Rows `rows` of the [B, H, S, D] tensor at ptr (zeros past S)."""
    return tl.load(ptr + b * sb + h * sh + rows[:, None] * ss + d[None, :], mask=(rows < S)[:, None], other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, bh, S, rows):
    """The merged log-sum-exp and rowsum(dO o out) of rows `rows` of head bh ([B H, S] fp32)."""
    live = rows < S
    return tl.load(LSE + bh * S + rows, mask=live, other=0.0), tl.load(DELTA + bh * S + rows, mask=live, other=0.0)


@triton.jit
def _scores(q, k, rows, cols, bias_ptr, h, S, W, WP: tl.constexpr, scale):
    """q [M, D] against k [N, D] -> (scores [M, N] fp32, -inf off the band, in_band)."""
    dist = rows[:, None] - cols[None, :]
    in_band = (dist >= 0) & (dist < W) & (cols[None, :] < S) & (rows[:, None] < S)
    bias = tl.load(bias_ptr + h * WP + dist, mask=in_band, other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale + bias
    return tl.where(in_band, s, float("-inf")), in_band


@triton.jit
def _band_forward(Q, K, V, BIAS, OF, LSEF, OUT, LSE,
                  sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sfb, sfh, sfs, slb, slh, sls, sob, soh, sos,
                  H, S, W, scale, HAS_FAR: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr):
    m0 = tl.program_id(0) * BLK
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    rows = m0 + tl.arange(0, BLK)
    d = tl.arange(0, D)
    live = rows < S
    q = _tile(Q, rows, d, S, sqb, sqh, sqs, b, h)
    m_i = tl.full([BLK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLK], tl.float32)
    acc = tl.zeros([BLK, D], tl.float32)
    for n0 in range(tl.maximum(m0 - W + 1, 0) // BLK * BLK, m0 + BLK, BLK):  # the key tiles of the band
        cols = n0 + tl.arange(0, BLK)
        s, in_band = _scores(q, _tile(K, cols, d, S, skb, skh, sks, b, h), rows, cols, BIAS, h, S, W, WP, scale)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row none of whose band is in this tile
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = _tile(V, cols, d, S, svb, svh, svs, b, h)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    l_i = tl.where(live, l_i, 1.0)
    out = acc / l_i[:, None]
    lse = tl.where(live, m_i, 0.0) + tl.log(l_i)
    if HAS_FAR:  # rows W .. S-1 also attend beyond the band: the far part's row r - W
        far = (rows >= W) & live
        o_f = tl.load(OF + b * sfb + h * sfh + (rows - W)[:, None] * sfs + d[None, :], mask=far[:, None], other=0.0)
        lse_f = tl.load(LSEF + b * slb + h * slh + (rows - W) * sls, mask=far, other=float("-inf"))
        both = tl.maximum(lse, lse_f) + tl.log(1.0 + tl.exp(-tl.abs(lse - lse_f)))
        out = out * tl.exp(lse - both)[:, None] + o_f.to(tl.float32) * tl.exp(lse_f - both)[:, None]
        lse = both
    tl.store(OUT + b * sob + h * soh + rows[:, None] * sos + d[None, :], out.to(OUT.dtype.element_ty),
             mask=live[:, None])
    tl.store(LSE + tl.program_id(1) * S + rows, lse, mask=live)


@triton.jit
def _band_backward_dq(Q, K, V, G, LSE, DELTA, BIAS, DQF, DQ, DS, PART,
                      sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sgb, sgh, sgs, sfb, sfh, sfs, sdb, sdh, sds,
                      H, S, W, scale, HAS_FAR: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr):
    """dq of a block of queries (plus the far part's), and the sum of its rows' dS at each distance."""
    m0 = tl.program_id(0) * BLK
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = m0 + tl.arange(0, BLK)
    d = tl.arange(0, D)
    live = rows < S
    q = _tile(Q, rows, d, S, sqb, sqh, sqs, b, h)
    g = _tile(G, rows, d, S, sgb, sgh, sgs, b, h)
    lse, delta = _row_stats(LSE, DELTA, bh, S, rows)
    dq = tl.zeros([BLK, D], tl.float32)
    for n0 in range(tl.maximum(m0 - W + 1, 0) // BLK * BLK, m0 + BLK, BLK):
        cols = n0 + tl.arange(0, BLK)
        k = _tile(K, cols, d, S, skb, skh, sks, b, h)
        s, in_band = _scores(q, k, rows, cols, BIAS, h, S, W, WP, scale)
        p = tl.exp(s - lse[:, None])
        ds = p * (tl.dot(g, tl.trans(_tile(V, cols, d, S, svb, svh, svs, b, h))) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        # A row's pairs of the band are at distinct distances: plain stores, no two to one address.
        tl.store(DS + (bh * S + rows[:, None]) * WP + rows[:, None] - cols[None, :], ds, mask=in_band)
    # Summed over the block's rows at each distance (written just now by this program: after a barrier
    # its threads see each other's stores), one partial sum per block: no atomics, the same sum each run.
    tl.debug_barrier()
    dist = tl.arange(0, WP)
    band = (dist[None, :] < W) & (rows[:, None] - dist[None, :] >= 0) & live[:, None]
    by_distance = tl.sum(tl.load(DS + (bh * S + rows[:, None]) * WP + dist[None, :], mask=band, other=0.0,
                                 cache_modifier=".cg"), 0)  # from L2, where the stores went
    tl.store(PART + (bh * tl.num_programs(0) + tl.program_id(0)) * WP + dist, by_distance)
    dq = dq * scale
    if HAS_FAR:
        far = (rows >= W) & live
        dq += tl.load(DQF + b * sfb + h * sfh + (rows - W)[:, None] * sfs + d[None, :], mask=far[:, None],
                      other=0.0).to(tl.float32)
    tl.store(DQ + b * sdb + h * sdh + rows[:, None] * sds + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=live[:, None])


@triton.jit
def _band_backward_dkdv(Q, K, V, G, LSE, DELTA, BIAS, DKF, DVF, DK, DV,
                        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sgb, sgh, sgs,
                        skfb, skfh, skfs, svfb, svfh, svfs, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                        H, S, W, scale, HAS_FAR: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr):
    """dk and dv of a block of keys (plus the far part's, for its keys 0 .. S-1-W): the band's queries
    after them."""
    n0 = tl.program_id(0) * BLK
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = n0 + tl.arange(0, BLK)
    d = tl.arange(0, D)
    live = cols < S
    k = _tile(K, cols, d, S, skb, skh, sks, b, h)
    v = _tile(V, cols, d, S, svb, svh, svs, b, h)
    dk = tl.zeros([BLK, D], tl.float32)
    dv = tl.zeros([BLK, D], tl.float32)
    for m0 in range(n0, tl.minimum(n0 + BLK + W - 1, S), BLK):
        rows = m0 + tl.arange(0, BLK)
        q = _tile(Q, rows, d, S, sqb, sqh, sqs, b, h)
        g = _tile(G, rows, d, S, sgb, sgh, sgs, b, h)
        lse, delta = _row_stats(LSE, DELTA, bh, S, rows)
        s, in_band = _scores(q, k, rows, cols, BIAS, h, S, W, WP, scale)
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(g.dtype)), g)
        ds = p * (tl.dot(g, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = dk * scale
    if HAS_FAR:
        far = (cols < S - W)[:, None]
        dk += tl.load(DKF + b * skfb + h * skfh + cols[:, None] * skfs + d[None, :], mask=far, other=0.0).to(tl.float32)
        dv += tl.load(DVF + b * svfb + h * svfh + cols[:, None] * svfs + d[None, :], mask=far, other=0.0).to(tl.float32)
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdks + d[None, :], dk.to(DK.dtype.element_ty),
             mask=live[:, None])
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvs + d[None, :], dv.to(DV.dtype.element_ty),
             mask=live[:, None])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """[B, H, S, D] with unit stride along D -> its batch, head and row strides."""
    assert t.stride(3) == 1, "the head dimension must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_args(q, band: int):
    B, H, S, D = q.shape
    grid = (triton.cdiv(S, TILES["BLK"]), B * H)
    return grid, dict(H=H, S=S, W=band, WP=slot_width(band), D=D, **TILES)


@torch.library.custom_op("llamatron::glam_band_forward", mutates_args=())
def band_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, o_far: torch.Tensor,
                 lse_far: torch.Tensor, band: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D]; bias [H, slot_width(band)] fp32 (the bias at each distance below `band`);
    o_far [B, H, S - band, D] and lse_far [B, H, S - band] the far part's (empty where S <= band) ->
    the merged output (q's layout) and log-sum-exp [B, H, S] fp32."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    has_far = o_far.numel() > 0
    o_far, lse_far = (o_far, lse_far) if has_far else (q, lse)  # pointers never read
    grid, meta = _launch_args(q, band)
    _band_forward[grid](q, k, v, bias, o_far, lse_far, out, lse, *_strides(q), *_strides(k), *_strides(v),
                        *_strides(o_far), *lse_far.stride()[:3], *_strides(out), scale=scale, HAS_FAR=has_far,
                        **meta)
    return out, lse


@band_forward.register_fake
def _(q, k, v, bias, o_far, lse_far, band, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("llamatron::glam_band_backward", mutates_args=())
def band_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                  delta: torch.Tensor, bias: torch.Tensor, dq_far: torch.Tensor, dk_far: torch.Tensor,
                  dv_far: torch.Tensor, band: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (the far part's added: its dq for the queries band .., dk and dv for the keys
    0 .. S-1-band) and dS summed at each distance [H, slot_width(band)] fp32, distance 0 first (zero
    from `band` on). lse and delta = rowsum(grad o out) [B, H, S] fp32, contiguous, of the merged
    output."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid, meta = _launch_args(q, band)
    ds = torch.empty((*q.shape[:3], slot_width(band)), dtype=torch.float32, device=q.device)  # scratch
    part = torch.empty((*q.shape[:2], grid[0], slot_width(band)), dtype=torch.float32, device=q.device)
    has_far = dq_far.numel() > 0
    if not has_far:
        dq_far = dk_far = dv_far = q
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad))
    _band_backward_dq[grid](q, k, v, grad, lse, delta, bias, dq_far, dq, ds, part, *common, *_strides(dq_far),
                            *_strides(dq), scale=scale, HAS_FAR=has_far, **meta)
    _band_backward_dkdv[grid](q, k, v, grad, lse, delta, bias, dk_far, dv_far, dk, dv, *common, *_strides(dk_far),
                              *_strides(dv_far), *_strides(dk), *_strides(dv), scale=scale, HAS_FAR=has_far, **meta)
    return dq, dk, dv, part.sum((0, 2))


@band_backward.register_fake
def _(grad, q, k, v, lse, delta, bias, dq_far, dk_far, dv_far, band, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((q.shape[1], slot_width(band)), dtype=torch.float32))
