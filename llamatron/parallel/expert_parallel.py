"""Expert parallelism: each MoE block's experts split over the `ep` ranks, tokens sent to the rank
holding their expert and back with all-to-all (`parallel.ep`), the experts FSDP-sharded over the
data-parallel ranks that hold the same ones.

The ep ranks are data-parallel (dp_shard) ranks, as torchtitan's EP "borrows" them: dp_shard = efsdp
x ep (`llamatron/parallel/dims.py`). Each rank routes its own tokens, sends the rows for expert e to
the rank of its ep group holding e (all_to_all_single with per-rank split sizes, after exchanging the
per-expert counts), runs its E/ep experts on what it received (one grouped GEMM), and sends the
outputs back in the same order. The expert weights become DTensors sharded along the expert dimension
(Shard(0)) on the ep mesh, so initialisation (`materialize`) and checkpoints (DCP, resharding between
layouts) see the whole [E, d, f] tensors. Where efsdp > 1 (or with replicas, HSDP), `shard_experts`
makes each block's experts an FSDP unit of their own over the efsdp ranks (2-D: efsdp x ep), gathered
before their forward like any unit; with efsdp = 1 and no replicas nothing is left to shard and FSDP
leaves them alone (`ignored_params`). Every other parameter is FSDP-sharded over dp_shard as usual.

Gradients of the global mean loss: a rank's expert gradient sums the contributions of its ep group's
tokens (every source rank's loss reaches it through the all-to-all's backward), and FSDP then averages
it over the efsdp ranks (and replicas), which hold the other ep groups' sums: that is the sum over all
dp ranks' losses divided by efsdp x dp_replicate, where the global mean divides by dp = ep x efsdp x
dp_replicate. The expert gradients are therefore divided by ep on the way (`_ScaleGrad`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from llamatron.parallel.fsdp import mixed_precision


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

    @torch.compiler.disable  # split sizes read on the host, collectives: never part of a compiled graph
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
        y = experts(received[order], recv.sum(0))  # this rank's weights: `_local_weights`
        back = torch.empty_like(y).index_copy(0, order, y)  # back to (source rank, expert) order
        # In the experts' output dtype, which is x's except under autocast over fp32 weights (bf16 out).
        return dist_fn.all_to_all_single(y.new_empty(x.shape[0], y.shape[1]), back, send_splits, recv_splits,
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


def _local_weights(experts: nn.Module, args, kwargs, scale: float):
    """Forward pre-hook of the experts: compute with this rank's shard of the weights, gradients scaled
    (see the module doc). Read here rather than by the dispatch because FSDP's pre-hook, which runs
    first, is what gathers them over efsdp."""
    w1, w2 = (_ScaleGrad.apply(getattr(experts, name).to_local(), scale) for name in ("w1", "w2"))
    return args, {**kwargs, "w1": w1, "w2": w2}


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Shard every MoE block's experts of `model` (on the meta device) over `ep_mesh` and route their
    tokens with all-to-all. Returns the experts modules (for `shard_experts`, or for FSDP to ignore)."""
    dispatch = AllToAllDispatch(ep_mesh)
    hook = functools.partial(_local_weights, scale=1.0 / ep_mesh.size())
    sharded = []
    for module in model.modules():
        if getattr(module, "dispatch", "absent") is None and hasattr(module, "experts"):
            experts = module.experts
            for name in ("w1", "w2"):
                setattr(experts, name, nn.Parameter(distribute_tensor(getattr(experts, name), ep_mesh, [Shard(0)])))
            experts.register_forward_pre_hook(hook, with_kwargs=True)
            module.dispatch = dispatch
            sharded.append(experts)
    return sharded


def shard_experts(experts: list[nn.Module], mesh: DeviceMesh, param_dtype: torch.dtype | None,
                  reshard_after_forward: bool) -> None:
    """Make each experts module an FSDP unit over `mesh` (efsdp, or dp_replicate x efsdp: HSDP), before
    the blocks around them are wrapped. Where the E/ep local experts do not divide over efsdp, FSDP
    shards each expert's first matrix dimension instead of the expert dimension (no padded experts)."""
    efsdp = mesh.size(mesh.ndim - 1)
    for module in experts:
        by_row = module.w1.to_local().shape[0] % efsdp != 0
        fully_shard(module, mesh=mesh, mp_policy=mixed_precision(param_dtype), reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=(lambda p: Shard(1)) if by_row else None)
