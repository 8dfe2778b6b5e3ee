"""Packing fine-tuning examples into fixed-length sequences (`finetune.packing_algorithm`).

An example is never split across sequences (longer ones were truncated or dropped before), and the
sequences are shuffled per epoch afterwards (`SFTDataset`), so the packing decides only which
examples share a sequence, not the order they are read in.

- `best_fit_decreasing` (the default): longest example first, each into the open sequence it fills
  best, a new one when none has room. It leaves little padding whatever the lengths (NeMo and
  Megatron-Bridge pack their SFT data by fit too); on examples of 256-2048 tokens into 4096 it uses
  over 99% of the positions where in-order packing uses 84% (tests/test_finetune.py).
- `greedy`: in the examples' order, as torchtune packs: an example goes into the current sequence if
  it fits in what is left, otherwise it starts the next one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

PACKING_ALGORITHMS = ("best_fit_decreasing", "greedy")


def _check(i: int, n: int, seq_len: int) -> None:
    if n > seq_len:
        raise ValueError(f"example {i} of {n} positions does not fit a sequence of {seq_len}")


def pack_greedy(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to at most seq_len."""
    bins: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        n = int(n)
        _check(i, n, seq_len)
        if not bins or n > room:
            bins.append([])
            room = seq_len
        bins[-1].append(i)
        room -= n
    return bins


def pack_best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """As `pack_greedy`; each bin's indices ascending (the dataset's order inside a sequence)."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin) of the bins with room, sorted
    for i in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        n = int(lengths[i])
        _check(int(i), n, seq_len)
        j = bisect.bisect_left(rooms, (n, -1))  # the tightest room that holds n
        if j == len(rooms):
            bins.append([])
            room, b = seq_len, len(bins) - 1
        else:
            room, b = rooms.pop(j)
        bins[b].append(int(i))
        if room - n > 0:
            bisect.insort(rooms, (room - n, b))
    return [sorted(b) for b in bins]


def pack(lengths: Sequence[int], seq_len: int, algorithm: str = "best_fit_decreasing") -> list[list[int]]:
    packers = {"best_fit_decreasing": pack_best_fit_decreasing, "greedy": pack_greedy}
    return packers[algorithm](lengths, seq_len)
