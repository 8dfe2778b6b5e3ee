"""Megatron .bin/.idx reader and writer: byte layout, round trips, merges, and one-line errors."""

import os
import pickle
import struct

import numpy as np
import pytest

from llamatron.data import indexed
from llamatron.data.indexed import DTYPE_CODES, MAGIC, IndexedDataset, IndexedDatasetWriter, token_dtype
from llamatron.errors import LlamatronError


def _random_tokens(rng, dtype, n):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(n).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, n, dtype=dtype)


def _write(prefix, docs, dtype=np.int32):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(doc)
    return IndexedDataset(prefix)


def _files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype_code(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    docs = [_random_tokens(rng, dtype, int(n)) for n in rng.integers(0, 50, 20)]
    ds = _write(tmp_path / "d", docs, dtype)

    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == MAGIC
    assert struct.unpack("<Q", raw[9:17])[0] == 1
    assert raw[17] == code
    assert struct.unpack("<QQ", raw[18:34]) == (len(docs), len(docs) + 1)
    assert len(raw) == 34 + 12 * len(docs) + 8 * (len(docs) + 1)

    assert ds.dtype == dtype
    assert len(ds) == len(docs)
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    expected_ptr = np.concatenate([[0], np.cumsum([len(d) * dtype.itemsize for d in docs])[:-1]])
    assert ds.sequence_pointers.tolist() == expected_ptr.tolist()
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        got = ds.get(i)
        assert got.dtype == dtype
        assert np.array_equal(got, doc)
        if len(doc) > 3:
            assert np.array_equal(ds.get(i, offset=1, length=2), doc[1:3])
    assert (tmp_path / "d.bin").read_bytes() == b"".join(d.tobytes() for d in docs)


def test_multi_sequence_documents(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 1000, int(n)) for n in (3, 5, 7, 2, 4, 6)]
    with IndexedDatasetWriter(tmp_path / "m", np.uint16) as w:
        for s in seqs[:3]:
            w.add_item(s)
        w.end_document()
        w.add_item(seqs[3])
        w.end_document()
        for s in seqs[4:]:
            w.add_item(s)
        w.end_document()
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 6
    assert ds.document_indices.tolist() == [0, 3, 4, 6]
    for i, s in enumerate(seqs):
        assert np.array_equal(ds[i], s)


def test_open_last_document_is_closed_on_finalize(tmp_path):
    with IndexedDatasetWriter(tmp_path / "o", np.int32) as w:
        w.add_document([1, 2])
        w.add_item([3])
    assert IndexedDataset(tmp_path / "o").document_indices.tolist() == [0, 1, 2]


def test_add_index_merges_parts(tmp_path):
    rng = np.random.default_rng(1)
    parts = [[rng.integers(0, 60000, int(n)) for n in rng.integers(1, 30, k)] for k in (4, 7, 1)]
    for p, docs in enumerate(parts):
        _write(tmp_path / f"part{p}", docs, np.uint16)
    with IndexedDatasetWriter(tmp_path / "merged", np.uint16) as w:
        w.add_document([7, 7, 7])
        for p in range(len(parts)):
            w.add_index(tmp_path / f"part{p}")
        w.add_document([9])
    merged = IndexedDataset(tmp_path / "merged")
    flat = [np.array([7, 7, 7])] + [d for docs in parts for d in docs] + [np.array([9])]
    assert len(merged) == len(flat)
    assert merged.document_indices.tolist() == list(range(len(flat) + 1))
    for i, d in enumerate(flat):
        assert np.array_equal(merged[i], d)
    # Merged output is byte-identical to writing the same documents in one go.
    _write(tmp_path / "direct", flat, np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("merged" + ext)).read_bytes() == (tmp_path / ("direct" + ext)).read_bytes()


def test_add_index_with_multi_sequence_documents(tmp_path):
    with IndexedDatasetWriter(tmp_path / "a", np.int32) as w:
        w.add_item([1])
        w.add_item([2, 3])
        w.end_document()
    with IndexedDatasetWriter(tmp_path / "b", np.int32) as w:
        w.add_document([4])
        w.add_index(tmp_path / "a")
    assert IndexedDataset(tmp_path / "b").document_indices.tolist() == [0, 1, 3]


def test_add_index_dtype_mismatch(tmp_path):
    _write(tmp_path / "u16", [[1, 2]], np.uint16)
    with pytest.raises(LlamatronError, match="u16.idx"):
        with IndexedDatasetWriter(tmp_path / "i32", np.int32) as w:
            w.add_index(tmp_path / "u16")
    assert _files(tmp_path) == ["u16.bin", "u16.idx"]


def _good_pair(tmp_path, name="g"):
    _write(tmp_path / name, [np.arange(10), np.arange(5)], np.int32)
    return tmp_path / name


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_error_wrong_magic(tmp_path):
    prefix = _good_pair(tmp_path)
    _patch(tmp_path / "g.idx", 0, b"NOTMAGIC!")
    with pytest.raises(LlamatronError, match=r"g\.idx: bad magic") as e:
        IndexedDataset(prefix)
    assert "\n" not in str(e.value)


def test_error_wrong_version(tmp_path):
    prefix = _good_pair(tmp_path)
    _patch(tmp_path / "g.idx", 9, struct.pack("<Q", 2))
    with pytest.raises(LlamatronError, match=r"g\.idx: index version 2 at byte 9, expected 1"):
        IndexedDataset(prefix)


def test_error_unknown_dtype_code(tmp_path):
    prefix = _good_pair(tmp_path)
    _patch(tmp_path / "g.idx", 17, bytes([9]))
    with pytest.raises(LlamatronError, match=r"g\.idx: unknown dtype code 9"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("keep", [0, 20, 34, 60])
def test_error_truncated_idx(tmp_path, keep):
    prefix = _good_pair(tmp_path)
    raw = (tmp_path / "g.idx").read_bytes()
    (tmp_path / "g.idx").write_bytes(raw[:keep])
    with pytest.raises(LlamatronError, match=r"g\.idx: .*(shorter|truncated)"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("delta", [-4, 4])
def test_error_bin_idx_size_mismatch(tmp_path, delta):
    prefix = _good_pair(tmp_path)
    raw = (tmp_path / "g.bin").read_bytes()
    (tmp_path / "g.bin").write_bytes(raw[:delta] if delta < 0 else raw + b"\0" * delta)
    with pytest.raises(LlamatronError, match=r"g\.bin: size \d+ bytes, but g\.idx describes 60 bytes"):
        IndexedDataset(prefix)


def test_error_pair_from_different_datasets(tmp_path):
    _good_pair(tmp_path, "g")
    _write(tmp_path / "h", [np.arange(3)], np.int32)
    os.replace(tmp_path / "h.idx", tmp_path / "g.idx")
    with pytest.raises(LlamatronError, match=r"g\.bin"):
        IndexedDataset(tmp_path / "g")


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_error_missing_file(tmp_path, missing):
    prefix = _good_pair(tmp_path)
    (tmp_path / ("g" + missing)).unlink()
    with pytest.raises(LlamatronError, match=rf"g\{missing}: no such file"):
        IndexedDataset(prefix)


def test_exception_in_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.int32) as w:
            w.add_document([1, 2, 3])
            assert any(".tmp" in f for f in _files(tmp_path))  # writing really goes to a temp name
            raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_token_out_of_range_for_dtype(tmp_path):
    with pytest.raises(LlamatronError, match=r"x\.bin: sequence 1 holds token ids in \[0, 128255\], outside uint16"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document(np.array([1, 2], dtype=np.int64))
            w.add_document(np.array([0, 128255], dtype=np.int64))
    assert _files(tmp_path) == []


def test_failed_finalize_leaves_no_partial_output(tmp_path, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", failing_replace)
    with pytest.raises(OSError):
        with IndexedDatasetWriter(tmp_path / "x", np.int32) as w:
            w.add_document([1, 2, 3])
    assert _files(tmp_path) == []


def test_failed_write_keeps_previous_pair(tmp_path):
    _write(tmp_path / "x", [[5, 6]], np.int32)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.int32) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("crash mid-write")
    assert {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)} == before


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.int32):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_indices.tolist() == [0]


def test_pickle_reopens_by_prefix(tmp_path):
    ds = _write(tmp_path / "p", [np.arange(100_000)], np.int32)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the 400 kB token file is not copied into the pickle
    again = pickle.loads(blob)
    assert np.array_equal(again[0], ds[0])


def test_token_dtype_rule():
    assert token_dtype(32000) == np.uint16  # Mixtral
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32  # Llama 3.1
