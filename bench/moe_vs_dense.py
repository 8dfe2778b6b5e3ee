"""A tiny GLaM against the dense model of the same active size, on the embedded corpus, on the CPU.

Both models are the same GLaM (relative position bias, tied embeddings, RMSNorm, a gated-GELU FFN in
every other block) and differ only in their MoE blocks: the MoE has `--experts` experts of
`--expert-ffn` with top-2 routing (Pax's capacity policy, factor 2.0), the dense twin has 2 experts of
the same width with dropless top-2 routing, i.e. every token goes through both: the same FFN FLOPs
per token (the same active size) with a quarter of the expert parameters. Same data, order, seed,
steps and learning rate; the table gives each model's validation loss (the language-model loss only,
without the router's auxiliary losses) at each evaluation.

The tokenizer is a small SentencePiece BPE model trained on the corpus here (Pax's kind: byte
fallback, EOS 1, no BOS), so that the output layer does not dominate a CPU step as a 128k vocabulary
would. The first run builds the corpus, tokenizer and token files under --workdir; later runs reuse
them.

    python bench/moe_vs_dense.py --workdir /tmp/moe_vs_dense --steps 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from llamatron.config import load_config
from llamatron.data.corpus import write_default_corpus
from llamatron.data.preprocess import preprocess
from llamatron.train.trainer import train


def build_data(workdir: Path, vocab: int) -> tuple[str, Path, Path]:
    """(tokenizer model, train prefix, valid prefix), made once."""
    import sentencepiece as spm

    tok, train_prefix, valid_prefix = workdir / "sp.model", workdir / "train", workdir / "valid"
    if (workdir / "valid_text_document.idx").is_file():
        return str(tok), train_prefix, valid_prefix
    corpus = write_default_corpus(workdir / "json")
    with gzip.open(corpus["train"][0], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(workdir / "sp"),
                                   vocab_size=vocab, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, minloglevel=2, num_threads=2)
    preprocess([str(p) for p in corpus["train"]], str(train_prefix), str(tok))
    preprocess([str(p) for p in corpus["valid"]], str(valid_prefix), str(tok))
    return str(tok), train_prefix, valid_prefix


def run(name: str, overrides: list[str], a, tok: str, train_prefix: Path, valid_prefix: Path) -> dict[int, float]:
    out = Path(a.workdir) / name
    cfg = load_config(None, [
        "model.size=glam-debug", f"model.vocab_size={a.vocab}", f"model.dim={a.dim}", "model.n_layers=4", "model.n_heads=4",
        f"model.ffn_dim={2 * a.expert_ffn}", f"model.expert_ffn_dim={a.expert_ffn}", f"model.max_seq_len={a.seq_len}",
        f"data.tokenizer={tok}", f"data.train=[\"{train_prefix}_text_document\"]",
        f"data.valid={valid_prefix}_text_document", f"data.seq_len={a.seq_len}",
        f"train.steps={a.steps}", f"train.global_batch_size={a.batch}", f"train.micro_batch_size={a.batch}",
        "train.device=cpu", f"optim.lr={a.lr}", f"optim.min_lr={a.lr / 10}", "optim.warmup_steps=10",
        f"eval.every={a.eval_every}", "eval.samples=128", "checkpoint.enabled=false", f"train.out_dir={out}",
        *overrides,
    ])
    train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/llamatron-moe-vs-dense")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args()
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    data = build_data(Path(a.workdir), a.vocab)
    moe = run("moe", [f"model.n_experts={a.experts}"], a, *data)
    dense = run("dense", ["model.n_experts=2", "model.capacity_factor=0"], a, *data)
    print(f"\nvalidation loss, {a.steps} steps of {a.batch} x {a.seq_len} tokens, d {a.dim}, expert FFN {a.expert_ffn}:")
    print(f"| step | MoE, {a.experts} experts, top-2, capacity 2.0 | dense twin (2 experts, top-2, dropless) |")
    print("|---|---|---|")
    for step in sorted(moe):
        print(f"| {step} | {moe[step]:.4f} | {dense.get(step, float('nan')):.4f} |")
    last = max(moe)
    print(f"\nMoE - dense at step {last}: {moe[last] - dense[last]:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
