"""The figures of a run that people quote, computed from its rows.

Definitions (docs/report.md has them too):
- training time: the sum over `train` rows of step_time_s x the steps the row covers (a row is the
  mean over its log interval, which starts at the previous train row, or at the job's start);
- tokens/s, MFU: the median over `train` rows, leaving out each job's first row when the job has more
  (it holds compilation and allocator warm-up);
- peak memory: the largest peak_mem_gib of any row (the largest rank's);
- time to target: the first validation at or below the target (mlperf.target, or the MLPerf rules'
  target in MLPerf mode); with an MLPerf log, run_start to run_stop is the time to train.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from llamatron.report.load import Run

MLPERF_TARGETS = {"llama31_8b": 3.3, "llama31_405b": 5.6}  # llamatron/mlperf.py: TARGET


@dataclass
class Summary:
    name: str
    model: str | None = None
    layout: str | None = None
    device: str | None = None
    world_size: int | None = None
    seq_len: int | None = None
    global_batch: int | None = None
    steps: int = 0  # the last step trained
    planned_steps: int | None = None
    tokens: int = 0  # tokens trained (consumed samples x seq_len)
    jobs: int = 0
    train_time_s: float = 0.0
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    tflops_per_gpu: float | None = None
    step_time_s: float | None = None
    peak_mem_gib: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss)
    best_val: tuple[int, float] | None = None
    target: float | None = None
    target_step: int | None = None
    time_to_target_s: float | None = None
    mlperf_status: str | None = None
    mlperf_time_to_train_s: float | None = None
    skipped_steps: int = 0
    nonfinite: list[dict] = field(default_factory=list)
    spikes: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    eval_time_s: float = 0.0
    env: dict = field(default_factory=dict)  # the newest job's env row
    zero_shot: dict[str, tuple[int, float]] = field(default_factory=dict)  # task metric -> (step, last value)
    routing: dict | None = None  # a mixture of experts' last train row with router statistics (moe_* keys)
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_save_s(self) -> float | None:
        saves = [c["save_s"] for c in self.checkpoints if isinstance(c.get("save_s"), (int, float))]
        return statistics.median(saves) if saves else None

    @property
    def checkpoint_stall_s(self) -> float:
        return sum(c.get("stall_s") or 0.0 for c in self.checkpoints)


def summarize(run: Run, target: float | None = None) -> Summary:
    cfg = run.config
    s = Summary(run.name, notes=list(run.notes))
    s.model = _get(cfg, "model", "size")
    if _get(cfg, "model", "n_layers") is not None:
        s.model += f" ({cfg['model']['n_layers']} layers)"
    s.seq_len = _get(cfg, "data", "seq_len")
    s.global_batch = _get(cfg, "train", "global_batch_size")
    s.planned_steps = _get(cfg, "train", "steps")
    envs = run.of("env")
    s.jobs = max(len(envs), len(run.of("resume")) + 1)
    if envs:
        s.env = envs[-1]
        s.device, s.world_size = s.env.get("device"), s.env.get("world_size")
    s.layout = _layout(cfg.get("parallel") or {}, s.world_size)
    _throughput(run, s)
    _validation(run, s, target if target is not None else _target(cfg))
    _mlperf(run, s)
    s.nonfinite, s.spikes, s.checkpoints = run.of("nonfinite"), run.of("grad_spike"), run.of("checkpoint")
    for row in run.of("zero_shot"):  # eval.tasks: one row per validation, a key per task metric
        s.zero_shot.update({k: (row["step"], v) for k, v in zero_shot_metrics(row).items()})
    s.routing = next((r for r in reversed(run.of("train")) if isinstance(r.get("moe_aux_loss"), (int, float))), None)
    return s


def zero_shot_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("kind", "step", "zero_shot_s")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _get(cfg: dict, section: str, key: str):
    return (cfg.get(section) or {}).get(key)


def _layout(p: dict, world_size: int | None) -> str | None:
    if not p:
        return None
    p = dict(p)
    if p.get("dp_shard", -1) == -1:  # -1 fills the world size
        fixed = (p.get("dp_replicate") or 1) * (p.get("cp") or 1) * (p.get("tp") or 1) * (p.get("pp") or 1)
        p["dp_shard"] = world_size // fixed if world_size else "rest"
    parts = [f"{k} {p[k]}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp") if p.get(k, 1) != 1]
    if (p.get("pp") or 1) > 1:
        parts.append(f"{p.get('pp_schedule', 'auto')} schedule, {p.get('pp_virtual_stages', 1)} stage(s) per rank")
    return ", ".join(parts) or "one process"


def _target(cfg: dict) -> float | None:
    mlperf = cfg.get("mlperf") or {}
    if mlperf.get("target") is not None:
        return float(mlperf["target"])
    return MLPERF_TARGETS.get(mlperf.get("benchmark") or "")


def train_intervals(run: Run) -> list[tuple[dict, int, bool]]:
    """(train row, steps it covers, first row of its job) in file order. A job starts with its env
    row (or, in runs older than env rows, its resume row)."""
    out, start, first = [], 0, True
    for row in run.rows:
        if row["kind"] in ("env", "resume"):
            start, first = row["step"], True
        elif row["kind"] == "train":
            out.append((row, max(row["step"] - start, 1), first))
            start, first = row["step"], False
    return out


def _steady(intervals: list[tuple[dict, int, bool]]) -> list[dict]:
    """Train rows without each job's warm-up row (all rows when that leaves none)."""
    return [r for r, _, first in intervals if not first] or [r for r, _, _ in intervals]


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _throughput(run: Run, s: Summary) -> None:
    intervals = train_intervals(run)
    if not intervals:
        return
    rows = [r for r, _, _ in intervals]
    steady = _steady(intervals)
    s.steps = rows[-1]["step"]
    s.train_time_s = sum(r["step_time_s"] * n for r, n, _ in intervals if isinstance(r.get("step_time_s"), (int, float)))
    for key in ("tokens_per_s", "tokens_per_s_per_gpu", "mfu", "tflops_per_gpu", "step_time_s"):
        setattr(s, key, _median(steady, key))
    peaks = [r["peak_mem_gib"] for r in run.rows if isinstance(r.get("peak_mem_gib"), (int, float))]
    s.peak_mem_gib = max(peaks) if peaks else None
    s.first_loss, s.final_loss = rows[0].get("loss"), rows[-1].get("loss")
    if s.seq_len and isinstance(rows[-1].get("consumed_samples"), int):
        s.tokens = rows[-1]["consumed_samples"] * s.seq_len
    s.skipped_steps = max((r.get("skipped_steps") or 0) for r in rows)


def _validation(run: Run, s: Summary, target: float | None) -> None:
    evals = [r for r in run.of("eval") if isinstance(r.get("val_loss"), (int, float))]
    s.validation = [(r["step"], r["val_loss"]) for r in evals]
    s.eval_time_s = sum(r.get("eval_s") or 0.0 for r in evals)
    if s.validation:
        s.best_val = min(s.validation, key=lambda sv: sv[1])
    s.target = target
    if target is None:
        return
    hit = next((step for step, v in s.validation if v <= target), None)
    if hit is None:
        return
    s.target_step = hit
    s.time_to_target_s = sum(r["step_time_s"] * n for r, n, _ in train_intervals(run)
                             if r["step"] <= hit and isinstance(r.get("step_time_s"), (int, float)))


def _mlperf(run: Run, s: Summary) -> None:
    starts = [e for e in run.mlperf if e["key"] == "run_start"]
    stops = [e for e in run.mlperf if e["key"] == "run_stop"]
    if stops:
        s.mlperf_status = (stops[-1].get("metadata") or {}).get("status")
    if starts and stops and isinstance(stops[-1].get("time_ms"), (int, float)):
        s.mlperf_time_to_train_s = (stops[-1]["time_ms"] - starts[0]["time_ms"]) / 1000
