"""The Trainer: built from a Config in commented blocks, then a short loop.

Every rank of a torchrun job builds the same Trainer and runs the same loop; only rank 0 prints and
writes metrics. The pieces that own a policy or a cadence live in their own modules and are tested
there: the step (`step.py`), the non-finite / spike / stop-signal policy (`reliability.py`),
validation (`llamatron/eval/perplexity.py`), throughput rows (`metrics.py`), checkpoints
(`checkpoint.py`), the MLPerf log (`mlperf_log.py`). Model families come from the registry
(`llamatron/models/`): nothing here knows which one it trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from llamatron import runtime
from llamatron.config import Config, dump_config, resolve_model, validate_config
from llamatron.data.build import build_datasets, check_inputs
from llamatron.data.sampler import accumulation_steps, micro_batch_indices
from llamatron.errors import LlamatronError
from llamatron.eval.perplexity import Cadence, Validator
from llamatron.eval.zero_shot import ZeroShot
from llamatron.fp8_gemm import FastAccum
from llamatron.hooks import fire
from llamatron.models import parameter_count
from llamatron.models.attention_ops import native_gqa
from llamatron.parallel.dims import ParallelDims
from llamatron.parallel.layout import Layout
from llamatron.parallel.memory import estimate_memory
from llamatron.parallel.reduce import global_mean_loss, sum_over_ranks
from llamatron.runtime import Precision, load_batch
from llamatron.train import reliability, run_lock
from llamatron.train.checkpoint import Checkpointer, check_init_from, finished_run
from llamatron.train.metrics import MetricsWriter, ThroughputMeter, run_environment
from llamatron.train.mlperf_log import MLPerfLog
from llamatron.train.optim import build_optimizer, lr_at
from llamatron.train.step import train_step
from llamatron.transforms.compile import compile_tuning
from llamatron.transforms.fp8 import check_fp8, check_fp8_experts, fp8_output, precompute_fp8_scales
from llamatron.transforms.fp8_frozen import check_lora_fp8, fp8_frozen_linears
from llamatron.transforms.lora import frozen_dtype
from llamatron.transforms import weight_cast


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float | None
    eval_history: list[tuple[int, float]]
    tokens_per_s: float | None
    mfu: float | None
    checkpoint: Path | None
    wall_s: float
    rank: int = 0  # under torchrun every rank returns; only rank 0 reports
    already_finished: bool = False  # the run was at train.steps before: nothing loaded, validated or written
    preempted: str | None = None  # the stop signal that ended the run early (checkpoint written)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    mlperf_status: str | None = None  # MLPerf mode: success / aborted once the run ended, else None
    time_to_train_s: float | None = None  # MLPerf mode: run_start to run_stop (across jobs)


def train(cfg: Config, *, progress: bool = True, log=print) -> TrainResult:
    """Train as `cfg` says (in this process; under torchrun, this rank's share)."""
    world_size = runtime.env_world_size()
    # A stop signal during the slow start-up still means "checkpoint if you can, then exit 75".
    restore_signals = reliability.install_stop_handlers()
    with contextlib.ExitStack() as stack:
        stack.callback(restore_signals)
        # Everything that can be wrong with the config and the input files fails here, before any GPU
        # memory is touched (only the first process of a host scans the token files).
        validate_config(cfg, world_size)
        rank = int(os.environ.get("RANK", "0"))
        done = finished_run(cfg.train.out_dir, cfg.train.steps, cfg.checkpoint.resume, log if rank == 0 else _silent)
        if done is not None:
            return TrainResult(Path(cfg.train.out_dir), done[0], None, [], None, None, done[1], 0.0, rank,
                               already_finished=True)
        check_init_from(cfg.checkpoint.init_from)
        # One run per out_dir, held by rank 0 from before anything in it is written or removed (a second
        # run would delete this one's in-flight save as a crash's leftover) until the run ends.
        if rank == 0:
            stack.callback(run_lock.acquire(cfg.train.out_dir, log).release)
        if runtime.env_local_rank() == 0:
            quiet = rank != 0
            check_inputs(cfg.data, resolve_model(cfg.model)[1].vocab_size, _silent if quiet else log)
        runtime.configure(cfg.train.threads, cfg.train.deterministic)
        device = runtime.select_device(cfg.train.device)
        created = runtime.init_distributed(device, world_size)
        if created:
            stack.callback(dist.destroy_process_group)
        return Trainer(cfg, device, world_size, progress=progress, log=log).train()


def _silent(*args, **kwargs) -> None:
    pass


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, world_size: int, *, progress: bool = True, log=print):
        self.t_start = time.perf_counter()
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.rank = runtime.rank()
        self.main = self.rank == 0
        self.log = log if self.main else _silent
        self.progress = progress and self.main
        self.out_dir = Path(cfg.train.out_dir)
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        # MLPerf mode: init_start is now (before data and model); a no-op object otherwise.
        self.mlperf_log = MLPerfLog(cfg, self.out_dir, write=self.main, log=self.log)

        # Layout, model family and precision
        check_fp8(cfg.train.fp8, device)
        runtime.check_attention_backend(cfg.train.attention_backend, device)
        self.dims = ParallelDims.from_config(cfg.parallel, world_size)
        self.dims.build_mesh(device.type)
        self.precision = Precision.choose(cfg.train.precision, device, self.dims.fsdp_enabled)
        self.family, self.args = resolve_model(cfg.model)
        check_fp8_experts(cfg.train, self.args, device)
        self.accum = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dims.dp)
        self.config_yaml = dump_config(cfg)
        self.log(f"config (saved to {self.out_dir / 'config.yaml'}):\n{self.config_yaml}")

        # Data (one rank per host builds the sample-index caches, the others then read them)
        self.train_data, valid_data = self._build_datasets()

        # Checkpoints, first: leftovers of crashed saves removed, the directory checked before the model
        # is allocated
        self.checkpointer = Checkpointer(cfg.checkpoint, self.out_dir, self.log, self._write_metrics, device.type)
        if self.main:
            self.checkpointer.prepare(parameter_count(self.family, self.args))

        # Model: this rank's parts of the layout, initialised as the whole model would be; optimizers
        args = self.args
        if self.dims.cp > 1:
            # Position-indexed buffers are sharded along the sequence with the tokens: exactly seq_len rows.
            args = dataclasses.replace(args, max_seq_len=cfg.data.seq_len)
        self.frozen_dtype = frozen_dtype(cfg.lora, self.precision.amp, self.dims.tp)
        check_lora_fp8(cfg.train, cfg.lora, self.frozen_dtype, self.precision.params)
        self.layout = Layout.build(self.family, args, cfg.train, self.dims, device, self.precision.params, self.accum,
                                   lora=cfg.lora, frozen_dtype=self.frozen_dtype)
        self.optimizers = [build_optimizer(part, cfg.optim, device.type) for part in self.layout.parts]

        # Resume from the newest complete checkpoint (or start from init_from's weights)
        self.checkpointer.attach(self.layout.parts, self.optimizers, self.config_yaml, self.dims.sharding())
        state = self.checkpointer.restore()
        # LoRA under train.fp8: the frozen weights, now loaded, get their FP8 copies once for the run
        self.fp8_frozen = fp8_frozen_linears(self.layout.parts, cfg, self.dims.fsdp_enabled)
        # The block linears' bf16 copies, made from the loaded weights and after every optimizer step
        self.weight_casts = self._cast_weights_once()
        self.step, self.consumed = state.get("step", 0), state.get("consumed_samples", 0)
        if self.main:  # only now: a refused resume (changed config) leaves the run's config.yaml as it was
            (self.out_dir / "config.yaml").write_text(self.config_yaml)

        # Guards: non-finite steps, gradient-norm spikes and stop signals, decided by all ranks together
        self.guard = reliability.StepGuard(
            cfg.train.nonfinite, cfg.train.nonfinite_max_skips, cfg.train.grad_spike_factor, batch_of=self._batch_of,
            data_seed=cfg.data.seed, report=self._write_metrics, log=self.log, device=device)
        self.guard.load_state_dict(state)

        # Metrics, throughput and validation
        self.metrics = MetricsWriter(self.out_dir) if self.main else None
        self.device_name = runtime.device_name(device)
        if self.main:  # what this job ran on, first in its rows: the run report's environment table
            self.metrics.write("env", self.step, run_environment(self.device_name, world_size, self.config_yaml))
        if state:
            # Rows of the earlier job for later steps than this (work lost in a crash) are superseded.
            self._write_metrics("resume", self.step, {"checkpoint": state["resumed_from"], "consumed_samples": self.consumed})
        self.meter = ThroughputMeter(self.args, cfg.data.seq_len, cfg.train.global_batch_size, world_size, device,
                                     self.device_name, cfg.train.fp8 != "none", self.step, lora=cfg.lora)
        self.validator = self._build_validator(valid_data)
        self._describe()
        self.mlperf_log.begin(self.step, state or None, accum=self.accum, dims=self.dims,
                              device_name=self.device_name, bf16=self.precision.compute == torch.bfloat16)

    # ----------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        steps, mlperf = self.cfg.train.steps, self.mlperf_log
        self.final_loss = None
        if self.validator.cadence.at_start and self.step == 0:
            self._validate()
        self.layout.train(True)
        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        while self.step < steps and not mlperf.done and self.validator.stopped_by is None:
            loss, grad_norm = self._train_step()
            if self.guard.halt is not None:
                self._halt()
            self.step += 1
            self.consumed += self.cfg.train.global_batch_size
            bar.update(1)
            if self.step % self.cfg.train.log_every == 0 or self.step == steps:
                self._log_step(loss, grad_norm, bar)
            if self.guard.stop_signal is not None and self.step < steps:
                self.log(f"step {self.step:6d} | {self.guard.stop_signal}: stopping after this step; "
                         "checkpointing, then exiting for a requeue")
                break
            # The last step's validation comes after the loop, except in MLPerf mode (on its cadence only).
            if self.validator.cadence.due(self.step) and (self.step < steps or mlperf.enabled):
                self._validate()
            self.checkpointer.poll()  # a background save that has completed is reported
            if self.checkpointer.due(self.step, steps):
                self.checkpointer.save(self.step, self.state_dict())
        bar.close()
        return self._finish()

    def _validate(self) -> None:
        """A validation on the cadence. A stop signal ends it between batches (the loop then stops,
        checkpoints and exits 75) unless this is the last step's, or an MLPerf run's, whose result
        the run cannot do without."""
        self.validator.run(self.step, self.consumed,
                           may_stop=self.step < self.cfg.train.steps and not self.mlperf_log.enabled)
        if self.validator.stopped_by is not None:
            self.guard.stop_signal = self.validator.stopped_by
            self.log(f"step {self.step:6d} | {self.guard.stop_signal} during validation: stopped it; "
                     "checkpointing, then exiting for a requeue")

    def _train_step(self):
        """This rank's share of one optimizer step: its micro-batches in Megatron's sampler order (ranks
        of one data-parallel group (TP, CP, PP) read the same samples)."""
        cfg, step = self.cfg, self.step
        self.lr = lr_at(step, cfg.optim, cfg.train.steps)
        micro_batches, token_counts = self._micro_batches(step)
        fire("step_start", step=step + 1, rank=self.rank, model=self.layout.parts[-1])
        loss, grad_norm = train_step(
            self.layout, self.optimizers, micro_batches, self.accum, lr=self.lr, device=self.device,
            precision=self.precision, fused_cross_entropy=cfg.train.fused_cross_entropy,
            grad_clip=cfg.optim.grad_clip, attention=cfg.train.attention_backend,
            before_update=lambda loss, norm: self.guard(step, loss, norm), token_counts=token_counts,
        )
        fire("step_end", step=step + 1, rank=self.rank, model=self.layout.parts[-1])
        if cfg.train.fp8_all_gather and self.guard.halt is None:
            for part in self.layout.parts:
                precompute_fp8_scales(part)
        if self.weight_casts:
            weight_cast.refresh(self.layout.parts)
        return loss, grad_norm

    def _cast_weights_once(self) -> int:
        train, dims = self.cfg.train, self.dims
        pays = weight_cast.pays(cuda=self.device.type == "cuda", autocast=self.precision.amp is not None,
                                world_size=dims.world_size, accum=self.accum,
                                activation_checkpointing=train.activation_checkpointing, lora=bool(self.cfg.lora.rank),
                                fp8=train.fp8, fp8_all_gather=train.fp8_all_gather)
        cast, self.fuse_wgrad = weight_cast.wanted(train.cast_weights_once, train.gradient_accumulation_fusion, pays)
        if not cast:
            return 0
        if self.precision.amp is None or dims.fsdp_enabled or dims.tp > 1:
            raise LlamatronError("config key 'train.cast_weights_once': for bf16 autocast over fp32 weights, "
                                 "without FSDP (its mixed precision casts at the gather) or tensor parallelism")
        return len(weight_cast.cast_weights_once(self.layout.parts, self.precision.amp, self.fuse_wgrad))

    def _micro_batches(self, step: int):
        """This rank's micro-batches of `step` and, for fine-tuning data (masked labels), their counts
        of trained tokens (the step normalises by their global sum); None for pretraining windows."""
        cfg = self.cfg
        indices = [micro_batch_indices(step, m, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                       self.dims.dp_rank, self.dims.dp) for m in range(self.accum)]
        if cfg.finetune.data:
            from llamatron.data.sft import load_sft_batch

            loaded = [load_sft_batch(self.train_data, idx, self.device, self.args.vocab_size) for idx in indices]
            return [b for b, _ in loaded], [n for _, n in loaded]
        return (load_batch(self.train_data, idx, self.device, self.args.vocab_size) for idx in indices), None

    def _log_step(self, loss, grad_norm, bar) -> None:
        # The loss is read once per log interval (the per-step read is of the guard's flags only); the
        # reductions over ranks happen here too, so every rank must reach this point.
        self.final_loss = global_mean_loss(loss, self.dims, self.device)
        record = self.meter.row(self.step, self.final_loss, self.lr, float(grad_norm), self.consumed, self.guard.skipped)
        for part in self.layout.parts:  # a family's own statistics of the interval (MoE: router load, aux loss)
            if hasattr(part, "step_metrics"):
                record.update(part.step_metrics(sum_over_ranks))
        self._write_metrics("train", self.step, record)
        line = ThroughputMeter.line(self.step, record)
        bar.write(line) if self.progress else self.log(line)

    def _halt(self):
        """A non-finite step under the stop policy: keep the work since the last checkpoint (the
        weights are those before the step), then fail with the guard's reason."""
        try:
            newest = self.checkpointer.save_unless_saved(self.step, self.state_dict())
        except LlamatronError as e:  # e.g. weights already non-finite: the diagnosis still comes first
            raise LlamatronError(f"{self.guard.halt}; {e}") from None
        finally:
            if self.metrics is not None:
                self.metrics.close()
        raise LlamatronError(f"{self.guard.halt}; newest checkpoint: {newest or 'none'}")

    def _finish(self) -> TrainResult:
        cfg, step = self.cfg, self.step
        preempted = self.guard.stop_signal if step < cfg.train.steps else None
        if preempted and not cfg.checkpoint.enabled:
            raise LlamatronError(f"stopped by {preempted} at step {step} with checkpoint.enabled=false: nothing to resume from")
        self.mlperf_log.end(step)
        if not preempted and not self.mlperf_log.enabled and not self.validator.validated_at(step):
            self.validator.run(step, self.consumed)
        newest = self.checkpointer.save_unless_saved(step, self.state_dict())
        if cfg.lora.peft_out and not preempted:
            from llamatron.transforms.peft_format import save_peft_adapter

            out = save_peft_adapter(self.layout.parts, self.family, self.args, cfg.lora.peft_out,
                                    base_model=cfg.checkpoint.init_from or "", pp_group=self.layout.dims.group("pp"))
            self.log(f"LoRA adapter written in Hugging Face PEFT format to {out}")
        if self.metrics is not None:
            self.metrics.close()
        if preempted:
            self.log(f"step {step:6d} | stopped early by {preempted}; resume by running the same command again")
        return TrainResult(self.out_dir, step, self.final_loss, self.validator.history, self.meter.tokens_per_s,
                           self.meter.mfu, newest, time.perf_counter() - self.t_start, self.rank, preempted=preempted,
                           skipped_steps=self.guard.skipped, mlperf_status=self.mlperf_log.status,
                           time_to_train_s=self.mlperf_log.time_to_train_s)

    def state_dict(self) -> dict:
        """What a checkpoint holds besides weights, optimizer and RNG: where the run stands."""
        cfg = self.cfg
        return {"step": self.step, "consumed_samples": self.consumed, "seed": cfg.train.seed,
                "data_seed": cfg.data.seed, "world_size": self.world_size, "layout": self.dims.describe(),
                "sharding": self.dims.sharding(),
                **self.guard.state_dict(), **self.mlperf_log.state()}

    # ----------------------------------------------------------------------------------------------
    # Building blocks

    def _build_datasets(self):
        n_samples = self.cfg.train.steps * self.cfg.train.global_batch_size
        first_on_host = runtime.env_local_rank() == 0
        if first_on_host:
            datasets = build_datasets(self.cfg, self.args.vocab_size, n_samples)
        if dist.is_initialized():
            dist.barrier()
        if not first_on_host:
            datasets = build_datasets(self.cfg, self.args.vocab_size, n_samples)
        return datasets

    def _build_validator(self, dataset) -> Validator:
        cfg = self.cfg
        micro = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        if self.layout.pipeline is not None:
            micro = cfg.train.micro_batch_size  # the schedule's micro-batch shape is fixed
        zero_shot = ZeroShot.from_config(cfg.eval, cfg.data.tokenizer, self.args.vocab_size, self.layout, self.device,
                                         self.precision)
        return Validator(self.layout, dataset, cfg.eval.samples, micro,
                         Cadence.from_config(cfg.eval, cfg.train.global_batch_size), self.device, self.precision,
                         cfg.train.fused_cross_entropy, on_start=self.mlperf_log.eval_start,
                         on_result=self._on_validation, zero_shot=zero_shot, on_zero_shot=self._on_zero_shot,
                         stop=reliability.stop_requested)

    def _on_validation(self, step: int, consumed: int, value: float, seconds: float) -> None:
        self.mlperf_log.eval_stop(consumed, value)
        ppl = math.exp(min(value, 50))
        self._write_metrics("eval", step, {"val_loss": value, "val_ppl": ppl, "consumed_samples": consumed,
                                           "eval_s": seconds})
        self.log(f"step {step:6d} | validation log perplexity {value:.4f} (perplexity {ppl:.1f})")

    def _on_zero_shot(self, step: int, results: dict, seconds: float) -> None:
        self._write_metrics("zero_shot", step, {**results, "zero_shot_s": seconds})
        self.log(f"step {step:6d} | zero-shot " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def _batch_of(self, step: int) -> tuple[int, int, list[int]]:
        """The global batch of 0-based `step` (first sample, end) and the samples this rank read."""
        train = self.cfg.train
        first = step * train.global_batch_size
        mine = [i for m in range(self.accum)
                for i in micro_batch_indices(step, m, train.global_batch_size, train.micro_batch_size, self.dims.dp_rank,
                                             self.dims.dp)]
        return first, first + train.global_batch_size, mine

    def _write_metrics(self, kind: str, step: int, values: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(kind, step, values)

    def _describe(self) -> None:
        cfg, train, dims, precision = self.cfg, self.cfg.train, self.dims, self.precision
        fsdp_note = " (FSDP mixed precision, fp32 master weights)" if precision.params else ""
        if self.frozen_dtype is not None:
            fsdp_note += f" (LoRA's frozen linear weights stored in {str(self.frozen_dtype).removeprefix('torch.')})"
        if self.fp8_frozen:
            how = "cast at each use" if dims.fsdp_enabled else "from FP8 copies made once"
            fsdp_note += f" ({self.fp8_frozen} frozen linears run their GEMMs in FP8, {how})"
        if cfg.optim.name == "adamw8bit":
            fsdp_note += " (AdamW with 8-bit moments, torchao)"
        if train.fp8 != "none" and FastAccum.of(train.fp8_fast_accum) != FastAccum():  # not torchao's recipe: say so
            fsdp_note += f" (FP8 GEMMs fast-accumulated: {', '.join(train.fp8_fast_accum) or 'none'})"
        if self.weight_casts:
            copies = "E4M3" if train.fp8 == "tensorwise" else "bf16"
            outer = [n for part in self.layout.parts for n in getattr(part, "outer_weights", ())]
            fsdp_note += (f" ({self.weight_casts} block linears' {copies} weight copies made once per step"
                          f"{'; outside the blocks: ' + ', '.join(outer) if outer else ''})")
        self.log(
            f"model {cfg.model.size}: {self.layout.n_params:,} parameters, {self.args.n_layers} layers; device "
            f"{self.device_name}; precision {precision.compute}{fsdp_note}; global batch {train.global_batch_size} = "
            f"micro {train.micro_batch_size} x data-parallel {dims.dp} x accumulation {self.accum}; seq "
            f"{cfg.data.seq_len}; {train.steps} steps"
        )
        self.log(f"layout: {dims.describe()}")
        for data, what in ((self.train_data, ""), (self.validator.dataset, "validation ")):
            if hasattr(data, "describe"):  # fine-tuning data: examples, packing, truncation
                self.log(what + data.describe())
        est = estimate_memory(
            self.args, cfg.data.seq_len, train.micro_batch_size, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
            tp=dims.tp, pp=dims.pp, cp=dims.cp, ep=dims.ep, pp_schedule=dims.pp_schedule,
            # Fused gradient accumulation keeps its fp32 buffers across steps: counted as with accumulation
            n_microbatches=max(self.accum, 2) if self.fuse_wgrad else self.accum,
            bf16=precision.compute == torch.bfloat16, fsdp=dims.fsdp_enabled,
            activation_checkpointing=train.activation_checkpointing, checkpointed_layers=train.activation_checkpointing_layers,
            fused_cross_entropy=self.layout.fused_loss(train.fused_cross_entropy),
            lora=cfg.lora if cfg.lora.rank else None, fp8=train.fp8, fp8_min_features=train.fp8_min_features,
            fp8_include_output=fp8_output(train, dims.tp, dims.pp, bool(cfg.lora.rank)), compiled=train.compile, native_gqa=native_gqa(self.device),
            optim=cfg.optim.name, bf16_residual=train.bf16_residual, cast_once=bool(self.weight_casts),
        )
        mode = "compiled" if train.compile else "eager"
        self.log(f"memory estimate per rank ({mode} count; llamatron/parallel/memory.py): {est.describe()}")
        if train.compile and compile_tuning(train, lora=bool(cfg.lora.rank)):
            self.log("compile: inductor times its kernels' block sizes as it compiles (train.compile_tuning, "
                     "unset: on for FP8 training): about 100 s more before the first steps run at speed")
        capacity = runtime.device_memory(self.device)
        if capacity and est.total > capacity:  # the run will most likely die of OOM: say so before it does
            self.log(f"warning: the memory estimate per rank, {est.total / 2**30:.1f} GiB, exceeds the "
                     f"{capacity / 2**30:.1f} GiB of {self.device_name}; lower train.micro_batch_size or data.seq_len, "
                     "or shard more (parallel.*, train.activation_checkpointing)")
