"""What a model family gives the rest of llamatron.

A family is a folder `llamatron/models/<name>/` holding one plain `nn.Module` (its model), its args
dataclass and named sizes, and this `Family` record saying how to build, check, shard, count and
convert it. Nothing outside `models/` knows a family's internals: the trainer, the parallel layouts,
the memory estimate, `flops` and `convert` only go through this record and the module protocol below.

The model protocol (what the generic code calls on every family's module):
  - `Model(args)`; args has at least n_layers, dim, n_heads, vocab_size, max_seq_len, init_std;
  - `model.layers`: an `nn.ModuleDict` of blocks keyed "0".."L-1" (pipeline stages delete entries,
    FSDP, activation checkpointing and compile wrap each entry);
  - `Model.first_stage` / `Model.last_stage`: names of the top-level modules only the first / last
    pipeline stage keeps (the others are set to None, and forward skips a None module);
  - `model.initial_value(name, shape, seed)`: the fp32 CPU value of a parameter, seeded by its name, so
    that every layout materialises the same weights; `model.init_buffers()` after `to_empty`;
  - `model.sequence_buffers()`: position-indexed buffers (dim 0) that context parallelism shards
    together with the tokens;
  - optional `model.ties_first_last` (True when the last stage's output layer uses a first-stage
    parameter, i.e. tied embeddings): FSDP then keeps them in the root unit. Under pipelining the last
    stage holds its own copy: `Model.tied_parameters` names those parameters, and
    `model.keep_tied_only()` turns a copy of the model into a last stage's holder of them (the other
    first-stage modules dropped, the kept ones not run on the stage's input); the pipeline sums the
    two copies' gradients, so they take the same steps and stay equal;
  - `model(tokens)` -> logits, `model(tokens, labels, fp8_loss=False)` -> mean token cross-entropy
    (fused with the output projection; fp8_loss runs its GEMMs in FP8);
  - optional incremental decoding: `model(tokens, cache=KVCache)` -> logits of just these tokens, the
    next slots of the cache's left-padded rows (`models/kv_cache.py`: the family takes their positions
    and attention mask from it, and stores each layer's keys and values through `cache.layer(name)`).
    Generation uses it when forward has a `cache` parameter, and recomputes the sequence otherwise;
  - optional selected logits: `model(tokens, logits_at=idx)`, idx [N, 2] int64 (row, position)
    pairs -> logits [N, vocab] of just those positions (the final norm and output layer run on those
    rows only). Zero-shot scoring (`eval/loglikelihood.py`) uses it when forward has a `logits_at`
    parameter, and indexes the full [batch, seq, vocab] logits otherwise;
  - optional padding lengths: `model(tokens, lengths=n)`, n [batch] int64, each row's real tokens
    (the rest right padding), for a family whose rows are not independent past causal attention
    (GLaM's capacity routing: padding would take expert slots). Scoring and generation pass them
    when forward has a `lengths` parameter.

`Family.shapes(args)` describes a block's matrix products and attention for the layout planner
(llamatron/plan.py): what it times, what tensor, context and expert parallelism move, and which
calibration shapes `llamatron plan --calibrate` measures. Every family states them next to its FLOP
formula; `tests/test_plan.py` checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Gemm:
    """One weight matrix product of a block: x [rows, k] @ W [k, n] (an nn.Linear of k in and n out
    features, or a stacked expert weight)."""

    name: str  # the module path inside a block ("attention.wq"; experts: "feed_forward.experts.w1")
    k: int
    n: int
    rows: int = 1  # rows per token in a block that has it: 1, or top_k for experts
    share: float = 1.0  # the fraction of blocks that have it (MoE layers: n_moe_layers / n_layers)
    groups: int = 1  # > 1: E experts' weights in one grouped GEMM, the rows spread over them
    tp_split: bool = True  # tensor parallelism splits it (False: every TP rank computes it whole)


@dataclass(frozen=True)
class BlockShapes:
    """What one block computes, for the planner's cost model (the mean over blocks where they differ)."""

    gemms: tuple[Gemm, ...]
    heads: int
    kv_heads: int
    head_dim: int
    attention_mask: str = "causal"  # causal (is_causal) or bias (an additive float mask: slower kernels)
    # The kernel that computes a biased mask on CUDA (GLaM: attention.KERNEL), whose calibration rows
    # the planner reads where a table timed several; None: the mask's only way.
    attention_kernel: str | None = None

    def moe_rows(self) -> float:
        """Rows each token sends to experts per block (the mean over blocks): what all-to-all moves."""
        return max((g.rows * g.share for g in self.gemms if g.groups > 1), default=0.0)


@dataclass(frozen=True)
class Saving:
    """How a block runs, where what it saves for backward depends on it (`Family.activation_bytes_per_token`).

    Compiled (torch.compile with inductor), the min-cut partitioner keeps what backward needs as a whole
    tensor (a GEMM's operand: a linear's input for its weight gradient; SDPA's inputs and output) and the
    cheapest tensors to recompute the rest from in backward's fused kernels: RMSNorm, rotary, SwiGLU
    products, casts and residual sums are not saved. So a linear whose weight gets no gradient from its
    compute-dtype input (FP8 layers cast theirs again; a frozen layer has none) keeps no copy of it.
    """

    compiled: bool = False
    native_gqa: bool = False  # SDPA reads each KV head for its query heads (no expanded K/V copies)
    # The block linears (module paths inside a block, "attention.wq") whose input backward keeps in the
    # compute dtype: trainable BF16 ones and LoRA-adapted ones. None: all of them (full BF16 training).
    weight_grad_inputs: frozenset[str] | None = None
    # What is kept per sequence rather than per token (GLaM's attention bias) needs this rank's sequence
    # length (0: not counted) and the sequences of a micro-batch, which share it.
    seq_len: int = 0
    micro_batch: int = 1
    # The tensor-parallel degree. The family's count is summed over the TP group's ranks, which the
    # caller divides by tp: a part TP leaves whole (GLaM's MoE blocks) counts tp times.
    tp: int = 1
    # Whether the norms' weights train (not under LoRA): eager, an RMSNorm keeps its normalised input
    # for its weight's gradient only then.
    norm_grads: bool = True

    def keeps(self, *names: str) -> bool:
        """Whether backward keeps the compute-dtype input shared by these linears (any one needing it)."""
        return self.weight_grad_inputs is None or any(n in self.weight_grad_inputs for n in names)


@dataclass(frozen=True)
class Family:
    name: str
    args_type: type  # the dataclass of shapes and constants
    model_type: type[nn.Module]
    # Model FLOPs per token (forward + backward) at a sequence length: the formula MFU is quoted with.
    flops_per_token: Callable[[Any, int], float]
    # Raises LlamatronError("config key 'model.KEY': ...") for an impossible shape.
    validate: Callable[[Any], None]
    # Sizes that tensor parallelism must divide, by config key ({"model.n_heads": 32, ...}).
    tp_divisible: Callable[[Any], dict[str, int]]
    # Shards a model (or a pipeline stage of it) over a 1-D tensor-parallel DeviceMesh, in place.
    tensor_parallel: Callable[[nn.Module, Any], None]
    # Bytes one block saves for backward per token (residual bytes r, compute bytes a, how it runs:
    # `Saving`, eager by default): the memory estimate (llamatron/parallel/memory.py).
    activation_bytes_per_token: Callable[..., float]
    # The Hugging Face adapter (a module: see models/llama/hf.py), or None if the family has no HF twin.
    hf: Any = None
    # Parallel degrees (`parallel.KEY`) this family's model cannot take: they must stay 1.
    unsupported_parallel: tuple[str, ...] = ()
    # A block's matrix products and attention (`BlockShapes`), for `llamatron plan`; None: not plannable.
    shapes: Callable[[Any], BlockShapes] | None = None
    # What the family's tensor-parallel plan leaves whole on every rank, for the memory estimate: the
    # parameters of the first- and last-stage modules it does not split (the final norm; GPT's
    # position embedding; GLaM's tied embedding), whether it splits the vocabulary (the logits and
    # the loss's buffers), and whether the residual stream between blocks is sequence-parallel.
    tp_whole_ends: Callable[[Any], int] = lambda args: 0
    tp_splits_vocab: bool = True
    sequence_parallel: bool = True
    # The planner's calibrated element-wise traffic per byte a block saves for backward (None: the
    # constant fitted on Llama's blocks, plan.ELEMENTWISE_PER_SAVED_BYTE), where a family's blocks
    # do a different amount of element-wise work per saved byte.
    elementwise_per_saved_byte: float | None = None

    def build(self, args) -> nn.Module:
        """The model on the current default device (build under `torch.device("meta")` and materialise)."""
        return self.model_type(args)
