"""Pipeline parallelism with `torch.distributed.pipelining`: split the model into stages by deleting
layers from copies of it, and run micro-batches through a GPipe, 1F1B or interleaved 1F1B schedule.

Stages are assigned round-robin ("loop" style): with pp ranks and v virtual stages per rank there are
pp*v stages, and rank r holds stages r, r+pp, r+2pp, ...; stage 0 keeps the embedding, the last
stage the final norm and output layer. Layers keep their names (the model's layers are a dict keyed
by index), so checkpoints are the same whatever the split.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from llamatron.parallel.layout import plain
from llamatron.parallel.parallelize import clean_name

IGNORE_INDEX = -100  # labels of padding samples (evaluation fills the last batch up to the schedule's size)


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    return [pp_rank + v * pp for v in range(virtual_stages)]


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` (best on the meta device, where copying costs nothing) keeping only the layers
    of `stage`, plus the model's `first_stage` modules (the embedding) on the first stage and its
    `last_stage` ones (norm + output) on the last. A model whose output layer uses a first-stage
    parameter (`ties_first_last`: tied embeddings) keeps a copy of it on the last stage, under the
    same name (`keep_tied_only`); `Pipeline` keeps the two copies equal."""
    n = len(model.layers)
    per = n // n_stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        if stage == n_stages - 1 and getattr(model, "ties_first_last", False):
            part.keep_tied_only()
        else:
            for name in model.first_stage:
                setattr(part, name, None)
    if stage != n_stages - 1:
        for name in model.last_stage:
            setattr(part, name, None)
    return part


def tied_parameters(parts: list[nn.Module]) -> list[nn.Parameter]:
    """The trainable parameters of `parts` that a tied model holds on both its first and last stage, in
    the order of the model's `tied_parameters` (the same on every rank that holds them)."""
    found = {}
    for part in parts:
        if getattr(part, "ties_first_last", False):
            for name, p in part.named_parameters():
                if clean_name(name) in part.tied_parameters and p.requires_grad:
                    found[clean_name(name)] = p
    return [found[n] for n in parts[0].tied_parameters if n in found] if found else []


def pipeline_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of one micro-batch from the last stage's logits (fp32).

    The last stage returns logits rather than computing the fused loss inside the model because a
    schedule hands the labels to its loss function, not to the stage's module. Padding labels
    (IGNORE_INDEX) are left out of the mean.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, parts: list[torch.nn.Module], ids: list[int], n_stages: int, schedule: str,
                 n_microbatches: int, device: torch.device, group, tied_group=None):
        self.stages = [PipelineStage(m, i, n_stages, device, group=group) for m, i in zip(parts, ids)]
        self.has_first = 0 in ids
        self.has_last = (n_stages - 1) in ids
        # Tied weights: the first stage's parameters and the last stage's copies of them, summed over
        # `tied_group` (the first and last pipeline ranks at this rank's other coordinates).
        self.tied = tied_parameters(parts) if tied_group is not None else []
        self.tied_group = tied_group
        self.n_microbatches = n_microbatches
        if schedule == "interleaved1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches, loss_fn=pipeline_loss)
        else:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = cls(self.stages[0], n_microbatches, loss_fn=pipeline_loss)
        # Newer torch can skip concatenating the last stage's logits of all micro-batches.
        self._no_outputs = (
            {"return_outputs": False} if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}
        )

    def _run(self, tokens, labels, train: bool) -> list[torch.Tensor]:
        """One pass of the whole local batch; the last stage gets one mean loss per micro-batch."""
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        target = labels if self.has_last else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, **self._no_outputs)
        else:
            self.schedule.eval(*args, target=target, losses=losses, **self._no_outputs)
        return losses

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of `n_microbatches` micro-batches; gradients are the mean over them
        (the schedule scales them by 1/n). Returns the mean loss on the last stage, else None."""
        losses = self._run(tokens, labels, train=True)
        self._sum_tied_gradients()
        return torch.stack([plain(loss).detach().float() for loss in losses]).mean() if self.has_last else None

    @property
    def tied_copies(self) -> list[torch.nn.Parameter]:
        """The last stage's copies of tied weights: their gradient, once summed, is the first stage's."""
        return self.tied if self.has_last else []

    @torch.no_grad()
    def _sum_tied_gradients(self) -> None:
        """Each copy of a tied weight gets the gradient of both its uses, as the one parameter of a
        single process does; both copies then take the same optimizer step. Under FSDP/TP each rank
        sums its local shard, in the parameter's layout: both copies are sharded alike over meshes of the
        same shape."""
        for p in self.tied:
            if p.grad is None:  # this stage's use did not reach it: the other rank still sums
                p.grad = torch.zeros_like(p)
            if isinstance(p.grad, DTensor):
                if p.grad.placements != p.placements:
                    # Under TP the embedding's gradient comes back replicated, the output's sharded.
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
                grad = p.grad.to_local()
            else:
                grad = p.grad
            dist.all_reduce(grad, group=self.tied_group)

    @torch.no_grad()
    def eval_losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return [plain(loss) for loss in self._run(tokens, labels, train=False)]
