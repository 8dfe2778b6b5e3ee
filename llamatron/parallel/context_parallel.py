"""Context parallelism: the sequence is split over cp ranks, attention is computed across them.

Every sequence is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r (head-tail load
balancing: under the causal mask an early chunk attends to little and a late one to much, so each
rank gets one of each and the same work). Tokens, labels and the model's rotary tables are sharded
that way in place by torch's `context_parallel` context, so the model itself is unchanged: each rank
computes its own queries' attention over all keys, everything else is per token.

Attention across ranks:
- CUDA: torch's ring attention (`torch.distributed.tensor.experimental.context_parallel` swaps
  `scaled_dot_product_attention` for a ring over the flash / memory-efficient / cuDNN kernels).
- CPU: torch 2.13 has no ring attention for the CPU kernel (`aten._scaled_dot_product_flash_attention
  _for_cpu.default does not have a sharding strategy registered`), so the same context runs an
  all-gather attention instead (Llama 3's CP: gather the keys and values of all ranks, mask by
  absolute position). Same sharding, same results, more memory; it is what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental import context_parallel

_SDPA = F.scaled_dot_product_attention  # the unpatched function
# Renamed in torch 2.13; 2.11 has only the old name.
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def chunk_positions(rank: int, cp: int, seq_len: int, device=None) -> torch.Tensor:
    """Absolute positions held by CP rank `rank`: chunks rank and 2*cp-1-rank of 2*cp."""
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat((head, tail))


def _allgather_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, *, mesh: DeviceMesh):
    if attn_mask is not None or dropout_p:
        raise NotImplementedError("context-parallel attention supports only the causal mask, no dropout")
    cp, rank = mesh.size(), mesh.get_local_rank()
    local = query.shape[2]
    seq_len = local * cp
    # [batch, heads, seq, head_dim]: gather along the sequence, ranks in order. The backward of the
    # gather is a reduce-scatter: each rank gets the summed gradient of its own keys and values.
    k = _all_gather(key.contiguous(), gather_dim=2, group=mesh)
    v = _all_gather(value.contiguous(), gather_dim=2, group=mesh)
    mask = None
    if is_causal:
        q_pos = chunk_positions(rank, cp, seq_len, query.device)
        k_pos = torch.cat([chunk_positions(j, cp, seq_len, query.device) for j in range(cp)])
        mask = k_pos[None, :] <= q_pos[:, None]
    return _SDPA(query, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def context_parallel_context(mesh: DeviceMesh, buffers: list[torch.Tensor], seq_dims: list[int],
                             no_restore: set[torch.Tensor]):
    """Shard `buffers` along `seq_dims` (in place; those not in `no_restore` are restored on exit)
    and compute attention across the CP ranks, for the forward and backward inside."""
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=no_restore):
        if mesh.device_type == "cuda":
            yield
            return
        ring = F.scaled_dot_product_attention

        def scaled_dot_product_attention(*args, **kwargs):  # a named function: torch.compile traces it
            return _allgather_attention(*args, **kwargs, mesh=mesh)

        F.scaled_dot_product_attention = scaled_dot_product_attention
        try:
            yield
        finally:
            F.scaled_dot_product_attention = ring
