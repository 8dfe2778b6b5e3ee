"""Memory a rank needs for training, estimated before any is allocated (printed by the trainer, and
usable as a dry run: `estimate_memory(...)` needs no GPU).

Counted per rank, for the rank that holds the most (the first pipeline stage for activations, the
embedding; the last for the output layer):

- weights: fp32 master parameters, 4 bytes each, divided by tp (matrices only; not a MoE block's
  experts, which TP leaves whole) and by the FSDP shard degree dp_shard x cp (HSDP's replicas,
  dp_replicate, each hold a whole sharded copy); experts under expert parallelism too, by ep x
  (dp_shard / ep) (E/ep experts per rank, FSDP-sharded over the dp_shard / ep ranks holding them);
- gradients: fp32, the same division, of the trainable parameters only (LoRA: the adapters);
- optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter, the same division;
- working copies: what the compute runs on besides the masters. Under FSDP, the gathered parameters
  of the units in flight (two blocks, in the compute dtype; all of the stage's blocks under pipeline
  parallelism, which keeps them gathered across micro-batches, plus their unsharded gradients); under
  expert parallelism only this rank's E/ep experts of a block are gathered, or, where FSDP leaves
  them alone (ep = dp_shard, no replicas), every block's own experts cast to the compute dtype;
  without FSDP under bf16 autocast, the bf16 casts of all weights, which autograd keeps until
  backward (LoRA's frozen linears stored in bf16, `lora.base_dtype`, have no copy and 2 bytes each). FP8 layers (torchao's Float8Linear) save their fp32 weight itself for backward, not a
  cast (under FSDP, the gathered copy FSDP frees and gathers again), so they have no bf16 copy;
- activations: what autograd saves in each block for backward, per token of the local sequence
  (micro_batch x seq_len / cp, and / tp for the sequence-parallel parts), counted tensor by tensor
  by the model's family (`Family.activation_bytes_per_token`; Llama's in models/llama/cost.py),
  times the blocks whose activations are alive at once: all of them, or with activation
  checkpointing only their inputs (r d) plus one block recomputed; under pipeline parallelism
  (1F1B) the first stage holds pp micro-batches in flight (interleaved: pp + (pp-1)/v-ish; counted
  as pp), GPipe all of them. FP8 layers save their input in the compute dtype, as BF16 ones (they cast
  to FP8 again in backward), so FP8 changes no activation; LoRA adds each adapter's rank-wide hidden
  state (and with dropout the dropped input and its mask);
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
    `first`; `tied` of them the last pipeline stage holds a copy of. With LoRA the adapters are
    included, and `*_trainable` count what has a gradient."""

    block_matrices: float
    block_vectors: float
    first: int
    last: int
    total: int
    block_trainable: float = 0.0
    first_trainable: int = 0
    last_trainable: int = 0
    block_experts: float = 0.0  # of the block's parameters, those expert parallelism shards (mean)
    tied: int = 0  # parameters the output layer shares with the embedding (copied to the last stage)
    lora_rank: float = 0.0  # the adapters' ranks summed over a block (mean): their hidden width
    lora_inputs: float = 0.0  # the adapted layers' input widths summed over a block (mean)
    tied_trainable: int = 0
    block_linear_frozen: float = 0.0  # with LoRA, the frozen nn.Linear weights and biases per block (mean)
    last_linear_frozen: int = 0  # and in the last stage's modules (the output layer)

    def ends(self, pp: int) -> int:
        """The first and last stage's modules on one rank (pp 1), else those of the larger end."""
        return self.first + self.last if pp == 1 else max(self.first, self.last + self.tied)

    def ends_trainable(self, pp: int) -> int:
        if pp == 1:
            return self.first_trainable + self.last_trainable
        return max(self.first_trainable, self.last_trainable + self.tied_trainable)


@dataclass(frozen=True)
class Fp8Counts:
    """What FP8 converts (llamatron/transforms/fp8.py's filter on the real modules): per block (mean)
    the converted weights' parameters and their module paths, and whether the output layer goes."""

    block_params: float
    block_names: frozenset[str]  # module paths inside a block ("attention.wq")
    output: bool
    output_params: int


_COUNTS: dict[tuple, object] = {}


def _args_key(args) -> tuple[str, str]:
    return (f"{type(args).__module__}.{type(args).__qualname__}", repr(args))


def _lora_key(lora) -> tuple | None:
    if lora is None or not getattr(lora, "rank", 0):
        return None
    return (lora.rank, float(lora.dropout), tuple(lora.targets))


def parameter_counts(args, lora=None) -> ParameterCounts:
    """Cached per shape: building even a meta-device 405B takes a quarter of a second, and the planner
    asks for thousands of layouts. `lora`: a `[lora]` section (rank 0 or None: no adapters)."""
    key = ("counts", *_args_key(args), _lora_key(lora))
    if key not in _COUNTS:
        _COUNTS[key] = _count_parameters(args, lora if _lora_key(lora) else None)
    return _COUNTS[key]


def _meta_model(args, lora=None):
    from llamatron.models import registry

    family = registry.family_of(args)
    with torch.device("meta"):
        model = family.build(args)
    if lora is not None:
        from llamatron.transforms.lora import apply_lora_config

        apply_lora_config(model, lora, family, seed=0)
    return model


def _count_parameters(args, lora) -> ParameterCounts:
    from llamatron.transforms.lora import LoRALinear

    model = _meta_model(args, lora)
    seen: set[int] = set()

    def count(module, ndim=None, trainable=False) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen and (ndim is None or (p.ndim >= 2) == ndim):
                if not trainable:
                    seen.add(id(p))
                if not trainable or p.requires_grad:
                    n += p.numel()
        return n

    layers = len(model.layers)
    trainable = count(model.layers, trainable=True) / layers
    first_t = sum(count(getattr(model, name), trainable=True) for name in model.first_stage)
    last_t = sum(count(getattr(model, name), trainable=True) for name in model.last_stage)
    matrices = count(model.layers, ndim=True) / layers
    vectors = count(model.layers, ndim=False) / layers
    first = sum(count(getattr(model, name)) for name in model.first_stage)
    last = sum(count(getattr(model, name)) for name in model.last_stage)
    # The experts expert parallelism shards: those llamatron/parallel/expert_parallel.py picks out.
    experts = sum(p.numel() for m in model.layers.modules()
                  if getattr(m, "dispatch", "absent") is None and hasattr(m, "experts")
                  for p in m.experts.parameters()) / layers
    adapted = [m for m in model.layers.modules() if isinstance(m, LoRALinear)]

    def frozen_linear(module) -> int:
        return sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)
                   for p in (m.weight, m.bias) if p is not None and not p.requires_grad) if lora else 0

    named = dict(model.named_parameters())
    tied = [named[n] for n in getattr(model, "tied_parameters", ())] if getattr(model, "ties_first_last", False) else []
    return ParameterCounts(
        matrices, vectors, first, last, sum(p.numel() for p in model.parameters()), trainable, first_t, last_t,
        experts, sum(p.numel() for p in tied), sum(m.rank for m in adapted) / layers,
        sum(m.in_features for m in adapted) / layers, sum(p.numel() for p in tied if p.requires_grad),
        frozen_linear(model.layers) / layers, sum(frozen_linear(getattr(model, name)) for name in model.last_stage))


def fp8_counts(args, min_features: int = 1024, include_output: bool = False) -> Fp8Counts:
    key = ("fp8", *_args_key(args), min_features, include_output)
    if key not in _COUNTS:
        from torch import nn

        from llamatron.transforms.fp8 import fp8_module_filter

        model = _meta_model(args)
        keep = fp8_module_filter(min_features, include_output)
        layers = len(model.layers)
        converted = [(name, m) for name, m in model.layers.named_modules() if name and keep(m, f"layers.{name}")]
        output = [m for name, m in model.named_modules() if name == "output" and isinstance(m, nn.Linear) and keep(m, name)]
        _COUNTS[key] = Fp8Counts(sum(m.weight.numel() for _, m in converted) / layers,
                                 frozenset(name.split(".", 1)[1] for name, _ in converted), bool(output),
                                 sum(m.weight.numel() for m in output))
    return _COUNTS[key]


def block_parameters(args) -> float:
    """Parameters of one block (the mean over blocks)."""
    counts = parameter_counts(args)
    return counts.block_matrices + counts.block_vectors


def estimate_memory(
    args,
    seq_len: int,
    micro_batch: int,
    *,
    dp_replicate: int = 1,
    dp_shard: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    pp_schedule: str = "1f1b",
    n_microbatches: int = 1,
    bf16: bool = True,
    fsdp: bool | None = None,
    activation_checkpointing: bool = False,
    checkpointed_layers: int | None = None,
    fused_cross_entropy: bool = True,
    lora=None,
    fp8: str = "none",
    fp8_min_features: int = 1024,
    fp8_include_output: bool = False,
) -> MemoryEstimate:
    """Peak bytes per rank for one training step of the given layout (the largest over ranks).
    `lora`: the `[lora]` section (rank 0 or None: full training); `fp8`: train.fp8."""
    from llamatron.models import registry

    if fsdp is None:
        fsdp = dp_replicate * dp_shard * cp > 1
    shard = dp_shard * cp if fsdp else 1
    layers = args.n_layers // pp
    counts = parameter_counts(args, lora)
    compute = 2 if bf16 else 4
    residual = 2 if (bf16 and fsdp) else 4  # FSDP casts parameters to bf16; autocast keeps fp32 ones
    expert_fsdp = ep > 1 and (dp_shard // ep > 1 or dp_replicate > 1)  # llamatron/parallel/dims.py's expert_fsdp
    weights, gradients, optimizer, working = _states(counts, layers, pp, tp, shard, ep, expert_fsdp, fsdp, compute, bf16)
    if lora is not None and _lora_key(lora) and bf16 and not fsdp and tp == 1 and lora.base_dtype != "fp32":
        # LoRA's frozen linears stored in bf16 (transforms/lora.py, frozen_dtype): 2 bytes, no cast copy.
        last = counts.last_linear_frozen if pp == 1 or counts.last + counts.tied >= counts.first else 0
        frozen = (layers * counts.block_linear_frozen + last) / tp
        weights -= 2 * frozen
        working -= compute * frozen
    if fp8 != "none" and bf16 and not fsdp:  # Float8Linear keeps no bf16 cast of its weight
        working -= compute * layers * fp8_counts(args, fp8_min_features, fp8_include_output).block_params / tp

    tokens = micro_batch * seq_len / cp
    per_token = registry.family_of(args).activation_bytes_per_token(args, residual, compute)
    per_token += compute * counts.lora_rank
    if lora is not None and counts.lora_rank and lora.dropout > 0:
        per_token += (compute + 1) * counts.lora_inputs  # the dropped input and its mask, per adapter
    per_block = per_token * tokens / tp
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


def _states(counts: ParameterCounts, layers: int, pp: int, tp: int, shard: int, ep: int, expert_fsdp: bool,
            fsdp: bool, compute: int, bf16: bool) -> tuple[float, float, float, float]:
    """Weights, gradients, optimizer state and working copies of the rank with the most parameters:
    the first stage (embedding) or the last (output + final norm, or its copy of a tied embedding);
    tensor parallelism splits the embedding and output by vocabulary."""
    experts = counts.block_experts
    block = (counts.block_matrices - experts) / tp + experts + counts.block_vectors
    ends, ends_trainable = counts.ends(pp), counts.ends_trainable(pp)
    params = layers * block + ends / tp
    stored = params / shard  # experts as well: ep x (dp_shard / ep), and expert parallelism has cp 1
    full = counts.block_trainable >= (counts.block_matrices + counts.block_vectors) * (1 - 1e-9)  # no LoRA
    trainable = stored if full else (layers * counts.block_trainable + ends_trainable / tp) / shard
    if fsdp:
        gathered_block = block if ep == 1 else block - experts + (experts / ep if expert_fsdp else 0.0)
        working = (layers if pp > 1 else 2) * gathered_block * compute
        if ep > 1 and not expert_fsdp:  # FSDP leaves them alone: autograd keeps their casts until backward
            working += layers * experts / ep * compute * bf16
        if pp > 1:  # unsharded gradients kept until the last micro-batch
            working += layers * (gathered_block if full else counts.block_trainable) * 4
    else:
        working = compute * params if bf16 else 0
    return 4 * stored, 4 * trainable, 8 * trainable, working
