"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
(x context-parallel) ranks; with a 2-D mesh, HSDP (sharded within a replica, all-reduced across)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from torch import nn


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True, ignored_params: set | None = None) -> None:
    """Wrap each block, then the first stage's modules (the embedding), then the last stage's (norm +
    output) together, then the root.

    One unit per block, so only one or two blocks' parameters are gathered at a time and the
    all-gather of the next overlaps the compute of the current. With `param_dtype` bf16 the gathered
    parameters are bf16 (no autocast needed) while the sharded master weights, gradients and
    optimizer state stay fp32, and gradients are reduced in fp32 so that summing over ranks loses
    nothing. `reshard_after_forward=False` keeps the gathered parameters until backward (pipeline
    parallelism runs several micro-batches' forwards before their backwards).
    """
    mp = mixed_precision(param_dtype)
    # ignored_params: sharded otherwise (expert parallelism's experts where no FSDP degree is left for them);
    # FSDP neither gathers nor reduces them. Units wrapped before (shard_experts) are left to themselves.
    kw = {"mesh": mesh, "mp_policy": mp, **({"ignored_params": ignored_params} if ignored_params else {})}
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters would be gathered again at once by backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    if getattr(model, "ties_first_last", False):
        # The output projection uses the embedding weight (tied embeddings; under pipelining the
        # last stage's copy of it): both uses must see it gathered, so it stays in the root unit.
        fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
        return
    first = _present(model, model.first_stage)
    if first:
        fully_shard(first, reshard_after_forward=reshard_after_forward, **kw)
    last = _present(model, model.last_stage)
    if last:
        # Used at once again by backward: keep it gathered.
        fully_shard(last, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Parameters gathered in `param_dtype` (None: as stored), gradients reduced in fp32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _present(model: nn.Module, names: tuple[str, ...]):
    """The named top-level modules this part holds (pipeline stages hold some): one module, a list
    of several (one FSDP unit), or None."""
    modules = [m for m in (getattr(model, n) for n in names) if m is not None]
    return None if not modules else modules[0] if len(modules) == 1 else modules
