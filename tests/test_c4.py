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


def test_truncated_validation_shard_and_damaged_merge(fake_c4, tmp_path):
    v = fake_c4 / "c4-validation.00001-of-00008.json.gz"  # inside the first 12 lines
    good = v.read_bytes()
    v.write_bytes(good[:-12])  # drop the CRC/size trailer and some data
    dst = tmp_path / "d"
    with pytest.raises(LlamatronError, match=rf"{v}: truncated at byte {len(good) - 12}, inside gzip member 1"):
        _run(fake_c4, dst)
    assert not (dst / "c4-validation.en.json.gz").exists()
    assert not (dst / "c4-validation-12-samples.en.json.gz").exists()

    v.write_bytes(good)
    _run(fake_c4, dst)
    merged = dst / "c4-validation.en.json.gz"  # damaged after the merge, its size unchanged: not rebuilt
    data = bytearray(merged.read_bytes())
    first = (fake_c4 / "c4-validation.00000-of-00008.json.gz").stat().st_size
    data[first + len(good) - 8] ^= 0xFF  # the CRC of the second shard's member
    merged.write_bytes(bytes(data))
    (dst / "c4-validation-12-samples.en.json.gz").unlink()
    with pytest.raises(LlamatronError, match=r"c4-validation\.en\.json\.gz: corrupt or truncated gzip data after line"):
        _run(fake_c4, dst)
    assert not (dst / "c4-validation-12-samples.en.json.gz").exists()
    assert [p.name for p in dst.iterdir() if ".tmp" in p.name] == []


def _two_member_shard(src):
    """Shard 3 as two gzip members (`cat a.gz b.gz`), the second decompressing to more than one zlib
    output block: a complete shard of the kind that must merge. Returns (shard, first member's size)."""
    first = gzip.compress(b"".join(_train_lines(3)), mtime=3)
    second = gzip.compress(b'{"text": "' + b"x" * (9 << 20) + b'"}\n', mtime=3)
    shard = src / "c4-train.00003-of-00016.json.gz"
    shard.write_bytes(first + second)
    return shard, len(first)


@pytest.mark.parametrize("cut", ["trailer", "middle"])
def test_truncated_shard_fails_naming_it_and_keeps_the_old_output(fake_c4, tmp_path, cut):
    shard, first = _two_member_shard(fake_c4)
    dst = tmp_path / "d"
    _run(fake_c4, dst)
    merged = dst / "c4-train.en_1.json.gz"
    before = merged.read_bytes()
    assert gzip.decompress(before).count(b"\n") == 7
    data = shard.read_bytes()
    # Without its 8-byte CRC/length trailer the data decompresses completely: only the member's end is missing.
    shard.write_bytes(data[:-8] if cut == "trailer" else data[: first + (len(data) - first) // 2])
    size = shard.stat().st_size
    with pytest.raises(LlamatronError) as e:
        _run(fake_c4, dst)
    assert str(e.value) == (
        f"{shard}: truncated at byte {size}, inside gzip member 2 (from byte {first}; its end or its 8-byte "
        f"CRC/length trailer is missing); expected complete gzip members: download the shard again")
    assert merged.read_bytes() == before  # the complete merge of before is kept, nothing half-written
    assert [p.name for p in dst.iterdir() if ".tmp" in p.name] == []


def test_damaged_or_empty_shard(fake_c4, tmp_path):
    shard = fake_c4 / "c4-train.00006-of-00016.json.gz"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # the length field of the trailer
    shard.write_bytes(bytes(data))
    dst = tmp_path / "d"
    with pytest.raises(LlamatronError, match=rf"{shard}: corrupt gzip data in member 1 \(from byte 0\), between bytes "
                                             r"0 and \d+ \(.*incorrect length check\); expected complete gzip members"):
        _run(fake_c4, dst)
    assert not (dst / "c4-train.en_3.json.gz").exists()
    shard.write_bytes(b"")
    with pytest.raises(LlamatronError, match=rf"{shard}: empty file; expected gzip data"):
        _run(fake_c4, dst)
    assert [p.name for p in dst.iterdir() if ".tmp" in p.name or "en_3" in p.name] == []


def test_parallel_merges_equal_serial_and_fail_alike(fake_c4, tmp_path):
    _run(fake_c4, tmp_path / "serial")
    r = _run(fake_c4, tmp_path / "parallel", workers=3)
    assert len(r["built"]) == 10
    assert {p.name: p.read_bytes() for p in (tmp_path / "parallel").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "serial").iterdir()}
    shard = fake_c4 / "c4-train.00009-of-00016.json.gz"
    shard.write_bytes(shard.read_bytes()[:-8])
    dst = tmp_path / "d"
    with pytest.raises(LlamatronError, match=rf"{shard}: truncated at byte"):
        _run(fake_c4, dst, workers=3)
    assert not (dst / "c4-train.en_4.json.gz").exists()
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
