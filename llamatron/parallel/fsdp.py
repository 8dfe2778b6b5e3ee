"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel
(x context-parallel) ranks; with a 2-D mesh, HSDP (sharded within a replica, all-reduced across)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llamatron.model import Transformer


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """Wrap each block, then the embedding, then norm + output together, then the root.

    One unit per block, so only one or two blocks' parameters are gathered at a time and the
    all-gather of the next overlaps the compute of the current. With `param_dtype` bf16 the gathered
    parameters are bf16 (no autocast needed) while the sharded master weights, gradients and
    optimizer state stay fp32, and gradients are reduced in fp32 so that summing over ranks loses
    nothing. `reshard_after_forward=False` keeps the gathered parameters until backward (pipeline
    parallelism runs several micro-batches' forwards before their backwards).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = {"mesh": mesh, "mp_policy": mp}
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters would be gathered again at once by backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    if model.tok_embeddings is not None:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kw)
    if model.output is not None:
        fully_shard([model.norm, model.output], reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
