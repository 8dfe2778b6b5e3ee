"""What a GLaM step costs: model FLOPs by ACTIVE parameters (the formula MFU is quoted with) and
activation memory.

Per token, forward + backward (6 FLOPs per active weight, full attention as the Llama formula), for
L blocks of which M are MoE (L - M dense), hidden d, dense FFN f, expert FFN f_e, top-k of E experts,
vocab V, sequence S:

    attention = L x (24 d^2 + 12 S d)        q, k, v, o projections; scores and context
    dense FFN = (L - M) x 18 d f             gated GELU: three d x f matrices
    experts   = M x k x 12 d f_e             each token runs k ungated experts (two d x f_e matrices)
    router    = M x 6 d E
    embedding = 6 V d                        the (tied) output layer

Tokens dropped for capacity are still counted (the nominal top-k compute, as Megatron and torchtitan
quote MoE MFU); the relative position bias and routing arithmetic are not counted.
"""

from __future__ import annotations

from llamatron.models.family import BlockShapes, Gemm, Saving
from llamatron.models.glam import attention
from llamatron.models.glam.model import GLaMArgs

# The planner's calibrated element-wise traffic per byte a block saves for backward (Llama's blocks:
# 4.9, llamatron/plan.py). GLaM's saved bytes are mostly the MoE blocks' gathered inputs and expert
# hidden states, which take one ReLU and a gather each, not Llama's norm / rotary / SwiGLU chains.
# Fitted on the H100 profile of GLaM 126M-64E (micro 16, split_triton attention, 2026-12-06,
# docs/bench/h100_glam126m_split_triton_profile.json): element-wise 197 ms, of which ~71 ms the loss and
# the weight passes as planned, leaves 126 ms where 4.9 planned 229 ms: 4.9 x 126 / 229 = 2.7. Checked
# on the H200 (its own table and runs, not fitted): docs/planner.md.
ELEMENTWISE_PER_SAVED_BYTE = 2.7


def flops_per_token(args: GLaMArgs, seq_len: int) -> float:
    L, M, d, S = args.n_layers, args.n_moe_layers, args.dim, seq_len
    attention = L * (24 * d * d + 12 * S * d)
    dense = (L - M) * 18 * d * args.ffn_dim
    experts = M * args.top_k * 12 * d * args.expert_ffn_dim
    router = M * 6 * d * args.n_experts
    return attention + dense + experts + router + 6 * args.vocab_size * d


def activation_bytes_per_token(args: GLaMArgs, residual_bytes: int, compute_bytes: int,
                               saving: Saving = Saving()) -> float:
    """Bytes one block saves for backward per token, the mean over dense and MoE blocks (r = residual
    bytes, a = compute bytes). Eager:
        norms, attention   as Llama: 4 r d + 5 a d (+ autocast copies), 5 a d
        dense FFN          gate, up, gelu(gate), product = 4 a f
        MoE                fp32 logits and probabilities 8 E; per kept assignment (k per token) the
                           gathered input a d, expert hidden and its ReLU 2 a f_e, output a d; the
                           combined output a d
    Compiled (inductor's partitioner; a capacity-routed MoE block is one graph, a dropless or
    expert-parallel one breaks at routing and each piece is partitioned):
        attention and norms   as Llama's compiled count (q = kv = d)
        dense FFN             gate and up 2 a f (+ normalised input a d and product a f where kept)
        MoE                   the FFN input in fp32 4 d, router logits and probabilities 8 E; per
                              assignment the gathered input and the expert output 2 a d, the hidden
                              a f_e and its ReLU mask f_e
    Either way, per sequence rather than per token: the relative position bias SDPA is given (heads x
    S x S in the compute dtype) and its causal mask (S x S bytes), shared by the micro-batch's rows.
    Tensor parallelism leaves the MoE blocks whole (every TP rank routes all tokens through all
    experts) and, without sequence parallelism, the residual stream, the norms and the inputs of the
    column-parallel linears whole on every rank: summed over the TP group, those bytes count saving.tp
    times; attention inside (by heads) and the dense FFN's hidden (by columns) are split.
    """
    d, r, a, k, E = args.dim, residual_bytes, compute_bytes, args.top_k, args.n_experts
    f, fe = args.ffn_dim, args.expert_ffn_dim
    M, L = args.n_moe_layers, args.n_layers
    bias = (a * args.n_heads + 1) * saving.seq_len / max(1, saving.micro_batch)
    tp = saving.tp
    if not saving.compiled:
        # attention's q, k, v, output and its copy into wo (split by heads): 5 a d
        common = ((4 if saving.norm_grads else 2) * r * d + (5 * a * d if r != a else 2 * a * d)) * tp + 5 * a * d
        dense = 4 * a * f
        moe = 8 * E + k * (2 * a * d + 2 * a * fe) + a * d
    else:
        common = ((r * d + a * d * saving.keeps("attention.wq", "attention.wk", "attention.wv") + 8) * tp
                  + 5 * a * d + 4 * args.n_heads)
        dense = 2 * a * f + a * d * saving.keeps("feed_forward.w1", "feed_forward.w3") * tp + a * f * saving.keeps("feed_forward.w2")
        moe = 4 * d + 8 * E + k * (2 * a * d + (a + 1) * fe)
    return common + bias + (M * moe * tp + (L - M) * dense) / L


def shapes(args: GLaMArgs) -> BlockShapes:
    """Attention (d x d four times) in every block; the dense blocks' gated GELU; in the MoE blocks
    the router (d x E) and the experts, each token's top_k rows spread over E grouped weights, which
    tensor parallelism leaves whole (sharding.py). The relative position bias makes SDPA take an
    additive mask."""
    d, L, M, E = args.dim, args.n_layers, args.n_moe_layers, args.n_experts
    dense, moe = (L - M) / L, M / L
    gemms = tuple(Gemm(f"attention.{w}", d, d) for w in ("wq", "wk", "wv", "wo")) + (
        Gemm("feed_forward.w1", d, args.ffn_dim, share=dense), Gemm("feed_forward.w3", d, args.ffn_dim, share=dense),
        Gemm("feed_forward.w2", args.ffn_dim, d, share=dense), Gemm("feed_forward.router", d, E, share=moe, tp_split=False),
        Gemm("feed_forward.experts.w1", d, args.expert_ffn_dim, rows=args.top_k, share=moe, groups=E, tp_split=False),
        Gemm("feed_forward.experts.w2", args.expert_ffn_dim, d, rows=args.top_k, share=moe, groups=E, tp_split=False))
    return BlockShapes(tuple(g for g in gemms if g.share > 0), args.n_heads, args.n_heads, args.head_dim,
                       attention_mask="bias", attention_kernel=attention.KERNEL)
