"""Memory a rank needs for training, estimated before any is allocated (printed by the trainer, and
usable as a dry run: `estimate_memory(...)` needs no GPU).

Counted per rank, for the rank that holds the most (the first pipeline stage for activations, the
embedding; the last for the output layer):

- weights: fp32 master parameters, 4 bytes each, divided by tp (matrices only) and by the FSDP shard
  degree dp_shard x cp;
- gradients: fp32, the same division;
- optimizer: AdamW's two fp32 moments, 8 bytes per parameter, the same division;
- working copies: what the compute runs on besides the masters. Under FSDP, the gathered parameters
  of the units in flight (two blocks, in the compute dtype; all of the stage's blocks under pipeline
  parallelism, which keeps them gathered across micro-batches, plus their unsharded gradients);
  without FSDP under bf16 autocast, the bf16 casts of all weights, which autograd keeps until
  backward;
- activations: what autograd saves in each block for backward, per token of the local sequence
  (micro_batch x seq_len / cp, and / tp for the sequence-parallel parts), counted tensor by tensor
  by the model's family (`Family.activation_bytes_per_token`; Llama's in models/llama/cost.py),
  times the blocks whose activations are alive at once: all of them, or with activation
  checkpointing only their inputs (r d) plus one block recomputed; under pipeline parallelism
  (1F1B) the first stage holds pp micro-batches in flight (interleaved: pp + (pp-1)/v-ish; counted
  as pp), GPipe all of them;
- logits: the loss over the vocabulary, per micro-batch: with the fused cross-entropy one chunk of
  8192 rows (logits + their gradient in the compute dtype; the softmax runs as one compiled kernel),
  else the whole logits in the compute dtype, in fp32 and their fp32 gradient (the tensor-parallel
  path divides V by tp).

An estimate: allocator fragmentation, communication buffers and torch.compile's own choices of what
to save (it may keep more or less than eager) are not modelled. docs/parallelism.md compares it with
measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    working: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.working + self.activations + self.logits

    def as_dict(self) -> dict[str, float]:
        keys = ("weights", "gradients", "optimizer", "working", "activations", "logits", "total")
        return {k: getattr(self, k) for k in keys}

    def describe(self) -> str:
        unit, scale = ("GiB", GiB) if self.total >= GiB / 10 else ("MiB", 2**20)
        return ", ".join(f"{k} {v / scale:.2f}" for k, v in self.as_dict().items()) + f" {unit}"


@dataclass(frozen=True)
class ParameterCounts:
    """The model's parameters by where they live: per block (averaged over blocks; matrices, which
    tensor parallelism shards, and vectors, which it does not), and in the modules of the first and
    last pipeline stage (embedding; final norm and output). Tied parameters are counted once, in
    `first`; `tied` of them the last pipeline stage holds a copy of."""

    block_matrices: float
    block_vectors: float
    first: int
    last: int
    total: int
    tied: int = 0

    def ends(self, pp: int) -> int:
        """The first and last stage's modules on one rank (pp 1), else those of the larger end."""
        return self.first + self.last if pp == 1 else max(self.first, self.last + self.tied)


_COUNTS: dict[tuple[str, str], ParameterCounts] = {}


def parameter_counts(args) -> ParameterCounts:
    """Cached per shape: building even a meta-device 405B takes a quarter of a second, and the planner
    asks for thousands of layouts."""
    key = (f"{type(args).__module__}.{type(args).__qualname__}", repr(args))
    if key not in _COUNTS:
        _COUNTS[key] = _count_parameters(args)
    return _COUNTS[key]


def _count_parameters(args) -> ParameterCounts:
    from llamatron.models import registry

    with torch.device("meta"):
        model = registry.family_of(args).build(args)
    seen: set[int] = set()

    def count(module, ndim=None) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen and (ndim is None or (p.ndim >= 2) == ndim):
                seen.add(id(p))
                n += p.numel()
        return n

    layers = len(model.layers)
    matrices = count(model.layers, ndim=True) / layers
    vectors = count(model.layers, ndim=False) / layers
    first = sum(count(getattr(model, name)) for name in model.first_stage)
    last = sum(count(getattr(model, name)) for name in model.last_stage)
    named = dict(model.named_parameters())
    tied = sum(named[n].numel() for n in model.tied_parameters) if getattr(model, "ties_first_last", False) else 0
    return ParameterCounts(matrices, vectors, first, last, sum(p.numel() for p in model.parameters()), tied)


def block_parameters(args) -> float:
    """Parameters of one block (the mean over blocks)."""
    counts = parameter_counts(args)
    return counts.block_matrices + counts.block_vectors


def estimate_memory(
    args,
    seq_len: int,
    micro_batch: int,
    *,
    dp_shard: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    pp_schedule: str = "1f1b",
    n_microbatches: int = 1,
    bf16: bool = True,
    fsdp: bool | None = None,
    activation_checkpointing: bool = False,
    checkpointed_layers: int | None = None,
    fused_cross_entropy: bool = True,
) -> MemoryEstimate:
    """Peak bytes per rank for one training step of the given layout (the largest over ranks)."""
    from llamatron.models import registry

    if fsdp is None:
        fsdp = dp_shard * cp > 1
    shard = dp_shard * cp if fsdp else 1
    layers = args.n_layers // pp
    counts = parameter_counts(args)
    block_tp = counts.block_matrices / tp + counts.block_vectors
    # The rank with most parameters: the first stage (embedding) or the last (output + final norm, or
    # its copy of a tied embedding); tensor parallelism splits the embedding and output by vocabulary.
    params = layers * block_tp + counts.ends(pp) / tp
    weights = 4 * params / shard
    gradients = 4 * params / shard
    optimizer = 8 * params / shard

    compute = 2 if bf16 else 4
    residual = 2 if (bf16 and fsdp) else 4  # FSDP casts parameters to bf16; autocast keeps fp32 ones
    if fsdp:
        gathered = (layers if pp > 1 else 2) * block_tp * (2 if bf16 else 4)
        if pp > 1:
            gathered += layers * block_tp * 4  # unsharded gradients kept until the last micro-batch
    else:
        gathered = 2 * params if bf16 else 0
    working = gathered

    tokens = micro_batch * seq_len / cp
    per_block = registry.family_of(args).activation_bytes_per_token(args, residual, compute) * tokens / tp
    if activation_checkpointing:
        n_ckpt = layers if checkpointed_layers is None else min(checkpointed_layers, layers)
        saved = n_ckpt * residual * args.dim * tokens / tp + (layers - n_ckpt) * per_block + per_block
    else:
        saved = layers * per_block
    in_flight = 1 if pp == 1 else (n_microbatches if pp_schedule == "gpipe" else min(pp, n_microbatches))
    activations = saved * in_flight

    vocab = args.vocab_size / tp
    if fused_cross_entropy and tp == 1 and pp == 1:
        logits = min(tokens, 8192) * vocab * 2 * compute
    else:
        logits = tokens * vocab * (compute + 4 + 4)
    return MemoryEstimate(weights, gradients, optimizer, working, activations, logits)
