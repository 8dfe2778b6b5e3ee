"""GPT pretraining samples over Megatron `.bin/.idx` data, identical to megatron-core's GPTDataset.

For a given prefix, seed, sequence length L and num_samples, item i is the same L+1 token window that
megatron-core's `GPTDataset` returns (tested against 0.16.1; core_r0.11, which MLPerf uses, has the
same index code), so a run can switch stacks mid-way and the cache files one writes are hits for
the other. How a window is chosen:

1. tokens per epoch T = sum of the lengths of the exposed documents; epochs E = the fewest with
   E*T >= num_samples*L + 1.
2. document_index (int32): the exposed document ids tiled E times, shuffled with
   `numpy.random.RandomState(seed)`. When the final epoch would contribute fewer than 80% of an
   epoch's samples it is shuffled separately, so the partial epoch is not spread over the run.
3. Let F be the token stream of the documents in document_index order. Sample j is
   F[j*L : j*L + L + 1] (consecutive samples share one token). sample_index row j holds
   (position in document_index, token offset) of F[j*L]; it is computed in closed form here
   (cumulative lengths), equal to the output of Megatron's C++ `build_sample_idx` loop.
4. shuffle_index (uint32 below 2**32-2 samples, else int64): the sample ids shuffled with the same
   RNG (again in two parts when the final epoch is separate). Item i is sample shuffle_index[i].

The RNG is consumed in exactly Megatron's order: document shuffle(s), then sample shuffle(s).
`shuffle=False` is the MLPerf 405B `mcore.patch` behaviour for validation: no shuffle at all, so
item k is F[k*L : k*L + L + 1] over the documents in file order.

This module is numpy only: the trainer decides which rank builds the cache and when others load it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets

import numpy as np

from llamatron.data.indexed import IndexedDataset
from llamatron.errors import LlamatronError

# What NeMo 2.x puts under "tokenizer" in the description of every GPTDataset it builds (its
# AutoTokenizer is serialized through `unique_identifiers`); part of the md5 that names the cache files.
NEMO_TOKENIZER_DESCRIPTION = {
    "class": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"
}
SPLITS = ("train", "valid", "test")
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # megatron-core gpt_dataset.py, hard-coded
MID_LEVEL_DATASET_SURPLUS = 0.005  # BlendedMegatronDatasetConfig.mid_level_dataset_surplus default
_INT32_MAX = np.iinfo(np.int32).max
_CACHE_ARRAYS = ("document_index", "sample_index", "shuffle_index")


def default_cache_dir(prefix: str | os.PathLike) -> str:
    """Megatron's cache location when `path_to_cache` is None: a directory named after the prefix."""
    return os.path.join(str(prefix), "cache", "GPTDataset_indices")


# ----------------------------------------------------------------------------------------------
# Index builders (each equals the megatron-core function named in its docstring)
# ----------------------------------------------------------------------------------------------


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_len: int, add_extra_token: bool) -> int:
    """`GPTDataset._get_num_epochs`: fewest epochs whose tokens cover num_samples*L (+1) tokens."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_len + int(add_extra_token)
    return max(1, -(-needed // tokens_per_epoch))


def separate_final_epoch_for(
    tokens_per_epoch: int, num_epochs: int, num_samples: int | None, seq_len: int, add_extra_token: bool
) -> tuple[bool, int]:
    """Megatron's rule for shuffling the last epoch on its own; also returns n_sans_final_epoch."""
    if num_epochs == 1 or num_samples is None:
        return False, 0
    x = int(add_extra_token)
    n_sans = ((num_epochs - 1) * tokens_per_epoch - x) // seq_len
    n_final = num_samples - n_sans
    n_per_epoch = (tokens_per_epoch - x) // seq_len
    # int() of a float product, exactly as Megatron writes it.
    return n_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * n_per_epoch), n_sans


def build_document_index(
    documents: np.ndarray,
    num_epochs: int,
    rng: np.random.RandomState,
    separate_final_epoch: bool,
    shuffle: bool = True,
) -> np.ndarray:
    """`_build_document_index`: documents tiled num_epochs times (epoch-major), int32, shuffled."""
    if not separate_final_epoch or num_epochs == 1:
        # np.tile gives the values of Megatron's mgrid construction without its int64 temporaries.
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        if shuffle:
            rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False, shuffle)
    last = build_document_index(documents, 1, rng, False, shuffle)
    return np.concatenate((first, last))


def num_samples_in(num_epochs: int, tokens_per_epoch: int, seq_len: int, add_extra_token: bool, drop_last: bool = True) -> int:
    """Rows of the sample index minus one: how many full windows the tiled stream holds."""
    total = num_epochs * tokens_per_epoch - int(add_extra_token)
    if drop_last:
        return total // seq_len
    # helpers.cpp computes the partial-sample count in single precision; keep its rounding.
    return int(np.ceil(np.float32(total) / np.float32(seq_len)))


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_len: int,
    num_epochs: int,
    tokens_per_epoch: int,
    add_extra_token: bool = True,
    drop_last: bool = True,
    chunk_docs: int = 1 << 20,
) -> np.ndarray:
    """helpers.cpp `build_sample_idx`, in closed form: row j = (d, j*L - start(d)), where d is the first
    entry of document_index whose cumulative end reaches j*L + x (x = 1 with the extra token).

    Vectorized as searchsorted of the row targets j*L + x over the cumulative document ends, one chunk
    of ~1M documents at a time, so temporaries stay small and the output is the only big array.
    dtype: int32 unless len(document_index) or the longest sequence exceeds int32, as Megatron.
    """
    x = int(add_extra_token)
    L = int(seq_len)
    n = num_samples_in(num_epochs, tokens_per_epoch, L, add_extra_token, drop_last)
    n_docs = len(document_index)
    largest = int(sizes.max()) if len(sizes) else 0
    dtype = np.int32 if max(n_docs, largest) <= _INT32_MAX else np.int64
    out = np.empty((n + 1, 2), dtype=dtype)
    out[0] = 0
    row = 1  # next row to fill; rows 1..row-1 are done
    tokens_before = 0  # tokens of the documents before the current chunk
    for a in range(0, n_docs, chunk_docs):
        if row > n:
            break
        lengths = np.take(sizes, document_index[a : a + chunk_docs])  # take: ~2x faster than []
        ends = np.cumsum(lengths, dtype=np.int64)
        ends += tokens_before
        # Rows not yet placed have targets beyond tokens_before, so those reaching at most this
        # chunk's end land in this chunk.
        last = min(n, (int(ends[-1]) - x) // L)
        if last >= row:
            starts_at = np.arange(row, last + 1, dtype=np.int64) * L
            d = np.searchsorted(ends, starts_at + x, side="left")
            out[row : last + 1, 0] = d + a
            out[row : last + 1, 1] = starts_at - (ends[d] - lengths[d])
            row = last + 1
        tokens_before = int(ends[-1])
    if row <= n:
        # Only without drop_last: the C++ loop runs off the end and pins the final partial sample
        # to the last document.
        out[row:, 0] = n_docs - 1
        out[row:, 1] = int(sizes[document_index[-1]]) - x
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState, shuffle: bool = True) -> np.ndarray:
    """`_build_shuffle_index`: [0, num_samples) shuffled, then [num_samples, total_size) shuffled."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    if shuffle:
        rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    if shuffle:
        rng.shuffle(last)
    return np.concatenate((first, last))


def normalize_weights(weights) -> list[float]:
    """megatron-core `utils.normalize`: float64 division by the sum (applied twice by the builder path)."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """helpers.cpp `build_blending_indices`: sample i goes to the dataset k with the largest
    w_k*max(i,1) - count_k (first k on ties); returns (dataset_index int16, dataset_sample_index int64).
    """
    w = [float(v) for v in weights]
    if any(not v > 0 for v in w):
        raise LlamatronError(f"blend weights must all be > 0, got {w}")
    if len(w) >= 32767:
        raise LlamatronError(f"blend of {len(w)} datasets: at most 32766 fit Megatron's int16 dataset index")
    size = int(size)
    if len(w) == 1:
        return np.zeros(size, np.int16), np.arange(size, dtype=np.int64)
    if len(w) == 2:
        return _blend_two(w[0], w[1], size)
    return _blend_many(w, size)


def _blend_loop(w: list[float], size: int, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    # The greedy as written, one step at a time: the oracle the vectorised builders are tested against.
    dataset_index = np.empty(size, np.int16)
    sample_index = np.empty(size, np.int64)
    counts = [0] * len(w)
    for a in range(0, size, chunk):
        b = min(size, a + chunk)
        picks, samples = [], []
        for i in range(a, b):
            best = _pick(w, i, counts)
            picks.append(best)
            samples.append(counts[best])
            counts[best] += 1
        dataset_index[a:b] = picks
        sample_index[a:b] = samples
    return dataset_index, sample_index


def _pick(w: list[float], i: int, counts: list[int]) -> int:
    """helpers.cpp's choice at step i in Python doubles (the same IEEE operations as the C++)."""
    s = float(i) if i > 1 else 1.0
    best, best_err = 0, w[0] * s - counts[0]
    for k in range(1, len(w)):
        err = w[k] * s - counts[k]
        if err > best_err:
            best, best_err = k, err
    return best


def _picks_second(w0s: np.ndarray, w1s: np.ndarray, i: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Greedy decision at steps i (float64) with c0 draws of dataset 0 so far: True = dataset 1.
    w0s, w1s are w_k * max(i, 1); every operation is the double operation helpers.cpp performs."""
    return (w1s - (i - c0)) > (w0s - c0)


def _blend_two(w0: float, w1: float, size: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    # Two datasets (the MLPerf 405B 50/50 blend; sizes up to ~1.4e9, so no per-sample Python loop).
    # With c0 draws of dataset 0 so far, step i picks dataset 0 iff c0 <= tau(i), tau(i) ~ floor(w0*i)
    # being the largest count at which the float comparison still favours dataset 0. Then c0(i) =
    # tau(i-1) + 1 for i >= 2 (c0(2) = 1 whatever step 0 picked). That candidate trajectory is
    # checked against the exact float comparison at every step; wherever rounding breaks it, the
    # greedy is stepped exactly (in Python doubles) until it rejoins the candidate. Counts stay below
    # 2**53, so holding them in float64 is exact. Chunks are small enough to stay in cache.
    dataset_index = np.empty(size, np.int16)
    sample_index = np.empty(size, np.int64)
    c0 = 0  # true draws of dataset 0 before position pos
    pos = 0
    while pos < size:
        b = min(size, pos + chunk)
        n = b - pos
        steps = np.arange(pos - 1, b + 1, dtype=np.float64)  # steps pos-1 .. b
        s = np.maximum(steps, 1.0)
        w0s, w1s = w0 * s, w1 * s
        prev = slice(0, n + 1)  # step i-1 for i = pos .. b
        cand = _threshold(w0s[prev], w1s[prev], steps[prev]) + 1.0  # candidate c0 at pos .. b
        if pos == 0:
            cand[0] = 0.0
            if n >= 1:
                cand[1] = 0.0 if w1 > w0 else 1.0
        step = np.diff(cand)  # candidate picks of dataset 0 at pos .. b-1
        cur = slice(1, n + 1)  # steps pos .. b-1
        second = _picks_second(w0s[cur], w1s[cur], steps[cur], cand[:-1])
        ok = ((step == 0.0) | (step == 1.0)) & (second == (step == 0.0))
        bad = np.flatnonzero(~ok)
        local, nb = 0, 0
        while local < n:
            if c0 == cand[local]:
                while nb < len(bad) and bad[nb] < local:
                    nb += 1
                end = int(bad[nb]) if nb < len(bad) else n
                # Steps local .. end-1 follow the verified candidate: write them in one go.
                pick = 1.0 - step[local:end]
                dataset_index[pos + local : pos + end] = pick
                sample_index[pos + local : pos + end] = np.where(
                    pick == 0.0, cand[local:end], steps[local + 1 : end + 1] - cand[local:end]
                )
                c0 = int(cand[end])
                local = end
                if local == n:
                    break
            # Off the candidate (or at a step it gets wrong): one exact greedy step.
            i = pos + local
            si = float(i) if i > 1 else 1.0
            pick = 1 if (w1 * si - float(i - c0)) > (w0 * si - float(c0)) else 0
            dataset_index[i] = pick
            sample_index[i] = c0 if pick == 0 else i - c0
            c0 += 1 - pick
            local += 1
        pos = b
    return dataset_index, sample_index


def _threshold(w0s: np.ndarray, w1s: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """tau(i): the largest c0 for which step i still picks dataset 0 (the decision is monotone in c0)."""
    tau = np.floor(w0s)
    for _ in range(8):  # rounding moves tau by at most one or two; loop until stable
        up = ~_picks_second(w0s, w1s, steps, tau + 1.0)
        down = _picks_second(w0s, w1s, steps, tau)
        if not up.any() and not down.any():
            return tau
        tau += up
        tau -= down
    raise LlamatronError("blend weights: greedy threshold did not settle (please report)")


# Three or more datasets. The greedy (smooth weighted round-robin) has no closed form (ordering the
# picks by j/w_k, (j+1/2)/w_k or (j+1-w_k)/w_k disagrees with it at 30-70% of steps for random
# weights), but its state at step q (the counts drawn so far) barely depends on the past: started at
# q from any nearby counts it falls onto the true trajectory within a few steps, bar a dataset drawn
# less than about once a lane. So a chunk is cut into lanes of L steps that run side by side in
# numpy, each from guessed counts (lane 0 from the true ones) and each an exact greedy from its own
# start. Lane m is right when its start equals lane m-1's end. Where not, it is re-run from that end
# until it rejoins its old trajectory (equal counts at the same step: from there the greedy is the
# same), first for all such lanes together, then, once few are left or a pass no longer fixes many (a
# dataset whose guessed count stays wrong over many lanes), lane by lane in Python in order. Exact
# for any weights; at worst (weights far from summing to 1, where guesses never rejoin) about twice
# the loop's time.
_BLEND_LANE_CELLS = 1 << 18  # lanes x datasets per numpy step: the (K, lanes) arrays stay in cache
_BLEND_LANE_STEPS = 256
_BLEND_SEQUENTIAL_BELOW = 32  # inconsistent lanes left (or fixed per pass) below which Python wins


def _blend_many(w: list[float], size: int, lanes: int | None = None, lane_steps: int | None = None):
    K = len(w)
    lanes = lanes or max(16, min(4096, _BLEND_LANE_CELLS // K))
    dataset_index = np.empty(size, np.int16)
    sample_index = np.empty(size, np.int64)
    counts = np.zeros(K)  # float64 like the C++'s double casts; exact below 2**53
    greedy = _Greedy(w)
    pos = 0
    while pos < size:
        L = lane_steps or max(16, min(_BLEND_LANE_STEPS, -(-(size - pos) // lanes)))
        n = min(size - pos, lanes * L)
        picks, had = _blend_lanes(greedy, pos, counts, -(-n // L), L)
        _lanes_to_steps(dataset_index[pos : pos + n], picks)
        _lanes_to_steps(sample_index[pos : pos + n], had)
        counts += np.bincount(dataset_index[pos : pos + n], minlength=K)
        pos += n
    return dataset_index, sample_index


def _lanes_to_steps(dst: np.ndarray, lanes: np.ndarray) -> None:
    """dst[j*L + u] = lanes[u, j] (lane j holds steps j*L ..), the last lane cut at len(dst)."""
    L = lanes.shape[0]
    full, rest = divmod(len(dst), L)
    rows = dst[: full * L].reshape(full, L)
    for j in range(0, full, 64):  # in blocks: a whole transpose reads one element per page
        rows[j : j + 64] = lanes[:, j : min(full, j + 64)].T
    if rest:
        dst[full * L :] = lanes[:rest, full]


class _Greedy:
    """helpers.cpp's step for many states at once, in the same double operations."""

    def __init__(self, w: list[float]):
        self.w = w
        self.K = len(w)
        self.wcol = np.array(w, np.float64)[:, None]
        rank = np.uint8 if self.K < 256 else np.uint16
        self.rank = (self.K - np.arange(self.K)).astype(rank)[:, None]  # the first maximal k ranks highest

    def step(self, s: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States `counts` (K, m), C order, at steps whose max(i, 1) is `s` (m,): advances counts in
        place and returns the picks (int16) and the counts they had."""
        err = self.wcol * s
        err -= counts
        code = np.equal(err, err.max(axis=0)) * self.rank
        pick = self.K - code.max(axis=0).astype(np.int16)
        m = counts.shape[1]
        flat = pick.astype(np.intp) * m
        flat += np.arange(m)
        c = counts.reshape(-1)  # a view: counts is C-contiguous
        had = c[flat]
        c[flat] = had + 1.0
        return pick, had


def _guess_counts(w: list[float], q: np.ndarray) -> np.ndarray:
    """Counts (K, lanes) near the greedy's at steps q: largest-remainder rounding of w*q to sum q
    (the greedy keeps the sum, so a guess with another sum would never rejoin)."""
    x = (np.array(w) / math.fsum(w))[:, None] * q.astype(np.float64)
    c = np.floor(x)
    short = q - c.sum(axis=0)
    order = np.argsort(c - x, axis=0, kind="stable")
    add = (np.arange(len(w))[:, None] < short).astype(np.float64)
    np.put_along_axis(c, order, np.take_along_axis(c, order, axis=0) + add, axis=0)
    return c


def _blend_lanes(g: _Greedy, pos: int, counts: np.ndarray, M: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps pos .. pos+M*L-1 from the true counts at pos: picks (L, M) int16 and the counts they had."""
    q = pos + L * np.arange(M, dtype=np.int64)
    start = _guess_counts(g.w, q)
    start[:, 0] = counts
    P = np.empty((L, M), np.int16)
    H = np.empty((L, M), np.float64)
    final = start.copy()
    qf = q.astype(np.float64)
    for u in range(L):
        P[u], H[u] = g.step(np.maximum(qf + u, 1.0), final)
    bad = _inconsistent(start, final, 1)
    while len(bad) > _BLEND_SEQUENTIAL_BELOW:
        _rerun_lanes(g, q, P, H, start, final, bad)
        before, bad = len(bad), _inconsistent(start, final, 1)
        if before - len(bad) < _BLEND_SEQUENTIAL_BELOW:
            break
    if len(bad):
        _rerun_in_order(g, q, P, H, start, final, int(bad[0]))
    return P, H


def _inconsistent(start: np.ndarray, final: np.ndarray, first: int) -> np.ndarray:
    """Lanes m >= first whose start is not lane m-1's end."""
    return np.flatnonzero((start[:, first:] != final[:, first - 1 : -1]).any(axis=0)) + first


def _rerun_lanes(g, q, P, H, start, final, bad) -> None:
    # All of them side by side, each from its predecessor's end as it stands.
    X = final[:, bad - 1]  # the new runs' counts
    Y = start[:, bad]  # the old runs' counts, to see where they meet
    start[:, bad] = X
    act = np.arange(len(bad))
    for u in range(P.shape[0]):
        act = act[(X[:, act] != Y[:, act]).any(axis=0)]
        if not act.size:
            return
        lanes = bad[act]
        Xa = np.ascontiguousarray(X[:, act])
        pick, had = g.step(np.maximum((q[lanes] + u).astype(np.float64), 1.0), Xa)
        X[:, act] = Xa
        Y[P[u, lanes], act] += 1.0
        P[u, lanes] = pick
        H[u, lanes] = had
    final[:, bad[act]] = X[:, act]  # never rejoined: the end changed


def _rerun_in_order(g, q, P, H, start, final, m: int) -> None:
    # Lane by lane from the first inconsistent one: each re-run starts from an end already right.
    while True:
        end = _rerun_lane(g.w, int(q[m]), P[:, m], H[:, m], final[:, m - 1], start[:, m])
        start[:, m] = final[:, m - 1]
        if end is not None:
            final[:, m] = end
        bad = _inconsistent(start, final, m + 1)
        if not len(bad):
            return
        m = int(bad[0])


def _rerun_lane(w, q0: int, picks, had, true_start, old_start) -> list[int] | None:
    """One lane in Python from true_start until it meets the old run; returns its new end, or None
    when it rejoined (the end stands)."""
    true = [int(v) for v in true_start]
    old = [int(v) for v in old_start]
    for u in range(len(picks)):
        if true == old:
            return None
        best = _pick(w, q0 + u, true)
        old[picks[u]] += 1
        picks[u] = best
        had[u] = true[best]
        true[best] += 1
    return None if true == old else true


# ----------------------------------------------------------------------------------------------
# Cache files
# ----------------------------------------------------------------------------------------------


def describe(identifiers: dict) -> tuple[str, str]:
    """Megatron's `unique_description` (json, indent 4, key order kept) and its md5."""
    text = json.dumps(identifiers, indent=4)
    return text, hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _atomic_write(path: str, write) -> None:
    # Unique temp name in the same directory, then rename: a reader (another rank, another run)
    # sees either no file or a complete one, and concurrent builders cannot clobber each other.
    tmp = f"{path}.tmp{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_cache(paths: dict[str, str], description: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(next(iter(paths.values())))
    try:
        os.makedirs(directory, exist_ok=True)
        for name, arr in arrays.items():
            _atomic_write(paths[name], lambda f, a=arr: np.save(f, a, allow_pickle=False))
        # The description goes last: a cache counts as present only when all files exist.
        _atomic_write(paths["description"], lambda f: f.write(description.encode("utf-8")))
    except OSError as e:
        raise LlamatronError(f"{directory}: cannot write the index cache ({e.strerror or e}); pass a writable cache_dir") from e


def _cache_paths(cache_dir: str, digest: str, cls: str, split: str, names) -> dict[str, str]:
    base = os.path.join(str(cache_dir), f"{digest}-{cls}-{split}-")
    paths = {"description": base + "description.txt"}
    paths.update({name: base + name + ".npy" for name in names})
    return paths


def _read_cache(paths: dict[str, str], description: str) -> dict[str, np.ndarray] | None:
    """The cached arrays (memory-mapped), or None on a miss. A cache that is present but does not
    match what we would build is an error, never silently rebuilt over."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    with open(paths["description"], "rb") as f:
        found = f.read().decode("utf-8", errors="replace")
    if found != description:
        raise LlamatronError(
            f"{paths['description']}: description differs from the dataset being built (same md5); "
            "the cache file was edited or corrupted, delete it"
        )
    arrays = {}
    for name, path in paths.items():
        if name == "description":
            continue
        arrays[name] = _load_mapped(path)
    return arrays


def _load_mapped(path: str) -> np.ndarray:
    # A plain read-only ndarray over the map: indexing an np.memmap goes through Python-level
    # __getitem__/__array_finalize__, which doubled the cost of every item.
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    except (ValueError, OSError) as e:
        raise LlamatronError(f"{path}: unreadable index cache file ({e}); delete it to rebuild") from e


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class GPTDataset:
    """Item i: int64 window of seq_len + 1 tokens (tokens = window[:-1], labels = window[1:]).

    `len()` is the number of full windows in E epochs, which can exceed num_samples (as Megatron).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        seq_len: int,
        num_samples: int | None,
        seed: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        add_extra_token: bool = True,
        cache_dir: str | os.PathLike | None = None,
        indices: np.ndarray | None = None,
        dataset_path: str | None = None,
        tokenizer_description: dict | None = NEMO_TOKENIZER_DESCRIPTION,
    ):
        if split not in SPLITS:
            raise LlamatronError(f"GPTDataset split {split!r}: expected one of {SPLITS}")
        if int(seq_len) < 1:
            raise LlamatronError(f"GPTDataset seq_len {seq_len}: expected >= 1")
        if num_samples is not None and int(num_samples) < 0:
            raise LlamatronError(f"GPTDataset num_samples {num_samples}: expected >= 0")
        self.indexed = indexed
        self.seq_len = int(seq_len)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = int(seed)
        self.split = split
        self.shuffle = bool(shuffle)
        self.add_extra_token = bool(add_extra_token)
        self.window = self.seq_len + int(self.add_extra_token)
        self.dataset_path = str(indexed.prefix if dataset_path is None else dataset_path)

        full = indices is None
        self.indices = self._exposed(indices)
        self.tokens_per_epoch = int(np.sum(indexed.sequence_lengths[self.indices], dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise LlamatronError(f"{indexed.idx_path}: the exposed documents hold no tokens")
        self.num_epochs = num_epochs_for(self.tokens_per_epoch, self.num_samples, self.seq_len, self.add_extra_token)
        self.separate_final_epoch, self._n_sans_final = separate_final_epoch_for(
            self.tokens_per_epoch, self.num_epochs, self.num_samples, self.seq_len, self.add_extra_token
        )

        self.unique_identifiers = self._identifiers(tokenizer_description, full)
        self.description, self.description_hash = describe(self.unique_identifiers)

        arrays = self._load_or_build(cache_dir)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._check_shapes()

    def _exposed(self, indices) -> np.ndarray:
        """The documents this dataset draws from: all of the file (Megatron's blend_per_split exposes the
        whole file to every split), or the given indices, checked."""
        n = len(self.indexed.sequence_lengths)
        if indices is None:
            return np.arange(n, dtype=np.int32)
        indices = np.asarray(indices)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n)):
            raise LlamatronError(f"{self.indexed.idx_path}: document indices must be 1-D within [0, {n})")
        return indices.astype(np.int32)

    def _identifiers(self, tokenizer_description, full: bool) -> dict:
        """Megatron's unique identifiers of the dataset: what names its cache files."""
        ids = {
            "class": "GPTDataset",
            "dataset_path": self.dataset_path,
            "num_samples": self.num_samples,
            "index_split": self.split,
            "random_seed": self.seed,
            "sequence_length": self.seq_len,
            "split": None,  # NeMo passes blend_per_split, so Megatron's split string and matrix are null
            "split_matrix": None,
            "tokenizer": tokenizer_description,
        }
        # Megatron hashes none of these, so its cache files collide across them; llamatron adds a key
        # only when it leaves the default, keeping the default (NeMo/MLPerf) hash identical.
        if not self.shuffle:
            ids["shuffle"] = False
        if not self.add_extra_token:
            ids["add_extra_token_to_sequence"] = False
        if not full:
            ids["indices_md5"] = hashlib.md5(self.indices.tobytes(), usedforsecurity=False).hexdigest()
        return ids

    def _load_or_build(self, cache_dir) -> dict[str, np.ndarray]:
        """The three index arrays: from the cache files where they match, else built (and cached)."""
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.cache_paths = None
        self.cache_hit = False
        arrays = None
        if self.cache_dir is not None:
            self.cache_paths = _cache_paths(self.cache_dir, self.description_hash, "GPTDataset", self.split,
                                            _CACHE_ARRAYS)
            arrays = _read_cache(self.cache_paths, self.description)
            self.cache_hit = arrays is not None
        if arrays is None:
            arrays = self._build()
            if self.cache_paths is not None:
                _write_cache(self.cache_paths, self.description, arrays)
                # Serve from the files just written: page cache shared by every rank and worker on
                # the host, instead of ~4 bytes per document per epoch of private memory each.
                arrays = _read_cache(self.cache_paths, self.description)
        return arrays

    def _build(self) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        doc = build_document_index(self.indices, self.num_epochs, rng, self.separate_final_epoch, self.shuffle)
        sample = build_sample_index(
            self.indexed.sequence_lengths, doc, self.seq_len, self.num_epochs, self.tokens_per_epoch, self.add_extra_token
        )
        n = len(sample) - 1
        first = self._n_sans_final if self.separate_final_epoch else n
        shuffle = build_shuffle_index(first, n, rng, self.shuffle)
        return {"document_index": doc, "sample_index": sample, "shuffle_index": shuffle}

    def _check_shapes(self) -> None:
        n = num_samples_in(self.num_epochs, self.tokens_per_epoch, self.seq_len, self.add_extra_token)
        where = self.cache_paths["description"] if self.cache_paths else self.dataset_path
        if (
            self.document_index.shape != (self.num_epochs * len(self.indices),)
            or self.sample_index.shape != (n + 1, 2)
            or self.shuffle_index.shape != (n,)
        ):
            raise LlamatronError(
                f"{where}: index shapes {self.document_index.shape}, {self.sample_index.shape}, "
                f"{self.shuffle_index.shape} do not fit {self.num_epochs} epochs and {n} samples; delete the cache"
            )

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.shuffle_index)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"GPTDataset index {i} out of range [0, {n})")
        j = int(self.shuffle_index[i])
        d0, off0 = (int(v) for v in self.sample_index[j])
        d1, off1 = (int(v) for v in self.sample_index[j + 1])
        # Megatron reads [off0:] of the first document, whole middle documents and [:off1+x] of the
        # last one (or [off0:off1+x] of a single document); same spans, gathered in one go here.
        docs = np.asarray(self.document_index[d0 : d1 + 1])
        starts = self.indexed.sequence_pointers[docs] // self.indexed.dtype.itemsize
        ends = starts + self.indexed.sequence_lengths[docs]
        ends[-1] = starts[-1] + off1 + int(self.add_extra_token)
        starts[0] += off0
        tokens = self.indexed.tokens
        parts = [tokens[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
        window = np.concatenate(parts, dtype=np.int64)
        if len(window) != self.window:
            raise LlamatronError(
                f"{self.dataset_path}: sample {j} has {len(window)} tokens, expected {self.window}; "
                "the index cache does not belong to this .bin/.idx"
            )
        return window

    # Pickling (DataLoader workers under spawn): never copy the memory-mapped token file or cached
    # indices into the pickle; reopen them by path instead.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.cache_paths is not None:
            for name in _CACHE_ARRAYS:
                state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.cache_paths is not None:
            for name in _CACHE_ARRAYS:
                setattr(self, name, _load_mapped(self.cache_paths[name]))


class BlendedDataset:
    """Megatron's BlendedDataset: item i = datasets[dataset_index[i]][dataset_sample_index[i]]."""

    def __init__(
        self,
        datasets: list,
        weights: list[float],
        size: int,
        *,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not datasets or len(datasets) != len(weights):
            raise LlamatronError(f"blend of {len(datasets)} datasets with {len(weights)} weights: expected equal, non-zero")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.split = getattr(datasets[0], "split", "train")
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.cache_hit = False

        arrays = None
        if self.cache_dir is not None:
            ids = {
                "class": "BlendedDataset",
                "datasets": [d.unique_identifiers for d in self.datasets],
                "split": self.split,
                "weights": self.weights,
                "size": self.size,
            }
            self.unique_identifiers = ids
            self.description, self.description_hash = describe(self.unique_identifiers)
            self.cache_paths = _cache_paths(
                self.cache_dir, self.description_hash, "BlendedDataset", self.split, ("dataset_index", "dataset_sample_index")
            )
            arrays = _read_cache(self.cache_paths, self.description)
            self.cache_hit = arrays is not None
        if arrays is None:
            di, dsi = build_blending_indices(self.weights, self.size)
            arrays = {"dataset_index": di, "dataset_sample_index": dsi}
            self._check_sizes(di)
            if self.cache_dir is not None:
                _write_cache(self.cache_paths, self.description, arrays)
                arrays = _read_cache(self.cache_paths, self.description)  # mapped, as GPTDataset
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        if self.dataset_index.shape != (self.size,) or self.dataset_sample_index.shape != (self.size,):
            raise LlamatronError(f"{self.cache_paths['description']}: blend index length differs from size {self.size}; delete the cache")

    def _check_sizes(self, dataset_index: np.ndarray) -> None:
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        for k, (need, ds) in enumerate(zip(counts, self.datasets)):
            if need > len(ds):
                name = getattr(ds, "dataset_path", f"dataset {k}")
                raise LlamatronError(
                    f"{name}: blend draws {need} samples from it but it has {len(ds)}; build it with more num_samples"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"BlendedDataset index {i} out of range [0, {self.size})")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def build_blended_gpt_dataset(
    blend: list[tuple[float, str]],
    seq_len: int,
    num_samples: int,
    seed: int,
    *,
    surplus: float = MID_LEVEL_DATASET_SURPLUS,
    **kw,
) -> GPTDataset | BlendedDataset:
    """Megatron's BlendedMegatronDatasetBuilder for one split given as [(weight, prefix), ...].

    One prefix: a plain GPTDataset of num_samples. Several: GPTDataset k gets
    ceil(ceil(S*w_k)*(1+surplus)) samples and the BlendedDataset has sum_k ceil(S*w_k) samples.
    `kw` goes to every GPTDataset (split, shuffle, cache_dir, tokenizer_description, ...); the
    BlendedDataset caches in the same cache_dir.
    """
    if not blend:
        raise LlamatronError("empty blend: expected at least one (weight, prefix)")
    if len(blend) == 1:
        _, prefix = blend[0]
        return GPTDataset(IndexedDataset(prefix), seq_len, num_samples, seed, dataset_path=str(prefix), **kw)
    weights = normalize_weights([float(w) for w, _ in blend])
    targets = [int(math.ceil(num_samples * w)) for w in weights]
    datasets = [
        GPTDataset(
            IndexedDataset(prefix), seq_len, int(math.ceil(t * (1 + surplus))), seed, dataset_path=str(prefix), **kw
        )
        for t, (_, prefix) in zip(targets, blend)
    ]
    return BlendedDataset(datasets, weights, sum(targets), cache_dir=kw.get("cache_dir"))


class MockDataset:
    """Synthetic token windows for benchmarks: item i is uniform in [0, vocab_size), a function of
    (seed, i) only, so any worker or rank can produce any item without shared state."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int):
        if vocab_size < 2 or seq_len < 1 or num_samples < 0:
            raise LlamatronError(f"MockDataset(vocab_size={vocab_size}, seq_len={seq_len}, num_samples={num_samples}): expected vocab >= 2, seq_len >= 1")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.split = "train"
        self.unique_identifiers = {"class": "MockDataset", "vocab_size": self.vocab_size, "sequence_length": self.seq_len, "num_samples": self.num_samples, "random_seed": self.seed}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"MockDataset index {i} out of range [0, {self.num_samples})")
        rng = np.random.Generator(np.random.Philox(key=[self.seed & 0xFFFFFFFFFFFFFFFF, i]))
        return rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)
