"""The `llamatron` command. The only module that parses command lines."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llamatron.errors import REQUEUE_EXIT_CODE, LlamatronError


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help="TOML/YAML config file, or a preset name (llamatron/presets/NAME.toml)" +
                   (f"; default {default}" if default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamatron", description="Pretrain, fine-tune and evaluate LLMs on Megatron-format data.")
    sub = parser.add_subparsers(dest="command", required=True)
    # One function per command, in the order `--help` lists them.
    for add in (_add_demo, _add_preprocess, _add_c4, _add_train, _add_launch, _add_eval, _add_evaluate, _add_flops,
                _add_convert, _add_report, _add_plan):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prepare the embedded corpus, train a tiny Llama 3.1 and evaluate it")
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and metrics go")
    _add_config_args(p, "demo")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize JSON lines into Megatron .bin/.idx files")
    p.add_argument("--input", nargs="+", required=True, help="JSON lines files (.json, .jsonl, .json.gz)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    p.add_argument("--tokenizer", default="llama3", help="llama3 (default), or a tokenizer.model / tokenizer.json path")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-text token to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--empty-documents", choices=["drop", "keep"], default="drop",
                   help="documents that tokenize to nothing: drop (NeMo's preprocess_data_for_megatron.py, how the "
                   "MLPerf files were made; default) or keep as a document with no sequence (Megatron-LM's "
                   "preprocess_data.py)")


def _add_c4(sub) -> None:
    p = sub.add_parser("c4", help="consolidate raw C4 shards as the MLPerf reference does")
    p.add_argument("--src", required=True, help="directory with c4-train.*-of-01024.json.gz and c4-validation.*")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--valid-documents", type=int, default=91205)
    p.add_argument("--workers", type=int, default=1,
                   help="merged files built at once, one process each (each shard is decompressed to check it)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a config",
                       description="Train in this process, or (--nproc-per-node) in N processes under torchrun.")
    _add_config_args(p, None)
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="start N training processes on this node under torchrun (e.g. one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="with --nproc-per-node: nodes taking part; each runs the same command")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes > 1: the first node's address and a free port (c10d rendezvous)")
    p.add_argument("--rdzv-id", default=None, help="with --rdzv-endpoint: a run id shared by the nodes (e.g. the job id)")


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="submit a training run to Slurm from the config's [launch] section",
                       description="Render an sbatch script (one torchrun per node, c10d rendezvous on the first "
                       "node) and submit it launch.jobs times as a chain of jobs that resume from checkpoints.")
    _add_config_args(p, None)
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit and write nothing")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation log perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--data", required=True, help="Megatron data prefix (PREFIX.bin/.idx)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's training seq_len")
    p.add_argument("--num-samples", type=int, default=None, help="first K unshuffled windows (default: all that fit, at most 1024)")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot tasks (lambada, boolq, any lm-eval task) on a checkpoint",
                       description="Score zero-shot tasks: built-in ones on local JSONL files, any "
                       "lm-evaluation-harness task through its adapter. See docs/evaluate.md.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--tasks", required=True, help="comma-separated: lambada, boolq, harness:NAME (any lm-eval task)")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's data.tokenizer")
    p.add_argument("--data-dir", default=None, help="holds NAME.jsonl for each built-in task")
    p.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH", help="a built-in task's JSONL file")
    p.add_argument("--prompt", default="harness", choices=["harness", "pax"], help="built-in prompt style")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--only-include-path", action="store_true",
                   help="look for harness tasks only in --include-path (skips indexing lm-eval's own: seconds)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="harness tasks: resamples for stderrs without a formula (0: no stderrs)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to every context")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block for scoring (default: on CUDA, off on the CPU; one process only)")
    p.add_argument("--fp8", nargs="?", const="rowwise", default=None, choices=("rowwise", "tensorwise"),
                   help="score with the block linears' GEMMs in FP8, scaled per row (the default) or per tensor "
                        "(H100-class GPUs; one process)")
    p.add_argument("--fp8-min-features", type=int, default=1024, help="smaller linears stay bf16 under --fp8")
    p.add_argument("--output", default=None, help="results JSON (default: RUN/zero_shot_step_N.json)")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="evaluate in N processes under torchrun (FSDP over N / tp ranks)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (with --nproc-per-node)")


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="FLOPs per sequence, tokens/s, MFU and days to train (NVIDIA recipe formula)")
    p.add_argument("--model", default="llama3.1-8b", help="named model size")
    p.add_argument("--layers", type=int, default=None, help="proxy: number of layers")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (405B MP16 variant: 16)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--flops-per-sequence", type=float, default=None, help="use this instead of the formula")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="a LoRA step of this rank, adapters on every block linear (llamatron/flops.py)")
    p.add_argument("--step-time", type=float, default=None, help="seconds per optimizer step")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--device-name", default="H100", help="selects the peak FLOP/s (H100, H200, A100, B200)")
    p.add_argument("--tokens", type=float, default=None, help="total training tokens, for days to train")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import Hugging Face or Meta checkpoints, export to Hugging Face",
                       description="hf -> llamatron, meta -> llamatron (weights-only checkpoints for "
                       "checkpoint.init_from and eval), llamatron -> hf (for transformers). See docs/convert.md.")
    p.add_argument("--from", dest="from_format", required=True, choices=["hf", "meta", "llamatron"],
                   help="hf: config.json + safetensors; meta: params.json + consolidated.NN.pth; "
                   "llamatron: a checkpoint or run directory")
    p.add_argument("--to", dest="to_format", required=True, choices=["llamatron", "hf"])
    p.add_argument("src", metavar="SRC", help="source directory")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist; written under a temporary name)")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"],
                   help="dtype of the written tensors (default: keep the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="hf export: size of each safetensors file (default 5GB)")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="a run's metrics as one HTML page with plots, or a terminal summary",
                       description="Reads RUN_DIR/metrics.jsonl, config.yaml and mlperf.log; several runs are "
                       "overlaid. See docs/report.md.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="HTML file to write (default: FIRST_RUN_DIR/report.html)")
    p.add_argument("--text", action="store_true", help="print the terminal summary only; write no files")
    p.add_argument("--png-dir", default=None, help="also write each figure as a PNG file in this directory")
    p.add_argument("--target", type=float, default=None,
                   help="validation log perplexity to report the time to (default: mlperf.target of the config)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="rank the parallel layouts that fit a model on N GPUs (memory and speed estimates)",
                       description="Enumerates dp_replicate x dp_shard x tp x pp x cp (and ep for MoE models), "
                       "activation checkpointing, micro batch and FP8; estimates memory (llamatron/parallel/memory.py) "
                       "and step time (llamatron/plan.py's cost model); prints the best with the --set overrides that "
                       "select them. --calibrate measures the timings the cost model can be built from instead. "
                       "See docs/planner.md.")
    p.add_argument("--model", default=None, help="named model size (llama3.1-8b, gpt-126m, glam-126m-64e, ...)")
    p.add_argument("--config", default=None, metavar="FILE_OR_PRESET",
                   help="plan the model, sequence, batch, LoRA and FP8 keys of this config file or preset instead")
    p.add_argument("--layers", type=int, default=None, help="proxy: number of layers")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (world size)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain); default 8")
    p.add_argument("--nodes", type=int, default=None, help="nodes (instead of --gpus-per-node: GPUs / nodes per node)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory per GPU, GiB (default: 80, or the --gpu kind's: H200 139)")
    p.add_argument("--gpu", default="H100", help="device kind, for its peak FLOP/s, FP8 support and shipped "
                   "calibration table (H100, H200, A100, B200)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the config's, or 8192)")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the config's, or 1024)")
    p.add_argument("--document-tokens", type=float, default=None, metavar="N",
                   help="document-masked attention (packed fine-tuning batches): the mean positions of a token's own "
                   "document, sum(len^2) / sum(len) (documents of one length: that length; the trainer logs it for "
                   "packed fine-tuning data); default: one document per sequence")
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    p.add_argument("--fp8", choices=("auto", "on", "off"), default="auto",
                   help="FP8 layouts: auto (both, where the GPU and layout allow; or the config's train.fp8), on, off")
    p.add_argument("--tokens", type=float, default=1e12, help="tokens to train, for the days column (default 1e12)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="compute from this calibration table (default: llamatron/calibration/<gpu>.json if shipped)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure GEMM, attention, element-wise, optimizer (and under torchrun, collective) timings "
                   "on this machine's device and write a calibration table")
    p.add_argument("--out", default="calibration.json", help="with --calibrate: the table to write")
    p.add_argument("--quick", action="store_true", help="with --calibrate: a tiny grid (tests; seconds on a CPU)")
    p.add_argument("--budget-s", type=float, default=150.0, help="with --calibrate: stop measuring after this long")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llamatron.testing import faults

    remove_faults = lambda: None  # noqa: E731
    try:
        remove_faults = faults.install_from_env()  # test-only: LLAMATRON_FAULT, unset in real runs
        return COMMANDS[args.command](args) or 0
    except LlamatronError as e:
        error = str(e)
    except KeyboardInterrupt:
        print(f"llamatron {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        remove_faults()
    # Printed outside the handler: by now the failed frames are freed, so what they held (a progress
    # bar, which draws itself once more as it closes) is gone and the message is the last line. One
    # write with its newline: the ranks of a job share stderr, and an unbuffered print's two writes
    # (PYTHONUNBUFFERED, as torchrun jobs often run) let another rank's line land between them.
    sys.stderr.write(f"llamatron {args.command}: error: {error}\n")
    sys.stderr.flush()
    return 2


# --------------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    if args.config is None:
        raise LlamatronError("--config is required (a file, or a preset name such as demo)")
    if args.nproc_per_node is not None:  # torchrun handles the signals of this process itself
        from llamatron.config import load_config

        return _train_torchrun(args, load_config(args.config, args.overrides))
    if args.nnodes != 1 or args.rdzv_endpoint or args.rdzv_id:
        raise LlamatronError("--nnodes, --rdzv-endpoint and --rdzv-id go with --nproc-per-node")
    from llamatron.stop_signals import install_stop_handlers

    # Before the slow imports: a SIGTERM during start-up is kept, and the run stops after its first step
    # with a checkpoint and exit 75 rather than dying with -15.
    restore = install_stop_handlers()
    try:
        from llamatron.config import load_config
        from llamatron.train.trainer import train

        cfg = load_config(args.config, args.overrides)
        # A progress bar only on a terminal: in a batch job's log it is a wall of carriage returns.
        result = train(cfg, progress=sys.stderr.isatty())
    finally:
        restore()
    print_summary(result)
    return _run_ended(result)


def _train_torchrun(args, cfg) -> int:
    """This node's share of a torchrun job: N processes running `llamatron train` without these flags."""
    from llamatron.config import validate_config
    from llamatron.launch import torchrun
    from llamatron.train import run_lock
    from llamatron.train.checkpoint import finished_run

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise LlamatronError("--nproc-per-node and --nnodes must be >= 1")
    validate_config(cfg, args.nproc_per_node * args.nnodes)  # the layout, before any process starts
    if finished_run(cfg.train.out_dir, cfg.train.steps, cfg.checkpoint.resume) is not None:
        return 0  # as train() would say in every worker, without starting them
    run_lock.check_free(cfg.train.out_dir)  # before starting workers that would only fail on it
    command = ["-m", "llamatron", "train", "--config", args.config]
    for item in args.overrides:
        command += ["--set", item]
    return torchrun(command, args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id)


def cmd_launch(args) -> int:
    import shlex

    from llamatron.config import load_config
    from llamatron.launch import LaunchPlan, render_sbatch, submit

    if args.config is None:
        raise LlamatronError("--config is required (a file with a [launch] section, or a preset name)")
    cfg = load_config(args.config, args.overrides)
    plan = LaunchPlan.for_config(cfg)
    source = shlex.join([args.config] + [w for o in args.overrides for w in ("--set", o)])
    script = render_sbatch(cfg, plan, source=source)
    if args.dry_run:
        print(script, end="")
        return 0
    submit(cfg, script, plan)
    return 0


def cmd_demo(args) -> int:
    from llamatron.config import load_config
    from llamatron.data.corpus import write_default_corpus
    from llamatron.data.preprocess import preprocess
    from llamatron.train.trainer import train

    work = Path(args.workdir)
    data_dir = work / "data"
    corpus = write_default_corpus(data_dir / "json")
    prefixes = {}
    for split in ("train", "valid"):
        prefix = data_dir / "tokens" / f"corpus-{split}"
        out = Path(f"{prefix}_text_document")
        if not (out.with_suffix(".idx").is_file() and out.with_suffix(".bin").is_file()):
            print(f"tokenizing the {split} split with the Llama 3.1 tokenizer ...")
            stats = preprocess([str(p) for p in corpus[split]], str(prefix), "llama3", workers=2)
            print(f"  {stats['documents']:,} documents, {stats['tokens']:,} tokens -> {out}.bin/.idx")
        prefixes[split] = str(out)
    overrides = [f"data.train={prefixes['train']}", f"data.valid={prefixes['valid']}",
                 f"train.out_dir={work / 'run'}", *args.overrides]
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    print_summary(result)
    return _run_ended(result)


def cmd_preprocess(args) -> int:
    from llamatron.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, args.tokenizer, json_keys=tuple(args.json_keys),
                       append_eod=args.append_eod, workers=args.workers, progress=sys.stderr.isatty(),
                       empty_documents=args.empty_documents)
    print(f"{stats['documents']:,} documents ({stats.get('dropped_empty', 0):,} empty dropped), "
          f"{stats['tokens']:,} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:,.0f} tokens/s)")
    for p in stats.get("paths", []):
        print(f"  wrote {p}")
    return 0


def cmd_c4(args) -> int:
    from llamatron.data.c4 import consolidate_c4

    result = consolidate_c4(args.src, args.dst, valid_documents=args.valid_documents, progress=sys.stderr.isatty(),
                            workers=args.workers)
    for k, v in result.items():
        if k == "missing" and len(v) > 3:  # up to 1,017 names: a count and the first and last
            v = f"{len(v)} shards ({v[0]} ... {v[-1]})"
        print(f"{k}: {v}")
    return 0


def cmd_eval(args) -> int:
    from llamatron.config import resolve_model
    from llamatron.data.gpt_dataset import GPTDataset
    from llamatron.data.indexed import IndexedDataset
    from llamatron.eval.perplexity import evaluate
    from llamatron.evaluate import build_model, checkpoint_config
    from llamatron.runtime import Precision, select_device
    from llamatron.train import checkpoint as ckpt

    path = Path(args.checkpoint)
    if not path.exists():
        raise LlamatronError(f"{path}: no such checkpoint")
    if not (path / ".metadata").is_file():  # a run directory: take its newest checkpoint
        newest = ckpt.latest_checkpoint(path)
        if newest is None:
            raise LlamatronError(f"{path}: neither a checkpoint nor a run directory with a complete checkpoint")
        path = newest
    cfg = checkpoint_config(path)
    margs = resolve_model(cfg.model)[1]
    _positive(args, "seq_len", "num_samples", "micro_batch_size")
    seq_len = args.seq_len or cfg.data.seq_len
    if seq_len > margs.max_seq_len:
        raise LlamatronError(f"--seq-len {seq_len}: exceeds the checkpoint model's max_seq_len {margs.max_seq_len}")
    data = IndexedDataset(args.data)
    available = (data.num_tokens - 1) // seq_len
    if available < 1:
        raise LlamatronError(f"{args.data}: {data.num_tokens} tokens, too few for one window of {seq_len + 1}")
    num = args.num_samples or min(available, 1024)
    if num > available:
        raise LlamatronError(f"--num-samples {num}: {args.data} holds only {available} windows of {seq_len + 1} tokens")
    top = data.max_token_id()
    if top >= margs.vocab_size:
        raise LlamatronError(f"{args.data}.bin: token id {top} is outside the model vocabulary of {margs.vocab_size}")
    device = select_device(args.device)
    model = build_model(path, cfg, device)  # as `llamatron evaluate` does: a LoRA run's adapters too
    dataset = GPTDataset(data, seq_len, num, seed=cfg.data.seed, split="valid", shuffle=False)
    mbs = args.micro_batch_size or cfg.train.micro_batch_size
    precision = Precision.choose(cfg.train.precision, device, fsdp=False)
    val = evaluate(model, dataset, num, mbs, device, precision)
    print(f"checkpoint {path}, data {args.data}: {num} windows of {seq_len} tokens")
    print(f"validation log perplexity: {val:.4f}")
    return 0


def _run_ended(result) -> int:
    """The exit status of a run (the requeue code when pre-empted); a rank under torchrun leaves here."""
    from llamatron.runtime import env_world_size

    code = REQUEUE_EXIT_CODE if result.preempted else 0
    if env_world_size() > 1:  # a rank under torchrun: the run (process group included) has ended
        leave_torchrun_rank(code)
    return code


def leave_torchrun_rank(code: int) -> None:
    """End a rank under torchrun, its work written, without the interpreter's teardown: there, threads
    of libraries the run loaded (Arrow's, under `datasets`) aborted ranks after their work was done
    ("terminate called without an active exception", in CI under `evaluate` and `train`;
    huggingface/datasets#7566), and torchrun then failed the job."""
    import logging

    logging.shutdown()  # os._exit runs no atexit hooks: the log handlers are flushed and closed here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_evaluate(args) -> int:
    import torch.distributed as dist

    from llamatron import evaluate
    from llamatron.runtime import env_world_size, rank

    _positive(args, "fp8_min_features")
    if args.fp8 and (args.nproc_per_node is not None or args.tp > 1):
        raise LlamatronError("--fp8: scores in one process only (the FP8 copies need whole weights on one rank)")
    if args.nproc_per_node is not None:
        return _evaluate_torchrun(args)
    try:
        results = evaluate.evaluate(args.checkpoint, args.tasks, args.tokenizer, args.data_dir, args.task_file,
                                    args.prompt, args.limit, args.batch_size, args.device, args.include_path,
                                    args.add_bos, not args.only_include_path, args.bootstrap_iters, args.tp,
                                    args.compile, args.fp8, args.fp8_min_features)
        if rank() == 0:  # under torchrun every rank scores; rank 0 reports
            out = evaluate.write_results(results, args.output or evaluate.default_output(args.checkpoint))
            print(evaluate.format_table(results))
            print(f"wrote {out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env_world_size() > 1:
        leave_torchrun_rank(0)
    return 0


def _evaluate_torchrun(args) -> int:
    """N processes running `llamatron evaluate` with the same arguments, without --nproc-per-node."""
    from llamatron import evaluate
    from llamatron.launch import torchrun

    if args.nproc_per_node < 1:
        raise LlamatronError("--nproc-per-node must be >= 1")
    command = ["-m", "llamatron", "evaluate"]
    for key in ("checkpoint", "tasks", "tokenizer", "data_dir", "prompt", "include_path", "bootstrap_iters", "limit",
                "batch_size", "device", "output", "tp"):
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += [w for item in args.task_file for w in ("--task-file", item)]
    command += [f for f, on in (("--only-include-path", args.only_include_path), ("--add-bos", args.add_bos)) if on]
    if args.compile is not None:
        command.append("--compile" if args.compile else "--no-compile")
    return torchrun(command, args.nproc_per_node)


def _positive(args, *names: str) -> None:
    """Numeric options that must be > 0 when given (0 must not silently mean the default)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:  # also catches nan
            raise LlamatronError(f"--{name.replace('_', '-')} {value}: expected a positive number")


def cmd_flops(args) -> int:
    import dataclasses

    from llamatron import flops
    from llamatron.config import LoraConfig
    from llamatron.models import registry

    _positive(args, "seq_len", "gpus", "step_time", "global_batch", "layers", "kv_heads", "flops_per_sequence", "tokens",
              "lora_rank")
    known = registry.entries()
    if args.model not in known:
        raise LlamatronError(f"--model {args.model!r}: unknown; known sizes: {', '.join(known)}")
    margs = known[args.model].args
    if args.layers:
        margs = dataclasses.replace(margs, n_layers=args.layers)
    if args.kv_heads:
        if not hasattr(margs, "n_kv_heads"):
            raise LlamatronError(f"--kv-heads: the {registry.family_of(margs).name} family has no KV heads")
        margs = dataclasses.replace(margs, n_kv_heads=args.kv_heads)
    lora = LoraConfig(rank=args.lora_rank, targets=["all"]) if args.lora_rank else None
    per_seq = args.flops_per_sequence or flops.flops_per_sequence(margs, args.seq_len, lora)
    print(f"model {args.model}{f' ({args.layers} layers)' if args.layers else ''}, seq {args.seq_len}"
          f"{f', LoRA rank {args.lora_rank} on every block linear' if lora else ''}")
    print(f"model FLOPs per token:    {per_seq / args.seq_len / 1e9:.2f} GFLOP")
    print(f"model FLOPs per sequence: {per_seq:.4e}")
    if args.step_time and args.global_batch:
        tps = flops.tokens_per_second(args.seq_len, args.global_batch, args.step_time)
        print(f"tokens/s:                 {tps:,.0f} ({tps / args.gpus:,.0f} per GPU)")
        tflops = args.global_batch * per_seq / args.step_time / args.gpus / 1e12
        print(f"TFLOP/s per GPU:          {tflops:,.1f}")
        peak = flops.peak_flops(args.device_name, args.precision)
        if peak:
            util = args.global_batch * per_seq / args.step_time / args.gpus / peak
            print(f"MFU ({args.precision} peak {peak / 1e12:.0f} TFLOP/s): {100 * util:.2f}%")
        else:
            print(f"MFU: unknown (no {args.precision} peak known for device {args.device_name!r})")
        if args.tokens:
            print(f"days to train {args.tokens:.3g} tokens: {flops.days_to_train(args.tokens, tps):.2f}")
    elif args.tokens:
        raise LlamatronError("--tokens needs --step-time and --global-batch")
    return 0


def cmd_convert(args) -> int:
    from llamatron import convert

    dst = convert.convert(args.src, args.dst, args.from_format, args.to_format, dtype=args.dtype,
                          max_shard_size=args.max_shard_size)
    print(f"wrote {dst}")
    if args.to_format == "llamatron":
        sets = " ".join(f"--set {o}" for o in convert.model_overrides(convert.checkpoint_model_args(dst)))
        print(f"evaluate: llamatron eval --checkpoint {dst} --data PREFIX")
        print(f"train from it: llamatron train --config FILE {sets} --set checkpoint.init_from={dst}")
    return 0


def cmd_report(args) -> int:
    from llamatron import report

    if args.text:
        print(report.text_report(args.run_dirs, args.target), end="")
        return 0
    out, text = report.write_report(args.run_dirs, args.out, args.png_dir, args.target)
    print(text, end="")
    print(f"wrote {out}")
    return 0


def cmd_plan(args) -> int:
    from llamatron import plan

    if args.calibrate:
        return plan.calibrate(args)
    text, fits = plan.main(args)
    print(text)
    return 0 if fits else 1  # nothing fits: an answer, not an input error


def print_summary(result) -> None:
    # Under torchrun every rank trains and rank 0 reports; a run finished before has said so already.
    if result.rank != 0 or result.already_finished:
        return
    print()
    print("run summary")
    print("-" * 60)
    rows = [
        ("run directory", str(result.out_dir)),
        ("optimizer steps", f"{result.steps}"),
        ("final training loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"),
    ]
    for step, val in result.eval_history:
        rows.append((f"validation log perplexity @ step {step}", f"{val:.4f}"))
    rows += [
        ("tokens/s (last interval)", f"{result.tokens_per_s:,.0f}" if result.tokens_per_s else "n/a"),
        ("MFU", f"{100 * result.mfu:.1f}%" if result.mfu is not None else "n/a (no known peak for this device)"),
        ("checkpoint", str(result.checkpoint) if result.checkpoint else "none"),
        *([("skipped steps (non-finite)", f"{result.skipped_steps}")] if result.skipped_steps else []),
        *([("stopped early by", f"{result.preempted} (exit code {REQUEUE_EXIT_CODE}: requeue to resume)")]
          if result.preempted else []),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]
    if result.mlperf_status is not None:  # an MLPerf run that ended (in this job or an earlier one)
        rows += [
            ("MLPerf status", result.mlperf_status),
            ("time to train (run_start to run_stop)",
             f"{result.time_to_train_s:.1f} s" if result.time_to_train_s is not None else "n/a"),
            ("MLPerf log", str(result.out_dir / "mlperf.log")),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


COMMANDS = {
    "demo": cmd_demo,
    "preprocess": cmd_preprocess,
    "c4": cmd_c4,
    "train": cmd_train,
    "launch": cmd_launch,
    "eval": cmd_eval,
    "evaluate": cmd_evaluate,
    "flops": cmd_flops,
    "convert": cmd_convert,
    "report": cmd_report,
    "plan": cmd_plan,
}


if __name__ == "__main__":
    sys.exit(main())
