"""Validation log perplexity (MLPerf's `eval_accuracy`): mean token negative log-likelihood in nats over
the first windows of a validation file, in file order (for fine-tuning, over the response tokens of
the first packed sequences of `finetune.valid`); and the `Validator` that runs it at a run's cadence
and records the results.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llamatron import hooks
from llamatron.loss import IGNORE_INDEX
from llamatron.parallel.layout import Layout, plain
from llamatron.parallel.reduce import sum_over
from llamatron.runtime import Precision, load_batch


class Stopped(Exception):
    """A validation ended early by a stop signal (`evaluate`'s `stop`), the same batch on every rank."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _check_stop(stop: Callable[[], int] | None, device) -> None:
    """Raise Stopped if any rank's `stop()` (a signal number, 0 for none) is set: an all-reduce, so
    every rank leaves at the same batch (FSDP and TP need each forward on all of them)."""
    if stop is None:
        return
    flag = torch.tensor(float(stop()), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise Stopped(signal.Signals(int(flag.item())).name)


@torch.no_grad()
def evaluate(model, dataset, num_samples: int, micro_batch: int, device, precision: Precision | None = None,
             fused: bool = True, stop: Callable[[], int] | None = None) -> float:
    """Validation log perplexity: mean token NLL (nats) over the first `num_samples` windows.

    `model` is a module or a `Layout`. Data-parallel ranks score interleaved micro-batches of the
    windows (as the training sampler hands them out) and the sums are reduced; every rank runs the
    same number of forwards (FSDP and TP need all of them), a rank with nothing left scoring a
    dummy window with weight 0. `stop` is checked before each batch (raising `Stopped`), so a
    pre-emption signal does not wait for a long validation.
    """
    layout = model if isinstance(model, Layout) else Layout.single(model)
    if hasattr(dataset, "__len__"):
        num_samples = min(num_samples, len(dataset))  # a validation set smaller than eval.samples: all of it
    was_training = layout.training
    layout.train(False)
    try:
        return _evaluate(layout, dataset, num_samples, micro_batch, device, precision or Precision(None, None),
                         fused, stop)
    finally:
        layout.train(was_training)


def _evaluate(layout: Layout, dataset, num_samples, micro_batch, device, precision: Precision, fused, stop) -> float:
    dims = layout.dims
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    fused = layout.fused_loss(fused)
    if layout.pipeline is not None:
        total, count = _evaluate_pipeline(layout, dataset, num_samples, micro_batch, device, precision, stop)
    else:
        chunk = micro_batch * dims.dp
        for start in range(0, num_samples, chunk):
            _check_stop(stop, device)
            hooks.fire("eval_batch", start=start)
            first = start + dims.dp_rank * micro_batch
            idx = range(first, min(first + micro_batch, num_samples))
            weight = 1.0 if len(idx) else 0.0
            tokens, labels, extra = _read(dataset, idx if len(idx) else range(0, 1), device)
            with layout.sequence_context(tokens, labels), layout.loss_context(), precision.autocast(device):
                loss = plain(layout.loss(tokens, labels, fused, **extra))
            # The loss is a mean over the scored labels (every one of a token file's windows; a
            # fine-tuning example's response tokens): weighted by their count, the result is the mean
            # over all of them. labels is this rank's shard of the sequence under CP (sharded in place).
            n = (labels != IGNORE_INDEX).sum().double() * weight
            total += torch.where(n > 0, loss.double() * n, 0.0)  # a batch of prompts only: 0/0, counted 0
            count += n
    sum_over(total, dims, "dp_cp", "pp")
    sum_over(count, dims, "dp_cp", "pp")
    return float(total.item() / max(count.item(), 1))


def _read(dataset, idx, device) -> tuple:
    """(tokens, labels, model keyword inputs) of samples `idx`: windows of a token file, or from a
    dataset that reads its own batches (`batch`: fine-tuning examples, with masked labels and the
    positions and document ids of packed sequences)."""
    if hasattr(dataset, "batch"):
        return dataset.batch(idx, device)
    tokens, labels = load_batch(dataset, idx, device)
    return tokens, labels, {}


def _evaluate_pipeline(layout: Layout, dataset, num_samples, micro_batch, device, precision: Precision, stop=None):
    """Pipeline evaluation: the schedule takes a fixed number of equal micro-batches, so the last
    batch is filled with copies of window 0 whose labels are ignored."""
    from llamatron.parallel.pipeline import IGNORE_INDEX

    pipe, dims = layout.pipeline, layout.dims
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    per_rank = pipe.n_microbatches * micro_batch
    for start in range(0, num_samples, per_rank * dims.dp):
        _check_stop(stop, device)
        hooks.fire("eval_batch", start=start)
        first = start + dims.dp_rank * per_rank
        idx = list(range(first, min(first + per_rank, num_samples)))
        valid = len(idx)
        tokens, labels = load_batch(dataset, idx + [0] * (per_rank - valid), device)
        labels = labels.clone()
        labels[valid:] = IGNORE_INDEX
        with layout.sequence_context(tokens, labels), layout.loss_context(), precision.autocast(device):
            losses = pipe.eval_losses(tokens, labels)
        if pipe.has_last:
            for m, loss in enumerate(losses):
                n = (labels[m * micro_batch : (m + 1) * micro_batch] != IGNORE_INDEX).sum()
                if n > 0:
                    total += loss.double() * n
                    count += n
    return total, count


@dataclass(frozen=True)
class Cadence:
    """When validation runs: after every `every` optimizer steps (0: never during training), the first
    time at the end of interval `first_interval` (MLPerf 405B skips the early ones), and before the
    first step if `at_start`."""

    every: int
    first_interval: int = 1
    at_start: bool = True

    @classmethod
    def from_config(cls, eval_cfg, global_batch_size: int) -> "Cadence":
        # eval.every_samples is in sequences (MLPerf states cadences so: they follow a change of batch
        # size), rounded up to whole steps as the MLPerf reference does.
        every = eval_cfg.every
        if eval_cfg.every_samples:
            every = math.ceil(eval_cfg.every_samples / global_batch_size)
        return cls(every, eval_cfg.first_interval, eval_cfg.at_start)

    def due(self, step: int) -> bool:
        """Whether a validation follows optimizer step `step` (counted from 1)."""
        return self.every > 0 and step % self.every == 0 and step // self.every >= self.first_interval


@dataclass
class Validator:
    """Scores the validation windows when asked and keeps the history; `on_start`/`on_result` are
    told of each validation (the MLPerf log, metrics and the console)."""

    layout: Layout
    dataset: object | None
    samples: int
    micro_batch: int
    cadence: Cadence
    device: torch.device
    precision: Precision
    fused: bool
    on_start: Callable[[int], None] = lambda consumed: None
    on_result: Callable[[int, int, float, float], None] = lambda step, consumed, value, seconds: None
    # Zero-shot tasks scored after each validation (`eval.tasks`: eval/zero_shot.py), or None.
    zero_shot: Callable[[Layout], dict[str, float]] | None = None
    on_zero_shot: Callable[[int, dict[str, float], float], None] = lambda step, results, seconds: None
    # Checked between batches of a validation that may be cut short (the stop-signal flag); None: never.
    stop: Callable[[], int] | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_by: str | None = None  # the signal that ended the last validation early (no result recorded)

    @property
    def enabled(self) -> bool:
        return self.dataset is not None and self.samples > 0

    def validated_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1][0] == step

    def run(self, step: int, consumed: int, may_stop: bool = False) -> float | None:
        """The validation after `step` (and the zero-shot tasks, if any); with `may_stop`, a stop
        signal ends it between batches (None, `stopped_by` set, nothing recorded)."""
        value = None
        if self.enabled:
            self.on_start(consumed)
            t0 = time.perf_counter()
            try:
                value = evaluate(self.layout, self.dataset, self.samples, self.micro_batch, self.device, self.precision,
                                 self.fused, self.stop if may_stop else None)
            except Stopped as e:
                self.stopped_by = e.signal_name
                return None
            self.history.append((step, value))
            self.on_result(step, consumed, value, time.perf_counter() - t0)
        if self.zero_shot is not None:
            t0 = time.perf_counter()
            results = self.zero_shot(self.layout)
            self.on_zero_shot(step, results, time.perf_counter() - t0)
        return value
