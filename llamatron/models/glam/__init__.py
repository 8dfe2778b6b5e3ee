"""The GLaM mixture-of-experts family (Pax GLaM126M64EBase / GLaM64B64EBase): model, sizes, checks,
tensor-parallel plan, costs. No Hugging Face twin exists. See docs/moe.md."""

from __future__ import annotations

from llamatron.errors import LlamatronError
from llamatron.models.family import Family
from llamatron.models.glam import cost, sharding
from llamatron.models.glam.model import GLaM, GLaMArgs

SIZES: dict[str, GLaMArgs] = {
    # 12 blocks (6 MoE), d 768, 12 x 64 heads, 64 experts of 3072: 1,907,612,928 parameters (~1.9B).
    "glam-126m-64e": GLaMArgs(),
    # 64 blocks (32 MoE), d 8192, 64 x 128 heads, 64 experts of 32768: 1,142,741,409,792 (~1.14T).
    "glam-64b-64e": GLaMArgs(dim=8192, n_layers=64, n_heads=64, ffn_dim=32768, expert_ffn_dim=32768),
    # For tests: 4 blocks (MoE at 0 and 2), 8 experts, small vocabulary.
    "glam-debug": GLaMArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, ffn_dim=128, expert_ffn_dim=64,
                           n_experts=8, max_seq_len=256),
}


def validate(args: GLaMArgs) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise LlamatronError(f"config key 'model.{key}': {rule}")

    for key in ("n_layers", "dim", "n_heads", "ffn_dim", "expert_ffn_dim", "n_experts", "top_k", "moe_every",
                "vocab_size", "max_seq_len", "rel_pos_buckets", "rel_pos_max_distance"):
        need(getattr(args, key) > 0, key, f"must be positive, got {getattr(args, key)}")
    need(args.dim % args.n_heads == 0, "n_heads", f"dim {args.dim} must be divisible by n_heads {args.n_heads}")
    need(args.top_k <= args.n_experts, "top_k", f"must be <= n_experts {args.n_experts}, got {args.top_k}")
    need(args.capacity_factor >= 0, "capacity_factor", f"must be >= 0 (0 = dropless), got {args.capacity_factor}")
    need(args.aux_loss_coef >= 0, "aux_loss_coef", f"must be >= 0, got {args.aux_loss_coef}")
    need(args.z_loss_coef >= 0, "z_loss_coef", f"must be >= 0, got {args.z_loss_coef}")
    need(args.rel_pos_buckets >= 4 and args.rel_pos_max_distance > args.rel_pos_buckets // 2, "rel_pos_max_distance",
         f"must exceed rel_pos_buckets / 2 = {args.rel_pos_buckets // 2} (T5 bucketing), got {args.rel_pos_max_distance}")


def tp_divisible(args: GLaMArgs) -> dict[str, int]:
    return {"n_heads": args.n_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size}


FAMILY = Family(
    name="glam",
    args_type=GLaMArgs,
    model_type=GLaM,
    flops_per_token=cost.flops_per_token,
    validate=validate,
    tp_divisible=tp_divisible,
    tensor_parallel=sharding.apply_tensor_parallel,
    activation_bytes_per_token=cost.activation_bytes_per_token,
    # The tied embedding lives on both ends (no pipeline stages); relative positions need whole
    # sequences (no context parallelism).
    unsupported_parallel=("pp", "cp"),
    shapes=cost.shapes,
    # models/glam/sharding.py: the tied embedding and the final norm replicated, whole logits on every
    # rank, no sequence parallelism.
    tp_whole_ends=lambda args: (args.vocab_size + 1) * args.dim,
    tp_splits_vocab=False,
    sequence_parallel=False,
    elementwise_per_saved_byte=cost.ELEMENTWISE_PER_SAVED_BYTE,
)
