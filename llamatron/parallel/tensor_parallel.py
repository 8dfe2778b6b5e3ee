"""`colwise(module)` / `rowwise(module)`: the TP style of a linear layer in the families' plans, for a
plain nn.Linear or one with a LoRA adapter (`llamatron.transforms.lora.LoRALinear`).

torch's ColwiseParallel / RowwiseParallel distribute every parameter of the module they are given,
its children's included, by the base weight's placement: a LoRA layer's adapters would be sharded
along the wrong dimension. Its adapters take Megatron's LoRA-under-TP layout instead:
- column-parallel base (W [out, in] split by output rows): B [out, r] split by rows too, A [r, in]
  replicated; the adapter's output is then sharded on its last dimension like the base output;
- row-parallel base (W split by input columns): A split by columns, B replicated; the adapter's
  output is then a partial sum like the base output, and the style's output hook reduces the sum of
  both in the one collective the base layer needs anyway.
Merging (W += s B A) then works on the shards: B A has W's placement, so no rank needs another's.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from llamatron.transforms.lora import LoRALinear


def colwise(module: nn.Module, **kwargs) -> ParallelStyle:
    """ColwiseParallel(**kwargs) for `module`, with its adapter (if any) laid out to match."""
    style = ColwiseParallel(**kwargs)
    return _WithAdapter(style, a=Replicate(), b=Shard(0)) if isinstance(module, LoRALinear) else style


def rowwise(module: nn.Module, **kwargs) -> ParallelStyle:
    """RowwiseParallel(**kwargs) for `module`, with its adapter (if any) laid out to match."""
    style = RowwiseParallel(**kwargs)
    return _WithAdapter(style, a=Shard(1), b=Replicate()) if isinstance(module, LoRALinear) else style


class _WithAdapter(ParallelStyle):
    """`base` applied to the layer with its children detached (torch's style then sees a plain linear:
    its weight and bias), then lora_A and lora_B distributed with placements `a` and `b`."""

    def __init__(self, base: ParallelStyle, a: Placement, b: Placement):
        super().__init__()
        self.base, self.a, self.b = base, a, b

    # ParallelStyle's contract: parallelize_module calls `_apply` (torch names it so); nothing of
    # ColwiseParallel / RowwiseParallel is overridden, they are applied through parallelize_module.
    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        children = dict(module.named_children())  # lora_A, lora_B, lora_dropout
        for name in children:
            delattr(module, name)
        parallelize_module(module, device_mesh, self.base, src_data_rank=self.src_data_rank)
        for name, placement in (("lora_A", self.a), ("lora_B", self.b)):
            w = children[name].weight
            children[name].weight = nn.Parameter(
                distribute_tensor(w, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=w.requires_grad)
        for name, child in children.items():
            setattr(module, name, child)
        return module

    def __repr__(self) -> str:
        return f"{self.base!r} + LoRA(A {self.a}, B {self.b})"
