"""LoRA adapters in Hugging Face PEFT's format, both ways.

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules
in HF names) and `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Module names go through the
family's HF adapter (`models/<family>/hf.py`): B's rows are output rows of the layer, so q/k's are
permuted into HF's rotary layout exactly as the base weights are; A's columns are the (unpermuted)
hidden dimension. PEFT's scaling is lora_alpha / r, the same as llamatron's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llamatron.errors import LlamatronError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().contiguous()


def adapter_state(model, pp_group=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapters of `model` (a module or this rank's pipeline stages; llamatron names, full
    tensors: a collective under FSDP/TP/PP, so every rank calls it) and their rank/alpha/dropout.
    pp_group: the pipeline group, whose other ranks hold the other stages' adapters."""
    tensors, hyper = _local_adapters(model)
    if pp_group is not None:
        import torch.distributed as dist

        stages = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, (tensors, hyper), group=pp_group)
        tensors = {k: v for t, _ in stages for k, v in t.items()}
        hyper = next((h for _, h in stages if h is not None), None)
    if not tensors:
        raise LlamatronError("the model has no LoRA adapters to export")
    return tensors, hyper


def _local_adapters(model) -> tuple[dict[str, torch.Tensor], dict | None]:
    from llamatron.transforms.lora import lora_modules

    mods = {n: m for part in (model if isinstance(model, (list, tuple)) else [model])
            for n, m in lora_modules(part).items()}
    if not mods:
        return {}, None
    first = next(iter(mods.values()))
    hyper = {"r": first.rank, "lora_alpha": first.scaling * first.rank,
             "lora_dropout": float(getattr(first.lora_dropout, "p", 0.0))}
    tensors = {}
    for name, m in mods.items():
        tensors[f"{name}.lora_A.weight"] = _full(m.lora_A.weight)
        tensors[f"{name}.lora_B.weight"] = _full(m.lora_B.weight)
    return tensors, hyper


def to_peft(tensors: dict[str, torch.Tensor], hf, args) -> dict[str, torch.Tensor]:
    """llamatron adapter tensors -> PEFT keys and layouts."""
    out = {}
    for key, w in tensors.items():
        module, which = key.rsplit(".lora_", 1)  # "layers.0.attention.wq", "A.weight"
        if which.startswith("B"):
            hf_weight, w = hf.to_hf(f"{module}.weight", w, args)  # rows permuted like the base weight
        else:
            hf_weight = hf.hf_name(f"{module}.weight")
        out[f"{_PREFIX}{hf_weight[: -len('.weight')]}.lora_{which}"] = w.contiguous()
    return out


def from_peft(tensors: dict[str, torch.Tensor], hf, args, where: str) -> dict[str, torch.Tensor]:
    """PEFT keys and layouts -> llamatron adapter tensors."""
    out = {}
    for key, w in tensors.items():
        if not key.startswith(_PREFIX) or ".lora_" not in key:
            raise LlamatronError(f"{where}: key {key!r} is not a PEFT LoRA weight (base_model.model.*.lora_A/B.weight)")
        module, which = key[len(_PREFIX):].rsplit(".lora_", 1)
        which = which.replace(".default.", ".")  # some writers keep the adapter name
        if which.startswith("B"):
            name, w = hf.from_hf(f"{module}.weight", w, args)
        else:
            name = hf.llamatron_name(f"{module}.weight")
            if name is None:
                raise LlamatronError(f"{where}: {key!r} names no parameter of this model family")
        out[f"{name[: -len('.weight')]}.lora_{which}"] = w
    return out


def save_peft_adapter(model, family, args, out_dir: str | os.PathLike, base_model: str = "", pp_group=None) -> Path:
    """Write `model`'s adapters (a module, or this rank's pipeline stages with `pp_group`) as a PEFT
    adapter directory (files written under temporary names, then renamed). Every rank must call it
    (the tensors are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    import torch.distributed as dist

    if family.hf is None:
        raise LlamatronError(f"the {family.name} family has no Hugging Face format to export an adapter in")
    tensors, hyper = adapter_state(model, pp_group)
    if dist.is_initialized() and dist.get_rank() != 0:
        return Path(out_dir)
    peft_tensors = to_peft(tensors, family.hf, args)
    targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in peft_tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": hyper["r"], "lora_alpha": hyper["lora_alpha"], "lora_dropout": hyper["lora_dropout"],
              "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp{os.getpid()}"
    save_file(peft_tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    tmp = out / f".{CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / CONFIG)
    return out


def read_peft_adapter(path: str | os.PathLike, family, args) -> tuple[dict[str, torch.Tensor], dict]:
    """(llamatron adapter tensors, adapter_config) of a PEFT adapter directory."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG, path / WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise LlamatronError(f"{path}: not a PEFT adapter directory (no {f.name})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LlamatronError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    if config.get("peft_type") != "LORA":
        raise LlamatronError(f"{cfg_file}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
    if config.get("use_rslora") or config.get("use_dora"):
        raise LlamatronError(f"{cfg_file}: rsLoRA/DoRA adapters are not supported")
    return from_peft(load_file(str(weights)), family.hf, args, str(weights)), config


@torch.no_grad()
def load_peft_adapter(model, path: str | os.PathLike, family, args) -> None:
    """Apply a PEFT adapter to `model`: its targets get adapters (if they have none) of the adapter's
    rank and alpha, and the adapter's values."""
    from llamatron.transforms.lora import apply_lora, lora_modules

    tensors, config = read_peft_adapter(path, family, args)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    if not lora_modules(model):
        apply_lora(model, int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                   targets=sorted({m.rsplit(".", 1)[-1] for m in modules}))
    mods = lora_modules(model)
    for key, w in tensors.items():
        module, which = key.rsplit(".lora_", 1)
        if module not in mods:
            raise LlamatronError(f"{path}: adapter for {module}, which the model has no LoRA layer for")
        target = getattr(mods[module], f"lora_{which.split('.')[0]}").weight
        if tuple(target.shape) != tuple(w.shape):
            raise LlamatronError(f"{path}: {key} has shape {tuple(w.shape)}, the model's is {tuple(target.shape)}")
        target.copy_(w.to(target.dtype))
