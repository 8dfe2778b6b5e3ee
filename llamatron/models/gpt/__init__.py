"""The GPT family (GPT-2's architecture, Pax's GPT 126M/5B/175B): model, named sizes, checks,
tensor-parallel plan, costs, HF GPT2LMHeadModel format."""

from __future__ import annotations

from llamatron.errors import LlamatronError
from llamatron.models.family import Family
from llamatron.models.gpt import cost, hf, sharding
from llamatron.models.gpt.model import GPT, GPTArgs

# Pax's paxml/contrib/gpu/scripts_gpu/configs.py shapes (../shared/spec/PAX.md): sequence 2048, so
# 2048 learned positions. 126M and 5B pad the 50,257-token vocabulary to 50,304 (a multiple of 64).
SIZES: dict[str, GPTArgs] = {
    "gpt-126m": GPTArgs(dim=768, n_layers=12, n_heads=12, ffn_dim=3072, vocab_size=50304, init_std=0.023),
    "gpt-5b": GPTArgs(dim=4096, n_layers=24, n_heads=32, ffn_dim=16384, vocab_size=50304, init_std=0.01),
    # Pax gives no init std of its own for 175B: GPT-3's (Megatron) 0.006.
    "gpt-175b": GPTArgs(dim=12288, n_layers=96, n_heads=96, ffn_dim=49152, vocab_size=50257, init_std=0.006),
    # For unit tests: small vocabulary, a few thousand parameters.
    "gpt-debug": GPTArgs(dim=64, n_layers=2, n_heads=4, ffn_dim=256, vocab_size=512, n_positions=256,
                         max_seq_len=256),
}


def validate(args: GPTArgs) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise LlamatronError(f"config key 'model.{key}': {rule}")

    for key in ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size", "n_positions", "max_seq_len"):
        need(getattr(args, key) > 0, key, f"must be positive, got {getattr(args, key)}")
    need(args.dim % args.n_heads == 0, "n_heads", f"dim {args.dim} must be divisible by n_heads {args.n_heads}")
    need(args.max_seq_len <= args.n_positions, "max_seq_len",
         f"{args.max_seq_len} exceeds n_positions {args.n_positions} (the learned position table's rows)")


def tp_divisible(args: GPTArgs) -> dict[str, int]:
    return {"n_heads": args.n_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size}


FAMILY = Family(
    name="gpt",
    args_type=GPTArgs,
    model_type=GPT,
    flops_per_token=cost.flops_per_token,
    validate=validate,
    tp_divisible=tp_divisible,
    tensor_parallel=sharding.apply_tensor_parallel,
    activation_bytes_per_token=cost.activation_bytes_per_token,
    hf=hf,
    shapes=cost.shapes,
    tp_whole_ends=lambda args: (args.n_positions + 2) * args.dim,  # the position embedding, the final LayerNorm
)
