"""Built-in zero-shot tasks: a task is a prompt builder (doc -> (context, continuation) strings) and a
metric (doc + scores -> per-item values, aggregated over items).

Data comes from local JSONL files in lm-evaluation-harness's field layout (no downloads); every
request goes through `loglikelihood.py`, the same path as the lm-eval adapter. Adding a task is a
module here defining a `Task` and its name in `TASKS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamatron.errors import LlamatronError
from llamatron.eval.loglikelihood import encode_pair, loglikelihoods

PROMPTS = ("harness", "pax")


@dataclass(frozen=True)
class Task:
    name: str
    # JSON fields each line must have; a tuple of names is alternatives (the first present is used).
    fields: tuple[str | tuple[str, ...], ...]
    # (doc, prompt style) -> the (context, continuation) strings to score.
    requests: Callable[[dict, str], list[tuple[str, str]]]
    # (doc, [(log-likelihood, is_greedy)] of its requests) -> per-item metric values.
    score: Callable[[dict, list[tuple[float, bool]]], dict[str, float]]
    # metric -> "mean" (with standard error) or "perplexity" (exp of minus the mean log-likelihood).
    aggregation: dict[str, str]
    default_file: str  # looked for in --data-dir


def tasks() -> dict[str, Task]:
    from llamatron.eval.tasks import boolq, lambada

    return {t.name: t for t in (lambada.TASK, boolq.TASK)}


def get_task(name: str) -> Task:
    known = tasks()
    if name not in known:
        raise LlamatronError(f"unknown task {name!r}; built in: {', '.join(known)} (any lm-eval task: harness:NAME)")
    return known[name]


def field(doc: dict, name: str | tuple[str, ...]):
    """The value of a field (the first present of alternatives); docs are checked on reading."""
    for n in (name,) if isinstance(name, str) else name:
        if n in doc:
            return doc[n]
    raise KeyError(name)


def read_jsonl(path: str | Path, fields: Sequence[str | tuple[str, ...]], limit: int | None = None) -> list[dict]:
    """The first `limit` JSON objects of a JSONL file, each checked to hold `fields`."""
    path = Path(path)
    if not path.is_file():
        raise LlamatronError(f"{path}: no such data file")
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise LlamatronError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except ValueError as e:
                raise LlamatronError(f"{path}:{lineno}: not valid JSON ({e})") from None
            for name in fields:
                names = (name,) if isinstance(name, str) else name
                if not isinstance(doc, dict) or not any(n in doc for n in names):
                    raise LlamatronError(f"{path}:{lineno}: no field {' or '.join(map(repr, names))}; expected "
                                         f"one JSON object per line with {', '.join(_field_names(fields))}")
            docs.append(doc)
    if not docs:
        raise LlamatronError(f"{path}: no JSON lines; expected one object per line with "
                             f"{', '.join(_field_names(fields))}")
    return docs


def _field_names(fields) -> list[str]:
    return [repr(f) if isinstance(f, str) else "/".join(map(repr, f)) for f in fields]


class Scorer:
    """Strings -> (log-likelihood, is_greedy), through the model and tokenizer given. `compile`
    (None: on CUDA) compiles the model's blocks in place for scoring (`loglikelihoods`)."""

    def __init__(self, model, tokenizer, batch_size: int, device, precision=None, add_bos: bool = False,
                 max_len: int | None = None, compile: bool | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device, self.precision, self.add_bos, self.max_len = device, precision, add_bos, max_len
        self.compile = compile
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        reqs = [encode_pair(self.tokenizer, c, x, self.prefix_id, self.add_bos) for c, x in pairs]
        return loglikelihoods(self.model, reqs, self.batch_size, self.device, self.precision, self.max_len,
                              self.compile)


def aggregate(values: list[float], how: str) -> tuple[float, float | None]:
    """(value, standard error) over items; the harness's definitions (stderr with n - 1)."""
    n = len(values)
    mean = sum(values) / n
    if how == "perplexity":
        return math.exp(-mean), None
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return mean, stderr


def run_task(task: Task, docs: list[dict], scorer: Callable, prompt: str = "harness") -> dict:
    """Score every doc: {"metrics": {name: {"value", "stderr"}}, "count", "items": per-doc values}."""
    if prompt not in PROMPTS:
        raise LlamatronError(f"prompt style {prompt!r}: expected one of {', '.join(PROMPTS)}")
    per_doc = [task.requests(d, prompt) for d in docs]
    flat = scorer([r for reqs in per_doc for r in reqs])
    items, at = [], 0
    for doc, reqs in zip(docs, per_doc):
        items.append(task.score(doc, flat[at : at + len(reqs)]))
        at += len(reqs)
    metrics = {}
    for name, how in task.aggregation.items():
        value, stderr = aggregate([it[name] for it in items], how)
        metrics[name] = {"value": value, "stderr": stderr}
    return {"metrics": metrics, "count": len(docs), "prompt": prompt, "items": items}
