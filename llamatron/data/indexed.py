"""Megatron-Core indexed dataset: the `.bin/.idx` pair, read and written byte-compatibly.

`.idx` layout (little-endian), as written by megatron-core `IndexedDatasetBuilder` and NeMo's
`MMapIndexedDatasetBuilder`:

    0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    9   u64       version = 1
    17  u8        dtype code of the tokens in .bin
    18  u64       S = number of sequences
    26  u64       D = len(document_indices) = number of documents + 1
    34  int32[S]  sequence lengths (tokens)
        int64[S]  sequence pointers (byte offsets into .bin)
        int64[D]  document indices (cumulative sequence count at each document end, starting at 0)
        int8[S]   sequence modes, multimodal datasets only (never written here, tolerated on read)

`.bin` is the headerless concatenation of all sequences in that dtype.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import socket
import struct
from pathlib import Path

import numpy as np

from llamatron.errors import LlamatronError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34

# Megatron-Core's code table (NeMo's legacy table maps 7 to float64; nobody stores tokens as floats).
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron/NeMo preprocessing picks: uint16 below 65500 entries, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


def data_file_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDataset:
    """Memory-mapped reader of a Megatron `.bin/.idx` pair. Item i is sequence i as a numpy array."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise LlamatronError(f"{p}: no such file (data prefix {self.prefix!r} needs both .bin and .idx)")
        self._read_index()
        bin_bytes = self.bin_path.stat().st_size
        expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if len(self) else 0
        if bin_bytes != expected:
            raise LlamatronError(
                f"{self.bin_path}: size {bin_bytes} bytes, but {self.idx_path.name} describes {expected} bytes "
                f"({len(self)} sequences of {self.dtype.name}); the pair does not belong together or one is truncated"
            )
        self._check_sequences(bin_bytes)
        tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, self.dtype)
        # A plain ndarray view of the map: slicing an np.memmap runs Python-level __array_finalize__,
        # which made a window of ~17 documents cost ~90 us instead of ~10.
        self.tokens = tokens.view(np.ndarray)

    def _read_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            raise LlamatronError(f"{path}: {len(header)} bytes, shorter than the {HEADER_BYTES}-byte Megatron index header")
        if header[:9] != MAGIC:
            raise LlamatronError(f"{path}: bad magic {header[:9]!r} at byte 0, expected {MAGIC!r} (not a Megatron .idx file)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise LlamatronError(f"{path}: index version {version} at byte 9, expected {VERSION}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise LlamatronError(f"{path}: unknown dtype code {code} at byte 17, expected one of {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        s, d = struct.unpack("<QQ", header[18:34])
        need = HEADER_BYTES + 12 * s + 8 * d
        if size < need:
            raise LlamatronError(
                f"{path}: {size} bytes, but its header announces {s} sequences and {d} document indices "
                f"({need} bytes); the file is truncated"
            )
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=s, offset=off)
        off += 4 * s
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=s, offset=off)
        off += 8 * s
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=d, offset=off)
        # Megatron's builder leaves the last document open if end_document() was not called, so the
        # last index may stop short of S; GPTDataset never reads document boundaries anyway.
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] > s:
            raise LlamatronError(
                f"{path}: document indices at byte {off} must start at 0 and end at most at the sequence count {s}"
            )

    def _check_sequences(self, bin_bytes: int, chunk: int = 1 << 22) -> None:
        """Every sequence must lie inside the `.bin`: a corrupted pointer or length would otherwise read
        past the memory map (a crash) or return short windows much later. Vectorised in chunks: about
        0.1 s for 10 million sequences."""
        size = self.dtype.itemsize
        for start in range(0, len(self), chunk):
            lengths = self.sequence_lengths[start : start + chunk].astype(np.int64)
            pointers = self.sequence_pointers[start : start + chunk]
            bad = (lengths < 0) | (pointers < 0) | (pointers % size != 0) | (pointers + lengths * size > bin_bytes)
            if bad.any():
                i = start + int(np.argmax(bad))
                raise LlamatronError(
                    f"{self.idx_path}: sequence {i} (length {int(self.sequence_lengths[i])}, byte offset "
                    f"{int(self.sequence_pointers[i])}) does not lie inside the {bin_bytes}-byte {self.bin_path.name}; "
                    "the index is corrupted"
                )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (Megatron's `IndexedDataset.get`)."""
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    # DataLoader workers started by spawn pickle the dataset: reopen the memory maps by prefix rather
    # than copying the whole token file into the pickle (what pickling an np.memmap does).
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """Largest token id in `.bin`, read in chunks so memory stays bounded."""
        best = -1
        for start in range(0, len(self.tokens), chunk):
            best = max(best, int(self.tokens[start : start + chunk].max()))
        return best

    def token_range(self, max_bytes: int | None = None, blocks: int = 256) -> tuple[int, int, bool]:
        """(smallest, largest token id, whether every token was read). A `.bin` larger than `max_bytes`
        is sampled: `blocks` evenly spaced blocks of max_bytes / blocks bytes, enough to see that a
        file was tokenized for another vocabulary without reading terabytes at every start."""
        n = len(self.tokens)
        if n == 0:
            return 0, -1, True
        if max_bytes is None or n * self.dtype.itemsize <= max_bytes:
            lo, hi = None, None
            for start in range(0, n, 1 << 24):
                part = self.tokens[start : start + (1 << 24)]
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
            return lo, hi, True
        per = max(max_bytes // blocks // self.dtype.itemsize, 1)
        starts = np.linspace(0, n - per, blocks).astype(np.int64)
        parts = [self.tokens[s : s + per] for s in starts]
        return min(int(p.min()) for p in parts), max(int(p.max()) for p in parts), False


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
_TEMP = re.compile(r"\.tmp(\d+)\.([A-Za-z0-9-]+)\.[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(*paths: Path) -> list[Path]:
    """Delete the temporary outputs (`NAME.tmpPID.HOST.RANDOM`) that a writer of this host killed
    with -9 left next to `paths`; a live writer's (or another host's, whose pids mean nothing here)
    are left alone. Returns what it removed."""
    removed = []
    for path in paths:
        for p in path.parent.glob(glob.escape(path.name) + ".tmp*"):
            m = _TEMP.search(p.name[len(path.name):])
            if m and m.group(2) == _HOST and not _alive(int(m.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class IndexedDatasetWriter:
    """Streams sequences into `PREFIX.bin/.idx`.

    Both files are written under temporary names and renamed only by `finalize()`, so an interrupted
    run never leaves a half-written pair behind under the real name. Use as a context manager: leaving
    the block by an exception removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise LlamatronError(f"cannot write tokens as {self.dtype}; supported: {sorted(map(str, CODE_OF_DTYPE))}")
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        # pid + host + random: two writers to one prefix (threads, or a retry after a crash) never share
        # a temp, and the temps of a killed writer of this host can be told from a live one's.
        remove_stale_temporaries(self.bin_path, self.idx_path)
        suffix = f".tmp{os.getpid()}.{_HOST}.{secrets.token_hex(4)}"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + suffix)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._pending: list[int] = []
        self._doc_ends: list[int] = [0]
        self._count = 0

    def add_item(self, tokens) -> None:
        """Append one sequence (it stays in the current document until `end_document`)."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            # astype wraps silently: a 128k-vocab id written as uint16 would become another token.
            if arr.size and arr.dtype.kind in "iub" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise LlamatronError(
                        f"{self.bin_path}: sequence {self._count} holds token ids in [{lo}, {hi}], "
                        f"outside {self.dtype.name} [{info.min}, {info.max}]; write with a wider dtype"
                    )
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._pending.append(arr.size)
        self._count += 1
        if len(self._pending) >= 65536:
            self._flush_lengths()

    def end_document(self) -> None:
        self._doc_ends.append(self._count)

    def add_document(self, tokens) -> None:
        """One sequence that is one whole document: the layout of NeMo/Megatron preprocessing."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, other_prefix: str | os.PathLike) -> None:
        """Append every sequence and document of another `.bin/.idx` pair (used to merge worker parts)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise LlamatronError(f"{other.idx_path}: dtype {other.dtype} differs from {self.dtype} being written")
        with open(other.bin_path, "rb") as f:
            while block := f.read(1 << 24):
                self._bin.write(block)
        self._flush_lengths()
        self._lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        base = self._count
        self._doc_ends.extend((base + other.document_indices[1:]).tolist())
        self._count += len(other)

    def _flush_lengths(self) -> None:
        if self._pending:
            self._lengths.append(np.array(self._pending, dtype=np.int32))
            self._pending = []

    def finalize(self) -> tuple[Path, Path]:
        self._flush_lengths()
        self._bin.close()
        if self._doc_ends[-1] != self._count:  # close a document left open, as Megatron's builder would not
            self._doc_ends.append(self._count)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.array(self._doc_ends, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        # .bin first: a reader finds the pair only once the .idx appears, and then both are complete.
        os.replace(self._tmp_bin, self.bin_path)
        try:
            os.replace(self._tmp_idx, self.idx_path)
        except BaseException:
            self.bin_path.unlink(missing_ok=True)  # a .bin without its .idx must not look like output
            raise
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finalize()
        except BaseException:
            self.abort()
            raise
