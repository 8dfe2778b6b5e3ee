"""Test-only fault injection: the environment variable LLAMATRON_FAULT makes a run fail on purpose,
so the tests (and docs/reliability.md) can show what each failure costs.

The faults fill the hook points of `llamatron/hooks.py`; the command line installs them from the
variable at start (`install_from_env`), in-process tests with `installed(spec)`. Unset, nothing here
runs. The value is a comma-separated list of faults, each a kind
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
        after_data      RNG file, DCP shards, their checksums and .metadata written, trainer state
                        not (SIGKILL)
        before_marker   every file written except the COMPLETE marker (SIGKILL)
        before_rename   marker written, directory still under its temporary name (SIGKILL)
        after_rename    renamed to step_NNNNNNNN, older checkpoints not yet pruned (SIGKILL)
        async_write     checkpoint.async_save only: the background writer thread starts writing the
                        shards while training goes on (SIGKILL); in an async save after_data and
                        the phases after it happen in that thread too
    sigterm@step=3[@rank=R]           the process sends itself SIGTERM as step 3 begins (sigusr1 too)
    staging_nomem[@rank=R]            checkpoint.async_save only: the background allocation of the
                                      host buffers of the staging copy fails with ENOMEM, as on a
                                      host out of memory (the next save fails with it)
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal

from llamatron import hooks
from llamatron.errors import LlamatronError

ENV = "LLAMATRON_FAULT"
SAVE_PHASES = ("before_data", "during_data", "after_data", "before_marker", "before_rename", "after_rename",
               "async_write")
_KEYS = {"nan_loss": {"step", "rank"}, "spike": {"step", "rank"}, "kill": {"save", "step", "rank"},
         "sigterm": {"step", "rank"}, "sigusr1": {"step", "rank"}, "staging_nomem": {"rank"}}


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


def _matches(where: dict[str, str], rank: int, step: int, **match: str) -> bool:
    if "rank" in where and int(where["rank"]) != rank:
        return False
    if "step" in where and int(where["step"]) != step:
        return False
    return all(where.get(key) == value for key, value in match.items())


def install(spec: str | None = None):
    """Fill the hook points (llamatron/hooks.py) with the faults of `spec` (default $LLAMATRON_FAULT).
    Returns a function that removes them."""
    faults = parse(spec)
    poisoned: list = []  # forward-hook handles of the step in flight

    def step_start(step, rank, model):
        for kind, where in faults:
            if kind in ("sigterm", "sigusr1") and _matches(where, rank, step):
                os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
            if kind in ("nan_loss", "spike") and _matches(where, rank, step):
                factor = float("nan") if kind == "nan_loss" else 1000.0
                poisoned.append(model.register_forward_hook(lambda module, args, out, f=factor: out * f))

    def step_end(step, rank, model):
        while poisoned:
            poisoned.pop().remove()

    def save(phase, step, rank):
        if any(kind == "kill" and _matches(where, rank, step, save=phase) for kind, where in faults):
            _die(phase)

    def staging(rank):
        if any(kind == "staging_nomem" and _matches(where, rank, 0) for kind, where in faults):
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    removers = [hooks.add("step_start", step_start), hooks.add("step_end", step_end), hooks.add("save", save),
                hooks.add("staging", staging)]
    return lambda: [remove() for remove in removers]


def install_from_env():
    """What the command line does at start: faults from $LLAMATRON_FAULT, if it is set. Returns their
    remover (a no-op when unset)."""
    if os.environ.get(ENV):
        return install()
    return lambda: None


@contextlib.contextmanager
def installed(spec: str):
    """The faults of `spec` for the duration of a block (in-process tests)."""
    remove = install(spec)
    try:
        yield
    finally:
        remove()


def _die(phase: str) -> None:
    if phase == "during_data":
        # A death in the middle of the shard write, at a byte count we choose: a write that crosses
        # RLIMIT_FSIZE raises SIGXFSZ, whose default action ends the process on the spot (Python
        # ignores the signal at start-up, so the default is restored first; no core file).
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
