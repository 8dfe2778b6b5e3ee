"""The MLPerf Training rules for Llama 3.1 8B and 405B: what they fix, what they derive from the global
batch size, and the evaluation cadences (REFERENCE.md A.1, A.2, A.5).

`apply_rules` fills the derived values into a config, except the keys the user set explicitly (in the
file or with --set), so `--set train.global_batch_size=2304` recomputes the 405B learning rate,
warmup, schedule length and first evaluation. `check_rules` rejects, in the closed division, what
would make the log fail the MLPerf compliance checker; `rule_notes` lists deviations from the rules
that the checker cannot see. Writing the log is `llamatron/train/mlperf_log.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamatron.errors import LlamatronError

if TYPE_CHECKING:
    from llamatron.config import Config

BENCHMARKS = ("llama31_8b", "llama31_405b")
CADENCES = ("rules", "readme")
DIVISIONS = ("closed", "open")
STATUSES = ("onprem", "cloud", "research")

SEQ_LEN = 8192
TARGET = {"llama31_8b": 3.3, "llama31_405b": 5.6}  # validation log perplexity (mean token NLL, nats)
# AdamW and clipping, the same for both (A.1); the checker tests each value exactly.
OPTIMIZER = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-5, "weight_decay": 0.1, "grad_clip": 1.0}

# 8B: the schedule is 1,200,000 steps whatever the batch; peak LR and warmup are the submitter's, and
# the reference convergence points (mlperf-logging rcps_llama31_8b.json) are the tested choices:
# global batch -> (peak LR, warmup in samples). 16348 is the file's value (16384 was likely meant;
# both give 171 steps at 96).
MAX_STEPS_8B = 1_200_000
RCP_8B = {16: (4e-4, 256), 32: (8e-4, 4096), 64: (8e-4, 6144), 96: (1e-3, 16348), 128: (2e-3, 32768)}

# 405B: everything scales from the reference batch of 1152 (Llama 3.1 paper 3.4.1 numbers).
BASE_GBS_405B = 1152
GBS_RANGE_405B = (1152, 9216)
END_LR_405B = 8e-7


@dataclass(frozen=True)
class Schedule:
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int  # the cosine's length (optim.schedule_steps), logged as max_steps


def schedule_405b(gbs: int) -> Schedule:
    """lr = 8e-5 x GBS/1152, warmup ceil(8000 x 1152/GBS), max steps ceil(1,200,000 x 1152/GBS), end 8e-7.

    The reference rounds the LR to 8 decimals; that breaks the checker's exact test
    `lr * 1152 == GBS * 8e-5` at batches such as 1536, so the LR is not rounded here. (For about one
    batch size in ten no float passes that test at all, e.g. 1984; those cannot make a clean log.)
    """
    return Schedule(
        lr=8e-5 * gbs / BASE_GBS_405B,
        min_lr=END_LR_405B,
        warmup_steps=math.ceil(8000 * BASE_GBS_405B / gbs),
        max_steps=math.ceil(1_200_000 * BASE_GBS_405B / gbs),
    )


def schedule_8b(gbs: int, lr: float | None = None, warmup_steps: int | None = None) -> Schedule:
    """max steps 1,200,000, end LR 0.1 x peak; peak and warmup given, or the RCP table's for this batch."""
    if lr is None or warmup_steps is None:
        if gbs not in RCP_8B:
            missing = "optim.lr" if lr is None else "optim.warmup_steps"
            raise LlamatronError(
                f"config key '{missing}': llama31_8b has no reference value for global batch {gbs} (the RCPs "
                f"are for {', '.join(map(str, RCP_8B))}); set optim.lr and optim.warmup_steps"
            )
        rcp_lr, rcp_warmup_samples = RCP_8B[gbs]
        lr = rcp_lr if lr is None else lr
        warmup_steps = math.ceil(rcp_warmup_samples / gbs) if warmup_steps is None else warmup_steps
    return Schedule(lr=lr, min_lr=0.1 * lr, warmup_steps=warmup_steps, max_steps=MAX_STEPS_8B)


@dataclass(frozen=True)
class Cadence:
    every_samples: int  # a validation every this many training sequences (ceil(every/GBS) steps)
    first_interval: int  # the first one after this many intervals
    samples: int  # validation sequences scored, the first ones of the file in order


def eval_cadence(benchmark: str, name: str, gbs: int) -> Cadence:
    """rules: the current rules (8B every 12,288 sequences over 1,024; 405B every 18,432 over 5,760,
    skipping the first floor(0.0026 x GBS + 12) evaluations); readme: the seed README's (every
    46,080 over 5,760).

    405B: the reference's first validation is at step 18432 x floor(0.0026 x GBS + 12) / GBS (224 at
    1152, i.e. 258,048 sequences), so the skipped evaluations count one at 0 sequences: the first is
    at the end of interval floor(0.0026 x GBS + 12).
    """
    if name == "readme":
        return Cadence(46_080, 1, 5_760)
    if benchmark == "llama31_8b":
        return Cadence(12_288, 1, 1_024)
    return Cadence(18_432, math.floor(0.0026 * gbs + 12), 5_760)


def schedule_for(cfg: "Config", explicit: set[str] = frozenset()) -> Schedule:
    gbs = cfg.train.global_batch_size
    if cfg.mlperf.benchmark == "llama31_405b":
        return schedule_405b(gbs)
    optim = cfg.optim
    return schedule_8b(gbs, optim.lr if "optim.lr" in explicit else None,
                       optim.warmup_steps if "optim.warmup_steps" in explicit else None)


def apply_rules(cfg: "Config", explicit: set[str]) -> None:
    """Fill in what the rules derive from the global batch size (and the target), leaving alone every
    key in `explicit` ("section.key" names the user set). A no-op outside MLPerf mode."""
    mlperf_cfg = cfg.mlperf
    if not mlperf_cfg.benchmark:
        return
    check_keys(cfg)
    if cfg.train.global_batch_size <= 0:
        return  # validate_config names the key
    s = schedule_for(cfg, explicit)
    cad = eval_cadence(mlperf_cfg.benchmark, mlperf_cfg.eval_cadence, cfg.train.global_batch_size)
    derived = {
        "optim.lr": s.lr, "optim.min_lr": s.min_lr, "optim.warmup_steps": s.warmup_steps,
        "optim.schedule_steps": s.max_steps,
        # The reference trains for at most max_steps, and sizes the training sample index for them:
        # the same size gives the same sample order. The run stops at the target long before.
        "train.steps": s.max_steps,
        "eval.every_samples": cad.every_samples, "eval.first_interval": cad.first_interval,
        "eval.samples": cad.samples,
        "mlperf.target": TARGET[mlperf_cfg.benchmark],
    }
    if "optim.lr" in explicit and mlperf_cfg.benchmark == "llama31_8b":
        derived["optim.min_lr"] = 0.1 * cfg.optim.lr  # 0.1 x the chosen peak
    for dotted, value in derived.items():
        if dotted in explicit:
            continue
        section, key = dotted.split(".")
        if key == "target" and mlperf_cfg.target is not None:
            continue
        setattr(getattr(cfg, section), key, value)


def check_keys(cfg: "Config") -> None:
    """The [mlperf] keys themselves."""
    mlperf_cfg = cfg.mlperf
    if mlperf_cfg.benchmark not in ("",) + BENCHMARKS:
        raise LlamatronError(f"config key 'mlperf.benchmark': {mlperf_cfg.benchmark!r} is not one of "
                             f"{', '.join(BENCHMARKS)} (or empty for no MLPerf mode)")
    for key, value, allowed in (("eval_cadence", mlperf_cfg.eval_cadence, CADENCES), ("division", mlperf_cfg.division, DIVISIONS),
                                ("status", mlperf_cfg.status, STATUSES)):
        if value not in allowed:
            raise LlamatronError(f"config key 'mlperf.{key}': {value!r} is not one of {', '.join(allowed)}")
    if mlperf_cfg.target is not None and not mlperf_cfg.target > 0:
        raise LlamatronError(f"config key 'mlperf.target': must be a positive log perplexity, got {mlperf_cfg.target}")
    if mlperf_cfg.benchmark and not mlperf_cfg.org.strip():
        raise LlamatronError("config key 'mlperf.org': the submitting organisation must not be empty")


def check_rules(cfg: "Config") -> None:
    """MLPerf mode: what the run needs, and in the closed division every value the compliance checker
    tests, so a long run cannot end with a log that fails it. Raises on the first problem."""
    check_keys(cfg)
    mlperf_cfg = cfg.mlperf
    if not mlperf_cfg.benchmark:
        return

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise LlamatronError(f"config key '{key}': {rule}")

    need(cfg.eval.samples > 0 and (cfg.data.mock or bool(cfg.data.valid)), "data.valid",
         "MLPerf mode stops at a validation target: give a validation prefix and eval.samples > 0")
    need(cfg.eval.every_samples > 0 or cfg.eval.every > 0, "eval.every_samples",
         "MLPerf mode needs validations during training (eval.every_samples > 0)")
    if mlperf_cfg.division != "closed":
        return
    why = f"the closed-division rules of {mlperf_cfg.benchmark} (set mlperf.division=open to run it anyway)"
    target = TARGET[mlperf_cfg.benchmark]
    need(mlperf_cfg.target is None or mlperf_cfg.target <= target, "mlperf.target",
         f"{mlperf_cfg.target} is above the target {target} of {why}")
    need(cfg.data.seq_len == SEQ_LEN, "data.seq_len", f"{cfg.data.seq_len} is not the {SEQ_LEN} of {why}")
    for key, value in OPTIMIZER.items():
        have = getattr(cfg.optim, key)
        need(have == value, f"optim.{key}", f"{have} is not the {value} of {why}")
    rules_samples = eval_cadence(mlperf_cfg.benchmark, "rules", cfg.train.global_batch_size).samples
    need(cfg.eval.samples == rules_samples, "eval.samples",
         f"{cfg.eval.samples} validation sequences is not the {rules_samples} of {why}")
    gbs, optim = cfg.train.global_batch_size, cfg.optim
    if mlperf_cfg.benchmark == "llama31_8b":
        need(optim.schedule_steps == MAX_STEPS_8B, "optim.schedule_steps",
             f"{optim.schedule_steps} is not the {MAX_STEPS_8B:,} steps of {why}")
    else:
        s = schedule_405b(gbs)
        # The checker's own test, in floating point.
        if optim.lr * BASE_GBS_405B != gbs * 8e-5:
            need(optim.lr != s.lr, "train.global_batch_size",
                 f"at {gbs} no float learning rate passes the compliance checker's exact test "
                 f"lr x 1152 == GBS x 8e-5; choose another global batch size for the closed division")
            need(False, "optim.lr", f"{optim.lr} is not 8e-5 x {gbs}/{BASE_GBS_405B} = {s.lr} of {why}")
        need(optim.warmup_steps == s.warmup_steps, "optim.warmup_steps",
             f"{optim.warmup_steps} is not ceil(8000 x 1152/{gbs}) = {s.warmup_steps} of {why}")
        need(optim.schedule_steps == s.max_steps, "optim.schedule_steps",
             f"{optim.schedule_steps} is not ceil(1,200,000 x 1152/{gbs}) = {s.max_steps} of {why}")
        need(bool(cfg.checkpoint.init_from), "checkpoint.init_from",
             "the closed-division llama31_405b starts from Meta's Llama 3.1 405B weights: import them with "
             "`llamatron convert --from hf --to llamatron SRC DST` and set checkpoint.init_from=DST "
             "(or mlperf.division=open)")


def rule_notes(cfg: "Config") -> list[str]:
    """Deviations from the rules that the compliance checker cannot see in the log (one line each)."""
    mlperf_cfg = cfg.mlperf
    if not mlperf_cfg.benchmark:
        return []
    gbs, optim, ev = cfg.train.global_batch_size, cfg.optim, cfg.eval
    notes = []
    cad = eval_cadence(mlperf_cfg.benchmark, mlperf_cfg.eval_cadence, gbs)
    if (ev.every_samples, ev.first_interval) != (cad.every_samples, cad.first_interval):
        notes.append(f"validation every {ev.every_samples} sequences from interval {ev.first_interval}, not the "
                     f"{mlperf_cfg.eval_cadence} cadence (every {cad.every_samples} from interval {cad.first_interval})")
    if mlperf_cfg.benchmark == "llama31_8b":
        if not math.isclose(optim.min_lr, 0.1 * optim.lr, rel_tol=1e-9):
            notes.append(f"optim.min_lr {optim.min_lr} is not 0.1 x optim.lr = {0.1 * optim.lr}")
    else:
        lo, hi = GBS_RANGE_405B
        if not lo <= gbs <= hi:
            notes.append(f"train.global_batch_size {gbs} is outside the rules' {lo}-{hi}")
        if optim.min_lr != END_LR_405B:
            notes.append(f"optim.min_lr {optim.min_lr} is not the rules' {END_LR_405B}")
    if mlperf_cfg.target is not None and mlperf_cfg.target != TARGET[mlperf_cfg.benchmark]:
        notes.append(f"mlperf.target {mlperf_cfg.target} is not the rules' {TARGET[mlperf_cfg.benchmark]}")
    return notes
