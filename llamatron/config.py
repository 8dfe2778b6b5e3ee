"""Run configuration: typed dataclasses, one loader (TOML or YAML), `--set section.key=value` overrides.

Every key of every section can be given in the file or on the command line. Unknown keys, wrong types
and impossible combinations are rejected with a one-line error that names the key and the rule; each
section's checks sit next to its dataclass, and `validate_config` runs them all (plus the layout
against the world size, and MLPerf's rules in MLPerf mode).

Loading is three explicit steps: parse (defaults, file, overrides), derive (MLPerf mode fills in what
the rules derive from the global batch size, unless set explicitly), validate.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamatron.errors import LlamatronError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).parent / "presets"


def _need(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise LlamatronError(f"config key '{key}': {rule}")


@dataclass
class ModelConfig:
    # A named model of the registry (llamatron/models/registry.py): llama3.1-8b, llama3.1-70b,
    # llama3.1-405b, tiny, debug, ... Its family decides which other keys exist.
    size: str = "tiny"
    # Any field of the size's args dataclass (llamatron/models/<family>/model.py), given as
    # `model.KEY = VALUE`, replaces the size's value: `model.n_layers = 4` on a real size makes a
    # layer-reduced proxy. Kept here, typed against the family when the model is resolved.
    overrides: dict[str, Any] = field(default_factory=dict)


def resolve_model(model: ModelConfig):
    """(family, args) of the `[model]` section: the named size with its overrides, each checked
    against the family's args type, then the family's own checks."""
    from llamatron.models import registry

    entry = registry.get(model.size)
    hints = typing.get_type_hints(entry.family.args_type)
    values = {}
    for key, value in model.overrides.items():
        if key not in hints:
            raise LlamatronError(f"config key 'model.{key}': the {entry.family.name} family has no such setting; "
                                 f"its keys: size, {', '.join(hints)}")
        values[key] = _coerce(value, hints[key], f"model.{key}")
    args = dataclasses.replace(entry.args, **values)
    entry.family.validate(args)
    return entry.family, args


@dataclass
class DataConfig:
    # Megatron data prefixes (PATH for PATH.bin/PATH.idx). Several train prefixes are blended by weight.
    train: list[str] = field(default_factory=list)
    train_weights: list[float] | None = None  # one weight per train prefix; None = equal weights
    valid: str | None = None
    mock: bool = False  # synthetic random tokens instead of files (benchmarking)
    tokenizer: str = "llama3"  # name or path; its vocabulary must fit the model's
    seq_len: int = 256
    seed: int = 1234  # sample-order seed (Megatron's GPTDataset random_seed)
    # Sample-index cache files (Megatron's .npy files), written once and then memory-mapped by every
    # rank and later run. None = Megatron's default place, next to the data (PREFIX/cache/
    # GPTDataset_indices for the first train prefix), or OUT/cache when that cannot be written.
    cache_dir: str | None = None
    cache_index: bool = True  # false: no cache files; each rank builds the index in memory every run


def _validate_data(data: DataConfig, max_seq_len: int, sft: bool = False) -> None:
    _need(data.seq_len > 0, "data.seq_len", f"must be positive, got {data.seq_len}")
    _need(data.seq_len <= max_seq_len, "data.seq_len",
          f"{data.seq_len} exceeds the model's max_seq_len {max_seq_len} (set model.max_seq_len)")
    _need(data.mock or bool(data.train) or sft, "data.train",
          "give at least one data prefix, set data.mock=true, or fine-tune on finetune.data")
    if data.train_weights is not None:
        _need(len(data.train_weights) == len(data.train), "data.train_weights",
              f"{len(data.train_weights)} weights for {len(data.train)} train prefixes")
        _need(all(w > 0 for w in data.train_weights), "data.train_weights", "weights must be positive")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # end of the cosine
    warmup_steps: int = 0
    schedule_steps: int | None = None  # cosine length in steps (MLPerf: max_steps); None = train.steps
    weight_decay: float = 0.1  # not applied to 1-D tensors (norms), as Megatron
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel; None = on for CUDA
    # "adamw": torch's AdamW, two fp32 moments (8 bytes per trainable parameter). "adamw8bit":
    # torchao's AdamW8bit, the moments in blockwise 8-bit (2.03 bytes), fp32 master weights kept:
    # what lets a full fine-tune of 8B fit one GPU with room, or 70B one 8-GPU node (docs/finetune.md).
    name: str = "adamw"


OPTIMIZERS = ("adamw", "adamw8bit")


def _validate_optim(optim: OptimConfig) -> None:
    _need(optim.lr >= 0 and optim.min_lr >= 0, "optim.lr", "learning rates must be >= 0")
    _need(optim.min_lr <= optim.lr, "optim.min_lr", f"{optim.min_lr} must not exceed optim.lr {optim.lr}")
    _need(optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {optim.warmup_steps}")
    _need(0 <= optim.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {optim.beta1}")
    _need(0 <= optim.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {optim.beta2}")
    _need(optim.eps > 0, "optim.eps", f"must be positive, got {optim.eps}")
    _need(optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")
    _need(optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {optim.grad_clip}")
    _need(optim.name in OPTIMIZERS, "optim.name", f"must be one of {', '.join(OPTIMIZERS)}, got {optim.name!r}")
    _need(not (optim.fused and optim.name != "adamw"), "optim.fused",
          f"torch's fused AdamW kernel; optim.name={optim.name} has its own (compiled) step")
    if optim.schedule_steps is not None:
        _need(optim.schedule_steps >= optim.warmup_steps, "optim.schedule_steps",
              f"{optim.schedule_steps} must be >= warmup_steps {optim.warmup_steps}")


FP8_RECIPES = ("none", "tensorwise", "rowwise")
# A linear layer's three GEMMs, by torchao's names (Float8LinearConfig.gemm_config_*): the forward
# product, the input gradient's and the weight gradient's.
FP8_GEMMS = ("output", "grad_input", "grad_weight")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "fa4", "efficient", "math")


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps to run in total (a resumed run continues to this count)
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward; the rest is gradient accumulation
    seed: int = 1234  # model init seed
    device: str = "auto"  # auto (cuda if available), cuda, cpu
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu), bf16, fp32
    compile: bool = False  # torch.compile each transformer block
    # With compile: inductor's coordinate-descent tuning of the kernels it generates (block sizes timed
    # as they compile): the 8B proxy's FP8 step at micro 8 0.6-1.7% faster (H100, H200), at micro 4
    # 0.9-1.1% (H100; 0.0% on the H200), nothing in BF16 (H200); about 100 s more compile
    # (docs/performance.md). None: on where it paid, FP8 training (not LoRA's frozen FP8 bases, not
    # measured); off in BF16.
    compile_tuning: bool | None = None
    activation_checkpointing: bool = False
    # With activation_checkpointing: how many transformer blocks (per pipeline stage) to checkpoint,
    # spread evenly; None = all. Fewer blocks: less recomputation, more activation memory.
    activation_checkpointing_layers: int | None = None
    fused_cross_entropy: bool = True  # output layer + loss in chunks, never the full fp32 logits
    # FP8 linear layers through torchao (llamatron/parallel/fp8.py): none, tensorwise or rowwise
    # dynamic scaling. Needs an FP8 GPU (H100 and newer) and torchao; the rest of the model stays bf16.
    fp8: str = "none"
    fp8_min_features: int = 1024  # linears with a dimension below this stay bf16 (too small to gain)
    # Also the output layer's GEMMs (inside the fused loss). None: on for tensorwise FP8 where the loss
    # is fused (tp = pp = 1), without LoRA: the fastest measured, and it converged within 0.6% of BF16
    # (docs/performance.md); false keeps the 128K-way softmax's inputs in bf16.
    fp8_include_output: bool | None = None
    fp8_all_gather: bool = False  # FSDP gathers weights in FP8 (tensorwise only): half the traffic
    # Tensorwise FP8 without fp8_all_gather or LoRA: each SwiGLU feed-forward's gate and up projections
    # and its activation in one function whose backward makes their E5M2 gradients in llamatron's own
    # kernels (transforms/fp8_swiglu.py) instead of torchao's casts compiled by inductor. Opt-in: its
    # step ran 0.5-0.6% slower than the default's (H100, docs/performance.md), before its down projection
    # got h already in FP8 (one amax pass less a call) and its weights cast once: not yet timed since.
    fp8_fused_swiglu: bool = False
    # The FP8 GEMMs (of FP8_GEMMS) that sum in the tensor cores alone, without cuBLAS's periodic promotion
    # of the partial sums to fp32 (llamatron.fp8_gemm.FastAccum), in the trained FP8 linears (torchao's, the
    # fused SwiGLU's) and the fused loss's output layer: faster, less exact over long sums. The default is
    # torchao's recipe (and Transformer Engine's): the forward product only; the gradients' GEMMs sum over
    # up to 128K terms. LoRA's frozen FP8 bases (transforms/fp8_frozen.py) promote in all their GEMMs.
    fp8_fast_accum: list[str] = field(default_factory=lambda: ["output"])
    # A mixture of experts' grouped GEMMs in FP8 too (torchao's rowwise grouped recipe, whatever
    # train.fp8 names; H100-class GPUs), by the same fp8_min_features rule; false keeps them bf16.
    fp8_experts: bool = True
    # bf16 autocast without FSDP or TP: the block linears' (and a MoE's experts') bf16 weight copies made
    # once per optimizer step instead of in every micro-batch; the same numbers (transforms/weight_cast.py).
    # With tensorwise train.fp8 the FP8 layers keep E4M3 copies the same way (transforms/fp8_weight_cast.py),
    # and the fused loss keeps the output layer's copies between steps (transforms/outer_weights.py).
    # Unset: on where it was measured faster and costs no memory at the peak (weight_cast.wanted: one CUDA
    # GPU, several micro-batches a step, no activation checkpointing or LoRA, train.fp8 none or tensorwise).
    cast_weights_once: bool | None = None
    # With cast_weights_once: each micro-batch's weight gradient accumulated into an fp32 buffer inside
    # the GEMM (Megatron's gradient_accumulation_fusion), not a bf16 product added into .grad after it; the
    # embedding's and output layer's gradients into fp32 buffers too (the embedding's just its rows).
    # Unset: as cast_weights_once.
    gradient_accumulation_fusion: bool | None = None
    # bf16 autocast over fp32 weights (one GPU, no FSDP): the residual stream between blocks in bf16, as
    # Megatron and FSDP's bf16 gather keep it, not fp32 (transforms/residual.py). On by default since its
    # 2,000-step convergence check (docs/performance.md); false keeps the fp32 stream.
    bf16_residual: bool = True
    attention_backend: str = "auto"  # SDPA kernel: auto (torch's choice), cudnn, flash, fa4, efficient, math
    deterministic: bool = False  # torch deterministic algorithms (slower)
    out_dir: str = "runs/default"
    log_every: int = 1
    threads: int | None = None  # CPU threads for torch; None = torch's default
    # A step whose loss or gradient norm is NaN/inf on any rank: "stop" (the run ends with an error
    # naming the step and its samples; no update is applied) or "skip" (no update, the batch is
    # dropped, the step counts in metrics as skipped_steps). See docs/reliability.md.
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10  # with skip: this many skipped steps in a row stop the run anyway
    grad_spike_factor: float = 5.0  # log a spike when the grad norm > factor x median of recent steps; 0 = off


def _validate_train(train: TrainConfig) -> None:
    _need(train.steps >= 0, "train.steps", f"must be >= 0, got {train.steps}")
    _need(train.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {train.micro_batch_size}")
    _need(train.global_batch_size > 0, "train.global_batch_size", f"must be positive, got {train.global_batch_size}")
    _need(train.fp8 in FP8_RECIPES, "train.fp8", f"must be one of {', '.join(FP8_RECIPES)}, got {train.fp8!r}")
    _need(train.fp8_min_features >= 0, "train.fp8_min_features", f"must be >= 0, got {train.fp8_min_features}")
    _need(not train.fp8_all_gather or train.fp8 == "tensorwise", "train.fp8_all_gather",
          f"FP8 all-gather needs train.fp8 = tensorwise, got {train.fp8!r}")
    _need(not train.fp8_fused_swiglu or (train.fp8 == "tensorwise" and not train.fp8_all_gather), "train.fp8_fused_swiglu",
          f"needs train.fp8 = tensorwise without train.fp8_all_gather, got fp8 = {train.fp8!r}, "
          f"fp8_all_gather = {str(train.fp8_all_gather).lower()}")
    _need(set(train.fp8_fast_accum) <= set(FP8_GEMMS), "train.fp8_fast_accum",
          f"must list some of {', '.join(FP8_GEMMS)}, got {train.fp8_fast_accum!r}")
    _need(train.compile or not train.compile_tuning, "train.compile_tuning",
          "tunes the compiled blocks' kernels: needs train.compile = true")
    _need(not (train.cast_weights_once and train.fp8 == "rowwise"), "train.cast_weights_once",
          "casts tensorwise FP8 weights once; rowwise FP8 layers cast in every micro-batch "
          "(set train.fp8 = tensorwise, or cast_weights_once = false)")
    _need(train.cast_weights_once is not False or not train.gradient_accumulation_fusion, "train.gradient_accumulation_fusion",
          "needs train.cast_weights_once (it accumulates the gradients of the layers that one converts)")
    _need(not (train.fp8_all_gather and train.fp8_include_output), "train.fp8_include_output",
          "not with train.fp8_all_gather (the fused loss takes the gathered output weight in bf16)")
    _need(train.activation_checkpointing_layers is None or train.activation_checkpointing_layers >= 0,
          "train.activation_checkpointing_layers", f"must be >= 0, got {train.activation_checkpointing_layers}")
    _need(train.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {train.device!r}")
    _need(train.precision in ("auto", "bf16", "fp32"), "train.precision",
          f"must be auto, bf16 or fp32, got {train.precision!r}")
    _need(train.attention_backend in ATTENTION_BACKENDS, "train.attention_backend",
          f"must be one of {', '.join(ATTENTION_BACKENDS)}, got {train.attention_backend!r}")
    _need(train.log_every > 0, "train.log_every", f"must be positive, got {train.log_every}")
    _need(train.threads is None or train.threads > 0, "train.threads", f"must be positive, got {train.threads}")
    _need(train.nonfinite in ("stop", "skip"), "train.nonfinite", f"must be stop or skip, got {train.nonfinite!r}")
    _need(train.nonfinite_max_skips >= 1, "train.nonfinite_max_skips", f"must be >= 1, got {train.nonfinite_max_skips}")
    _need(train.grad_spike_factor == 0 or train.grad_spike_factor > 1, "train.grad_spike_factor",
          f"must be 0 (off) or > 1, got {train.grad_spike_factor}")


@dataclass
class EvalConfig:
    every: int = 0  # validate every N steps; 0 = only at the end
    # Validate every N training sequences instead, i.e. every ceil(N / global_batch_size) steps: MLPerf
    # states its cadences in sequences, so they follow a change of batch size. 0 = use `every`.
    every_samples: int = 0
    # The first in-training validation is at the end of this interval (MLPerf 405B skips the early
    # ones: floor(0.0026 x GBS + 12)); later ones at every interval.
    first_interval: int = 1
    samples: int = 64  # validation windows, the first N unshuffled ones
    micro_batch_size: int | None = None  # None = train.micro_batch_size
    at_start: bool = True  # also validate before the first step
    # Zero-shot tasks scored with each validation (llamatron/eval/tasks), as NAME=PATH.jsonl entries:
    # ["lambada=data/lambada.jsonl", "boolq=data/boolq.jsonl"]; data.tokenizer makes the tokens.
    tasks: list[str] = field(default_factory=list)
    tasks_limit: int | None = None  # only the first N items of each task file
    tasks_batch_size: int = 8  # requests per forward
    tasks_prompt: str = "harness"  # harness or pax (the prompt variants of docs/evaluate.md)


def _validate_eval(ev: EvalConfig) -> None:
    _need(ev.every >= 0, "eval.every", f"must be >= 0, got {ev.every}")
    _need(ev.samples >= 0, "eval.samples", f"must be >= 0, got {ev.samples}")
    _need(ev.micro_batch_size is None or ev.micro_batch_size > 0, "eval.micro_batch_size",
          f"must be positive, got {ev.micro_batch_size}")
    _need(ev.every_samples >= 0, "eval.every_samples", f"must be >= 0, got {ev.every_samples}")
    _need(ev.first_interval >= 1, "eval.first_interval", f"must be >= 1, got {ev.first_interval}")
    for item in ev.tasks:
        _need(item.partition("=")[1] == "=" and all(item.partition("=")[::2]), "eval.tasks",
              f"entry {item!r} must be NAME=PATH.jsonl (e.g. lambada=data/lambada.jsonl)")
    _need(ev.tasks_limit is None or ev.tasks_limit >= 1, "eval.tasks_limit", f"must be >= 1, got {ev.tasks_limit}")
    _need(ev.tasks_batch_size >= 1, "eval.tasks_batch_size", f"must be >= 1, got {ev.tasks_batch_size}")
    _need(ev.tasks_prompt in ("harness", "pax"), "eval.tasks_prompt", f"must be harness or pax, got {ev.tasks_prompt!r}")


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: write no checkpoint at all (benchmarks: an 8B one is ~96 GB)
    every: int = 0  # save every N steps; 0 = only at the end
    keep: int = 2  # complete checkpoints to keep (older ones are deleted)
    resume: bool = True  # continue from the newest complete checkpoint in out_dir, if any
    init_from: str | None = None  # start from this checkpoint's model weights (fresh optimizer)
    # false: checkpoints leave out frozen parameters (LoRA: adapter-only, small); on resume the frozen
    # weights come from init_from again (or, without it, from the seed, as at the start).
    save_frozen: bool = True
    # Resume even though the config changed the model, the data order or the global batch since the
    # checkpoint (llamatron/train/resume_check.py); the run then no longer continues exactly.
    allow_config_change: bool = False
    # Write in a background thread (torch DCP async_save) after a copy to host memory; training waits
    # only for the copy. None = on for CUDA runs (docs/performance.md, "Asynchronous checkpoints").
    async_save: bool | None = None
    # Check every file of a checkpoint against the checksums written at its save before resuming from
    # it or loading init_from (docs/reliability.md, "Checksums"); false skips the read of the whole
    # checkpoint this costs.
    verify: bool = True
    # A damaged newest checkpoint at resume: false fails naming the checkpoint before it; true moves
    # it aside (step_N.damaged) and resumes from the newest intact one.
    fallback: bool = False


def _validate_checkpoint(ck: CheckpointConfig) -> None:
    _need(ck.every >= 0, "checkpoint.every", f"must be >= 0, got {ck.every}")
    _need(ck.keep >= 1, "checkpoint.keep", f"must be >= 1, got {ck.keep}")


@dataclass
class FinetuneConfig:
    # Supervised fine-tuning (docs/finetune.md): a JSONL file of examples (prompt/completion, alpaca
    # instruction/input/output, chat messages, or BoolQ passage/question/label). Set, it replaces
    # data.train / data.valid; data.seq_len is the length of the padded or packed sequences, and
    # data.tokenizer tokenizes the examples. Start from pretrained weights with checkpoint.init_from.
    data: str | None = None
    # Held-out examples in the same layouts: the validation loss (mean NLL over their response tokens)
    # at the eval cadence, over the first eval.samples sequences they pack into, in file order.
    valid: str | None = None
    template: str = "auto"  # chat template: auto (llama3 for Llama 3's tokenizer, else plain), llama3, llama2, plain
    train_on_input: bool = False  # false: loss on the response tokens only (prompt labels masked -100)
    packing: bool = True  # several examples per sequence (document-masked attention); false: one, padded
    packing_algorithm: str = "best_fit_decreasing"  # or greedy (in order, as torchtune): llamatron/data/packing.py
    too_long: str = "truncate"  # an example longer than data.seq_len + 1 tokens: truncate, drop or error
    cache_dir: str | None = None  # where the tokenized cache goes; None = beside the JSONL file


FINETUNE_TOO_LONG = ("truncate", "drop", "error")


@dataclass
class LoraConfig:
    # LoRA adapters (llamatron/transforms/lora.py): rank 0 = off (full fine-tuning). Only the adapters
    # train and sit in the optimizer; the base weights are frozen.
    rank: int = 0
    alpha: float = 16.0  # scaling alpha / rank (Pax's LoRA, which has no factor: alpha = rank)
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["all"])  # all, attention, mlp, or layer names (wq, q_proj, ...)
    peft_out: str | None = None  # at the end, write the adapter here in Hugging Face PEFT format
    # The frozen linear weights' storage: auto (bf16 when the step runs under bf16 autocast, i.e. on a
    # GPU without FSDP, and without tensor parallelism; else fp32), fp32, bf16. bf16 halves them and
    # drops autocast's per-use copies, with bit-identical products (autocast rounds them to bf16 anyway).
    base_dtype: str = "auto"


LORA_BASE_DTYPES = ("auto", "fp32", "bf16")


def _validate_finetune(cfg: "Config") -> None:
    ft, lora, p = cfg.finetune, cfg.lora, cfg.parallel
    from llamatron.data.chat_templates import TEMPLATES

    _need(ft.template in TEMPLATES, "finetune.template", f"must be one of {', '.join(TEMPLATES)}, got {ft.template!r}")
    _need(ft.too_long in FINETUNE_TOO_LONG, "finetune.too_long",
          f"must be one of {', '.join(FINETUNE_TOO_LONG)}, got {ft.too_long!r}")
    from llamatron.data.packing import PACKING_ALGORITHMS

    _need(ft.packing_algorithm in PACKING_ALGORITHMS, "finetune.packing_algorithm",
          f"must be one of {', '.join(PACKING_ALGORITHMS)}, got {ft.packing_algorithm!r}")
    _need(not ft.valid or bool(ft.data), "finetune.valid", "validation examples need training ones (finetune.data)")
    if ft.data:
        _need(p.pp == 1 and p.cp == 1, "finetune.data",
              "fine-tuning data runs without pipeline or context parallelism (parallel.pp = parallel.cp = 1)")
    _need(lora.rank >= 0, "lora.rank", f"must be >= 0 (0 = off), got {lora.rank}")
    if lora.rank:
        _need(lora.alpha > 0, "lora.alpha", f"must be positive, got {lora.alpha}")
        _need(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
        _need(bool(lora.targets), "lora.targets", "name at least one target (all, attention, mlp or layer names)")
        _need(lora.base_dtype in LORA_BASE_DTYPES, "lora.base_dtype",
              f"must be one of {', '.join(LORA_BASE_DTYPES)}, got {lora.base_dtype!r}")
        _need(lora.base_dtype != "bf16" or cfg.train.precision != "fp32", "lora.base_dtype",
              "bf16 base weights need bf16 compute (train.precision = bf16, or auto on a GPU)")
        _need(lora.base_dtype != "bf16" or p.tp == 1, "lora.base_dtype",
              "bf16 base weights do not run under tensor parallelism (parallel.tp = 1, or base_dtype = auto)")
        if cfg.train.fp8 != "none":  # the frozen base layers' GEMMs in FP8 (transforms/fp8_frozen.py)
            _need(cfg.train.fp8 == "tensorwise", "train.fp8",
                  f"LoRA runs its frozen base layers in FP8 with the tensorwise recipe only, got {cfg.train.fp8!r}")
            _need(not cfg.train.fp8_include_output, "train.fp8_include_output",
                  "not with LoRA: the frozen output layer's GEMMs stay bf16 in the fused loss")
            _need(lora.base_dtype != "fp32", "lora.base_dtype", "LoRA with train.fp8 needs bf16 base weights (auto or bf16)")
            _need(not cfg.train.fp8_fused_swiglu, "train.fp8_fused_swiglu",
                  "not with LoRA: its frozen base layers run their FP8 GEMMs their own way (transforms/fp8_frozen.py)")
    _need(lora.peft_out is None or lora.rank > 0, "lora.peft_out", "exporting an adapter needs lora.rank > 0")


@dataclass
class ParallelConfig:
    # The layout of world_size = dp_replicate x dp_shard x cp x tp x pp processes (torchrun ranks).
    dp_replicate: int = 1  # data-parallel replicas (HSDP: FSDP within a replica, all-reduce across)
    dp_shard: int = -1  # FSDP degree: parameters, gradients and optimizer state sharded; -1 = what is left
    tp: int = 1  # tensor parallel with sequence parallel (DTensor); divides n_heads, n_kv_heads, seq_len
    pp: int = 1  # pipeline stages (torch.distributed.pipelining); n_layers split evenly
    pp_virtual_stages: int = 1  # stages per pipeline rank (> 1: interleaved schedule)
    pp_schedule: str = "auto"  # gpipe, 1f1b, interleaved1f1b; auto = 1f1b, or interleaved1f1b when virtual > 1
    cp: int = 1  # context parallel: each rank holds 2 of 2*cp chunks of every sequence (load-balanced)
    # expert parallel (MoE families): each MoE block's experts split over ep of the dp_shard ranks (ep divides
    # dp_shard), tokens exchanged by all-to-all, the experts FSDP-sharded over the other dp_shard / ep;
    # combines with dp_replicate and tp, not with cp or pp
    ep: int = 1


PP_SCHEDULES = ("auto", "gpipe", "1f1b", "interleaved1f1b")


def resolve_dp_shard(p: ParallelConfig, world_size: int) -> int:
    """dp_shard with -1 filled in from the world size (the caller has checked divisibility)."""
    if p.dp_shard != -1:
        return p.dp_shard
    return max(world_size // (p.dp_replicate * p.cp * p.tp * p.pp), 1)


def pp_schedule_name(p: ParallelConfig) -> str:
    if p.pp_schedule != "auto":
        return p.pp_schedule
    return "interleaved1f1b" if p.pp_virtual_stages > 1 else "1f1b"



# Megatron's --make-vocab-size-divisible-by default: each tensor-parallel rank's share of the
# vocabulary a multiple of 128 rows.
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """`vocab_size` rounded up as Megatron pads it: to a multiple of 128 x tp."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def _vocab_padding(vocab_size: int, tp: int) -> str:
    return (f"; pad the vocabulary as Megatron does (a multiple of {VOCAB_MULTIPLE} x tp): --set "
            f"model.vocab_size={padded_vocab_size(vocab_size, tp)} (the token ids stay below "
            f"{vocab_size:,}: the extra rows are never targets)")


def _validate_parallel(cfg: "Config", family, args, world_size: int | None) -> None:
    """Each degree alone, then against the model shape and the batch, then against the world size
    (when known: the trainer, under torchrun)."""
    p, train, seq_len = cfg.parallel, cfg.train, cfg.data.seq_len
    for key in ("dp_replicate", "tp", "pp", "pp_virtual_stages", "cp"):
        _need(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    _need(p.dp_shard >= 1 or p.dp_shard == -1, "parallel.dp_shard", f"must be >= 1, or -1 (fill), got {p.dp_shard}")
    _need(p.pp_schedule in PP_SCHEDULES, "parallel.pp_schedule",
          f"must be one of {', '.join(PP_SCHEDULES)}, got {p.pp_schedule!r}")
    schedule = pp_schedule_name(p)
    if p.pp_virtual_stages > 1:
        _need(schedule == "interleaved1f1b", "parallel.pp_schedule",
              f"{schedule} runs one stage per rank; pp_virtual_stages {p.pp_virtual_stages} needs interleaved1f1b")
    _need(train.fp8 == "none" or p.tp == 1, "train.fp8", "FP8 with tensor parallelism (parallel.tp > 1) is not supported yet")
    for key, size in family.tp_divisible(args).items():
        _need(size % p.tp == 0, "parallel.tp",
              f"{key} {size} must be divisible by tp {p.tp}" + (_vocab_padding(size, p.tp) if key == "vocab_size" else ""))
    _need(seq_len % p.tp == 0, "parallel.tp",
          f"data.seq_len {seq_len} must be divisible by tp {p.tp} (sequence parallel shards the sequence)")
    stages = p.pp * p.pp_virtual_stages
    _need(args.n_layers % stages == 0, "parallel.pp",
          f"n_layers {args.n_layers} must be divisible by pp x pp_virtual_stages = {p.pp} x {p.pp_virtual_stages}")
    _need(p.cp == 1 or seq_len % (2 * p.cp) == 0, "parallel.cp",
          f"data.seq_len {seq_len} must be divisible by 2 x cp = {2 * p.cp} (each rank holds 2 load-balanced chunks)")
    for key in family.unsupported_parallel:
        _need(getattr(p, key) == 1, f"parallel.{key}", f"the {family.name} family does not support it: must be 1")
    _validate_expert_parallel(p, args, world_size)
    fixed = p.dp_replicate * p.cp * p.tp * p.pp
    if world_size is not None:
        if p.dp_shard == -1:
            _need(world_size % fixed == 0, "parallel.dp_shard",
                  f"-1 fills the world size {world_size}, which is not divisible by dp_replicate x cp x tp x pp = {fixed}")
        else:
            _need(fixed * p.dp_shard == world_size, "parallel.dp_shard",
                  f"dp_replicate x dp_shard x cp x tp x pp = {p.dp_replicate} x {p.dp_shard} x {p.cp} x {p.tp} x {p.pp} "
                  f"= {fixed * p.dp_shard}, but the world size is {world_size} (set dp_shard=-1 to fill)")
    _validate_batch(train, p, world_size)


def _validate_expert_parallel(p: ParallelConfig, args, world_size: int | None) -> None:
    _need(p.ep >= 1, "parallel.ep", f"must be >= 1, got {p.ep}")
    if p.ep == 1:
        return
    n_experts = getattr(args, "n_experts", 0)
    _need(n_experts > 0, "parallel.ep", "the model has no experts (expert parallelism is for MoE families)")
    _need(n_experts % p.ep == 0, "parallel.ep", f"n_experts {n_experts} must be divisible by ep {p.ep}")
    _need(p.cp == p.pp == 1, "parallel.ep",
          f"expert parallelism combines with dp_shard (its ranks), dp_replicate and tp only: cp and pp must be 1, "
          f"got cp {p.cp}, pp {p.pp}")
    if world_size is not None or p.dp_shard != -1:
        dp_shard = resolve_dp_shard(p, world_size) if world_size is not None else p.dp_shard
        _need(dp_shard % p.ep == 0, "parallel.ep",
              f"must divide the FSDP degree dp_shard {dp_shard} (the experts are FSDP-sharded over dp_shard / ep), "
              f"got {p.ep}")


def _validate_batch(train: "TrainConfig", p: ParallelConfig, world_size: int | None) -> None:
    # Without a world size, dp_shard=-1 counts as 1: every check below is then a necessary condition
    # (a larger data-parallel size only adds to it), and the trainer repeats them with the real size.
    fixed = p.dp_replicate * p.cp * p.tp * p.pp
    known = world_size is not None or p.dp_shard != -1
    dp = p.dp_replicate * resolve_dp_shard(p, world_size if world_size is not None else fixed * max(p.dp_shard, 1))
    _need(train.global_batch_size % (train.micro_batch_size * dp) == 0, "train.global_batch_size",
          f"{train.global_batch_size} must be divisible by micro_batch_size x data-parallel size "
          f"= {train.micro_batch_size} x {dp}")
    micro_batches = train.global_batch_size // (train.micro_batch_size * dp)
    if p.pp > 1:
        _need(micro_batches >= p.pp, "train.global_batch_size",
              f"the pipeline needs at least pp = {p.pp} micro-batches per step and rank, got global_batch_size / "
              f"(micro_batch_size x data-parallel size) = {micro_batches}")
        rounds = max(1, micro_batches // p.pp)
        if pp_schedule_name(p) == "interleaved1f1b" and known:
            _need(micro_batches % rounds == 0, "train.global_batch_size",
                  f"interleaved1f1b needs the {micro_batches} micro-batches per step to be a multiple of "
                  f"{rounds} (micro-batches // pp)")


@dataclass
class LaunchConfig:
    # `llamatron launch`: the Slurm job(s) that run this config. Each job starts one torchrun per node
    # (srun --ntasks-per-node=1) with a c10d rendezvous on the job's first node; see llamatron/launch.py.
    account: str = ""  # sbatch --account; "" = your default account
    partition: str = ""  # sbatch --partition; "" = the cluster's default partition
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 8  # sbatch --gpus-per-node; 0 = request no GPUs (CPU runs)
    nproc_per_node: int = 0  # training processes per node; 0 = gpus_per_node
    time: str = "04:00:00"  # wall-clock limit of each job (sbatch --time)
    jobs: int = 1  # consecutive jobs (the reference's NPAR), chained with afterany; each resumes the run
    job_name: str = "llamatron"
    container_image: str = ""  # pyxis/enroot image (srun --container-image); "" = run on the host
    container_mounts: list[str] = field(default_factory=list)  # "SRC:DST[:FLAGS]" (srun --container-mounts)
    env: dict[str, str] = field(default_factory=dict)  # environment of the job; values are literal (no $ expansion)
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--exclusive", "--mem=0"]
    srun_args: list[str] = field(default_factory=list)  # more srun options for the training step
    rdzv_port: int = 29500  # c10d rendezvous port on the first node
    # Slurm sends USR1 this many seconds before the time limit: training checkpoints, exits 75, and the
    # job requeues itself; also how long torchrun lets workers finish after a stop signal. 0 = off.
    signal_seconds: int = 120
    python: str = ""  # the Python that runs llamatron on the nodes; "" = this one, or `python` in a container


# What sbatch reads from an `#SBATCH --key=value` line: a value with none of these can be written
# there (double-quoted when it holds spaces); anything else would change the line's meaning.
SBATCH_UNSAFE = re.compile(r"[\n\r\"'\\`$]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _validate_launch(lc: LaunchConfig, ck: CheckpointConfig) -> None:
    need = _need
    need(lc.nodes >= 1, "launch.nodes", f"must be >= 1, got {lc.nodes}")
    need(lc.gpus_per_node >= 0, "launch.gpus_per_node", f"must be >= 0, got {lc.gpus_per_node}")
    need(lc.nproc_per_node >= 0, "launch.nproc_per_node", f"must be >= 0 (0 = gpus_per_node), got {lc.nproc_per_node}")
    need(lc.nproc_per_node > 0 or lc.gpus_per_node > 0, "launch.nproc_per_node",
         "with gpus_per_node = 0 (a CPU job), give the number of training processes per node")
    need(lc.jobs >= 1, "launch.jobs", f"must be >= 1, got {lc.jobs}")
    need(lc.jobs == 1 or ck.enabled, "launch.jobs",
         f"{lc.jobs} consecutive jobs continue from checkpoints, but checkpoint.enabled is false")
    need(lc.jobs == 1 or ck.resume, "launch.jobs",
         f"{lc.jobs} consecutive jobs continue from checkpoints, but checkpoint.resume is false")
    need(1 <= lc.rdzv_port <= 65535, "launch.rdzv_port", f"must be a TCP port (1-65535), got {lc.rdzv_port}")
    need(lc.signal_seconds >= 0, "launch.signal_seconds", f"must be >= 0, got {lc.signal_seconds}")
    for key in ("account", "partition", "time", "job_name"):
        value = getattr(lc, key)
        need(not SBATCH_UNSAFE.search(value), f"launch.{key}",
             f"{value!r}: quotes, backslashes, $, ` and line breaks cannot go into an #SBATCH line")
    need(bool(lc.job_name.strip()), "launch.job_name", "must not be empty")
    for arg in lc.sbatch_args:
        need(arg.startswith("-") and "\n" not in arg and "\r" not in arg,
             "launch.sbatch_args", f"{arg!r}: each entry is one sbatch option (starting with -) on one line")
    for mount in lc.container_mounts:
        need(bool(mount) and "," not in mount and ":" in mount, "launch.container_mounts",
             f"{mount!r}: each entry is SRC:DST[:FLAGS], without commas")
    for name in lc.env:
        need(bool(_ENV_NAME.fullmatch(name)), "launch.env", f"{name!r} is not an environment variable name")


@dataclass
class MLPerfConfig:
    # MLPerf Training benchmark mode (llamatron/mlperf.py): "" = off, llama31_8b or llama31_405b. On, the
    # [optim], [train] and [eval] values the rules derive from train.global_batch_size are filled in
    # unless set explicitly, the run stops with status success at the first validation that reaches
    # `target`, and rank 0 writes the MLPerf log to OUT/mlperf.log (continued by resumed jobs).
    benchmark: str = ""
    target: float | None = None  # validation log perplexity to stop at; None = the rules' (8B 3.3, 405B 5.6)
    # rules: the current rules' evaluation cadence (8B every 12,288 sequences over 1,024; 405B every
    # 18,432, the first after floor(0.0026 x GBS + 12) intervals, over 5,760); readme: the seed
    # README's (every 46,080 over 5,760). Explicit eval.* keys win over either.
    eval_cadence: str = "rules"
    # closed: values the compliance checker tests are enforced at config time; open: anything goes.
    division: str = "closed"
    clear_caches: bool = True  # drop the OS page cache at start (Linux, as root); logged as cache_clear
    org: str = "unknown"  # submission_org: your organisation, for a submission
    platform: str | None = None  # submission_platform; None = "<world size>x<device name>"
    status: str = "onprem"  # submission_status: onprem, cloud or research
    poc_name: str = ""  # submission_poc_name
    poc_email: str = ""  # submission_poc_email


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    mlperf: MLPerfConfig = field(default_factory=MLPerfConfig)


# --------------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a parsed value against a dataclass field type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own message ("inf is not finite", "'abc' is not a number")
            return _coerce(value, options[0], key)
        for a in options:
            try:
                return _coerce(value, a, key)
            except LlamatronError:
                pass
        raise LlamatronError(f"config key '{key}': {value!r} is not of type {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set data.train=path` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise LlamatronError(f"config key '{key}': {value!r} is not a list")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        _, item = typing.get_args(tp)
        if isinstance(value, (list, tuple)):  # `--set launch.env=[A=1,B=2]`
            pairs = [str(v).split("=", 1) for v in value]
            if any(len(kv) != 2 for kv in pairs):
                raise LlamatronError(f"config key '{key}': {value!r} is not a table, or a list of KEY=VALUE")
            value = dict(pairs)
        if not isinstance(value, dict):
            raise LlamatronError(f"config key '{key}': {value!r} is not a table of KEY = VALUE")
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LlamatronError(f"config key '{key}': {value!r} is not true/false")
    if isinstance(value, str) and tp in (int, float):
        try:  # YAML reads "1e-2" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LlamatronError(f"config key '{key}': {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # No float key means anything at inf or nan (optim.lr=inf trains to NaN weights at step 2).
            if not math.isfinite(value):
                raise LlamatronError(f"config key '{key}': {value!r} is not finite; expected a finite number")
            return float(value)
        raise LlamatronError(f"config key '{key}': {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LlamatronError(f"config key '{key}': {value!r} is not a string")
    raise LlamatronError(f"config key '{key}': unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = _section_types(Config)
    if section not in sections:
        raise LlamatronError(f"{source}: unknown config section '{section}'; expected one of {sorted(sections)}")
    obj = getattr(cfg, section)
    if section == "model" and key != "size":
        # Typed when the model is resolved: which keys exist depends on the size's family. None (as
        # older saved configs write unset keys) means unset.
        if key == "overrides":
            raise LlamatronError(f"{source}: 'model.overrides' is not a key; write model.KEY = VALUE")
        if value is None:
            obj.overrides.pop(key, None)
        else:
            obj.overrides[key] = value
        return
    hints = _section_types(type(obj))
    if key not in hints:
        raise LlamatronError(
            f"{source}: unknown config key '{section}.{key}'; keys of [{section}] are: {', '.join(hints)}"
        )
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def _field_type(section: str, key: str) -> Any:
    cls = _section_types(Config).get(section)
    return _section_types(cls).get(key) if cls is not None else None


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a preset shipped with llamatron (llamatron/presets/NAME.toml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    preset = PRESETS_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    names = sorted(q.stem for q in PRESETS_DIR.glob("*.toml"))
    raise LlamatronError(f"config {name_or_path!r}: no such file, and no preset of that name (presets: {', '.join(names)})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Parse (defaults, then the file (TOML or YAML), then `section.key=value` overrides), derive
    (MLPerf mode: the values the rules derive for the keys neither of them set), validate."""
    cfg, explicit = parse_config(path, overrides)
    if cfg.mlperf.benchmark:
        from llamatron.mlperf import apply_rules

        apply_rules(cfg, explicit)
    validate_config(cfg)
    return cfg


def parse_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, set[str]]:
    """The config as written, and the "section.key" names set explicitly (in the file or by --set)."""
    cfg = Config()
    explicit: set[str] = set()
    if path is not None:
        p = resolve_config_path(path)
        for section, key, value in _read_config_file(p):
            _apply(cfg, section, key, value, str(p))
            explicit.add(f"{section}.{key}")
    for item in overrides:
        section, key, value = _parse_override(item)
        _apply(cfg, section, key, value, "--set")
        explicit.add(f"{section}.{key}")
    return cfg, explicit


def _read_config_file(p: Path) -> list[tuple[str, str, Any]]:
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as e:
        raise LlamatronError(f"{p}: cannot parse config: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser gave up, 0-based
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LlamatronError(f"{p}: cannot parse config{where}: {what}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise LlamatronError(f"{p}: a config file is a mapping of sections, got {type(data).__name__}")
    items = []
    for section, values in data.items():
        if not isinstance(values, dict):
            raise LlamatronError(f"{p}: config section '{section}' must be a table of keys")
        items += [(section, key, value) for key, value in values.items()]
    return items


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise LlamatronError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
    dotted, raw = item.split("=", 1)
    section, key = (part.strip() for part in dotted.strip().split(".", 1))
    if _field_type(section, key) is str and not raw.strip()[:1] in ("'", '"'):
        return section, key, raw.strip()  # as typed: YAML would read launch.time=4:00:00 as the number 14400
    try:
        return section, key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return section, key, raw


def config_to_dict(cfg: Config) -> dict:
    """Sections of keys, as a config file has them (the model's overrides as `model.KEY`)."""
    data = dataclasses.asdict(cfg)
    model = data.pop("model")
    return {"model": {"size": model["size"], **model["overrides"]}, **data}


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what gets printed and saved with the run)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Validation


def validate_config(cfg: Config, world_size: int | None = None) -> None:
    """Check every key alone and against the others. With `world_size` (the trainer, under torchrun),
    also the parallel layout against it; without, only what does not depend on it."""
    family, args = resolve_model(cfg.model)
    _validate_train(cfg.train)
    _validate_parallel(cfg, family, args, world_size)
    _validate_data(cfg.data, args.max_seq_len, sft=bool(cfg.finetune.data))
    _validate_finetune(cfg)
    _validate_optim(cfg.optim)
    _validate_eval(cfg.eval)
    _validate_checkpoint(cfg.checkpoint)
    _validate_launch(cfg.launch, cfg.checkpoint)
    from llamatron.mlperf import check_rules  # the [mlperf] keys, and in MLPerf mode the rules

    check_rules(cfg)
