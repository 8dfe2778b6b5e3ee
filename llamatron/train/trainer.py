"""The training loop: build everything from a Config, train, validate, checkpoint, resume.

One process, or one per GPU under torchrun: with WORLD_SIZE > 1 the trainer joins the process group
(NCCL on GPUs, gloo on CPUs), builds the device mesh of the `[parallel]` layout and applies it to the
model (`llamatron.parallel.parallelize`). Every rank runs this same loop; only rank 0 prints and
writes metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llamatron import flops
from llamatron.config import Config, dump_config, eval_due, model_args, validate_config
from llamatron.data.sampler import accumulation_steps, micro_batch_indices
from llamatron.errors import LlamatronError
from llamatron.model import ModelArgs, Transformer, count_parameters
from llamatron.parallel.apply import attention_backend
from llamatron.parallel.dims import ParallelDims
from llamatron.parallel.fp8 import check_fp8, precompute_fp8_scales
from llamatron.parallel.memory import estimate_memory
from llamatron.parallel.reduce import (
    clip_grad_norm_,
    gather_per_rank,
    global_mean_loss,
    peak_memory_gib,
    sum_over,
)
from llamatron.train import checkpoint as ckpt
from llamatron.train import faults, reliability
from llamatron.train.metrics import MetricsWriter
from llamatron.train.mlperf_log import MLPerfLog
from llamatron.train.optim import build_optimizer, lr_at


def select_device(name: str) -> torch.device:
    """The device of this process: under torchrun, GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LlamatronError("config key 'train.device': cuda requested but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. bf16 is autocast over fp32 master weights."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    # Built on the meta device so even the 405B shape costs nothing until it is materialised.
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def compute_loss(model, tokens: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
    """Mean token negative log-likelihood in nats, computed in fp32.

    fused: output projection + loss in chunks inside the model (no full logits); otherwise the plain
    logits -> fp32 cross-entropy path (under tensor parallelism, inside `loss_parallel`, over
    vocabulary-sharded logits).
    """
    if fused:
        return model(tokens, labels)
    return F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten())


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a loss under tensor parallelism) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------------------
# Layout


@dataclass
class Layout:
    """How this rank runs the model: its parts (its pipeline stages, else the whole model), the
    parallel dimensions, and the pipeline schedule if any. One process is the layout with one part
    and no mesh."""

    parts: list[nn.Module]
    dims: ParallelDims
    pipeline: object | None = None  # llamatron.parallel.pipeline.Pipeline

    @classmethod
    def single(cls, model: nn.Module) -> "Layout":
        return cls([model], ParallelDims())

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def fused_loss(self, requested: bool) -> bool:
        """The fused cross-entropy needs the whole output weight on the rank that computes the loss:
        not under tensor parallelism (vocabulary-sharded), nor pipelining (the schedule's loss
        function, outside the stage's module, computes it)."""
        return requested and self.dims.tp == 1 and self.dims.pp == 1

    def loss_context(self):
        """Under TP the logits are vocabulary-sharded DTensors: torch's `loss_parallel` computes the
        cross-entropy without gathering them. It must surround the backward too."""
        if self.dims.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def sequence_context(self, tokens: torch.Tensor, labels: torch.Tensor):
        """Under CP, shards tokens, labels and each part's rotary tables along the sequence (in place)
        and makes attention span the CP ranks, for the forward and backward inside."""
        if self.dims.cp == 1:
            return contextlib.nullcontext()
        from llamatron.parallel.context_parallel import context_parallel_context

        tables = [t for part in self.parts for t in (part.rope_cos, part.rope_sin)]
        return context_parallel_context(self.dims.submesh("cp"), [tokens, labels, *tables],
                                        [1, 1] + [0] * len(tables), {tokens, labels})


# --------------------------------------------------------------------------------------------------
# Data


def build_datasets(cfg: Config, vocab_size: int, num_train_samples: int):
    """(train, valid) datasets yielding int64 windows of seq_len + 1 tokens."""
    from llamatron.data import gpt_dataset as gd
    from llamatron.data.indexed import IndexedDataset

    d = cfg.data
    if d.mock:
        train = gd.MockDataset(vocab_size, d.seq_len, num_train_samples, d.seed)
        valid = gd.MockDataset(vocab_size, d.seq_len, max(cfg.eval.samples, 1), d.seed + 1)
        return train, valid
    weights = d.train_weights or [1.0] * len(d.train)
    train = gd.build_blended_gpt_dataset(
        list(zip(weights, d.train)), d.seq_len, num_train_samples, d.seed, split="train", cache_dir=d.cache_dir
    )
    valid = None
    if d.valid and cfg.eval.samples > 0:
        # Validation reads the first windows of the file in order: no shuffle (MLPerf's 405B rule).
        valid = gd.GPTDataset(
            IndexedDataset(d.valid), d.seq_len, cfg.eval.samples, d.seed, split="valid", shuffle=False,
            cache_dir=d.cache_dir,
        )
        if len(valid) < cfg.eval.samples:
            raise LlamatronError(
                f"config key 'eval.samples': {d.valid} holds only {len(valid)} windows of {d.seq_len + 1} tokens, "
                f"fewer than the {cfg.eval.samples} asked for"
            )
    return train, valid


def check_data(prefixes: list[str], vocab_size: int, tokenizer_vocab: int, log=print) -> None:
    """Start-up checks of the data files, before any memory is spent on the model: every `.bin/.idx`
    pair opens and is consistent (`IndexedDataset` checks magic, version, dtype, sizes and that every
    sequence lies inside the `.bin`), its dtype can hold the tokenizer's ids, and its token ids index
    the embedding (a wrong tokenizer/model pairing). Each failure is a LlamatronError naming the file."""
    from llamatron.data.indexed import IndexedDataset

    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        if ds.dtype.kind not in "iu":
            raise LlamatronError(f"{ds.idx_path}: tokens stored as {ds.dtype.name}; token ids must be integers")
        if np.iinfo(ds.dtype).max < tokenizer_vocab - 1:
            raise LlamatronError(
                f"{ds.idx_path}: tokens stored as {ds.dtype.name} (at most {np.iinfo(ds.dtype).max}) cannot hold the "
                f"{tokenizer_vocab:,} ids of the tokenizer; the data was tokenized with another tokenizer "
                "(check data.tokenizer)"
            )
        lo, hi, complete = ds.token_range(max_bytes=TOKEN_SCAN_BYTES)
        if lo < 0 or hi >= vocab_size:
            raise LlamatronError(
                f"{ds.bin_path}: token id {lo if lo < 0 else hi} is outside the model vocabulary [0, {vocab_size}) "
                "(data tokenized for a different model? check model.vocab_size / data.tokenizer)"
            )
        if not complete:
            log(f"{ds.bin_path}: token ids checked in {TOKEN_SCAN_BYTES >> 20} MiB spread over the file "
                "(every batch is checked again as it is read)")


# Token files up to this size are scanned whole at start-up (~0.1 s per GiB from the page cache);
# larger ones are sampled, and `load_batch` checks every window it reads anyway.
TOKEN_SCAN_BYTES = 1 << 30


def check_inputs(cfg: Config, log=print) -> None:
    """Everything about the input files that can fail, checked before a GPU is touched."""
    args = model_args(cfg.model)
    ck = cfg.checkpoint
    if ck.init_from and not (Path(ck.init_from) / ".metadata").is_file():
        raise LlamatronError(f"config key 'checkpoint.init_from': {ck.init_from} is not a checkpoint directory "
                             "(no DCP .metadata file)")
    if cfg.data.mock:
        return
    from llamatron.tokenizer import load_tokenizer

    tok_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    if tok_vocab > args.vocab_size:
        raise LlamatronError(
            f"config key 'model.vocab_size': {args.vocab_size} is smaller than the tokenizer's "
            f"{tok_vocab} ({cfg.data.tokenizer})"
        )
    check_data(cfg.data.train + ([cfg.data.valid] if cfg.data.valid else []), args.vocab_size, tok_vocab, log)


def load_batch(dataset, indices, device: torch.device, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of the windows `indices`; with `vocab_size`, every token id is checked to index
    the embedding (a bad id would fail inside the embedding kernel, on CUDA as a device-side assert)."""
    array = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices])
    if vocab_size is not None and array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = [i for i, w in zip(indices, array) if w.min() < 0 or w.max() >= vocab_size]
        raise LlamatronError(f"training sample {bad[0]} (dataset index in Megatron sample order) holds token id "
                             f"{int(array.min()) if array.min() < 0 else int(array.max())}, outside the model vocabulary "
                             f"[0, {vocab_size}): the token file is damaged there")
    window = torch.from_numpy(array)
    if device.type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    # Two tensors of their own, not views of one window: context parallelism resizes them in place.
    return window[:, :-1].clone(), window[:, 1:].clone()


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, dataset, num_samples: int, micro_batch: int, device, amp_dtype, fused: bool = True) -> float:
    """Validation log perplexity: mean token NLL (nats) over the first `num_samples` windows.

    `model` is a module or a `Layout`. Data-parallel ranks score interleaved micro-batches of the
    windows (as the training sampler hands them out) and the sums are reduced; every rank runs the
    same number of forwards (FSDP and TP need all of them), a rank with nothing left scoring a
    dummy window with weight 0.
    """
    layout = model if isinstance(model, Layout) else Layout.single(model)
    dims = layout.dims
    was_training = layout.model.training
    layout.train(False)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    fused = layout.fused_loss(fused)
    if layout.pipeline is not None:
        total, count = _evaluate_pipeline(layout, dataset, num_samples, micro_batch, device, amp_dtype)
    else:
        chunk = micro_batch * dims.dp
        for start in range(0, num_samples, chunk):
            first = start + dims.dp_rank * micro_batch
            idx = range(first, min(first + micro_batch, num_samples))
            weight = 1.0 if len(idx) else 0.0
            tokens, labels = load_batch(dataset, idx if len(idx) else range(0, 1), device)
            with layout.sequence_context(tokens, labels), layout.loss_context(), _autocast(device, amp_dtype):
                loss = _plain(compute_loss(layout.model, tokens, labels, fused))
            # labels is this rank's shard of the sequence under CP (sharded in place).
            total += loss.double() * labels.numel() * weight
            count += labels.numel() * weight
    sum_over(total, dims, "dp_cp", "pp")
    sum_over(count, dims, "dp_cp", "pp")
    layout.train(was_training)
    return float(total.item() / max(count.item(), 1))


def _evaluate_pipeline(layout: Layout, dataset, num_samples, micro_batch, device, amp_dtype):
    """Pipeline evaluation: the schedule takes a fixed number of equal micro-batches, so the last
    batch is filled with copies of window 0 whose labels are ignored."""
    from llamatron.parallel.pipeline import IGNORE_INDEX

    pipe, dims = layout.pipeline, layout.dims
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    per_rank = pipe.n_microbatches * micro_batch
    for start in range(0, num_samples, per_rank * dims.dp):
        first = start + dims.dp_rank * per_rank
        idx = list(range(first, min(first + per_rank, num_samples)))
        valid = len(idx)
        tokens, labels = load_batch(dataset, idx + [0] * (per_rank - valid), device)
        labels = labels.clone()
        labels[valid:] = IGNORE_INDEX
        with layout.sequence_context(tokens, labels), layout.loss_context(), _autocast(device, amp_dtype):
            losses = pipe.eval_losses(tokens, labels)
        if pipe.has_last:
            for m, loss in enumerate(losses):
                n = (labels[m * micro_batch : (m + 1) * micro_batch] != IGNORE_INDEX).sum()
                if n > 0:
                    total += loss.double() * n
                    count += n
    return total, count


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# --------------------------------------------------------------------------------------------------
# Training


def train_step(model, optimizer, micro_batches, accum: int, *, lr: float, device, amp_dtype,
               fused_cross_entropy: bool, grad_clip: float, attention: str = "auto", before_update=None):
    """One optimizer step over `accum` micro-batches. Returns (loss, grad norm) as device tensors,
    unread, so the step never waits for the GPU.

    before_update(loss, grad_norm), if given, runs once the gradients are reduced and clipped; when
    it returns False the optimizer step is not taken and the gradients are dropped.

    model: a module or a `Layout`; optimizer: one optimizer or a list, one per part. The loss is
    this rank's (None on a pipeline stage without the loss); `global_mean_loss` reduces it.
    """
    layout = model if isinstance(model, Layout) else Layout.single(model)
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    fused = layout.fused_loss(fused_cross_entropy)
    with attention_backend(attention):
        if layout.pipeline is not None:
            # The schedule splits the concatenated micro-batches back into `accum` of them, in order.
            batches = list(micro_batches)
            tokens = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])
            with layout.sequence_context(tokens, labels), layout.loss_context(), _autocast(device, amp_dtype):
                loss_sum = layout.pipeline.train_step(tokens, labels)
        else:
            loss_sum = torch.zeros((), device=device)
            for tokens, labels in micro_batches:
                with layout.sequence_context(tokens, labels), layout.loss_context():
                    with _autocast(device, amp_dtype):
                        loss = compute_loss(layout.model, tokens, labels, fused)
                    # Every micro-batch has the same token count, so the mean of micro-batch means is
                    # the global-batch token mean.
                    loss = loss / accum
                    loss.backward()
                loss_sum += _plain(loss.detach())
    grad_norm = clip_grad_norm_(layout.parameters(), grad_clip, layout.dims)
    update = before_update is None or before_update(loss_sum, grad_norm)
    for opt in optimizers:
        if update:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float | None
    eval_history: list[tuple[int, float]]
    tokens_per_s: float | None
    mfu: float | None
    checkpoint: Path | None
    wall_s: float
    rank: int = 0  # under torchrun every rank returns; only rank 0 reports
    preempted: str | None = None  # the stop signal that ended the run early (checkpoint written)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    mlperf_status: str | None = None  # MLPerf mode: success / aborted once the run ended, else None
    time_to_train_s: float | None = None  # MLPerf mode: run_start to run_stop (across jobs)


def _init_distributed(device: torch.device, world_size: int) -> bool:
    """Join torchrun's process group (env:// rendezvous); True if this call created it."""
    if world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def train(cfg: Config, *, progress: bool = True, log=print) -> TrainResult:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Everything that can be wrong with the config and the input files fails here, before any GPU
    # memory is touched (only the first process of a host scans the token files).
    validate_config(cfg, world_size)
    faults.parse()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        check_inputs(cfg, log if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None))
    # Whole-segment growth instead of fixed blocks: far less fragmentation with large, varying
    # activations (must be set before the first CUDA allocation; a user's setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = select_device(cfg.train.device)
    created = _init_distributed(device, world_size)
    restore_signals = reliability.install_stop_handlers()
    try:
        return _train(cfg, device, world_size, progress=progress, log=log)
    finally:
        restore_signals()
        if created:
            dist.destroy_process_group()


def _train(cfg: Config, device: torch.device, world_size: int, *, progress: bool, log) -> TrainResult:
    t_start = time.perf_counter()
    t = cfg.train
    rank = dist.get_rank() if dist.is_initialized() else 0
    main = rank == 0
    if not main:
        log, progress = (lambda *a, **k: None), False
    out_dir = Path(t.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # MLPerf mode: init_start is now (before data and model); a no-op object otherwise.
    mlp = MLPerfLog(cfg, out_dir, write=main, log=log)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    amp_dtype = autocast_dtype(t.precision, device)
    check_fp8(t.fp8, device)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dims.build_mesh(device.type)
    # Under FSDP the parameters are gathered in bf16 (MixedPrecisionPolicy) and no autocast is needed.
    param_dtype = None
    if dims.fsdp_enabled and amp_dtype is not None:
        param_dtype, amp_dtype = amp_dtype, None
    args = model_args(cfg.model)
    if dims.cp > 1:
        # The rotary tables are sharded along the sequence with the tokens: exactly seq_len rows.
        args = dataclasses.replace(args, max_seq_len=cfg.data.seq_len)
    config_yaml = dump_config(cfg)
    if main:
        (out_dir / "config.yaml").write_text(config_yaml)
    log(f"config (saved to {out_dir / 'config.yaml'}):\n{config_yaml}")

    # One rank per host builds the sample-index caches; the others then read them.
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        train_ds, valid_ds = build_datasets(cfg, args.vocab_size, t.steps * t.global_batch_size)
    if dist.is_initialized():
        dist.barrier()
    if not first:
        train_ds, valid_ds = build_datasets(cfg, args.vocab_size, t.steps * t.global_batch_size)

    from llamatron.parallel.parallelize import materialize, parallelize

    torch.manual_seed(t.seed)
    with torch.device("meta"):
        whole = Transformer(args)
    n_params = count_parameters(whole)
    if main and cfg.checkpoint.enabled:
        for p in ckpt.remove_incomplete(out_dir):
            log(f"removed {p}: left behind by a checkpoint save that did not complete")
        # fp32 weights and AdamW's two fp32 moments: 12 bytes per parameter.
        warning = ckpt.check_writable(out_dir, 12 * n_params)
        if warning:
            log(f"warning: {warning}")
    accum = accumulation_steps(t.global_batch_size, t.micro_batch_size, dims.dp)
    parts, stage_ids = parallelize(whole, t, dims, param_dtype)
    for part in parts:
        materialize(part, device, t.seed)
    pipeline = None
    if dims.pp > 1:
        from llamatron.parallel.pipeline import Pipeline

        pipeline = Pipeline(parts, stage_ids, dims.pp * dims.pp_virtual_stages, dims.pp_schedule, accum, device,
                            dims.group("pp"))
    layout = Layout(parts, dims, pipeline)
    optimizers = [build_optimizer(part, cfg.optim, device.type) for part in parts]

    step, consumed = 0, 0
    state: dict = {}
    resume_from = ckpt.latest_checkpoint(out_dir) if cfg.checkpoint.resume else None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, parts, optimizers)
        step, consumed = state["step"], state["consumed_samples"]
        log(f"resumed from {resume_from} at step {step} ({consumed} samples consumed)")
    elif cfg.checkpoint.init_from:
        ckpt.load_model_weights(cfg.checkpoint.init_from, parts)
        log(f"initialised model weights from {cfg.checkpoint.init_from}")

    eval_mbs = cfg.eval.micro_batch_size or t.micro_batch_size
    if pipeline is not None:
        eval_mbs = t.micro_batch_size  # the schedule's micro-batch shape is fixed
    flops_per_seq = flops.flops_per_sequence(args, cfg.data.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = flops.peak_flops(device_name, "bf16")
    n_gpus = world_size
    precision = param_dtype or amp_dtype or torch.float32
    log(
        f"model {cfg.model.size}: {n_params:,} parameters, {args.n_layers} layers; device {device_name}; "
        f"precision {precision}{' (FSDP mixed precision, fp32 master weights)' if param_dtype else ''}; "
        f"global batch {t.global_batch_size} = micro {t.micro_batch_size} x data-parallel {dims.dp} "
        f"x accumulation {accum}; seq {cfg.data.seq_len}; {t.steps} steps"
    )
    log(f"layout: {dims.describe()}")
    est = estimate_memory(
        args, cfg.data.seq_len, t.micro_batch_size, dp_shard=dims.dp_shard, tp=dims.tp, pp=dims.pp, cp=dims.cp,
        pp_schedule=dims.pp_schedule, n_microbatches=accum, bf16=precision == torch.bfloat16,
        fsdp=dims.fsdp_enabled, activation_checkpointing=t.activation_checkpointing,
        checkpointed_layers=t.activation_checkpointing_layers, fused_cross_entropy=layout.fused_loss(t.fused_cross_entropy),
    )
    log(f"memory estimate per rank (eager count; llamatron/parallel/memory.py): {est.describe()}")

    metrics = MetricsWriter(out_dir) if main else None
    if metrics is not None and resume_from is not None:
        # Rows of the earlier job for later steps than this (work lost in a crash) are superseded.
        metrics.write("resume", step, {"checkpoint": str(resume_from), "consumed_samples": consumed})
    eval_history: list[tuple[int, float]] = []

    def run_eval() -> None:
        if valid_ds is None or cfg.eval.samples == 0:
            return
        mlp.eval_start(consumed)
        t0 = time.perf_counter()
        val = evaluate(layout, valid_ds, cfg.eval.samples, eval_mbs, device, amp_dtype, t.fused_cross_entropy)
        mlp.eval_stop(consumed, val)
        eval_history.append((step, val))
        if metrics is not None:
            metrics.write("eval", step, {"val_loss": val, "val_ppl": math.exp(min(val, 50)),
                                         "consumed_samples": consumed, "eval_s": time.perf_counter() - t0})
        log(f"step {step:6d} | validation log perplexity {val:.4f} (perplexity {math.exp(min(val, 50)):.1f})")

    last_ckpt = resume_from
    def save() -> Path:
        state = {"step": step, "consumed_samples": consumed, "seed": t.seed, "data_seed": cfg.data.seed,
                 "world_size": world_size, "layout": dims.describe(), "skipped_steps": skipped,
                 "grad_norm_history": grad_history, **mlp.state()}
        path = ckpt.save_checkpoint(out_dir, step, parts, optimizers, state, config_yaml, cfg.checkpoint.keep)
        log(f"step {step:6d} | checkpoint saved to {path}")
        return path

    # Non-finite steps, gradient-norm spikes and stop signals, decided after each backward pass by
    # all ranks together (llamatron/train/reliability.py).
    skipped, skips_in_a_row = state.get("skipped_steps", 0), 0
    grad_history: list[float] = list(state.get("grad_norm_history", []))
    stop_signal = halt = None

    def before_update(loss, norm) -> bool:
        nonlocal skipped, skips_in_a_row, stop_signal, halt
        nonfinite, stop, norm_value = reliability.agree(loss, norm, reliability.stop_requested(), device)
        stop_signal = stop_signal or stop
        n = step + 1  # the step being taken, numbered as logs and metrics number it
        if not nonfinite:
            skips_in_a_row = 0
            median = reliability.grad_spike(grad_history, norm_value, t.grad_spike_factor)
            if median is not None:
                log(f"step {n:6d} | gradient norm spike: {norm_value:.4g} is {norm_value / median:.1f} x the median "
                    f"{median:.4g} of recent steps")
                if metrics is not None:
                    metrics.write("grad_spike", n, {"grad_norm": norm_value, "median": median})
            return True
        first = step * t.global_batch_size
        mine = [i for m in range(accum) for i in micro_batch_indices(step, m, t.global_batch_size,
                                                                     t.micro_batch_size, dims.dp_rank, dims.dp)]
        local = "n/a on this pipeline stage" if loss is None else f"{float(loss):.4g}"
        what = (f"step {n}: non-finite loss or gradient norm (gradient norm {norm_value:.4g}, this rank's loss {local}); "
                f"its global batch is training samples {first}-{first + t.global_batch_size - 1} (dataset indices in "
                f"Megatron sample order, data.seed {cfg.data.seed}), this rank read {reliability.describe_indices(mine)}")
        if metrics is not None:
            metrics.write("nonfinite", n, {"grad_norm": norm_value, "samples": [first, first + t.global_batch_size],
                                           "policy": t.nonfinite})
        # A halted step is not counted as skipped: resuming from the checkpoint written on halting redoes it.
        if t.nonfinite == "stop":
            halt = f"{what}; no update was applied (train.nonfinite=stop; set it to skip to drop such batches)"
        elif skips_in_a_row + 1 >= t.nonfinite_max_skips:
            halt = (f"{what}; {skips_in_a_row + 1} steps in a row were non-finite (train.nonfinite_max_skips): "
                    "the run is diverging or the data is damaged here; no update was applied")
        else:
            skipped += 1
            skips_in_a_row += 1
            log(f"{what}; optimizer step skipped ({skipped} so far)")
        return False

    mlp.begin(step, state if resume_from is not None else None, accum=accum, dims=dims, device_name=device_name, bf16=precision == torch.bfloat16)
    if cfg.eval.at_start and step == 0:
        run_eval()

    layout.train(True)
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    last_loss: torch.Tensor | None = None
    last_log_time, last_log_step = time.perf_counter(), step
    final_loss = tokens_per_s = mfu_value = None
    while step < t.steps and not mlp.done:
        lr = lr_at(step, cfg.optim, t.steps)
        # Megatron's sampler: this data-parallel rank's micro-batches of the step; ranks of the same
        # data-parallel group (TP, CP, PP) read the same samples.
        micro_batches = (
            load_batch(train_ds, micro_batch_indices(step, m, t.global_batch_size, t.micro_batch_size,
                                                     dims.dp_rank, dims.dp), device, args.vocab_size)
            for m in range(accum)
        )
        with faults.at_step(step + 1, rank, layout.parts[-1]):  # test-only, LLAMATRON_FAULT
            loss_sum, grad_norm = train_step(
                layout, optimizers, micro_batches, accum, lr=lr, device=device, amp_dtype=amp_dtype,
                fused_cross_entropy=t.fused_cross_entropy, grad_clip=cfg.optim.grad_clip,
                attention=t.attention_backend, before_update=before_update,
            )
        if halt is not None:
            # Keep the work since the last checkpoint: the weights are those before this step.
            if cfg.checkpoint.enabled and step > 0 and (last_ckpt is None or last_ckpt.name != f"step_{step:08d}"):
                last_ckpt = save()
            if metrics is not None:
                metrics.close()
            raise LlamatronError(f"{halt}; newest checkpoint: {last_ckpt or 'none'}")
        if t.fp8_all_gather:
            for part in parts:
                precompute_fp8_scales(part)
        step += 1
        consumed += t.global_batch_size
        last_loss = loss_sum
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            # The loss is read once per log interval (the per-step read is of the reliability flags
            # only); the reductions over ranks happen here too, so every rank must reach this point.
            loss_value = global_mean_loss(last_loss, dims, device)
            now = time.perf_counter()
            step_time = (now - last_log_time) / (step - last_log_step)
            last_log_time, last_log_step = now, step
            tokens_per_s = flops.tokens_per_second(cfg.data.seq_len, t.global_batch_size, step_time)
            tflops = t.global_batch_size * flops_per_seq / step_time / 1e12 / n_gpus
            mfu_value = flops.mfu(args, cfg.data.seq_len, t.global_batch_size, step_time, n_gpus, peak)
            final_loss = loss_value
            mem = gather_per_rank(peak_memory_gib(device), device)
            record = {
                "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": step_time,
                "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / n_gpus,
                "tflops_per_gpu": tflops, "mfu": mfu_value, "consumed_samples": consumed,
                # CUDA: torch's peak allocated memory; CPU: the process's peak resident set.
                "peak_mem_gib": max(mem), "peak_mem_gib_per_rank": mem, "skipped_steps": skipped,
            }
            if t.fp8 != "none":  # FP8 runs are also compared against the FP8 peak (PERFORMANCE.md)
                record["mfu_fp8_peak"] = flops.mfu(args, cfg.data.seq_len, t.global_batch_size, step_time, n_gpus,
                                                   flops.peak_flops(device_name, "fp8"))
            if metrics is not None:
                metrics.write("train", step, record)
            mfu_txt = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
            line = (
                f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.3e} | grad norm {float(grad_norm):.3f} | "
                f"{step_time * 1000:.0f} ms/step | {tokens_per_s / n_gpus:,.0f} tok/s/GPU | {tflops:.2f} TFLOP/s/GPU "
                f"| MFU {mfu_txt} | peak mem {max(mem):.2f} GiB"
            )
            if progress:
                bar.write(line)
            else:
                log(line)

        if stop_signal is not None and step < t.steps:
            log(f"step {step:6d} | {stop_signal}: stopping after this step; checkpointing, then exiting for a requeue")
            break
        # The last step's validation comes after the loop, except in MLPerf mode (on its cadence only).
        if eval_due(cfg, step) and (step < t.steps or mlp.enabled):
            run_eval()
        if cfg.checkpoint.enabled and cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
            last_ckpt = save()
    bar.close()
    preempted = stop_signal if step < t.steps else None
    if preempted and not cfg.checkpoint.enabled:
        raise LlamatronError(f"stopped by {preempted} at step {step} with checkpoint.enabled=false: nothing to resume from")

    mlp.end(step)

    if not preempted and not mlp.enabled and (not eval_history or eval_history[-1][0] != step):
        run_eval()
    if cfg.checkpoint.enabled and step > 0 and (last_ckpt is None or last_ckpt.name != f"step_{step:08d}"):
        last_ckpt = save()
    if metrics is not None:
        metrics.close()
    if preempted:
        log(f"step {step:6d} | stopped early by {preempted}; resume by running the same command again")
    return TrainResult(out_dir, step, final_loss, eval_history, tokens_per_s, mfu_value, last_ckpt,
                       time.perf_counter() - t_start, rank, preempted=preempted, skipped_steps=skipped,
                       mlperf_status=mlp.status, time_to_train_s=mlp.time_to_train_s)
