"""JSON lines -> Megatron `.bin/.idx`, as Megatron-LM `tools/preprocess_data.py` / NeMo
`preprocess_data_for_megatron.py` do it for MLPerf (REFERENCE A.3 step 4, B.2).

For each JSON key K, `{output_prefix}_{K}_document.{bin,idx}` gets one sequence per document: the
tokens of `doc[K]` with no BOS and no EOS (EOS only with `append_eod`). Documents that tokenize to
zero tokens are dropped, as NeMo's builder loop does (how the MLPerf files were made, REFERENCE B.2);
`empty_documents="keep"` records each as a document with no sequence instead, as Megatron-LM's
`preprocess_data.py` does (its `add_document` with no lengths), so the .idx matches that tool's.

Pipeline: the main process streams each input (plain or gzip, multi-member included) in blocks of
about BATCH_BYTES cut at the last newline, and hands each block to one of `workers` processes, which
splits it into lines, decodes UTF-8, parses JSON and tokenizes; the main process does as little as
it can, since it competes with the workers for the cores. At most 2*workers blocks are in flight
and results are written in input order, so memory stays bounded whatever the file size and the
output bytes do not depend on the worker count. The writer keeps everything under temporary names
until the end, so a failed run leaves nothing under the real names.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import gzip
import itertools
import json
import multiprocessing
import os
import time
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llamatron.data.gzip_members import GzipMembers
from llamatron.data.indexed import IndexedDatasetWriter, data_file_paths, token_dtype
from llamatron.errors import LlamatronError
from llamatron.tokenizer import Tokenizer, load_tokenizer

# Bytes of input lines per batch handed to a worker: big enough that pickling and IPC are noise
# (~1 MiB is ~250k Llama 3 tokens), small enough that 2*workers batches in flight stay a few MB each.
BATCH_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str | Tokenizer = "llama3",
    *,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    progress: bool = True,
    empty_documents: str = "drop",
) -> dict:
    """Tokenize JSON-lines files into `{output_prefix}_{key}_document.bin/.idx` for each key.

    `tokenizer` is a `load_tokenizer` name or path (or a loaded Tokenizer). Returns {"documents",
    "dropped_empty", "tokens", "input_documents" (JSON lines read), "seconds", "tokens_per_s",
    "prefixes": {key: data prefix}, "paths": [bin, idx of each key in order], "per_key": {key: {documents,
    dropped_empty, tokens}}, "workers", "tokenizer"}; documents/dropped_empty/tokens sum over keys.
    """
    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths, keys = [Path(p) for p in inputs], list(json_keys)
    _check_arguments(paths, keys, workers, empty_documents)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if append_eod and tok.eos_id is None:
        raise LlamatronError(f"tokenizer {tok.name!r} has no end-of-text token; append_eod needs one")
    dtype = token_dtype(tok.vocab_size)
    prefixes = {k: f"{output_prefix}_{k}_document" for k in keys}
    _check_writable(Path(output_prefix).parent, output_prefix)

    counts = {k: {"documents": 0, "dropped_empty": 0, "tokens": 0} for k in keys}
    n_lines = 0
    total_bytes = sum(p.stat().st_size for p in paths)
    bar = _progress_bar(total_bytes, progress)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        writers = {k: stack.enter_context(IndexedDatasetWriter(prefixes[k], dtype)) for k in keys}
        done_bytes = 0  # sizes of the input files already finished, for the progress bar
        batches = _batches(paths, BATCH_BYTES)
        for docs, pos, per_key in _results(batches, workers, tok, keys, append_eod, dtype, stack, empty_documents):
            if per_key is None:  # end of a file
                done_bytes += pos
                continue
            n_lines += docs
            for k, arrays in per_key.items():
                _write_documents(writers[k], counts[k], *arrays)
            bar.update(done_bytes + pos - bar.n)
        _check_not_empty(paths, keys, counts, n_lines)
    seconds = time.perf_counter() - t0
    tokens = sum(c["tokens"] for c in counts.values())
    return {
        "documents": sum(c["documents"] for c in counts.values()),
        "dropped_empty": sum(c["dropped_empty"] for c in counts.values()),
        "tokens": tokens,
        "input_documents": n_lines,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
        "prefixes": prefixes,
        "paths": [str(p) for k in keys for p in data_file_paths(prefixes[k])],
        "per_key": counts,
        "workers": workers,
        "tokenizer": tok.name,
    }


def _check_arguments(paths: list[Path], keys: list[str], workers: int, empty_documents: str) -> None:
    if not paths:
        raise LlamatronError("preprocess: no input files given; expected one or more JSON-lines files")
    for p in paths:
        if not p.is_file():
            raise LlamatronError(f"{p}: no such input file; expected a JSON-lines file (.jsonl, .json or .gz)")
    if not keys or len(set(keys)) != len(keys):
        raise LlamatronError(f"json_keys={keys!r}: expected one or more distinct JSON keys")
    if workers < 1:
        raise LlamatronError(f"workers={workers}: expected an integer >= 1")
    if empty_documents not in ("drop", "keep"):
        raise LlamatronError(f"--empty-documents {empty_documents!r}: expected drop (NeMo) or keep (Megatron-LM)")


def _write_documents(writer: IndexedDatasetWriter, count: dict, lengths, tokens, dropped: int) -> None:
    """One batch's documents of one key (lengths, their tokens back to back) into its writer."""
    offset = 0
    for n in lengths.tolist():
        if n == 0:  # empty_documents=keep: a document with no sequence
            writer.end_document()
            continue
        writer.add_document(tokens[offset : offset + n])
        offset += n
    count["documents"] += len(lengths)
    count["dropped_empty"] += dropped
    count["tokens"] += offset


def _check_not_empty(paths: list[Path], keys: list[str], counts: dict, n_lines: int) -> None:
    for k in keys:
        if counts[k]["tokens"] == 0:
            what = ("no JSON lines at all" if n_lines == 0
                    else f"{n_lines} documents, all of whose {k!r} text tokenizes to zero tokens")
            raise LlamatronError(f"{_names(paths)}: {what}; expected at least one non-empty document")


def _results(batches, workers: int, tok: Tokenizer, keys, append_eod: bool, dtype, stack,
             empty_documents: str = "drop") -> Iterator[tuple]:
    """Each batch's (documents, pos, per-key arrays) in input order, and (None, file size, None) where
    a file ends. With several workers at most 2*workers batches are in flight: enough to keep every
    worker busy while the main process writes, and memory stays bounded."""
    if workers == 1:
        encoder = _Encoder(tok, keys, append_eod, dtype, empty_documents == "keep")
        for path, first_line, data, pos in batches:
            yield (None, pos, None) if path is None else encoder(path, first_line, data, pos)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        # spawn, not fork: the parent may hold threads (tqdm's monitor, torch, tokenizer pools).
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tok.name, keys, append_eod, dtype.str, empty_documents == "keep"),
    )
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    pending: collections.deque = collections.deque()  # futures, and file sizes where files end
    running = 0
    try:
        for path, first_line, data, pos in batches:
            if path is None:
                pending.append(pos)
                continue
            pending.append(pool.submit(_run_worker, str(path), first_line, data, pos))
            running += 1
            while running >= 2 * workers or (pending and isinstance(pending[0], int)):
                item = pending.popleft()
                if isinstance(item, int):
                    yield None, item, None
                else:
                    running -= 1
                    yield item.result()
        while pending:
            item = pending.popleft()
            yield (None, item, None) if isinstance(item, int) else item.result()
    except BrokenProcessPool:
        raise LlamatronError(
            "preprocess: a tokenizer worker process died (killed, out of memory?); try fewer workers"
        ) from None


class _Encoder:
    """Turns a block of whole lines into (documents read, pos, {key: (lengths of kept documents, their
    tokens, documents dropped)})."""

    def __init__(self, tok: Tokenizer, keys: list[str], append_eod: bool, dtype, keep_empty: bool = False):
        self.tok = tok
        self.keep_empty = keep_empty  # lengths of 0 stay in, and nothing counts as dropped
        self.keys = keys
        self.eod = tok.eos_id if append_eod else None
        self.dtype = np.dtype(dtype)

    def __call__(self, path, first_line: int, data: bytes, pos: int):
        texts: dict[str, list[str]] = {k: [] for k in self.keys}
        n_docs = 0
        for i, raw in enumerate(data.split(b"\n")):
            if not raw.strip():  # blank lines carry no document (e.g. a trailing '\r\n')
                continue
            doc = _parse_line(path, first_line + i, raw)
            for k in self.keys:
                try:
                    v = doc[k]
                except KeyError:
                    shown = ", ".join(map(repr, list(doc)[:8]))
                    raise LlamatronError(
                        f"{path}:{first_line + i}: no key {k!r} in the JSON object (it has {shown or 'no keys'}); "
                        f"expected a string under {k!r}"
                    ) from None
                if not isinstance(v, str):
                    raise LlamatronError(
                        f"{path}:{first_line + i}: key {k!r} holds a JSON {type(v).__name__}, expected a string"
                    )
                texts[k].append(v)
            n_docs += 1
        return n_docs, pos, {k: self._tokenize(texts[k]) for k in self.keys}

    def _tokenize(self, texts: list[str]):
        ids = self.tok.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        keep = lengths > 0
        dropped = 0 if self.keep_empty else int(len(ids) - keep.sum())
        total = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        if total and (tokens.max() >= self.tok.vocab_size or tokens.min() < 0):
            bad = int(tokens.max()) if tokens.max() >= self.tok.vocab_size else int(tokens.min())
            raise LlamatronError(
                f"tokenizer {self.tok.name!r} produced id {bad}, outside [0, vocab_size={self.tok.vocab_size}); "
                f"expected ids that fit the {self.dtype} token file"
            )
        if not self.keep_empty:
            lengths = lengths[keep]
        tokens = tokens.astype(self.dtype)
        if self.eod is not None and len(lengths):
            # The EOD goes after each non-empty document: insert it at each document end (Megatron adds
            # it only to non-empty documents, so empty ones stay empty, or dropped).
            nonempty = lengths > 0
            ends = np.cumsum(lengths)[nonempty]
            tokens = np.insert(tokens, ends, self.eod).astype(self.dtype)
            lengths = lengths + nonempty
        return lengths, tokens, dropped


def _parse_line(path, lineno: int, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamatronError(
            f"{path}:{lineno}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line; "
            f"expected UTF-8 JSON lines"
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamatronError(f"{path}:{lineno}: malformed JSON at column {e.colno} ({e.msg}); expected one JSON object per line") from None
    except RecursionError:
        raise LlamatronError(f"{path}:{lineno}: JSON nested too deeply; expected one JSON object per line") from None
    if not isinstance(doc, dict):
        raise LlamatronError(f"{path}:{lineno}: a JSON {type(doc).__name__}, expected one JSON object per line")
    return doc


_WORKER: _Encoder | None = None


def _init_worker(tokenizer_name: str, keys: list[str], append_eod: bool, dtype: str, keep_empty: bool = False) -> None:
    global _WORKER
    # HF `tokenizers` would start a thread per core in every worker process: one each is enough.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _WORKER = _Encoder(load_tokenizer(tokenizer_name), keys, append_eod, np.dtype(dtype), keep_empty)


def _run_worker(path: str, first_line: int, data: bytes, pos: int):
    return _WORKER(path, first_line, data, pos)


def _batches(paths: list[Path], batch_bytes: int) -> Iterator[tuple]:
    """(path, number of its first line, a block of whole lines, input bytes read so far in this file)
    for each batch, then (None, 0, b"", size of the file) when a file is finished."""
    for path in paths:
        yield from _file_batches(path, batch_bytes)
        yield None, 0, b"", path.stat().st_size


def _file_batches(path: Path, batch_bytes: int) -> Iterator[tuple]:
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")  # reads every member of a multi-member file
        elif path.suffix == ".gz":
            raise LlamatronError(f"{path}: starts with {magic!r}, not gzip data; expected a gzip file (named .gz)")
        else:
            stream = raw
        lineno = 1
        decompressed = 0
        parts: list[bytes] = []  # an unfinished line, kept as parts so a huge line is not copied over and over
        while True:
            try:
                block = stream.read(batch_bytes)
            except EOFError:
                member, decompressed, lineno = _gzip_end(path)
                raise LlamatronError(
                    f"{path}: gzip data truncated in member {member}, after {decompressed} decompressed bytes "
                    f"(in line {lineno}); expected complete gzip members"
                ) from None
            except (OSError, zlib.error) as e:  # BadGzipFile is an OSError: CRC/length errors, trailing garbage
                raise LlamatronError(
                    f"{path}: corrupt gzip data near compressed byte {raw.tell()} (after {decompressed} "
                    f"decompressed bytes, line {lineno}): {e}"
                ) from None
            if not block:
                break
            decompressed += len(block)
            cut = block.rfind(b"\n")
            if cut < 0:
                parts.append(block)
                continue
            parts.append(block[: cut + 1])
            data = b"".join(parts)
            parts = [block[cut + 1 :]]
            yield path, lineno, data, raw.tell()
            lineno += data.count(b"\n")
        tail = b"".join(parts)
        if tail:  # a last line without a newline
            yield path, lineno, tail, raw.tell()


def _check_writable(directory: Path, output_prefix: str) -> None:
    """Before hours of tokenizing: the outputs can be written (created, then renamed) there."""
    probe = directory / f".llamatron-probe.tmp{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LlamatronError(f"--output-prefix {output_prefix}: {directory} cannot be written ({e.strerror or e}); "
                             "expected a writable directory") from None


def _gzip_end(path: Path) -> tuple[int, int, int]:
    """(member, decompressed bytes, line) where the data of a truncated gzip file ends: decompressed
    again member by member, on the error path only (the reading loop knows only its last block)."""
    members = GzipMembers()
    with open(path, "rb") as f, contextlib.suppress(zlib.error):  # garbage after the cut: count to there
        while chunk := f.read(1 << 20):
            members.feed(chunk)
        members.finish()  # what zlib still holds of the cut member counts too
    return max(members.member, 1), members.decompressed, members.lines + 1


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", disable=not enabled)


def _names(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
