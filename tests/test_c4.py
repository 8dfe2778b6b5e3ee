import gzip
import os
from pathlib import Path

import pytest

from llamatron.data.c4 import compress_jsonl, consolidate_c4
from llamatron.errors import LlamatronError


def _train_lines(i):
    return [f'{{"text": "train shard {i} doc {j}", "timestamp": "t", "url": "u"}}\n'.encode() for j in range(3)]


def _valid_lines(i):
    return [f'{{"text": "valid shard {i} doc {j}"}}\n'.encode() for j in range(5)]


@pytest.fixture
def fake_c4(tmp_path):
    """16 train shards (8 merged files of 2) and 8 validation shards of 5 documents each."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"c4-train.{i:05d}-of-00016.json.gz").write_bytes(gzip.compress(b"".join(_train_lines(i)), mtime=i))
    for i in range(8):
        (src / f"c4-validation.{i:05d}-of-00008.json.gz").write_bytes(gzip.compress(b"".join(_valid_lines(i))))
    return src


def _run(src, dst, **kw):
    return consolidate_c4(src, dst, train_shards=16, merged_files=8, valid_documents=12, progress=False, **kw)


def test_merges_bytes_in_numeric_order(fake_c4, tmp_path):
    dst = tmp_path / "dst"
    r = _run(fake_c4, dst)
    assert r["train"] == [str(dst / f"c4-train.en_{k}.json.gz") for k in range(8)]
    for k in range(8):
        merged = (dst / f"c4-train.en_{k}.json.gz").read_bytes()
        shards = [(fake_c4 / f"c4-train.{i:05d}-of-00016.json.gz").read_bytes() for i in (2 * k, 2 * k + 1)]
        assert merged == b"".join(shards)  # byte concatenation: a multi-member gzip
        assert gzip.decompress(merged) == b"".join(_train_lines(2 * k) + _train_lines(2 * k + 1))
    valid = (dst / "c4-validation.en.json.gz").read_bytes()
    assert valid == b"".join((fake_c4 / f"c4-validation.{i:05d}-of-00008.json.gz").read_bytes() for i in range(8))
    all_valid = [line for i in range(8) for line in _valid_lines(i)]
    samples = dst / "c4-validation-12-samples.en.json.gz"
    assert r["valid_samples"] == str(samples) and r["valid_samples_documents"] == 12
    assert gzip.decompress(samples.read_bytes()) == b"".join(all_valid[:12])  # zcat | head -n 12
    assert r["missing"] == [] and len(r["built"]) == 10 and r["skipped"] == []
    assert sorted(p.name for p in dst.iterdir() if ".tmp" in p.name) == []


def test_idempotent_and_rebuilds_when_a_shard_appears(fake_c4, tmp_path):
    dst = tmp_path / "dst"
    late = fake_c4 / "c4-train.00005-of-00016.json.gz"
    late_bytes = late.read_bytes()
    late.unlink()
    with pytest.warns(UserWarning, match="c4-train.en_2.json.gz: 1 of 2 shards missing"):
        r = _run(fake_c4, dst)
    assert r["missing"] == ["c4-train.00005-of-00016.json.gz"]
    assert (dst / "c4-train.en_2.json.gz").read_bytes() == (fake_c4 / "c4-train.00004-of-00016.json.gz").read_bytes()

    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    with pytest.warns(UserWarning):
        again = _run(fake_c4, dst)
    assert again["built"] == [] and len(again["skipped"]) == 10
    assert again["valid_samples_documents"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == mtimes

    late.write_bytes(late_bytes)  # the missing shard is downloaded later: only en_2 is redone
    third = _run(fake_c4, dst)
    assert third["built"] == [str(dst / "c4-train.en_2.json.gz")]
    assert gzip.decompress((dst / "c4-train.en_2.json.gz").read_bytes()).count(b"\n") == 6


def test_fewer_validation_documents_than_asked(fake_c4, tmp_path):
    with pytest.warns(UserWarning, match="only 40 documents, fewer than the 91205"):
        r = consolidate_c4(fake_c4, tmp_path / "d", train_shards=16, merged_files=8, progress=False)
    assert r["valid_samples_documents"] == 40
    assert Path(r["valid_samples"]).name == "c4-validation-91205-samples.en.json.gz"


def test_errors(fake_c4, tmp_path):
    with pytest.raises(LlamatronError, match="train_shards=16, merged_files=5"):
        consolidate_c4(fake_c4, tmp_path / "d", train_shards=16, merged_files=5, progress=False)
    with pytest.raises(LlamatronError, match="nowhere: no such directory"):
        consolidate_c4(tmp_path / "nowhere", tmp_path / "d", progress=False)
    for i in range(8):
        (fake_c4 / f"c4-validation.{i:05d}-of-00008.json.gz").unlink()
    with pytest.warns(UserWarning), pytest.raises(LlamatronError, match="no validation shards"):
        _run(fake_c4, tmp_path / "d")


def test_truncated_validation_gzip(fake_c4, tmp_path):
    v = fake_c4 / "c4-validation.00001-of-00008.json.gz"  # inside the first 12 lines
    v.write_bytes(v.read_bytes()[:-12])  # drop the CRC/size trailer and some data
    dst = tmp_path / "d"
    with pytest.raises(LlamatronError, match=r"c4-validation\.en\.json\.gz: corrupt or truncated gzip data after line"):
        _run(fake_c4, dst)
    assert not (dst / "c4-validation-12-samples.en.json.gz").exists()
    assert [p.name for p in dst.iterdir() if ".tmp" in p.name] == []


def test_compress_jsonl_parallel(tmp_path):
    inputs = []
    for i in range(3):
        p = tmp_path / f"part{i}.jsonl"
        p.write_bytes(b"".join(_train_lines(i)) * (i + 1))
        inputs.append(p)
    outs = compress_jsonl(inputs, workers=2)
    assert outs == [str(p) + ".gz" for p in inputs]
    for p, o in zip(inputs, outs):
        assert gzip.decompress(Path(o).read_bytes()) == p.read_bytes()
        assert p.exists()  # inputs are kept
    mtime = os.stat(outs[0]).st_mtime_ns
    assert compress_jsonl(inputs[:1]) == outs[:1] and os.stat(outs[0]).st_mtime_ns == mtime
    with pytest.raises(LlamatronError, match="missing.jsonl: no such file"):
        compress_jsonl([tmp_path / "missing.jsonl"])
