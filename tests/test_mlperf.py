"""MLPerf mode: the presets' numbers against the rules' formulas, config errors, and a tiny proxy whose
log passes the mlperf-logging compliance checker, in one go and across interrupted jobs."""

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest

from llamatron.cli import print_summary
from llamatron.config import load_config
from llamatron.eval import perplexity
from llamatron.eval.perplexity import Cadence
from llamatron.errors import LlamatronError
from llamatron.train.mlperf_log import MLPerfLog
from llamatron.train.trainer import train

# ------------------------------------------------------------------------------------------------
# The rules' numbers


def _405b(gbs, *extra):
    return load_config("mlperf-llama31-405b", [f"train.global_batch_size={gbs}", "checkpoint.init_from=ckpt", *extra])


@pytest.mark.parametrize("gbs", [1152, 1536, 2304, 3456, 4608, 6912, 9216])
def test_405b_preset_derives_the_rules_from_the_batch(gbs):
    c = _405b(gbs)
    o = c.optim
    assert o.lr * 1152 == gbs * 8e-5  # the compliance checker's exact test
    assert o.lr == pytest.approx(8e-5 * gbs / 1152, rel=1e-15)
    assert o.warmup_steps == math.ceil(8000 * 1152 / gbs)
    assert o.schedule_steps == math.ceil(1_200_000 * 1152 / gbs) == c.train.steps
    assert o.min_lr == 8e-7
    assert (c.eval.every_samples, c.eval.samples, c.eval.at_start) == (18432, 5760, False)
    assert c.eval.first_interval == math.floor(0.0026 * gbs + 12)
    assert c.mlperf.target == 5.6 and c.data.seq_len == 8192
    assert (c.data.train_weights, len(c.data.train)) == ([50.0, 50.0], 2)


@pytest.mark.parametrize("gbs,lr,warmup,first_evals", [
    (1152, 8e-5, 8000, [224, 240, 256]),  # 224 steps = 258,048 sequences, the reference's first
    (2304, 16e-5, 4000, [136, 144, 152]),
    (4608, 32e-5, 2000, [92, 96, 100]),
    (9216, 64e-5, 1000, [70, 72, 74]),
])
def test_405b_published_values(gbs, lr, warmup, first_evals):
    """The rules' table (TP 405B hyperparameter constraints, RCP files) and the reference's cadence."""
    c = _405b(gbs)
    assert c.optim.lr == pytest.approx(lr, rel=1e-12) and c.optim.warmup_steps == warmup
    cadence = Cadence.from_config(c.eval, c.train.global_batch_size)
    evals = [s for s in range(1, first_evals[-1] + 1) if cadence.due(s)]
    assert evals == first_evals


@pytest.mark.parametrize("gbs,lr,warmup", [(16, 4e-4, 16), (32, 8e-4, 128), (64, 8e-4, 96), (96, 1e-3, 171),
                                           (128, 2e-3, 256)])
def test_8b_preset_takes_the_rcp_of_the_batch(gbs, lr, warmup):
    c = load_config("mlperf-llama31-8b", [f"train.global_batch_size={gbs}"])
    assert (c.optim.lr, c.optim.warmup_steps) == (lr, warmup)
    assert c.optim.min_lr == pytest.approx(0.1 * lr)
    assert c.optim.schedule_steps == c.train.steps == 1_200_000
    assert (c.eval.every_samples, c.eval.first_interval, c.eval.samples) == (12288, 1, 1024)
    every = math.ceil(12288 / gbs)
    cadence = Cadence.from_config(c.eval, c.train.global_batch_size)
    assert [s for s in range(1, 3 * every + 1) if cadence.due(s)] == [every, 2 * every, 3 * every]
    assert c.mlperf.target == 3.3 and c.data.train[0].endswith("en_6_text_document")


def test_explicit_keys_win_over_the_rules():
    c = load_config("mlperf-llama31-8b", ["train.global_batch_size=48", "optim.lr=1e-3", "optim.warmup_steps=100"])
    assert (c.optim.lr, c.optim.warmup_steps) == (1e-3, 100) and c.optim.min_lr == pytest.approx(1e-4)
    assert c.eval.every_samples == 12288  # still derived
    c = _405b(1152, "eval.every_samples=36864", "train.steps=500")
    assert (c.eval.every_samples, c.train.steps, c.optim.schedule_steps) == (36864, 500, 1_200_000)
    c = _405b(2304, "mlperf.eval_cadence=readme")
    assert (c.eval.every_samples, c.eval.first_interval, c.eval.samples) == (46080, 1, 5760)
    c = load_config("mlperf-llama31-8b", ["mlperf.eval_cadence=readme", "mlperf.division=open"])
    assert (c.eval.every_samples, c.eval.samples) == (46080, 5760)


@pytest.mark.parametrize("preset,overrides,needle", [
    ("mlperf-llama31-8b", ["mlperf.benchmark=llama31_70b"], "'mlperf.benchmark'"),
    ("mlperf-llama31-8b", ["mlperf.eval_cadence=often"], "'mlperf.eval_cadence'"),
    ("mlperf-llama31-8b", ["mlperf.division=private"], "'mlperf.division'"),
    ("mlperf-llama31-8b", ["mlperf.org=' '"], "'mlperf.org'"),
    ("mlperf-llama31-8b", ["train.global_batch_size=48"], "'optim.lr'"),
    ("mlperf-llama31-8b", ["data.seq_len=4096"], "'data.seq_len'"),
    ("mlperf-llama31-8b", ["optim.beta2=0.999"], "'optim.beta2'"),
    ("mlperf-llama31-8b", ["mlperf.eval_cadence=readme"], "'eval.samples'"),
    ("mlperf-llama31-8b", ["optim.schedule_steps=1000"], "'optim.schedule_steps'"),
    ("mlperf-llama31-8b", ["mlperf.target=3.5"], "'mlperf.target'"),
    ("mlperf-llama31-8b", ["eval.first_interval=0"], "'eval.first_interval'"),
    ("mlperf-llama31-405b", [], "'checkpoint.init_from'"),
    ("mlperf-llama31-405b", ["checkpoint.init_from=x", "optim.lr=1e-4"], "'optim.lr'"),
    ("mlperf-llama31-405b", ["checkpoint.init_from=x", "optim.warmup_steps=10"], "'optim.warmup_steps'"),
    ("mlperf-llama31-405b", ["checkpoint.init_from=x", "train.global_batch_size=1984"], "'train.global_batch_size'"),
])
def test_bad_mlperf_config_names_the_key(preset, overrides, needle):
    with pytest.raises(LlamatronError) as e:
        load_config(preset, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# A tiny proxy in MLPerf mode, checked by the mlperf-logging compliance checker

# The reference's order (REFERENCE.md A.5) for a run that reaches the target at its first validation;
# max_steps (the 8B checker's) and the 6.1 disclosure keys come in addition.
A5_KEYS = [
    "cache_clear", "init_start", "submission_benchmark", "submission_org", "submission_division",
    "submission_status", "submission_platform", "submission_poc_name", "submission_poc_email",
    "global_batch_size", "gradient_accumulation_steps", "max_sequence_length", "eval_samples", "opt_name",
    "opt_base_learning_rate", "opt_adamw_beta_1", "opt_adamw_beta_2", "opt_adamw_epsilon",
    "opt_adamw_weight_decay", "opt_gradient_clip_norm", "opt_end_learning_rate",
    "opt_learning_rate_warmup_steps", "opt_learning_rate_decay_steps", "opt_learning_rate_decay_schedule",
    "seed", "init_checkpoint_step", "init_stop", "run_start", "epoch_start", "block_start",
    "block_stop", "eval_start", "eval_accuracy", "eval_stop", "epoch_stop", "run_stop", "train_samples",
]
EXTRA_KEYS = {"max_steps", "lowest_numerical_precision_in_linear", "lowest_numerical_precision_in_attn",
              "lowest_numerical_precision_in_comm", "tensor_parallelism", "pipeline_parallelism",
              "context_parallelism", "expert_parallelism", "micro_batch_size", "config_filename"}
# mlperf-logging rule sets that know llama31_8b.
RULESETS = ("5.1.0", "6.0.0", "6.1.0")


@pytest.fixture(scope="module")
def proxy_data(tmp_path_factory):
    """Tokens drawn from 4 of 512 ids (log perplexity floor ln 4 = 1.39, start ~6.2), a 512-word
    tokenizer, and 1,024 validation windows of 8,192 tokens: what the 8B checker requires."""
    import tokenizers
    from tokenizers.models import WordLevel

    from llamatron.data.indexed import IndexedDatasetWriter

    d = tmp_path_factory.mktemp("mlperf-data")
    tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0")).save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(d / "train", np.int32) as w:
        for _ in range(100):
            w.add_document(rng.integers(10, 14, size=1000))
    with IndexedDatasetWriter(d / "valid", np.int32) as w:
        for _ in range(84):  # 8.4M tokens >= 1024 x 8192 + 1
            w.add_document(rng.integers(10, 14, size=100_000))
    return d


def _proxy(data, out, *extra):
    """The 8B preset with a 1-layer, width-16 model: GBS 2, peak LR 0.05 without warmup (8B leaves
    both to the submitter), a validation every 4 steps (8 sequences; the checker does not see the
    cadence). It reaches 3.3 at its first validation."""
    return load_config("mlperf-llama31-8b", [
        "model.size=debug", "model.dim=16", "model.n_layers=1", "model.n_heads=1", "model.n_kv_heads=1",
        "model.ffn_dim=32", "model.max_seq_len=8192",
        f"data.train={data / 'train'}", f"data.valid={data / 'valid'}", f"data.tokenizer={data / 'tokenizer.json'}",
        "train.global_batch_size=2", "train.micro_batch_size=2", "optim.lr=0.05", "optim.warmup_steps=0",
        "train.steps=8", "eval.every_samples=8", "eval.micro_batch_size=16", "train.device=cpu",
        "train.precision=fp32", f"train.out_dir={out}", "mlperf.clear_caches=false", "mlperf.org=llamatron-tests",
        "mlperf.platform=cpu", *extra,
    ])


def _lines(path):
    return [json.loads(l.split(":::MLLOG ", 1)[1]) for l in path.read_text().splitlines()]


def _check(log, tmp_path, benchmark="llama31_8b", rulesets=RULESETS):
    for ruleset in rulesets:
        r = subprocess.run(
            [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", ruleset,
             "--log_output", str(tmp_path / f"checker-{ruleset}.log"), str(log)],
            capture_output=True, text=True, cwd=tmp_path, start_new_session=True,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "SUCCESS" in out and f"training_{ruleset}/closed_{benchmark}.yaml" in out, out


def _quiet(*_):
    pass


@pytest.mark.slow
def test_interrupted_and_resumed_run_reaches_target_and_logs_one_run_that_passes_the_checker(
        proxy_data, tmp_path, monkeypatch, capsys):
    """Three jobs of one run: out of steps, crashed in validation, then resumed to the target. Each
    validation scores the checker's 1,024 windows of 8,192 tokens (~30 s on 2 CPU cores), so one
    test carries the whole story: the uninterrupted run's log is the last job's log minus the resume."""
    out = tmp_path / "run"
    log = out / "mlperf.log"
    # Job 1 is given 2 steps: it ends out of steps, before any validation, with status aborted.
    res = train(_proxy(proxy_data, out, "train.steps=2"), progress=False, log=_quiet)
    assert res.mlperf_status == "aborted" and [l["key"] for l in _lines(log)][-3:] == ["epoch_stop", "run_stop", "train_samples"]

    # Job 2, given 8, continues from the step-2 checkpoint and is killed inside its validation at step 4.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    real_evaluate = perplexity.evaluate
    monkeypatch.setattr(perplexity, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_proxy(proxy_data, out), progress=False, log=_quiet)
    keys = [l["key"] for l in _lines(log)]
    assert "run_stop" not in keys and keys[-2:] == ["block_stop", "eval_start"]

    # Job 3 resumes from step 2 again and reaches the target at step 4.
    monkeypatch.setattr(perplexity, "evaluate", real_evaluate)
    res = train(_proxy(proxy_data, out), progress=False, log=_quiet)
    assert res.mlperf_status == "success" and res.steps == 4  # stopped at the target, not at train.steps
    lines = _lines(log)
    assert [l["key"] for l in lines if l["key"] not in EXTRA_KEYS] == A5_KEYS  # one run: one init, one run_start
    assert [l["metadata"]["samples_count"] for l in lines if l["key"] == "eval_accuracy"] == [8]  # from 0
    by_key = {l["key"]: l for l in lines}
    assert by_key["eval_accuracy"]["value"] <= 3.3
    assert by_key["run_stop"]["metadata"]["status"] == "success" and by_key["train_samples"]["value"] == 8
    assert by_key["max_steps"]["value"] == 1_200_000 and by_key["opt_learning_rate_decay_steps"]["value"] == 1_200_000
    # Time to train spans the jobs: run_start of job 1 to run_stop of job 3.
    assert res.time_to_train_s == (by_key["run_stop"]["time_ms"] - by_key["run_start"]["time_ms"]) / 1000
    print_summary(res)
    assert "time to train (run_start to run_stop)" in capsys.readouterr().out
    # What jobs 1 and 2 logged after the step-2 checkpoint was redone; it is kept aside, not lost.
    superseded = [l["key"] for l in _lines(out / "mlperf_superseded.log")]
    assert superseded == ["epoch_stop", "run_stop", "train_samples", "block_stop", "eval_start"]
    _check(log, tmp_path)

    # Running the finished run again does nothing and leaves its log alone.
    before = log.read_bytes()
    res = train(_proxy(proxy_data, out), progress=False, log=_quiet)
    assert res.mlperf_status == "success" and log.read_bytes() == before and res.time_to_train_s > 0


def test_resuming_a_run_that_was_not_in_mlperf_mode_is_refused(tmp_path):
    out = tmp_path / "run"
    plain = ["model.size=debug", "data.mock=true", "data.seq_len=32", "train.global_batch_size=2",
             "train.micro_batch_size=2", "train.device=cpu", "eval.samples=2", f"train.out_dir={out}"]
    train(load_config(None, [*plain, "train.steps=1"]), progress=False, log=_quiet)
    cfg = load_config(None, [*plain, "train.steps=2", "mlperf.benchmark=llama31_8b", "mlperf.division=open",
                             "optim.lr=1e-3", "optim.warmup_steps=0", "mlperf.clear_caches=false"])
    with pytest.raises(LlamatronError, match="'mlperf.benchmark'.*without MLPerf mode"):
        train(cfg, progress=False, log=_quiet)


@pytest.mark.parametrize("gbs", [1152, 2304, 4608])
def test_405b_log_passes_the_405b_checker(tmp_path, gbs):
    """The logger driven by hand with the 405B preset's values (no 405B to train here): its header and
    a run that reaches 5.6 at the third validation pass the llama31_405b rule sets."""
    cfg = _405b(gbs, "mlperf.clear_caches=false", f"train.out_dir={tmp_path}")
    run = MLPerfLog(cfg, tmp_path, write=True, log=_quiet)
    run.begin(0, None, accum=gbs // 8, dims=types.SimpleNamespace(tp=8, pp=9, cp=4), device_name="NVIDIA H100",
              bf16=True)
    first = cfg.eval.first_interval * math.ceil(18432 / gbs) * gbs
    for k, loss in enumerate([5.9, 5.7, 5.59]):
        samples = first + k * math.ceil(18432 / gbs) * gbs
        run.eval_start(samples)
        run.eval_stop(samples, loss)
    assert run.done and run.status == "success"
    _check(tmp_path / "mlperf.log", tmp_path, "llama31_405b", ("5.0.0", "5.1.0", "6.0.0"))
