"""Named points in the training step and the checkpoint save where other code can run.

Production code only calls `fire`; with nothing registered that is a dictionary lookup. The test-only
fault injection (`llamatron/testing/faults.py`, driven by LLAMATRON_FAULT) fills them to kill, signal
or poison a run at an exact moment. The points and what they are given:

    step_start    step (1-based, as logs number it), rank, model (the last part of this rank)
    step_end      step, rank, model
    save          phase (before_data, during_data, after_data, before_marker, before_rename,
                  after_rename; async_write: in the writer thread of an asynchronous save as its
                  shard write starts, while training goes on), step, rank. In an asynchronous save
                  after_data and the phases after it run in the writer thread too.
    eval_batch    start (the first window of the validation batch about to be scored)
    staging       rank: in the background thread that allocates the host buffers of asynchronous
                  saves (`HostStager.preallocate`), before it allocates them
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = ("step_start", "step_end", "save", "eval_batch", "staging")
_registered: dict[str, list[Callable[..., None]]] = {}


def add(point: str, fn: Callable[..., None]) -> Callable[[], None]:
    """Run `fn(**info)` at `point`; returns a function that removes it again (calling it twice is
    harmless)."""
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; points: {', '.join(POINTS)}")
    _registered.setdefault(point, []).append(fn)

    def remove() -> None:
        if fn in _registered[point]:
            _registered[point].remove(fn)

    return remove


def fire(point: str, **info) -> None:
    for fn in _registered.get(point, ()):
        fn(**info)
