import json
import random
import shutil

import pytest

from llamatron.errors import LlamatronError
from llamatron.tokenizer import load_tokenizer, meta_pieces

SAMPLES = [
    "Hello, world!",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nand\r\rcarriage\n\n\n",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji 🎉🚀👩‍👩‍👧‍👦 and symbols ∑∫√∞ ≠ ≤ ≥ — – … «»",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != 0: pass\n",
    "numbers 1234567890 3.14159 1e-5 0x1F 12,345,678",
    "I'm sure you'll see they've done what we'd said; DON'T SHOUT, it's fine",
    "<|begin_of_text|><|eot_id|> special tokens as plain text <|end_of_text|>",
    "\u00a0non-breaking\u2003em-space\u3000ideographic\u2028line-sep\u2029para",
    "x" * 1000 + " " * 1000 + "\n" * 100,
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def meta(tok):
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(tok.path)


def test_llama3_sizes_and_special_ids(tok):
    assert tok.name == "llama3"
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,  # HF 3.1 name; llama-models calls it <|step_id|>
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    for name, i in expected.items():
        assert tok.special_tokens[name] == i
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    assert tok.decode([128009]) == "<|eot_id|>"


def test_llama3_aliases_and_cache():
    assert load_tokenizer("llama3.1") is load_tokenizer("LLAMA3")


def test_no_bos_eos_and_special_text_is_ordinary(tok):
    ids = tok.encode("<|begin_of_text|>hello<|eot_id|>")
    assert ids and all(i < 128000 for i in ids)
    assert tok.encode("hello world") == [15339, 1917]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def _random_strings(n, seed=0):
    """Varied strings: words, unicode, digits, contractions, code, runs of several whitespaces."""
    rng = random.Random(seed)
    atoms = [
        "the", "The", "quick", "brown", "fox", "isn't", "WE'LL", "you'd", "naïve", "Straße", "東京", "🙂", "€100",
        "123", "4567", "3.14", "x_y", "def", "()", "{}", "[1, 2]", "==", "->", "//", "#", "'", '"', "\\n", "http://a.b/c?d=e",
        "ação", "ünïcödé", "Ωμέγα", "中文字符", "🤖🤖", "\u0301", "\u200b", "\ufeff",
    ]  # fmt: skip
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", " \t ", "\u00a0", "\u3000", "\r", "\x0b\x0c"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(atoms))
            elif r < 0.9:
                parts.append(rng.choice(spaces))
            else:
                parts.append(rng.choice(spaces) * rng.randint(2, 30))
        out.append("".join(parts))
    return out


def test_matches_llama_models_on_varied_strings(tok, meta):
    strings = SAMPLES + _random_strings(3000)
    for s in strings:
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False), repr(s[:80])
    assert tok.encode_batch(strings) == [meta.encode(s, bos=False, eos=False) for s in strings]


def test_matches_llama_models_on_long_strings(tok, meta):
    rng = random.Random(1)
    prose = " ".join(rng.choice(["alpha", "beta,", "gamma.", "δέλτα", "\n", "42"]) for _ in range(90_000))
    cases = [
        prose,  # > 400k characters: Meta's 400k chunking
        " " * 30_000 + "end",  # a 30k-space run: cut at 25k
        "word " + " " * 60_001 + "x",  # two cuts in one whitespace run
        "a" * 25_000 + " " + "b" * 25_001 + "\n" * 50_000,  # exactly at and just over the limit
        "é" * 26_000 + "\u3000" * 26_000,
        prose[:390_000] + " " * 30_000 + prose[:1000],  # a long run straddling a 400k boundary
    ]
    assert len(cases[0]) > 400_000
    for s in cases:
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False)
        assert tok.decode(tok.encode(s)) == s


def test_meta_pieces_match_meta_splitter(meta):
    for s in ["", "a", " " * 25_000, " " * 25_001, "x" * 75_001 + " " * 3 + "y" * 25_002, "ab " * 20_000 + " " * 50_000]:
        for start in range(0, max(len(s), 1), 400_000):
            chunk = s[start : start + 400_000]
            ours = list(meta_pieces(chunk)) if chunk else []
            theirs = [p for p in meta._split_whitespaces_or_nonwhitespaces(chunk, 25_000)] if chunk else []
            assert ours == theirs


def test_tiktoken_file_by_path(tok, tmp_path):
    path = tmp_path / "my_bpe.model"
    shutil.copy(tok.path, path)
    other = load_tokenizer(str(path))
    assert other.name == str(path)
    assert other.vocab_size == 128256
    assert other.encode(SAMPLES[5]) == tok.encode(SAMPLES[5])
    # a directory holding tokenizer.model is found too
    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    assert load_tokenizer(str(tmp_path)).encode("hi there") == tok.encode("hi there")


TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
] * 50


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_prefix=str(prefix), vocab_size=120, model_type="bpe",
        minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    t = load_tokenizer(str(prefix) + ".model")
    assert type(t).__name__ == "SentencePieceTokenizer"
    assert t.vocab_size == sp.get_piece_size() == 120
    assert (t.bos_id, t.eos_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    text = "The lazy zebra judges python quickly."
    assert t.encode(text) == sp.encode(text)
    assert t.bos_id not in t.encode(text)
    assert t.encode_batch([text, "fox"]) == [sp.encode(text), sp.encode("fox")]
    assert t.decode(t.encode(text)) == text


def _tiny_hf_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(TRAIN_TEXT, trainer)
    # encode() would add <s>; the pipeline must not (NeMo calls tokenize + convert_tokens_to_ids)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    hf.save(str(path))
    return hf


def test_hf_tokenizer_json_file_and_dir(tmp_path):
    hf = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    for t in (load_tokenizer(str(tmp_path / "tokenizer.json")), load_tokenizer(str(tmp_path))):
        assert type(t).__name__ == "HFTokenizer"
        assert t.vocab_size == hf.get_vocab_size(with_added_tokens=True)
        assert (t.bos_id, t.eos_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>"))
        text = "Sphinx of black quartz, judge my vow — ünïcode too."
        assert t.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert t.bos_id not in t.encode(text)
        assert t.encode_batch([text, "dog"]) == [t.encode(text), t.encode("dog")]
        assert t.decode(t.encode(text)) == text


def test_hf_bos_eos_from_tokenizer_config(tmp_path):
    _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "</s>"}, "eos_token": "<s>"}))
    t = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (t.bos_id, t.eos_id) == (1, 0)


def test_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(LlamatronError) as e:
        load_tokenizer(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "expected" in msg and "\n" not in msg


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(LlamatronError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))


def test_unrecognized_and_bad_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(LlamatronError, match="unrecognized tokenizer file"):
        load_tokenizer(str(junk))
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(LlamatronError, match=r"bad\.model:2: bad tiktoken BPE line"):
        load_tokenizer(str(bad))
    gap = tmp_path / "gap.model"
    gap.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(LlamatronError, match="ranks are not 0..1"):
        load_tokenizer(str(gap))


def test_decode_accepts_numpy_rows(tok, tmp_path):
    import numpy as np

    ids = tok.encode("a row of a .bin file")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "a row of a .bin file"
    _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    hf = load_tokenizer(str(tmp_path))
    assert hf.decode(np.array(hf.encode("quick fox"), dtype=np.uint16)) == "quick fox"
