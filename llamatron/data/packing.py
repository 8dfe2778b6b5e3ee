"""Packing fine-tuning examples into fixed-length sequences.

Greedy, in the examples' order (as torchtune packs): an example goes into the current sequence if it
fits in what is left, otherwise it starts the next one; an example is never split across sequences
(longer ones were truncated or dropped before). In-order packing keeps the dataset's order and needs
no look-ahead; first-fit-decreasing fills slightly better but sorts short examples together.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack_greedy(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to at most seq_len."""
    bins: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        n = int(n)
        if n > seq_len:
            raise ValueError(f"example {i} of {n} positions does not fit a sequence of {seq_len}")
        if not bins or n > room:
            bins.append([])
            room = seq_len
        bins[-1].append(i)
        room -= n
    return bins
