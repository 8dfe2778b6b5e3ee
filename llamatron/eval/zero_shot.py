"""Zero-shot tasks during training (`eval.tasks`): the built-in tasks scored on the run's own layout
at the validation cadence, through the `Validator`.

The data files are read and the tokenizer loaded when the run starts, so a bad file fails then, not
at the first validation; every rank scores the same requests (data-parallel ranks split them).
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatron.errors import LlamatronError
from llamatron.eval.tasks import Scorer, Task, get_task, read_jsonl, run_task
from llamatron.parallel.layout import Layout


def parse_task_files(entries: list[str], key: str = "eval.tasks") -> list[tuple[str, str]]:
    """["lambada=PATH", ...] -> [(name, path)]."""
    out = []
    for item in entries:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LlamatronError(f"config key '{key}': entry {item!r} must be NAME=PATH.jsonl (e.g. lambada=data/lambada.jsonl)")
        out.append((name, path))
    return out


@dataclass
class ZeroShot:
    tasks: list[tuple[Task, list[dict]]]
    tokenizer: object
    batch_size: int
    device: object
    precision: object
    prompt: str = "harness"

    @classmethod
    def from_config(cls, ev, tokenizer_name: str, vocab_size: int, layout: Layout, device, precision):
        """From the `[eval]` section, or None without `eval.tasks`."""
        from llamatron.tokenizer import load_tokenizer

        if not ev.tasks:
            return None
        if layout.pipeline is not None or layout.dims.cp > 1:
            raise LlamatronError("config key 'eval.tasks': zero-shot tasks need whole sequences on a rank; "
                                 "not with parallel.pp > 1 or parallel.cp > 1")
        tok = load_tokenizer(tokenizer_name)
        if tok.vocab_size > vocab_size:
            raise LlamatronError(f"config key 'eval.tasks': tokenizer {tok.name} has {tok.vocab_size} tokens, more "
                                 f"than the model's vocabulary of {vocab_size}")
        tasks = []
        for name, path in parse_task_files(ev.tasks):
            task = get_task(name)
            tasks.append((task, read_jsonl(path, task.fields, ev.tasks_limit)))
        return cls(tasks, tok, ev.tasks_batch_size, device, precision, ev.tasks_prompt)

    def __call__(self, layout: Layout) -> dict[str, float]:
        """{"TASK/METRIC": value} for every task."""
        # Never compiled here: that would compile the run's own blocks in place, for training too
        # (`train.compile` decides that).
        scorer = Scorer(layout, self.tokenizer, self.batch_size, self.device, self.precision, compile=False)
        out = {}
        for task, docs in self.tasks:
            for metric, m in run_task(task, docs, scorer, self.prompt)["metrics"].items():
                out[f"{task.name}/{metric}"] = m["value"]
        return out
