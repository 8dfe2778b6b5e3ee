"""How this rank runs the model: its part(s), the parallel dimensions, the pipeline schedule, and the
contexts a forward/backward runs in (context-parallel sharding, loss-parallel under TP).

One process is the layout with one part and no mesh. Evaluation, the training step and the trainer
all take a `Layout`, so none of them branches on the parallel configuration itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from llamatron.fp8_gemm import FastAccum
from llamatron.loss import IGNORE_INDEX
from llamatron.parallel.dims import ParallelDims


def plain(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a loss under tensor parallelism) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass
class Layout:
    parts: list[nn.Module]
    dims: ParallelDims
    pipeline: object | None = None  # llamatron.parallel.pipeline.Pipeline
    fp8_output: FastAccum | None = None  # the output layer in FP8: the fused loss's GEMMs too, accumulating so
    n_params: int = 0  # of the whole model, not of this rank's share

    @classmethod
    def single(cls, model: nn.Module) -> "Layout":
        return cls([model], ParallelDims())

    @classmethod
    def build(cls, family, args, train, dims: ParallelDims, device: torch.device,
              param_dtype: torch.dtype | None, n_microbatches: int, lora=None,
              frozen_dtype: torch.dtype | None = None) -> "Layout":
        """The model of `args` (a `family`), cut and wrapped for this rank by `parallelize`, then
        materialised with the values the whole model would have (`train` is the `[train]` section).
        frozen_dtype: LoRA's frozen linear weights then stored in it (`transforms.lora.frozen_dtype`)."""
        from llamatron.models import count_parameters
        from llamatron.parallel.parallelize import materialize, parallelize

        torch.manual_seed(train.seed)
        with torch.device("meta"):
            whole = family.build(args)
        n_params = count_parameters(whole)
        parts, stage_ids, fp8_output = parallelize(whole, family, train, dims, param_dtype, lora)
        for part in parts:
            materialize(part, device, train.seed)
            if frozen_dtype is not None:
                from llamatron.transforms.lora import cast_frozen_linears

                cast_frozen_linears(part, frozen_dtype)
        pipeline = None
        if dims.pp > 1:
            from llamatron.parallel.pipeline import Pipeline

            tied_group = dims.first_last_group() if getattr(whole, "ties_first_last", False) else None
            pipeline = Pipeline(parts, stage_ids, dims.pp * dims.pp_virtual_stages, dims.pp_schedule, n_microbatches,
                                device, dims.group("pp"), tied_group)
        return cls(parts, dims, pipeline, fp8_output, n_params)

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def tied_copies(self) -> list[nn.Parameter]:
        """This rank's second copies of tied weights (a pipeline's last stage): the gradient norm
        counts each tied weight once, as one process does."""
        return self.pipeline.tied_copies if self.pipeline is not None else []

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    @property
    def training(self) -> bool:
        return self.model.training

    def fused_loss(self, requested: bool) -> bool:
        """The fused cross-entropy needs the whole output weight on the rank that computes the loss:
        not under tensor parallelism (vocabulary-sharded), nor pipelining (the schedule's loss
        function, outside the stage's module, computes it)."""
        return requested and self.dims.tp == 1 and self.dims.pp == 1

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, fused: bool, **extra) -> torch.Tensor:
        """Mean token negative log-likelihood in nats, computed in fp32 (unpipelined layouts), over the
        tokens whose label is not -100 (llamatron.loss.IGNORE_INDEX: masked prompt tokens, padding).
        extra: keyword inputs of the model (positions, document_ids of packed sequences).

        fused: output projection + loss in chunks inside the model (no full logits); otherwise the
        plain logits -> fp32 cross-entropy path (under tensor parallelism, inside `loss_context`, over
        vocabulary-sharded logits)."""
        if fused:
            return self.model(tokens, labels, fp8_loss=self.fp8_output or False, **extra)
        logits = self.model(tokens, **extra).flatten(0, 1).float()
        return nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)

    def loss_context(self):
        """Under TP the logits are vocabulary-sharded DTensors: torch's `loss_parallel` computes the
        cross-entropy without gathering them. It must surround the backward too."""
        if self.dims.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def sequence_context(self, tokens: torch.Tensor, labels: torch.Tensor):
        """Under CP, shards tokens, labels and each part's position-indexed buffers along the sequence
        (in place) and makes attention span the CP ranks, for the forward and backward inside."""
        if self.dims.cp == 1:
            return contextlib.nullcontext()
        from llamatron.parallel.context_parallel import context_parallel_context

        tables = [t for part in self.parts for t in part.sequence_buffers()]
        return context_parallel_context(self.dims.submesh("cp"), [tokens, labels, *tables],
                                        [1, 1] + [0] * len(tables), {tokens, labels})
