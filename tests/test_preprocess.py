import gzip
import json

import numpy as np
import pytest

from llamatron.data import preprocess as pp
from llamatron.data.indexed import IndexedDataset
from llamatron.errors import LlamatronError
from llamatron.tokenizer import load_tokenizer

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog.", "title": "Fox"},
    {"text": "", "title": "Empty text"},  # tokenizes to nothing: dropped and counted
    {"text": "Ünïcödé, 日本語, emoji 🎉 and\ttabs\n\nnew paragraphs.", "title": ""},
    {"text": "def f(x):\n    return x ** 2  # <|eot_id|> is plain text here\n", "title": "Code"},
    {"text": " " * 30, "title": "Spaces"},
] + [{"text": f"Document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1), "title": f"T{i}"} for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("llama3")


def _jsonl(docs) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n" for d in docs)


@pytest.fixture
def corpus_gz(tmp_path):
    path = tmp_path / "in" / "c4-train.00000-of-00001.json.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(_jsonl(DOCS)))
    return path


def _outputs(directory):
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name or ".idx" in p.name)


def _sequences(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_tokens_equal_encode_of_each_document(tmp_path, corpus_gz, tok):
    stats = pp.preprocess([str(corpus_gz)], str(tmp_path / "out" / "c4"), progress=False)
    ds, seqs = _sequences(tmp_path / "out" / "c4_text_document")
    expected = [tok.encode(d["text"]) for d in DOCS if d["text"]]
    assert seqs == expected
    assert ds.dtype == np.int32  # vocab 128,256 >= 65,500
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))
    assert stats["documents"] == len(expected) == len(DOCS) - 1
    assert stats["dropped_empty"] == 1 and stats["input_documents"] == len(DOCS)
    assert stats["tokens"] == sum(map(len, expected)) == ds.num_tokens
    assert stats["prefixes"] == {"text": str(tmp_path / "out" / "c4_text_document")}
    assert stats["paths"] == [str(tmp_path / "out" / f"c4_text_document.{e}") for e in ("bin", "idx")]
    assert stats["tokens_per_s"] > 0
    assert _outputs(tmp_path / "out") == ["c4_text_document.bin", "c4_text_document.idx"]


def test_output_identical_for_1_and_3_workers(tmp_path, corpus_gz, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 500)  # many small batches, so order across workers matters
    pp.preprocess([str(corpus_gz)], str(tmp_path / "w1"), workers=1, progress=False)
    stats = pp.preprocess([str(corpus_gz), str(corpus_gz)], str(tmp_path / "w3x2"), workers=3, progress=False)
    pp.preprocess([str(corpus_gz), str(corpus_gz)], str(tmp_path / "w1x2"), workers=1, progress=False)
    assert stats["documents"] == 2 * (len(DOCS) - 1)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w3x2_text_document.{ext}").read_bytes() == (tmp_path / f"w1x2_text_document.{ext}").read_bytes()
    _, one = _sequences(tmp_path / "w1_text_document")
    _, two = _sequences(tmp_path / "w3x2_text_document")
    assert two == one + one


def test_batch_size_does_not_change_output(tmp_path, corpus_gz, monkeypatch):
    pp.preprocess([str(corpus_gz)], str(tmp_path / "big"), progress=False)
    monkeypatch.setattr(pp, "BATCH_BYTES", 7)  # smaller than any line: lines assembled from parts
    pp.preprocess([str(corpus_gz)], str(tmp_path / "tiny"), progress=False)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"big_text_document.{ext}").read_bytes() == (tmp_path / f"tiny_text_document.{ext}").read_bytes()


def test_append_eod(tmp_path, corpus_gz, tok):
    stats = pp.preprocess([str(corpus_gz)], str(tmp_path / "eod"), append_eod=True, progress=False)
    _, seqs = _sequences(tmp_path / "eod_text_document")
    assert seqs == [tok.encode(d["text"]) + [128001] for d in DOCS if d["text"]]
    assert stats["dropped_empty"] == 1  # an empty document stays dropped, it does not become [EOD]


def test_multi_member_gzip_and_plain_inputs(tmp_path, tok):
    first, second = DOCS[:20], DOCS[20:]
    multi = tmp_path / "multi.json.gz"
    multi.write_bytes(gzip.compress(_jsonl(first)) + gzip.compress(_jsonl(second)))  # like `cat a.gz b.gz`
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(_jsonl(DOCS))
    pp.preprocess([str(multi)], str(tmp_path / "m"), progress=False)
    pp.preprocess([str(plain)], str(tmp_path / "p"), progress=False)
    _, m = _sequences(tmp_path / "m_text_document")
    _, p = _sequences(tmp_path / "p_text_document")
    assert m == p == [tok.encode(d["text"]) for d in DOCS if d["text"]]


def test_several_json_keys(tmp_path, corpus_gz, tok):
    stats = pp.preprocess([str(corpus_gz)], str(tmp_path / "k"), json_keys=("text", "title"), progress=False)
    _, titles = _sequences(tmp_path / "k_title_document")
    assert titles == [tok.encode(d["title"]) for d in DOCS if d["title"]]
    assert stats["per_key"]["title"]["dropped_empty"] == 1 and stats["per_key"]["text"]["dropped_empty"] == 1
    assert [p.rsplit("/", 1)[1] for p in stats["paths"]] == [
        "k_text_document.bin", "k_text_document.idx", "k_title_document.bin", "k_title_document.idx"
    ]  # fmt: skip


def test_small_vocab_writes_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator([d["text"] for d in DOCS] * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl(DOCS))
    pp.preprocess([str(src)], str(tmp_path / "s"), str(tmp_path), append_eod=True, progress=False)
    ds, seqs = _sequences(tmp_path / "s_text_document")
    assert ds.dtype == np.uint16
    eos = hf.token_to_id("</s>")
    assert seqs[0] == hf.encode(DOCS[0]["text"]).ids + [eos]


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _assert_fails_cleanly(tmp_path, inputs, match, workers=1, **kw):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(LlamatronError, match=match) as e:
        pp.preprocess([str(p) for p in inputs], str(out / "x"), workers=workers, progress=False, **kw)
    assert "\n" not in str(e.value)
    assert list(out.iterdir()) == []  # nothing under the real name, and no temporary files either
    return str(e.value)


GOOD = b'{"text": "fine"}\n'


def test_malformed_json_names_file_and_line(tmp_path):
    src = _write(tmp_path, "bad.jsonl", GOOD * 2 + b'{"text": "unterminated}\n' + GOOD)
    _assert_fails_cleanly(tmp_path, [src], r"bad\.jsonl:3: malformed JSON")


def test_malformed_json_in_worker_process(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 64)
    src = _write(tmp_path, "bad.jsonl.gz", gzip.compress(GOOD * 40 + b"[1, 2\n" + GOOD * 40))
    _assert_fails_cleanly(tmp_path, [src], r"bad\.jsonl\.gz:41: malformed JSON", workers=2)


def test_missing_key_names_file_line_and_key(tmp_path):
    src = _write(tmp_path, "nokey.jsonl", GOOD + b'{"txt": "typo"}\n')
    _assert_fails_cleanly(tmp_path, [src], r"nokey\.jsonl:2: no key 'text'")
    src = _write(tmp_path, "notstr.jsonl", b'{"text": null}\n')
    _assert_fails_cleanly(tmp_path, [src], r"notstr\.jsonl:1: key 'text' holds a JSON NoneType, expected a string")
    src = _write(tmp_path, "array.jsonl", b'["text"]\n')
    _assert_fails_cleanly(tmp_path, [src], r"array\.jsonl:1: a JSON list")


def test_non_utf8_names_file_and_line(tmp_path):
    src = _write(tmp_path, "latin1.json.gz", gzip.compress(GOOD * 3 + '{"text": "café"}\n'.encode("latin-1")))
    _assert_fails_cleanly(tmp_path, [src], r"latin1\.json\.gz:4: invalid UTF-8 byte 0xe9")


def test_truncated_gzip_names_file(tmp_path):
    lines = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(3000))
    data = gzip.compress(lines)
    src = _write(tmp_path, "cut.json.gz", data[: len(data) // 2])
    msg = _assert_fails_cleanly(tmp_path, [src], r"cut\.json\.gz: gzip data truncated in member 1, after \d+ decompressed bytes \(in line \d+\)")
    assert "line" in msg
    src = _write(tmp_path, "notgz.json.gz", GOOD)
    _assert_fails_cleanly(tmp_path, [src], r"notgz\.json\.gz: starts with .* not gzip data")


def test_empty_corpus_is_an_error(tmp_path):
    src = _write(tmp_path, "empty.jsonl", b"")
    _assert_fails_cleanly(tmp_path, [src], r"empty\.jsonl: no JSON lines at all")
    src = _write(tmp_path, "blank.jsonl.gz", gzip.compress(b'{"text": ""}\n' * 3))
    _assert_fails_cleanly(tmp_path, [src], r"blank\.jsonl\.gz: 3 documents, all of whose 'text' text tokenizes to zero")


def test_missing_input_and_bad_arguments(tmp_path):
    _assert_fails_cleanly(tmp_path, [tmp_path / "absent.jsonl"], r"absent\.jsonl: no such input file")
    src = _write(tmp_path, "ok.jsonl", GOOD)
    _assert_fails_cleanly(tmp_path, [src], r"workers=0", workers=0)
    _assert_fails_cleanly(tmp_path, [src], r"json_keys", json_keys=())


def test_earlier_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "keep"
    good = _write(tmp_path, "good.jsonl", GOOD * 3)
    pp.preprocess([str(good)], str(out), progress=False)
    before = (tmp_path / "keep_text_document.bin").read_bytes()
    bad = _write(tmp_path, "bad.jsonl", GOOD * 3 + b"{oops\n")
    with pytest.raises(LlamatronError, match=r"bad\.jsonl:4"):
        pp.preprocess([str(good), str(bad)], str(out), progress=False)
    assert (tmp_path / "keep_text_document.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("keep")) == [
        "keep_text_document.bin",
        "keep_text_document.idx",
    ]


def test_lone_surrogate_and_progress_bar(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 100)
    src = _write(tmp_path, "sur.jsonl", b'{"text": "broken \\ud800 pair"}\n' * 5 + GOOD)
    stats = pp.preprocess([str(src), str(src)], str(tmp_path / "s"), progress=True)
    _, seqs = _sequences(tmp_path / "s_text_document")
    assert seqs[0] == tok.encode("broken \ud800 pair")  # tiktoken's replacement, the same as Meta's encode
    assert stats["documents"] == 12
    err = capsys.readouterr().err
    assert "tokenizing" in err and "100%" in err


@pytest.mark.parametrize("workers", [1, 2])
def test_empty_documents_keep_is_megatron_lms_layout(tmp_path, tok, workers):
    """--empty-documents keep (issue 17, 11a): an empty document is a document with no sequence, as
    Megatron-LM's builder records it (document_indices repeats); drop (NeMo, the MLPerf files) drops it.
    The EOD goes only after non-empty documents in both tools."""
    src = _write(tmp_path, "e.jsonl", b'{"text": "one"}\n{"text": ""}\n{"text": "two"}\n{"text": ""}\n')
    stats = pp.preprocess([str(src)], str(tmp_path / "k"), workers=workers, progress=False, append_eod=True,
                          empty_documents="keep")
    ds = IndexedDataset(tmp_path / "k_text_document")
    assert ds.document_indices.tolist() == [0, 1, 1, 2, 2] and stats["dropped_empty"] == 0
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode("one") + [tok.eos_id], tok.encode("two") + [tok.eos_id]]
    pp.preprocess([str(src)], str(tmp_path / "d"), workers=workers, progress=False, append_eod=True)
    dropped = IndexedDataset(tmp_path / "d_text_document")
    assert dropped.document_indices.tolist() == [0, 1, 2]
    assert (tmp_path / "d_text_document.bin").read_bytes() == (tmp_path / "k_text_document.bin").read_bytes()
