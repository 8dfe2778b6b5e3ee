"""What keeps a long run alive and honest: pre-emption signals, the per-step agreement of all ranks on
non-finite steps and stop requests, and gradient-norm spike detection. docs/reliability.md says what
each failure costs.
"""

from __future__ import annotations

import signal
import statistics
import threading

import torch
import torch.distributed as dist

# Signals that ask the run to stop early and be requeued: SIGTERM is what Slurm, Kubernetes and most
# schedulers send before killing a job; SIGUSR1 is what `sbatch --signal=USR1@SECONDS` sends ahead of
# the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def install_stop_handlers():
    """Make SIGTERM/SIGUSR1 only set a flag (read by `stop_requested`), so the step in flight and the
    checkpoint after it complete. Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    _received.clear()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, frame):
        _received.append(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()

    return restore


def stop_requested() -> int:
    """The first stop signal received by this process, or 0."""
    return _received[0] if _received else 0


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
