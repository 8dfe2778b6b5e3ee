"""Single-device training-step benchmark: every variant in one process, one table.

Each variant is the normal trainer's model and step (`llamatron.train.step.train_step`) with some of
its speed options switched on; "baseline" is the plainest correct eager version (fp32 master weights
with bf16 autocast, torch's default attention kernel, full logits + fp32 cross-entropy, for-each AdamW).

    python bench/bench_train_step.py --layers 4 --seq-len 8192 --steps 12 --json out.json
    python bench/bench_train_step.py --size debug --seq-len 128 --steps 3 --device cpu   # smoke test
    python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --variants fused-ce+adam,compile
    # GLaM 64B-64E layer proxy: 2 blocks (MoE, dense) with 64/ep experts, one GPU's share under ep (docs/moe.md)
    python bench/bench_train_step.py --size glam-64b-64e --layers 2 --set model.n_experts=8 --seq-len 2048 \
        --micro-batch 2 --global-batch 8 --variants compile
    python bench/bench_train_step.py --model gpt-126m --layers 0 --seq-len 2048     # GPT 126M, whole model
    python bench/bench_train_step.py --model gpt-5b --layers 4 --seq-len 2048       # GPT 5B proxy
    python bench/bench_train_step.py --model llama2-7b --layers 4 --seq-len 4096    # LLaMA-2 7B proxy
    # several variants in one process; NAME@micro=N sets a variant's micro batch, NAME@gqa=expand its
    # grouped-query attention (native: SDPA enable_gqa, expand: K/V repeated; llamatron/models/attention_ops.py),
    # NAME@mk=1 compiles with inductor's triton.multi_kernel, NAME@inductor.KEY=VALUE with any inductor config,
    # NAME@res=bf16 keeps the residual stream in bf16 under autocast (train.bf16_residual),
    # NAME@sdpa=fa4 runs SDPA on another kernel (train.attention_backend: cudnn, flash, fa4, ...),
    # NAME@fp8loss=inductor makes the FP8 loss's gradients as before llamatron/loss_kernels.py (fp8loss=arith:
    # with its kernels as they were on 2026-12-06, casts by integer arithmetic and the fixed 64 x 128 tile),
    # NAME@bf16loss=inductor makes the BF16 loss's gradients in inductor's compiled kernel, as before 2026-12-07 (llamatron.loss.BF16_LOSS_KERNELS),
    # NAME@fastaccum=output+grad_input runs those FP8 GEMMs with the tensor cores' fast accumulation, in the
    # linears and the fused loss (train.fp8_fast_accum; default output, the forward's; none: no GEMM; the
    # older fastaccum=0|1 of the JSON files was the logits' GEMM alone),
    # NAME@wgradchunks=N puts N of the FP8 loss's chunks in each of its weight-gradient GEMMs (default 4),
    # NAME@tune=1 runs with torch's TunableOp (each GEMM shape's cuBLASLt kernels timed in the warm-up),
    # NAME@ctune=1 compiles with train.compile_tuning (inductor's coordinate-descent tuning of the blocks' kernels;
    # the trainer's default with FP8 since 2026-12-07, so compile+fp8-all@res=bf16@ctune=1 is its default FP8 step),
    # NAME@castonce=1 casts the weights once per step (train.cast_weights_once: bf16 copies, and E4M3 ones
    # for tensorwise FP8 layers), NAME@fusedwgrad=1 with train.gradient_accumulation_fusion too,
    # NAME@outer=0 leaves the embedding and output layer out of those (transforms/outer_weights.py, in since 2026-12-07),
    # NAME@swiglu=1 runs FP8's SwiGLU gate and up projections in train.fp8_fused_swiglu's function
    # (swiglu=copy: its token-major gradients by inductor's transposing copies, not the cast kernel)
    python bench/bench_train_step.py --global-batch 16 --variants \
        compile+cudnn@micro=8@gqa=expand,compile+cudnn@micro=8,compile+fp8-tensorwise@micro=4

Each variant prints one line `SUMMARY {json}` (variant, micro and global batch, median step time,
tokens/s, MFU, peak memory) for scripts to collect.

Step time is the median of the timed steps after warm-up (compilation happens in warm-up). MFU uses the
formula of llamatron/flops.py against the device's dense BF16 peak. Tokens are random ids from the
synthetic dataset (never zeros), or a Megatron prefix with --data.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from llamatron import flops  # noqa: E402
from llamatron import loss as fused_loss  # noqa: E402
from llamatron.config import ATTENTION_BACKENDS, FP8_GEMMS, OptimConfig, parse_config, resolve_model  # noqa: E402
from llamatron.fp8_gemm import FastAccum  # noqa: E402
from llamatron.errors import LlamatronError  # noqa: E402
from llamatron.data.sampler import micro_batch_indices  # noqa: E402
from llamatron.models.attention_ops import set_gqa_mode  # noqa: E402
from llamatron.models import registry  # noqa: E402
from llamatron.models.glam import attention as glam_attention  # noqa: E402
from llamatron.parallel.layout import Layout  # noqa: E402
from llamatron.parallel.parallelize import materialize  # noqa: E402
from llamatron.runtime import Precision, load_batch  # noqa: E402
from llamatron.train.optim import build_optimizer  # noqa: E402
from llamatron.train.step import train_step  # noqa: E402
from llamatron.transforms.checkpointing import apply_activation_checkpointing  # noqa: E402
from llamatron.transforms.compile import apply_compile  # noqa: E402
from llamatron.transforms.residual import apply_bf16_residual  # noqa: E402
from llamatron.transforms import weight_cast  # noqa: E402
from llamatron.transforms.fp8 import apply_fp8, apply_fp8_experts  # noqa: E402

# The FP8 loss's kernels and chunks per weight-gradient GEMM of the variants that name none (llamatron.loss's).
FP8_LOSS_DEFAULTS = fused_loss.FP8_LOSS_KERNELS, fused_loss.FP8_WGRAD_CHUNKS
BF16_LOSS_DEFAULT = fused_loss.BF16_LOSS_KERNELS
# GLaM's attention kernel of the variants that name none: the environment's (LLAMATRON_GLAM_ATTENTION) or flex.
DEFAULT_GLAM_ATTENTION = glam_attention.KERNEL

VARIANTS = {
    "baseline": dict(compile=False, fused_ce=False, fused_adam=False, attention="auto", ac=False),
    "fused-ce": dict(compile=False, fused_ce=True, fused_adam=False, attention="auto", ac=False),
    "fused-ce+adam": dict(compile=False, fused_ce=True, fused_adam=True, attention="auto", ac=False),
    "cudnn": dict(compile=False, fused_ce=True, fused_adam=True, attention="cudnn", ac=False),
    "compile": dict(compile=True, fused_ce=True, fused_adam=True, attention="auto", ac=False),
    "compile+cudnn": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=False),
    "compile+cudnn+ac": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=True),
    # The block linears' bf16 copies made once per optimizer step, not by autocast per micro-batch
    # (train.cast_weights_once, llamatron/transforms/weight_cast.py): pays with several micro-batches.
    "compile+cudnn+castonce": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=False,
                                   castonce=True),
    # ... and each micro-batch's weight gradient accumulated in fp32 inside the GEMM
    # (train.gradient_accumulation_fusion): no bf16 product added into .grad after it.
    "compile+cudnn+castonce+fusedwgrad": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn",
                                              ac=False, castonce=True, fused_wgrad=True),
    # The same for a model whose attention is not SDPA's (GLaM: flex with its bias); its experts' too.
    "compile+castonce": dict(compile=True, fused_ce=True, fused_adam=True, attention="auto", ac=False, castonce=True),
    "compile+castonce+fusedwgrad": dict(compile=True, fused_ce=True, fused_adam=True, attention="auto", ac=False,
                                        castonce=True, fused_wgrad=True),
    # FP8 linear layers (torchao Float8Linear, llamatron/transforms/fp8.py) on top of the best BF16 variant.
    "compile+fp8-tensorwise": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=False,
                                   fp8="tensorwise"),
    # The output layer in FP8 too: needs the plain (unfused) loss, whose full logits cost memory and time.
    "compile+fp8-tensorwise+output": dict(compile=True, fused_ce=False, fused_adam=True, attention="cudnn", ac=False,
                                          fp8="tensorwise", fp8_output=True),
    # Everything in FP8: the output layer's GEMMs too, inside the fused cross-entropy (llamatron/loss.py).
    "compile+fp8-all": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=False,
                            fp8="tensorwise", fp8_output=True),
    # A mixture of experts' grouped GEMMs alone in FP8 (torchao's rowwise grouped recipe; GLaM 126M's
    # 768 x 3072 experts pass a 768 width rule), and with the linears of that width too.
    "compile+fp8-experts": dict(compile=True, fused_ce=True, fused_adam=True, attention="auto", ac=False,
                                fp8_experts=768),
    "compile+fp8-768": dict(compile=True, fused_ce=True, fused_adam=True, attention="auto", ac=False,
                            fp8="tensorwise", fp8_min=768),
    "compile+fp8-rowwise": dict(compile=True, fused_ce=True, fused_adam=True, attention="cudnn", ac=False,
                                fp8="rowwise"),
}


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """"NAME@micro=8@gqa=expand" -> (label, the variant's options, overrides of the command line)."""
    name, *conds = spec.split("@")
    if name not in VARIANTS:
        raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    opts, over = dict(VARIANTS[name]), {}
    for c in conds:
        key, _, value = c.partition("=")
        if key == "micro" and value.isdigit():
            over["micro_batch"] = int(value)
        elif key == "gqa" and value in ("auto", "native", "expand"):
            opts["gqa"] = value
        elif key == "attn" and value in glam_attention.KERNELS:  # GLaM's attention kernel
            opts["glam_attention"] = value
        elif key == "sdpa" and value in ATTENTION_BACKENDS:  # SDPA's kernel (train.attention_backend)
            opts["attention"] = value
        elif key == "mk" and value in ("0", "1"):  # inductor's triton.multi_kernel (one-pass long reductions)
            opts["multi_kernel"] = int(value)
        elif key == "res" and value in ("fp32", "bf16"):  # the residual stream's dtype under autocast
            opts["bf16_residual"] = value == "bf16"
        elif key == "fp8loss" and value in ("triton", "inductor", "arith"):  # who makes the FP8 loss's gradients
            opts["fp8_loss_kernels"] = value
        elif key == "bf16loss" and value in ("triton", "inductor"):  # who makes the BF16 loss's gradients
            opts["bf16_loss_kernels"] = value
        elif key == "fastaccum" and set(value.split("+")) <= {*FP8_GEMMS, "none"}:  # train.fp8_fast_accum
            opts["fp8_fast_accum"] = [g for g in FP8_GEMMS if g in value.split("+")]
        elif key == "wgradchunks" and value.isdigit():  # chunks of the FP8 loss per weight-gradient GEMM
            opts["fp8_wgrad_chunks"] = int(value)
        elif key in ("castonce", "fusedwgrad") and value in ("0", "1"):  # train.cast_weights_once (FP8 layers too),
            opts["fused_wgrad" if key == "fusedwgrad" else key] = value == "1"  # train.gradient_accumulation_fusion
        elif key == "outer" and value in ("0", "1"):  # cast-once's embedding and output layer (outer_weights.py)
            opts["outer"] = value == "1"
        elif key == "ctune" and value in ("0", "1"):  # train.compile_tuning
            opts["compile_tuning"] = value == "1"
        elif key == "swiglu" and value in ("0", "1", "copy"):  # train.fp8_fused_swiglu (copy: transposed by inductor)
            opts["fp8_fused_swiglu"] = value
        elif key == "tune" and value in ("0", "1"):  # torch's TunableOp: every GEMM shape's cuBLASLt kernel timed
            opts["tune_gemms"] = int(value)
        elif key.startswith("inductor.") and value:  # any inductor config key, e.g. inductor.triton.tile_reductions=1
            opts.setdefault("inductor", {})[key.removeprefix("inductor.")] = int(value) if value.isdigit() else value
        else:
            raise SystemExit(f"--variants: {c!r} in {spec!r}: expected micro=N, gqa=auto|native|expand, "
                             f"attn={'|'.join(glam_attention.KERNELS)}, sdpa={'|'.join(ATTENTION_BACKENDS)}, mk=0|1, res=fp32|bf16, fp8loss=triton|inductor|arith, bf16loss=triton|inductor, fastaccum=none|{'+'.join(FP8_GEMMS)} (some), wgradchunks=N, castonce=0|1, fusedwgrad=0|1, outer=0|1, ctune=0|1, swiglu=0|1|copy, tune=0|1 or inductor.KEY=VALUE")
    return spec, opts, over


def model_args(cli):
    """The size's args with --layers and the --set model keys (as the trainer's --set reads them),
    the position table long enough for --seq-len, checked by the family."""
    other = next((s for s in cli.sets if not s.strip().startswith("model.")), None)
    if other is not None:
        raise LlamatronError(f"--set {other!r}: only the model's keys (model.KEY=VALUE) apply to this benchmark")
    layers = [f"model.n_layers={cli.layers}"] if cli.layers else []
    cfg, _ = parse_config(None, [f"model.size={cli.size}", *layers, *cli.sets])
    family, args = resolve_model(cfg.model)
    args = dataclasses.replace(args, max_seq_len=max(cli.seq_len, args.max_seq_len))
    family.validate(args)  # e.g. a GPT sequence longer than its position table
    return args


def build_dataset(args, vocab: int, n: int):
    if args.data:
        from llamatron.data.gpt_dataset import GPTDataset
        from llamatron.data.indexed import IndexedDataset

        return GPTDataset(IndexedDataset(args.data), args.seq_len, n, seed=1234, split="train")
    from llamatron.data.gpt_dataset import MockDataset

    return MockDataset(vocab, args.seq_len, n, seed=1234)


def build_layout(margs, opts, device) -> Layout:
    """The model of any registered family with the variant's transforms, as the trainer builds it."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = registry.family_of(margs).build(margs)
    converted = []
    swiglu = opts.get("fp8_fused_swiglu", "0")  # "1", or "copy": the token-major gradients by inductor's copies
    fast_accum = FastAccum.of(opts["fp8_fast_accum"]) if "fp8_fast_accum" in opts else FastAccum()
    if opts.get("fp8"):
        converted = apply_fp8(model, opts["fp8"], include_output=opts.get("fp8_output", False),
                              min_features=opts.get("fp8_min", 1024), fused_swiglu=swiglu != "0", fast_accum=fast_accum)
    if opts.get("fp8_experts"):
        converted = apply_fp8_experts(model, opts["fp8_experts"])
    if swiglu != "0":
        from llamatron.transforms import fp8_swiglu

        fp8_swiglu.TRANSPOSE_IN_KERNEL = swiglu != "copy"  # read as backward is traced
    if opts.get("bf16_residual"):
        apply_bf16_residual(model)
    if opts["ac"]:
        apply_activation_checkpointing(model)
    if opts["compile"]:
        apply_compile(model, tuning=opts.get("compile_tuning", False))
    materialize(model, device, seed=0)
    layout = Layout.single(model)
    layout.fp8_output = fast_accum if "output" in converted else None
    return layout


def run_variant(name, opts, margs, args, device, dataset):
    # Compiling happens in the first steps, so the variant's inductor options hold around all of it.
    tune = bool(opts.get("tune_gemms")) and device.type == "cuda"
    if tune:  # each GEMM shape tuned at its first call (in the warm-up steps), then its fastest kernel used
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_max_tuning_duration(10)
    try:
        with torch._inductor.config.patch({"triton.multi_kernel": opts.get("multi_kernel", 0), **opts.get("inductor", {})}):
            return _run_variant(name, opts, margs, args, device, dataset)
    finally:
        if tune:
            print(f"{name}: TunableOp tuned {len(torch.cuda.tunable.get_results())} GEMM shapes", flush=True)
            torch.cuda.tunable.enable(False)


def _run_variant(name, opts, margs, args, device, dataset):
    torch._dynamo.reset()  # each variant compiles afresh: the module switches below would hit the recompile limit
    set_gqa_mode(opts.get("gqa", "auto"))  # read when the model is traced and run
    glam_attention.KERNEL = opts.get("glam_attention", DEFAULT_GLAM_ATTENTION)
    kernels = opts.get("fp8_loss_kernels", FP8_LOSS_DEFAULTS[0])
    fused_loss.FP8_LOSS_KERNELS = "triton" if kernels == "arith" else kernels
    if kernels == "arith" or "llamatron.loss_kernels" in sys.modules:  # Triton's kernels: Linux x86-64 only
        from llamatron import loss_kernels

        loss_kernels.HARDWARE_CASTS = loss_kernels.TUNE_GRAD = kernels != "arith"  # SwiGLU's kernels read the first too
    fused_loss.BF16_LOSS_KERNELS = opts.get("bf16_loss_kernels", BF16_LOSS_DEFAULT)
    fused_loss.FP8_WGRAD_CHUNKS = opts.get("fp8_wgrad_chunks", FP8_LOSS_DEFAULTS[1])
    model = build_layout(margs, opts, device)
    opt = build_optimizer(model.model, OptimConfig(fused=opts["fused_adam"]), device.type)
    amp = Precision(torch.bfloat16 if device.type == "cuda" else None, None)
    castonce = bool(opts.get("castonce")) and amp.amp is not None  # needs autocast (not the CPU's fp32)
    if castonce:
        weight_cast.cast_weights_once(model.parts, amp.amp, bool(opts.get("fused_wgrad")), opts.get("outer", True))
    accum = args.global_batch // args.micro_batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batches = (
            load_batch(dataset, micro_batch_indices(step, m, args.global_batch, args.micro_batch), device)
            for m in range(accum)
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, _ = train_step(model, opt, batches, accum, lr=args.lr, device=device, precision=amp,
                             fused_cross_entropy=opts["fused_ce"], grad_clip=1.0, attention=opts["attention"])
        if castonce:  # in the step's time, as the trainer does it after every optimizer step
            weight_cast.refresh(model.parts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(dt)
    profile = None
    if args.profile == name and not getattr(args, "profiled", False):
        profile = profile_step(model, opt, dataset, args, device, amp, opts)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    moe = moe_breakdown(model.model, args, device, amp, opts, statistics.median(times)) if times else None
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, losses, peak_mem, profile, moe


def moe_breakdown(model, args, device, amp, opts, step_s: float) -> dict | None:
    """Where a MoE block's time goes, compiled as the variant runs (dynamo drops the profiler's named
    ranges from compiled graphs): the first MoE layer's forward + backward on a micro-batch, and its
    experts' alone on a full capacity buffer (batched matmul, as the layer runs them; and through the
    grouped GEMM, for comparison); the difference is routing, dispatch and combine, and its share of
    the step counts every MoE block of every micro-batch. Capacity routing only (dropless sizes
    depend on the data)."""
    from llamatron.models.glam.routing import expert_capacity

    moes = [b.feed_forward for b in model.layers.values() if getattr(b, "moe", False)]
    if not moes or moes[0].capacity_factor <= 0 or moes[0].dispatch is not None:
        return None
    ff, dtype = moes[0], amp.amp or torch.float32
    E, dim = ff.experts.w1.shape[0], ff.router.weight.shape[1]
    rows = args.micro_batch * expert_capacity(args.seq_len, E, ff.capacity_factor)
    x = torch.randn(args.micro_batch, args.seq_len, dim, device=device, dtype=dtype, requires_grad=True)
    buf = torch.randn(E, rows, dim, device=device, dtype=dtype, requires_grad=True)
    wrap = (lambda f: torch.compile(f, fullgraph=True)) if opts["compile"] else (lambda f: f)
    block_ms = _fwd_bwd_ms(wrap(ff), x, device, amp)
    experts_ms = _fwd_bwd_ms(wrap(ff.experts), buf, device, amp)
    # The same rows through the grouped GEMM (the dropless path's kernel, equal groups): which kernel
    # the capacity buffer should use.
    counts = torch.full((E,), rows, device=device)
    grouped = lambda b: ff.experts(b.view(E * rows, dim), counts)  # noqa: E731
    # Not fullgraph: the grouped GEMM's support probe runs on the host (a graph break, once).
    grouped_ms = _fwd_bwd_ms(torch.compile(grouped) if opts["compile"] else grouped, buf, device, amp)
    ff.last_stats = None  # these forwards are not training's: keep them out of the router statistics
    for p in ff.parameters():
        p.grad = None
    accum = args.global_batch // args.micro_batch
    route_ms = max(block_ms - experts_ms, 0.0)
    hidden = ff.experts.w1.shape[2]
    experts_flop = 12.0 * E * rows * dim * hidden  # two products, forward + input and weight gradients
    return {"moe_layer_ms": block_ms, "experts_ms": experts_ms, "routing_dispatch_combine_ms": route_ms,
            "experts_tflops": experts_flop / (experts_ms * 1e-3) / 1e12,
            "experts_grouped_mm_ms": grouped_ms, "experts_grouped_mm_tflops": experts_flop / (grouped_ms * 1e-3) / 1e12,
            "moe_layers": len(moes), "routing_share_of_step": route_ms * 1e-3 * len(moes) * accum / step_s,
            "experts_share_of_step": experts_ms * 1e-3 * len(moes) * accum / step_s}


def _fwd_bwd_ms(fn, x, device, amp, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of fn(x)'s forward and backward (a random output gradient)."""
    grad = None
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with amp.autocast(device):
            y = fn(x)
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def categorize(kernel: str) -> str:
    k = kernel.lower()
    # "_band_": GLaM's band kernels in Triton (models/glam/band_kernel.py)
    attention = ("fmha", "flash", "cudnn", "attention", "sdpa", "fprop", "dgrad_", "_band_")
    if any(s in k for s in attention) and "gemm" not in k:
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul", "cublas")):
        return "gemm"
    if any(s in k for s in ("adam", "multi_tensor", "foreach", "norm_kernel", "l2norm")):
        return "optimizer"
    if any(s in k for s in ("nccl",)):
        return "communication"
    if any(s in k for s in ("memcpy", "memset")):
        return "memcpy/memset"
    return "element-wise/other"


def profile_step(model, opt, dataset, args, device, amp, opts) -> dict:
    from torch.profiler import ProfilerActivity, profile

    accum = args.global_batch // args.micro_batch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = args.warmup + args.steps
    batches = [load_batch(dataset, micro_batch_indices(step, m, args.global_batch, args.micro_batch), device)
               for m in range(accum)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        train_step(model, opt, iter(batches), accum, lr=args.lr, device=device, precision=amp,
                   fused_cross_entropy=opts["fused_ce"], grad_clip=1.0, attention=opts["attention"])
        if opts.get("castonce") and amp.amp is not None:
            weight_cast.refresh(model.parts)
        sync(device)
        wall = time.perf_counter() - t0
    return profile_summary(prof, wall)


def profile_summary(prof, wall: float) -> dict:
    """A profiled step's device time by kernel bucket, its named ranges and top kernels (also
    bench_finetune.py's)."""
    buckets: dict[str, float] = {}
    top: dict[str, float] = {}
    calls: dict[str, int] = {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cat = categorize(evt.key)
        buckets[cat] = buckets.get(cat, 0.0) + dev_us / 1e3
        # Whole names (inductor's end in a number that tells its kernels apart in TORCH_LOGS=output_code).
        top[evt.key[:200]] = top.get(evt.key[:200], 0.0) + dev_us / 1e3
        calls[evt.key[:200]] = calls.get(evt.key[:200], 0) + evt.count
    # Named ranges of the model (GLaM's moe.route / moe.experts / moe.combine): their forward time on
    # the device (the backward runs outside the ranges and lands in the kernel buckets only).
    ranges = {evt.key: getattr(evt, "device_time_total", 0) / 1e3 for evt in prof.key_averages()
              if evt.key.startswith("moe.")}
    # The eager ops that launched device time (the optimizer's foreach kernels, the loss's copies, autograd's
    # gradient sums): which line of code a kernel bucket comes from. Each op's own kernels (self time): the
    # totals with children counted some kernels many times over in a cast-once step (an H100, 2026-12-06).
    ops = {evt.key: getattr(evt, "self_device_time_total", 0) / 1e3 for evt in prof.key_averages()
           if evt.device_type == torch.autograd.DeviceType.CPU and evt.key.startswith("aten::")}
    busy = sum(buckets.values())
    buckets["idle (wall - kernels)"] = max(wall * 1e3 - busy, 0.0)
    return {"wall_ms": wall * 1e3, "buckets_ms": buckets, "ranges_ms": ranges,
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:40]),
            "top_kernel_calls": {k: calls[k] for k in sorted(top, key=lambda k: -top[k])[:40]},
            "top_ops_ms": dict(sorted(((k, v) for k, v in ops.items() if v > 0), key=lambda kv: -kv[1])[:25])}


def print_profile(profile: dict, what: str) -> None:
    print(f"\nprofile of {what} ({profile['wall_ms']:.1f} ms wall):")
    for k, v in sorted(profile["buckets_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v:8.1f} ms")
    for k, v in profile.get("ranges_ms", {}).items():
        print(f"  range {k:18s} {v:8.1f} ms (forward, device)")
    print("  top kernels:")
    for k, v in profile["top_kernels_ms"].items():
        print(f"    {v:8.1f} ms  {k}")
    print("  top eager ops (device time of their kernels):")
    for k, v in profile.get("top_ops_ms", {}).items():
        print(f"    {v:8.1f} ms  {k}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", "--model", dest="size", default="llama3.1-8b",
                   help="any registered size: llama3.1-8b, llama2-7b, gpt-126m, gpt-5b, ...")
    p.add_argument("--layers", type=int, default=4, help="proxy: this many layers (0: the size's own)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a model setting over the size's (repeatable), e.g. model.n_experts=8")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", default="1,8", help="comma-separated; every variant runs with each")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="Megatron prefix for real tokens (default: synthetic)")
    p.add_argument("--profile", default=None, help="variant whose extra step is profiled")
    p.add_argument("--json", default=None, help="write results here")
    cli = p.parse_args()

    device = torch.device(cli.device)
    try:
        margs = model_args(cli)
    except LlamatronError as e:
        print(f"bench_train_step.py: error: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = flops.peak_flops(name, "bf16")
    per_seq = flops.flops_per_sequence(margs, cli.seq_len)
    batch_sizes = [int(b) for b in cli.global_batch.split(",")]
    dataset = build_dataset(cli, margs.vocab_size, (cli.warmup + cli.steps + 2) * max(batch_sizes))
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device {name}; torch {torch.__version__}; {cli.size} x {cli.layers} layers{''.join(' ' + x for x in cli.sets)}; seq {cli.seq_len}; "
          f"micro batch {cli.micro_batch}; {precision}; {per_seq / 1e12:.2f} TFLOP per sequence "
          f"(NVIDIA recipe formula)", flush=True)
    results = []
    variants = [parse_variant(v) for v in cli.variants.split(",")]  # a misspelt name fails before any run
    for gbs in batch_sizes:
        for vname, opts, over in variants:
            if device.type != "cuda" and opts["attention"] in ("cudnn", "fa4"):
                continue
            args = argparse.Namespace(**{**vars(cli), "global_batch": gbs, **over})
            try:
                times, losses, mem, prof, moe = run_variant(vname, opts, margs, args, device, dataset)
            except Exception as e:  # noqa: BLE001 - one failing variant (OOM, a compile error) must not end the run
                error = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:500]}"
                if error != "OOM":
                    traceback.print_exc()
                print(f"{vname} (global batch {gbs}): {'out of memory' if error == 'OOM' else 'failed: ' + error}",
                      flush=True)
                results.append({"variant": vname, "global_batch": gbs, "error": error})
                write_json(cli.json, name, results)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            tps = flops.tokens_per_second(cli.seq_len, gbs, med)
            row = {
                "variant": vname, **opts, "layers": cli.layers, "model_sets": cli.sets, "seq_len": cli.seq_len,
                "micro_batch": args.micro_batch, "global_batch": gbs, "gqa": opts.get("gqa", "auto"),
                "precision": f"fp8 {opts['fp8']} + {precision}" if opts.get("fp8")
                else f"fp8 rowwise experts + {precision}" if opts.get("fp8_experts") else precision,
                "layout": "1 device", "step_time_s": med, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps,
                "tflops_per_gpu": gbs * per_seq / med / 1e12,
                "mfu": flops.mfu(margs, cli.seq_len, gbs, med, 1, peak),
                "mfu_fp8_peak": flops.mfu(margs, cli.seq_len, gbs, med, 1, flops.peak_flops(name, "fp8"))
                if opts.get("fp8") or opts.get("fp8_experts") else None,
                "peak_mem_gib": mem, "losses": losses, "step_times_s": times,
            }
            if prof:
                row["profile"] = prof
            if moe:
                row["moe"] = moe
            results.append(row)
            write_json(cli.json, name, results)
            summary = {k: row[k] for k in ("variant", "micro_batch", "global_batch", "gqa", "step_time_s",
                                            "tokens_per_s", "mfu", "peak_mem_gib")}
            print("SUMMARY " + json.dumps({**summary, "device": name, "torch": torch.__version__}), flush=True)
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            print(f"{vname:18s} gbs {gbs:3d} {med * 1e3:9.1f} ms {tps:10,.0f} tok/s {row['tflops_per_gpu']:7.1f} "
                  f"TFLOP/s MFU {mfu:>6s} mem {mem or 0:5.1f} GiB  loss {losses[0]:.4f} -> {losses[-1]:.4f}",
                  flush=True)
            if moe:
                print(f"{'':18s} MoE layer fwd+bwd {moe['moe_layer_ms']:.2f} ms: experts {moe['experts_ms']:.2f} "
                      f"({moe['experts_tflops']:.0f} TFLOP/s over the capacity buffer; grouped GEMM "
                      f"{moe['experts_grouped_mm_ms']:.2f} ms, {moe['experts_grouped_mm_tflops']:.0f} TFLOP/s), "
                      f"routing/dispatch/combine {moe['routing_dispatch_combine_ms']:.2f} "
                      f"({100 * moe['routing_share_of_step']:.1f}% of the step over {moe['moe_layers']} MoE layers; "
                      f"experts {100 * moe['experts_share_of_step']:.1f}%)", flush=True)

    ok = [r for r in results if "error" not in r]
    print()
    print("| variant | layers | seq | micro | global | precision | layout | step ms (median) | tokens/s | "
          "tokens/s/GPU | TFLOP/s/GPU | MFU | peak mem GiB | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ok:
        base = next((b for b in ok if b["variant"] == "baseline" and b["global_batch"] == r["global_batch"]), None)
        ratio = f"{base['step_time_s'] / r['step_time_s']:.2f}x" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"| {r['variant']} | {r['layers']} | {r['seq_len']} | {r['micro_batch']} | {r['global_batch']} | "
              f"{r['precision']} | 1 GPU | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {mfu} | {mem} | {ratio} |")
    # Same seed, same data: every variant's losses against the baseline's, step by step.
    for r in ok:
        base = next((b for b in ok if b["variant"] == "baseline" and b["global_batch"] == r["global_batch"]), None)
        if base and r is not base:
            diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"])]
            rel = max(d / abs(b) for d, b in zip(diffs, base["losses"]))
            print(f"losses {r['variant']} vs baseline (global batch {r['global_batch']}, {len(diffs)} steps): "
                  f"max |diff| {max(diffs):.4f}, max relative {rel:.2e}")
    for r in ok:
        if "profile" in r:
            print_profile(r["profile"], f"one {r['variant']} step, global batch {r['global_batch']}")
    write_json(cli.json, name, results)
    return 1 if any(r.get("error", "OOM") != "OOM" for r in results) else 0  # a failure, not a size


def write_json(path: str | None, device_name: str, results: list[dict]) -> None:
    """The results so far, whole or not at all (after every variant: a run cut short keeps what it measured)."""
    if not path:
        return
    meta = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv)}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
