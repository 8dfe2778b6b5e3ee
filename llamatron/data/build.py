"""The datasets of a run, from its `[data]` config: Megatron `GPTDataset`s (blended), mock tokens, and
the start-up checks of the token files; and the windows of a batch as an array.

Imports nothing of the model: vocabulary sizes come in as numbers.
"""

from __future__ import annotations

import os

import numpy as np

from llamatron.errors import LlamatronError


def build_datasets(cfg, vocab_size: int, num_train_samples: int):
    """(train, valid) datasets yielding int64 windows of seq_len + 1 tokens; valid is None without
    validation. `cfg` is the run's Config (its data and eval sections)."""
    from llamatron.data import gpt_dataset as gd
    from llamatron.data.indexed import IndexedDataset

    data, n_valid = cfg.data, cfg.eval.samples
    if getattr(cfg, "finetune", None) is not None and cfg.finetune.data:
        from llamatron.data.sft import build_sft_dataset

        valid = build_sft_dataset(cfg, valid=True) if cfg.finetune.valid and n_valid > 0 else None
        return build_sft_dataset(cfg), valid
    if data.mock:
        train = gd.MockDataset(vocab_size, data.seq_len, num_train_samples, data.seed)
        valid = gd.MockDataset(vocab_size, data.seq_len, max(n_valid, 1), data.seed + 1)
        return train, valid
    for prefix in data.train:
        _check_one_window(IndexedDataset(prefix), prefix, data.seq_len)
    weights = data.train_weights or [1.0] * len(data.train)
    cache_dir = index_cache_dir(cfg)
    train = gd.build_blended_gpt_dataset(list(zip(weights, data.train)), data.seq_len, num_train_samples, data.seed,
                                         split="train", cache_dir=cache_dir)
    valid = None
    if data.valid and n_valid > 0:
        # Validation reads the first windows of the file in order: no shuffle (MLPerf's 405B rule).
        indexed = IndexedDataset(data.valid)
        # Validation windows never repeat (GPTDataset would wrap around into further epochs): the file
        # must hold eval.samples of them, as `llamatron eval` requires.
        available = (indexed.num_tokens - 1) // data.seq_len
        if available < n_valid:
            raise LlamatronError(
                f"config key 'eval.samples': {data.valid} holds only {available} windows of {data.seq_len + 1} "
                f"tokens, fewer than the {n_valid} asked for"
            )
        valid = gd.GPTDataset(indexed, data.seq_len, n_valid, data.seed, split="valid",
                              shuffle=False, cache_dir=cache_dir)
    return train, valid


def index_cache_dir(cfg) -> str | None:
    """Where the sample-index caches go: data.cache_dir; unset, Megatron's default next to the first
    train prefix, or OUT/cache when the data's directory is read-only. The files are named by the md5
    of everything that decides the order, so their place never changes a sample."""
    from llamatron.data.gpt_dataset import default_cache_dir

    data = cfg.data
    if not data.cache_index:
        return None
    if data.cache_dir is not None:
        return data.cache_dir
    for candidate in (default_cache_dir(data.train[0]), os.path.join(cfg.train.out_dir, "cache")):
        if _writable(candidate):
            return candidate
    return None  # nowhere to write: build in memory, as with cache_index=false


def _writable(directory: str) -> bool:
    probe = os.path.join(directory, f".probe.tmp{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.unlink(probe)
        return True
    except OSError:
        return False


def _check_one_window(indexed, prefix: str, seq_len: int) -> None:
    """Several epochs of training data are fine (Megatron's), but a window longer than the whole file
    would hold the same documents over and over within one sample."""
    if (indexed.num_tokens - 1) // seq_len < 1:
        raise LlamatronError(f"config key 'data.seq_len': {seq_len} + 1 tokens per window, but {prefix} holds only "
                             f"{indexed.num_tokens} tokens, less than one window")


def check_data(prefixes: list[str], vocab_size: int, tokenizer_vocab: int, log=print) -> None:
    """Start-up checks of the data files, before any memory is spent on the model: every `.bin/.idx`
    pair opens and is consistent (`IndexedDataset` checks magic, version, dtype, sizes and that every
    sequence lies inside the `.bin`), its dtype can hold the tokenizer's ids, and its token ids index
    the embedding (a wrong tokenizer/model pairing). Each failure is a LlamatronError naming the file."""
    from llamatron.data.indexed import IndexedDataset

    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        if ds.dtype.kind not in "iu":
            raise LlamatronError(f"{ds.idx_path}: tokens stored as {ds.dtype.name}; token ids must be integers")
        if np.iinfo(ds.dtype).max < tokenizer_vocab - 1:
            raise LlamatronError(
                f"{ds.idx_path}: tokens stored as {ds.dtype.name} (at most {np.iinfo(ds.dtype).max}) cannot hold the "
                f"{tokenizer_vocab:,} ids of the tokenizer; the data was tokenized with another tokenizer "
                "(check data.tokenizer)"
            )
        lo, hi, complete = ds.token_range(max_bytes=TOKEN_SCAN_BYTES)
        if lo < 0 or hi >= vocab_size:
            raise LlamatronError(
                f"{ds.bin_path}: token id {lo if lo < 0 else hi} is outside the model vocabulary [0, {vocab_size}) "
                "(data tokenized for a different model? check model.vocab_size / data.tokenizer)"
            )
        if not complete:
            log(f"{ds.bin_path}: token ids checked in {TOKEN_SCAN_BYTES >> 20} MiB spread over the file "
                "(every batch is checked again as it is read)")


# Token files up to this size are scanned whole at start-up (~0.1 s per GiB from the page cache);
# larger ones are sampled, and `load_batch` checks every window it reads anyway.
TOKEN_SCAN_BYTES = 1 << 30


def read_windows(dataset, indices, vocab_size: int | None = None) -> np.ndarray:
    """The int64 windows `indices` of `dataset`, [n, seq_len + 1]; with `vocab_size`, every token id is
    checked to index the embedding (a bad id would fail inside the embedding kernel, on CUDA as a
    device-side assert)."""
    array = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices])
    if vocab_size is not None and array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = [i for i, w in zip(indices, array) if w.min() < 0 or w.max() >= vocab_size]
        raise LlamatronError(f"training sample {bad[0]} (dataset index in Megatron sample order) holds token id "
                             f"{int(array.min()) if array.min() < 0 else int(array.max())}, outside the model vocabulary "
                             f"[0, {vocab_size}): the token file is damaged there")
    return array


def check_inputs(data_cfg, vocab_size: int, log=print) -> None:
    """Everything about the data files that can fail, checked before a GPU is touched: the
    tokenizer's vocabulary fits the model's, and every token file (`check_data`)."""
    if data_cfg.mock:
        return
    from llamatron.tokenizer import load_tokenizer

    tok_vocab = load_tokenizer(data_cfg.tokenizer).vocab_size
    if tok_vocab > vocab_size:
        raise LlamatronError(
            f"config key 'model.vocab_size': {vocab_size} is smaller than the tokenizer's "
            f"{tok_vocab} ({data_cfg.tokenizer})"
        )
    check_data(data_cfg.train + ([data_cfg.valid] if data_cfg.valid else []), vocab_size, tok_vocab, log)
