"""The MLPerf log of a run in MLPerf mode: `:::MLLOG` lines through the mlperf-logging package's
`mllog`, written by rank 0 to OUT/mlperf.log, in the reference's order (REFERENCE.md A.5):

    cache_clear, init_start                                       job start, before data and model
    submission_*, the config keys, max_steps, the 6.1 disclosure keys, init_stop, run_start
    epoch_start, block_start                                      training begins
    block_stop, eval_start, eval_accuracy, eval_stop, block_start at every validation
    epoch_stop, run_stop (status), train_samples                  at the target, or out of steps

samples_count is optimizer steps x global batch, from 0, including steps of earlier jobs.

One run, one log, whatever the number of jobs. Each checkpoint records how long the log was when it
was written; a job that resumes from it moves whatever earlier jobs logged after that point (work
that is now redone) to OUT/mlperf_superseded.log and continues the log from there, without a second
init or run_start. Time to train is run_start to run_stop, so it includes the time between jobs.

Every rank keeps the state (target reached, status) so that all of them stop together; only rank 0
writes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from llamatron import mlperf as rules
from llamatron.config import Config
from llamatron.errors import LlamatronError

LOG_NAME = "mlperf.log"
SUPERSEDED_NAME = "mlperf_superseded.log"


def drop_page_cache() -> bool:
    """Empty the OS page cache, as MLPerf asks before a run (so data is read from storage, not memory).
    Needs Linux and root; False where it cannot."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class _AppendHandler(logging.Handler):
    """Each line appended and the file closed again: a job killed at any moment leaves whole lines,
    and the file's length is exactly what a checkpoint records."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        with open(self.path, "a") as f:
            f.write(self.format(record) + "\n")


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLPerfLog:
    """Created at job start (`enabled` false outside MLPerf mode: every method is then a no-op, so the
    trainer calls them unconditionally)."""

    def __init__(self, cfg: Config, out_dir: str | Path, *, write: bool, log=print):
        self.cfg = cfg
        self.enabled = bool(cfg.mlperf.benchmark)
        self.path = Path(out_dir) / LOG_NAME
        self.log = log
        self.done = False  # target reached, or the run already ended: the trainer stops
        self.status: str | None = None  # success / aborted once run_stop is written
        self.run_start_ms: int | None = None
        self.run_stop_ms: int | None = None
        self._end_offset: int | None = None  # log length before the end lines
        self._init_ms = _now_ms()
        self._mllog = None
        if not self.enabled:
            return
        self.target = cfg.mlperf.target if cfg.mlperf.target is not None else rules.TARGET[cfg.mlperf.benchmark]
        # One process per host clears its page cache; rank 0 logs what happened on its host.
        first_on_host = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self._cache_cleared = cfg.mlperf.clear_caches and first_on_host and drop_page_cache()
        if write:
            from mlperf_logging.mllog import mllog

            # A logger of our own (not the package's shared one, which keeps adding file handlers),
            # writing only to the run's log file.
            logger = logging.Logger(f"llamatron.mlperf.{id(self)}")
            handler = _AppendHandler(self.path)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            # stack offset 2: metadata names the caller of `_event` (file and line in this module).
            self._mllog = mllog.MLLogger(logger=logger, default_stack_offset=2,
                                        root_dir=str(Path(__file__).parents[2]))

    # ----------------------------------------------------------------------------------------------

    def _event(self, kind: str, key: str, value=None, metadata: dict | None = None, time_ms: int | None = None):
        if self._mllog is not None:
            getattr(self._mllog, kind)(key=key, value=value, metadata=metadata, time_ms=time_ms)

    def _size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def _supersede(self, keep: int) -> None:
        """Cut the log back to `keep` bytes; the cut lines go to the superseded log."""
        if self._mllog is None:
            return
        size = self._size()
        if size < keep:
            raise LlamatronError(f"{self.path}: {size} bytes, but the checkpoint was written when the log had "
                                 f"{keep}; the MLPerf log of this run is incomplete (start over with "
                                 f"checkpoint.resume=false)")
        if size == keep:
            return
        with open(self.path, "rb") as f:
            f.seek(keep)
            tail = f.read()
        with open(self.path.with_name(SUPERSEDED_NAME), "ab") as f:
            f.write(tail)
        os.truncate(self.path, keep)
        lines = tail.count(b"\n")
        self.log(f"MLPerf log: {lines} lines logged after the checkpoint moved to {SUPERSEDED_NAME}")

    def state(self) -> dict:
        """What a checkpoint records (the trainer adds it to trainer_state.json)."""
        if not self.enabled:
            return {}
        return {"mlperf": {"log_bytes": self._size() if self._end_offset is None else self._end_offset,
                           "status": self.status, "run_start_ms": self.run_start_ms,
                           "run_stop_ms": self.run_stop_ms}}

    @property
    def time_to_train_s(self) -> float | None:
        if self.run_start_ms is None or self.run_stop_ms is None:
            return None
        return (self.run_stop_ms - self.run_start_ms) / 1000

    # ----------------------------------------------------------------------------------------------
    # The trainer's calls

    def begin(self, step: int, resumed: dict | None, *, accum: int, dims, device_name: str, bf16: bool) -> None:
        """Right before training: a fresh run logs its header and run_start; a resumed one continues its
        log from the checkpoint (`resumed`: its trainer state)."""
        if not self.enabled:
            return
        train = self.cfg.train
        if resumed is not None:
            st = resumed.get("mlperf")
            if st is None:
                raise LlamatronError("config key 'mlperf.benchmark': the checkpoint to resume was written without "
                                     "MLPerf mode, so there is no MLPerf log to continue (start over with "
                                     "checkpoint.resume=false)")
            self.run_start_ms, self.status, self.run_stop_ms = st["run_start_ms"], st["status"], st["run_stop_ms"]
            if self.status == "success" or (self.status is not None and step >= train.steps):
                self.done = True  # the run is over; its log stays as it is
                self.log(f"MLPerf run already ended ({self.status}); nothing to do")
                return
            self.status = self.run_stop_ms = None  # an aborted run given more steps goes on
            self._supersede(st["log_bytes"])
            self.log(f"MLPerf log continues at {step * train.global_batch_size} samples: {self.path}")
            return

        if self._mllog is not None and self._size():
            # A fresh start of a run that logged before (no checkpoint, or resume=false): all redone.
            self._supersede(0)
        for note in rules.rule_notes(self.cfg):
            self.log(f"MLPerf note: {note}")
        self._header(accum, dims, device_name, bf16)
        self.run_start_ms = _now_ms()
        self._event("start", "run_start", time_ms=self.run_start_ms)
        samples = step * train.global_batch_size
        self._event("start", "epoch_start", metadata={"samples_count": samples})
        self._event("start", "block_start", metadata={"samples_count": samples})
        self.log(f"MLPerf log: {self.path} (target validation log perplexity {self.target})")

    def _header(self, accum: int, dims, device_name: str, bf16: bool) -> None:
        cfg, mlperf_cfg, optim = self.cfg, self.cfg.mlperf, self.cfg.optim
        self._event("event", "cache_clear", bool(self._cache_cleared), time_ms=self._init_ms)
        self._event("start", "init_start", time_ms=self._init_ms)
        platform = mlperf_cfg.platform or f"{int(os.environ.get('WORLD_SIZE', '1'))}x{device_name}"
        for key, value in (("submission_benchmark", mlperf_cfg.benchmark), ("submission_org", mlperf_cfg.org),
                           ("submission_division", mlperf_cfg.division), ("submission_status", mlperf_cfg.status),
                           ("submission_platform", platform), ("submission_poc_name", mlperf_cfg.poc_name),
                           ("submission_poc_email", mlperf_cfg.poc_email)):
            self._event("event", key, value)
        precision = "bfloat16" if bf16 else "fp32"
        config = (
            ("global_batch_size", cfg.train.global_batch_size),
            ("gradient_accumulation_steps", accum),
            ("max_sequence_length", cfg.data.seq_len),
            ("eval_samples", cfg.eval.samples),
            ("opt_name", "adamw"),
            ("opt_base_learning_rate", optim.lr),
            ("opt_adamw_beta_1", optim.beta1),
            ("opt_adamw_beta_2", optim.beta2),
            ("opt_adamw_epsilon", optim.eps),
            ("opt_adamw_weight_decay", optim.weight_decay),
            ("opt_gradient_clip_norm", optim.grad_clip),
            ("opt_end_learning_rate", optim.min_lr),
            ("opt_learning_rate_warmup_steps", optim.warmup_steps),
            ("opt_learning_rate_decay_steps", self._max_steps() - optim.warmup_steps),
            ("opt_learning_rate_decay_schedule", "cosine with linear warmup"),
            ("seed", cfg.data.seed),  # the sample-order seed, as the reference logs it
            ("init_checkpoint_step", 0),  # checkpoint.init_from loads weights only: training starts at 0
            # Required by the 8B checker, not emitted by the reference.
            ("max_steps", self._max_steps()),
            # Disclosure keys the 6.1 rules require: bf16 is the lowest precision of the matmuls,
            # attention and what FSDP/TP/PP send (FSDP reduces gradients in fp32).
            ("lowest_numerical_precision_in_linear", precision),
            ("lowest_numerical_precision_in_attn", precision),
            ("lowest_numerical_precision_in_comm", precision),
            ("tensor_parallelism", dims.tp),
            ("pipeline_parallelism", dims.pp),
            ("context_parallelism", dims.cp),
            ("expert_parallelism", 1),
            ("micro_batch_size", cfg.train.micro_batch_size),
            ("config_filename", str(self.path.with_name("config.yaml"))),
        )
        for key, value in config:
            self._event("event", key, value)
        self._event("end", "init_stop")

    def _max_steps(self) -> int:
        optim = self.cfg.optim
        return optim.schedule_steps if optim.schedule_steps is not None else self.cfg.train.steps

    def eval_start(self, samples: int) -> None:
        if not self.enabled:
            return
        self._event("end", "block_stop", metadata={"samples_count": samples})
        self._event("start", "eval_start", metadata={"samples_count": samples})

    def eval_stop(self, samples: int, val_loss: float) -> None:
        """After a validation: at the target the run ends here with status success."""
        if not self.enabled:
            return
        self._event("event", "eval_accuracy", val_loss, metadata={"samples_count": samples})
        self._event("end", "eval_stop", metadata={"samples_count": samples})
        if val_loss <= self.target:
            self._stop("success", samples)
        else:
            self._event("start", "block_start", metadata={"samples_count": samples})

    def end(self, step: int) -> None:
        """After the training loop: out of steps without the target ends the run as aborted. A job that
        stopped earlier (pre-empted) leaves the run open for the next one."""
        if self.enabled and self.status is None and step >= self.cfg.train.steps:
            self._stop("aborted", step * self.cfg.train.global_batch_size)

    def _stop(self, status: str, samples: int) -> None:
        self.done, self.status = True, status
        self._end_offset = self._size()
        self._event("end", "epoch_stop", metadata={"samples_count": samples})
        self.run_stop_ms = _now_ms()
        self._event("end", "run_stop", metadata={"status": status, "samples_count": samples},
                    time_ms=self.run_stop_ms)
        self._event("event", "train_samples", samples)
        if self.time_to_train_s is not None:
            self.log(f"MLPerf run_stop: {status} at {samples} samples; time to train {self.time_to_train_s:.1f} s")
