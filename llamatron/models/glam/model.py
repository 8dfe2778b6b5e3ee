"""GLaM (Du et al. 2022) as Pax builds it (paxml GLaM126M64EBase / GLaM64B64EBase, praxis `glam.py`).

Decoder-only, pre-norm blocks; every other block's FFN is a mixture of experts, starting at block 0
(`moe_every` = 2). Dense FFNs are gated GELU (three matrices), experts ungated ReLU (two, Pax's
default: only that gives the published 1.9B / 1.14T counts). RMSNorm, no biases, no absolute
positions: a T5-style relative position bias per block (causal buckets: 32, max distance 128), and
the embedding tied to the output layer.

The aux loss. Each MoE block adds coef x (aux + z_coef/coef x z) to the training objective with
coef = aux_loss_coef / n_moe_layers (Pax: 0.01 / (L/2)). It reaches the gradient through
`_AttachLoss` on the block's output, as Megatron's MoEAuxLossAutoScaler does: the forward is the
identity, the backward adds d(loss_scale x aux)/d(router) to the router's gradient. The returned loss
(forward with labels) is the cross-entropy alone, so training and validation losses compare with a
dense model's; the aux loss is reported by `step_metrics()`. This works on every path (fused or plain
loss, FSDP, activation checkpointing) because the gradient enters with the block's output, where
FSDP's backward hooks see it. `set_loss_scale(1/accum)` (the step does it) makes it a mean over
micro-batches like the cross-entropy.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from llamatron.fp8_gemm import FastAccum
from llamatron.loss import linear_cross_entropy
from llamatron.models.glam import attention
from llamatron.models.glam.attention import band_width, causal_block_mask, sdpa_attention
from llamatron.models.glam.split_attention import split_attention
from llamatron.models.glam.experts import GroupedExperts
from llamatron.models.glam.routing import dispatch_indices, gather_rows, route
from llamatron.models.kv_cache import KVCache, LayerKV

HAS_TRITON = importlib.util.find_spec("triton") is not None  # split_triton's band kernels (CUDA torch ships it)


@dataclass
class GLaMArgs:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 32000  # Pax's GLaM configs: the 32K SentencePiece vocabulary of its LM tasks
    ffn_dim: int = 3072  # dense blocks' gated-GELU width
    expert_ffn_dim: int = 3072
    n_experts: int = 64
    top_k: int = 2
    moe_every: int = 2  # MoE at blocks 0, moe_every, 2 moe_every, ...
    capacity_factor: float = 2.0  # Pax's; 0 = dropless token choice
    aux_loss_coef: float = 0.01  # in total, split evenly over the MoE blocks (Pax: 0.01 / (L/2) each)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss, per MoE block (0: off, as Pax GLaM)
    norm_eps: float = 1e-6
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    max_seq_len: int = 2048
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return len(moe_layer_ids(self))


def moe_layer_ids(args: GLaMArgs) -> list[int]:
    return list(range(0, args.n_layers, args.moe_every))


def rel_pos_band(args: GLaMArgs) -> int:
    """Distances below this are in the buckets before the last (the rest share the last one)."""
    distance = torch.arange(args.max_seq_len, device="cpu")  # also while the model is built on meta
    return band_width(relative_position_bucket(distance, args.rel_pos_buckets, args.rel_pos_max_distance),
                      args.rel_pos_buckets)


def relative_position_bucket(distance: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of distance = query position - key position (>= 0): half the buckets
    exact, the rest logarithmic up to max_distance, beyond it the last bucket."""
    n = distance.clamp(min=0)
    exact = n_buckets // 2
    log = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (n_buckets - exact)).long()
    return torch.where(n < exact, n, log.clamp(max=n_buckets - 1))


def fast_relative_attention(q, k, v, table, dist_bucket, band: int, block_mask) -> torch.Tensor:
    """The CUDA way (`attention.KERNEL`) to `sdpa_attention`'s numbers; the split ways need the fused
    kernels' half-precision inputs, else flex."""
    way = attention.kernel()
    if way.startswith("split") and q.dtype in (torch.bfloat16, torch.float16):
        d = q.shape[-1]
        triton_fits = HAS_TRITON and 16 <= d <= 128 and d & (d - 1) == 0
        near = "triton" if way == "split_triton" and triton_fits else "efficient"
        return split_attention(q, k, v, table, dist_bucket, band, far="flash" if way == "split" else "cudnn",
                               near=near)
    return attention.flex_attention_biased(q, k, v, table, dist_bucket, band, block_mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: GLaMArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.dim, bias=False)
        self.wv = nn.Linear(args.dim, args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        # One learned scalar per (bucket, head): T5's relative attention bias, one table per block.
        self.rel_bias = nn.Embedding(args.rel_pos_buckets, args.n_heads)
        self.band = rel_pos_band(args)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, cache: LayerKV | None = None,
                block_mask=None) -> torch.Tensor:
        """buckets [>= S, >= S]: the bucket of each (query, key) distance. With a flex_attention causal
        `block_mask` (CUDA) no [S, S] bias is made: see attention.py."""
        bsz, seqlen, _ = x.shape
        q, k, v = (w(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if cache is not None:
            return self._decode(q, k, v, buckets, cache)
        # The whole table through the module (tensor parallelism shards it by heads: this rank's).
        table = self.rel_bias(torch.arange(self.rel_bias.num_embeddings, device=x.device))
        if block_mask is None:
            out = sdpa_attention(q, k, v, table, buckets)
        else:
            out = fast_relative_attention(q, k, v, table, buckets[:, 0], self.band, block_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _decode(self, q, k, v, buckets: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """Attention of the new queries over every cached key: buckets [batch, new, cached] are each
        row's own (query position - key position), so padding shifts nothing."""
        bsz, _, seqlen, _ = q.shape
        k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2)))
        bias = self.rel_bias(buckets).permute(0, 3, 1, 2).to(q.dtype)  # [batch, heads, new, cached]
        bias = bias.masked_fill(~cache.mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class GatedGELU(nn.Module):
    """The dense blocks' FFN: w2(gelu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


class _AttachLoss(torch.autograd.Function):
    """Identity on x whose backward also gives `loss` the gradient `scale` (see the module doc)."""

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, device=grad.device, dtype=torch.float32), None


class MoE(nn.Module):
    """Router + experts: each token goes to its top-k experts (capacity permitting), its output the
    gate-weighted sum of theirs. Routing groups are the sequences (Pax's group of S tokens).

    With a capacity (Pax's mode) every shape is static: the kept choices are gathered into an
    [E, G x C, d] buffer by their slots, the experts run as one batched matmul, and each token's
    output gathers its rows back; no host sync, one graph under torch.compile. Dropless routing
    sorts the kept assignments by expert (data-dependent sizes) for a grouped GEMM."""

    def __init__(self, args: GLaMArgs):
        super().__init__()
        self.top_k, self.capacity_factor = args.top_k, args.capacity_factor
        self.aux_coef = args.aux_loss_coef / args.n_moe_layers
        self.z_coef = args.z_loss_coef
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = GroupedExperts(args.n_experts, args.dim, args.expert_ffn_dim)
        self.loss_scale = 1.0
        # Expert parallelism sets this (llamatron/parallel/expert_parallel.py): dispatch(experts, x
        # sorted by expert, counts per expert) -> outputs in the same order, across the ep ranks.
        self.dispatch = None
        # Router statistics since the last `step_metrics()`: kept assignments per expert, dropped and
        # all assignments, the sum of aux losses and their count. Not in checkpoints. The forward
        # leaves its own in `last_stats`; GLaM.forward adds them up (outside any compiled block, and
        # never for a recomputation under activation checkpointing).
        self.register_buffer("stats", torch.zeros(args.n_experts + 4, dtype=torch.float64), persistent=False)
        self.last_stats: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [batch, seq, d]; valid [batch, seq] bool: False marks padding, which routing leaves out
        (scoring and generation; routing.py)."""
        bsz, seqlen, dim = x.shape
        # fp32 router logits (Pax upcasts them), whatever the autocast or parameter dtype.
        # Named ranges: bench/bench_train_step.py --profile reports the time of each.
        with record_function("moe.route"):
            logits = F.linear(x.float(), self.router.weight.float())
            r = route(logits.view(bsz, seqlen, -1), self.top_k, self.capacity_factor, valid)
        flat = x.reshape(bsz * seqlen, dim)
        out = self._capacity(flat, r) if r.capacity else self._dropless(flat, r)
        loss = self.aux_coef * r.aux_loss + self.z_coef * r.z_loss
        out = _AttachLoss.apply(out, loss, self.loss_scale)
        aux = r.aux_loss.detach()
        assigned = aux.new_zeros(()) + r.assigned  # an int, or a tensor where padding was left out
        self.last_stats = torch.cat([r.counts.float(), torch.stack([r.dropped.float(), assigned, aux, aux.new_tensor(1.0)])])
        return out.view(bsz, seqlen, dim)

    def _capacity(self, flat: torch.Tensor, r) -> torch.Tensor:
        E = self.experts.w1.shape[0]
        G, S, k = r.choice.shape
        rows = G * r.capacity  # per expert
        with record_function("moe.route"):
            slot_token, dest, slot_choice = dispatch_indices(r, E)
            xs = gather_rows(flat, slot_token, dest)  # [E x rows, d]: empty slots are zero rows
        with record_function("moe.experts"):
            if self.dispatch is None:
                ys = self.experts(xs.view(E, rows, -1)).view(E * rows, -1)
            else:
                ys = self.dispatch(self.experts, xs, torch.full((E,), rows, device=xs.device))
        with record_function("moe.combine"):
            picked = gather_rows(ys.to(flat.dtype), dest.reshape(-1), slot_choice.view(-1, 1)).view(G * S, k, -1)
            weight = (r.choice_gate * r.kept).reshape(G * S, k, 1).to(flat.dtype)
            return (picked * weight).sum(1)

    def _dropless(self, flat: torch.Tensor, r) -> torch.Tensor:
        with record_function("moe.route"):
            xs = flat[r.token]
        with record_function("moe.experts"):
            ys = self.experts(xs, r.counts) if self.dispatch is None else self.dispatch(self.experts, xs, r.counts)
        with record_function("moe.combine"):
            return torch.zeros_like(flat).index_add(0, r.token, ys.to(flat.dtype) * r.gate.unsqueeze(1).to(flat.dtype))

    @torch.no_grad()
    def record(self) -> None:
        """Add the last forward's statistics to `stats` (GLaM.forward, training forwards only)."""
        if self.last_stats is not None:
            self.stats += self.last_stats.to(self.stats.dtype)
            self.last_stats = None


class Block(nn.Module):
    def __init__(self, args: GLaMArgs, moe: bool):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args) if moe else GatedGELU(args.dim, args.ffn_dim)
        self.moe = moe

    @property
    def compile_fullgraph(self) -> bool:
        """Whether torch.compile can take the block as one graph (llamatron/transforms/compile.py):
        not where routing makes data-dependent shapes (dropless) or an expert-parallel dispatch
        exchanges them, where dynamo breaks the graph around those operations."""
        ff = self.feed_forward
        return not isinstance(ff, MoE) or (ff.capacity_factor > 0 and ff.dispatch is None)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, cache: LayerKV | None = None,
                block_mask=None, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), buckets, cache=cache, block_mask=block_mask)
        ffn_in = self.ffn_norm(h)
        return h + (self.feed_forward(ffn_in, valid) if self.moe else self.feed_forward(ffn_in))


class TiedEmbedding(nn.Module):
    """The token embedding, also the output layer (tied). One module for both uses, so that FSDP
    gathers its weight for each (a weight shared by two FSDP units would be gathered by neither)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, unembed: bool = False,
                fp8_loss: bool | FastAccum = False) -> torch.Tensor:
        if not unembed:
            return F.embedding(x, self.weight)
        if labels is not None:
            return linear_cross_entropy(x, self.weight, labels, fp8=fp8_loss)
        return F.linear(x, self.weight)


class GLaM(nn.Module):
    # Pipelining is not offered (the tied embedding lives on both ends): these only name the modules
    # outside the blocks for FSDP's grouping.
    first_stage = ("embedding",)
    last_stage = ("norm",)

    def __init__(self, args: GLaMArgs):
        super().__init__()
        self.args = args
        self.embedding = TiedEmbedding(args.vocab_size, args.dim)
        moe = set(moe_layer_ids(args))
        self.layers = nn.ModuleDict({str(i): Block(args, i in moe) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Bucket of every (query, key) pair up to max_seq_len, recomputed by init_buffers; not persistent.
        self.register_buffer("rel_buckets", self._buckets(), persistent=False)
        # Attention by flex_attention (no [S, S] bias; attention.py): None = when training on CUDA.
        # Tests set True to run it on the CPU (forward only: flex has no CPU backward).
        self.flex_attention: bool | None = None
        self._block_masks: dict = {}

    def _buckets(self, device=None) -> torch.Tensor:
        pos = torch.arange(self.args.max_seq_len, device=device)
        return relative_position_bucket(pos[:, None] - pos[None, :], self.args.rel_pos_buckets,
                                        self.args.rel_pos_max_distance)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def initial_value(self, name: str, shape, seed: int) -> torch.Tensor:
        """fp32 CPU value of parameter `name`, seeded by (seed, name) as the Llama family's: N(0, std),
        output projections (attention wo, FFN and expert w2) at std / sqrt(2 n_layers), norms at 1,
        relative biases at 0 (no bias at the start)."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("rel_bias.weight"):
            return torch.zeros(shape)
        std = self.args.init_std
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2")):
            std = std / math.sqrt(2 * self.args.n_layers)
        gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.rel_buckets.copy_(self._buckets(self.rel_buckets.device))
        for m in self.moe_layers():
            m.stats.zero_()

    def sequence_buffers(self) -> list[torch.Tensor]:
        return []  # relative positions: context parallelism is not offered

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))
        self.init_buffers()

    def set_loss_scale(self, scale: float) -> None:
        """The weight of this forward's aux losses in the gradient (1 / micro-batches per step)."""
        for m in self.moe_layers():
            m.loss_scale = scale

    def step_metrics(self, reduce=None) -> dict[str, float]:
        """Router statistics since the last call, then reset: every MoE block's aux loss (mean), the
        fraction of assignments dropped for capacity, and the load of the busiest and idlest expert
        relative to the mean (1.0 = balanced), over MoE blocks and micro-batches. `reduce(t)` sums
        a tensor over ranks (every rank must call this with the same reduce)."""
        layers = self.moe_layers()
        if not layers:
            return {}
        total = torch.stack([m.stats for m in layers]).sum(0)
        for m in layers:
            m.stats.zero_()
        if reduce is not None:
            total = reduce(total)
        E = total.numel() - 4
        counts, dropped, assigned, aux, calls = total[:E], total[E], total[E + 1], total[E + 2], total[E + 3]
        if calls == 0:
            return {}
        mean = counts.mean().clamp(min=1e-9)
        return {"moe_aux_loss": float(aux / calls), "moe_dropped_fraction": float(dropped / assigned.clamp(min=1)),
                "moe_max_load": float(counts.max() / mean), "moe_min_load": float(counts.min() / mean)}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, fp8_loss: bool | FastAccum = False,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] -> logits; with labels, the mean cross-entropy (the aux loss enters the
        gradient on its own: module doc). With `cache` (llamatron.models.kv_cache), tokens are the
        next slots of its rows, the relative positions those of its query and key positions.
        logits_at [N, 2] (row, position) pairs: logits [N, vocab] of just those positions (scoring;
        not with labels). lengths [batch]: each row's real tokens, the rest right padding, which the
        MoE blocks' routing leaves out: a row routes as its tokens alone (capacity and drops are its
        own), so its logits do not depend on its batch mates."""
        if cache is not None:
            return self._decode(tokens, cache)
        h = self.embedding(tokens)
        block_mask = self._block_mask(tokens.shape[1], tokens.device)
        valid = None
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths.to(tokens.device).view(-1, 1)
        for layer in self.layers.values():
            h = layer(h, self.rel_buckets, block_mask=block_mask, valid=valid)
        if self.training:
            for m in self.moe_layers():
                m.record()
        if logits_at is not None:  # the norm is per position: selecting first is exact and cheaper
            h = h[logits_at[:, 0], logits_at[:, 1]]
        h = self.norm(h)
        return self.embedding(h, labels, unembed=True, fp8_loss=fp8_loss)

    def _block_mask(self, seqlen: int, device: torch.device):
        """The causal flex_attention block mask of this length, made once, or None for SDPA with the
        materialised bias. Flex by default when training on CUDA: evaluation and scoring forwards
        see many lengths, each a new flex compilation, and need no bias gradient."""
        use = device.type == "cuda" and self.training if self.flex_attention is None else self.flex_attention
        if not use:
            return None
        key = (seqlen, str(device))
        if key not in self._block_masks:
            self._block_masks[key] = causal_block_mask(seqlen, device)
        return self._block_masks[key]

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # MoE blocks route each row's new real tokens as one group (the prefill's left padding left
        # out): a prompt as the full recompute of it alone routes it, each later token alone (nothing
        # dropped: a group of one fits any capacity). With capacity the recompute is not causal (later
        # tokens can take a token's second expert), so only dropless routing (capacity_factor 0) makes
        # the two agree exactly.
        cache.advance(tokens.shape[1])
        distance = cache.positions[:, :, None] - cache.key_positions[:, None, :]
        buckets = relative_position_bucket(distance, self.args.rel_pos_buckets, self.args.rel_pos_max_distance)
        h = self.embedding(tokens)
        for name, layer in self.layers.items():
            h = layer(h, buckets, cache=cache.layer(name), valid=cache.real)
        return self.embedding(self.norm(h), unembed=True)
