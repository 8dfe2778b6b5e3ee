"""Run metrics: one JSON object per line in metrics.jsonl and the same scalars to TensorBoard
(`MetricsWriter`), and the throughput rows of training steps (`ThroughputMeter`)."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of earlier jobs of the same run when it resumes.
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, **values}
        self._jsonl.write(json.dumps(record, default=_json_default) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


class ThroughputMeter:
    """The `train` rows of metrics.jsonl: per log interval, the mean step time, tokens/s, TFLOP/s per
    GPU and MFU (llamatron/flops.py; FP8 runs also against the FP8 peak, as PERFORMANCE.md asks), and
    every rank's peak memory (CUDA: torch's peak allocated; CPU: the process's peak resident set).
    `lora`: the `[lora]` section of a LoRA run, whose FLOPs leave out the frozen weights' gradients."""

    def __init__(self, args, seq_len: int, global_batch: int, n_gpus: int, device, device_name: str,
                 fp8: bool, step: int, lora=None):
        from llamatron import flops

        self.args, self.seq_len, self.global_batch, self.n_gpus = args, seq_len, global_batch, n_gpus
        self.device, self.device_name, self.fp8 = device, device_name, fp8
        self.lora = lora if lora is not None and lora.rank else None
        self.flops_per_seq = flops.flops_per_sequence(args, seq_len, self.lora)
        self.peak = flops.peak_flops(device_name, "bf16")
        self.last_time, self.last_step = time.perf_counter(), step
        self.tokens_per_s = self.mfu = None

    def row(self, step: int, loss: float, lr: float, grad_norm: float, consumed: int, skipped: int) -> dict:
        """Every rank must call this (peak memory is gathered from all of them)."""
        from llamatron import flops
        from llamatron.parallel.reduce import gather_per_rank, peak_memory_gib

        now = time.perf_counter()
        step_time = (now - self.last_time) / (step - self.last_step)
        self.last_time, self.last_step = now, step
        self.tokens_per_s = flops.tokens_per_second(self.seq_len, self.global_batch, step_time)
        self.mfu = flops.mfu(self.args, self.seq_len, self.global_batch, step_time, self.n_gpus, self.peak, self.lora)
        mem = gather_per_rank(peak_memory_gib(self.device), self.device)
        record = {
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_s, "tokens_per_s_per_gpu": self.tokens_per_s / self.n_gpus,
            "tflops_per_gpu": self.global_batch * self.flops_per_seq / step_time / 1e12 / self.n_gpus,
            "mfu": self.mfu, "consumed_samples": consumed,
            "peak_mem_gib": max(mem), "peak_mem_gib_per_rank": mem, "skipped_steps": skipped,
        }
        if self.fp8:
            record["mfu_fp8_peak"] = flops.mfu(self.args, self.seq_len, self.global_batch, step_time, self.n_gpus,
                                               flops.peak_flops(self.device_name, "fp8"), self.lora)
        return record

    @staticmethod
    def line(step: int, record: dict) -> str:
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        return (f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} | "
                f"{record['step_time_s'] * 1000:.0f} ms/step | {record['tokens_per_s_per_gpu']:,.0f} tok/s/GPU | "
                f"{record['tflops_per_gpu']:.2f} TFLOP/s/GPU | MFU {mfu} | peak mem {record['peak_mem_gib']:.2f} GiB")


def run_environment(device_name: str, world_size: int, config_yaml: str) -> dict:
    """The `env` row written when a job starts: what produced the rows after it."""
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device_name, "world_size": world_size,
            "python": platform.python_version(), "host": platform.node(), "git_commit": _git_commit(),
            "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest()[:16], "time": time.time()}


def _git_commit() -> str | None:
    """The commit of the llamatron source tree, when it is a git checkout (an installed wheel is not)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
