"""Reading a run directory: metrics.jsonl, config.yaml and (MLPerf mode) mlperf.log.

metrics.jsonl is appended to line by line while a run trains, so its last line may be cut short (a
live run, or one killed mid-write): that line alone is skipped, with a note. Any other line that is
not a JSON object with a "kind" is damage, and is reported as one line naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llamatron.errors import LlamatronError

MLLOG_PREFIX = ":::MLLOG "


@dataclass
class Run:
    path: Path
    rows: list[dict]  # metrics rows in file order, rows of work redone after a resume removed
    config: dict = field(default_factory=dict)  # config.yaml as sections of keys ({} if absent)
    mlperf: list[dict] = field(default_factory=list)  # mlperf.log events ({"key", "value", "time_ms", ...})
    notes: list[str] = field(default_factory=list)  # what was tolerated while reading

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == kind]


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise LlamatronError(f"{path}: not a run directory (no metrics.jsonl)")
    rows, notes = read_metrics(metrics)
    rows, superseded = drop_superseded(rows)
    if superseded:
        notes.append(f"{superseded} row(s) of work redone after a resume are left out")
    run = Run(path, rows, read_config(path / "config.yaml"), notes=notes)
    if (path / "mlperf.log").is_file():
        run.mlperf = read_mllog(path / "mlperf.log", notes)
    return run


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    complete = text.endswith("\n")
    if complete:
        lines.pop()  # the empty string after the final newline
    rows, notes = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not complete:
                notes.append(f"{path}:{number}: last line incomplete (run still writing, or stopped mid-write); skipped")
                break
            raise LlamatronError(f"{path}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("kind"), str) or not isinstance(row.get("step"), int):
            raise LlamatronError(f"{path}:{number}: expected a JSON object with \"kind\" (a string) and \"step\" "
                                 f"(an integer), got {line[:60]!r}")
        rows.append(row)
    return rows, notes


def drop_superseded(rows: list[dict]) -> tuple[list[dict], int]:
    """A `resume` row at step s means the job before it got further than its newest checkpoint: its
    train/eval rows after s describe work that was lost and redone, so the later job's rows win."""
    kept: list[dict] = []
    dropped = 0
    for row in rows:
        if row["kind"] == "resume":
            before = len(kept)
            kept = [r for r in kept if r["kind"] not in ("train", "eval") or r["step"] <= row["step"]]
            dropped += before - len(kept)
        kept.append(row)
    return kept, dropped


def read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LlamatronError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LlamatronError(f"{path}: expected sections of keys, got {type(data).__name__}")
    return data


def read_mllog(path: Path, notes: list[str]) -> list[dict]:
    """The `:::MLLOG {...}` events of an MLPerf log (other lines, e.g. warnings, are not events)."""
    events = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.startswith(MLLOG_PREFIX):
            continue
        try:
            event = json.loads(line[len(MLLOG_PREFIX):])
        except json.JSONDecodeError as e:
            if number == len(lines):
                notes.append(f"{path}:{number}: last line incomplete; skipped")
                break
            raise LlamatronError(f"{path}:{number}: MLLOG event is not JSON ({e.msg} at column {e.colno})") from None
        if isinstance(event, dict) and "key" in event:
            events.append(event)
    return events
