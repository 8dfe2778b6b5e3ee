"""The stop-signal flag: SIGTERM/SIGUSR1 ask a run to checkpoint and exit 75 (docs/reliability.md).

Imports nothing heavy, so `llamatron train` installs it before torch and the rest are imported: a
signal during start-up is then kept for the first step instead of killing the process (exit -15).
"""

from __future__ import annotations

import signal
import threading

# Signals that ask the run to stop early and be requeued: SIGTERM is what Slurm, Kubernetes and most
# schedulers send before killing a job; SIGUSR1 is what `sbatch --signal=USR1@SECONDS` sends ahead of
# the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handler(signum, frame):
    _received.append(signum)


def install_stop_handlers():
    """Make SIGTERM/SIGUSR1 only set a flag (read by `stop_requested`), so the step in flight and the
    checkpoint after it complete. Returns a function that puts the previous handlers back. Installed
    already (by the command line, before the trainer's own call), it keeps the flag and returns a no-op."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    if all(signal.getsignal(s) is _handler for s in STOP_SIGNALS):
        return lambda: None
    _received.clear()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()

    return restore


def stop_requested() -> int:
    """The first stop signal received by this process, or 0."""
    return _received[0] if _received else 0
