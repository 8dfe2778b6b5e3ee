"""What a Llama step costs: model FLOPs (the formula MFU is quoted with) and activation memory.

FLOPs, by NVIDIA's Llama 3.1 recipe (../shared/spec/PERFORMANCE.md), per token, for L layers, hidden h,
FFN f, vocab V, sequence S, A heads, G KV heads:

    attention = 12 * L * h^2 * (1 + G/A + S/h)
    mlp       = 18 * L * f * h
    embedding =  6 * V * h

Forward + backward, full (not causal-halved) attention, no recomputation counted.
"""

from __future__ import annotations

from llamatron.models.family import BlockShapes, Gemm, Saving
from llamatron.models.llama.model import ModelArgs


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    L, h, f, V, S = args.n_layers, args.dim, args.ffn_dim, args.vocab_size, seq_len
    A, G = args.n_heads, args.n_kv_heads
    attention = 12 * L * h * h * (1 + G / A + S / h)
    mlp = 18 * L * f * h
    embedding = 6 * V * h
    return attention + mlp + embedding


def activation_bytes_per_token(args: ModelArgs, residual_bytes: int, compute_bytes: int,
                               saving: Saving = Saving()) -> float:
    """Bytes one block saves for backward per token (r = bytes of the residual stream: 4 with fp32
    parameters, 2 with bf16 ones; a = bytes of the compute dtype; q = query width, kv = the key/value
    width SDPA sees: the KV heads' under native GQA, expanded to q's otherwise).

    Eager, counted tensor by tensor:
        norms        2 x (input + normalised + output) = 6 r d  (the output in the compute dtype; the
                     normalised input only for the norm weight's gradient: 4 r d under LoRA)
        casts        under autocast, each matmul's own bf16 copy of its fp32 input (wq, wk, wv, w1,
                     w3; autocast caches casts of weights only) = 5 a d, in place of the 2 r d above
        attention    q, k, v, the output and its copy into wo = a (q + 2 kv + 2 q)
        FFN          gate and up outputs, silu(gate), their product = 4 a f
    Compiled (what inductor's partitioner keeps, read off its forward graph: `Saving`):
        the block's input r d; q, k, v after rotary, SDPA's output, wo's output (the residual sum is
        recomputed from it and the input) = a (2 q + 2 kv + d); the gate and up outputs 2 a f; the
        normalised input of wq/wk/wv and of w1/w3 (a d each) and the SwiGLU product (a f) only where
        those layers need it for their weight gradient; rstd and SDPA's log-sum-exp (fp32).
    Under tensor (and sequence) parallelism the count is summed over the TP group (the caller divides
    by tp): the normalised inputs of wq/wk/wv and w1/w3 are all-gathered along the sequence and kept
    whole on every rank, so they count saving.tp times (measured with a fake 2-rank group,
    tests/test_plan.py).
    """
    d, f, r, a = args.dim, args.ffn_dim, residual_bytes, compute_bytes
    q = args.n_heads * args.head_dim
    kv = (args.n_kv_heads if saving.native_gqa else args.n_heads) * args.head_dim
    if not saving.compiled:
        norms = (4 if saving.norm_grads else 2) * r * d + (5 * a * d if r != a else 2 * a * d) * saving.tp
        return norms + a * (3 * q + 2 * kv) + 4 * a * f
    kept = ((a * d * saving.keeps("attention.wq", "attention.wk", "attention.wv")
             + a * d * saving.keeps("feed_forward.w1", "feed_forward.w3")) * saving.tp
            + a * f * saving.keeps("feed_forward.w2"))
    return r * d + a * (2 * q + 2 * kv + d) + 2 * a * f + kept + 8 + 4 * args.n_heads


def shapes(args: ModelArgs) -> BlockShapes:
    """The block's products as `flops_per_token` counts them: q and o of d x A hd, k and v of d x G hd,
    the SwiGLU gate, up (d x f) and down (f x d)."""
    d, f, q, kv = args.dim, args.ffn_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    gemms = (Gemm("attention.wq", d, q), Gemm("attention.wk", d, kv), Gemm("attention.wv", d, kv),
             Gemm("attention.wo", q, d), Gemm("feed_forward.w1", d, f), Gemm("feed_forward.w3", d, f),
             Gemm("feed_forward.w2", f, d))
    return BlockShapes(gemms, args.n_heads, args.n_kv_heads, args.head_dim)
