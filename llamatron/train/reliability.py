"""What keeps a long run alive and honest: pre-emption signals, the per-step agreement of all ranks on
non-finite steps and stop requests, and gradient-norm spike detection. docs/reliability.md says what
each failure costs.
"""

from __future__ import annotations

import signal
import statistics

import torch
import torch.distributed as dist

# The stop-signal flag lives in a module without torch, so the command line can install it before the
# slow imports (llamatron/stop_signals.py); re-exported here for the step guard.
from llamatron.stop_signals import STOP_SIGNALS, install_stop_handlers, stop_requested  # noqa: E402,F401


def agree(loss: torch.Tensor | None, grad_norm: torch.Tensor, stop: int, device) -> tuple[bool, str | None, float]:
    """(any rank saw a non-finite loss or gradient norm, the name of the stop signal any rank
    received or None, gradient norm). `stop`: this rank's `stop_requested()`.

    One all-reduce (max) of three numbers over all ranks and one host read per step: the skip
    decision must be the same on every rank (a rank that stepped while another skipped would hold
    different weights), and it has to be known before the optimizer step. The gradient norm is the
    same on every rank already; it rides along so the spike check costs no extra read.
    """
    bad = ~torch.isfinite(grad_norm.detach().float().reshape(()))
    if loss is not None:  # None: a pipeline stage without the loss
        bad = bad | ~torch.isfinite(loss.detach().float().reshape(()))
    flags = torch.stack([bad.float(), torch.tensor(float(stop), device=device),
                         grad_norm.detach().float().reshape(()).to(device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, signum, norm = flags.tolist()
    return nonfinite > 0, signal.Signals(int(signum)).name if signum else None, norm


# Spikes are judged against the median of the last SPIKE_WINDOW finite gradient norms, once at least
# SPIKE_MIN_HISTORY are known: a median is not moved by the spikes themselves, and the early decline of
# the norm only makes the current value smaller than the median, never a false spike.
SPIKE_WINDOW = 100
SPIKE_MIN_HISTORY = 10


def grad_spike(history: list[float], norm: float, factor: float) -> float | None:
    """The running median if `norm` exceeds `factor` times it, else None. Appends finite norms to
    `history` (kept at SPIKE_WINDOW entries; it is saved with checkpoints so a resumed run flags the
    same steps)."""
    spike = None
    if factor > 0 and len(history) >= SPIKE_MIN_HISTORY:
        median = statistics.median(history)
        if norm > factor * median:
            spike = median
    history.append(norm)
    del history[:-SPIKE_WINDOW]
    return spike


def describe_indices(indices) -> str:
    """Sample indices as compact ranges: [0, 1, 2, 5] -> '0-2, 5'."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


class StepGuard:
    """The per-step policy on non-finite steps, gradient-norm spikes and stop signals; `train_step`
    calls it (as `before_update`) once the gradients are reduced and clipped, and takes the optimizer
    step only if it returns True.

    It decides on numbers all ranks agreed on (`agree`: one all-reduce and one host read per step),
    so every rank decides the same. Non-finite loss or gradient norm on any rank: with
    `nonfinite="stop"` the run must halt (`self.halt` says why: the weights are still those before
    the step); with "skip" the update is dropped and counted, until `max_skips` in a row halt it too.
    A finite norm above `spike_factor` x the median of recent ones is reported as a spike. A stop
    signal received by any rank is kept in `stop_signal` (the trainer checkpoints and exits 75).

    batch_of(step) -> (first sample, end, this rank's sample indices) of a 0-based step names the
    data of a non-finite step; report(kind, step, values) writes a metrics row; log prints a line.
    """

    def __init__(self, nonfinite: str = "stop", max_skips: int = 10, spike_factor: float = 5.0, *,
                 batch_of=lambda step: (0, 0, []), data_seed: int = 0, report=lambda kind, step, values: None,
                 log=print, agree_fn=None, device=None):
        self.nonfinite, self.max_skips, self.spike_factor = nonfinite, max_skips, spike_factor
        self.batch_of, self.data_seed, self.report, self.log = batch_of, data_seed, report, log
        self.agree_fn = agree_fn or (lambda loss, norm, stop: agree(loss, norm, stop, device))
        self.skipped = 0
        self.skips_in_a_row = 0
        self.grad_history: list[float] = []
        self.stop_signal: str | None = None
        self.halt: str | None = None

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run counts and flags as the uninterrupted one would."""
        return {"skipped_steps": self.skipped, "grad_norm_history": list(self.grad_history)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state.get("skipped_steps", 0)
        self.grad_history = list(state.get("grad_norm_history", []))

    def __call__(self, step: int, loss: torch.Tensor | None, grad_norm: torch.Tensor) -> bool:
        """Before the update of 0-based step `step`: True to take it."""
        nonfinite, stop, norm = self.agree_fn(loss, grad_norm, stop_requested())
        local = "n/a on this pipeline stage" if loss is None else f"{float(loss):.4g}"
        return self.decide(step, nonfinite, stop, norm, local)

    def decide(self, step: int, nonfinite: bool, stop: str | None, norm: float, local_loss: str = "n/a") -> bool:
        self.stop_signal = self.stop_signal or stop
        n = step + 1  # the step being taken, numbered as logs and metrics number it
        if not nonfinite:
            self.skips_in_a_row = 0
            median = grad_spike(self.grad_history, norm, self.spike_factor)
            if median is not None:
                self.log(f"step {n:6d} | gradient norm spike: {norm:.4g} is {norm / median:.1f} x the median "
                         f"{median:.4g} of recent steps")
                self.report("grad_spike", n, {"grad_norm": norm, "median": median})
            return True
        first, end, mine = self.batch_of(step)
        what = (f"step {n}: non-finite loss or gradient norm (gradient norm {norm:.4g}, this rank's loss {local_loss}); "
                f"its global batch is training samples {first}-{end - 1} (dataset indices in Megatron sample order, "
                f"data.seed {self.data_seed}), this rank read {describe_indices(mine)}")
        self.report("nonfinite", n, {"grad_norm": norm, "samples": [first, end], "policy": self.nonfinite})
        # A halted step is not counted as skipped: resuming from the checkpoint written on halting redoes it.
        if self.nonfinite == "stop":
            self.halt = f"{what}; no update was applied (train.nonfinite=stop; set it to skip to drop such batches)"
        elif self.skips_in_a_row + 1 >= self.max_skips:
            self.halt = (f"{what}; {self.skips_in_a_row + 1} steps in a row were non-finite (train.nonfinite_max_skips): "
                         "the run is diverging or the data is damaged here; no update was applied")
        else:
            self.skipped += 1
            self.skips_in_a_row += 1
            self.log(f"{what}; optimizer step skipped ({self.skipped} so far)")
        return False
