"""Resume against a changed config (issue 17, defect 6): a resumed run continues exactly only with the
model, the data order and the batch it was saved with. Changing one of those is refused unless
`checkpoint.allow_config_change` says it is deliberate; every changed key is logged either way.
"""

from __future__ import annotations

import yaml

from llamatron.errors import LlamatronError

# Keys whose change makes the continuation another run: the model's shape (every model.* key), which
# samples come in which order (data files, weights, window length, seed, tokenizer), and the batch
# (the position in the data is counted in global batches). Layout, micro-batch, steps, schedule,
# cadences and the rest may change on resume.
EXACT_KEYS = ("model.", "data.train", "data.train_weights", "data.mock", "data.seq_len", "data.seed",
              "data.tokenizer", "train.global_batch_size", "finetune.data", "finetune.template",
              "finetune.train_on_input", "finetune.packing", "finetune.packing_algorithm", "finetune.too_long")

# What a config written before a key existed meant by its absence, where that was not the key's
# default now: fine-tuning examples were packed in order until best fit became the default.
EARLIER_DEFAULTS = {"finetune.packing_algorithm": "greedy"}


def _flat(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in (config or {}).items() if isinstance(values, dict)
            for key, value in values.items()}


def changed_keys(saved_yaml: str, current_yaml: str) -> dict[str, tuple[object, object]]:
    """{key: (saved, current)} for the keys both configs have and that differ (a key one of them lacks,
    written by another llamatron version, cannot be compared)."""
    saved, current = _flat(yaml.safe_load(saved_yaml)), _flat(yaml.safe_load(current_yaml))
    if saved.get("finetune.data"):
        saved = {**EARLIER_DEFAULTS, **saved}
    diff = {k: (saved[k], current[k]) for k in saved.keys() & current.keys() if saved[k] != current[k]}
    # The model section names its size plus the overrides; an override only one side has is a change too.
    for k in (saved.keys() ^ current.keys()):
        if k.startswith("model."):
            diff[k] = (saved.get(k), current.get(k))
    return dict(sorted(diff.items()))


def breaks_exact_resume(key: str) -> bool:
    return any(key.startswith(e) if e.endswith(".") else key == e for e in EXACT_KEYS)


def check_resume_config(checkpoint, saved_yaml: str, current_yaml: str, allow: bool, log=print) -> None:
    diff = changed_keys(saved_yaml, current_yaml)
    if not diff:
        return
    text = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
    breaking = [k for k in diff if breaks_exact_resume(k)]
    if breaking and not allow:
        raise LlamatronError(
            f"{checkpoint}: the config differs from the one this checkpoint was saved with in keys that change the "
            f"model, the data order or the batch ({'; '.join(f'{k}: {diff[k][0]} -> {diff[k][1]}' for k in breaking)}); "
            "set checkpoint.allow_config_change=true if that is deliberate, or use another train.out_dir")
    log(f"resuming from {checkpoint} with a changed config: {text}")


def check_optimizer_state(checkpoint, saved_yaml: str, current_yaml: str, saved_sharding: dict | None,
                          sharding: dict | None) -> None:
    """The optimizer state loads only into an optimizer of its kind; torchao's 8-bit state only where
    each tensor is sharded as when it was saved (`sharding`: the FSDP degree dp_shard x cp, tp and
    ep; pipeline stages and HSDP replicas do not cut a tensor). Each rank's shard is quantized in
    blocks of 256 of its own values: another cut does not fall on those blocks, and DCP cannot re-slice
    the packed state across one (torchao 0.17-0.18: along dim 0 at block boundaries only). Not waived
    by `checkpoint.allow_config_change`: no such resume can load."""
    saved = _flat(yaml.safe_load(saved_yaml)).get("optim.name", "adamw")
    current = _flat(yaml.safe_load(current_yaml)).get("optim.name", "adamw")
    fresh = "or start from its weights with a fresh optimizer (checkpoint.init_from) in another train.out_dir"
    if saved != current:
        raise LlamatronError(f"{checkpoint}: its optimizer state is {saved}'s, this run's optim.name is {current}; "
                             f"resume with optim.name={saved}, {fresh}")
    if current == "adamw8bit" and saved_sharding is not None and sharding is not None and saved_sharding != sharding:
        def text(s: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in s.items())

        raise LlamatronError(f"{checkpoint}: optim.name=adamw8bit state resumes only where its tensors are sharded "
                             f"as when saved ({text(saved_sharding)}; this run: {text(sharding)}); resume with that "
                             f"sharding, {fresh}")
