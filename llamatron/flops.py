"""Model FLOPs and utilisation, by the formula of NVIDIA's Llama 3.1 recipe (the one users compare with).

Per token, dense Llama with L layers, hidden h, FFN f, vocab V, sequence S, A heads, G KV heads:

    attention = 12 * L * h^2 * (1 + G/A + S/h)
    mlp       = 18 * L * f * h
    embedding =  6 * V * h
    model_flops_per_sequence = S * (attention + mlp + embedding)

Forward + backward, full (not causal-halved) attention, no recomputation counted.

    tokens/s = S * global_batch / step_time
    MFU      = global_batch * model_flops_per_sequence / step_time / n_gpus / peak
"""

from __future__ import annotations

from llamatron.model import ModelArgs

# Dense peak FLOP/s by device, matched by substring of torch.cuda.get_device_name(). An unknown device
# has no peak and its MFU is reported as unknown, never against a guessed number.
PEAK_FLOPS = {
    "bf16": {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "B200": 2250e12, "A100": 312e12},
    "fp8": {"H100": 1979e12, "H200": 1979e12, "H800": 1979e12, "B200": 4500e12},
}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    L, h, f, V, S = args.n_layers, args.dim, args.ffn_dim, args.vocab_size, seq_len
    A, G = args.n_heads, args.n_kv_heads
    attention = 12 * L * h * h * (1 + G / A + S / h)
    mlp = 18 * L * f * h
    embedding = 6 * V * h
    return attention + mlp + embedding


def flops_per_sequence(args: ModelArgs, seq_len: int) -> float:
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


def mfu(args: ModelArgs, seq_len: int, global_batch: int, step_time: float, n_gpus: int, peak: float | None):
    """Model FLOPs utilisation (0..1), or None when the device's peak is unknown."""
    if not peak:
        return None
    return global_batch * flops_per_sequence(args, seq_len) / step_time / n_gpus / peak


def days_to_train(total_tokens: float, tokens_per_s: float) -> float:
    return total_tokens / tokens_per_s / 86400
