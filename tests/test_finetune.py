"""Supervised fine-tuning: the masked loss, packing with document masks, the JSONL cache, the step's
global token normalisation, and end-to-end SFT and LoRA runs through the trainer (loss falls, resume
is exact, the PEFT adapter is written)."""

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from llamatron import hooks
from llamatron.cli import main
from llamatron.config import load_config
from llamatron.data.gpt_dataset import GPTDataset
from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter
from llamatron.data.packing import pack_best_fit_decreasing, pack_greedy
from llamatron.data.sft import SFTDataset, build_sft_cache, load_sft_batch
from llamatron.errors import LlamatronError
from llamatron.eval.perplexity import evaluate as perplexity
from llamatron.eval.tasks import Scorer, get_task, run_task
from llamatron.evaluate import load_model
from llamatron.loss import IGNORE_INDEX, linear_cross_entropy
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.tokenizer import load_tokenizer
from llamatron.train.step import train_step
from llamatron.train.trainer import train
from llamatron.transforms.lora import lora_modules

torch.set_num_threads(1)
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]

FACTS = [("The sky is blue.", "is the sky blue", True), ("Snow is cold.", "is snow hot", False),
         ("Fire is hot.", "is fire hot", True), ("Fish swim.", "do fish fly", False),
         ("Cats purr.", "do cats purr", True), ("Rocks sink.", "do rocks float", False)]


def _tokenizer(tmp_path) -> str:
    """A tiktoken BPE of the 256 bytes plus Llama 3's 256 special tokens: the debug model's 512 ids."""
    p = tmp_path / "tokenizer.model"
    p.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return str(p)


def _boolq(path: Path, repeat=1) -> Path:
    with open(path, "w") as f:
        for _ in range(repeat):
            for passage, question, label in FACTS:
                f.write(json.dumps({"passage": passage, "question": question, "label": label}) + "\n")
    return path


def _model(seed=3):
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=seed)
    return model


# --------------------------------------------------------------------------------------------------
# The loss


def test_fused_loss_ignores_masked_labels_like_torch():
    torch.manual_seed(0)
    h = torch.randn(2, 50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    lab = torch.randint(0, 300, (2, 50))
    lab[:, :20] = IGNORE_INDEX
    lab[1, 30:] = IGNORE_INDEX
    fused = linear_cross_entropy(h, w, lab, chunk_size=16)
    (2.0 * fused).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), lab.flatten(), ignore_index=IGNORE_INDEX)
    (2.0 * ref).backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, lab, chunk_size=7), ref, rtol=1e-5, atol=1e-6)
    all_masked = torch.full_like(lab, IGNORE_INDEX)
    assert linear_cross_entropy(h, w, all_masked).item() == 0.0  # not NaN


def test_step_normalises_by_the_global_count_of_trained_tokens():
    """Two micro-batches with different numbers of trained tokens give the gradient of the one batch
    holding both (the mean over all trained tokens), not the mean of the two means."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 16))
    labels = torch.randint(0, 512, (2, 16))
    labels[0, :12] = IGNORE_INDEX  # 4 trained tokens in the first sequence, 16 in the second
    ref = _model()
    ref(tokens, labels).backward()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    opt.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    batches = [(tokens[:1], labels[:1]), (tokens[1:], labels[1:])]
    counts = [int((b[1] != IGNORE_INDEX).sum()) for b in batches]
    loss, _ = train_step(model, opt, batches, 2, lr=0.0, device=torch.device("cpu"), token_counts=counts)
    torch.testing.assert_close(loss, ref(tokens, labels).detach(), rtol=1e-5, atol=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("train_on_input", [False, True])
def test_a_prompt_token_changes_nothing_unless_prompts_are_trained(tmp_path, train_on_input):
    """Only response tokens contribute: two examples differing in one prompt token ('Bob' / 'Rob'),
    through the real cache, dataset and batch, give the same loss and gradients with
    train_on_input=false, and another loss with true. The token is also an input of every later
    position, which would move the response's predictions whatever the mask; so the model gives the two
    ids the same input embedding, and only the token's role as a target differs (its embedding
    gradient lands on its own row: compared with the two rows swapped)."""
    tok = load_tokenizer(_tokenizer(tmp_path))
    (b,), (r,) = tok.encode("B"), tok.encode("R")
    model = _model()
    with torch.no_grad():
        model.tok_embeddings.weight[r] = model.tok_embeddings.weight[b]
    seen = []
    for name in ("Bob", "Rob"):
        src = tmp_path / name / "sft.jsonl"
        src.parent.mkdir()
        src.write_text(json.dumps({"prompt": f"Say hi to {name}.", "completion": " Hi, friend!"}) + "\n")
        cache = build_sft_cache(src, tok, template="plain", train_on_input=train_on_input, log=lambda *a: None)
        ds = SFTDataset(cache, seq_len=32, packing=True, seed=0)
        (tokens, labels, extras), _ = load_sft_batch(ds, range(len(ds)), CPU)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels, **extras)
        loss.backward()
        seen.append((tokens, labels, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (tokens1, labels1, loss1, grads1), (tokens2, labels2, loss2, grads2) = seen
    assert int((tokens1 != tokens2).sum()) == 1  # the one prompt token
    if train_on_input:
        assert int((labels1 != labels2).sum()) == 1 and abs(loss1 - loss2) > 1e-4
        return
    assert torch.equal(labels1, labels2) and torch.equal(loss1, loss2)
    emb = grads2["tok_embeddings.weight"]
    emb[[b, r]] = emb[[r, b]]
    for n, g in grads1.items():
        assert torch.equal(g, grads2[n]), n


# --------------------------------------------------------------------------------------------------
# Packing and document masks


def test_best_fit_decreasing_fills_what_in_order_packing_leaves_empty():
    """Each example in exactly one bin, none over seq_len, the bin's indices ascending; on lengths of
    256-2048 into 4096 (the fine-tuning benchmark's), over 99% of positions used against 83%."""
    assert pack_best_fit_decreasing([3, 4, 2, 5, 1], 7) == [[2, 3], [0, 1], [4]]  # 5+2, 4+3, 1
    with pytest.raises(ValueError, match="example 0 of 8 positions"):
        pack_best_fit_decreasing([8], 7)
    lengths = np.random.default_rng(0).integers(256, 2049, 5000)
    fit, greedy = pack_best_fit_decreasing(lengths, 4096), pack_greedy(lengths, 4096)
    assert sorted(i for b in fit for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 4096 and b == sorted(b) for b in fit)
    used = [lengths.sum() / (len(bins) * 4096) for bins in (fit, greedy)]
    assert used[0] > 0.99 and used[1] < 0.85, used


def test_pack_greedy_keeps_order_and_never_splits():
    assert pack_greedy([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        pack_greedy([8], 7)


def test_packed_documents_equal_documents_run_alone():
    """Loss and gradients of a packed sequence (block-diagonal causal attention, positions restarting)
    equal those of its documents run one by one, summed over trained tokens."""
    torch.manual_seed(0)
    lengths = [5, 9, 6]
    docs = [torch.randint(0, 512, (n,)) for n in lengths]
    labs = [torch.randint(0, 512, (n,)) for n in lengths]
    labs[1][:4] = IGNORE_INDEX
    tokens, labels = torch.cat(docs)[None], torch.cat(labs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = _model()
    loss = packed(tokens, labels, positions=positions, document_ids=doc_ids)
    loss.backward()
    alone = _model()
    total = sum((labs_i != IGNORE_INDEX).sum() for labs_i in labs)
    ref = sum(alone(d[None], lb[None]) * (lb != IGNORE_INDEX).sum() for d, lb in zip(docs, labs)) / total
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # and the logits of each document match
        logits = packed(tokens, positions=positions, document_ids=doc_ids)[0]
        torch.testing.assert_close(logits[5:14], alone(docs[1][None])[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The JSONL cache


def test_cache_masks_prompts_and_is_reused_until_the_source_changes(tmp_path):
    tok = load_tokenizer(_tokenizer(tmp_path))
    src = _boolq(tmp_path / "boolq.jsonl")
    logs = []
    cache = build_sft_cache(src, tok, log=logs.append)
    assert len(cache) == len(FACTS) and len(logs) == 1
    tokens, mask = cache.tokens[0], cache.mask[0].astype(bool)
    assert tok.decode(tokens[mask]) == " yes" and tok.decode(tokens[~mask]).endswith("question: is the sky blue?\nanswer:")
    assert build_sft_cache(src, tok, log=logs.append).prefix == cache.prefix and len(logs) == 1  # reused
    with open(src, "a") as f:
        f.write(json.dumps({"prompt": "Say hi.", "completion": " hi"}) + "\n")
    again = build_sft_cache(src, tok, log=logs.append)
    assert again.prefix != cache.prefix and len(again) == len(FACTS) + 1 and len(logs) == 2
    ds = SFTDataset(again, seq_len=128, packing=True, seed=1)
    assert len(ds) < len(again)  # several examples per sequence
    (tokens_b, labels_b, extras), n = load_sft_batch(ds, range(len(ds)), torch.device("cpu"))
    trained = sum(int(m[1:].sum()) for m in (again.mask[i] for i in range(len(again))))
    assert n == trained == int((labels_b != IGNORE_INDEX).sum())
    pos, docs = extras["positions"], extras["document_ids"]
    starts = (pos == 0) & (docs >= 0)
    assert int(starts.sum()) == len(again)  # positions restart at each example
    assert (docs == -1).any() and (labels_b[docs == -1] == IGNORE_INDEX).all()  # padding is never trained
    # What the planner costs attention with (--document-tokens): sum of squared document lengths (the
    # padding run one document) over positions, as bench/bench_finetune.py counts it off the batches.
    squares = sum(int((torch.unique_consecutive(row, return_counts=True)[1] ** 2).sum()) for row in docs)
    assert ds.document_tokens() == pytest.approx(squares / docs.numel())
    assert "documents of" in ds.describe() and SFTDataset(again, 128, packing=False, seed=1).document_tokens() == 128


def test_chat_messages_train_on_assistant_turns_only(tmp_path):
    tok = load_tokenizer(_tokenizer(tmp_path))
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi?"},
                                            {"role": "assistant", "content": "Hello."}]}) + "\n")
    cache = build_sft_cache(src, tok, template="llama3")
    tokens, mask = cache.tokens[0], cache.mask[0].astype(bool)
    eot = tok.special_tokens["<|eot_id|>"]
    assert tok.decode(tokens[mask][:-1]) == "Hello." and tokens[mask][-1] == eot
    assert tokens[0] == tok.special_tokens["<|begin_of_text|>"]
    assert int((tokens == tok.special_tokens["<|start_header_id|>"]).sum()) == 3


@pytest.mark.parametrize("line, expect", [
    ("{not json", "chat.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', "chat.jsonl:2: missing field 'completion'"),
    ('{"passage": "p", "question": "q"}', "chat.jsonl:2: field 'label' must be true/false"),
    ('{"text": "x"}', "chat.jsonl:2: expected the fields"),
])
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, expect):
    tok = load_tokenizer(_tokenizer(tmp_path))
    src = tmp_path / "chat.jsonl"
    src.write_text('{"prompt": "a", "completion": " b"}\n' + line + "\n")
    with pytest.raises(LlamatronError, match=expect.replace("?", r"\?")):
        build_sft_cache(src, tok)


def test_too_long_examples_truncated_dropped_or_rejected(tmp_path):
    tok = load_tokenizer(_tokenizer(tmp_path))
    cache = build_sft_cache(_boolq(tmp_path / "b.jsonl"), tok)
    limit = int(np.sort(cache.tokens.sequence_lengths)[2])  # some examples are longer
    cut = SFTDataset(cache, limit, packing=False, seed=0, too_long="truncate")
    dropped = SFTDataset(cache, limit, packing=False, seed=0, too_long="drop")
    assert cut.n_too_long == dropped.n_too_long > 0 and len(cut) == len(FACTS) > len(dropped)
    assert "truncated" in cut.describe() and "dropped" in dropped.describe()
    with pytest.raises(LlamatronError, match="finetune.too_long"):
        SFTDataset(cache, limit, packing=False, seed=0, too_long="error")


# --------------------------------------------------------------------------------------------------
# Through the trainer


def _cfg(tmp_path, out, steps, extra=()):
    from llamatron.config import load_config as lc

    return lc("llamatron-finetune-test", [
        f"data.tokenizer={_tokenizer(tmp_path)}", f"finetune.data={_boolq(tmp_path / 'boolq.jsonl', repeat=4)}",
        f"train.out_dir={out}", f"train.steps={steps}", *extra])


def _losses(out):
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_sft_then_lora_through_the_trainer(tmp_path):
    from llamatron.train.trainer import train

    sft = train(_cfg(tmp_path, tmp_path / "sft", 6), progress=False, log=lambda *a: None)
    losses = _losses(sft.out_dir)
    assert losses[6] < losses[1]
    lora_args = [f"checkpoint.init_from={sft.checkpoint}", "lora.rank=4", "lora.alpha=8",
                 f"lora.peft_out={tmp_path / 'adapter'}", "optim.lr=1e-2", "optim.schedule_steps=6"]
    lora = train(_cfg(tmp_path, tmp_path / "lora", 6, lora_args), progress=False, log=lambda *a: None)
    full = _losses(lora.out_dir)
    # The adapters trained (B starts at zero); that LoRA learns a task is the end-to-end test's check:
    # six steps on batches of other examples each say little about the loss.
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    # Throughput rows count a LoRA step's FLOPs (no frozen weight gradients: llamatron/flops.py).
    from llamatron import flops

    cfg = _cfg(tmp_path, tmp_path / "lora", 6, lora_args)
    row = [json.loads(line) for line in open(lora.out_dir / "metrics.jsonl") if '"train"' in line][-1]
    per_seq = row["tflops_per_gpu"] * 1e12 * row["step_time_s"] / cfg.train.global_batch_size
    assert per_seq == pytest.approx(flops.flops_per_sequence(SIZES["debug"], cfg.data.seq_len, cfg.lora), rel=1e-9)
    # Resume: 3 steps, then the same command to 6, gives the same losses bit for bit; also from
    # adapter-only checkpoints (the base weights come from init_from again).
    train(_cfg(tmp_path, tmp_path / "resumed", 3, lora_args), progress=False, log=lambda *a: None)
    train(_cfg(tmp_path, tmp_path / "resumed", 6, lora_args), progress=False, log=lambda *a: None)
    assert _losses(tmp_path / "resumed") == full
    small = [*lora_args, "checkpoint.save_frozen=false"]
    first = train(_cfg(tmp_path, tmp_path / "small", 3, small), progress=False, log=lambda *a: None)
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(first.checkpoint)).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # adapters (and their AdamW moments) only
    size = sum(f.stat().st_size for f in first.checkpoint.glob("*.distcp"))
    assert size < 0.6 * sum(f.stat().st_size for f in lora.checkpoint.glob("*.distcp"))
    train(_cfg(tmp_path, tmp_path / "small", 6, small), progress=False, log=lambda *a: None)
    assert _losses(tmp_path / "small") == full


# --------------------------------------------------------------------------------------------------
# Validation loss on held-out examples (finetune.valid)


@pytest.mark.parametrize("packing", [True, False])
def test_validation_loss_is_the_mean_nll_of_every_response_token(tmp_path, packing):
    """finetune.valid: the mean NLL over the response tokens of all validation examples (not a mean of
    per-batch means), packed or padded, whatever the micro batch: each example run alone by hand."""
    from llamatron.data.build import build_datasets
    from llamatron.data.sft import shifted

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"passage": p * (i + 1), "question": q, "label": label}) + "\n"
                                for i, (p, q, label) in enumerate(FACTS)))  # lengths differ
    cfg = _cfg(tmp_path, tmp_path / "out", 1, [f"finetune.valid={held_out}", "eval.samples=64",
                                               f"finetune.packing={str(packing).lower()}"])
    _, valid = build_datasets(cfg, 512, 4)
    assert "6 examples" in valid.describe() and (len(valid) < 6 if packing else len(valid) == 6)
    model = _model()
    total = count = 0.0
    with torch.no_grad():
        for i in range(len(valid.cache)):
            inp, lab = shifted(valid.cache.tokens[i].astype(np.int64), valid.cache.mask[i])
            inp, lab = torch.from_numpy(inp)[None], torch.from_numpy(lab)[None]
            n = int((lab != IGNORE_INDEX).sum())
            total, count = total + float(model(inp, lab)) * n, count + n
    assert 6 <= count < valid.cache.tokens.num_tokens / 2  # the answers only, not the passages
    for micro in (1, 3):
        got = perplexity(model, valid, 64, micro, torch.device("cpu"))
        assert got == pytest.approx(total / count, rel=1e-5), micro


def test_validation_loss_through_the_trainer(tmp_path):
    """At the start and the end of the run, logged like pretraining's; training on the same examples
    brings it down. A missing file is one line naming finetune.valid."""
    out = tmp_path / "run"
    data = _boolq(tmp_path / "boolq.jsonl", repeat=4)
    extra = [f"finetune.valid={data}", "eval.samples=8", "eval.at_start=true", "checkpoint.every=0"]
    lines = []
    train(_cfg(tmp_path, out, 6, extra), progress=False, log=lines.append)
    evals = {r["step"]: r["val_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "eval"}
    assert sorted(evals) == [0, 6] and evals[6] < evals[0] - 0.5, evals
    assert any(line.startswith("validation fine-tuning data") for line in lines)
    with pytest.raises(LlamatronError, match="config key 'finetune.valid': .*nowhere.jsonl: no such file"):
        train(_cfg(tmp_path, tmp_path / "bad", 1, [f"finetune.valid={tmp_path / 'nowhere.jsonl'}", "eval.samples=8"]),
              progress=False, log=lambda *a: None)


def test_plan_costs_attention_within_the_documents_of_tokenized_data(tmp_path, capsys):
    """`llamatron plan --config` on a fine-tuning config: once a run has tokenized the data, the plan
    costs attention within its packed documents (the figure the run's log gives); before, over whole
    sequences, and it says so."""
    from llamatron import plan
    from llamatron.data.build import build_datasets

    cfg_file = tmp_path / "ft.toml"
    cfg_file.write_text(f'[model]\nsize = "debug"\n[data]\nseq_len = 128\ntokenizer = "{_tokenizer(tmp_path)}"\n'
                        f'[finetune]\ndata = "{_boolq(tmp_path / "boolq.jsonl", repeat=4)}"\n'
                        '[train]\nglobal_batch_size = 4\nmicro_batch_size = 1\n')
    argv = ["plan", "--config", str(cfg_file), "--gpus", "1", "--gpu", "H200", "--top", "1"]
    assert plan.workload_from_config(str(cfg_file)).document_tokens is None
    assert main(argv) == 0
    assert "attention over whole sequences (the data is not tokenized yet" in capsys.readouterr().out
    train_data, _ = build_datasets(load_config(str(cfg_file)), 512, 4)  # what a run's start does
    w = plan.workload_from_config(str(cfg_file))
    assert w.document_tokens == train_data.document_tokens() < 128
    assert main(argv) == 0
    assert f"attention within documents of {w.document_tokens:,.0f} positions" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Evaluating what fine-tuning made (`llamatron evaluate`, `llamatron eval`)


def _train_keeping_model(cfg):
    """Train; the result and the trainer's own model, as its last step left it (base + adapters)."""
    seen = []
    remove = hooks.add("step_end", lambda model, **_: seen.append(model))
    try:
        result = train(cfg, progress=False, log=lambda *a: None)
    finally:
        remove()
    return result, seen[-1].eval()


def _boolq_pairs():
    return [r for p, q, _ in FACTS for r in get_task("boolq").requests({"passage": p, "question": q}, "pax")]


def _largest_difference(a, b) -> float:
    return max(abs(x - y) for (x, _), (y, _) in zip(a, b))


def _validation_file(tmp_path, tok, n_tokens) -> str:
    """A Megatron .bin/.idx pair of the FACTS' text, for `llamatron eval`."""
    tokens = np.array([t for p, q, _ in FACTS for t in tok.encode(f"{p} {q}?")] * 4, dtype=np.int32)[:n_tokens]
    with IndexedDatasetWriter(tmp_path / "valid", np.int32) as w:
        w.add_document(tokens)
    return str(tmp_path / "valid")


def _cli_perplexity(capsys, checkpoint, prefix, seq_len, n) -> float:
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(prefix), "--seq-len", str(seq_len),
                 "--num-samples", str(n), "--device", "cpu"]) == 0
    return float(capsys.readouterr().out.split("validation log perplexity:")[1])


@pytest.mark.parametrize("base, save_frozen", [("init_from", True), ("init_from", False), ("seed", False)],
                         ids=["whole", "adapter-only", "adapter-only-seeded"])
def test_evaluating_a_lora_checkpoint_scores_base_and_adapters(tmp_path, capsys, base, save_frozen):
    """What `llamatron evaluate` loads from a LoRA run's checkpoint scores as the run's own model did at
    its end, not as the base alone; so does `llamatron eval`. From adapter-only checkpoints the frozen
    base is the run's checkpoint.init_from (or, without one, its seeded initial values)."""
    extra = ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", f"checkpoint.save_frozen={str(save_frozen).lower()}"]
    if base == "init_from":  # one SFT step: a base that is not the LoRA run's seeded initial model
        first = train(_cfg(tmp_path, tmp_path / "base", 1), progress=False, log=lambda *a: None)
        extra.append(f"checkpoint.init_from={first.checkpoint}")
    run, trained = _train_keeping_model(_cfg(tmp_path, tmp_path / "lora", 3, extra))
    saved = dcp.FileSystemReader(str(run.checkpoint)).read_metadata().state_dict_metadata
    assert all(".lora_" in k for k in saved if k.startswith("model.")) is not save_frozen
    untrained = copy.deepcopy(trained)  # the base alone: B = 0 adds nothing
    for m in lora_modules(untrained).values():
        m.lora_B.weight.data.zero_()

    tok = load_tokenizer(_tokenizer(tmp_path))
    pairs = _boolq_pairs()
    want, base_scores = (Scorer(m, tok, 4, CPU)(pairs) for m in (trained, untrained))
    assert _largest_difference(base_scores, want) > 1e-2  # the adapters changed the scores
    model, _ = load_model(run.out_dir, CPU)
    assert _largest_difference(Scorer(model, tok, 4, CPU)(pairs), want) < 1e-4

    seq_len, n = 32, 4
    windows = GPTDataset(IndexedDataset(_validation_file(tmp_path, tok, seq_len * n + 1)), seq_len, n, seed=0,
                         split="valid", shuffle=False)
    want_ppl, base_ppl = (perplexity(m, windows, n, 2, CPU) for m in (trained, untrained))
    assert abs(want_ppl - base_ppl) > 1e-3
    assert _cli_perplexity(capsys, run.out_dir, tmp_path / "valid", seq_len, n) == pytest.approx(want_ppl, abs=1e-4)


@pytest.mark.parametrize("base, save_frozen", [("init_from", True), ("init_from", False), ("seed", False)],
                         ids=["whole", "adapter-only", "adapter-only-seeded"])
def test_export_of_a_lora_run_is_the_merged_model(tmp_path, base, save_frozen):
    """`convert --from llamatron --to hf` on a LoRA run writes the merged weights (W + alpha/r B A; the
    frozen base from init_from or the seed for adapter-only checkpoints): transformers' logits of the
    export equal the trained model's (base + adapters) within fp32 rounding."""
    transformers = pytest.importorskip("transformers")
    extra = ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", f"checkpoint.save_frozen={str(save_frozen).lower()}"]
    if base == "init_from":
        first = train(_cfg(tmp_path, tmp_path / "base", 1), progress=False, log=lambda *a: None)
        extra.append(f"checkpoint.init_from={first.checkpoint}")
    run, trained = _train_keeping_model(_cfg(tmp_path, tmp_path / "lora", 2, extra))
    assert main(["convert", "--from", "llamatron", "--to", "hf", str(run.out_dir), str(tmp_path / "hf"),
                 "--dtype", "fp32"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, trained.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(tokens), hf(tokens).logits
        for m in lora_modules(trained).values():  # without its adapters the export would be far off
            m.lora_B.weight.zero_()
        base_only = trained(tokens)
    assert (want - base_only).abs().max() > 1e-3
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_evaluating_an_adapter_only_checkpoint_without_its_base_is_one_line(tmp_path, capsys):
    first = train(_cfg(tmp_path, tmp_path / "base", 1), progress=False, log=lambda *a: None)
    lora = ["lora.rank=4", "lora.alpha=8", "checkpoint.save_frozen=false", f"checkpoint.init_from={first.checkpoint}"]
    run = train(_cfg(tmp_path, tmp_path / "lora", 1, lora), progress=False, log=lambda *a: None)
    data = _boolq(tmp_path / "eval.jsonl")
    args = ["evaluate", "--checkpoint", str(run.out_dir), "--tasks", "boolq", "--task-file", f"boolq={data}",
            "--device", "cpu", "--output", str(tmp_path / "results.json")]
    first.checkpoint.rename(tmp_path / "moved")
    _one_line_error(capsys, args, "holds only LoRA adapters", "checkpoint.init_from", str(first.checkpoint))
    valid = _validation_file(tmp_path, load_tokenizer(_tokenizer(tmp_path)), 65)
    _one_line_error(capsys, ["eval", "--checkpoint", str(run.out_dir), "--data", valid, "--seq-len", "32"],
                    "holds only LoRA adapters", "checkpoint.init_from")
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--tp", "2"]], ids=["fsdp2", "tp2"])
def test_evaluating_a_lora_checkpoint_under_torchrun_equals_one_process(tmp_path, extra):
    """`llamatron evaluate --nproc-per-node 2` (FSDP over 2 gloo ranks, or TP 2 with the adapters in
    training's TP layout; unmerged) on an adapter-only checkpoint gives the single process's scores
    (merged adapters)."""
    first = train(_cfg(tmp_path, tmp_path / "base", 1), progress=False, log=lambda *a: None)
    lora = ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "checkpoint.save_frozen=false",
            f"checkpoint.init_from={first.checkpoint}"]
    run = train(_cfg(tmp_path, tmp_path / "lora", 3, lora), progress=False, log=lambda *a: None)
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": f"{p} {q}"}) + "\n" for p, q, _ in FACTS))
    args = ["evaluate", "--checkpoint", str(run.out_dir), "--tasks", "lambada,boolq", "--task-file",
            f"lambada={lambada}", "--task-file", f"boolq={_boolq(tmp_path / 'eval.jsonl')}", "--batch-size", "2",
            "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "llamatron", *args, "--output", str(tmp_path / "two.json"),
                           "--nproc-per-node", "2", *extra], capture_output=True, text=True, env=env, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for task in ("lambada", "boolq"):
        for metric, m in one[task]["metrics"].items():
            assert two[task]["metrics"][metric]["value"] == pytest.approx(m["value"], rel=1e-5), (task, metric)


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


# Statements with the answer cued by the passage's last word; the same 4 statements say yes and no.
CUED = [(f"{fact}. {cue}.", "is that so", cue == "True") for fact in
        ("The lamp is on", "The door is open", "Tom is awake", "The cup is full") for cue in ("True", "False")]


def _cued_boolq(path: Path, flip: bool = False) -> Path:
    path.write_text("".join(json.dumps({"passage": p, "question": q, "label": label != flip}) + "\n"
                            for p, q, label in CUED))
    return path


def _zero_shot(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return {r["step"]: r["boolq/acc"] for r in rows if r["kind"] == "zero_shot"}


@pytest.mark.slow
def test_sft_and_lora_raise_boolq_accuracy_on_their_training_set(tmp_path):
    """The plumbing end to end: fine-tuning on a BoolQ-layout set raises the accuracy that the built-in
    boolq scorer gives on that set, scored by the run (eval.tasks: before the first step and at the end)
    and by `llamatron evaluate` on its checkpoint. The base is the tiny model fine-tuned on the same
    passages with the opposite answers, so it gets every item wrong; LoRA could not start from the
    seed's random model, whose frozen output layer keeps every logit within about +-1.3: the
    three-token ' no' outscores the four-token ' yes' whatever the adapters do. With train.seed 0-3 and
    1234 the base's best item is 0.44 nats wrong and the fine-tuned models' worst 0.61 (SFT) and 0.71
    (LoRA) nats right, so the bounds below hold with room. LoRA with its frozen layers in FP8 too (the
    run scores with them in FP8, `llamatron evaluate` in bf16: the same accuracy)."""
    data, flipped = _cued_boolq(tmp_path / "cued.jsonl"), _cued_boolq(tmp_path / "flipped.jsonl", flip=True)
    base = train(_cfg(tmp_path, tmp_path / "base", 30, [f"finetune.data={flipped}", "checkpoint.every=0"]),
                 progress=False, log=lambda *a: None)
    scored = [f"finetune.data={data}", f"checkpoint.init_from={base.checkpoint}", "eval.at_start=true",
              f"eval.tasks=[boolq={data}]", "eval.tasks_prompt=pax", "checkpoint.every=0"]
    lora = ["lora.rank=8", "lora.alpha=16", "optim.lr=1e-2", "optim.min_lr=1e-2", "checkpoint.save_frozen=false"]
    lora_fp8 = [*lora, "train.precision=bf16", "train.fp8=tensorwise", "train.fp8_min_features=16"]
    for name, extra in (("sft", ["optim.lr=2e-3", "optim.min_lr=2e-3"]), ("lora", lora), ("lora-fp8", lora_fp8)):
        run = train(_cfg(tmp_path, tmp_path / name, 30, [*scored, *extra]), progress=False, log=lambda *a: None)
        acc = _zero_shot(run.out_dir)
        assert acc[0] <= 0.25 and acc[30] >= 0.75, (name, acc)
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--checkpoint", str(run.out_dir), "--tasks", "boolq", "--task-file", f"boolq={data}",
                     "--prompt", "pax", "--device", "cpu", "--output", str(out)]) == 0
        assert json.loads(out.read_text())["boolq"]["metrics"]["acc"]["value"] == acc[30], name


def test_lora_base_weights_in_bf16_change_no_number(tmp_path):
    """Under bf16 autocast (here on the CPU; on a GPU by default) LoRA's frozen linears are stored in
    bf16 (lora.base_dtype = auto): autocast rounded them to bf16 at every use anyway, so the losses
    equal the fp32-stored run's bit for bit. The run's checkpoint holds them in bf16, the embedding,
    norms and adapters in fp32, and a resume from it continues exactly."""
    lora = ["train.precision=bf16", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "optim.schedule_steps=4",
            "checkpoint.every=2"]
    fp32 = train(_cfg(tmp_path, tmp_path / "fp32", 4, [*lora, "lora.base_dtype=fp32"]), progress=False,
                 log=lambda *a: None)
    logged = []
    bf16 = train(_cfg(tmp_path, tmp_path / "bf16", 4, lora), progress=False, log=logged.append)
    assert _losses(bf16.out_dir) == _losses(fp32.out_dir)
    assert any("LoRA's frozen linear weights stored in bfloat16" in line for line in logged)
    dtypes = {k: m.properties.dtype for k, m in
              dcp.FileSystemReader(str(bf16.checkpoint)).read_metadata().state_dict_metadata.items()
              if k.startswith("model.") and hasattr(m, "properties")}
    assert dtypes["model.layers.0.attention.wq.weight"] == dtypes["model.output.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.attention.wq.lora_A.weight"] == dtypes["model.tok_embeddings.weight"] == torch.float32
    assert dtypes["model.norm.weight"] == torch.float32
    # Resume from step 2's checkpoint (bf16 base weights) to 4: the same losses.
    resumed = tmp_path / "resumed"
    train(_cfg(tmp_path, resumed, 2, lora), progress=False, log=lambda *a: None)
    train(_cfg(tmp_path, resumed, 4, lora), progress=False, log=lambda *a: None)
    assert _losses(resumed) == _losses(bf16.out_dir)


def test_lora_base_dtype_bf16_needs_bf16_autocast(tmp_path):
    lora = ["finetune.data=x.jsonl", "lora.rank=4"]
    with pytest.raises(LlamatronError, match="lora.base_dtype.*bf16 base weights need bf16 compute"):
        load_config("llamatron-finetune-test", [*lora, "lora.base_dtype=bf16"])  # the preset's precision is fp32
    with pytest.raises(LlamatronError, match="lora.base_dtype.*must be one of auto, fp32, bf16"):
        load_config("llamatron-finetune-test", [*lora, "lora.base_dtype=fp16"])
    from llamatron.transforms.lora import frozen_dtype

    cfg = load_config("llamatron-finetune-test", [*lora, "lora.base_dtype=bf16", "train.precision=bf16"])
    assert frozen_dtype(cfg.lora, torch.bfloat16) == torch.bfloat16
    with pytest.raises(LlamatronError, match="without FSDP"):
        frozen_dtype(cfg.lora, None)  # FSDP: no autocast (its mixed precision gathers bf16 copies)
    with pytest.raises(LlamatronError, match="without FSDP or tensor parallelism"):
        frozen_dtype(cfg.lora, torch.bfloat16, tp=2)
    cfg.lora.base_dtype = "auto"
    assert frozen_dtype(cfg.lora, None) is None and frozen_dtype(cfg.lora, torch.bfloat16, tp=2) is None
    assert frozen_dtype(cfg.lora, torch.bfloat16) == torch.bfloat16
    with pytest.raises(LlamatronError, match="lora.base_dtype.*tensor parallelism"):
        load_config("llamatron-finetune-test", [*lora, "lora.base_dtype=bf16", "train.precision=bf16", "parallel.tp=2"])


def test_memory_estimate_of_bf16_base_weights():
    """bf16-stored frozen linears: 2 bytes each instead of 4, and no autocast copy kept for backward."""
    from llamatron.config import LoraConfig
    from llamatron.parallel.memory import estimate_memory, parameter_counts

    args = SIZES["llama3.1-8b"]
    est = {base: estimate_memory(args, 4096, 1, bf16=True, fsdp=False, lora=LoraConfig(rank=32, base_dtype=base))
           for base in ("auto", "fp32")}
    counts = parameter_counts(args, LoraConfig(rank=32))
    frozen = args.n_layers * counts.block_linear_frozen + counts.last_linear_frozen
    assert frozen == pytest.approx(7.5044e9, rel=1e-4)  # every block linear and the output layer
    assert est["fp32"].weights - est["auto"].weights == pytest.approx(2 * frozen)
    assert est["fp32"].working - est["auto"].working == pytest.approx(2 * frozen)
    fsdp = {base: estimate_memory(args, 4096, 1, dp_shard=8, bf16=True, lora=LoraConfig(rank=32, base_dtype=base))
            for base in ("auto", "fp32")}
    assert fsdp["auto"].total == fsdp["fp32"].total  # FSDP keeps fp32 shards


def test_compiled_checkpointed_blocks_take_the_flex_block_mask(monkeypatch):
    """On CUDA packed batches run flex_attention (compiled once, a module global) inside compiled and
    checkpointed blocks. The global is made by `document_mask`, outside the blocks: made inside a
    checkpointed block's graph it is a side effect torch.compile refuses. Emulated on the CPU (whose
    flex_attention has no backward and whose compiled kernel is not tried here): the same code path
    with the aot_eager backend, forward only."""
    import llamatron.models.llama.model as M
    from llamatron.transforms.checkpointing import apply_activation_checkpointing
    from llamatron.transforms.lora import apply_lora

    made = {}

    def flex_any_device(device):  # `_flex_attention` without its CUDA-only condition: made once
        if "flex" not in made:
            from torch.nn.attention.flex_attention import flex_attention

            made["flex"] = torch.compile(flex_attention, dynamic=False, backend="aot_eager")
        return made["flex"]

    monkeypatch.setattr(M, "_flex_attention", flex_any_device)
    torch._dynamo.reset()
    model = _model()
    apply_lora(model, 4, 8.0)
    apply_activation_checkpointing(model)
    for block in model.layers.values():
        block.compile(fullgraph=True, backend="aot_eager")
    doc = torch.tensor([[0] * 100 + [1] * 60 + [2] * 96, [0] * 200 + [-1] * 56])
    pos = torch.cat([torch.arange(100), torch.arange(60), torch.arange(96)]).expand(2, -1)
    x = torch.randn(2, 256, 64)
    with torch.no_grad():
        h = x
        mask = M.document_mask(doc, flex=True)
        for block in model.layers.values():
            h = block(h, model.rope_cos[pos], model.rope_sin[pos], mask)
        ref = x
        for block in model.layers.values():
            ref = block.forward(ref, model.rope_cos[pos], model.rope_sin[pos], M.document_mask(doc))  # eager
    torch._dynamo.reset()
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-5)


def test_config_takes_lora_with_tensor_parallelism_or_fp8_but_not_both(tmp_path):
    lora = ["finetune.data=x.jsonl", "lora.rank=4"]
    assert load_config("llamatron-finetune-test", [*lora, "parallel.tp=2"]).parallel.tp == 2
    assert load_config("llamatron-finetune-test", [*lora, "train.fp8=tensorwise"]).train.fp8 == "tensorwise"
    with pytest.raises(LlamatronError, match="train.fp8.*tensor parallelism"):
        load_config("llamatron-finetune-test", [*lora, "train.fp8=tensorwise", "parallel.tp=2"])


@pytest.mark.parametrize("preset", ["llama2-7b-boolq-sft", "llama2-7b-boolq-lora", "llama31-8b-boolq-sft",
                                    "llama31-8b-boolq-lora"])
def test_boolq_presets_hold_the_pax_recipes(preset):
    from llamatron.config import resolve_model

    cfg = load_config(preset)
    args = resolve_model(cfg.model)[1]
    assert cfg.finetune.data and cfg.data.seq_len == 4096
    # Zero-shot BoolQ before and after (Pax's prompt), no validation perplexity.
    assert cfg.eval.at_start and cfg.eval.samples == 0 and cfg.eval.tasks_prompt == "pax"
    assert [t.partition("=")[0] for t in cfg.eval.tasks] == ["boolq"]
    if preset.startswith("llama2"):
        assert (args.vocab_size, args.n_kv_heads, args.ffn_dim, args.rope_theta) == (32000, 32, 11008, 10000.0)
    if preset.endswith("lora"):
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.optim.min_lr, cfg.train.steps) == (32, 32.0, 1e-4, 1e-4, 600)
    else:
        assert (cfg.lora.rank, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps) == (0, 1e-6, 500, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True])
def test_fsdp_over_two_ranks_gives_the_single_process_losses(tmp_path, lora):
    """Micro-batches with different numbers of trained tokens on two FSDP ranks (gloo): the step's
    global token normalisation gives the one-process losses and gradient norms."""
    from test_parallel_layouts import REL, _trajectory, torchrun

    from llamatron.train.trainer import train

    from safetensors.torch import load_file

    extra = ["train.steps=3", "optim.schedule_steps=6"] + (["lora.rank=4", "lora.alpha=8"] if lora else [])
    ref = train(_cfg(tmp_path, tmp_path / "one", 3, [*extra, f"lora.peft_out={tmp_path / 'a1'}"]), progress=False,
                log=lambda *a: None)
    overrides = [f"data.tokenizer={_tokenizer(tmp_path)}", f"finetune.data={tmp_path / 'boolq.jsonl'}",
                 "parallel.dp_shard=2", f"lora.peft_out={tmp_path / 'a2'}", *extra]
    torchrun(2, "llamatron-finetune-test", tmp_path / "two", *overrides)
    one, two = (load_file(str(tmp_path / a / "adapter_model.safetensors")) for a in ("a1", "a2"))
    assert one.keys() == two.keys()  # the FSDP shards were gathered into whole adapters
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    got, want = _trajectory(tmp_path / "two"), _trajectory(ref.out_dir)
    for step in (1, 2, 3):
        (gl, gn), (wl, wn) = got[("train", step)], want[("train", step)]
        assert gl == pytest.approx(wl, rel=REL) and gn == pytest.approx(wn, rel=REL), step


def test_lora_with_8bit_adamw_resumes_exactly_from_adapter_only_checkpoints(tmp_path, monkeypatch):
    """optim.name = adamw8bit with LoRA rank 64 (lora_A of wq 64 x 64 = 4096 values: 8-bit moments):
    3 steps, an adapter-only checkpoint, 3 more, gives the straight 6 steps' losses bit for bit."""
    pytest.importorskip("torchao.optim")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # torchao's step eager: its compile per shape, not checked here
    from llamatron.train.trainer import train

    args = ["lora.rank=64", "lora.alpha=64", "optim.lr=1e-2", "optim.schedule_steps=6", "optim.name=adamw8bit",
            "checkpoint.save_frozen=false"]
    straight = train(_cfg(tmp_path, tmp_path / "straight", 6, args), progress=False, log=lambda *a: None)
    train(_cfg(tmp_path, tmp_path / "split", 3, args), progress=False, log=lambda *a: None)
    train(_cfg(tmp_path, tmp_path / "split", 6, args), progress=False, log=lambda *a: None)
    losses = _losses(straight.out_dir)
    assert _losses(tmp_path / "split") == losses and losses[6] < losses[1]


def test_flex_attention_block_mask_equals_the_dense_mask():
    """CUDA runs packed sequences through flex_attention's BlockMask; it computes the dense mask's result."""
    import warnings

    from llamatron.models.llama.model import document_mask

    torch.manual_seed(0)
    model = _model()
    x = torch.randn(2, 24, 64)
    doc = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5, [0] * 20 + [-1] * 4])
    pos = torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)]).expand(2, -1)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    block = model.layers["0"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        dense = block(x, cos, sin, document_mask(doc))
        flex = block(x, cos, sin, document_mask(doc, flex=True))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_resume_refuses_another_packing_of_the_examples(tmp_path):
    """The packing decides which examples share a sequence: a resumed run with another one reads other
    data. A checkpoint written before `finetune.packing_algorithm` existed was packed in order."""
    import yaml

    from llamatron.config import dump_config
    from llamatron.train.resume_check import check_resume_config

    def config(*sets):
        return dump_config(load_config(None, ["finetune.data=ex.jsonl", *sets]))

    older = yaml.safe_load(config())
    del older["finetune"]["packing_algorithm"]
    with pytest.raises(LlamatronError, match="finetune.packing_algorithm: greedy -> best_fit_decreasing"):
        check_resume_config(tmp_path, yaml.safe_dump(older), config(), allow=False, log=lambda *a: None)
    check_resume_config(tmp_path, yaml.safe_dump(older), config("finetune.packing_algorithm=greedy"), allow=False,
                        log=lambda *a: None)
    with pytest.raises(LlamatronError, match="finetune.too_long: truncate -> drop"):
        check_resume_config(tmp_path, config(), config("finetune.too_long=drop"), allow=False, log=lambda *a: None)
