"""Which dataset indices each rank reads: Megatron's `MegatronPretrainingSampler`.

Global batch b is the consecutive dataset indices [b*GBS, (b+1)*GBS). Within it, each chunk of
micro_batch * dp_size indices is one micro-batch step for all data-parallel ranks, and rank r takes
[r*micro_batch, (r+1)*micro_batch) of the chunk. So the samples a run sees, and their order within an
optimizer step, do not depend on the parallel layout.
"""

from __future__ import annotations


def micro_batch_indices(
    step: int, micro: int, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1
) -> range:
    """Dataset indices of micro-batch `micro` (0-based) of optimizer step `step` on rank `dp_rank`."""
    start = step * global_batch + micro * micro_batch * dp_size + dp_rank * micro_batch
    return range(start, start + micro_batch)


def accumulation_steps(global_batch: int, micro_batch: int, dp_size: int = 1) -> int:
    return global_batch // (micro_batch * dp_size)
