"""Interop with megatron-core (pip install megatron-core==0.16.1, CPU torch is enough):
.bin/.idx files both ways, identical GPTDataset windows and cache files, identical blending."""

import os
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
from megatron.core.datasets import helpers as mhelpers  # noqa: E402
from megatron.core.datasets.blended_dataset import BlendedDataset as MBlendedDataset  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexedDataset  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from llamatron.data import gpt_dataset as G  # noqa: E402
from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class NeMoLikeTokenizer:
    """What megatron-core needs from NeMo's AutoTokenizer: vocab size, eod/pad ids and the
    `unique_identifiers` that end up in the cache description."""

    vocab_size = 32000
    eod = 2
    pad = 0
    unique_identifiers = G.NEMO_TOKENIZER_DESCRIPTION


def _docs(seed, n_docs, max_len=40, vocab=30000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(n)) for n in rng.integers(1, max_len, n_docs)]


def _llamatron_write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def _config(seed, seq_len, blend_per_split, cache):
    # As NeMo's PreTrainingDataModule.gpt_dataset_config builds it for MLPerf.
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend_per_split=blend_per_split,
        path_to_cache=None if cache is None else str(cache),
        tokenizer=NeMoLikeTokenizer(),
        mmap_bin_files=True,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _megatron_split(prefixes, weights, sizes, seed, seq_len, cache, split=0):
    blends = [None, None, None]
    blends[split] = (list(prefixes), weights)
    cfg = _config(seed, seq_len, blends, cache)
    return BlendedMegatronDatasetBuilder(MGPTDataset, sizes, lambda: True, cfg).build()[split]


# -- indexed dataset files --


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64])
def test_llamatron_files_load_in_megatron(tmp_path, dtype):
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 120, int(n)) if np.dtype(dtype).kind != "f" else rng.random(int(n))).astype(dtype)
            for n in rng.integers(0, 30, 25)]
    with IndexedDatasetWriter(tmp_path / "l", dtype) as w:
        for k, s in enumerate(seqs):
            w.add_item(s)
            if k % 3 == 2:
                w.end_document()
        w.end_document()
    ours = IndexedDataset(tmp_path / "l")
    theirs = MIndexedDataset(str(tmp_path / "l"))
    assert theirs.index.dtype == np.dtype(dtype)
    assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    assert np.array_equal(theirs.index.sequence_pointers, ours.sequence_pointers)
    assert np.array_equal(theirs.document_indices, ours.document_indices)
    for i, s in enumerate(seqs):
        assert np.array_equal(theirs[i], s)
        if len(s) > 2:
            assert np.array_equal(theirs.get(i, offset=1, length=len(s) - 2), ours.get(i, 1, len(s) - 2))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_files_load_in_llamatron_and_are_byte_identical(tmp_path, dtype):
    rng = np.random.default_rng(1)
    docs = [[rng.integers(0, 30000, int(n)) for n in rng.integers(1, 20, int(k))] for k in rng.integers(1, 4, 30)]
    mb = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    with IndexedDatasetWriter(tmp_path / "l", dtype) as w:
        for doc in docs:
            for seq in doc:
                mb.add_item(torch.from_numpy(seq))
                w.add_item(seq)
            mb.end_document()
            w.end_document()
    mb.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    flat = [s for doc in docs for s in doc]
    assert ours.dtype == np.dtype(dtype) and len(ours) == len(flat)
    assert ours.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    for i, s in enumerate(flat):
        assert np.array_equal(ours[i], s)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("l" + ext)).read_bytes() == (tmp_path / ("m" + ext)).read_bytes()


def test_megatron_add_index_and_add_document_load_in_llamatron(tmp_path):
    part = _llamatron_write(tmp_path / "part", _docs(2, 10))
    mb = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    mb.add_document(torch.arange(6), [2, 4])  # one document of two sequences
    mb.add_index(part)
    mb.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    assert ours.sequence_lengths[:2].tolist() == [2, 4]
    assert ours.document_indices.tolist() == [0, 2] + list(range(3, 13))
    assert np.array_equal(ours[11], IndexedDataset(part)[9])


# -- GPTDataset --


def _assert_same_gpt(ours, theirs):
    assert ours.description == theirs.unique_description
    assert ours.description_hash == theirs.unique_description_hash
    for name in ("document_index", "sample_index", "shuffle_index"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        window, _ = theirs._query_document_sample_shuffle_indices(i)
        assert np.array_equal(ours[i], window), i
    for i in (0, len(ours) // 2, len(ours) - 1):
        item = theirs[i]
        assert np.array_equal(item["tokens"].numpy(), ours[i][:-1])
        assert np.array_equal(item["labels"].numpy(), ours[i][1:])


def _cases(T, L):
    per_epoch = (T - 1) // L
    sans = (2 * T - 1) // L
    return [
        (1234, L, per_epoch // 2, 1, False),  # one epoch
        (7, L, sans + 3, 3, True),  # three epochs, the last one separate (n_final < 0.8 n_epoch)
        (99, L, sans + int(0.8 * per_epoch) + 2, 3, False),  # three epochs, not separated
        (3, L // 2, 6 * T // (L // 2) - 3, 6, False),  # many epochs, not separated
    ]


def test_gpt_dataset_matches_megatron(tmp_path):
    prefix = _llamatron_write(tmp_path / "d", _docs(3, 60))
    ds = IndexedDataset(prefix)
    cache_m, cache_l = tmp_path / "mcache", tmp_path / "lcache"
    for seed, L, n, epochs, separate in _cases(ds.num_tokens, 16):
        theirs = _megatron_split([prefix], None, [n, None, None], seed, L, cache_m)
        ours = G.GPTDataset(ds, L, n, seed, cache_dir=cache_l)
        assert (ours.num_epochs, ours.separate_final_epoch) == (epochs, separate)
        _assert_same_gpt(ours, theirs)
    # Both stacks wrote the same cache files, byte for byte.
    assert sorted(os.listdir(cache_m)) == sorted(os.listdir(cache_l))
    for f in os.listdir(cache_m):
        assert (cache_m / f).read_bytes() == (cache_l / f).read_bytes(), f


def test_gpt_dataset_matches_megatron_valid_split_int32_tokens(tmp_path):
    prefix = _llamatron_write(tmp_path / "v", _docs(4, 80, vocab=128256), np.int32)
    ds = IndexedDataset(prefix)
    theirs = _megatron_split([prefix], None, [None, 500, None], 5, 32, tmp_path / "c", split=1)
    ours = G.GPTDataset(ds, 32, 500, 5, split="valid", cache_dir=tmp_path / "c")
    assert ours.cache_hit  # megatron's cache file is a hit for llamatron
    _assert_same_gpt(ours, theirs)


def test_megatron_loads_llamatron_cache(tmp_path, monkeypatch):
    prefix = _llamatron_write(tmp_path / "d", _docs(5, 50))
    ours = G.GPTDataset(IndexedDataset(prefix), 16, 200, 17, cache_dir=tmp_path / "c")

    def no_build(*args, **kwargs):
        raise AssertionError("megatron rebuilt the sample index instead of loading llamatron's cache")

    monkeypatch.setattr(mhelpers, "build_sample_idx", no_build)
    theirs = _megatron_split([prefix], None, [200, None, None], 17, 16, tmp_path / "c")
    _assert_same_gpt(ours, theirs)


def test_megatron_default_cache_dir(tmp_path):
    prefix = _llamatron_write(tmp_path / "d", _docs(6, 30))
    _megatron_split([prefix], None, [50, None, None], 1, 16, None)  # path_to_cache None
    ours = G.GPTDataset(IndexedDataset(prefix), 16, 50, 1, cache_dir=G.default_cache_dir(prefix))
    assert ours.cache_hit


# -- blending --


def test_blended_matches_megatron(tmp_path):
    pa = _llamatron_write(tmp_path / "a", _docs(7, 40))
    pb = _llamatron_write(tmp_path / "b", _docs(8, 70))
    S = 500
    # path_to_cache=None: with a cache path, megatron-core's BlendedDataset calls
    # torch.distributed.get_rank() on a miss, which fails when no process group exists.
    theirs = _megatron_split([pa, pb], [30.0, 70.0], [S, None, None], 11, 16, None)
    assert isinstance(theirs, MBlendedDataset)
    ours = G.build_blended_gpt_dataset([(30, pa), (70, pb)], 16, S, 11, cache_dir=G.default_cache_dir(pa))
    assert ours.weights == theirs.weights
    assert len(ours) == len(theirs) == S
    assert [d.num_samples for d in ours.datasets] == [d.num_samples for d in theirs.datasets]
    assert np.array_equal(ours.dataset_index, theirs.dataset_index)
    assert np.array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
    for o, t in zip(ours.datasets, theirs.datasets):
        assert o.description_hash == t.unique_description_hash
    for i in range(S):
        item = theirs[i]
        assert np.array_equal(item["tokens"].numpy(), ours[i][:-1]), i
        assert np.array_equal(item["labels"].numpy(), ours[i][1:]), i


def test_blended_cache_matches_megatron(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    pa = _llamatron_write(tmp_path / "a", _docs(9, 40))
    pb = _llamatron_write(tmp_path / "b", _docs(10, 70))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        theirs = _megatron_split([pa, pb], [50.0, 50.0], [400, None, None], 2, 16, tmp_path / "c")
    finally:
        dist.destroy_process_group()
    ours = G.build_blended_gpt_dataset([(50, pa), (50, pb)], 16, 400, 2, cache_dir=tmp_path / "c")
    assert ours.cache_hit and all(d.cache_hit for d in ours.datasets)
    assert ours.description == theirs.unique_description
    assert np.array_equal(ours.dataset_index, theirs.dataset_index)
    assert ours.dataset_index[:6].tolist() == [0, 1, 0, 1, 0, 1]


def _megatron_blend(w, size):
    di, dsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
    mhelpers.build_blending_indices(di, dsi, np.asarray(w, np.float64), len(w), size, False)
    return di, dsi


def test_blending_indices_match_megatron_helpers():
    rng = np.random.default_rng(12)
    for w in ([0.5, 0.5], [0.45, 0.55], [0.3, 0.7]) + tuple(list(rng.random(k)) for k in (2, 2, 3, 5)):
        w = G.normalize_weights(w)
        size = 300_000 if len(w) == 2 else 30_000
        di, dsi = _megatron_blend(w, size)
        ours = G.build_blending_indices(w, size)
        assert np.array_equal(ours[0], di) and np.array_equal(ours[1], dsi)


def test_blending_many_datasets_match_megatron_helpers():
    # Several chunks of the vectorised 3+-dataset builder (about 1M steps each), ties, skew, K = 10,
    # weights normalised the way the builder does it (twice) and not normalised at all.
    rng = np.random.default_rng(14)
    cases = [
        ([1 / 3] * 3, 3_000_000),
        ([0.98, 0.01, 0.01], 2_500_000),
        (G.normalize_weights(G.normalize_weights([20, 30, 50])), 2_000_000),
        (G.normalize_weights(rng.random(10)), 2_000_000),
        (G.normalize_weights(rng.random(6) ** 4), 1_000_000),
        ([float(v) for v in rng.random(4)], 500_000),
    ]
    for w, size in cases:
        ref = _megatron_blend(w, size)
        ours = G.build_blending_indices(w, size)
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1]), w


def test_sample_index_matches_megatron_helpers():
    rng = np.random.default_rng(13)
    for trial in range(20):
        n_docs = int(rng.integers(1, 3000))
        sizes = rng.integers(0 if trial % 3 == 0 else 1, int(rng.integers(2, 3000)), n_docs).astype(np.int32)
        sizes[0] = max(int(sizes[0]), 2)
        L, x, drop = int(rng.integers(2, 5000)), trial % 2, trial % 4 != 3
        T = int(sizes.sum())
        E = max(int(rng.integers(1, 4)), (L + x) // T + 1)
        doc = np.tile(np.arange(n_docs, dtype=np.int32), E)
        rng.shuffle(doc)
        ref = mhelpers.build_sample_idx(sizes, doc, L, E, T, drop, bool(x))
        ours = G.build_sample_index(sizes, doc, L, E, T, bool(x), drop)
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), trial
