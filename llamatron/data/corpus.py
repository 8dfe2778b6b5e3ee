"""The embedded default corpus for the demo: real English prose that needs no download.

Source: the documentation that ships with Python itself.
- `pydoc_data.topics.topics`: the language-reference text that `help('assert')` shows, one document
  per topic.
- The docstrings of the standard library's pure-Python modules, one document per module, laid out
  like pydoc's text (module docstring, then `class X(Base)` / `def X.f(args)` with their docstrings).
  The sources are parsed with `ast`, never imported, so nothing of the stdlib is executed.

The corpus is written in C4's format (`{"text","timestamp","url"}` JSON lines, gzip shards named
like C4's) so the demo exercises exactly the path the real C4 data takes. The output bytes depend
only on the Python version: sorted walks, a fixed timestamp, gzip headers without time or name.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import sys
import tokenize
from pathlib import Path
from typing import Iterator

from llamatron.errors import LlamatronError

TIMESTAMP = "2019-04-25T00:00:00Z"  # fixed, in C4's format, so the bytes never depend on the clock
# Stdlib directories that hold tests, demos, tools or generated tables rather than documented API.
SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages",
    "__pycache__", "pydoc_data", "lib-dynload", "encodings", "__phello__",
}  # fmt: skip
GZIP_LEVEL = 9


def write_default_corpus(out_dir: str | Path, *, valid_fraction: float = 0.05, shards: int = 2) -> dict:
    """Write `c4-train.{i:05d}-of-{shards:05d}.json.gz` and `c4-validation.00000-of-00001.json.gz`
    under out_dir. A document goes to validation when a stable hash of its title falls below
    valid_fraction, so adding or changing other documents never moves it. Skips the work when all
    the files already exist (each is written under a temporary name and renamed when complete).

    Returns {"train": [paths], "valid": [paths], "documents": {"train", "valid"}, "chars": {"train",
    "valid"}, "skipped": bool}.
    """
    if not 0 < valid_fraction < 1:
        raise LlamatronError(f"valid_fraction={valid_fraction}: expected a number strictly between 0 and 1")
    if shards < 1:
        raise LlamatronError(f"shards={shards}: expected an integer >= 1")
    out = Path(out_dir)
    train_paths = [out / f"c4-train.{i:05d}-of-{shards:05d}.json.gz" for i in range(shards)]
    valid_paths = [out / "c4-validation.00000-of-00001.json.gz"]
    result = {"train": [str(p) for p in train_paths], "valid": [str(p) for p in valid_paths]}
    if all(p.is_file() for p in train_paths + valid_paths):
        result.update(_count(train_paths, valid_paths), skipped=True)
        return result

    train: list[dict] = []
    valid: list[dict] = []
    for title, url, text in documents():
        (valid if in_validation(title, valid_fraction) else train).append({"text": text, "timestamp": TIMESTAMP, "url": url})
    if not train or not valid:
        raise LlamatronError(
            f"valid_fraction={valid_fraction} leaves {len(train)} train and {len(valid)} validation documents; "
            f"expected both splits non-empty"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Round-robin keeps the shards similar in size and mixes topics with modules in each.
    for i, path in enumerate(train_paths):
        _write_jsonl_gz(path, train[i::shards])
    _write_jsonl_gz(valid_paths[0], valid)
    result.update(
        documents={"train": len(train), "valid": len(valid)},
        chars={"train": sum(len(d["text"]) for d in train), "valid": sum(len(d["text"]) for d in valid)},
        skipped=False,
    )
    return result


def in_validation(title: str, valid_fraction: float) -> bool:
    """Stable across runs and machines (unlike hash()): the first 8 bytes of sha256 as a fraction."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")
    return h < valid_fraction * 2**64


def documents() -> Iterator[tuple[str, str, str]]:
    """(title, url, text) of every document, topics first, then modules, each group sorted."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    from pydoc_data.topics import topics  # a plain dict literal: importing it runs no code of note

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield f"topic/{name}", f"https://docs.python.org/{version}/reference/topics.html#{name}", text
    for module, text in module_docs(stdlib_dir()):
        top = module.split(".")[0]
        yield f"module/{module}", f"https://docs.python.org/{version}/library/{top}.html#module-{module}", text


def stdlib_dir() -> Path:
    # The directory of a pure-Python stdlib module; sysconfig's "stdlib" can point elsewhere in venvs.
    return Path(os.__file__).resolve().parent


def module_docs(root: Path) -> Iterator[tuple[str, str]]:
    """(module name, pydoc-like text of its docstrings) for each documented module under root."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and not (Path(dirpath) / "__init__.py").is_file():
            dirnames[:] = []  # not a package: data or script directories
            continue
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            parts = rel_dir.parts + (() if name == "__init__.py" else (name[:-3],))
            if not parts:
                continue
            text = _module_text(path, ".".join(parts))
            if text:
                yield ".".join(parts), text


def _module_text(path: Path, module: str) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours the PEP 263 coding line; reads, never imports
            tree = ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None  # e.g. deliberately broken files: they carry no documentation
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(doc)
    sections.extend(_member_docs(tree, ""))
    if not sections:
        return None
    return f"{module}\n\n" + "\n\n".join(sections)


def _member_docs(node: ast.AST, prefix: str) -> Iterator[str]:
    for child in node.body:
        if isinstance(child, ast.ClassDef):
            qual = prefix + child.name
            bases = ", ".join(ast.unparse(b) for b in child.bases)
            doc = ast.get_docstring(child)
            if doc:
                yield f"class {qual}" + (f"({bases})" if bases else "") + "\n" + doc
            yield from _member_docs(child, qual + ".")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(child)
            if doc:
                kw = "async def" if isinstance(child, ast.AsyncFunctionDef) else "def"
                ret = f" -> {ast.unparse(child.returns)}" if child.returns else ""
                yield f"{kw} {prefix}{child.name}({ast.unparse(child.args)}){ret}\n{doc}"


def _write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _count(train_paths: list[Path], valid_paths: list[Path]) -> dict:
    counts = {"documents": {}, "chars": {}}
    for split, paths in (("train", train_paths), ("valid", valid_paths)):
        n = chars = 0
        for p in paths:
            try:
                with gzip.open(p, "rt", encoding="utf-8") as f:
                    for line in f:
                        n += 1
                        chars += len(json.loads(line)["text"])
            except (OSError, EOFError, ValueError, KeyError) as e:
                raise LlamatronError(f"{p}: existing corpus shard is unreadable ({e}); delete it to rebuild") from None
        counts["documents"][split] = n
        counts["chars"][split] = chars
    return counts
