"""Model FLOPs, throughput and utilisation, by the formula users compare with.

Each family states its per-token formula next to its model (`llamatron/models/<family>/cost.py`; Llama:
NVIDIA's Llama 3.1 recipe, forward + backward, full attention, no recomputation counted). Then:

    model_flops_per_sequence = S * flops_per_token
    tokens/s = S * global_batch / step_time
    MFU      = global_batch * model_flops_per_sequence / step_time / n_gpus / peak

A LoRA step (`lora.rank > 0`, `lora_flops_per_token`) computes no weight gradient of the frozen base,
so the family's 6 FLOPs per matrix weight and token become 4 (forward 2, input gradient 2), and each
adapter weight costs the full 6:

    LoRA flops_per_token = family formula - 2 * (frozen matrix weights per token) + 6 * (adapter weights)

the frozen matrix weights being those the family's formula counts at 6 (every block's products, MoE
experts by their top-k rows, and the output layer; not the embedding, a lookup the formula leaves
out). Attention is the family's term unchanged (forward + backward).
"""

from __future__ import annotations

# Dense peak FLOP/s by device, matched by substring of torch.cuda.get_device_name(). An unknown device
# has no peak and its MFU is reported as unknown, never against a guessed number.
PEAK_FLOPS = {
    "bf16": {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "B200": 2250e12, "A100": 312e12},
    "fp8": {"H100": 1979e12, "H200": 1979e12, "H800": 1979e12, "B200": 4500e12},
}


def flops_per_token(args, seq_len: int, lora=None) -> float:
    """Model FLOPs per token of the model of `args` (any family) at sequence length `seq_len`; with
    `lora` (a `[lora]` section of rank > 0) those of a LoRA step."""
    from llamatron.models import registry

    full = registry.family_of(args).flops_per_token(args, seq_len)
    if lora is None or not lora.rank:
        return full
    return full - 2 * frozen_matrix_weights_per_token(args) + 6 * adapter_weights(args, lora)


def frozen_matrix_weights_per_token(args) -> float:
    """The matrix weights a token passes through (those the family's formula counts at 6 FLOPs):
    L x the block's products by `Family.shapes` (MoE experts: top-k of them) + the output layer."""
    from llamatron.models import registry

    family = registry.family_of(args)
    if family.shapes is not None:
        block = sum(g.k * g.n * g.rows * g.share for g in family.shapes(args).gemms)
        return args.n_layers * block + args.vocab_size * args.dim
    # A family with no stated shapes: its linear layers (dense: each weight once per token).
    from torch import nn

    from llamatron.parallel.memory import _meta_model

    return sum(m.weight.numel() for m in _meta_model(args).modules() if isinstance(m, nn.Linear))


def adapter_weights(args, lora) -> float:
    """The LoRA adapters' weights (every adapter weight is used once per token)."""
    from llamatron.parallel.memory import parameter_counts

    c = parameter_counts(args, lora)
    return args.n_layers * c.block_trainable + c.first_trainable + c.last_trainable


def flops_per_sequence(args, seq_len: int, lora=None) -> float:
    return seq_len * flops_per_token(args, seq_len, lora)


def peak_flops(device_name: str | None, precision: str = "bf16") -> float | None:
    if not device_name:
        return None
    table = PEAK_FLOPS.get(precision, {})
    # Longest key first so "H200" is not matched as "H20".
    for key in sorted(table, key=len, reverse=True):
        if key in device_name:
            return table[key]
    return None


def tokens_per_second(seq_len: int, global_batch: int, step_time: float) -> float:
    return seq_len * global_batch / step_time


def mfu(args, seq_len: int, global_batch: int, step_time: float, n_gpus: int, peak: float | None, lora=None):
    """Model FLOPs utilisation (0..1), or None when the device's peak is unknown; `lora`: of a LoRA step."""
    if not peak:
        return None
    return global_batch * flops_per_sequence(args, seq_len, lora) / step_time / n_gpus / peak


def days_to_train(total_tokens: float, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 86400
