"""Test-only fault injection: the environment variable LLAMATRON_FAULT makes a run fail on purpose,
so the tests (and docs/reliability.md) can show what each failure costs.

Unset, nothing here does anything. The value is a comma-separated list of faults, each a kind
followed by `@key=value` conditions (step = the 1-based optimizer step the logs and metrics show;
rank = the global rank, every rank when absent):

    nan_loss@step=3[@rank=R]          the model output of step 3 is multiplied by NaN (loss and
                                      gradients become NaN) on rank R
    spike@step=12[@rank=R]            the model output of step 12 is multiplied by 1000 (a gradient
                                      norm spike)
    kill@save=PHASE[@step=4][@rank=R] the process dies at PHASE of the checkpoint save of step 4:
        before_data     temporary directory made, nothing written (SIGKILL)
        during_data     inside DCP's write, the shard file cut at 1 MiB: the kernel kills the
                        process with SIGXFSZ when its write crosses RLIMIT_FSIZE
        after_data      DCP shards and .metadata written, RNG and trainer state not (SIGKILL)
        before_marker   every file written except the COMPLETE marker (SIGKILL)
        before_rename   marker written, directory still under its temporary name (SIGKILL)
        after_rename    renamed to step_NNNNNNNN, older checkpoints not yet pruned (SIGKILL)
    sigterm@step=3[@rank=R]           the process sends itself SIGTERM as step 3 begins (sigusr1 too)
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal

from llamatron.errors import LlamatronError

ENV = "LLAMATRON_FAULT"
SAVE_PHASES = ("before_data", "during_data", "after_data", "before_marker", "before_rename", "after_rename")
_KEYS = {"nan_loss": {"step", "rank"}, "spike": {"step", "rank"}, "kill": {"save", "step", "rank"},
         "sigterm": {"step", "rank"}, "sigusr1": {"step", "rank"}}


def parse(spec: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """The faults of `spec` (default: $LLAMATRON_FAULT) as (kind, conditions); errors name the variable."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *conds = item.split("@")
        if kind not in _KEYS:
            raise LlamatronError(f"{ENV}={spec!r}: unknown fault {kind!r}; expected one of {', '.join(_KEYS)}")
        where = {}
        for c in conds:
            key, _, value = c.partition("=")
            if key not in _KEYS[kind] or not value:
                raise LlamatronError(f"{ENV}={spec!r}: {c!r} is not a condition of {kind} "
                                     f"(key=value with key one of {', '.join(sorted(_KEYS[kind]))})")
            if key in ("step", "rank") and not value.isdigit():
                raise LlamatronError(f"{ENV}={spec!r}: {key} must be a number, got {value!r}")
            where[key] = value
        if kind == "kill" and where.get("save") not in SAVE_PHASES:
            raise LlamatronError(f"{ENV}={spec!r}: kill needs save=PHASE, PHASE one of {', '.join(SAVE_PHASES)}")
        faults.append((kind, where))
    return faults


def _active(kind: str, rank: int, step: int | None = None, **match: str) -> bool:
    for k, where in parse():
        if k != kind:
            continue
        if "rank" in where and int(where["rank"]) != rank:
            continue
        if "step" in where and (step is None or int(where["step"]) != step):
            continue
        if all(where.get(key) == value for key, value in match.items()):
            return True
    return False


@contextlib.contextmanager
def at_step(step: int, rank: int, last_part):
    """Around optimizer step `step` (1-based): a signal to self, NaN or spiking model output."""
    if ENV not in os.environ:
        yield
        return
    for kind, sig in (("sigterm", signal.SIGTERM), ("sigusr1", signal.SIGUSR1)):
        if _active(kind, rank, step):
            os.kill(os.getpid(), sig)
    handle = None
    for kind, factor in (("nan_loss", float("nan")), ("spike", 1000.0)):
        if _active(kind, rank, step):
            handle = last_part.register_forward_hook(lambda module, args, out, f=factor: out * f)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def at_save(phase: str, step: int, rank: int) -> None:
    """Called by `save_checkpoint` at each phase; dies there if LLAMATRON_FAULT asks."""
    if ENV not in os.environ or not _active("kill", rank, step, save=phase):
        return
    if phase == "during_data":
        # A death in the middle of the shard write, at a byte count we choose: a write that crosses
        # RLIMIT_FSIZE raises SIGXFSZ, whose default action ends the process on the spot (Python
        # ignores the signal at start-up, so the default is restored first; no core file).
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
