"""C4 consolidation as MLPerf's `utils/consolidate_data.sh` does it (REFERENCE A.3 steps 1-3).

- Train: `c4-train.en_{k}.json.gz` is the byte concatenation (a multi-member gzip) of the shards
  `c4-train.{i:05d}-of-01024.json.gz` for i in [128k, 128k+128), in numeric order. Missing shards
  are skipped with a warning, as the 8B script does.
- Validation: `c4-validation.en.json.gz` concatenates the 8 validation shards, and
  `c4-validation-91205-samples.en.json.gz` is `zcat | head -n 91205 | gzip` of it.

Each shard is checked as it is copied: every gzip member must decompress and end with its CRC/length
trailer, else the merge fails naming the shard and the byte offset. Every output is written under a
temporary name and renamed when complete, so an existing output is finished; it is not redone (for
the concatenations: as long as its size is still the sum of its present inputs, so a shard
downloaded later triggers a rebuild).
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Sequence

from llamatron.data.gzip_members import GzipMembers
from llamatron.errors import LlamatronError

COPY_BLOCK = 1 << 24


def consolidate_c4(
    src_dir: str | Path,
    dst_dir: str | Path,
    *,
    train_shards: int = 1024,
    merged_files: int = 8,
    valid_shards: int = 8,
    valid_documents: int = 91205,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Merge C4 shards from src_dir into dst_dir, up to `workers` merged files at a time (checking
    the shards is decompression: one core merges ~25-30 MB/s of shards). Returns {"train": [merged
    paths], "valid": path, "valid_samples": path, "valid_samples_documents": lines in it, "missing":
    [missing shard names], "built": [outputs written now], "skipped": [outputs already complete]}."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise LlamatronError(f"{src}: no such directory; expected the C4 shards (c4-train.*-of-{train_shards:05d}.json.gz)")
    if train_shards < 1 or merged_files < 1 or train_shards % merged_files:
        raise LlamatronError(
            f"train_shards={train_shards}, merged_files={merged_files}: expected positive counts with "
            f"train_shards divisible by merged_files"
        )
    if valid_shards < 1 or valid_documents < 1:
        raise LlamatronError(f"valid_shards={valid_shards}, valid_documents={valid_documents}: expected positive counts")
    if workers < 1:
        raise LlamatronError(f"workers={workers}: expected an integer >= 1")
    dst.mkdir(parents=True, exist_ok=True)
    per_file = train_shards // merged_files
    jobs: list[tuple[Path, list[Path]]] = []
    for k in range(merged_files):
        names = [f"c4-train.{i:05d}-of-{train_shards:05d}.json.gz" for i in range(k * per_file, (k + 1) * per_file)]
        jobs.append((dst / f"c4-train.en_{k}.json.gz", [src / n for n in names]))
    valid_names = [f"c4-validation.{i:05d}-of-{valid_shards:05d}.json.gz" for i in range(valid_shards)]
    valid_path = dst / "c4-validation.en.json.gz"
    jobs.append((valid_path, [src / n for n in valid_names]))

    result: dict = {"train": [], "missing": [], "built": [], "skipped": []}
    merges: list[tuple[list[Path], Path]] = []
    for out, shards in jobs:
        present = [p for p in shards if p.is_file()]
        missing = [p.name for p in shards if not p.is_file()]
        result["missing"].extend(missing)
        if missing:
            warnings.warn(f"{out.name}: {len(missing)} of {len(shards)} shards missing in {src} (first: {missing[0]}); skipping them", stacklevel=2)
        if not present:
            warnings.warn(f"{out.name}: none of its {len(shards)} shards is in {src}; not written", stacklevel=2)
            continue
        if out != valid_path:
            result["train"].append(str(out))
        expected = sum(p.stat().st_size for p in present)
        if out.is_file() and out.stat().st_size == expected:
            result["skipped"].append(str(out))
            continue
        merges.append((present, out))
    _merge_all(merges, workers, progress)
    result["built"] += [str(out) for _, out in merges]

    if not valid_path.is_file():
        raise LlamatronError(f"{src}: no validation shards ({valid_names[0]} ...); expected {valid_shards} of them")
    samples = dst / f"c4-validation-{valid_documents}-samples.en.json.gz"
    if samples.is_file() and str(valid_path) not in result["built"]:
        result["skipped"].append(str(samples))
        n = _count_lines(samples)
    else:
        n = _head_lines(valid_path, samples, valid_documents, progress)
        result["built"].append(str(samples))
        if n < valid_documents:
            warnings.warn(f"{valid_path}: only {n} documents, fewer than the {valid_documents} asked for", stacklevel=2)
    result.update(valid=str(valid_path), valid_samples=str(samples), valid_samples_documents=n)
    return result


def _merge_all(merges: list[tuple[list[Path], Path]], workers: int, progress: bool) -> None:
    if workers == 1 or len(merges) <= 1:
        for parts, out in merges:
            _concatenate(parts, out, progress)
        return
    jobs = [(parts, out, False) for parts, out in merges]  # the bars of several processes would garble each other
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        pool.starmap(_concatenate, jobs, chunksize=1)


def _concatenate(parts: list[Path], out: Path, progress: bool) -> None:
    """Byte concatenation: gzip members stay as they are, nothing is re-encoded. Each shard is also
    decompressed (and the output discarded) as it is copied: a shard cut short or damaged in the
    download would otherwise make a merged file that fails only when it is tokenized, hours later."""
    from tqdm import tqdm

    tmp = _tmp_name(out)
    total = sum(p.stat().st_size for p in parts)
    try:
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=out.name, disable=not progress) as bar:
            for p in parts:
                members = GzipMembers()
                with open(p, "rb") as src:
                    while block := src.read(COPY_BLOCK):
                        _check(p, members, block)
                        f.write(block)
                        bar.update(len(block))
                if not members.finish():
                    raise LlamatronError(_truncated(p, members))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _check(shard: Path, members: GzipMembers, block: bytes) -> None:
    try:
        members.feed(block)
    except zlib.error as e:
        raise LlamatronError(
            f"{shard}: corrupt gzip data in member {members.member} (from byte {members.member_start}), between "
            f"bytes {members.offset} and {members.offset + len(block)} ({e}); expected complete gzip members: "
            f"download the shard again"
        ) from None


def _truncated(shard: Path, members: GzipMembers) -> str:
    if members.member == 0:
        return f"{shard}: empty file; expected gzip data: download the shard again"
    return (f"{shard}: truncated at byte {members.offset}, inside gzip member {members.member} (from byte "
            f"{members.member_start}; its end or its 8-byte CRC/length trailer is missing); expected complete "
            f"gzip members: download the shard again")


def _head_lines(src: Path, out: Path, n: int, progress: bool) -> int:
    """`zcat src | head -n n | gzip > out`: the first n lines, byte for byte. Returns lines written."""
    from tqdm import tqdm

    tmp = _tmp_name(out)
    written = 0
    try:
        with gzip.open(src, "rb") as f, open(tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0  # gzip(1)'s default level
        ) as g, tqdm(total=n, unit="doc", desc=out.name, disable=not progress) as bar:
            try:
                for line in f:
                    g.write(line)
                    written += 1
                    bar.update(1)
                    if written == n:
                        break
            except (EOFError, OSError, zlib.error) as e:
                raise LlamatronError(
                    f"{src}: corrupt or truncated gzip data after line {written} ({e or type(e).__name__}); "
                    f"expected complete gzip members"
                ) from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _count_lines(path: Path) -> int:
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(COPY_BLOCK):
                n += block.count(b"\n")
    except (EOFError, OSError, zlib.error) as e:
        raise LlamatronError(f"{path}: corrupt or truncated gzip data ({e or type(e).__name__}); delete it to rebuild") from None
    return n


def _tmp_name(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


def compress_jsonl(inputs: Sequence[str | Path], workers: int = 1, *, compresslevel: int = 6) -> list[str]:
    """gzip each JSON-lines file to `<file>.gz` (input kept), one process per file. Outputs that
    already exist are complete (temp + rename) and are left alone. Returns the output paths in order."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise LlamatronError(f"{p}: no such file; expected a JSON-lines file to compress")
    if workers < 1:
        raise LlamatronError(f"workers={workers}: expected an integer >= 1")
    jobs = [(str(p), compresslevel) for p in paths if not Path(str(p) + ".gz").is_file()]
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _compress_one(job)
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            pool.map(_compress_one, jobs, chunksize=1)
    return [str(p) + ".gz" for p in paths]


def _compress_one(job: tuple[str, int]) -> None:
    path, level = job
    out = Path(path + ".gz")
    tmp = _tmp_name(out)
    try:
        with open(path, "rb") as src, open(tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0
        ) as g:
            shutil.copyfileobj(src, g, COPY_BLOCK)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
