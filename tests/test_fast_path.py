"""The speed options of the trainer (compiled blocks, fused cross-entropy, fused AdamW) against the
plainest path, on the CPU: same numbers up to float rounding."""

import json

import pytest
import torch

from llamatron.config import OptimConfig, load_config
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.train.optim import build_optimizer
from llamatron.train.trainer import train

STEPS = 20  # the loss falls by ~3 in these (11.77 -> 8.7): the comparison is between moving numbers


def test_fused_adamw_matches_the_for_each_one():
    torch.manual_seed(0)
    models = [Transformer(SIZES["debug"]) for _ in range(2)]
    for m in models:
        m.init_weights(seed=4)
    opts = [build_optimizer(m, OptimConfig(lr=1e-2, fused=fused), "cpu") for m, fused in zip(models, (False, True))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    tokens = torch.randint(0, 512, (2, 17))
    for _ in range(3):
        for m, opt in zip(models, opts):
            m(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    before = Transformer(SIZES["debug"])
    before.init_weights(seed=4)
    for (name, a), b, b0 in zip(models[0].named_parameters(), models[1].parameters(), before.parameters()):
        assert not torch.equal(a, b0), name  # the steps moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory):
    from llamatron.data.corpus import write_default_corpus
    from llamatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("corpus")
    corpus = write_default_corpus(root / "json")
    preprocess([str(p) for p in corpus["valid"]], str(root / "valid"), "llama3", workers=1)
    return str(root / "valid_text_document")


def _losses(out_dir, prefix, *options):
    cfg = load_config(None, [
        "model.size=tiny", f"data.train={prefix}", "data.seq_len=64", f"train.steps={STEPS}",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.device=cpu", "train.log_every=1",
        "optim.lr=3e-3", "optim.warmup_steps=5", "eval.samples=0", "eval.every=0", "eval.at_start=false",
        "checkpoint.enabled=false", f"train.out_dir={out_dir}", *options,
    ])
    train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_optimized_path_tracks_the_plain_one_on_real_tokens(tmp_path, real_tokens):
    """20 steps of the tiny Llama 3.1 on Llama-3.1-tokenized prose: the trainer with every speed
    option on (torch.compile per block: fused RMSNorm, RoPE, SwiGLU and residuals; the chunked fused
    cross-entropy; fused AdamW) against the plainest path (eager, full logits, for-each AdamW)."""
    plain = _losses(tmp_path / "plain", real_tokens, "train.compile=false", "train.fused_cross_entropy=false",
                    "optim.fused=false")
    fast = _losses(tmp_path / "fast", real_tokens, "train.compile=true", "train.fused_cross_entropy=true",
                   "optim.fused=true")
    assert len(plain) == len(fast) == STEPS
    assert plain[-1] < plain[0] - 1.5  # it learns: the comparison is not between constants
    for step, (a, b) in enumerate(zip(plain, fast), 1):
        assert b == pytest.approx(a, rel=1e-5), f"step {step}"
