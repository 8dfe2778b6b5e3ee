"""What a GPT step costs: model FLOPs (the formula MFU is quoted with) and activation memory.

FLOPs per token, forward + backward, the same convention as llama's cost.py (6 x the matmul
parameters N, plus attention scores over the full, not causal-halved, sequence; no recomputation):
for L layers, hidden h, FFN f, vocab V, sequence S,

    attention = 24 * L * h^2 + 12 * L * h * S     (q, k, v, o projections; QK^T and AV)
    mlp       = 12 * L * f * h                     (up and down projections)
    embedding =  6 * V * h                         (the tied output projection)

i.e. 6N + 12 L h S with N = L (4h^2 + 2hf) + V h. With f = 4h this is Megatron's (Narayanan et al.
2021) 72 L h^2 (1 + S/(6h) + V/(12 h L)). Position-embedding lookups, biases and norms are not counted.
"""

from __future__ import annotations

from llamatron.models.family import BlockShapes, Gemm, Saving
from llamatron.models.gpt.model import GPTArgs


def flops_per_token(args: GPTArgs, seq_len: int) -> float:
    L, h, f, V, S = args.n_layers, args.dim, args.ffn_dim, args.vocab_size, seq_len
    attention = 24 * L * h * h + 12 * L * h * S
    mlp = 12 * L * f * h
    embedding = 6 * V * h
    return attention + mlp + embedding


def activation_bytes_per_token(args: GPTArgs, residual_bytes: int, compute_bytes: int,
                               saving: Saving = Saving()) -> float:
    """Bytes one block saves for backward per token (r: residual-stream bytes, a: compute bytes), as
    llama's count. Eager:
        norms        F.layer_norm keeps its input (and fp32 mean and rstd), 2 r d; the linears after it
                     their input: under autocast each matmul's own bf16 copy (wq, wk, wv, w1) = 4 a d,
                     else the shared normalised output, 2 a d
        attention    q, k, v, output and the output's copy into wo = 5 a d
        MLP          up output (GELU input) and GELU output = 2 a f
    Compiled (inductor's partitioner): the block's input r d; q, k, v, SDPA's output and wo's output
    5 a d; the up output (GELU input) a f; the normalised inputs of wq/wk/wv and of w1 (a d each) and
    the GELU output (a f) where those layers need them for their weight gradient; the LayerNorms' mean
    and rstd and SDPA's log-sum-exp (fp32).
    Under tensor (and sequence) parallelism, summed over the TP group: the normalised inputs of the
    column-parallel linears are gathered along the sequence and kept whole on every rank (saving.tp
    times), as llama's.
    """
    d, f, r, a = args.dim, args.ffn_dim, residual_bytes, compute_bytes
    if not saving.compiled:
        norms = 2 * r * d + (4 * a * d if r != a else 2 * a * d) * saving.tp
        return norms + 5 * a * d + 2 * a * f
    kept = ((a * d * saving.keeps("attention.wq", "attention.wk", "attention.wv")
             + a * d * saving.keeps("feed_forward.w1")) * saving.tp + a * f * saving.keeps("feed_forward.w2"))
    return r * d + 5 * a * d + a * f + kept + 16 + 4 * args.n_heads


def shapes(args: GPTArgs) -> BlockShapes:
    """q, k, v, o (d x d), the MLP's up (d x f) and down (f x d); multi-head attention, causal."""
    d, f = args.dim, args.ffn_dim
    gemms = tuple(Gemm(f"attention.{w}", d, d) for w in ("wq", "wk", "wv", "wo")) + (
        Gemm("feed_forward.w1", d, f), Gemm("feed_forward.w2", f, d))
    return BlockShapes(gemms, args.n_heads, args.n_heads, args.head_dim)
