"""The Llama 3.1 family: model, named sizes, checks, tensor-parallel plan, costs, HF/Meta formats."""

from __future__ import annotations

from llamatron.errors import LlamatronError
from llamatron.models.family import Family
from llamatron.models.llama import cost, hf, sharding
from llamatron.models.llama.model import ModelArgs, Transformer, llama_ffn_dim

LLAMA2 = dict(vocab_size=32000, rope_theta=10000.0, rope_scaling_factor=0.0, max_seq_len=4096)

# The three Llama 3.1 sizes match Meta's sku_list / HF config.json exactly; the small ones keep the real
# vocabulary (the real tokenizer's ids must fit) and shrink everything else.
SIZES: dict[str, ModelArgs] = {
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=llama_ffn_dim(4096, 1024, 1.3)),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=llama_ffn_dim(8192, 4096, 1.3)),
    "llama3.1-405b": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=llama_ffn_dim(16384, 4096, 1.2)
    ),
    # LLaMA-2 (Meta's meta-llama/llama params.json and HF config.json; ../shared/spec/PAX.md): RoPE theta
    # 10,000 without frequency scaling, vocabulary 32,000, context 4,096; FFN widths 11008 / 13824 /
    # 28672 by Meta's rule (multiple_of 256, 256, 4096; 70B ffn_dim_multiplier 1.3).
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=llama_ffn_dim(4096, 256, None),
                           **LLAMA2),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                            ffn_dim=llama_ffn_dim(5120, 256, None), **LLAMA2),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=llama_ffn_dim(8192, 4096, 1.3),
                            **LLAMA2),
    # ~33M parameters, 32M of them in the 128K-token embedding and output layers: trains on a CPU.
    "tiny": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=1024),
    # For unit tests: small vocabulary, a few thousand parameters.
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=160, max_seq_len=256),
}


def validate(args: ModelArgs) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise LlamatronError(f"config key 'model.{key}': {rule}")

    for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        need(getattr(args, key) > 0, key, f"must be positive, got {getattr(args, key)}")
    need(args.dim % args.n_heads == 0, "n_heads", f"dim {args.dim} must be divisible by n_heads {args.n_heads}")
    need(args.n_heads % args.n_kv_heads == 0, "n_kv_heads",
         f"n_heads {args.n_heads} must be divisible by n_kv_heads {args.n_kv_heads}")
    need(args.head_dim % 2 == 0, "n_heads", f"head_dim {args.head_dim} must be even for rotary embeddings")


def tp_divisible(args: ModelArgs) -> dict[str, int]:
    return {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "ffn_dim": args.ffn_dim,
            "vocab_size": args.vocab_size}


FAMILY = Family(
    name="llama",
    args_type=ModelArgs,
    model_type=Transformer,
    flops_per_token=cost.flops_per_token,
    validate=validate,
    tp_divisible=tp_divisible,
    tensor_parallel=sharding.apply_tensor_parallel,
    activation_bytes_per_token=cost.activation_bytes_per_token,
    hf=hf,
    shapes=cost.shapes,
    tp_whole_ends=lambda args: args.dim,  # the final RMSNorm
)
