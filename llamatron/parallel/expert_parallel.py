"""Expert parallelism: each MoE block's experts split over the `ep` ranks, tokens sent to the rank
holding their expert and back with all-to-all (`parallel.ep`).

The ep ranks are the data-parallel (FSDP) ranks themselves, as torchtitan's EP "borrows" them: each
rank routes its own tokens, sends the rows for expert e to the rank holding e
(all_to_all_single with per-rank split sizes, after exchanging the per-expert counts), runs its E/ep
experts on what it received (one grouped GEMM), and sends the outputs back in the same order. The
expert weights become DTensors sharded along the expert dimension (Shard(0)) on the ep mesh, so
initialisation (`materialize`) and checkpoints (DCP, resharding between layouts) see the whole
[E, d, f] tensors; FSDP leaves them alone (`ignored_params`) and shards every other parameter.

Gradients: a rank's expert gradient sums the contributions of every rank's tokens to its local loss,
while FSDP averages the other gradients over the data-parallel ranks; the expert gradients are
therefore divided by ep on the way (`_ScaleGrad`), which makes both the gradient of the global mean
loss. For now ep must equal the FSDP degree (dp_shard, with no replicas, CP, TP or PP): the experts
are then not sharded further (ep x FSDP over the remaining data-parallel ranks is not done yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class AllToAllDispatch:
    """`dispatch(experts, x sorted by global expert, counts [E]) -> outputs`, in x's order (the MoE
    block's hook), with the experts' weights sharded over `mesh`."""

    def __init__(self, mesh: DeviceMesh):
        self.group = mesh.get_group()
        self.size = mesh.size()

    def __call__(self, experts: nn.Module, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n_local = counts.numel() // self.size
        # What every rank sends to every other, per local expert: [source rank, local expert].
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(self.size, n_local).sum(1).tolist()
        recv = recv_counts.view(self.size, n_local)
        recv_splits = recv.sum(1).tolist()
        received = dist_fn.all_to_all_single(x.new_empty(sum(recv_splits), x.shape[1]), x, recv_splits, send_splits,
                                             group=self.group)
        # Rows arrive grouped by source rank, then expert; the grouped GEMM wants them by expert.
        order = _by_expert(recv)
        w1 = _ScaleGrad.apply(experts.w1.to_local(), 1.0 / self.size)
        w2 = _ScaleGrad.apply(experts.w2.to_local(), 1.0 / self.size)
        y = experts(received[order], recv.sum(0), w1, w2)
        back = torch.empty_like(y).index_copy(0, order, y)  # back to (source rank, expert) order
        return dist_fn.all_to_all_single(x.new_empty(x.shape[0], y.shape[1]), back, send_splits, recv_splits,
                                         group=self.group)


def _by_expert(recv: torch.Tensor) -> torch.Tensor:
    """Row indices of blocks laid out as [source, expert] (recv[s, e] rows each), in [expert, source]
    order."""
    sizes = recv.flatten().tolist()
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    n_src, n_exp = recv.shape
    pieces = [torch.arange(starts[s * n_exp + e], starts[s * n_exp + e] + sizes[s * n_exp + e])
              for e in range(n_exp) for s in range(n_src)]
    return torch.cat(pieces).to(recv.device) if pieces else torch.zeros(0, dtype=torch.long, device=recv.device)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> set[nn.Parameter]:
    """Shard every MoE block's experts of `model` (on the meta device) over `ep_mesh` and route their
    tokens with all-to-all. Returns the expert parameters (for FSDP to leave alone)."""
    dispatch = AllToAllDispatch(ep_mesh)
    sharded = set()
    for module in model.modules():
        if getattr(module, "dispatch", "absent") is None and hasattr(module, "experts"):
            experts = module.experts
            for name in ("w1", "w2"):
                p = nn.Parameter(distribute_tensor(getattr(experts, name), ep_mesh, [Shard(0)]))
                setattr(experts, name, p)
                sharded.add(p)
            module.dispatch = dispatch
    return sharded
