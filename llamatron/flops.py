"""Model FLOPs, throughput and utilisation, by the formula users compare with.

Each family states its per-token formula next to its model (`llamatron/models/<family>/cost.py`; Llama:
NVIDIA's Llama 3.1 recipe, forward + backward, full attention, no recomputation counted). Then:

    model_flops_per_sequence = S * flops_per_token
    tokens/s = S * global_batch / step_time
    MFU      = global_batch * model_flops_per_sequence / step_time / n_gpus / peak
"""

from __future__ import annotations

# Dense peak FLOP/s by device, matched by substring of torch.cuda.get_device_name(). An unknown device
# has no peak and its MFU is reported as unknown, never against a guessed number.
PEAK_FLOPS = {
    "bf16": {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "B200": 2250e12, "A100": 312e12},
    "fp8": {"H100": 1979e12, "H200": 1979e12, "H800": 1979e12, "B200": 4500e12},
}


def flops_per_token(args, seq_len: int) -> float:
    """Model FLOPs per token of the model of `args` (any family) at sequence length `seq_len`."""
    from llamatron.models import registry

    return registry.family_of(args).flops_per_token(args, seq_len)


def flops_per_sequence(args, seq_len: int) -> float:
    return seq_len * flops_per_token(args, seq_len)


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


def mfu(args, seq_len: int, global_batch: int, step_time: float, n_gpus: int, peak: float | None):
    """Model FLOPs utilisation (0..1), or None when the device's peak is unknown."""
    if not peak:
        return None
    return global_batch * flops_per_sequence(args, seq_len) / step_time / n_gpus / peak


def days_to_train(total_tokens: float, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 86400
