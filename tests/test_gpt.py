"""The GPT family and the LLaMA-2 sizes (issue 18): parameter counts of every preset, HF GPT2LMHeadModel and
LlamaForCausalLM (rope theta 10,000, no scaling) parity both ways, Meta LLaMA-2 import, the tied-embedding
rules, the FLOP formula, and a tiny GPT trained on the embedded corpus with a SentencePiece tokenizer.
The parallel layouts are in test_gpt_layouts.py."""

import dataclasses
import json

import pytest
import torch
import yaml

from llamatron import convert
from llamatron.cli import main
from llamatron.config import config_from_dict, load_config, resolve_model
from llamatron.errors import LlamatronError
from llamatron.models import parameter_count, registry
from llamatron.models.gpt import SIZES as GPT_SIZES
from llamatron.models.gpt import cost as gpt_cost
from llamatron.models.gpt.model import GPT
from llamatron.models.llama.model import Transformer, llama_ffn_dim
from llamatron.train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

GPT_PRESETS = ["gpt-126m", "gpt-5b", "gpt-175b", "synthetic-gpt-126m", "synthetic-gpt-5b", "synthetic-gpt-175b"]
LLAMA2 = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}


def _gpt_params(L, d, f, V, P):
    """GPT-2 parameters from the shapes: per block 4 (d x d + d) attention, d f + f + f d + d MLP, two
    LayerNorms (2 d each); token and position tables; the final LayerNorm; the output tied."""
    return L * (4 * (d * d + d) + 2 * d * f + f + d + 4 * d) + V * d + P * d + 2 * d


def _preset(name):
    overrides = [] if name.startswith("synthetic") else ['data.train=["x"]']
    return load_config(name, overrides)


@pytest.mark.parametrize("name", GPT_PRESETS)
def test_gpt_preset_parameter_counts(name):
    cfg = _preset(name)
    family, args = resolve_model(cfg.model)
    shapes = {"gpt-126m": (12, 768, 3072, 50304), "gpt-5b": (24, 4096, 16384, 50304),
              "gpt-175b": (96, 12288, 49152, 50257)}[cfg.model.size]
    want = _gpt_params(*shapes, P=2048)
    assert parameter_count(family, args) == want
    assert family.name == "gpt" and cfg.data.seq_len == 2048 and args.tie_embeddings
    # 125.3M, 5.05B, 174.6B: the names are right.
    nominal = {"gpt-126m": 126e6, "gpt-5b": 5e9, "gpt-175b": 175e9}[cfg.model.size]
    assert abs(want / nominal - 1) < 0.02
    if name.startswith("synthetic"):
        assert cfg.data.mock and cfg.train.steps == 100
        assert cfg.train.micro_batch_size == {"gpt-126m": 4, "gpt-5b": 8, "gpt-175b": 6}[cfg.model.size]
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.optim.min_lr == pytest.approx(0.1 * cfg.optim.lr)


@pytest.mark.parametrize("name", list(LLAMA2))
def test_llama2_presets_match_meta_parameter_counts(name):
    family, args = resolve_model(_preset(name).model)
    assert family.name == "llama"
    assert parameter_count(family, args) == LLAMA2[name]
    assert (args.vocab_size, args.rope_theta, args.rope_scaling_factor, args.norm_eps, args.head_dim) == (
        32000, 10000.0, 0.0, 1e-5, 128)


def test_init_std_and_output_projection_scaling():
    model = GPT(GPT_SIZES["gpt-126m"].__class__(**{**dataclasses.asdict(GPT_SIZES["gpt-126m"]), "vocab_size": 64}))
    for name, std in [("layers.0.attention.wq.weight", 0.023), ("embeddings.pos.weight", 0.023),
                      ("layers.3.feed_forward.w2.weight", 0.023 / 24**0.5)]:
        shape = dict(model.named_parameters())[name].shape
        assert model.initial_value(name, shape, seed=1).std().item() == pytest.approx(std, rel=0.02)
    assert torch.equal(model.initial_value("layers.0.attention.wq.bias", (768,), 1), torch.zeros(768))
    assert torch.equal(model.initial_value("norm.weight", (768,), 1), torch.ones(768))


def test_flops_formula_is_6n_plus_attention(capsys):
    args = GPT_SIZES["gpt-126m"]
    L, h, V, S = 12, 768, 50304, 2048
    n_matmul = L * 12 * h * h + V * h  # f = 4h: 4h^2 attention + 8h^2 MLP per layer, the tied output
    assert gpt_cost.flops_per_token(args, S) == 6 * n_matmul + 12 * L * h * S
    # Megatron's closed form for f = 4h.
    assert gpt_cost.flops_per_token(args, S) == pytest.approx(72 * L * h * h * (1 + S / (6 * h) + V / (12 * h * L)))
    assert main(["flops", "--model", "gpt-126m", "--seq-len", "2048"]) == 0
    assert f"model FLOPs per sequence: {S * (6 * n_matmul + 12 * L * h * S):.4e}" in capsys.readouterr().out


def test_tied_embeddings_are_one_parameter_and_the_last_pipeline_stage_holds_a_copy():
    from llamatron.parallel.memory import parameter_counts
    from llamatron.parallel.pipeline import split_stage, tied_parameters

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(GPT_SIZES["gpt-debug"], n_layers=4))
    names = [n for n, _ in model.named_parameters()]
    assert "embeddings.tok.weight" in names and not any(n.startswith("head.") for n in names)
    stages = [split_stage(model, i, 4) for i in range(4)]
    # The last stage's copy has the one-process name (checkpoints as one process's); no position table.
    last = {n for n, _ in stages[3].named_parameters()}
    block = {n for n in names if n.startswith("layers.3.")}
    assert last == {"embeddings.tok.weight", "norm.weight", "norm.bias"} | block
    assert stages[0].embeddings.pos is not None and stages[0].head is None
    tok = [s.embeddings.tok.weight for s in (stages[0], stages[3])]
    assert [tied_parameters([s]) for s in stages] == [tok[:1], [], [], tok[1:]]
    # The memory estimate counts the copy on the last stage.
    counts, per_block = parameter_counts(model.args), sum(p.numel() for p in model.layers["0"].parameters())
    ends = [sum(p.numel() for p in s.parameters()) - per_block for s in (stages[0], stages[3])]
    assert ends == [counts.first, counts.last + counts.tied] and counts.ends(4) == max(ends)
    # The stages one after the other compute the whole model: the last one does not embed its input.
    tokens = torch.randint(0, 512, (2, 16))
    h = tokens
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)
    untied = GPT(dataclasses.replace(GPT_SIZES["gpt-debug"], tie_embeddings=False))
    assert split_stage(untied, 1, 2).head.proj is not None and split_stage(untied, 1, 2).embeddings is None
    assert tied_parameters([split_stage(untied, 1, 2)]) == []


def test_grad_norm_counts_a_tied_copy_once_and_clips_it_too():
    """Single-process arithmetic of `clip_grad_norm_` with the last pipeline stage's copy of a tied
    weight among the parameters: its gradient (equal to the first stage's) is clipped, not counted."""
    from llamatron.parallel.reduce import clip_grad_norm_

    tied, copy, other = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    tied.grad, copy.grad, other.grad = torch.tensor([3.0, 0, 0]), torch.tensor([3.0, 0, 0]), torch.tensor([0, 4.0, 0])
    assert clip_grad_norm_([tied, copy, other], 1.0, duplicates=[copy]).item() == pytest.approx(5.0)
    assert tied.grad.tolist() == copy.grad.tolist() == pytest.approx([0.6, 0, 0])
    assert other.grad.tolist() == pytest.approx([0, 0.8, 0])


@pytest.mark.parametrize("tp,padded", [(8, 51200), (2, 50432)])
def test_unpadded_vocabulary_under_tp_says_how_to_pad(tp, padded):
    """GPT-175B's published vocabulary (50,257) divides by no tp > 1: the error gives Megatron's padding
    (a multiple of 128 x tp), and that vocabulary is accepted."""
    message = (rf"'parallel.tp': vocab_size 50257 must be divisible by tp {tp}; pad the vocabulary.* "
               rf"--set model.vocab_size={padded} \(the token ids stay below 50,257")
    with pytest.raises(LlamatronError, match=message):
        load_config("gpt-175b", ['data.train=["x"]', f"parallel.tp={tp}"])
    cfg = load_config("gpt-175b", ['data.train=["x"]', f"parallel.tp={tp}", f"model.vocab_size={padded}"])
    assert resolve_model(cfg.model)[1].vocab_size == padded and padded % (128 * tp) == 0


def test_position_table_bounds_the_sequence():
    with pytest.raises(LlamatronError, match="model.max_seq_len.*n_positions"):
        load_config(None, ["model.size=gpt-debug", "model.max_seq_len=512", "data.mock=true"])


# --------------------------------------------------------------------------------------------------
# Hugging Face GPT2LMHeadModel, both ways


def _load(path):
    cfg = config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(path)))
    family, args = resolve_model(cfg.model)
    model = family.build(args)
    ckpt.load_model_weights(path, model)
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _random_hf(model):
    # Larger than the default init so that attention is far from uniform and a wrong q/k/v split or a
    # missing transpose moves the logits far more than fp32 noise.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_import_matches_transformers_and_export_round_trips(tied, tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512, n_inner=96,
                                  tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = _random_hf(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # several shards + an index
    imported = convert.convert(tmp_path / "hf", tmp_path / "ckpt", "hf", "llamatron", progress=False)
    model = _load(imported)
    assert model.args.tie_embeddings is tied and model.args.ffn_dim == 96
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        assert _rel(model(tokens), want) < 1e-5

    exported = convert.convert(imported, tmp_path / "out", "llamatron", "hf", progress=False)
    names = set(json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"])
    assert ("lm_head.weight" in names) is not tied and "transformer.h.1.attn.c_attn.weight" in names
    back = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, want)
    again = _load(convert.import_hf(exported, tmp_path / "again", progress=False))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_gpt2_unsupported_config_is_one_line(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, activation_function="relu")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(LlamatronError, match=r"config.json: activation_function 'relu' is not supported"):
        convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)


# --------------------------------------------------------------------------------------------------
# LLaMA-2: HF (rope theta 10,000, no scaling) and Meta


def test_llama2_hf_parity_and_round_trip(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                                   num_hidden_layers=2, vocab_size=32000, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    hf = _random_hf(transformers.LlamaForCausalLM(cfg))
    hf.save_pretrained(tmp_path / "hf")
    imported = convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model = _load(imported)
    assert (model.args.rope_theta, model.args.rope_scaling_factor, model.args.vocab_size) == (10000.0, 0.0, 32000)
    tokens = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(tokens).logits
        assert _rel(model(tokens), want) < 1e-5

    exported = convert.export_hf(imported, tmp_path / "out", progress=False)
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_scaling"] is None and config["rope_theta"] == 10000.0
    back = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, want)
    again = _load(convert.import_hf(exported, tmp_path / "again", progress=False))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_meta_llama2_consolidated_import_is_bit_exact(tmp_path):
    """Llama 2's params.json (no rope_theta, vocab_size -1) and fairscale's split: the embedding by
    columns, output and column-parallel layers by rows, wo/w2 by columns, norms replicated."""
    src = tmp_path / "llama-2"
    src.mkdir()
    params = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (src / "params.json").write_text(json.dumps(params))
    args = dataclasses.replace(registry.get("llama2-7b").args, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                               vocab_size=320, ffn_dim=llama_ffn_dim(64, 32, None))
    model = Transformer(args)
    model.init_weights(seed=3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(2):
        shard = {}
        for name, t in sd.items():
            dim = (None if name.endswith("norm.weight") else 1 if name.endswith(
                ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")) else 0)
            shard[name] = t if dim is None else t.chunk(2, dim=dim)[i].clone()
        shard["rope.freqs"] = torch.zeros(16)  # Meta's checkpoints carry it; it is recomputed
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    out = convert.convert(src, tmp_path / "ckpt", "meta", "llamatron", progress=False)
    got = _load(out)
    assert got.args == dataclasses.replace(args, max_seq_len=4096)
    for k, v in sd.items():
        assert torch.equal(got.state_dict()[k], v), k


# --------------------------------------------------------------------------------------------------
# Training on the embedded corpus, SentencePiece tokenizer


def test_tiny_gpt_trains_on_the_corpus_with_sentencepiece(tmp_path):
    import gzip

    import sentencepiece as spm

    from llamatron.data.corpus import write_default_corpus
    from llamatron.data.preprocess import preprocess
    from llamatron.train.trainer import train

    corpus = write_default_corpus(tmp_path / "json")
    with gzip.open(corpus["train"][0], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:300]
    # Pax's tokenizer's kind (BPE, byte fallback, EOS 1, no BOS, pad 0), shrunk to 512 pieces.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2, num_threads=1)
    tok = str(tmp_path / "sp.model")
    for split in ("train", "valid"):
        preprocess([str(corpus[split][0])], str(tmp_path / split), tok)  # one shard is plenty
    cfg = load_config(None, [
        "model.size=gpt-debug", "model.max_seq_len=64", f"data.tokenizer={tok}",
        f"data.train=[\"{tmp_path / 'train_text_document'}\"]", f"data.valid={tmp_path / 'valid_text_document'}",
        "data.seq_len=64", "train.steps=40", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.device=cpu", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=4", "eval.every=40",
        "eval.samples=16", "checkpoint.enabled=false", f"train.out_dir={tmp_path / 'run'}",
    ])
    train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    val = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    assert val[0] == pytest.approx(6.24, abs=0.2)  # ln 512: an untrained model
    assert val[40] < val[0] - 0.5, val  # observed 6.19 -> 5.13


def test_gpt2_names_both_ways():
    from llamatron.models.gpt import hf as gpt_hf

    args = GPT_SIZES["gpt-debug"]
    model = GPT(args)
    names = [n for n, _ in model.named_parameters()]
    groups = gpt_hf.hf_groups(names, args)
    # q, k, v weights and biases make two c_attn tensors per block; every other parameter one tensor.
    assert len(groups) == len(names) - 4 * args.n_layers
    back = {n for g in groups for n in gpt_hf.llamatron_names(gpt_hf.hf_name(g[0]), args)}
    assert back == set(names)
    # The original gpt2 upload: no "transformer." prefix, causal-mask buffers beside the weights.
    assert gpt_hf.llamatron_names("h.1.attn.c_attn.bias", args) == [
        "layers.1.attention.wq.bias", "layers.1.attention.wk.bias", "layers.1.attention.wv.bias"]
    assert gpt_hf.llamatron_names("wte.weight", args) == ["embeddings.tok.weight"]
    assert gpt_hf.hf_ignored("h.0.attn.bias") and gpt_hf.hf_ignored("transformer.h.3.attn.masked_bias")
    assert not gpt_hf.hf_ignored("transformer.h.0.attn.c_attn.bias")
    assert gpt_hf.hf_ignored("lm_head.weight", args)
    assert not gpt_hf.hf_ignored("lm_head.weight", dataclasses.replace(args, tie_embeddings=False))
