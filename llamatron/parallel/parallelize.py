"""`parallelize`: turn the plain model of any family (built on the meta device) into this rank's part(s)
of the layout, then materialise and initialise them with the same values the whole model would have.

Order, as torchtitan: pipeline split -> FP8 layers -> tensor parallel (the family's plan) -> activation
checkpointing -> compile -> FSDP. TP first because it changes the parameters into DTensors that the rest must see; checkpointing
and compile wrap the blocks TP has sharded; FSDP last, since it shards whatever parameters it finds
(TP shards included: a 2-D mesh) and its hooks must surround the compiled blocks.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from llamatron.fp8_gemm import FastAccum
from llamatron.models.family import Family
from llamatron.parallel.dims import ParallelDims
from llamatron.parallel.fsdp import apply_fsdp
from llamatron.transforms.checkpointing import apply_activation_checkpointing
from llamatron.transforms.compile import apply_compile, compile_tuning
from llamatron.transforms.fp8 import apply_fp8, fp8_output
from llamatron.transforms.residual import apply_bf16_residual

# Wrappers that insert a level into parameter names; checkpoints and seeds use the clean names.
_WRAPPER_PREFIXES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def clean_name(name: str) -> str:
    return _WRAPPER_PREFIXES.sub("", name)


def parallelize(model: nn.Module, family: Family, train, dims: ParallelDims,
                param_dtype: torch.dtype | None = None, lora=None) -> tuple[list[nn.Module], list[int], FastAccum | None]:
    """This rank's parts of `model` (its pipeline stages, else the model itself) with the layout
    applied, still on the meta device, their stage indices ([0] without pipelining), and, where the
    output layer runs in FP8, how the fused loss's FP8 GEMMs accumulate (else None). `train` is the
    `[train]` config section.

    param_dtype: the dtype FSDP gathers parameters in for compute (bf16 for mixed precision).
    lora: the `[lora]` config section; with rank > 0, adapters first, on the unchanged model.
    """
    if lora is not None and lora.rank > 0:
        from llamatron.transforms.lora import apply_lora_config

        apply_lora_config(model, lora, family, train.seed)
    if dims.pp > 1:
        from llamatron.parallel.pipeline import split_stage, stage_ids  # imports torch._dynamo: only when used

        n_stages = dims.pp * dims.pp_virtual_stages
        ids = stage_ids(dims.pp_rank, dims.pp, dims.pp_virtual_stages)
        parts = [split_stage(model, i, n_stages) for i in ids]
    else:
        ids, parts = [0], [model]
    fp8_loss = None  # the output layer converted: the fused loss runs its GEMMs in FP8, accumulating so
    fast_accum = FastAccum.of(train.fp8_fast_accum)
    for part in parts:
        lora_fp8 = lora is not None and lora.rank > 0  # frozen bases in FP8 (transforms/fp8_frozen.py)
        if train.fp8 != "none" and lora_fp8 and dims.fsdp_enabled:
            # FSDP gathers the frozen weights per block: cast at each use (one GPU: copies made after loading)
            from llamatron.transforms.fp8_frozen import gather_frozen_linears

            gather_frozen_linears(part, train.fp8_min_features)
        if train.fp8 != "none" and not lora_fp8:
            # Before everything else: TP, compile and FSDP must see the Float8Linear modules.
            converted = apply_fp8(part, train.fp8, min_features=train.fp8_min_features,
                                  include_output=fp8_output(train, dims.tp, dims.pp, lora=False),
                                  fsdp_all_gather=train.fp8_all_gather, experts=train.fp8_experts,
                                  fused_swiglu=train.fp8_fused_swiglu and dims.tp == 1, fast_accum=fast_accum)
            fp8_loss = fast_accum if "output" in converted else fp8_loss
        if dims.tp > 1:
            frozen = {n for n, p in part.named_parameters() if not p.requires_grad}
            family.tensor_parallel(part, dims.submesh("tp"))
            # torch's SequenceParallel makes the norms' replicated Parameters trainable again: LoRA
            # (everything frozen but the adapters) would train them under TP only.
            for n, p in part.named_parameters():
                p.requires_grad_(n not in frozen)
        experts = []
        if dims.ep > 1:
            from llamatron.parallel.expert_parallel import apply_expert_parallel

            experts = apply_expert_parallel(part, dims.submesh("ep"))
        if train.bf16_residual:
            apply_bf16_residual(part)
        if train.activation_checkpointing:
            apply_activation_checkpointing(part, train.activation_checkpointing_layers)
        if train.compile:
            apply_compile(part, tuning=compile_tuning(train, lora_fp8))
        if dims.fsdp_enabled:
            # Pipelining runs several micro-batches' forwards before their backwards: keep the
            # gathered parameters rather than gather them again for every micro-batch.
            ignored = _shard_experts(experts, dims, param_dtype)
            apply_fsdp(part, dims.submesh("fsdp"), param_dtype, reshard_after_forward=dims.pp == 1,
                       ignored_params=ignored)
    return parts, ids, fp8_loss


def _shard_experts(experts: list[nn.Module], dims: ParallelDims, param_dtype: torch.dtype | None) -> set | None:
    """FSDP for expert parallelism's experts over the ranks holding the same ones, where there are
    any; else their parameters, for FSDP to leave alone (each rank then holds its experts whole)."""
    if not experts:
        return None
    mesh = dims.submesh("expert_fsdp")
    if mesh is None:
        return {p for m in experts for p in m.parameters()}
    from llamatron.parallel.expert_parallel import shard_experts

    shard_experts(experts, mesh, param_dtype, reshard_after_forward=dims.pp == 1)
    return None


def _init_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate `model` (a meta-device part, possibly sharded) on `device` and give every parameter
    the value its `initial_value` gives it in the whole model, whatever the layout.

    Each value is sampled whole on the CPU from its own seeded generator (several parameters at a
    time on threads: torch releases the GIL) and this rank keeps its shard of it, so a run's weights
    do not depend on the number of processes, the layout or the device.
    """
    model.to_empty(device=device)
    params = list(model.named_parameters())
    window = _init_threads()
    with ThreadPoolExecutor(max_workers=window) as pool:
        for start in range(0, len(params), window):
            batch = params[start : start + window]
            values = pool.map(lambda np_: model.initial_value(clean_name(np_[0]), np_[1].shape, seed), batch)
            for (_, p), full in zip(batch, values):
                _copy_into(p, full)
    model.init_buffers()


def _copy_into(p: nn.Parameter, full: torch.Tensor) -> None:
    if isinstance(p, DTensor):
        # Every rank holds the same full value, so no communication: each keeps its own shard.
        shard = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(shard.to_local())
    else:
        p.copy_(full)
