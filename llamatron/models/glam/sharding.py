"""Tensor parallelism for GLaM (Megatron-style, without sequence parallelism), as DTensor plans.

Per block: q/k/v split by heads (columns), the attention output projection by rows (one all-reduce);
the relative-position bias table [buckets, heads] split by heads with them; dense FFNs gate/up by
columns and down by rows (one all-reduce). Experts and router stay replicated: every TP rank routes
the same (replicated) tokens through all experts, so the MoE block needs no collective and its
gradients are the same on every rank (expert parallelism, `parallel.ep`, is the way to split experts).
The tied embedding / output layer (32K rows) is replicated too: the logits are whole on each rank.
Norms and the residual stream are replicated (no sequence parallelism: the MoE block and the
relative bias see whole sequences).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from llamatron.models.glam.model import GatedGELU, GLaM
from llamatron.parallel.tensor_parallel import colwise, rowwise


def apply_tensor_parallel(model: GLaM, tp_mesh: DeviceMesh) -> None:
    """Shard `model`'s blocks over `tp_mesh`, in place."""
    for block in model.layers.values():
        plan = {
            "attention.wq": colwise(block.attention.wq),
            "attention.wk": colwise(block.attention.wk),
            "attention.wv": colwise(block.attention.wv),
            "attention.wo": rowwise(block.attention.wo),
            # An embedding split by its output dimension: each rank looks up its own heads' biases.
            "attention.rel_bias": ColwiseParallel(),
        }
        if isinstance(block.feed_forward, GatedGELU):
            ffn = block.feed_forward
            plan.update({"feed_forward.w1": colwise(ffn.w1), "feed_forward.w3": colwise(ffn.w3),
                         "feed_forward.w2": rowwise(ffn.w2)})
        parallelize_module(block, tp_mesh, plan)
