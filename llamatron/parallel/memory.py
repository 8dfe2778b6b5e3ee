"""Memory a rank needs for training, estimated before any is allocated (printed by the trainer, used
by `llamatron plan`, and usable as a dry run: `estimate_memory(...)` needs no GPU).

The peak of a step is the end of the last micro-batch's forward, inside the loss: everything a forward
keeps for backward is alive, and the loss's buffers on top. Counted per rank, for the rank that holds
the most (the first pipeline stage for activations, the embedding; the last for the output layer):

- weights: fp32 master parameters, 4 bytes each, divided by tp (matrices only; not a MoE block's
  experts, which TP leaves whole, nor what the family's plan leaves whole at the ends,
  `Family.tp_whole_ends`: GPT's position embedding, GLaM's tied embedding) and by the FSDP shard degree dp_shard x cp (HSDP's replicas,
  dp_replicate, each hold a whole sharded copy); experts under expert parallelism too, by ep x
  (dp_shard / ep) (E/ep experts per rank, FSDP-sharded over the dp_shard / ep ranks holding them);
  LoRA's frozen linears stored in bf16 (`lora.base_dtype`) 2 bytes each, plus 2 more under FP8 (their
  two FP8 copies, transforms/fp8_frozen.py);
- gradients: fp32, the same division, of the trainable parameters only (LoRA: the adapters). With one
  micro-batch per step (and no pipeline) they appear only as backward frees the activations that made
  them, so what fits in the freed memory (`reused`) is not part of the peak;
- optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter, the same division; with
  `optim.name = adamw8bit` (torchao's AdamW8bit) 2.03 bytes (8-bit codes and an fp32 scale per block
  of 256 values) for the matrices, 8 for the norms' vectors (fp32 moments below its 4096-value
  threshold, where a sharded norm is; a whole one of 4096 or more is 8-bit too: a negligible overcount);
- working copies: what the compute runs on besides the masters. Under FSDP, the gathered parameters
  of the units in flight (two blocks, in the compute dtype; all of the stage's blocks under pipeline
  parallelism, which keeps them gathered across micro-batches, plus their unsharded gradients); under
  expert parallelism only this rank's E/ep experts of a block are gathered, or, where FSDP leaves
  them alone (ep = dp_shard, no replicas), every block's own experts cast to the compute dtype;
  without FSDP under bf16 autocast, the bf16 casts of the block matrices (the experts whole under
  TP), which backward keeps for the input gradients (eager and compiled alike; the embedding's lookup is not cast; LoRA's frozen
  linears stored in bf16 need none). FP8 layers (torchao's Float8Linear) keep their fp32 weight
  itself, so they have no bf16 copy. While the loss runs, the output weight in the compute dtype
  (autocast's cast or FSDP's gathered copy; the fused FP8 loss adds its two FP8 copies);
- activations: what autograd saves in each block for backward, per token of the local sequence
  (micro_batch x seq_len / cp, and / tp for the sequence-parallel parts; not what TP leaves whole:
  a MoE block's, the gathered inputs of column-parallel linears, and without sequence parallelism
  (`Family.sequence_parallel`: GLaM) the residual stream; the logits whole where the family's plan
  does not split the vocabulary, `Family.tp_splits_vocab`; under CP the other ranks' keys and values,
  which torch's ring attention keeps for backward), counted by the model's family
  (`Family.activation_bytes_per_token`; Llama's in models/llama/cost.py) for how the block runs
  (`Saving`): eager, tensor by tensor; compiled (train.compile), what inductor's min-cut partitioner
  keeps, which recomputes the norms, rotary, SwiGLU products, casts and residual sums in backward and
  keeps a linear's input only where its weight gradient needs it (not for FP8 layers, which cast it
  again, nor for frozen ones); grouped-query attention with expanded K/V or native (the CUDA default).
  Times the blocks whose activations are alive at once: all of them, or with activation checkpointing
  only their inputs (r d) plus one block recomputed; under pipeline parallelism (1F1B) the first stage
  holds pp micro-batches in flight (interleaved: pp + (pp-1)/v-ish; counted as pp), GPipe all of them.
  LoRA adds each adapter's rank-wide hidden state (and with dropout the dropped input and its mask).
  Beyond the blocks: the final norm's input and normalised output (compiled, it keeps only the input for
  backward), and the output layer's input gradient (fused loss) or input (plain loss);
- logits: the loss's buffers at their peak. The fused cross-entropy (llamatron/loss.py): one chunk of
  8192 rows of logits and their gradient, the output weight's gradient (one chunk's product; over
  several chunks an fp32 accumulator, made from the first bf16 product beside the second), and the
  hidden states cast to the compute dtype; FP8 (`train.fp8_include_output`): bf16 logits, their E5M2
  gradient, and the token-major gradient of a group of loss.FP8_WGRAD_CHUNKS chunks; fp32 weight
  gradients. The plain loss: the whole logits' fp32
  log-softmax and, as its backward starts, the NLL's and log-softmax's fp32 gradients;
- backward: the first block's backward, once the loss's buffers are gone (its FFN's three gradients;
  with one micro-batch per step the output weight's new gradient): the total takes it or the loss's
  buffers, whichever is larger.

`saved` (not a part of the total) is what autograd keeps from a forward to its backward: what
tests/test_plan.py counts on compiled and eager CPU models. docs/planner.md compares the total with
every measured single-GPU peak. Not modelled: allocator fragmentation (the measured peaks are
`max_memory_allocated`, without it), communication buffers, the CUDA context and cuDNN's workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatron.loss import FP8_WGRAD_CHUNKS
from llamatron.models.family import Saving

GiB = 2**30
FUSED_LOSS_ROWS = 8192  # llamatron/loss.py's chunk on a GPU


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    working: float
    activations: float
    logits: float
    # Of the gradients, what is allocated only as backward frees the activations, loss buffers and
    # weight copies (one micro-batch per step, no pipeline): not there at the peak, so not in the total.
    reused: float = 0.0
    # The first block's backward, once the loss's buffers are gone: its FFN's gradients (and, with one
    # micro-batch per step, the output weight's new gradient). The total counts it or the loss's
    # buffers (`logits`), whichever is larger: they are never alive together.
    backward: float = 0.0
    # Not a part of the total but a view across it: what autograd keeps from the end of a forward to
    # its backward (the activations, the weights' compute-dtype copies, the loss's saved gradients).
    saved: float = 0.0

    @property
    def total(self) -> float:
        parts = self.weights + self.gradients + self.optimizer + self.working + self.activations
        return parts + max(self.logits, self.backward) - self.reused

    def as_dict(self) -> dict[str, float]:
        keys = ("weights", "gradients", "optimizer", "working", "activations", "logits", "backward", "total")
        return {k: getattr(self, k) for k in keys}

    def describe(self) -> str:
        unit, scale = ("GiB", GiB) if self.total >= GiB / 10 else ("MiB", 2**20)
        parts = [f"{k} {v / scale:.2f}" for k, v in self.as_dict().items()]
        if self.reused:
            parts[1] += f" ({self.reused / scale:.2f} of them in memory backward frees)"
        return ", ".join(parts) + f" {unit}"


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
    # Block linears (paths inside a block) whose weight has a gradient or that carry an adapter: those
    # whose input backward needs (`Saving.weight_grad_inputs`).
    grad_linears: frozenset[str] = frozenset()

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
    # A mixture of experts' grouped GEMMs in FP8 (train.fp8_experts): per block (mean) the expert
    # weights one token runs through (top_k of E), and their paths ("feed_forward.experts.w1"). Not in
    # block_params: their bf16 column-major copy is kept for backward like autocast's cast.
    expert_active_params: float = 0.0
    expert_names: frozenset[str] = frozenset()


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
    from torch import nn

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

    grad_linears = frozenset(name for block in model.layers.values() for name, m in block.named_modules()
                             if isinstance(m, nn.Linear) and (m.weight.requires_grad or isinstance(m, LoRALinear)))
    named = dict(model.named_parameters())
    tied = [named[n] for n in getattr(model, "tied_parameters", ())] if getattr(model, "ties_first_last", False) else []
    return ParameterCounts(
        matrices, vectors, first, last, sum(p.numel() for p in model.parameters()), trainable, first_t, last_t,
        experts, sum(p.numel() for p in tied), sum(m.rank for m in adapted) / layers,
        sum(m.in_features for m in adapted) / layers, sum(p.numel() for p in tied if p.requires_grad),
        frozen_linear(model.layers) / layers, sum(frozen_linear(getattr(model, name)) for name in model.last_stage),
        grad_linears)


def fp8_counts(args, min_features: int = 1024, include_output: bool = False, experts: bool = True) -> Fp8Counts:
    key = ("fp8", *_args_key(args), min_features, include_output, experts)
    if key not in _COUNTS:
        from torch import nn

        from llamatron.transforms.fp8 import apply_fp8_experts, fp8_module_filter

        model = _meta_model(args)
        keep = fp8_module_filter(min_features, include_output)
        layers = len(model.layers)
        converted = [(name, m) for name, m in model.layers.named_modules() if name and keep(m, f"layers.{name}")]
        output = [m for name, m in model.named_modules() if name == "output" and isinstance(m, nn.Linear) and keep(m, name)]
        grouped = apply_fp8_experts(model.layers, min_features, load_kernels=False) if experts else []  # throwaway model
        share = getattr(args, "top_k", 0) / max(1, getattr(args, "n_experts", 1))
        active = share * sum(p.numel() for name in grouped for p in model.layers.get_submodule(name).parameters())
        _COUNTS[key] = Fp8Counts(sum(m.weight.numel() for _, m in converted) / layers,
                                 frozenset(name.split(".", 1)[1] for name, _ in converted), bool(output),
                                 sum(m.weight.numel() for m in output), active / layers,
                                 frozenset(f"{name.split('.', 1)[1]}.{w}" for name in grouped for w in ("w1", "w2")))
    return _COUNTS[key]


def _bf16_frozen_base(weights, working, counts, layers, pp, compute, f8) -> tuple[float, float]:
    """LoRA's frozen linears stored in bf16 (transforms/lora.py, frozen_dtype): 2 bytes, and no autocast
    copy; under train.fp8 (`f8`) two FP8 copies more of the block linears (transforms/fp8_frozen.py)."""
    last = counts.last_linear_frozen if pp == 1 or counts.last + counts.tied >= counts.first else 0
    weights -= 2 * (layers * counts.block_linear_frozen + last)
    working -= compute * layers * counts.block_linear_frozen
    if f8 is not None:
        weights += 2 * layers * f8.block_params
    return weights, working


def compiles_whole(args) -> bool:
    """Whether every block compiles as one graph (`compile_fullgraph`, llamatron/transforms/compile.py).
    GLaM's MoE blocks do with capacity routing; dropless routing and an expert-parallel dispatch break
    the graph (data-dependent shapes), and then ran 4x slower compiled (docs/performance.md)."""
    key = ("fullgraph", *_args_key(args))
    if key not in _COUNTS:
        _COUNTS[key] = all(getattr(b, "compile_fullgraph", True) for b in _meta_model(args).layers.values())
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
    compiled: bool = False,
    native_gqa: bool = False,
    optim: str = "adamw",
    bf16_residual: bool = False,
    cast_once: bool = False,
) -> MemoryEstimate:
    """Peak bytes per rank for one training step of the given layout (the largest over ranks). `lora`: the
    `[lora]` section (rank 0 or None: full training); `fp8`: train.fp8; `compiled`: train.compile (blocks
    compiled by inductor); `native_gqa`: SDPA's enable_gqa path (models/attention_ops.py: CUDA's default);
    `optim`: optim.name; `bf16_residual`: train.bf16_residual (transforms/residual.py); `cast_once`:
    train.cast_weights_once as the trainer resolved it (its copies kept between steps, checkpointed or not;
    E4M3 ones for FP8 layers)."""
    fsdp = dp_replicate * dp_shard * cp > 1 if fsdp is None else fsdp
    shard = dp_shard * cp if fsdp else 1
    layers = args.n_layers // pp
    counts = parameter_counts(args, lora)
    compute = 2 if bf16 else 4
    stream, residual = _stream_bytes(bf16, fsdp, bf16_residual, compiled)
    expert_fsdp = ep > 1 and (dp_shard // ep > 1 or dp_replicate > 1)  # llamatron/parallel/dims.py's expert_fsdp
    vtp, stp, whole = _tp_splits(args, tp)
    weights, gradients, optimizer, working = _states(counts, layers, pp, tp, shard, ep, expert_fsdp, fsdp, compute, bf16,
                                                     STATE_BYTES[optim], whole)
    f8 = fp8_counts(args, fp8_min_features, fp8_include_output) if fp8 != "none" and bf16 else None
    weights, working, f8, lora_on, bf16_base = _lora_and_fp8_copies(
        lora, counts, f8, weights, working, layers=layers, pp=pp, tp=tp, compute=compute, bf16=bf16,
        fsdp=fsdp, cast_once=cast_once)
    fused = fused_cross_entropy and tp == 1 and pp == 1
    fp8_output = f8 is not None and f8.output

    tokens = micro_batch * seq_len / cp
    kept = counts.grad_linears - (f8.block_names if f8 is not None else frozenset())
    saving = Saving(compiled, native_gqa, kept, seq_len // cp, micro_batch, tp, norm_grads=not lora_on)
    per_block = _per_token(args, counts, lora, residual, compute, saving, cp) * tokens / tp
    in_flight = 1 if pp == 1 else (n_microbatches if pp_schedule == "gpipe" else min(pp, n_microbatches))
    n_ckpt = (layers if checkpointed_layers is None else min(checkpointed_layers, layers)) if activation_checkpointing else 0
    # Of the blocks not checkpointed (cast once: all, the copies outlive the step)
    casts_kept = 0.0 if fsdp else working * (layers - (0 if cast_once else n_ckpt)) / layers
    kept_acts, activations, working = _checkpointed(per_block * in_flight, stream * args.dim * tokens / stp * in_flight,
                                                    layers, n_ckpt, working, compiled and not fsdp and not cast_once)
    logits = _loss_bytes(args, tokens, vtp, compute, fused, fp8_output, autocast=bf16 and not fsdp)
    saved, reused = kept_acts + casts_kept, 0.0
    # A gated FFN's backward holds the gradients of its gate, its up projection and their product (a
    # family whose args name no FFN width: 4 d, the usual).
    backward = 3 * compute * getattr(args, "ffn_dim", 4 * args.dim) * tokens / tp
    if pp == 1:  # the rank with the output layer is also the one with the most activations
        head = ((4 + stream) / stp + compute) * args.dim * tokens  # final norm; the output's (gathered) input
        activations += head
        norm_out = 4 / stp * args.dim * tokens if compiled else 0.0  # compiled, the final norm keeps its input only
        saved += head - norm_out + _loss_saved(args, tokens, vtp, compute, fused, fp8_output)
        if not (bf16_base and counts.last_linear_frozen):  # a frozen bf16 output weight is used as it is
            working += _output_copy(args, vtp, compute, bf16, fused, fp8_output, fsdp)
        if n_microbatches == 1:
            # No accumulation: each gradient is allocated as backward frees what made it, and at the end
            # of backward the activations, loss buffers and weight copies are gone.
            reused = min(gradients, working + activations + logits)
            backward += 4 * args.vocab_size * args.dim / vtp / shard if counts.last_trainable else 0.0
    return MemoryEstimate(weights, gradients, optimizer, working, activations, logits, reused, backward, saved)


def _lora_and_fp8_copies(lora, counts: ParameterCounts, f8, weights: float, working: float, *, layers: int,
                         pp: int, tp: int, compute: int, bf16: bool, fsdp: bool, cast_once: bool):
    """LoRA's bf16 frozen bases and the FP8 layers' weight copies: (weights, working copies, the FP8 counts
    or None under LoRA, LoRA on, bf16 frozen base)."""
    lora_on = bool(lora is not None and _lora_key(lora))
    bf16_base = lora_on and bf16 and not fsdp and tp == 1 and lora.base_dtype != "fp32"
    if bf16_base:
        weights, working = _bf16_frozen_base(weights, working, counts, layers, pp, compute, f8)
    if lora_on:
        f8 = None  # no Float8Linear under LoRA; under FSDP its frozen layers cast the gathered weights
    if f8 is not None and not fsdp:  # Float8Linear keeps no bf16 cast of its weight (cast once: an E4M3 one)
        working -= (compute - (1 if cast_once else 0)) * layers * f8.block_params / tp
    return weights, working, f8, lora_on, bf16_base


def _checkpointed(per_block: float, block_input: float, layers: int, n_ckpt: int, working: float,
                  compiled_casts: bool) -> tuple[float, float, float]:
    """(kept to backward, activations at the peak, weight copies) with n_ckpt of the layers checkpointed.
    A checkpointed block keeps its input; backward recomputes one block at a time. Of autocast's weight
    copies, backward keeps those of the blocks not checkpointed. Compiled (`compiled_casts`), a
    checkpointed block's cast is a temporary of its graph, one block's at a time; eager, autocast's
    cache keeps every copy until the forward ends (the peak then, with the blocks' inputs): all counted."""
    kept = n_ckpt * block_input + (layers - n_ckpt) * per_block
    if n_ckpt and compiled_casts:
        working -= working * (n_ckpt - 1) / layers
    return kept, kept + (per_block if n_ckpt else 0.0), working


def _stream_bytes(bf16: bool, fsdp: bool, bf16_residual: bool, compiled: bool) -> tuple[int, int]:
    """Bytes a value of the residual stream between blocks (fp32 under autocast over fp32 weights
    unless train.bf16_residual; bf16 with FSDP's bf16 weights), and of what a block keeps of it: eager,
    the norms also keep their fp32 upcasts of a bf16 stream (measured: tests/test_plan.py), so only
    compiled blocks and FSDP's keep 2 bytes."""
    stream = 2 if bf16 and (fsdp or bf16_residual) else 4
    return stream, stream if fsdp or compiled else 4


def _per_token(args, counts: ParameterCounts, lora, residual: int, compute: int, saving: Saving, cp: int = 1) -> float:
    """Bytes one block saves for backward per token: the family's count, the LoRA adapters', and
    under context parallelism the other CP ranks' keys and values: torch's ring attention (all-gather
    rotation) keeps the whole sequence's K and V for backward, cp - 1 chunks beside this rank's own
    (seen on rank 0 of a fake two-rank group, tests/test_plan.py)."""
    from llamatron.models import registry

    family = registry.family_of(args)
    per_token = family.activation_bytes_per_token(args, residual, compute, saving)
    per_token += compute * counts.lora_rank
    if lora is not None and counts.lora_rank and lora.dropout > 0:
        per_token += (compute + 1) * counts.lora_inputs  # the dropped input and its mask, per adapter
    if cp > 1 and family.shapes is not None:
        shapes = family.shapes(args)
        per_token += 2 * compute * (shapes.kv_heads if saving.native_gqa else shapes.heads) * shapes.head_dim * (cp - 1)
    return per_token


def _loss_bytes(args, tokens: float, tp: int, compute: int, fused: bool, fp8_output: bool, autocast: bool) -> float:
    """The loss's buffers at their peak (llamatron/loss.py): fused, one chunk of logits and its
    gradient, the output weight's gradient (one chunk's product; with several chunks an fp32
    accumulator, which the second chunk makes from the first's bf16 product beside the new one), and
    the hidden states cast to the compute dtype; unfused, at the start of its backward, the whole
    logits' fp32 log-softmax (saved), the NLL's gradient and log-softmax's input gradient (fp32 each;
    the compute-dtype logits are gone once cast)."""
    vocab = args.vocab_size / tp
    if not fused:
        return tokens * vocab * 12
    rows = min(tokens, FUSED_LOSS_ROWS)
    several = tokens > rows
    cast = compute * tokens * args.dim if autocast else 0.0
    if fp8_output:  # bf16 logits and their E5M2 gradient, the group's token-major one; fp32 weight gradients
        group = min(tokens, FP8_WGRAD_CHUNKS * rows)
        return cast + rows * vocab * (compute + 1) + group * vocab + 4 * vocab * args.dim * (2 if several else 1)
    grad_w = (2 * compute + 4) if several and compute != 4 else compute
    return cast + 2 * rows * vocab * compute + grad_w * vocab * args.dim


def _loss_saved(args, tokens: float, tp: int, compute: int, fused: bool, fp8_output: bool) -> float:
    """What the loss keeps for backward: fused, the output weight's gradient (compute dtype from one
    chunk, fp32 accumulated over several or from FP8 GEMMs); unfused, the fp32 log-softmax."""
    vocab = args.vocab_size / tp
    if not fused:
        return 4 * tokens * vocab
    fp32 = fp8_output or tokens > min(tokens, FUSED_LOSS_ROWS)
    return (4 if fp32 else compute) * vocab * args.dim


def _output_copy(args, tp: int, compute: int, bf16: bool, fused: bool, fp8_output: bool, fsdp: bool) -> float:
    """The output weight in the compute dtype while the loss runs (autocast's cast or FSDP's gathered
    copy); in the fused FP8 loss its FP8 copies (and their transpose), cast from the weight as it is
    (FSDP's gathered copy besides). An unfused FP8 output layer is a Float8Linear, which casts its fp32
    weight per GEMM instead."""
    if not bf16:
        return 0.0
    out = args.vocab_size * args.dim / tp
    if fp8_output:
        return out * (2 + (compute if fsdp else 0)) if fused else (compute * out if fsdp else 0.0)
    return compute * out


def _tp_splits(args, tp: int) -> tuple[int, int, int]:
    """What tensor parallelism divides by tp in the family's plan: the vocabulary (logits, the loss,
    the output weight), the residual stream between blocks (sequence parallelism), and the parameters
    of the ends it leaves whole (`Family.tp_whole_ends`)."""
    from llamatron.models import registry

    family = registry.family_of(args)
    vtp = tp if family.tp_splits_vocab else 1
    stp = tp if family.sequence_parallel else 1
    return vtp, stp, family.tp_whole_ends(args) if tp > 1 else 0


# Bytes of optimizer state per trainable matrix parameter, by optim.name: AdamW's two moments in fp32,
# or torchao's 8-bit codes with one fp32 scale per block of 256 values.
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256)}


def _states(counts: ParameterCounts, layers: int, pp: int, tp: int, shard: int, ep: int, expert_fsdp: bool,
            fsdp: bool, compute: int, bf16: bool, state_bytes: float = 8.0,
            whole_ends: float = 0.0) -> tuple[float, float, float, float]:
    """Weights, gradients, optimizer state and working copies of the rank with the most parameters:
    the first stage (embedding) or the last (output + final norm, or its copy of a tied embedding);
    tensor parallelism splits the embedding and output by vocabulary, all but `whole_ends` parameters
    (`Family.tp_whole_ends`)."""
    experts = counts.block_experts
    block = (counts.block_matrices - experts) / tp + experts + counts.block_vectors
    ends, ends_trainable = counts.ends(pp), counts.ends_trainable(pp)
    def split(n: float) -> float:
        return (n - min(n, whole_ends)) / tp + min(n, whole_ends)

    params = layers * block + split(ends)
    stored = params / shard  # experts as well: ep x (dp_shard / ep), and expert parallelism has cp 1
    full = counts.block_trainable >= (counts.block_matrices + counts.block_vectors) * (1 - 1e-9)  # no LoRA
    trainable = stored if full else (layers * counts.block_trainable + split(ends_trainable)) / shard
    if fsdp:
        gathered_block = block if ep == 1 else block - experts + (experts / ep if expert_fsdp else 0.0)
        working = (layers if pp > 1 else 2) * gathered_block * compute
        if ep > 1 and not expert_fsdp:  # FSDP leaves them alone: autograd keeps their casts until backward
            working += layers * experts / ep * compute * bf16
        if pp > 1:  # unsharded gradients kept until the last micro-batch
            working += layers * (gathered_block if full else counts.block_trainable) * 4
    else:  # autocast's bf16 copies of the block matrices (the experts' whole), kept for backward (the output layer's: above)
        working = compute * layers * (block - counts.block_vectors) if bf16 else 0
    vectors = layers * counts.block_vectors / shard if full else 0.0  # norms: counted with fp32 moments
    return 4 * stored, 4 * trainable, 8 * vectors + state_bytes * (trainable - vectors), working
