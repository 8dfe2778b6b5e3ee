"""Tensor parallelism with sequence parallelism (Megatron-style), as DTensor plans on the plain model.

Per block: q/k/v and the FFN's gate/up projections are split by output columns (heads, FFN width),
the attention output and FFN down projections by input rows, so each half of a block needs one
collective. Between them (norms, residual adds) activations are sharded along the sequence, which
turns each all-reduce into a reduce-scatter + all-gather pair of the same cost and divides norm and
residual activation memory by tp.

The embedding is split by vocabulary rows and returns sequence shards; the output layer is split by
vocabulary columns and returns vocabulary-sharded logits as a DTensor, for torch's `loss_parallel`
(the cross-entropy is computed without gathering the logits). The fused linear cross-entropy of
`llamatron.loss` needs the whole output weight, so under TP the trainer takes the logits path.
LoRA layers take Megatron's adapter layout through `colwise` / `rowwise` (llamatron/parallel/tensor_parallel.py).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamatron.models.llama.model import Transformer
from llamatron.parallel.tensor_parallel import colwise, rowwise


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (or a pipeline stage of it) over `tp_mesh`, in place."""
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.tok_embeddings is not None:
        # The embedding returns its DTensor's local shard (`to_local()`). Fed straight into a
        # torch.compile'd block, that alias makes the backward hand the embedding's redistribute a
        # plain tensor (torch 2.13: "'Tensor' object has no attribute '_local_tensor'" in
        # NestedRedistribute); a copy of the shard (batch x seq/tp x dim) cuts the alias.
        model.tok_embeddings.register_forward_hook(lambda module, args, out: out.clone())
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # The block's residual stream is sequence-sharded; attention needs the whole sequence.
            # cos/sin (the other two inputs) are plain tensors, left alone.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": colwise(block.attention.wq),
            "attention.wk": colwise(block.attention.wk),
            "attention.wv": colwise(block.attention.wv),
            "attention.wo": rowwise(block.attention.wo, output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(block.feed_forward.w1),
            "feed_forward.w3": colwise(block.feed_forward.w3),
            "feed_forward.w2": rowwise(block.feed_forward.w2, output_layouts=Shard(1)),
        })
