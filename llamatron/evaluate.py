"""`llamatron evaluate`: zero-shot tasks on a checkpoint, built-in (`eval/tasks/`) or any
lm-evaluation-harness task through the adapter (`eval/harness.py`); results as a table and JSON.

Task names: a built-in name (lambada, boolq) reads a local JSONL file (`--task-file NAME=PATH`, or
`NAME.jsonl` in `--data-dir`); `harness:NAME` is an lm-eval task, found by its
TaskManager (plus `--include-path` for local task YAMLs, e.g. with `dataset_path: json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamatron.errors import LlamatronError

HARNESS_PREFIX = "harness:"


def load_model(checkpoint, device, precision=None, tp: int = 1):
    """(model, precision) of a checkpoint or run directory (its newest checkpoint), built from the
    config stored with it (`build_model`). Under torchrun (WORLD_SIZE > 1) or with tp > 1 the model
    is a `Layout`: FSDP over WORLD_SIZE / tp ranks, tensor parallel over tp."""
    from llamatron.convert import resolve_checkpoint
    from llamatron.runtime import Precision, env_world_size

    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path)
    name = precision if isinstance(precision, str) else cfg.train.precision
    if env_world_size() > 1 or tp > 1:
        return _load_layout(path, cfg, device, name, tp)
    model = build_model(path, cfg, device)
    if precision is None or isinstance(precision, str):
        precision = Precision.choose(name, device, fsdp=False)
    return model, precision


def checkpoint_config(path):
    """The run config stored with a checkpoint."""
    import yaml

    from llamatron.config import config_from_dict
    from llamatron.train import checkpoint as ckpt

    return config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(path)))


def build_model(path, cfg, device):
    """The model of checkpoint `path` (whose config is `cfg`) on `device` in eval mode, with its weights:
    what `llamatron evaluate` and `llamatron eval` score. A LoRA run's model (lora.rank > 0) gets its
    adapters as in training, loaded and then merged into the weights (the same function, without the
    adapters' two extra matmuls per layer); see `_frozen_base` for adapter-only checkpoints."""
    import torch

    from llamatron.config import resolve_model
    from llamatron.parallel.parallelize import materialize
    from llamatron.transforms.lora import apply_lora_config, merge_lora

    family, margs = resolve_model(cfg.model)
    with torch.device("meta"):
        model = family.build(margs)
    if cfg.lora.rank:
        apply_lora_config(model, cfg.lora, family, cfg.train.seed)
    base = _frozen_base(path, cfg, [model])
    if base is _SEED:  # the values the run's trainer gave the frozen weights
        materialize(model, device, cfg.train.seed)
    else:
        model.to_empty(device=device)
        model.init_buffers()
    _load_weights(path, [model], base)
    merge_lora(model)
    return model.eval()


_SEED = object()  # `_frozen_base`: the frozen weights are the run's seeded initial values


def _frozen_base(path, cfg, parts):
    """Where the frozen weights of a LoRA run come from when checkpoint `path` holds only its adapters
    (checkpoint.save_frozen=false), as the trainer does on resume: the run's checkpoint.init_from, or
    without one `_SEED`. None: `path` holds them (a checkpoint of another model fails in the load)."""
    from llamatron.parallel.parallelize import clean_name
    from llamatron.train import checkpoint as ckpt
    from llamatron.transforms.lora import is_adapter_key

    saved = ckpt.stored_model_keys(path)
    missing = [clean_name(n) for part in parts for n, _ in part.named_parameters() if clean_name(n) not in saved]
    adapters = [n for n in missing if is_adapter_key(n)]
    if adapters:  # load_model_weights would leave them at their initial values, silently
        raise LlamatronError(f"{path}: holds no LoRA adapter {adapters[0]} ({len(adapters)} missing), though its "
                             f"config.yaml sets lora.rank = {cfg.lora.rank}")
    if not missing or not cfg.lora.rank:
        return None
    base = cfg.checkpoint.init_from
    if not base:
        return _SEED
    if not (Path(base) / ".metadata").is_file():
        raise LlamatronError(f"{path}: holds only LoRA adapters (checkpoint.save_frozen = false: no {missing[0]}); "
                             f"the frozen base weights come from its run's checkpoint.init_from, {base}, which is "
                             "not a checkpoint directory (no DCP .metadata file)")
    return Path(base)


def _load_weights(path, parts, base) -> None:
    """The checkpoint's weights into `parts`; `base` from `_frozen_base`."""
    from llamatron.train import checkpoint as ckpt

    if base is None:
        ckpt.load_model_weights(path, parts)
        return
    if base is not _SEED:
        ckpt.load_model_weights(base, parts)  # a base without adapters: they come with the next load
    ckpt.load_model_weights(path, parts, frozen=False)


def _load_layout(path, cfg, device, precision: str, tp: int):
    """The checkpoint's model sharded over this torchrun job (plain: no compile, FP8 or checkpointing).
    LoRA adapters stay unmerged, laid out under TP as training lays them out (merging sharded weights
    buys little); eval mode drops dropout."""
    import dataclasses

    from llamatron.config import ParallelConfig, resolve_model
    from llamatron.parallel.dims import ParallelDims
    from llamatron.parallel.layout import Layout
    from llamatron.runtime import Precision, env_world_size, init_distributed

    family, margs = resolve_model(cfg.model)
    world = env_world_size()
    if tp < 1 or world % tp:
        raise LlamatronError(f"--tp {tp}: must divide the number of processes, {world}")
    for key, n in family.tp_divisible(margs).items():
        if n % tp:
            raise LlamatronError(f"--tp {tp}: must divide the model's {key} ({n})")
    init_distributed(device, world)
    dims = ParallelDims.from_config(ParallelConfig(tp=tp), world)
    dims.build_mesh(device.type)
    prec = Precision.choose(precision, device, fsdp=dims.fsdp_enabled)
    train = dataclasses.replace(cfg.train, compile=False, activation_checkpointing=False, fp8="none",
                                fp8_all_gather=False)
    layout = Layout.build(family, margs, train, dims, device, prec.params, 1, cfg.lora if cfg.lora.rank else None)
    _load_weights(path, layout.parts, _frozen_base(path, cfg, layout.parts))
    layout.train(False)
    return layout, prec


def _fp8_scoring(model, min_features: int, recipe: str) -> None:
    from llamatron.parallel.layout import Layout
    from llamatron.transforms.fp8_frozen import quantize_for_scoring

    if isinstance(model, Layout):
        raise LlamatronError("--fp8: scores in one process only (the FP8 copies need whole weights on one rank)")
    if not quantize_for_scoring(model, min_features, recipe):
        raise LlamatronError(f"--fp8: no block linear of at least --fp8-min-features {min_features} features "
                             "(both dimensions multiples of 16)")


def checkpoint_tokenizer(checkpoint) -> str:
    """The tokenizer the checkpoint's run was configured with (`data.tokenizer`)."""
    import yaml

    from llamatron.convert import resolve_checkpoint
    from llamatron.train import checkpoint as ckpt

    data = yaml.safe_load(ckpt.read_checkpoint_config(resolve_checkpoint(checkpoint))) or {}
    return (data.get("data") or {}).get("tokenizer") or "llama3"


def split_tasks(spec: str) -> tuple[list[str], list[str]]:
    """(built-in names, lm-eval names) of a comma-separated task list."""
    from llamatron.eval.tasks import tasks

    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise LlamatronError("--tasks: give at least one task (e.g. lambada,boolq)")
    builtin, harness = [], []
    for n in names:
        if n.startswith(HARNESS_PREFIX) and n[len(HARNESS_PREFIX):]:
            harness.append(n[len(HARNESS_PREFIX):])
        elif n in tasks():
            builtin.append(n)
        else:
            raise LlamatronError(f"unknown task {n!r}; built in: {', '.join(tasks())}; an lm-eval task: "
                                 f"{HARNESS_PREFIX}NAME (e.g. {HARNESS_PREFIX}hellaswag)")
    return builtin, harness


def task_files(builtin: list[str], data_dir: str | None, files: list[str]) -> dict[str, Path]:
    """Each built-in task's JSONL file: `--task-file NAME=PATH`, else `DATA_DIR/NAME.jsonl`."""
    from llamatron.eval.tasks import get_task

    given = {}
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise LlamatronError(f"--task-file {item!r}: expected NAME=PATH")
        get_task(name)
        given[name] = Path(path)
    out = {}
    for name in builtin:
        if name in given:
            out[name] = given[name]
        elif data_dir is not None:
            out[name] = Path(data_dir) / get_task(name).default_file
        else:
            raise LlamatronError(f"task {name}: no data file; give --data-dir DIR (holding "
                                 f"{get_task(name).default_file}) or --task-file {name}=PATH")
        if not out[name].is_file():
            raise LlamatronError(f"task {name}: {out[name]}: no such data file")
    return out


def harness_task_manager(names: list[str], include_path: str | None, include_defaults: bool = True):
    """lm-eval's TaskManager, the names checked against it (before any model is loaded). Indexing
    lm-eval's own task YAMLs takes seconds; include_defaults=False looks only in include_path."""
    if not names:
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LlamatronError(f"task {names[0]}: not built in, and lm-eval is not installed for harness tasks "
                             "(pip install 'llamatron[eval]')") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise LlamatronError(f"--include-path {include_path}: no such directory")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    for name in names:
        if name not in manager.all_tasks:
            raise LlamatronError(f"unknown task {HARNESS_PREFIX}{name}: not an lm-eval task"
                                 + (f" (nor in {include_path})" if include_path else ""))
    return manager


def run_harness(lm, names: list[str], manager, limit: int | None, bootstrap_iters: int = 1000) -> dict:
    """lm-eval's results for each task, as {"metrics": {name: {"value", "stderr"}}, "count"}.
    bootstrap_iters: resamples for the stderr of metrics without a formula (perplexity); 0 gives
    no stderr at all (lm-eval's rule)."""
    import gc

    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=bootstrap_iters, verbosity="ERROR")
    results = {} if out is None else _harness_results(out, names)  # None: lm-eval reports on LOCAL_RANK 0 only
    # lm-eval's tasks hold Arrow-backed datasets: collected now, their Arrow threads end while Arrow is
    # alive, not in the interpreter's last teardown, where a rank under torchrun aborted with
    # "terminate called without an active exception" (huggingface/datasets#7566, apache/arrow#45214).
    del out
    gc.collect()
    return results


def _harness_results(out: dict, names: list[str]) -> dict:
    results = {}
    for name in names:
        raw = out["results"].get(name, {})
        metrics = {}
        for key, value in raw.items():
            metric, comma, filt = key.partition(",")  # "acc,none": metric, filter
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = raw.get(f"{metric}_stderr,{filt}")
            metrics[metric] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        count = out.get("n-samples", {}).get(name, {}).get("effective")
        results[f"{HARNESS_PREFIX}{name}"] = {"metrics": metrics, "count": count}
    return results


def write_results(results: dict, path: str | Path) -> Path:
    """JSON under a temporary name, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def default_output(checkpoint) -> Path:
    """RUN/zero_shot_step_N.json for a run's checkpoint; CKPT/zero_shot.json for a lone one."""
    from llamatron.convert import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if path.parent.name == "checkpoints":
        return path.parent.parent / f"zero_shot_{path.name}.json"
    return path / "zero_shot.json"


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value", "stderr", "count")]
    for task, r in results.items():
        for metric, m in r["metrics"].items():
            stderr = f"{m['stderr']:.4f}" if m["stderr"] is not None else "-"
            rows.append((task, metric, f"{m['value']:.4f}", stderr, str(r["count"])))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def evaluate(checkpoint, tasks: str, tokenizer: str | None = None, data_dir: str | None = None,
             files: list[str] = (), prompt: str = "harness", limit: int | None = None, batch_size: int = 8,
             device: str = "auto", include_path: str | None = None, add_bos: bool = False,
             harness_defaults: bool = True, bootstrap_iters: int = 1000, tp: int = 1,
             compile: bool | None = None, fp8: bool | str = False, fp8_min_features: int = 1024) -> dict:
    """What `llamatron evaluate` runs: inputs are checked first, then the model is loaded once.
    `compile` (None: on CUDA): the blocks compiled for scoring, in one process (`loglikelihoods`).
    `fp8`: the block linears of at least `fp8_min_features` score from FP8 copies (one process), scaled
    per row (True or "rowwise") or per tensor ("tensorwise")."""
    from llamatron.eval.tasks import PROMPTS, Scorer, get_task, read_jsonl, run_task
    from llamatron.parallel.layout import Layout
    from llamatron.runtime import select_device
    from llamatron.tokenizer import load_tokenizer

    if prompt not in PROMPTS:
        raise LlamatronError(f"--prompt {prompt!r}: expected one of {', '.join(PROMPTS)}")
    if limit is not None and limit < 1 or batch_size < 1:
        raise LlamatronError("--limit and --batch-size must be >= 1")
    builtin, harness = split_tasks(tasks)
    paths = task_files(builtin, data_dir, list(files))
    docs = {name: read_jsonl(paths[name], get_task(name).fields, limit) for name in builtin}
    manager = harness_task_manager(harness, include_path, harness_defaults)
    tok = load_tokenizer(tokenizer or checkpoint_tokenizer(checkpoint))
    dev = select_device(device)
    model, precision = load_model(checkpoint, dev, tp=tp)
    if fp8:
        _fp8_scoring(model, fp8_min_features, "rowwise" if fp8 is True else fp8)
    vocab = (model.model if isinstance(model, Layout) else model).args.vocab_size
    if tok.vocab_size > vocab:
        raise LlamatronError(f"tokenizer {tok.name}: {tok.vocab_size} tokens, more than the model's vocabulary "
                             f"of {vocab}")
    results = {}
    scorer = Scorer(model, tok, batch_size, dev, precision, add_bos, compile=compile)
    for name in builtin:
        r = run_task(get_task(name), docs[name], scorer, prompt)
        results[name] = {"metrics": r["metrics"], "count": r["count"], "prompt": prompt, "file": str(paths[name])}
    if harness:
        from llamatron.eval.harness import LlamatronLM

        lm = LlamatronLM(model=model, tokenizer=tok, batch_size=batch_size, device=dev, precision=precision,
                         add_bos=add_bos, compile=compile)
        results.update(run_harness(lm, harness, manager, limit, bootstrap_iters))
    return results
