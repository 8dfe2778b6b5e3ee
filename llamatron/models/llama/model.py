"""Llama 3.1, as one plain nn.Module.

Follows Meta's reference (llama-models `models/llama3/model.py`): pre-norm blocks, RMSNorm computed in
fp32, rotary embeddings on interleaved pairs with the Llama 3.1 frequency scaling, grouped-query
attention, SwiGLU, untied output layer, no biases. Weights use Meta's layout (q/k rows interleaved), so
Meta checkpoints load as they are and Hugging Face ones through a permutation (see `convert`).

Nothing here knows about distribution, precision policies or compilation: those are applied to an
unmodified instance by functions elsewhere (its tensor-parallel plan is `sharding.py`, its Hugging Face
and Meta formats `hf.py`). Build large models on the meta device, then `to_empty(device=...)` and
`init_weights()`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamatron.fp8_gemm import FastAccum
from llamatron.loss import linear_cross_entropy
from llamatron.models.attention_ops import compiled_on_cuda, gqa_attention
from llamatron.models.kv_cache import KVCache, LayerKV


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 RoPE frequency scaling (Meta `apply_scaling`); rope_scaling_factor = 0 turns it off.
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 8192
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width rule: int(2*4*dim/3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies f_i = theta^(-2i/head_dim), with Llama 3.1 scaling applied."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if args.rope_scaling_factor:
        factor, low, high, ctx = (
            args.rope_scaling_factor,
            args.rope_low_freq_factor,
            args.rope_high_freq_factor,
            args.rope_original_context,
        )
        wavelen = 2 * math.pi / freqs
        smooth = (ctx / wavelen - low) / (high - low)
        scaled = (1 - smooth) * freqs / factor + smooth * freqs
        # Short wavelengths (high frequencies) are kept, long ones slowed by `factor`, the band between blended.
        freqs = torch.where(wavelen < ctx / high, freqs, torch.where(wavelen > ctx / low, freqs / factor, scaled))
    return freqs.float()


def rope_cos_sin(args: ModelArgs, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [batch, seq, heads, head_dim] by pos * f_i.

    Real arithmetic rather than Meta's view_as_complex: identical result, and it compiles to one fused
    element-wise kernel.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    # cos/sin [seq, pairs] (positions 0..seq-1), or [batch, seq, pairs] (packed: each row's own positions).
    cos = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]
    sin = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def document_mask(document_ids: torch.Tensor, flex: bool = False):
    """Token i sees token j <= i of the same document only: a [batch, 1, seq, seq] boolean SDPA mask,
    or with `flex` a flex_attention BlockMask (blocks wholly outside every document are skipped, and
    no seq x seq tensor exists: what CUDA uses)."""
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

        batch, seq = document_ids.shape
        # The compiled flex_attention is made here, outside the blocks: made inside a compiled block that
        # is also checkpointed, setting the global is a side effect torch.compile refuses.
        _flex_attention(document_ids.device)
        return create_block_mask(same_document_causal, batch, None, seq, seq, device=document_ids.device)
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & causal)[:, None]


def _flex_attention(device: torch.device):
    """flex_attention, compiled on CUDA (eager it is a slow reference implementation)."""
    from torch.nn.attention.flex_attention import flex_attention

    return compiled_on_cuda(flex_attention, device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, as Meta's reference does.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 rather than the configured head count: under tensor parallelism each rank holds a slice.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        # cos/sin hold every position this rank's sequence may start at; the rows for this sequence
        # come first (under context parallelism they are this rank's positions, sharded like the tokens).
        if cos.dim() == 2:
            cos, sin = cos[:seqlen], sin[:seqlen]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: the keys and values of every earlier token come from the cache
            k, v = cache.update(k, v)
            mask = cache.mask
        # GQA: each KV head serves n_heads/n_kv_heads consecutive query heads (K/V expanded or not: attention_ops).
        if mask is None:
            out = gqa_attention(q, k, v, is_causal=True)
        elif isinstance(mask, torch.Tensor):  # packed sequences: block-diagonal causal, one block per document
            out = gqa_attention(q, k, v, attn_mask=mask)
        else:  # the same as a flex_attention BlockMask
            out = _flex_attention(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                                            enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        # mask by keyword: tensor parallelism's PrepareModuleInput lays out the positional inputs only.
        h = x + self.attention(self.attention_norm(x), cos, sin, mask=mask, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    # The top-level modules only the first / last pipeline stage keeps (llamatron.models.family).
    first_stage = ("tok_embeddings",)
    last_stage = ("norm", "output")

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by layer index (not a list) so pipeline stages can delete layers and keep names.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Rotary cos/sin for positions 0..max_seq_len-1, fp32, as buffers rather than computed from the
        # input's length in forward: under sequence parallelism a block sees only a slice of the
        # sequence, under context parallelism these rows are sharded with the tokens, and a pipeline
        # stage's input is a hidden state. Not persistent (never in checkpoints); `init_buffers`
        # recomputes them after `to_empty`.
        cos, sin = rope_cos_sin(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def initial_value(self, name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
        """The initial fp32 value of parameter `name` (its clean FQN) on the CPU.

        Megatron's init: N(0, std) everywhere, output projections of attention and MLP at
        std/sqrt(2*n_layers), norms at 1. Each parameter draws from its own generator, seeded by
        (seed, name): a pipeline stage holding some of the layers, or a rank holding a shard, gets
        exactly the values the whole model has, and sampling on the CPU makes them the same on every
        device.
        """
        if len(shape) == 1:
            return torch.ones(shape)
        std = self.args.init_std
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std = std / math.sqrt(2 * self.args.n_layers)
        gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary tables, after `to_empty` (they are not in checkpoints)."""
        cos, sin = rope_cos_sin(self.args, self.rope_cos.shape[0], device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def sequence_buffers(self) -> list[torch.Tensor]:
        """Buffers indexed by position: context parallelism shards them along dim 0 with the tokens."""
        return [self.rope_cos, self.rope_sin]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (`initial_value`) and the rotary tables. Deterministic for a seed
        whatever the device; seed None draws one from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))
        self.init_buffers()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, fp8_loss: bool | FastAccum = False,
                positions: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab]; with labels, the mean cross-entropy over
        the labels that are not -100 (llamatron.loss.IGNORE_INDEX). logits_at [N, 2] (row, position)
        pairs: logits [N, vocab] of just those positions (scoring; not with labels).

        With labels the output projection and the loss are fused (llamatron.loss) so the full logits
        are never materialised; computing it here, inside the module, keeps it under whatever wrapping
        (FSDP, compile) is applied to the model. fp8_loss: that fused loss's GEMMs in FP8 (a `FastAccum`:
        which of them accumulate fast).

        Packed sequences (fine-tuning): positions [batch, seq] restart at 0 in each document, and
        document_ids [batch, seq] keep attention inside a document (`document_mask`).

        Incremental decoding (`llamatron.models.kv_cache`): with `cache`, tokens are the next slots of
        its left-padded rows; positions and the attention mask are the cache's.
        """
        if cache is not None:
            return self._decode(tokens, cache)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = self.rope_cos, self.rope_sin
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        if document_ids is None:
            for layer in self.layers.values():
                h = layer(h, cos, sin)
        else:
            mask = document_mask(document_ids, flex=document_ids.is_cuda)
            for layer in self.layers.values():
                h = layer(h, cos, sin, mask)
        if logits_at is not None:  # the norm is per position: selecting first is exact and cheaper
            h = h[logits_at[:, 0], logits_at[:, 1]]
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels, fp8=fp8_loss)
        return self.output(h)

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The whole model only (generation refuses pipelining): logits of the new tokens, each row's
        # rotary angles at its own positions.
        cache.advance(tokens.shape[1])
        cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]
        h = self.tok_embeddings(tokens)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, cache=cache.layer(name))
        return self.output(self.norm(h))
