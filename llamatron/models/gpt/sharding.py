"""GPT tensor parallelism with sequence parallelism, as DTensor plans (llama's sharding.py, plus biases,
the position embedding and the tied output).

Blocks as llama: q/k/v and the MLP up projection split by output columns (their biases with them),
attention output and MLP down projection by input rows (their biases replicated, added once after the
reduction), LayerNorms sequence-parallel. The token embedding is split by vocabulary rows; the position
embedding is replicated (a Replicate DTensor, plain tensors in and out): the embeddings module's output (token + position rows,
whole sequence) is then cut into this rank's sequence shard, whose backward all-gathers the gradient,
so every rank computes the same, whole position-embedding gradient. The output projection uses the
vocabulary-sharded embedding weight (or its own, sharded the same way when untied) on the gathered
sequence and returns vocabulary-sharded logits for `loss_parallel`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamatron.models.gpt.model import GPT
from llamatron.parallel.tensor_parallel import colwise, rowwise


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (or a pipeline stage of it) over `tp_mesh`, in place."""
    top = {}
    embeds = model.embeddings is not None and model.embeds_tokens
    if model.embeddings is not None:
        # Also a last pipeline stage's copy of the tied weight: sharded as the first stage's, so that
        # the two copies' local gradient shards line up when they are summed.
        top["embeddings.tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if embeds:
        top["embeddings"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.head is not None:
        if model.head.proj is not None:
            # Only its weight's placement (vocabulary rows) is used: the head calls F.linear itself.
            top["head.proj"] = ColwiseParallel()
        # Inputs: the sequence-sharded final norm output, and the (tied) weight, already a DTensor.
        top["head"] = PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                         use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    if embeds:
        _replicate(model.embeddings.pos, tp_mesh)
        # As llama's: a copy of the local shard cuts the alias a compiled first block trips over.
        model.embeddings.register_forward_hook(lambda module, args, out: out.clone())
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": colwise(block.attention.wq),
            "attention.wk": colwise(block.attention.wk),
            "attention.wv": colwise(block.attention.wv),
            "attention.wo": rowwise(block.attention.wo, output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(block.feed_forward.w1),
            "feed_forward.w2": rowwise(block.feed_forward.w2, output_layouts=Shard(1)),
        })


def _replicate(module: nn.Module, mesh: DeviceMesh) -> None:
    """Parameters as replicated DTensors (so gradient norms and optimizers see one kind of tensor under
    TP), plain tensors in and out."""

    def params(name, mod, mesh):
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

    distribute_module(module, mesh, params,
                      input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs),
                      output_fn=lambda mod, out, mesh: out.to_local())
