"""The training loop: build everything from a Config, train, validate, checkpoint, resume."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llamatron import flops
from llamatron.config import Config, dump_config, model_args, validate_config
from llamatron.data.sampler import accumulation_steps, micro_batch_indices
from llamatron.errors import LlamatronError
from llamatron.model import ModelArgs, Transformer, count_parameters
from llamatron.parallel.apply import apply_activation_checkpointing, apply_compile, attention_backend
from llamatron.train import checkpoint as ckpt
from llamatron.train.metrics import MetricsWriter
from llamatron.train.optim import build_optimizer, lr_at


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LlamatronError("config key 'train.device': cuda requested but no CUDA device is available")
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
    logits -> fp32 cross-entropy path.
    """
    if fused:
        return model(tokens, labels)
    return F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten())


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


def check_vocab(dataset_prefixes: list[str], vocab_size: int) -> None:
    """Token ids must index the embedding: catch a wrong tokenizer/model pairing before training."""
    from llamatron.data.indexed import IndexedDataset

    for prefix in dataset_prefixes:
        top = IndexedDataset(prefix).max_token_id()
        if top >= vocab_size:
            raise LlamatronError(
                f"{prefix}.bin: token id {top} is outside the model vocabulary of {vocab_size} "
                "(data tokenized for a different model? check model.vocab_size / data.tokenizer)"
            )


def load_batch(dataset, indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.from_numpy(np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices]))
    if device.type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, dataset, num_samples: int, micro_batch: int, device, amp_dtype, fused: bool = True) -> float:
    """Validation log perplexity: mean token NLL (nats) over the first `num_samples` windows."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, num_samples, micro_batch):
        idx = range(start, min(start + micro_batch, num_samples))
        tokens, labels = load_batch(dataset, idx, device)
        with _autocast(device, amp_dtype):
            loss = compute_loss(model, tokens, labels, fused)
        total += loss.double() * labels.numel()
        count += labels.numel()
    model.train(was_training)
    return float(total.item() / max(count, 1))


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# --------------------------------------------------------------------------------------------------
# Training


def train_step(model, optimizer, micro_batches, accum: int, *, lr: float, device, amp_dtype,
               fused_cross_entropy: bool, grad_clip: float, attention: str = "auto"):
    """One optimizer step over `accum` micro-batches. Returns (loss, grad norm) as device tensors,
    unread, so the step never waits for the GPU."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    with attention_backend(attention):
        for tokens, labels in micro_batches:
            with _autocast(device, amp_dtype):
                loss = compute_loss(model, tokens, labels, fused_cross_entropy)
            # Every micro-batch has the same token count, so the mean of micro-batch means is the
            # global-batch token mean.
            loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
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


def train(cfg: Config, *, progress: bool = True, log=print) -> TrainResult:
    validate_config(cfg)
    t_start = time.perf_counter()
    t = cfg.train
    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = select_device(t.device)
    amp_dtype = autocast_dtype(t.precision, device)
    args = model_args(cfg.model)
    config_yaml = dump_config(cfg)
    (out_dir / "config.yaml").write_text(config_yaml)
    log(f"config (saved to {out_dir / 'config.yaml'}):\n{config_yaml}")

    # Data first: bad data paths should fail before any memory is spent on the model.
    if not cfg.data.mock:
        from llamatron.tokenizer import load_tokenizer

        tok_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
        if tok_vocab > args.vocab_size:
            raise LlamatronError(
                f"config key 'model.vocab_size': {args.vocab_size} is smaller than the tokenizer's "
                f"{tok_vocab} ({cfg.data.tokenizer})"
            )
        check_vocab(cfg.data.train + ([cfg.data.valid] if cfg.data.valid else []), args.vocab_size)
    train_ds, valid_ds = build_datasets(cfg, args.vocab_size, t.steps * t.global_batch_size)

    torch.manual_seed(t.seed)
    model = build_model(args, device, seed=t.seed)
    n_params = count_parameters(model)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        apply_compile(model)
    optimizer = build_optimizer(model, cfg.optim, device.type)

    step, consumed = 0, 0
    resume_from = ckpt.latest_checkpoint(out_dir) if cfg.checkpoint.resume else None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        step, consumed = state["step"], state["consumed_samples"]
        log(f"resumed from {resume_from} at step {step} ({consumed} samples consumed)")
    elif cfg.checkpoint.init_from:
        ckpt.load_model_weights(cfg.checkpoint.init_from, model)
        log(f"initialised model weights from {cfg.checkpoint.init_from}")

    accum = accumulation_steps(t.global_batch_size, t.micro_batch_size)
    eval_mbs = cfg.eval.micro_batch_size or t.micro_batch_size
    flops_per_seq = flops.flops_per_sequence(args, cfg.data.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = flops.peak_flops(device_name, "bf16")
    log(
        f"model {cfg.model.size}: {n_params:,} parameters, {args.n_layers} layers; device {device_name}; "
        f"precision {amp_dtype or torch.float32}; global batch {t.global_batch_size} = micro {t.micro_batch_size} "
        f"x accumulation {accum}; seq {cfg.data.seq_len}; {t.steps} steps"
    )

    metrics = MetricsWriter(out_dir)
    eval_history: list[tuple[int, float]] = []

    def run_eval() -> None:
        if valid_ds is None or cfg.eval.samples == 0:
            return
        t0 = time.perf_counter()
        val = evaluate(model, valid_ds, cfg.eval.samples, eval_mbs, device, amp_dtype, t.fused_cross_entropy)
        eval_history.append((step, val))
        metrics.write("eval", step, {"val_loss": val, "val_ppl": math.exp(min(val, 50)),
                                     "consumed_samples": consumed, "eval_s": time.perf_counter() - t0})
        log(f"step {step:6d} | validation log perplexity {val:.4f} (perplexity {math.exp(min(val, 50)):.1f})")

    last_ckpt = resume_from
    def save() -> Path:
        state = {"step": step, "consumed_samples": consumed, "seed": t.seed, "data_seed": cfg.data.seed}
        path = ckpt.save_checkpoint(out_dir, step, model, optimizer, state, config_yaml, cfg.checkpoint.keep)
        log(f"step {step:6d} | checkpoint saved to {path}")
        return path

    if cfg.eval.at_start and step == 0:
        run_eval()

    model.train()
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    pending_loss: list[torch.Tensor] = []
    last_log_time, last_log_step = time.perf_counter(), step
    final_loss = tokens_per_s = mfu_value = None
    while step < t.steps:
        lr = lr_at(step, cfg.optim, t.steps)
        micro_batches = (
            load_batch(train_ds, micro_batch_indices(step, m, t.global_batch_size, t.micro_batch_size), device)
            for m in range(accum)
        )
        loss_sum, grad_norm = train_step(
            model, optimizer, micro_batches, accum, lr=lr, device=device, amp_dtype=amp_dtype,
            fused_cross_entropy=t.fused_cross_entropy, grad_clip=cfg.optim.grad_clip,
            attention=t.attention_backend,
        )
        step += 1
        consumed += t.global_batch_size
        pending_loss.append(loss_sum)
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            # Reading the loss is the only host-device synchronisation, once per log interval.
            loss_value = float(pending_loss[-1].item())
            now = time.perf_counter()
            step_time = (now - last_log_time) / (step - last_log_step)
            last_log_time, last_log_step = now, step
            pending_loss.clear()
            tokens_per_s = flops.tokens_per_second(cfg.data.seq_len, t.global_batch_size, step_time)
            tflops = t.global_batch_size * flops_per_seq / step_time / 1e12
            mfu_value = flops.mfu(args, cfg.data.seq_len, t.global_batch_size, step_time, 1, peak)
            final_loss = loss_value
            record = {
                "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": step_time,
                "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": mfu_value,
                "consumed_samples": consumed,
            }
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics.write("train", step, record)
            mfu_txt = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
            line = (
                f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.3e} | grad norm {float(grad_norm):.3f} | "
                f"{step_time * 1000:.0f} ms/step | {tokens_per_s:,.0f} tok/s | {tflops:.2f} TFLOP/s | MFU {mfu_txt}"
            )
            if progress:
                bar.write(line)
            else:
                log(line)

        if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
            run_eval()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
            last_ckpt = save()
    bar.close()

    if not eval_history or eval_history[-1][0] != step:
        run_eval()
    if step > 0 and (last_ckpt is None or last_ckpt.name != f"step_{step:08d}"):
        last_ckpt = save()
    metrics.close()
    return TrainResult(out_dir, step, final_loss, eval_history, tokens_per_s, mfu_value, last_ckpt,
                       time.perf_counter() - t_start)
