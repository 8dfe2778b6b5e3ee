"""Zero-shot evaluation: log-likelihood scoring, the built-in Lambada and BoolQ tasks, the lm-eval
adapter, and `llamatron evaluate`.

References: a hand computation from the model's own logits; a bigram model whose answers are known
by construction; transformers and lm-eval's own HF backend on a tiny random LlamaForCausalLM that is
imported into llamatron, and on tiny random llamatron Llama and GPT models exported to Hugging Face
(same weights, fp32).
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from llamatron.cli import main
from llamatron.eval.loglikelihood import encode_pair, greedy_generate, loglikelihoods
from llamatron.eval.tasks import Scorer, get_task, read_jsonl, run_task
from llamatron.models import registry

torch.set_num_threads(1)
CPU = torch.device("cpu")

LAMBADA = [
    {"text": "the cat sat on the mat"},
    {"text": "Question: is the sky blue? yes it is"},
    {"text": "no yes no yes no"},
    {"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z the end"},
]
BOOLQ = [
    {"passage": "The sky is blue.", "question": "is the sky blue", "label": 1},
    {"passage": "Cats sit on mats.", "question": "do cats sit on mats", "label": 0},
    {"passage": "the cat sat on the mat", "question": "did the cat sit", "label": True},
    {"passage": "no yes no", "question": "is it no", "answer": False},  # Google's own files say "answer"
]


def _train_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d["text"] for d in LAMBADA] * 5 + ["Question: Answer: yes no passage"] * 5, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return _train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(tok_path):
    from llamatron.tokenizer import load_tokenizer

    return load_tokenizer(str(tok_path))


@pytest.fixture(scope="module")
def model():
    entry = registry.get("debug")
    m = entry.family.build(entry.args)
    m.init_weights(seed=3)
    return m.eval()


def _hand_score(model, ctx, cont, max_len=None):
    inp = (ctx + cont)[-((max_len or model.args.max_seq_len) + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp]))[0].double(), -1)[-len(cont):]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def _random_requests(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c, x = torch.randint(1, 40, (2,), generator=g).tolist()
        out.append((torch.randint(0, 512, (c,), generator=g).tolist(), torch.randint(0, 512, (x,), generator=g).tolist()))
    return out


def _check_batch_1_and_7_equal_the_hand_scores(model, reqs):
    one = loglikelihoods(model, reqs, 1, CPU)
    seven = loglikelihoods(model, reqs, 7, CPU)
    for (ctx, cont), a, b in zip(reqs, one, seven):
        ll, greedy = _hand_score(model, ctx, cont)
        assert a[0] == pytest.approx(ll, abs=1e-4) and a[1] == greedy
        assert b[0] == pytest.approx(a[0], abs=1e-5) and b[1] == a[1]


def test_loglikelihood_equals_hand_computation_and_batching_changes_nothing(model):
    reqs = _random_requests(9)
    _check_batch_1_and_7_equal_the_hand_scores(model, reqs)


def test_left_truncation_to_the_model_context(model):
    ctx, cont = list(range(1, 301)), [5, 6, 7]  # 303 tokens > max_seq_len 256
    (ll, _), = loglikelihoods(model, [(ctx, cont)], 2, CPU)
    assert ll == pytest.approx(_hand_score(model, ctx, cont)[0], abs=1e-4)
    (short, _), = loglikelihoods(model, [(ctx, cont)], 2, CPU, max_len=16)
    assert short == pytest.approx(_hand_score(model, ctx, cont, max_len=16)[0], abs=1e-4)
    assert abs(short - ll) > 1e-3  # the truncation did change the context
    # A context of 60 positions: padding to a multiple of 8 (64) would pass the last one.
    entry = registry.get("debug")
    m60 = entry.family.build(dataclasses.replace(entry.args, max_seq_len=60))
    m60.load_state_dict(model.state_dict())
    (ll60, _), = loglikelihoods(m60.eval(), [(ctx, cont)], 2, CPU)
    assert ll60 == pytest.approx(_hand_score(model, ctx, cont, max_len=60)[0], abs=1e-4)


def _capacity_glam(seed=3):
    """glam-debug with Pax's capacity routing (factor 2.0) and routers scaled up: peaked, unbalanced
    routing, so that capacity drops second experts in short sequences (checked below)."""
    entry = registry.get("glam-debug")
    m = entry.family.build(entry.args)
    m.init_weights(seed=seed)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.router.weight.mul_(100)
    return m.eval()


def test_glam_capacity_scores_do_not_depend_on_batch_mates_or_padding():
    """With capacity, a padded batch used to change a request's routing twice over: the capacity came
    from the padded length, and padding tokens took expert slots. Each request now routes as it does
    alone and unpadded: batch 1 and batch 7 give the same scores, equal to the unpadded forward's."""
    model = _capacity_glam()
    reqs = _random_requests(9, seed=5)
    _check_batch_1_and_7_equal_the_hand_scores(model, reqs)
    # The routing of these requests does drop assignments (so capacity is what the test exercises).
    with torch.no_grad():
        model(torch.tensor([(reqs[0][0] + reqs[0][1])[:-1]]))
    assert sum(int(m.last_stats[-4]) for m in model.moe_layers()) > 0


class RowCounter(nn.Module):
    """The module protocol, counting the rows each forward runs."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.args, self.rows = model, model.args, 0

    def forward(self, tokens, logits_at=None):
        self.rows += tokens.shape[0]
        return self.inner(tokens, logits_at=logits_at)


def test_choices_after_one_context_share_its_forward(model):
    """A task's choices after one context (single-token continuations: BoolQ's yes / no, a letter)
    share one forward, as lm-eval's HF backend shares them: each scores as it does alone, and the
    forwards run one row per context."""
    g = torch.Generator().manual_seed(4)
    contexts = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (5, 17, 9)]
    reqs = [(ctx, [t]) for ctx in contexts for t in (7, 11, 400)] + _random_requests(4, seed=6)
    counter = RowCounter(model)
    shared = loglikelihoods(counter, reqs, 8, CPU)
    assert counter.rows == 3 + 4  # one batch: a row per context, and the 4 other requests (13 requests)
    for (ctx, cont), (ll, greedy) in zip(reqs, shared):
        alone_ll, alone_greedy = loglikelihoods(model, [(ctx, cont)], 1, CPU)[0]
        assert ll == pytest.approx(alone_ll, abs=1e-5) and greedy == alone_greedy


class FullLogits(nn.Module):
    """The module protocol without `logits_at`: the scorer's full-logits path on the same model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.args = model, model.args

    def forward(self, tokens):
        return self.inner(tokens)


def _family_model(size, seed=3):
    """A debug model of a family with an output layer scaled up (predictions far from uniform, so the
    greedy flags are not decided by rounding); GLaM dropless, so that routing does not depend on a
    batch's padding (capacity grows with the padded length) and a padded row scores as it does alone."""
    entry = registry.get(size)
    args = dataclasses.replace(entry.args, capacity_factor=0.0) if size.startswith("glam") else entry.args
    m = entry.family.build(args)
    m.init_weights(seed=seed)
    with torch.no_grad():
        m.get_parameter(_output_weight(m)).mul_(5)
    return m.eval()


def _output_weight(model):
    """The name of the output layer's weight (tied or not): the last [vocab, dim] parameter."""
    return [n for n, p in model.named_parameters() if p.ndim == 2 and p.shape[0] == model.args.vocab_size][-1]


def _with_greedy_continuations(model, reqs):
    """Every other request's continuation replaced by the model's own greedy tokens (is_greedy true)."""
    out = list(reqs)
    for i in range(0, len(out), 2):
        ctx, cont = out[i]
        out[i] = (ctx, greedy_generate(model, [ctx], len(cont), CPU, use_cache=False)[0])
    return out


@pytest.mark.parametrize("size", ["debug", "gpt-debug", "glam-debug"])
def test_selected_logits_equal_the_full_logits_path(size):
    """`logits_at` (the output layer at the scored positions only) against the full [batch, seq, vocab]
    logits of the same model, per family: the forward's rows, and every request's log-likelihood and
    is_greedy in padded batches of mixed lengths."""
    model = _family_model(size)
    tokens = torch.randint(0, 512, (3, 13), generator=torch.Generator().manual_seed(1))
    at = torch.tensor([[0, 0], [2, 12], [1, 5], [2, 3], [0, 12]])
    with torch.no_grad():
        full, picked = model(tokens), model(tokens, logits_at=at)
    assert picked.shape == (5, 512)
    torch.testing.assert_close(picked, full[at[:, 0], at[:, 1]], rtol=0, atol=1e-5)

    reqs = _with_greedy_continuations(model, _random_requests(11, seed=2))
    fast = loglikelihoods(model, reqs, 4, CPU)
    slow = loglikelihoods(FullLogits(model), reqs, 4, CPU)
    assert sum(g for _, g in slow) >= 6  # the greedy continuations, at least
    for (a, ga), (b, gb) in zip(fast, slow):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    for (ctx, cont), (ll, greedy) in zip(reqs, fast):
        hand_ll, hand_greedy = _hand_score(model, ctx, cont)
        assert ll == pytest.approx(hand_ll, abs=1e-4) and greedy == hand_greedy


def test_compile_is_off_on_the_cpu_and_skips_what_cannot_be_one_graph():
    from llamatron.transforms.compile import compile_for_eval

    model = _family_model("debug")
    reqs = _random_requests(3)
    loglikelihoods(model, reqs, 2, CPU)  # compile None: CUDA only
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.layers.values())
    glam = _family_model("glam-debug")  # MoE at blocks 0 and 2: data-dependent shapes, left eager
    assert compile_for_eval(glam) == 2
    assert [getattr(b, "_compiled_call_impl", None) is not None for b in glam.layers.values()] == [False, True] * 2
    bigram = Bigram([("a", "b")])  # no `layers`: not compiled, scored as ever
    assert compile_for_eval(bigram) == 0
    one = [([97], [98])]
    assert loglikelihoods(bigram, one, 1, CPU, compile=True) == loglikelihoods(bigram, one, 1, CPU)


@pytest.mark.slow
def test_compiled_scoring_equals_eager_without_recompiling():
    """compile=True on the CPU (inductor: ~30 s here): the same scores as eager; one graph serves
    every batch's length (a recompile is an error here), and generation afterwards runs eagerly."""
    eager = _family_model("debug")
    compiled = _family_model("debug")
    reqs = _with_greedy_continuations(eager, _random_requests(12, seed=4))
    want = loglikelihoods(eager, reqs, 4, CPU)
    lengths = {-(-len(c + x) // 8) for c, x in reqs}
    assert len(lengths) >= 3  # batches of several padded lengths
    first = loglikelihoods(compiled, reqs[:4], 4, CPU, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = loglikelihoods(compiled, reqs, 4, CPU, compile=True)
        prompts = [c for c, _ in reqs[:3]]
        assert greedy_generate(compiled, prompts, 4, CPU) == greedy_generate(eager, prompts, 4, CPU)
    assert all(b._compiled_call_impl is not None for b in compiled.layers.values())
    for (a, ga), (b, gb) in zip(want[:4] + want, first + got):
        assert b == pytest.approx(a, abs=1e-5) and ga == gb


def test_encode_pair_moves_trailing_space_and_uses_prefix_for_empty_context(tok):
    ctx, cont = encode_pair(tok, "the cat ", "sat", tok.bos_id)
    assert ctx == tok.encode("the cat") and ctx + cont == tok.encode("the cat sat")
    assert encode_pair(tok, "", " yes", tok.bos_id) == ([tok.bos_id], tok.encode(" yes"))


# -- known answers: a bigram model --------------------------------------------------------------

@dataclass
class _Args:
    vocab_size: int = 128
    max_seq_len: int = 64


class Bigram(nn.Module):
    """logits[t] = table[token t]: a model of the module protocol whose predictions are set by hand."""

    def __init__(self, pairs):
        super().__init__()
        self.args = _Args()
        self.table = nn.Embedding(128, 128)
        with torch.no_grad():
            self.table.weight.zero_()
            for a, b in pairs:
                self.table.weight[ord(a), ord(b)] = 10.0

    def forward(self, tokens):
        return self.table(tokens)


class Chars:
    """One token per ASCII character."""
    name, vocab_size, bos_id, eos_id = "chars", 128, 2, 3

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_known_answers_lambada_and_boolq():
    # After "...t": " ", then "s", "a", "t": "the cat sat" is predicted, "the cat dog" is not.
    m = Bigram([("t", " "), (" ", "s"), ("s", "a"), ("a", "t"), (":", " "), ("y", "e"), ("e", "s")])
    scorer = Scorer(m, Chars(), batch_size=3, device=CPU)
    docs = [{"text": "the cat sat"}, {"text": "the cat dog"}, {"text": "a cat sat"}]
    r = run_task(get_task("lambada"), docs, scorer)
    assert [it["acc"] for it in r["items"]] == [1.0, 0.0, 1.0]
    assert r["metrics"]["acc"]["value"] == pytest.approx(2 / 3)
    # Brute force: the target log-likelihood from the bigram table itself.
    logp = torch.log_softmax(m.table.weight.double(), -1)
    ll = sum(logp[ord(a), ord(b)].item() for a, b in zip("t sa", " sat"))
    assert r["items"][0]["perplexity"] == pytest.approx(ll, abs=1e-5)
    want_ppl = math.exp(-sum(it["perplexity"] for it in r["items"]) / 3)
    assert r["metrics"]["perplexity"]["value"] == pytest.approx(want_ppl)
    # BoolQ: " yes" is the bigram path after ":" (' ' then 'y' is unset, but y->e->s beats n->o), so
    # the model says yes everywhere: right on yes-items, wrong on no-items.
    q = [{"passage": "p", "question": "q", "label": 1}, {"passage": "p", "question": "q", "label": 0},
         {"passage": "p", "question": "q", "answer": True}]
    r = run_task(get_task("boolq"), q, scorer)
    assert [it["acc"] for it in r["items"]] == [1.0, 0.0, 1.0]
    assert r["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def test_pax_prompts():
    lam = get_task("lambada").requests({"text": "\u201chello\u201d he said \u2018bye\u2019"}, "pax")
    assert lam == [('"hello" he said', " 'bye'")]
    ctx = get_task("boolq").requests({"passage": "P", "question": "q"}, "pax")[0][0]
    assert ctx == "P\nquestion: q?\nanswer:"


def test_greedy_generate_batches_like_single():
    m = Bigram([("a", "b"), ("b", "c"), ("c", "a"), ("x", "y")])
    prompts = [[ord("a")], [ord("x"), ord("x")], [ord("c")]]
    out = greedy_generate(m, prompts, 5, CPU, stop=lambda t: chr(t[-1]) == "a")
    assert ["".join(map(chr, o)) for o in out] == ["bca", "y" + chr(0) * 4, "a"]
    for p, o in zip(prompts, out):
        assert greedy_generate(m, [p], 5, CPU, stop=lambda t: chr(t[-1]) == "a")[0] == o


# -- reading data -------------------------------------------------------------------------------

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    from llamatron.errors import LlamatronError

    with pytest.raises(LlamatronError, match="no such data file"):
        read_jsonl(tmp_path / "none.jsonl", ("text",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LlamatronError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad, ("text",))
    bad.write_text('{"passage": "p", "question": "q", "label": 0, "text": "a"}\n\n{"passage": "p", "question": "q"}\n')
    with pytest.raises(LlamatronError, match=r"bad.jsonl:3: no field 'label' or 'answer'"):
        read_jsonl(bad, ("passage", "question", ("label", "answer")))
    assert len(read_jsonl(bad, ("text",), limit=1)) == 1
    bad.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(LlamatronError, match=r"bad.jsonl:2: not UTF-8"):
        read_jsonl(bad, ("text",))


# -- transformers and lm-eval ---------------------------------------------------------------------

def _missing(module):
    return importlib.util.find_spec(module) is None


needs_hf = pytest.mark.skipif(_missing("transformers") or _missing("lm_eval"),
                              reason="needs transformers and lm-eval (the test extra: pip install -e '.[test]')")


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tok_path):
    """A tiny random LlamaForCausalLM, its tokenizer, and its import as a llamatron checkpoint."""
    import transformers

    from llamatron import convert
    from llamatron.evaluate import load_model

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=512, max_position_embeddings=256,
                                   rope_theta=500000.0, tie_word_embeddings=False,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.05) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "hf")
    ckpt = convert.import_hf(root / "hf", root / "ckpt", progress=False)
    model, precision = load_model(ckpt, CPU)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<s>", eos_token="</s>")
    return types.SimpleNamespace(model=hf_model, tok=hf_tok, ckpt=ckpt, lt=model, precision=precision, root=root)


def _instances(pairs):
    return [types.SimpleNamespace(args=p) for p in pairs]


@needs_hf
def test_imported_hf_model_matches_lm_eval_hf_backend(hf, tok):
    """lm-eval's own HF backend on the transformers model vs llamatron's scorer on the import."""
    from lm_eval.models.huggingface import HFLM

    pairs = [r for task, docs in (("lambada", LAMBADA), ("boolq", BOOLQ))
             for d in docs for r in get_task(task).requests(d, "harness")]
    ref = HFLM(pretrained=hf.model, tokenizer=hf.tok, batch_size=3, device="cpu").loglikelihood(
        _instances(pairs), disable_tqdm=True)
    ours = Scorer(hf.lt, tok, batch_size=5, device=CPU)(pairs)
    for (a, ga), (b, gb) in zip(ref, ours):
        assert abs(b - a) < 1e-5 and ga == gb


@pytest.fixture(scope="module", params=["debug", "gpt-debug"], ids=["llama", "gpt2"])
def exported(request, tmp_path_factory, tok_path):
    """A tiny random llamatron model (llama or GPT family) saved as a llamatron checkpoint, exported with
    `llamatron convert --from llamatron --to hf`, and the export loaded by transformers. The weights are
    larger than the family's own init, so that attention is far from uniform and a wrong mapping (q/k
    permutation, GPT-2's fused qkv and transposed Conv1D) moves the scores far more than fp32 noise."""
    import transformers

    from llamatron import convert

    entry = registry.get(request.param)
    model = entry.family.build(entry.args)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp(request.param)
    specs = [convert.TensorSpec(n, tuple(p.shape), p.dtype, lambda p=p: p.detach())
             for n, p in model.named_parameters()]
    ckpt = convert.write_llamatron_checkpoint(root / "ckpt", specs, entry.args, "a random model", progress=False)
    assert main(["convert", "--from", "llamatron", "--to", "hf", str(ckpt), str(root / "hf")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<s>", eos_token="</s>")
    params = {n: p.detach() for n, p in model.named_parameters()}
    return types.SimpleNamespace(ckpt=ckpt, model=hf_model, tok=hf_tok, family=entry.family.name, root=root,
                                 params=params, args=entry.args)


@needs_hf
def test_in_memory_hf_tensors_are_the_exported_ones(exported):
    """`convert.hf_state_dict` (the benchmark's HF twin) gives exactly the tensors `convert --to hf` writes."""
    from safetensors.torch import load_file

    from llamatron.convert import hf_state_dict

    written = {k: v for f in sorted((exported.root / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    ours = hf_state_dict(exported.params, exported.args)
    assert sorted(ours) == sorted(written)
    for name, t in written.items():
        assert torch.equal(ours[name], t), name


@needs_hf
def test_exported_model_matches_lm_eval_hf_backend(exported, tok, data, tmp_path, monkeypatch):
    """llamatron checkpoint -> `convert --to hf` -> lm-eval running its own HF backend on the export,
    against llamatron's scorer on the checkpoint as `llamatron evaluate` loads it: every Lambada and
    BoolQ request's log-likelihood (1e-4 relative, fp32) and is_greedy, and lm-eval's own accuracies
    (`simple_evaluate` on the local task YAMLs of the same items) equal the built-in tasks'."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamatron.evaluate import load_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    assert type(exported.model).__name__ == {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel"}[exported.family]
    ref = HFLM(pretrained=exported.model, tokenizer=exported.tok, batch_size=3, device="cpu")
    model, precision = load_model(exported.ckpt, CPU)
    scorer = Scorer(model, tok, batch_size=5, device=CPU, precision=precision)
    docs = {"lambada": LAMBADA, "boolq": BOOLQ}
    pairs = [r for task, items in docs.items() for d in items for r in get_task(task).requests(d, "harness")]
    for (a, ga), (b, gb) in zip(ref.loglikelihood(_instances(pairs), disable_tqdm=True), scorer(pairs)):
        assert b == pytest.approx(a, rel=1e-4) and ga == gb
    theirs = lm_eval.simple_evaluate(model=ref, tasks=["lambada_local", "boolq_local"], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(data), include_defaults=False),
                                     verbosity="ERROR")["results"]
    ours = {task: run_task(get_task(task), items, scorer)["metrics"] for task, items in docs.items()}
    for task in docs:
        assert ours[task]["acc"]["value"] == theirs[f"{task}_local"]["acc,none"], task
    assert ours["lambada"]["perplexity"]["value"] == pytest.approx(theirs["lambada_local"]["perplexity,none"], rel=1e-4)


@needs_hf
def test_adapter_rolling_and_generation_match_hf(hf, tok):
    from lm_eval.models.huggingface import HFLM

    from llamatron.eval.harness import LlamatronLM

    ours = LlamatronLM(model=hf.lt, tokenizer=tok, batch_size=2, device=CPU, max_length=16)
    ref = HFLM(pretrained=hf.model, tokenizer=hf.tok, batch_size=2, device="cpu", max_length=16)
    texts = _instances([(d["text"],) for d in LAMBADA])  # longer than 16 tokens: several windows
    for a, b in zip(ref.loglikelihood_rolling(texts, disable_tqdm=True), ours.loglikelihood_rolling(texts)):
        assert b == pytest.approx(a, rel=1e-4)
    gen = _instances([("the cat", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
                      ("no yes", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})])
    want = ref.generate_until(gen, disable_tqdm=True)
    assert ours.generate_until(gen) == want
    recompute = LlamatronLM(model=hf.lt, tokenizer=tok, batch_size=2, device=CPU, max_length=16, kv_cache="false")
    assert recompute.generate_until(gen) == want
    # The same greedy tokens as transformers' generate (both through a KV cache, and recomputing).
    prompt = tok.encode("Question: is the sky")
    want = hf.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_generate(hf.lt, [prompt], 8, CPU) == [want]
    assert greedy_generate(hf.lt, [prompt], 8, CPU, use_cache=False) == [want]


@needs_hf
def test_adapter_registered_and_built_from_a_checkpoint(hf, tok_path, tok):
    """lm-eval's own model registry and arg-string construction: `llamatron` loads the checkpoint."""
    from lm_eval.api.registry import get_model

    from llamatron.eval.harness import LlamatronLM

    cls = get_model("llamatron")
    assert cls is LlamatronLM
    lm = cls.create_from_arg_string(f"checkpoint={hf.ckpt},tokenizer={tok_path},batch_size=2,device=cpu")
    pairs = [("the cat", " sat"), ("", " yes"), ("Question: is the sky blue?\nAnswer:", " no")]
    want = Scorer(hf.lt, tok, batch_size=1, device=CPU)(pairs)
    assert lm.loglikelihood(_instances(pairs)) == pytest.approx(want, abs=1e-6)


def _write_harness_tasks(root, lam_file, boolq_file):
    (root / "lambada_local.yaml").write_text(f"""task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {lam_file}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "boolq_local.yaml").write_text(f"""task: boolq_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {boolq_file}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "lambada.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LAMBADA))
    # The harness's boolq reads an integer label.
    rows = [{"passage": d["passage"], "question": d["question"], "label": int(bool(d.get("label", d.get("answer"))))}
            for d in BOOLQ]
    (root / "boolq.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))
    _write_harness_tasks(root, root / "lambada.jsonl", root / "boolq.jsonl")
    return root


@needs_hf
def test_cli_evaluate_builtin_and_harness_agree(hf, tok_path, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    out = tmp_path / "results.json"
    code = main(["evaluate", "--checkpoint", str(hf.ckpt), "--tokenizer", str(tok_path), "--data-dir", str(data),
                 "--tasks", "lambada,boolq,harness:lambada_local,harness:boolq_local", "--include-path", str(data),
                 "--only-include-path", "--bootstrap-iters", "10", "--batch-size", "3", "--device", "cpu",
                 "--no-compile", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "harness:boolq_local" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    for ours, theirs in (("lambada", "harness:lambada_local"), ("boolq", "harness:boolq_local")):
        assert res[ours]["count"] == res[theirs]["count"] == 4
        for metric, m in res[ours]["metrics"].items():
            assert m["value"] == pytest.approx(res[theirs]["metrics"][metric]["value"], rel=1e-6), (ours, metric)
    assert res["boolq"]["metrics"]["acc"]["stderr"] == pytest.approx(res["harness:boolq_local"]["metrics"]["acc"]["stderr"])
    assert not list(tmp_path.glob(".results.json.tmp*"))


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]


@needs_hf
def test_cli_errors(hf, tok_path, data, tmp_path, capsys):
    base = ["evaluate", "--checkpoint", str(hf.ckpt), "--tokenizer", str(tok_path), "--device", "cpu"]
    _one_line_error(capsys, base + ["--tasks", "lambada", "--data-dir", str(tmp_path)], "lambada.jsonl", "no such")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"txt": "a b"}\n')
    _one_line_error(capsys, base + ["--tasks", "lambada", "--task-file", f"lambada={bad}"], "bad.jsonl:2", "'text'")
    bad.write_text('{"text": "a b"}\nnot json\n')
    _one_line_error(capsys, base + ["--tasks", "lambada", "--task-file", f"lambada={bad}"], "bad.jsonl:2", "JSON")
    _one_line_error(capsys, base + ["--tasks", "lambda", "--data-dir", str(data)], "unknown task 'lambda'")
    _one_line_error(capsys, base + ["--tasks", "harness:nope", "--include-path", str(data), "--only-include-path"],
                    "harness:nope")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "none"), "--tasks", "lambada",
                             "--data-dir", str(data)], "none")


# -- during training (eval.tasks) ----------------------------------------------------------------

def _train_config(tmp_path, tok_path, data, out_dir):
    cfg = tmp_path / "zs.toml"
    cfg.write_text(f"""
[model]
size = "debug"
[data]
mock = true
seq_len = 32
tokenizer = "{tok_path}"
[train]
steps = 1
global_batch_size = 4
micro_batch_size = 2
device = "cpu"
out_dir = "{out_dir}"
[checkpoint]
enabled = false
[eval]
samples = 0
tasks = ["lambada={data / 'lambada.jsonl'}", "boolq={data / 'boolq.jsonl'}"]
tasks_batch_size = 3
""")
    return cfg


def _zero_shot_rows(out_dir):
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: {k: v for k, v in r.items() if "/" in k} for r in rows if r["kind"] == "zero_shot"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_path, data):
    from llamatron.config import load_config
    from llamatron.train.trainer import train

    tmp = tmp_path_factory.mktemp("zs")
    train(load_config(str(_train_config(tmp, tok_path, data, tmp / "run"))))
    return tmp / "run"


def test_training_scores_zero_shot_tasks_at_the_validation_cadence(trained, tok, data):
    rows = _zero_shot_rows(trained)
    assert sorted(rows) == [0, 1]  # before the first step and at the end
    assert set(rows[0]) == {"lambada/acc", "lambada/perplexity", "boolq/acc"}
    # Step 0 is the run's initial model: the same numbers as scoring it directly.
    from llamatron.config import load_config

    cfg = load_config(str(_train_config(trained.parent, tok.path, data, trained)))
    entry = registry.get("debug")
    m = entry.family.build(entry.args)
    m.init_weights(seed=cfg.train.seed)
    r = run_task(get_task("lambada"), LAMBADA, Scorer(m.eval(), tok, 2, CPU))
    assert rows[0]["lambada/perplexity"] == pytest.approx(r["metrics"]["perplexity"]["value"], rel=1e-5)


def test_eval_tasks_config_errors(tmp_path, tok_path, data, capsys):
    from llamatron.config import load_config
    from llamatron.errors import LlamatronError

    cfg = str(_train_config(tmp_path, tok_path, data, tmp_path / "run"))
    with pytest.raises(LlamatronError, match="eval.tasks"):
        load_config(cfg, ["eval.tasks=[lambada]"])
    _one_line_error(capsys, ["train", "--config", cfg, "--set", f"eval.tasks=[lambada={tmp_path / 'no.jsonl'}]"],
                    "no.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.tp=2", "parallel.dp_shard=1"]],
                         ids=["fsdp2", "tp2"])
def test_distributed_zero_shot_equals_single_process(layout, trained, tok_path, data, tmp_path):
    out_dir = tmp_path / "run"
    cfg = _train_config(tmp_path, tok_path, data, out_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llamatron",
           "train", "--config", str(cfg)] + [w for o in layout for w in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got, want = _zero_shot_rows(out_dir), _zero_shot_rows(trained)
    assert sorted(got) == sorted(want)
    for step in want:
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4), (step, k)


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--tp", "2"]], ids=["fsdp2", "tp2"])
def test_cli_evaluate_under_torchrun_equals_single_process(extra, hf, tok_path, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["evaluate", "--checkpoint", str(hf.ckpt), "--tokenizer", str(tok_path), "--data-dir", str(data),
            "--tasks", "lambada,boolq,harness:boolq_local", "--include-path", str(data), "--only-include-path",
            "--batch-size", "2", "--device", "cpu", "--bootstrap-iters", "0"]
    assert main(args + ["--output", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "HF_DATASETS_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "llamatron", *args, "--output", str(tmp_path / "two.json"),
                           "--nproc-per-node", "2", *extra], capture_output=True, text=True, env=env, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert sorted(one) == sorted(two)
    for task in one:
        for metric, m in one[task]["metrics"].items():
            assert two[task]["metrics"][metric]["value"] == pytest.approx(m["value"], rel=1e-5), (task, metric)


@needs_hf
def test_cli_evaluate_in_fp8_scores_close_to_bf16_and_refuses_several_processes(hf, tok_path, data, tmp_path, capsys):
    """--fp8: the block linears score from FP8 copies (emulated on the CPU), per row or (--fp8
    tensorwise) per tensor: the same items, log perplexity within a few percent of the plain run's and
    not equal to it; with several processes
    it is refused in one line."""
    args = ["evaluate", "--checkpoint", str(hf.ckpt), "--tokenizer", str(tok_path), "--data-dir", str(data),
            "--tasks", "lambada,boolq", "--batch-size", "2", "--device", "cpu", "--no-compile"]
    assert main(args + ["--output", str(tmp_path / "plain.json")]) == 0
    assert main(args + ["--fp8", "--fp8-min-features", "16", "--output", str(tmp_path / "fp8.json")]) == 0
    plain, fp8 = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "fp8.json"))
    assert fp8["lambada"]["count"] == plain["lambada"]["count"] and fp8["boolq"]["count"] == plain["boolq"]["count"]
    a, b = (r["lambada"]["metrics"]["perplexity"]["value"] for r in (plain, fp8))
    assert a != b and math.log(b) == pytest.approx(math.log(a), rel=0.05)
    # --fp8 is rowwise; tensorwise (one scale per tensor) rounds otherwise, as close
    assert main(args + ["--fp8", "tensorwise", "--fp8-min-features", "16", "--output", str(tmp_path / "t.json")]) == 0
    c = json.loads((tmp_path / "t.json").read_text())["lambada"]["metrics"]["perplexity"]["value"]
    assert c not in (a, b) and math.log(c) == pytest.approx(math.log(a), rel=0.05)
    capsys.readouterr()
    assert main(args + ["--fp8", "--nproc-per-node", "2"]) == 2
    assert "--fp8: scores in one process only" in capsys.readouterr().err
    assert main(args + ["--fp8", "--fp8-min-features", "100000"]) == 2
    assert "no block linear of at least --fp8-min-features 100000" in capsys.readouterr().err
