"""`llamatron plan`: which parallel layout to run a model with on N GPUs, and how fast it will be.

Every layout the config accepts for the model is enumerated (dp_shard x tp x pp x cp = N, pipeline
virtual stages, activation checkpointing, micro batch), its memory per rank estimated with
`llamatron/parallel/memory.py` (what the trainer prints; docs/parallelism.md compares it with measured
peaks), and its step time with the cost model below. The feasible ones are ranked by step time.

The cost model (per optimizer step, per GPU; docs/planner.md has it with its sources):

    compute   = (model FLOPs + recomputed block forwards under activation checkpointing) / N
                / (peak x eff(x)),  eff(x) = 0.6475 x / (x + 800),  x = micro_batch x seq / cp
                (least-squares fit to the 15 compiled BF16 single-GPU runs in docs/bench/: H100 and H200, the
                8B layer shape with 4 or 8 layers, micro batch 1 to 8). What it captures is the fixed cost of
                a micro-batch (weight casts, gradient accumulation, launches) against its tokens: context
                parallelism cuts the tokens per rank, tensor parallelism cuts both alike, so only cp enters x
    TP        8 collectives per block and micro-batch (all-gather + reduce-scatter before/after attention and
                MLP, forward and backward; 12 with recomputation) of the micro-batch's activations, each
                (tp-1)/tp of them over NVLink, or over the network when tp spans nodes; not overlapped
    CP        K and V passed around the ring, cp-1 hops, forward and backward (3x); half of it exposed
    FSDP      all-gather of the bf16 parameters forward and backward and reduce-scatter of the fp32 gradients
                (8 bytes per parameter of the stage) per micro-batch (per step under pipelining, which keeps
                them gathered); overlapped with compute, only what exceeds it counts
    optimizer 11.6 ps per parameter of the rank's shard (fused AdamW, measured on the H200)
    PP        the schedule's bubble: the per-micro-batch time x (m + (pp-1)/v) for m micro-batches and v
                virtual stages (GPipe, 1F1B: v = 1), plus the stage-to-stage activation sends

Bandwidths are per GPU for collectives (algorithm bandwidth): 300 GB/s inside a node (NVLink), 40 GB/s
across nodes (400 Gb/s InfiniBand per GPU). A layout fits when its estimate is below `margin` (0.9) of the
GPU's memory: the estimate leaves out the allocator's fragmentation, NCCL buffers and the CUDA context.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from llamatron import flops
from llamatron.errors import LlamatronError
from llamatron.parallel.memory import GiB, MemoryEstimate, estimate_memory, parameter_counts

MICRO_BATCHES = (1, 2, 4, 8)
VIRTUAL_STAGES = (1, 2, 4)
EFF_MAX, EFF_HALF = 0.6475, 800.0  # eff(x) = EFF_MAX x / (x + EFF_HALF): see the module docstring
CP_EXPOSED = 0.5
FSDP_OVERLAP = 1.0  # the share of compute that FSDP's collectives can hide behind
# Fused AdamW + clipping over this rank's fp32 shard: 22.4 ms for 1.92B parameters in the H200 profile
# (docs/performance.md), i.e. 11.6 ps per parameter; memory-bound, so the same on an H100 within ~10%.
OPTIMIZER_S_PER_PARAM = 11.6e-12


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_flops: float = 989e12
    intra_node_bw: float = 300e9  # bytes/s per GPU, collectives inside a node
    inter_node_bw: float = 40e9  # bytes/s per GPU, collectives across nodes
    margin: float = 0.9  # usable share of the GPU's memory

    def bandwidth(self, span: int) -> float:
        """Of a group of `span` consecutive ranks: NVLink if they share a node."""
        return self.intra_node_bw if span <= self.gpus_per_node else self.inter_node_bw


@dataclass(frozen=True)
class Layout:
    dp_shard: int
    tp: int
    pp: int
    cp: int
    virtual: int
    micro_batch: int
    activation_checkpointing: bool

    @property
    def schedule(self) -> str:
        return "interleaved1f1b" if self.virtual > 1 else "1f1b"

    def describe(self) -> str:
        parts = [f"fsdp {self.dp_shard}" if self.dp_shard > 1 else "", f"tp {self.tp}" if self.tp > 1 else "",
                 f"cp {self.cp}" if self.cp > 1 else "",
                 (f"pp {self.pp}" + (f" x{self.virtual} interleaved" if self.virtual > 1 else "")) if self.pp > 1 else ""]
        return " ".join(p for p in parts if p) or "1 GPU"

    def overrides(self) -> list[str]:
        """The [parallel] and [train] keys that select this layout (those at their default left out)."""
        out = [f"parallel.dp_shard={self.dp_shard}"]
        out += [f"parallel.{k}={getattr(self, k)}" for k in ("tp", "pp", "cp") if getattr(self, k) > 1]
        if self.pp > 1:
            out += [f"parallel.pp_virtual_stages={self.virtual}", f"parallel.pp_schedule={self.schedule}"]
        out.append(f"train.micro_batch_size={self.micro_batch}")
        if self.activation_checkpointing:
            out.append("train.activation_checkpointing=true")
        return out


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
    model: str
    args: object
    hardware: Hardware
    seq_len: int
    global_batch: int
    ranked: list[Estimate]  # feasible, fastest first
    tried: int
    smallest: Estimate | None  # the smallest-memory layout when none fits

    def base_overrides(self) -> list[str]:
        """The model, sequence and batch keys the layouts were planned for."""
        from llamatron.models import registry

        out = [f"model.size={self.model}"]
        out += [f"model.{k}={v}" for k, v in registry.differing_fields(registry.get(self.model), self.args).items()]
        return out + [f"data.seq_len={self.seq_len}", f"train.global_batch_size={self.global_batch}"]


# --------------------------------------------------------------------------------------------------
# Enumeration


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def layouts(family, args, gpus: int, seq_len: int, global_batch: int):
    """Every layout config validation accepts for this model, world size and batch (dp_replicate = 1)."""
    divisible = family.tp_divisible(args)
    for tp in _powers_of_two(gpus):
        if any(size % tp for size in divisible.values()) or seq_len % tp:
            continue
        for cp in _powers_of_two(gpus // tp):
            if seq_len % (2 * cp):
                continue
            for pp in range(1, gpus // (tp * cp) + 1):
                if args.n_layers % pp or gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for virtual in (VIRTUAL_STAGES if pp > 1 else (1,)):
                    if args.n_layers % (pp * virtual):
                        continue
                    for micro in MICRO_BATCHES:
                        if global_batch % (micro * dp) or not _pipeline_ok(global_batch // (micro * dp), pp, virtual):
                            continue
                        for ac in (False, True):
                            yield Layout(dp, tp, pp, cp, virtual, micro, ac)


def _pipeline_ok(micro_batches: int, pp: int, virtual: int) -> bool:
    """config._validate_batch's pipeline rules."""
    if pp == 1:
        return True
    rounds = max(1, micro_batches // pp)
    return micro_batches >= pp and (virtual == 1 or micro_batches % rounds == 0)


# --------------------------------------------------------------------------------------------------
# Estimates


def memory_of(args, lay: Layout, seq_len: int, global_batch: int) -> MemoryEstimate:
    m = global_batch // (lay.micro_batch * lay.dp_shard)
    return estimate_memory(args, seq_len, lay.micro_batch, dp_shard=lay.dp_shard, tp=lay.tp, pp=lay.pp, cp=lay.cp,
                           pp_schedule=lay.schedule, n_microbatches=m, bf16=True,
                           activation_checkpointing=lay.activation_checkpointing,
                           fused_cross_entropy=lay.tp == 1 and lay.pp == 1)


def step_time(args, lay: Layout, hw: Hardware, seq_len: int, global_batch: int) -> dict[str, float]:
    """Seconds per optimizer step, by cost (the module docstring's model)."""
    m = global_batch // (lay.micro_batch * lay.dp_shard)  # micro-batches per rank and step
    per_token = flops.flops_per_token(args, seq_len)
    block_per_token = per_token - 6 * args.vocab_size * args.dim  # all but the embedding/output layer
    model_flops = global_batch * seq_len * per_token
    recompute = global_batch * seq_len * block_per_token / 3 if lay.activation_checkpointing else 0.0
    x = lay.micro_batch * seq_len / lay.cp
    eff = EFF_MAX * x / (x + EFF_HALF)
    compute = (model_flops + recompute) / hw.gpus / (hw.peak_flops * eff)

    layers = args.n_layers // lay.pp
    activation = lay.micro_batch * seq_len / lay.cp * args.dim * 2  # bf16 bytes of one block's input
    tp = 0.0
    if lay.tp > 1:
        collectives = 12 if lay.activation_checkpointing else 8
        tp = m * layers * collectives * activation * (lay.tp - 1) / lay.tp / hw.bandwidth(lay.tp)
    cp = 0.0
    if lay.cp > 1:
        kv = 2 * lay.micro_batch * seq_len / lay.cp * args.n_kv_heads * (args.dim // args.n_heads) * 2 / lay.tp
        cp = CP_EXPOSED * m * layers * 3 * kv * (lay.cp - 1) / hw.bandwidth(lay.cp * lay.tp)
    counts = parameter_counts(args)
    stage_params = (layers * counts.block_matrices + layers * counts.block_vectors
                    + counts.ends(lay.pp)) / lay.tp
    shard = lay.dp_shard * lay.cp
    fsdp = 0.0
    if shard > 1:
        rounds = 1 if lay.pp > 1 else m  # pipelining keeps parameters gathered over the micro-batches
        bytes_ = rounds * (8 if lay.pp == 1 else 6) * stage_params * (shard - 1) / shard
        comm = bytes_ / hw.bandwidth(shard * lay.tp)
        fsdp = max(0.0, comm - FSDP_OVERLAP * compute)
    per_stage = compute + tp + cp  # this rank's stage, all its micro-batches
    pp = p2p = 0.0
    if lay.pp > 1:
        pp = per_stage / m * (lay.pp - 1) / lay.virtual
        p2p = m * 2 * lay.virtual * activation / lay.tp / hw.bandwidth(hw.gpus)
    optimizer = OPTIMIZER_S_PER_PARAM * stage_params / shard
    return {"compute": compute, "tp": tp, "cp": cp, "fsdp": fsdp, "pp_bubble": pp, "pp_p2p": p2p, "optimizer": optimizer}


def evaluate(args, lay: Layout, hw: Hardware, seq_len: int, global_batch: int) -> Estimate:
    parts = step_time(args, lay, hw, seq_len, global_batch)
    seconds = sum(parts.values())
    tokens = global_batch * seq_len / seconds / hw.gpus
    mfu = global_batch * flops.flops_per_sequence(args, seq_len) / seconds / hw.gpus / hw.peak_flops
    return Estimate(lay, memory_of(args, lay, seq_len, global_batch), seconds, tokens, mfu, parts)


def registry_family(model: str):
    from llamatron.models import registry

    return registry.get(model).family


def plan(model: str, hw: Hardware, seq_len: int = 8192, global_batch: int = 1024, layers: int | None = None) -> Plan:
    from llamatron.models import registry

    entry = registry.get(model)
    args = entry.args if layers is None else dataclasses.replace(entry.args, n_layers=layers)
    if seq_len > args.max_seq_len:
        args = dataclasses.replace(args, max_seq_len=seq_len)
    entry.family.validate(args)
    usable = hw.margin * hw.memory_gib * GiB
    estimates = [evaluate(args, lay, hw, seq_len, global_batch)
                 for lay in layouts(entry.family, args, hw.gpus, seq_len, global_batch)]
    if not estimates:
        raise LlamatronError(f"--gpus {hw.gpus} --global-batch {global_batch}: no layout of {model} divides them "
                             "(the global batch must be a multiple of micro batch x data-parallel size)")
    feasible = sorted((e for e in estimates if e.memory.total <= usable), key=lambda e: (e.step_s, e.memory.total))
    smallest = None if feasible else min(estimates, key=lambda e: e.memory.total)
    return Plan(model, args, hw, seq_len, global_batch, feasible, len(estimates), smallest)


# --------------------------------------------------------------------------------------------------
# Output


def check_overrides(p: Plan, est: Estimate) -> list[str]:
    """The --set overrides of a layout, checked as the trainer checks them (load_config + world size)."""
    from llamatron.config import load_config, validate_config

    sets = p.base_overrides() + est.layout.overrides()
    validate_config(load_config(None, sets + ["data.mock=true"]), p.hardware.gpus)
    return sets


def nothing_fits(p: Plan) -> str:
    hw, e = p.hardware, p.smallest
    total = parameter_counts(p.args).total
    states = 16 * total / hw.gpus / GiB  # fp32 weights + gradients + AdamW's two moments, fully sharded
    need = math.ceil(16 * total / (hw.margin * hw.memory_gib * GiB))
    head = (f"nothing fits: {p.model} on {hw.gpus} GPU(s) of {hw.memory_gib:g} GiB ({hw.margin:.0%} usable, "
            f"{hw.margin * hw.memory_gib:.1f} GiB), {p.tried} layouts tried. The smallest estimate is "
            f"{e.memory_gib:.1f} GiB per rank ({e.layout.describe()}, micro batch {e.layout.micro_batch}, "
            f"activation checkpointing {'on' if e.layout.activation_checkpointing else 'off'}: "
            f"{e.memory.describe()}). ")
    state = (f"The fp32 weights, gradients and AdamW state of {total / 1e9:.1f}B parameters alone need 16 bytes "
             f"each, {states:.1f} GiB per GPU over {hw.gpus}")
    if need > hw.gpus:
        return head + state + f"; at least {need} GPUs of this size are needed for those, more for activations."
    return head + state + (": they fit, but not with the working copies, activations and logits; more GPUs (to "
                           "shard the state further) or a shorter sequence would.")


def render(p: Plan, top: int = 5) -> str:
    hw = p.hardware
    head = (f"plan for {p.model} ({p.args.n_layers} layers), seq {p.seq_len}, global batch {p.global_batch}, on "
            f"{hw.gpus} GPU(s), {hw.gpus_per_node} per node, {hw.memory_gib:g} GiB each, peak "
            f"{hw.peak_flops / 1e12:.0f} TFLOP/s; {p.tried} layouts, {len(p.ranked)} fit")
    if not p.ranked:
        return head + "\n" + nothing_fits(p)
    rows = [("#", "layout", "micro", "act. ckpt", "mem GiB/rank", "step s", "tok/s/GPU", "MFU", "largest costs")]
    for i, e in enumerate(p.ranked[:top], 1):
        costs = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(e.parts.items(), key=lambda kv: -kv[1]) if v > 0)
        rows.append((str(i), e.layout.describe(), str(e.layout.micro_batch), "on" if e.layout.activation_checkpointing
                     else "off", f"{e.memory_gib:.1f}", f"{e.step_s:.3f}", f"{e.tokens_per_s_per_gpu:,.0f}",
                     f"{100 * e.mfu:.1f}%", costs))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows] + [""]
    for i, e in enumerate(p.ranked[:top], 1):
        lines.append(f"#{i}: " + " ".join(f"--set {s}" for s in check_overrides(p, e)))
    lines.append("")
    lines.append("(estimates: memory from llamatron/parallel/memory.py, step time from the cost model in "
                 "llamatron/plan.py; see docs/planner.md)")
    return "\n".join(lines)


# Memory torch reports per device (GiB), for --gpu without --gpu-memory-gib: 80 GB parts, and the
# H200's 141 GB (139.8 GiB as torch.cuda.mem_get_info counts it).
GPU_MEMORY_GIB = {"H100": 80.0, "H800": 80.0, "A100": 80.0, "H200": 139.0, "B200": 178.0}


def hardware_from_args(args) -> Hardware:
    peak = flops.peak_flops(args.gpu, "bf16")
    if args.gpu_memory_gib is None:
        args.gpu_memory_gib = next((v for k, v in sorted(GPU_MEMORY_GIB.items(), key=lambda kv: -len(kv[0]))
                                    if k in args.gpu.upper()), 80.0)
    if peak is None:
        raise LlamatronError(f"--gpu {args.gpu!r}: no known BF16 peak; known: {', '.join(flops.PEAK_FLOPS['bf16'])}")
    per_node = args.gpus_per_node
    if args.nodes is not None:
        if args.nodes < 1 or args.gpus % args.nodes:
            raise LlamatronError(f"--nodes {args.nodes}: must divide --gpus {args.gpus}")
        per_node = args.gpus // args.nodes
    if args.gpus < 1 or per_node < 1 or args.gpu_memory_gib <= 0:
        raise LlamatronError("--gpus, --gpus-per-node and --gpu-memory-gib must be positive")
    return Hardware(args.gpus, per_node, args.gpu_memory_gib, peak)


def main(args) -> tuple[str, bool]:
    """The `llamatron plan` output, and whether any layout fits."""
    from llamatron.models import registry

    known = registry.entries()
    if args.model not in known:
        raise LlamatronError(f"--model {args.model!r}: unknown; known sizes: {', '.join(known)}")
    p = plan(args.model, hardware_from_args(args), args.seq_len, args.global_batch or 1024, args.layers)
    return render(p, args.top), bool(p.ranked)
