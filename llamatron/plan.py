"""`llamatron plan`: which parallel layout to run a model with on N GPUs, and how fast it will be.

Every layout the config accepts for the model is enumerated (dp_replicate x dp_shard x tp x pp x cp = N,
expert parallelism for MoE families, pipeline virtual stages, activation checkpointing, micro batch,
FP8 on or off), its memory per rank estimated with `llamatron/parallel/memory.py` (what the trainer
prints; docs/parallelism.md compares it with measured peaks), and its step time with the cost model
below. The feasible ones are ranked by step time. What is model-specific comes from the family's record
(`llamatron/models/family.py`: FLOPs per token, the block's matrix products and attention shapes,
tensor-parallel divisibility), and the parameters from the model itself, built on the meta device.

The cost model (per optimizer step, per GPU; docs/planner.md has it with its sources). Compute, without a
calibration table (the fitted model):

    compute   = (model FLOPs (LoRA: llamatron/flops.py's LoRA formula) + recomputed block forwards under
                activation checkpointing, the FP8 layers' share / FP8_GEMM_SPEEDUP, + (tp - 1) x the
                FLOPs of the block products TP leaves whole: GLaM's routers and experts, which every
                TP rank computes for all its tokens) / N
                / (peak x eff(x)),  eff(x) = 0.6475 x / (x + 800),  x = micro_batch x seq / cp
                (least-squares fit to the 15 compiled BF16 single-GPU runs in docs/bench/: H100 and H200, the
                8B layer shape with 4 or 8 layers, micro batch 1 to 8). What it captures is the fixed cost of
                a micro-batch (weight casts, gradient accumulation, launches) against its tokens: context
                parallelism cuts the tokens per rank, tensor parallelism cuts both alike, so only cp enters x

and with a table measured by `llamatron plan --calibrate` (llamatron/calibration/), from the measured
pieces instead: each block GEMM (forward, input and weight gradient) at its shape, SDPA forward and
backward, the element-wise traffic of a block and of the loss at the measured copy bandwidth, and each
micro-batch's passes over the parameters (weight casts, gradient accumulation); the slowest pipeline stage
(the last: blocks + output layer) sets the pace. Document masking (packed fine-tuning batches,
`--document-tokens`) scales attention in both, FLOPs or timings, by the share of causal attention's work
it leaves (`Workload.attention_share`); the reported MFU keeps the spec's formula over the whole
sequence. Then, in both:

    TP        8 collectives per block and micro-batch (all-gather + reduce-scatter before/after attention and
                MLP, forward and backward; 12 with recomputation) of the micro-batch's activations, each
                (tp-1)/tp of them over NVLink, or over the network when tp spans nodes; not overlapped
    CP        K and V passed around the ring, cp-1 hops, forward and backward (3x); half of it exposed
    EP        4 all-to-alls per MoE block and micro-batch (dispatch and combine, forward and backward; 6 with
                recomputation) of the rows each token sends to its top-k experts, (ep-1)/ep of them; not overlapped
    FSDP      all-gather of the bf16 parameters forward and backward and reduce-scatter of the fp32 gradients
                (2 + 2 + 4 bytes per parameter of the stage; only trainable ones are reduced; under EP a
                rank's E/ep experts over the dp_shard/ep ranks holding the same ones, none where ep = dp_shard)
                per micro-batch (per step under pipelining, which keeps them gathered); HSDP adds the
                all-reduce of the gradient shard across replicas; overlapped with compute, only what exceeds
                it counts
    optimizer 11.6 ps per trainable parameter of the rank's shard (fused AdamW, measured on the H200; or the table's)
    PP        the schedule's bubble: the per-micro-batch time x (m + (pp-1)/v) for m micro-batches and v
                virtual stages (GPipe, 1F1B: v = 1), plus the stage-to-stage activation sends

Bandwidths are per GPU for collectives (bus bandwidth): 300 GB/s inside a node (NVLink), 40 GB/s across
nodes (400 Gb/s InfiniBand per GPU), or what `--calibrate` measured under torchrun on this node. A layout
fits when its estimate is below `margin` (0.9) of the GPU's memory: the estimate leaves out the allocator's
fragmentation, NCCL buffers and the CUDA context.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llamatron import flops
from llamatron.errors import LlamatronError
from llamatron.loss import FP8_WGRAD_CHUNKS
from llamatron.models.family import Saving
from llamatron.parallel.memory import STATE_BYTES, GiB, MemoryEstimate, compiles_whole, estimate_memory, fp8_counts, parameter_counts
from llamatron.transforms.weight_cast import pays, wanted

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
VIRTUAL_STAGES = (1, 2, 4)
EFF_MAX, EFF_HALF = 0.6475, 800.0  # eff(x) = EFF_MAX x / (x + EFF_HALF): see the module docstring
CP_EXPOSED = 0.5
FSDP_OVERLAP = 1.0  # the share of compute that FSDP's collectives can hide behind
# Fused AdamW + clipping over this rank's fp32 shard: 22.4 ms for 1.92B parameters in the H200 profile
# (docs/performance.md), i.e. 11.6 ps per parameter; memory-bound, so the same on an H100 within ~10%.
OPTIMIZER_S_PER_PARAM = 11.6e-12
# How much faster the GEMMs FP8 converts run, casts and scales included, from the step times of
# docs/performance.md: on the H200 "FP8 everywhere" (block linears + output layer, 84% of the 8B proxy's
# FLOPs) made the step 1.33x (micro 4), 1.35x (micro 8) and 1.37x (native GQA, micro 8) faster than BF16,
# i.e. 1/(0.16 + 0.84/g) = 1.33-1.37 for g = 1.42-1.47; the block linears alone (52%) 1.19x, g = 1.44
# (runs of 2026-12-01/02; the calibrated model's FP8 output layer has its own speedup below). On the H100,
# fitted by the calibrated model on the runs of docs/planner.md (block linears alone at micro 1 to 4, and
# with the output layer at micro 2 to 8 of the code of 2026-12-06, whose FP8 loss no longer copies its
# operands eagerly): g = 1.5. On the H200, fitted the same way on the runs of the code of 2026-12-06 22:00
# (the FP8 loss's kernels, the bf16 residual stream: micro 4 and 8, 1.39 and 1.36 s): g = 1.6; the runs
# before (above) gave 1.44, the figure other FP8 GPUs get.
FP8_GEMM_SPEEDUP = {"H100": 1.5, "H800": 1.5, "H200": 1.6}
FP8_GEMM_SPEEDUP_DEFAULT = 1.44
# train.fp8=rowwise against that (tensorwise) speedup: its casts take a scale per row and column of
# every operand, forward and backward, and its GEMMs scale per row. Fitted on the H100's two rowwise
# runs (docs/planner.md: 4 layers at micro 2 and 8 layers at micro 1, 2.012 s and 1.867 s against
# tensorwise's 1.846 s and 1.682 s); other GPUs: the same ratio.
FP8_ROWWISE_RELATIVE_SPEEDUP = 0.80
# LoRA's frozen FP8 base layers (llamatron/transforms/fp8_frozen.py: forward and input gradient, llamatron's
# own casts) against the trainable layers' speedup: fitted on the H200's LoRA run (docs/planner.md, micro 2,
# 0.765 s) when the H200's trainable figure was refitted to 1.6; 1.6 x 0.9 is the 1.44 that run fitted before.
FP8_FROZEN_RELATIVE_SPEEDUP = 0.90
# Calibrated compute (docs/planner.md, "The calibrated model"): bytes of element-wise traffic per byte a
# block saves for backward, fitted to the H200 profile of the 8B proxy (docs/performance.md: 241 ms of
# element-wise work at micro 4, of which 41 ms the loss and ~43 ms the weight casts and gradient
# accumulation, leaves 157 ms; at the 4.3 TB/s copy rate that is 675 GB for 137 GB saved: 4.9);
# bytes per logit of the fused loss (41 ms for 16.8G logits: ~10) and of the unfused one (bf16 logits,
# their fp32 copy and gradient); and bytes per parameter and micro-batch for the weight casts (fp32
# read, bf16 written) and the gradient accumulation (bf16 gradient cast to fp32 and added).
ELEMENTWISE_PER_SAVED_BYTE = 4.9
LOSS_BYTES_PER_LOGIT = {True: 10, False: 20}
PARAM_PASS_BYTES = 24
# With train.cast_weights_once the casts run once per step (fp32 read, bf16 written: 6 bytes a parameter)
# and each micro-batch adds its gradient in bf16 (18 of the 24); with train.gradient_accumulation_fusion
# too the GEMM's epilogue reads and writes the fp32 accumulator instead (8).
CAST_ONCE_BYTES, CAST_ONCE_MICRO_BYTES, FUSED_WGRAD_MICRO_BYTES = 6, 18, 8
FUSED_LOSS_ROWS = 8192  # llamatron/loss.py's chunk
# The fused loss's FP8 output layer (llamatron/loss.py) besides the BF16 loss's passes: each chunk's E5M2
# gradient copied token-major (1 byte read, 1 written per logit), and each weight-gradient GEMM after a
# micro-batch's first adding its fp32 product into the accumulator (12 bytes per output weight); one GEMM
# per loss.FP8_WGRAD_CHUNKS chunks.
FP8_LOSS_BYTES_PER_LOGIT, FP8_WGRAD_ADD_BYTES = 2, 12
# Its three GEMMs' FP8 speedup (tensorwise E4M3 x E4M3 and E5M2 x E4M3 at 8,192 x 4,096 x 128,256): what
# makes the calibrated model give the layer's time bench/bench_fp8_loss.py measured (H100, 2026-12-06,
# 65,536 tokens: 203-204 ms in FP8 against 321 in BF16, which the model gives as 315), its passes
# counted as above for the code measured (one weight-gradient GEMM and add per chunk then). Measured on
# the H100 only; the GPUs' FP8 GEMMs are the same Hopper kernels.
FP8_OUTPUT_GEMM_SPEEDUP = 1.84


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_flops: float = 989e12
    intra_node_bw: float = 300e9  # bytes/s per GPU, collectives inside a node
    inter_node_bw: float = 40e9  # bytes/s per GPU, collectives across nodes
    margin: float = 0.9  # usable share of the GPU's memory
    fp8: bool = False  # FP8 tensor cores (H100 and newer): FP8 layouts are enumerated
    fp8_speedup: float = FP8_GEMM_SPEEDUP_DEFAULT
    a2a_bw: float | None = None  # all-to-all inside a node; None = intra_node_bw
    p2p_bw: float | None = None  # pipeline sends inside a node; None = intra_node_bw
    latency: float = 0.0  # seconds per collective call (a calibration table's; 0 = not modelled)
    calibration: Any = None  # a llamatron.calibration.Table: compute from measured timings

    def bandwidth(self, span: int, kind: str = "collective") -> float:
        """Of a group of `span` consecutive ranks: NVLink if they share a node."""
        if span > self.gpus_per_node:
            return self.inter_node_bw
        return {"a2a": self.a2a_bw, "p2p": self.p2p_bw}.get(kind) or self.intra_node_bw


@dataclass(frozen=True)
class Layout:
    dp_shard: int
    tp: int
    pp: int
    cp: int
    virtual: int
    micro_batch: int
    activation_checkpointing: bool
    dp_replicate: int = 1
    ep: int = 1
    fp8: bool = False

    @property
    def schedule(self) -> str:
        return "interleaved1f1b" if self.virtual > 1 else "1f1b"

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fused_loss(self) -> bool:
        """The trainer's fused cross-entropy (llamatron/parallel/layout.py: not under TP or PP)."""
        return self.tp == 1 and self.pp == 1

    def describe(self) -> str:
        shard = (f"hsdp {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1
                 else f"fsdp {self.dp_shard}" if self.dp_shard > 1 else "")
        parts = [shard, f"ep {self.ep}" if self.ep > 1 else "", f"tp {self.tp}" if self.tp > 1 else "",
                 f"cp {self.cp}" if self.cp > 1 else "",
                 (f"pp {self.pp}" + (f" x{self.virtual} interleaved" if self.virtual > 1 else "")) if self.pp > 1 else ""]
        return " ".join(p for p in parts if p) or "1 GPU"

    def overrides(self, fp8_recipe: str = "tensorwise", fp8_output: bool = False) -> list[str]:
        """The [parallel] and [train] keys that select this layout (those at their default left out)."""
        out = [f"parallel.dp_shard={self.dp_shard}"]
        out += [f"parallel.{k}={getattr(self, k)}" for k in ("dp_replicate", "ep", "tp", "pp", "cp")
                if getattr(self, k) > 1]
        if self.pp > 1:
            out += [f"parallel.pp_virtual_stages={self.virtual}", f"parallel.pp_schedule={self.schedule}"]
        out.append(f"train.micro_batch_size={self.micro_batch}")
        out.append(f"train.activation_checkpointing={'true' if self.activation_checkpointing else 'false'}")
        if self.fp8:
            out.append(f"train.fp8={fp8_recipe}")
            if fp8_output and self.fused_loss:
                out.append("train.fp8_include_output=true")
        return out


@dataclass
class Workload:
    """What is planned: the model, its sequence and batch, and the transforms a config fixes."""

    model: str  # model.size
    family: Any
    args: Any
    seq_len: int
    global_batch: int
    lora: Any = None  # the [lora] section when rank > 0: frozen base, trainable adapters
    fp8: str | None = None  # None: enumerate off and on; else the config's train.fp8, fixed
    fp8_min_features: int = 1024
    fp8_output: bool = True  # FP8 layouts also run the output layer in FP8 (when the loss is fused)
    fp8_experts: bool = True  # train.fp8_experts: FP8 layouts run a MoE's grouped expert GEMMs in FP8 too
    finetune: bool = False  # finetune.data: no pipeline or context parallelism
    # Document masking (packed fine-tuning batches attend within each example): the mean number of
    # positions of a token's own document, sum(len_i^2) / sum(len_i) over a sequence's documents (the
    # padding run one of them: the mask lets it attend to itself); None = one document per sequence.
    document_tokens: float | None = None
    compile: bool = True  # train.compile: what the step-time model was fitted to, and the memory it estimates
    cast_weights_once: bool | None = False  # train.cast_weights_once: the weight casts once per step (None: as the trainer)
    gradient_accumulation_fusion: bool | None = False  # train.gradient_accumulation_fusion: fp32 accumulation in the GEMMs
    bf16_residual: bool = True  # train.bf16_residual (the default): the residual stream in bf16 (its saved bytes)
    optim: str = "adamw"  # optim.name: the optimizer state's bytes per parameter
    config: str | None = None  # the config file or preset the --set lines go with
    sets: list[str] = field(default_factory=list)  # overrides that make the workload from it

    @property
    def shapes(self):
        if self.family.shapes is None:
            raise LlamatronError(f"the {self.family.name} family gives no block shapes (Family.shapes): "
                                 "the planner cannot cost it")
        return self.family.shapes(self.args)

    def fp8_layers(self):
        return fp8_counts(self.args, self.fp8_min_features, self.fp8_output, self.fp8_experts)

    @property
    def attention_share(self) -> float:
        """The share of one-document causal attention's work that document masking leaves. Causal
        attention over documents of len_i tokens computes sum(len_i (len_i + 1) / 2) ~ sum(len_i^2) / 2
        query-key pairs per sequence, against seq^2 / 2 for one document; with sum(len_i) = seq that is
        sum(len_i^2) / seq^2 = document_tokens / seq."""
        if self.document_tokens is None:
            return 1.0
        return min(1.0, self.document_tokens / self.seq_len)


@dataclass
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds per step by cost

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GiB


@dataclass
class Plan:
    workload: Workload
    hardware: Hardware
    ranked: list[Estimate]  # feasible, fastest first
    tried: int
    smallest: Estimate | None  # the smallest-memory layout when none fits

    # The fields of older callers.
    model = property(lambda self: self.workload.model)
    args = property(lambda self: self.workload.args)
    seq_len = property(lambda self: self.workload.seq_len)
    global_batch = property(lambda self: self.workload.global_batch)

    def base_overrides(self) -> list[str]:
        """The model, sequence and batch keys the layouts were planned for (beside the config, if any)."""
        return list(self.workload.sets)


# --------------------------------------------------------------------------------------------------
# Enumeration


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def fp8_choices(w: Workload, hw: Hardware, tp: int) -> tuple[bool, ...]:
    """FP8 off and on where the config (train.fp8, tp) and the GPU allow it and a layer converts."""
    allowed = tp == 1
    if w.fp8 is not None:  # fixed by the config; FP8 with tensor parallelism is refused
        return (False,) if w.fp8 == "none" else (True,) if allowed else ()
    f8 = w.fp8_layers()
    possible = hw.fp8 and allowed and (f8.block_params > 0 or f8.expert_active_params > 0)
    return (False, True) if possible else (False,)


def layouts(w: Workload, hw: Hardware):
    """Every layout config validation accepts for this model, world size and batch."""
    for tp, cp, pp, replicate, shard, ep in _degrees(w, hw.gpus):
        dp = replicate * shard
        for virtual in (VIRTUAL_STAGES if pp > 1 else (1,)):
            if w.args.n_layers % (pp * virtual):
                continue
            for micro in MICRO_BATCHES:
                if w.global_batch % (micro * dp) or not _pipeline_ok(w.global_batch // (micro * dp), pp, virtual):
                    continue
                for fp8 in fp8_choices(w, hw, tp):
                    for ac in (False, True):
                        yield Layout(shard, tp, pp, cp, virtual, micro, ac, replicate, ep, fp8)


def _fixed(w: Workload) -> set[str]:
    """Parallel degrees that must stay 1: the family's and fine-tuning data's."""
    return set(w.family.unsupported_parallel) | ({"pp", "cp"} if w.finetune else set())


def _degrees(w: Workload, gpus: int):
    """(tp, cp, pp, dp_replicate, dp_shard, ep) with tp and cp powers of two dividing what they must,
    pp dividing the layers, and ep dividing both dp_shard and the experts, without cp or pp
    (config._validate_parallel)."""
    fixed, args, seq_len = _fixed(w), w.args, w.seq_len
    sizes = w.family.tp_divisible(args).values()
    experts = getattr(args, "n_experts", 0)
    for tp in _powers_of_two(gpus) if "tp" not in fixed else (1,):
        if any(size % tp for size in sizes) or seq_len % tp:
            continue
        for cp in _powers_of_two(gpus // tp) if "cp" not in fixed else (1,):
            if cp > 1 and seq_len % (2 * cp):
                continue
            for pp in range(1, gpus // (tp * cp) + 1) if "pp" not in fixed else (1,):
                if args.n_layers % pp or gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for replicate in (r for r in _powers_of_two(dp) if dp % r == 0):
                    shard = dp // replicate
                    expert_parallel = experts and cp == pp == 1
                    for ep in (e for e in range(1, shard + 1) if shard % e == 0 and experts % e == 0) if expert_parallel else (1,):
                        yield tp, cp, pp, replicate, shard, ep


def _pipeline_ok(micro_batches: int, pp: int, virtual: int) -> bool:
    """config._validate_batch's pipeline rules."""
    if pp == 1:
        return True
    rounds = max(1, micro_batches // pp)
    return micro_batches >= pp and (virtual == 1 or micro_batches % rounds == 0)


# --------------------------------------------------------------------------------------------------
# Estimates


def memory_of(w: Workload, lay: Layout) -> MemoryEstimate:
    """On GPUs, where SDPA reads grouped KV heads natively (llamatron/models/attention_ops.py)."""
    m = w.global_batch // (lay.micro_batch * lay.dp)
    cast, fuse = cast_once_of(w, lay, m)
    return estimate_memory(w.args, w.seq_len, lay.micro_batch, dp_replicate=lay.dp_replicate, dp_shard=lay.dp_shard,
                           tp=lay.tp, pp=lay.pp, cp=lay.cp, ep=lay.ep, pp_schedule=lay.schedule,
                           n_microbatches=max(m, 2) if fuse else m, bf16=True,
                           activation_checkpointing=lay.activation_checkpointing,
                           fused_cross_entropy=lay.fused_loss, lora=w.lora, fp8=_recipe(w) if lay.fp8 else "none",
                           fp8_min_features=w.fp8_min_features, fp8_include_output=w.fp8_output and lay.fused_loss,
                           compiled=w.compile, native_gqa=True, optim=w.optim, bf16_residual=w.bf16_residual,
                           cast_once=cast)


@dataclass(frozen=True)
class _Stage:
    """The parameters of the slowest pipeline stage's rank (the last: blocks + output), per tp rank."""

    layers: int
    params: float  # all of them
    trainable: float
    experts: float  # of them, the MoE blocks' experts (whole on every TP rank: the family's TP plan leaves them)


def _stage(w: Workload, lay: Layout) -> _Stage:
    counts = parameter_counts(w.args, w.lora)
    layers = w.args.n_layers // lay.pp
    ends, ends_t = counts.ends(lay.pp), counts.ends_trainable(lay.pp)
    experts = layers * counts.block_experts
    params = (layers * counts.block_matrices - experts + ends) / lay.tp + layers * counts.block_vectors + experts
    experts_t = experts if w.lora is None else 0.0  # LoRA freezes them
    trainable = (layers * counts.block_trainable - experts_t + ends_t) / lay.tp + experts_t
    return _Stage(layers, params, trainable, experts)


def _fp8_flops_per_token(w: Workload, lay: Layout) -> float:
    if not lay.fp8:
        return 0.0
    f8 = w.fp8_layers()
    gemms = 6 if w.lora is None else 4  # a frozen base (LoRA) has no weight-gradient GEMM
    # The experts' grouped GEMMs: FP8 under full training only (LoRA's frozen experts stay bf16).
    block = f8.block_params + (f8.expert_active_params if w.lora is None else 0.0)
    return gemms * (w.args.n_layers * block + (f8.output_params if lay.fused_loss else 0))


def _tp_whole_flops_per_token(w: Workload, lay: Layout) -> float:
    """FLOPs per token of the products tensor parallelism leaves whole (`Gemm.tp_split` False: GLaM's
    routers and experts; its output layer), forward, backward and any recomputed forward: what one TP rank does
    for its tokens, while the model's FLOPs count them once for the whole TP group."""
    per_weight = 4 + (2 if w.lora is None else 0) + (2 if lay.activation_checkpointing else 0)
    # A plan that leaves the vocabulary whole (GLaM's) runs the output layer whole on every TP rank too.
    output = 0 if w.family.tp_splits_vocab else (4 + (2 if w.lora is None else 0)) * w.args.vocab_size * w.args.dim
    return per_weight * w.args.n_layers * sum(g.k * g.n * g.rows * g.share for g in w.shapes.gemms
                                              if not g.tp_split) + output


def fitted_compute(w: Workload, lay: Layout, hw: Hardware) -> float:
    """Seconds of compute per step on one GPU: the fitted model of the module docstring."""
    args, seq_len = w.args, w.seq_len
    # Attention FLOPs per token are linear in the length attended over (every family's formula), so
    # document masking is the formula at seq x attention_share (the spec's MFU keeps seq: `evaluate`).
    attended = seq_len * w.attention_share
    per_token = flops.flops_per_token(args, attended, w.lora)  # LoRA: no weight gradients of the frozen base
    block_per_token = flops.flops_per_token(args, attended) - 6 * args.vocab_size * args.dim
    recompute = block_per_token / 3 if lay.activation_checkpointing else 0.0
    fp8 = _fp8_flops_per_token(w, lay) * (1 - 1 / fp8_speedup(w, hw))
    whole = (lay.tp - 1) * _tp_whole_flops_per_token(w, lay) if lay.tp > 1 else 0.0
    x = lay.micro_batch * seq_len / lay.cp
    eff = EFF_MAX * x / (x + EFF_HALF)
    return w.global_batch * seq_len * (per_token + recompute - fp8 + whole) / hw.gpus / (hw.peak_flops * eff)


def _recipe(w: Workload) -> str:
    """The FP8 recipe of the workload's FP8 layouts: the config's, or tensorwise (the default) where the
    planner enumerates FP8 off and on."""
    return w.fp8 if w.fp8 not in (None, "none") else "tensorwise"


def fp8_speedup(w: Workload, hw: Hardware) -> float:
    """How much faster the GEMMs FP8 converts run, by the workload's recipe and whether they train."""
    relative = FP8_ROWWISE_RELATIVE_SPEEDUP if _recipe(w) == "rowwise" else 1.0
    return hw.fp8_speedup * relative * (FP8_FROZEN_RELATIVE_SPEEDUP if w.lora is not None else 1.0)


def block_gemm_seconds(w: Workload, lay: Layout, hw: Hardware) -> dict[str, tuple[float, float]]:
    """Each block product's (forward, backward) seconds on one rank per micro-batch, from the table:
    rows = the micro-batch's tokens / cp (x top-k, spread over E / ep experts), n / tp where TP splits
    it; weighted by the share of blocks that have it."""
    table, fp8 = hw.calibration, frozenset()
    if lay.fp8:  # the FP8 layers are counted on a meta model, once per workload: only where asked
        f8 = w.fp8_layers()
        fp8 = f8.block_names | (f8.expert_names if w.lora is None else frozenset())  # LoRA's experts stay bf16
    tokens = lay.micro_batch * w.seq_len // lay.cp
    out = {}
    for g in w.shapes.gemms:
        groups = g.groups // lay.ep if g.groups > 1 else 1
        rows = max(1, round(tokens * g.rows * (lay.ep if g.groups > 1 else 1) / g.groups))
        n = max(1, g.n // lay.tp) if g.tp_split else g.n
        speed = fp8_speedup(w, hw) if g.name in fp8 else 1.0

        def seconds(op: str, g=g, groups=groups, rows=rows, n=n) -> float:  # experts: one batched GEMM
            return table.grouped(op, groups, rows, g.k, n) if g.groups > 1 else table.gemm(op, rows, g.k, n)

        fwd = g.share * seconds("fwd") / speed
        bwd = g.share * (seconds("dgrad") + (seconds("wgrad") if w.lora is None else 0.0)) / speed
        out[g.name] = (fwd, bwd)
    return out


def document_attention(w: Workload, seconds: tuple[float, float]) -> tuple[float, float]:
    """The table's causal (forward, backward) seconds under document masking. The table times whole
    causal calls; the document mask runs as a block-sparse kernel (flex_attention's BlockMask on CUDA)
    that skips the tiles with no query-key pair of one document and computes the rest at the causal
    call's rate, so the time scales with the unmasked area, `attention_share` (assumed: that kernel runs
    a tile as fast as the table's SDPA kernel). The tiles a document's edges cut (128 x 128) are
    computed whole, so short documents save less than this: in-order packing of 256-2,048-token
    examples into 4,096 positions (bench_finetune's) touches 0.39 of a causal call's tiles for an area
    share of 0.32 (counted by simulation), so the estimate leans short there."""
    share = w.attention_share
    return seconds[0] * share, seconds[1] * share


def calibrated_compute(w: Workload, lay: Layout, hw: Hardware, m: int) -> float:
    """Seconds of compute per step on the slowest stage's rank, from the measured timings of
    `hw.calibration` (docs/planner.md, "The calibrated model")."""
    table, args, shapes = hw.calibration, w.args, w.shapes
    stage = _stage(w, lay)
    tokens = lay.micro_batch * w.seq_len // lay.cp
    trainable = w.lora is None
    gemms = block_gemm_seconds(w, lay, hw).values()
    fwd, bwd = sum(f for f, _ in gemms), sum(b for _, b in gemms)
    heads = max(1, shapes.heads // lay.tp)
    attn_f, attn_b = document_attention(w, table.attention(lay.micro_batch, heads, w.seq_len // lay.cp, w.seq_len,
                                                           shapes.head_dim, shapes.attention_mask,
                                                           shapes.attention_kernel))
    saved = w.family.activation_bytes_per_token(args, 2, 2, Saving(tp=lay.tp)) * tokens / lay.tp
    elementwise = (w.family.elementwise_per_saved_byte or ELEMENTWISE_PER_SAVED_BYTE) * saved / table.bandwidth()
    block = fwd + bwd + attn_f + attn_b + elementwise
    if lay.activation_checkpointing:
        block += fwd + attn_f + elementwise / 3
    rows = min(tokens, FUSED_LOSS_ROWS) if lay.fused_loss else tokens
    chunks = tokens / rows
    vocab = max(1, args.vocab_size // (lay.tp if w.family.tp_splits_vocab else 1))  # GLaM: whole logits per rank
    fp8_output = lay.fp8 and lay.fused_loss and w.fp8_layers().output
    out_speed = FP8_OUTPUT_GEMM_SPEEDUP if fp8_output else 1.0
    output = chunks * (table.gemm("fwd", rows, args.dim, vocab) + table.gemm("dgrad", rows, args.dim, vocab)
                       + (table.gemm("wgrad", rows, args.dim, vocab) if trainable else 0.0)) / out_speed
    loss = tokens * vocab * LOSS_BYTES_PER_LOGIT[lay.fused_loss] / table.bandwidth()
    if fp8_output:
        adds = max(0, math.ceil(chunks / FP8_WGRAD_CHUNKS) - 1) * FP8_WGRAD_ADD_BYTES * vocab * args.dim
        loss += (tokens * vocab * FP8_LOSS_BYTES_PER_LOGIT + (adds if trainable else 0)) / table.bandwidth()
    return m * (stage.layers * block + output + loss) + parameter_passes(w, stage.params, m, lay) / table.bandwidth()


def cast_once_of(w: Workload, lay: Layout | None, m: int) -> tuple[bool, bool]:
    """(cast once, fused weight gradients) of `w` on `lay` with `m` micro-batches a step: the config's, and
    where it leaves them unset (None), the trainer's choice (weight_cast.wanted): on for one GPU, several
    micro-batches, no activation checkpointing or LoRA."""
    on = lay is not None and pays(cuda=True, autocast=True, world_size=lay.dp * lay.tp * lay.pp * lay.cp * lay.ep,
                                  accum=m, activation_checkpointing=lay.activation_checkpointing,
                                  lora=w.lora is not None, fp8=_recipe(w) if lay.fp8 else "none")
    return wanted(w.cast_weights_once, w.gradient_accumulation_fusion, on)


def parameter_passes(w: Workload, params: float, m: int, lay: Layout | None = None) -> float:
    """Bytes of the weight casts and the gradient accumulation in a step of `m` micro-batches (`cast_once_of`)."""
    cast, fuse = cast_once_of(w, lay, m)
    if not cast:
        return m * PARAM_PASS_BYTES * params
    micro = FUSED_WGRAD_MICRO_BYTES if fuse else CAST_ONCE_MICRO_BYTES
    return CAST_ONCE_BYTES * params + m * micro * params


def step_time(w: Workload, lay: Layout, hw: Hardware) -> dict[str, float]:
    """Seconds per optimizer step, by cost (the module docstring's model)."""
    m = w.global_batch // (lay.micro_batch * lay.dp)  # micro-batches per rank and step
    compute = calibrated_compute(w, lay, hw, m) if hw.calibration is not None else fitted_compute(w, lay, hw)
    stage, shapes, args = _stage(w, lay), w.shapes, w.args
    tokens = lay.micro_batch * w.seq_len / lay.cp
    activation = tokens * args.dim * 2  # bf16 bytes of one block's input
    tp = cp = ep = 0.0
    if lay.tp > 1:
        calls = m * stage.layers * (12 if lay.activation_checkpointing else 8)
        tp = calls * (activation * (lay.tp - 1) / lay.tp / hw.bandwidth(lay.tp) + hw.latency)
    if lay.cp > 1:
        kv = 2 * tokens * shapes.kv_heads * shapes.head_dim * 2 / lay.tp
        cp = CP_EXPOSED * m * stage.layers * 3 * (kv * (lay.cp - 1) / hw.bandwidth(lay.cp * lay.tp) + hw.latency)
    if lay.ep > 1:
        calls = m * stage.layers * (6 if lay.activation_checkpointing else 4)
        sent = shapes.moe_rows() * activation * (lay.ep - 1) / lay.ep
        ep = calls * (sent / hw.bandwidth(lay.ep, "a2a") + hw.latency)
    fsdp = max(0.0, _fsdp_comm(w, lay, hw, stage, m) - FSDP_OVERLAP * compute)
    per_stage = compute + tp + cp + ep  # this rank's stage, all its micro-batches
    pp = p2p = 0.0
    if lay.pp > 1:
        pp = per_stage / m * (lay.pp - 1) / lay.virtual
        p2p = m * 2 * lay.virtual * (activation / lay.tp / hw.bandwidth(hw.gpus, "p2p") + hw.latency)
    seconds_per_param = hw.calibration.optimizer() if hw.calibration is not None else OPTIMIZER_S_PER_PARAM
    optimizer = seconds_per_param * stage.trainable / (lay.dp_shard * lay.cp)
    return {"compute": compute, "tp": tp, "cp": cp, "ep": ep, "fsdp": fsdp, "pp_bubble": pp, "pp_p2p": p2p,
            "optimizer": optimizer}


def _fsdp_comm(w: Workload, lay: Layout, hw: Hardware, stage: _Stage, m: int) -> float:
    """FSDP's all-gathers and reduce-scatters within a replica (under expert parallelism the experts'
    over the dp_shard / ep ranks holding the same ones, the rest over dp_shard), HSDP's all-reduce
    across replicas."""
    shard = lay.dp_shard * lay.cp
    if shard * lay.dp_replicate == 1:
        return 0.0
    rounds = 1 if lay.pp > 1 else m  # pipelining keeps parameters gathered over the micro-batches
    experts = stage.experts if lay.ep > 1 else 0.0
    experts_trainable = experts if w.lora is None else 0.0
    seconds = _gather_reduce(stage.params - experts, stage.trainable - experts_trainable, shard, shard * lay.tp,
                             rounds, lay, hw, stage)
    efsdp = lay.dp_shard // lay.ep
    if lay.ep > 1:  # this rank's E/ep experts; the efsdp group spans ep x tp neighbours per member
        seconds += _gather_reduce(experts / lay.ep, experts_trainable / lay.ep, efsdp, efsdp * lay.ep * lay.tp,
                                  rounds, lay, hw, stage)
    if lay.dp_replicate > 1:  # every rank's shard, the experts' included (ep x efsdp = dp_shard)
        r = lay.dp_replicate
        bytes_ = 2 * 4 * stage.trainable / shard * (r - 1) / r
        seconds += rounds * (bytes_ / hw.bandwidth(r * shard * lay.tp) + stage.layers * hw.latency)
    return seconds


def _gather_reduce(params: float, trainable: float, n: int, span: int, rounds: int, lay: Layout, hw: Hardware,
                   stage: _Stage) -> float:
    """All-gathers of `params` (bf16) and reduce-scatter of `trainable` (fp32) over `n` ranks spanning
    `span` GPUs."""
    if n == 1:
        return 0.0
    gathers = 1 if lay.pp > 1 else 2  # forward, and again for backward after resharding
    bytes_ = (gathers * 2 * params + 4 * trainable) * (n - 1) / n
    return rounds * (bytes_ / hw.bandwidth(span) + (gathers + 1) * stage.layers * hw.latency)


def evaluate(w: Workload, lay: Layout, hw: Hardware) -> Estimate:
    parts = step_time(w, lay, hw)
    seconds = sum(parts.values())
    tokens = w.global_batch * w.seq_len / seconds / hw.gpus
    mfu = w.global_batch * flops.flops_per_sequence(w.args, w.seq_len, w.lora) / seconds / hw.gpus / hw.peak_flops
    return Estimate(lay, memory_of(w, lay), seconds, tokens, mfu, parts)


def workload(model: str, seq_len: int = 8192, global_batch: int = 1024, layers: int | None = None) -> Workload:
    """A named model as the registry has it (`--model`), optionally a layer-reduced proxy."""
    from llamatron.models import registry

    entry = registry.get(model)
    args = entry.args if layers is None else dataclasses.replace(entry.args, n_layers=layers)
    if seq_len > args.max_seq_len:
        args = dataclasses.replace(args, max_seq_len=seq_len)
    entry.family.validate(args)
    sets = [f"model.size={model}"]
    sets += [f"model.{k}={v}" for k, v in registry.differing_fields(entry, args).items()]
    sets += [f"data.seq_len={seq_len}", f"train.global_batch_size={global_batch}"]
    compile = compiles_whole(args)
    sets += ["train.compile=true"] if compile else []
    return Workload(model, entry.family, args, seq_len, global_batch, sets=sets, compile=compile)


def workload_from_config(path: str, seq_len: int | None = None, global_batch: int | None = None,
                         layers: int | None = None) -> Workload:
    """The model, sequence, batch, LoRA and FP8 keys of a config file or preset (`--config`)."""
    from llamatron.config import load_config, parse_config, resolve_model
    from llamatron.data.sft import cached_document_tokens

    sets = [f"model.n_layers={layers}"] if layers is not None else []
    if seq_len is not None:
        sets.append(f"data.seq_len={seq_len}")
        if seq_len > resolve_model(parse_config(path)[0].model)[1].max_seq_len:
            sets.append(f"model.max_seq_len={seq_len}")
    sets += [f"train.global_batch_size={global_batch}"] if global_batch is not None else []
    parsed, _ = parse_config(path, sets)
    # The planner reads no data: a config without any (a model preset) is checked with stand-in tokens.
    cfg = load_config(path, sets + ([] if parsed.data.train or parsed.finetune.data else ["data.mock=true"]))
    family, args = resolve_model(cfg.model)
    _, explicit = parse_config(path, sets)
    fp8 = cfg.train.fp8 if "train.fp8" in explicit else None
    compile = cfg.train.compile if "train.compile" in explicit else compiles_whole(args)
    sets += ["train.compile=true"] if compile and "train.compile" not in explicit else []
    return Workload(cfg.model.size, family, args, cfg.data.seq_len, cfg.train.global_batch_size, compile=compile,
                    lora=cfg.lora if cfg.lora.rank > 0 else None, fp8=fp8, fp8_min_features=cfg.train.fp8_min_features,
                    fp8_output=(cfg.train.fp8_include_output or "train.fp8_include_output" not in explicit)
                    and cfg.lora.rank == 0,  # LoRA's frozen output layer stays bf16
                    fp8_experts=cfg.train.fp8_experts,
                    finetune=bool(cfg.finetune.data), document_tokens=cached_document_tokens(cfg),
                    cast_weights_once=cfg.train.cast_weights_once,
                    gradient_accumulation_fusion=cfg.train.gradient_accumulation_fusion,
                    bf16_residual=cfg.train.bf16_residual, optim=cfg.optim.name, config=path, sets=sets)


def with_documents(w: Workload, tokens: float) -> Workload:
    """`w` with document-masked attention over documents of `tokens` mean positions (`--document-tokens`)."""
    if not 1 <= tokens <= w.seq_len:
        raise LlamatronError(f"--document-tokens {tokens:g}: must be between 1 and the sequence length {w.seq_len}")
    return dataclasses.replace(w, document_tokens=float(tokens))


def plan(model: str | Workload, hw: Hardware, seq_len: int = 8192, global_batch: int = 1024,
         layers: int | None = None) -> Plan:
    w = model if isinstance(model, Workload) else workload(model, seq_len, global_batch, layers)
    if w.fp8 not in (None, "none") and not hw.fp8:
        raise LlamatronError(f"config key 'train.fp8': {w.fp8} asked for, but the GPU planned for has no FP8 "
                             f"peak in llamatron/flops.py ({', '.join(flops.PEAK_FLOPS['fp8'])})")
    usable = hw.margin * hw.memory_gib * GiB
    estimates = [evaluate(w, lay, hw) for lay in layouts(w, hw)]
    if not estimates:
        raise LlamatronError(f"--gpus {hw.gpus} --global-batch {w.global_batch}: no layout of {w.model} divides them "
                             "(the global batch must be a multiple of micro batch x data-parallel size)")
    feasible = sorted((e for e in estimates if e.memory.total <= usable), key=lambda e: (e.step_s, e.memory.total))
    smallest = None if feasible else min(estimates, key=lambda e: e.memory.total)
    return Plan(w, hw, feasible, len(estimates), smallest)


# --------------------------------------------------------------------------------------------------
# Output


def check_overrides(p: Plan, est: Estimate) -> list[str]:
    """The --set overrides of a layout, checked as the trainer checks them (load_config + world size)."""
    from llamatron.config import load_config, validate_config

    w = p.workload
    sets = p.base_overrides() + est.layout.overrides(_recipe(w), w.fp8_output)
    validate_config(load_config(p.workload.config, sets + ["data.mock=true"]), p.hardware.gpus)
    return sets


def nothing_fits(p: Plan) -> str:
    hw, e = p.hardware, p.smallest
    counts = parameter_counts(p.args, p.workload.lora)
    total = counts.total
    trainable = counts.block_trainable * p.args.n_layers + counts.first_trainable + counts.last_trainable
    # fp32 weights; the gradients and optimizer moments of what trains
    state_bytes = 4 * total + (4 + STATE_BYTES[p.workload.optim]) * trainable
    states = state_bytes / hw.gpus / GiB
    need = math.ceil(state_bytes / (hw.margin * hw.memory_gib * GiB))
    head = (f"nothing fits: {p.model} on {hw.gpus} GPU(s) of {hw.memory_gib:g} GiB ({hw.margin:.0%} usable, "
            f"{hw.margin * hw.memory_gib:.1f} GiB), {p.tried} layouts tried. The smallest estimate is "
            f"{e.memory_gib:.1f} GiB per rank ({e.layout.describe()}, micro batch {e.layout.micro_batch}, "
            f"activation checkpointing {'on' if e.layout.activation_checkpointing else 'off'}: "
            f"{e.memory.describe()}). ")
    what = (f"The fp32 weights, gradients and AdamW state of {total / 1e9:.1f}B parameters alone need "
            f"{state_bytes / total:.3g} bytes each"
            if trainable == total else
            f"The fp32 weights of {total / 1e9:.1f}B parameters, and the gradients and AdamW state of the "
            f"{trainable / 1e6:.1f}M trainable ones, alone need {state_bytes / GiB:.1f} GiB")
    state = f"{what}, {states:.1f} GiB per GPU over {hw.gpus}"
    if need > hw.gpus:
        return head + state + f"; at least {need} GPUs of this size are needed for those, more for activations."
    return head + state + (": they fit, but not with the working copies, activations and logits; more GPUs (to "
                           "shard the state further) or a shorter sequence would.")


def _tokens_label(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def render(p: Plan, top: int = 5, train_tokens: float = 1e12) -> str:
    hw, w = p.hardware, p.workload
    extras = [f"LoRA rank {w.lora.rank}" if w.lora is not None else "", "fine-tuning data" if w.finetune else "",
              f"attention within documents of {w.document_tokens:,.0f} positions" if w.document_tokens else
              "attention over whole sequences (the data is not tokenized yet: --document-tokens N, from a run's "
              "log, costs it within documents)" if w.finetune else ""]
    source = (f"compute from {hw.calibration.describe()}" if hw.calibration is not None
              else "compute from the fitted model (no calibration table)")
    head = (f"plan for {p.model} ({p.args.n_layers} layers{''.join(', ' + x for x in extras if x)}), seq "
            f"{p.seq_len}, global batch {p.global_batch}, on {hw.gpus} GPU(s), {hw.gpus_per_node} per node, "
            f"{hw.memory_gib:g} GiB each, peak {hw.peak_flops / 1e12:.0f} TFLOP/s; {source}; {p.tried} layouts, "
            f"{len(p.ranked)} fit")
    if not p.ranked:
        return head + "\n" + nothing_fits(p)
    days = f"days/{_tokens_label(train_tokens)} tok"
    rows = [("#", "layout", "micro", "act. ckpt", "fp8", "mem GiB/rank", "step s", "tok/s/GPU", "MFU", days,
             "largest costs")]
    for i, e in enumerate(p.ranked[:top], 1):
        costs = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(e.parts.items(), key=lambda kv: -kv[1]) if v > 0.005)
        rows.append((str(i), e.layout.describe(), str(e.layout.micro_batch), "on" if e.layout.activation_checkpointing
                     else "off", "on" if e.layout.fp8 else "off", f"{e.memory_gib:.1f}", f"{e.step_s:.3f}",
                     f"{e.tokens_per_s_per_gpu:,.0f}", f"{100 * e.mfu:.1f}%",
                     f"{flops.days_to_train(train_tokens, e.tokens_per_s_per_gpu * hw.gpus):,.1f}", costs))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows] + [""]
    config = f"--config {w.config} " if w.config else ""
    for i, e in enumerate(p.ranked[:top], 1):
        lines.append(f"#{i}: {config}" + " ".join(f"--set {s}" for s in check_overrides(p, e)))
    lines.append("")
    lines += calibration_notes(hw.calibration)
    lines.append("(estimates: memory from llamatron/parallel/memory.py, step time from the cost model in "
                 "llamatron/plan.py; see docs/planner.md)")
    return "\n".join(lines)


def calibration_notes(table) -> list[str]:
    """What the plan's table could not time as the model runs: attention it has no rows of, and GLaM's
    biased attention timed with another kernel than the one its blocks run now."""
    if table is None:
        return []
    notes = []
    if table.missing:
        notes.append(f"note: {table.source} has no {', '.join(sorted(table.missing))} attention timings: that "
                     "attention is planned at causal attention's speed (re-run `llamatron plan --calibrate` with "
                     "the model to time it)")
    for (mask, kernel), (base, peer) in sorted(table.other_kernel.items()):
        timed = sorted(map(str, table.kernels(mask)))
        scaled = f"{base}'s rows times {peer}'s {kernel} / {base} ratio" if peer else f"{base}'s rows"
        notes.append(f"note: {table.source} timed GLaM's biased attention as {', '.join(timed)}; its blocks now run "
                     f"{kernel} on CUDA, planned from {scaled} (re-run `llamatron plan --calibrate` to time that)")
    return notes


# Memory torch reports per device (GiB), for --gpu without --gpu-memory-gib: 80 GB parts, and the
# H200's 141 GB (139.8 GiB as torch.cuda.mem_get_info counts it).
GPU_MEMORY_GIB = {"H100": 80.0, "H800": 80.0, "A100": 80.0, "H200": 139.0, "B200": 178.0}


def _by_kind(table: dict, gpu: str, default):
    return next((v for k, v in sorted(table.items(), key=lambda kv: -len(kv[0])) if k in gpu.upper()), default)


def hardware_from_args(args) -> Hardware:
    from llamatron import calibration

    peak = flops.peak_flops(args.gpu, "bf16")
    if args.gpu_memory_gib is None:
        args.gpu_memory_gib = _by_kind(GPU_MEMORY_GIB, args.gpu, 80.0)
    if peak is None:
        raise LlamatronError(f"--gpu {args.gpu!r}: no known BF16 peak; known: {', '.join(flops.PEAK_FLOPS['bf16'])}")
    per_node = args.gpus_per_node
    if args.nodes is not None:
        if args.nodes < 1 or args.gpus % args.nodes:
            raise LlamatronError(f"--nodes {args.nodes}: must divide --gpus {args.gpus}")
        per_node = args.gpus // args.nodes
    if args.gpus < 1 or per_node < 1 or args.gpu_memory_gib <= 0:
        raise LlamatronError("--gpus, --gpus-per-node and --gpu-memory-gib must be positive")
    hw = Hardware(args.gpus, per_node, args.gpu_memory_gib, peak, fp8=flops.peak_flops(args.gpu, "fp8") is not None,
                  fp8_speedup=_by_kind(FP8_GEMM_SPEEDUP, args.gpu, FP8_GEMM_SPEEDUP_DEFAULT))
    table = calibration.load(args.calibration) if args.calibration else calibration.default_table(args.gpu)
    return table.apply(hw) if table is not None else hw


def main(args) -> tuple[str, bool]:
    """The `llamatron plan` output, and whether any layout fits."""
    from llamatron.models import registry

    if args.config is not None:
        w = workload_from_config(args.config, args.seq_len, args.global_batch, args.layers)
    elif args.model is None:
        raise LlamatronError("llamatron plan: give --model SIZE or --config FILE_OR_PRESET")
    else:
        known = registry.entries()
        if args.model not in known:
            raise LlamatronError(f"--model {args.model!r}: unknown; known sizes: {', '.join(known)}")
        w = workload(args.model, args.seq_len or 8192, args.global_batch or 1024, args.layers)
    if args.gpus is None:
        raise LlamatronError("--gpus: give the number of GPUs to plan for")
    if args.fp8 != "auto":
        w = dataclasses.replace(w, fp8="tensorwise" if args.fp8 == "on" else "none")
    if args.document_tokens is not None:
        w = with_documents(w, args.document_tokens)
    p = plan(w, hardware_from_args(args))
    text = render(p, args.top, args.tokens)
    if not p.ranked and w.optim == "adamw":  # what 8-bit moments would make fit (docs/finetune.md)
        eight = plan(dataclasses.replace(w, optim="adamw8bit", sets=[*w.sets, "optim.name=adamw8bit",
                                                                     "optim.fused=false"]), p.hardware)
        if eight.ranked:
            text += ("\n\nWith optim.name=adamw8bit (torchao's AdamW8bit: the moments in 8 bits, 2 bytes per "
                     "parameter instead of 8) these fit:\n\n" + render(eight, args.top, args.tokens))
    return text, bool(p.ranked)


def calibrate(args) -> int:
    """`llamatron plan --calibrate`: measure this machine's timings and write a table."""
    from llamatron.calibration import measure

    if args.budget_s <= 0:
        raise LlamatronError(f"--budget-s {args.budget_s:g}: must be positive")
    models = None
    if args.config is not None:
        models = [workload_from_config(args.config).model]
    elif args.model is not None:
        workload(args.model)  # an unknown size: one line, before anything is measured
        models = [args.model]
    table = measure.run(args.out, models, args.quick, args.budget_s)
    if table is not None:
        print(measure.summary(table, args.out))
    return 0
