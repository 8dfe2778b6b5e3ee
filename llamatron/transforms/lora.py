"""LoRA as a transform: chosen `nn.Linear` layers of an unchanged model get a low-rank adapter,
y = x W^T + (alpha / r) * dropout(x) A^T B^T, with W frozen and only A [r, in], B [out, r] trained.

The layer keeps its class's behaviour and its parameter names (`layers.0.attention.wq.weight`), so a
pretrained checkpoint loads into the adapted model as it is; the adapter adds `...wq.lora_A.weight`
and `...wq.lora_B.weight` (PEFT's names below the module). Applied on the meta device before tensor
parallelism, activation checkpointing, compile and FSDP (which then see frozen and trainable
parameters, and shard both; TP gives the adapters Megatron's layout: llamatron/parallel/
tensor_parallel.py). A is Kaiming-uniform(a=sqrt 5) and B zero, as PEFT and torchtune, so the adapted
model starts as the base model; Pax's LoRA (no alpha/r factor) is alpha = rank.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from llamatron.errors import LlamatronError
from llamatron.transforms.fp8_frozen import base_linear, refresh

# Target groups, by the module names inside a block (the llama family's; any family whose blocks
# name their projections so gets the same groups, and a list of leaf names works for any).
GROUPS = {
    "attention": ("wq", "wk", "wv", "wo"),
    "mlp": ("w1", "w2", "w3"),
}
GROUPS["all"] = GROUPS["attention"] + GROUPS["mlp"]


class LoRALinear(nn.Linear):
    """An nn.Linear with an adapter; made from an existing nn.Linear by `add_adapter` (in place)."""

    rank: int
    scaling: float
    merged: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_linear(self, x)  # from the frozen weight's FP8 copy under train.fp8
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += (alpha / r) B A: the adapter folded into the weight (inference, export)."""
        if not self.merged:
            self.weight += self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(self.weight.dtype)
            self.merged = True
            refresh(self)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(self.weight.dtype)
            self.merged = False
            refresh(self)


def add_adapter(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
    """Turn `linear` into a LoRALinear in place (same parameter objects, same device: meta included)."""
    kw = {"device": linear.weight.device, "dtype": linear.weight.dtype, "bias": False}
    linear.__class__ = LoRALinear
    linear.lora_A = nn.Linear(linear.in_features, rank, **kw)
    linear.lora_B = nn.Linear(rank, linear.out_features, **kw)
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    linear.rank, linear.scaling, linear.merged = rank, alpha / rank, False
    return linear


def resolve_targets(targets: list[str], aliases: dict[str, str] | None = None) -> set[str]:
    """Leaf module names from `all|attention|mlp|<names>`; `aliases` maps other names (HF's q_proj)."""
    names: set[str] = set()
    for t in targets:
        names.update(GROUPS.get(t, ((aliases or {}).get(t, t),)))
    return names


def hf_aliases(model: nn.Module, hf) -> dict[str, str]:
    """HF leaf names of the linears in `model.layers` (q_proj -> wq), from the family's HF adapter."""
    aliases = {}
    for name, mod in model.layers.named_modules(prefix="layers"):
        if isinstance(mod, nn.Linear):
            try:
                aliases[hf.hf_name(f"{name}.weight").rsplit(".", 2)[-2]] = name.rsplit(".", 1)[-1]
            except Exception:  # a linear with no HF twin: only its own name targets it
                pass
    return aliases


def apply_lora_config(model: nn.Module, lora, family, seed: int) -> list[str]:
    """`apply_lora` with the `[lora]` config section; targets may use the family's HF names."""
    aliases = hf_aliases(model, family.hf) if family.hf is not None else {}
    return apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, aliases, seed)


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=("all",),
               aliases: dict[str, str] | None = None, seed: int = 0) -> list[str]:
    """Adapters on the target linears of `model.layers`; every other parameter frozen. Returns the
    adapted module names. Also makes `model.initial_value` give the adapters their initial values,
    so that `materialize` (any layout) initialises them like the rest; a model already materialised
    gets them now (for `seed`)."""
    leaves = resolve_targets(list(targets), aliases)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, mod in model.layers.named_modules(prefix="layers"):
        if isinstance(mod, nn.Linear) and not isinstance(mod, LoRALinear) and name.rsplit(".", 1)[-1] in leaves:
            add_adapter(mod, rank, alpha, dropout)
            adapted.append(name)
            if not mod.weight.is_meta:
                with torch.no_grad():
                    for which in ("lora_A", "lora_B"):
                        w = getattr(mod, which).weight
                        w.copy_(adapter_initial_value(f"{name}.{which}.weight", w.shape, seed))
    if not adapted:
        raise ValueError(f"no linear layer of the model is named {sorted(leaves)}")
    base_value = model.initial_value

    def initial_value(name: str, shape, seed: int) -> torch.Tensor:
        return adapter_initial_value(name, shape, seed) if is_adapter_key(name) else base_value(name, shape, seed)

    model.initial_value = initial_value
    return adapted


def adapter_initial_value(name: str, shape, seed: int) -> torch.Tensor:
    """B zero; A Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(in_features)), seeded by (seed, name)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def frozen_dtype(lora, amp: torch.dtype | None, tp: int = 1) -> torch.dtype | None:
    """The dtype `lora.base_dtype` stores the frozen linear weights in, None for the model's own (fp32).
    `amp`: the step's autocast dtype (None without autocast, as under FSDP, whose mixed precision
    gathers bf16 copies of the fp32 shards itself). auto is bf16 exactly when autocast is bf16 and
    there is no tensor parallelism (autocast does not cast a DTensor linear's input to a bf16 weight)."""
    if lora is None or not lora.rank or lora.base_dtype == "fp32":
        return None
    if amp == torch.bfloat16 and tp == 1:
        return torch.bfloat16
    if lora.base_dtype == "bf16":
        raise LlamatronError("config key 'lora.base_dtype': bf16 base weights need the step under bf16 autocast "
                             "(train.precision = bf16, or auto on a GPU) without FSDP or tensor parallelism "
                             "(parallel.dp_shard, dp_replicate, cp and tp all 1); use auto or fp32")
    return None


@torch.no_grad()
def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights (and biases) of the frozen nn.Linear layers in `dtype`: the bases of the LoRA
    layers, the untargeted linears, the output layer; not embeddings or norms, so the residual stream
    keeps its dtype. Under autocast to `dtype` each product is bit-identical (autocast rounds an fp32
    weight to `dtype` on every use, and keeps that copy for backward: it caches casts of trainable
    weights only). Returns the number of tensors cast."""
    n = 0
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        for p in (mod.weight, mod.bias):
            if p is not None and not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
    return n


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by clean name (wrappers' name levels removed)."""
    from llamatron.parallel.parallelize import clean_name

    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()
