"""Reductions over the right groups: gradient norm and clipping, logged loss, peak memory."""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llamatron.parallel.dims import ParallelDims


def clip_grad_norm_(parameters, max_norm: float, dims: ParallelDims | None = None, foreach: bool = True,
                    duplicates=()) -> torch.Tensor:
    """The global L2 norm of all gradients, clipping them to `max_norm` (0: norm only).

    With DTensor gradients (FSDP, TP) the per-tensor norms are DTensors whose `full_tensor()` reduces
    over their mesh; pipeline stages hold disjoint parameters, so their squared norms are summed
    over the pipeline group. `duplicates` (the last stage's copies of tied weights, whose gradient
    equals the first stage's) are clipped but left out of the norm. In a single process this is
    exactly `torch.nn.utils.clip_grad_norm_`.
    """
    # Gradients by mesh, plain ones apart: foreach kernels and DTensor ops take one mesh at a time (a family
    # may keep some parameters replicated under TP, e.g. GLaM's router, then plain or FSDP-sharded over
    # dp_shard alone; expert parallelism's experts live on efsdp x ep). Plain ones are the same on every rank.
    kinds = {}
    for p in parameters:
        if p.grad is not None:
            kinds.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    kinds = list(kinds.values())
    skip = {id(p) for p in duplicates}
    norms = []
    for params in kinds:
        grads = [p.grad for p in params if id(p) not in skip]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=foreach)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        total = torch.zeros(())
    else:
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if dims is not None and dims.pp > 1:
        total = total.float() ** 2
        dist.all_reduce(total, group=dims.group("pp"))
        total = total.sqrt()
    if max_norm > 0:
        for params in kinds:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def sum_over(t: torch.Tensor, dims: ParallelDims | None, *names: str) -> torch.Tensor:
    """All-reduce (sum) `t` in place over each named mesh dimension present, in order."""
    if dims is None:
        return t
    for name in names:
        group = dims.group(name)
        if group is not None:
            dist.all_reduce(t, group=group)
    return t


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank (a copy; `t` itself in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def global_mean_loss(local: torch.Tensor | None, dims: ParallelDims | None, device) -> float:
    """The loss of the step as one number, the same on every rank.

    Each rank's value is the mean over its own tokens, all ranks of the step holding the same number:
    the mean over data-parallel and context-parallel ranks is the global token mean. Tensor-parallel
    ranks hold the same value already (not summed). Only the last pipeline stage has it; the other
    stages contribute zero to a sum over the pipeline group.
    """
    if dims is None or dims.world_size == 1:
        return float(local.item())
    t = (local.detach().float().reshape(()) if local is not None else torch.zeros((), device=device)).clone()
    sum_over(t, dims, "dp_cp", "pp")
    n = dims.dp * dims.cp
    return float(t.item()) / n


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory: CUDA memory allocated by torch, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def gather_per_rank(value: float, device: torch.device) -> list[float]:
    """`value` of every rank, in rank order (every rank must call this)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]
