"""What a Llama step costs: model FLOPs (the formula MFU is quoted with) and activation memory.

FLOPs, by NVIDIA's Llama 3.1 recipe (../shared/spec/PERFORMANCE.md), per token, for L layers, hidden h,
FFN f, vocab V, sequence S, A heads, G KV heads:

    attention = 12 * L * h^2 * (1 + G/A + S/h)
    mlp       = 18 * L * f * h
    embedding =  6 * V * h

Forward + backward, full (not causal-halved) attention, no recomputation counted.
"""

from __future__ import annotations

from llamatron.models.family import BlockShapes, Gemm
from llamatron.models.llama.model import ModelArgs


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    L, h, f, V, S = args.n_layers, args.dim, args.ffn_dim, args.vocab_size, seq_len
    A, G = args.n_heads, args.n_kv_heads
    attention = 12 * L * h * h * (1 + G / A + S / h)
    mlp = 18 * L * f * h
    embedding = 6 * V * h
    return attention + mlp + embedding


def activation_bytes_per_token(args: ModelArgs, residual_bytes: int, compute_bytes: int) -> int:
    """Bytes one block saves for backward per token, counted tensor by tensor in eager mode
    (r = bytes of the residual stream: 4 with fp32 parameters, 2 with bf16 ones; a = bytes of the
    compute dtype):
        norms        2 x (input + normalised + output) = 6 r d  (the output in the compute dtype)
        casts        under autocast, each matmul's own bf16 copy of its fp32 input (wq, wk, wv, w1,
                     w3; autocast caches casts of weights only) = 5 a d, in place of the 2 r d above
        attention    q, k and v after GQA expansion, output, and the output's copy into wo = 5 a d
        FFN          gate and up outputs, silu(gate), their product = 4 a f
    """
    d, f, r, a = args.dim, args.ffn_dim, residual_bytes, compute_bytes
    norms = 4 * r * d + (5 * a * d if r != a else 2 * a * d)
    return norms + 5 * a * d + 4 * a * f


def shapes(args: ModelArgs) -> BlockShapes:
    """The block's products as `flops_per_token` counts them: q and o of d x A hd, k and v of d x G hd,
    the SwiGLU gate, up (d x f) and down (f x d)."""
    d, f, q, kv = args.dim, args.ffn_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    gemms = (Gemm("attention.wq", d, q), Gemm("attention.wk", d, kv), Gemm("attention.wv", d, kv),
             Gemm("attention.wo", q, d), Gemm("feed_forward.w1", d, f), Gemm("feed_forward.w3", d, f),
             Gemm("feed_forward.w2", f, d))
    return BlockShapes(gemms, args.n_heads, args.n_kv_heads, args.head_dim)
