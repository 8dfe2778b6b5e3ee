import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamatron.data.corpus import TIMESTAMP, in_validation, write_default_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, write_default_corpus(out)


def _read(paths):
    docs = []
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def test_files_named_like_c4(corpus):
    out, r = corpus
    assert [Path(p).name for p in r["train"]] == ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
    assert [Path(p).name for p in r["valid"]] == ["c4-validation.00000-of-00001.json.gz"]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in r["train"] + r["valid"])  # no temp files
    assert r["skipped"] is False


def test_c4_format_and_counts(corpus):
    _, r = corpus
    train, valid = _read(r["train"]), _read(r["valid"])
    for d in train + valid:
        assert list(d) == ["text", "timestamp", "url"]
        assert d["timestamp"] == TIMESTAMP
        assert d["url"].startswith("https://docs.python.org/3.")
        assert d["text"].strip()
    assert r["documents"] == {"train": len(train), "valid": len(valid)}
    assert r["chars"] == {"train": sum(len(d["text"]) for d in train), "valid": sum(len(d["text"]) for d in valid)}
    assert r["chars"]["train"] > 1_500_000 and r["chars"]["valid"] > 20_000
    urls = [d["url"] for d in train + valid]
    assert len(set(urls)) == len(urls)  # one document per topic / module, the splits disjoint


def test_sources_topics_and_module_docstrings_only(corpus):
    _, r = corpus
    docs = {d["url"].split("#", 1)[1]: d["text"] for d in _read(r["train"] + r["valid"])}
    from pydoc_data.topics import topics

    assert sum(name in docs for name in topics) == len(topics)
    assert docs["assert"] == topics["assert"].strip()
    assert "module-json.decoder" in docs and docs["module-json.decoder"].startswith("json.decoder\n\nImplementation of JSONDecoder")
    assert "class JSONDecoder(object)\nSimple JSON <https://json.org> decoder" in docs["module-json.decoder"]
    assert "def JSONDecoder.decode(self, s, _w=WHITESPACE.match)" in docs["module-json.decoder"]
    modules = [k[len("module-") :].split(".") for k in docs if k.startswith("module-")]
    skipped = {"test", "tests", "idlelib", "lib2to3", "encodings", "turtledemo"}
    assert [m for m in modules if skipped & set(m) or m[-1].startswith("test_")] == []
    assert ["unittest", "case"] in modules and ["doctest"] in modules  # "test" inside a name is fine


def test_split_follows_title_hash(corpus):
    _, r = corpus
    for split, paths in (("train", r["train"]), ("valid", r["valid"])):
        for d in _read(paths):
            anchor = d["url"].split("#", 1)[1]
            title = "module/" + anchor[len("module-") :] if anchor.startswith("module-") else "topic/" + anchor
            assert in_validation(title, 0.05) == (split == "valid")


def test_idempotent(corpus):
    out, r = corpus
    mtimes = {p: os.stat(p).st_mtime_ns for p in r["train"] + r["valid"]}
    again = write_default_corpus(out)
    assert again["skipped"] is True
    assert {k: again[k] for k in ("train", "valid", "documents", "chars")} == {k: r[k] for k in ("train", "valid", "documents", "chars")}
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes


def test_deterministic_bytes_in_a_fresh_process(corpus, tmp_path):
    out, r = corpus
    code = "import sys; from llamatron.data.corpus import write_default_corpus; write_default_corpus(sys.argv[1], shards=3)"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, start_new_session=True)
    assert (tmp_path / "c4-validation.00000-of-00001.json.gz").read_bytes() == Path(r["valid"][0]).read_bytes()
    three = _read(sorted(tmp_path.glob("c4-train.*-of-00003.json.gz")))
    assert len(three) == r["documents"]["train"]
    assert sorted(d["url"] for d in three) == sorted(d["url"] for d in _read(r["train"]))


def test_bad_arguments(tmp_path):
    from llamatron.errors import LlamatronError

    with pytest.raises(LlamatronError, match="valid_fraction=1.5"):
        write_default_corpus(tmp_path, valid_fraction=1.5)
    with pytest.raises(LlamatronError, match="shards=0"):
        write_default_corpus(tmp_path, shards=0)
