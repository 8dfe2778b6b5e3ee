"""GPT (GPT-2's architecture, as Pax's GPT 126M/5B/175B), as one plain nn.Module.

Pre-norm blocks with LayerNorm (statistics in fp32), learned absolute position embeddings, multi-head
attention and a GELU (tanh approximation) MLP, biases everywhere, input and output embeddings tied by
default. As HF `GPT2LMHeadModel` (`hf.py` converts; HF's fused c_attn is split into wq/wk/wv here so
tensor parallelism can split heads).

Tied embeddings: the output projection uses `embeddings.tok.weight` itself, handed to the `head`
module at forward time (one parameter, so its gradient is the sum of both uses; no attribute tying,
which `to_empty` and pipeline copies would break). `ties_first_last` and `tied_parameters` tell the
layouts: FSDP keeps the embedding in the root unit (gathered while the head uses it); pipelining,
which puts the two uses on different ranks, gives the last stage its own copy of the token embedding
under the same name (`keep_tied_only`) and sums the two copies' gradients (Megatron's way).
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
from llamatron.models.kv_cache import KVCache, LayerKV


@dataclass
class GPTArgs:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 50304
    ffn_dim: int = 3072
    norm_eps: float = 1e-5
    # Rows of the learned position table (a parameter: part of the checkpoint). max_seq_len is the
    # longest sequence a run feeds (position ids buffer; context parallelism sets it to data.seq_len).
    n_positions: int = 2048
    max_seq_len: int = 2048
    init_std: float = 0.02
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype (Pax and Megatron keep LayerNorm in fp32).
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.dim)
        self.wk = nn.Linear(args.dim, args.dim)
        self.wv = nn.Linear(args.dim, args.dim)
        self.wo = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of them.
        q, k, v = (w(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decoding: every earlier token's keys and values from the cache (its layout: [b, s, h, d])
            k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2)))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)  # up (HF c_fc)
        self.w2 = nn.Linear(hidden, dim)  # down (HF c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.attention_norm = LayerNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = LayerNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Embeddings(nn.Module):
    """Token + learned position embedding: one module, so tensor parallelism can shard their sum."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.tok = nn.Embedding(args.vocab_size, args.dim)
        self.pos = nn.Embedding(args.n_positions, args.dim)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(positions)


class Head(nn.Module):
    """Output projection (+ fused loss). Tied: no parameter of its own, the embedding's is passed in."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.proj = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor | None = None,
                fp8_loss: bool | FastAccum = False) -> torch.Tensor:
        w = weight if self.proj is None else self.proj.weight
        if labels is not None:
            return linear_cross_entropy(h, w, labels, fp8=fp8_loss)
        return F.linear(h, w)


class GPT(nn.Module):
    first_stage = ("embeddings",)
    last_stage = ("norm", "head")
    # The first-stage parameters the output layer uses when tied: a last pipeline stage holds a copy.
    tied_parameters = ("embeddings.tok.weight",)

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.args = args
        self.ties_first_last = args.tie_embeddings
        self.embeds_tokens = True  # False on a last pipeline stage that holds only the tied copy
        self.embeddings = Embeddings(args)
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.n_layers)})
        self.norm = LayerNorm(args.dim, args.norm_eps)
        self.head = Head(args)
        # Position ids as a buffer (not arange in forward): context parallelism shards it along the
        # sequence with the tokens, so each rank looks up the rows of its own global positions.
        self.register_buffer("positions", torch.arange(args.max_seq_len), persistent=False)

    def initial_value(self, name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
        """Megatron's (and Pax's) init: N(0, init_std) for every matrix and both embeddings, the
        attention and MLP output projections at init_std/sqrt(2*n_layers), biases 0, norm scales 1.
        Seeded by (seed, name), so every layout materialises the same values (see llama's)."""
        if len(shape) == 1:
            return torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
        std = self.args.init_std
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std = std / math.sqrt(2 * self.args.n_layers)
        gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    def keep_tied_only(self) -> None:
        """Make this copy of the model a last pipeline stage's holder of the tied output weight: of the
        embeddings only the token table stays, under its own name (so checkpoints and initial values
        are those of one process), and it is not used to embed the stage's input."""
        self.embeddings.pos = None
        self.embeds_tokens = False

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.positions.copy_(torch.arange(self.positions.shape[0], device=self.positions.device))

    def sequence_buffers(self) -> list[torch.Tensor]:
        return [self.positions]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))
        self.init_buffers()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, fp8_loss: bool | FastAccum = False,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab]; with labels, the mean cross-entropy
        (output projection fused with the loss, as llama's). With `cache` (llamatron.models.kv_cache),
        tokens are the next slots of its rows, at its positions. logits_at [N, 2] (row, position)
        pairs: logits [N, vocab] of just those positions (scoring; not with labels)."""
        if cache is not None:
            return self._decode(tokens, cache)
        if self.embeddings is not None and self.embeds_tokens:
            h = self.embeddings(tokens, self.positions[: tokens.shape[1]])
        else:
            h = tokens
        for layer in self.layers.values():
            h = layer(h)
        if logits_at is not None:  # the norm is per position: selecting first is exact and cheaper
            h = h[logits_at[:, 0], logits_at[:, 1]]
        if self.norm is not None:
            h = self.norm(h)
        if self.head is None:
            return h
        if self.head.proj is None and self.embeddings is None:
            raise RuntimeError("tied output embedding on a stage without the input embedding")
        weight = self.embeddings.tok.weight if self.head.proj is None else None
        return self.head(h, weight, labels=labels, fp8_loss=fp8_loss)

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The whole model only (generation refuses pipelining): logits of the new tokens.
        cache.advance(tokens.shape[1])
        h = self.embeddings(tokens, cache.positions)
        for name, layer in self.layers.items():
            h = layer(h, cache=cache.layer(name))
        weight = self.embeddings.tok.weight if self.head.proj is None else None
        return self.head(self.norm(h), weight)
