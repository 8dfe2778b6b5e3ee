"""Bad input, table-driven (issue 17): every row runs the CLI in process (`llamatron.cli.main`) on one
malformed input and asserts exit status 2, exactly one line on stderr (no traceback) that names the
culprit (file, line or key) and what was expected. Add a case by adding a row: a setup function that
makes the files in a temporary directory and returns the argv, and the strings the line must hold.
"""

import gzip
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from llamatron.cli import main
from llamatron.data.indexed import IndexedDatasetWriter

torch.set_num_threads(1)

DEBUG = ["--set", "model.size=debug", "--set", "train.device=cpu", "--set", "train.threads=1",
         "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2", "--set", "data.seq_len=16"]


def _train(t, *sets, mock=True):
    argv = ["train", "--config", "demo", *DEBUG, "--set", f"train.out_dir={t / 'run'}", "--set", "train.steps=1"]
    if mock:
        argv += ["--set", "data.mock=true"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _tokens(t, name="d", docs=20, length=50, dtype=np.int32):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(t / name, dtype) as w:
        for _ in range(docs):
            w.add_document(rng.integers(0, 500, size=length))
    return t / name


def _train_on(t, prefix, *sets):
    # A tokenizer that fits the debug model's 512 ids (the default Llama 3.1 one has 128,256).
    return _train(t, f"data.train={prefix}", f"data.tokenizer={_tokenizer_json(t)}", *sets, mock=False)


def _write(t, name, data: bytes):
    (t / name).write_bytes(data)
    return t / name


def _preprocess(t, *inputs, extra=()):
    return ["preprocess", "--input", *map(str, inputs), "--output-prefix", str(t / "out" / "x"), *extra]


GOOD = b'{"text": "fine words here"}\n'


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-step debug run (seq_len 16) and a small token file, shared by the eval/resume rows."""
    t = tmp_path_factory.mktemp("trained")
    assert main(_train(t, "eval.samples=0", "checkpoint.every=1")) == 0
    _tokens(t, "v")
    return t


def _newest(trained):
    return sorted((trained / "run" / "checkpoints").glob("step_*"))[-1]


def _flipped(shard):
    """The issue's silent corruption: 16 bytes flipped inside the shard's tensor data."""
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    shard.write_bytes(data)


def _flipped_checkpoint(t, trained):
    dst = t / "ck"
    shutil.copytree(_newest(trained), dst)
    _flipped(dst / "__0_0.distcp")
    return dst


def _resume_flipped(t, trained):
    shutil.copytree(trained / "run", t / "run")
    _flipped(_newest(t) / "__0_0.distcp")
    return _train(t, "eval.samples=0", "train.steps=2")


def _damaged_checkpoint(t, trained):
    src = _newest(trained)
    dst = t / "ck"
    shutil.copytree(src, dst)
    shard = next(dst.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    return dst


def _resume_changed(t, trained, *sets):
    shutil.copytree(trained / "run", t / "run")
    return _train(t, "eval.samples=0", "train.steps=2", *sets)


def _gz_two_members_second_cut(t):
    second = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 30}).encode() + b"\n" for i in range(400)))
    return _write(t, "two.json.gz", gzip.compress(GOOD * 5) + second[: len(second) // 2])


def _tokenizer_json(t):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["some words for a tiny vocabulary"] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(t / "tokenizer.json"))
    return t / "tokenizer.json"


def _not_a_dir(t):
    _write(t, "file", b"x")
    return t / "file" / "sub"


# (id, setup(tmp_path, trained) -> argv, strings the error line must hold)
CASES = [
    # config values
    ("lr-inf", lambda t, _: _train(t, "optim.lr=inf"), ["optim.lr", "not finite"]),
    ("lr-nan", lambda t, _: _train(t, "optim.lr=nan"), ["optim.lr", "not finite"]),
    ("model-float-inf", lambda t, _: _train(t, "model.norm_eps=.inf"), ["model.norm_eps", "not finite"]),
    ("optional-float-inf", lambda t, _: _train(t, "mlperf.target=inf"),
     ["config key 'mlperf.target': inf is not finite; expected a finite number"]),
    ("float-list-inf", lambda t, _: _train(t, "data.train_weights=[inf,1]"),
     ["config key 'data.train_weights': inf is not finite; expected a finite number"]),
    ("optional-float-not-a-number", lambda t, _: _train(t, "mlperf.target=abc"), ["mlperf.target", "'abc' is not a number"]),
    ("seq-len-above-model-max", lambda t, _: _train(t, "data.seq_len=100000"), ["data.seq_len", "max_seq_len 256"]),
    ("unknown-key", lambda t, _: _train(t, "train.bogus=1"), ["train.bogus"]),
    ("yaml-syntax-line", lambda t, _: ["train", "--config", str(_write(t, "c.yaml", b"train:\n  steps: [1, 2\nx: 1\n"))],
     ["c.yaml", "line 3"]),
    ("toml-syntax-line", lambda t, _: ["train", "--config", str(_write(t, "c.toml", b"[train]\nsteps = = 2\n"))],
     ["c.toml", "line 2"]),
    # training data
    ("idx-bad-magic", lambda t, _: _train_on(t, _corrupt_idx(t)), ["d.idx", "magic"]),
    ("bin-truncated", lambda t, _: _train_on(t, _truncate_bin(t)), ["d.bin", "truncated"]),
    ("bin-missing", lambda t, _: _train_on(t, _without(t, "d.bin")), ["d.bin"]),
    ("idx-missing", lambda t, _: _train_on(t, _without(t, "d.idx")), ["d.idx"]),
    ("float-tokens", lambda t, _: _train_on(t, _tokens(t, dtype=np.float32)), ["d.idx", "float32", "integers"]),
    ("uint16-for-llama3", lambda t, _: _train(t, f"data.train={_tokens(t, dtype=np.uint16)}", "model.vocab_size=128256",
                                              mock=False), ["d.idx", "uint16", "data.tokenizer"]),
    ("train-data-shorter-than-a-window", lambda t, _: _train_on(t, _tokens(t, docs=1, length=10)),
     ["data.seq_len", "d", "window"]),
    ("eval-samples-beyond-valid", lambda t, _: _train_on(t, _tokens(t), f"data.valid={_tokens(t, 'v', docs=2)}",
                                                         "eval.samples=1000"),
     ["eval.samples", "1000", "windows"]),
    # run directory and checkpoints
    ("out-dir-not-writable", lambda t, _: _train(t, f"train.out_dir={_not_a_dir(t)}"), ["train.out_dir", "sub"]),
    ("init-from-not-a-checkpoint", lambda t, _: _train(t, f"checkpoint.init_from={t}"), ["checkpoint.init_from"]),
    ("init-from-other-model-size", lambda t, tr: _train(t, "model.dim=128", "model.ffn_dim=320",
                                                        f"checkpoint.init_from={_newest(tr)}"),
     ["checkpoint.init_from", "[512, 64]", "[512, 128]"]),
    ("resume-changed-data-seed", lambda t, tr: _resume_changed(t, tr, "data.seed=999"),
     ["data.seed", "1234", "999", "checkpoint.allow_config_change"]),
    ("resume-changed-batch", lambda t, tr: _resume_changed(t, tr, "train.global_batch_size=4"),
     ["train.global_batch_size"]),
    # preprocess
    ("json-bad-line", lambda t, _: _preprocess(t, _write(t, "bad.jsonl", GOOD * 2 + b'{"text": "cut\n')), ["bad.jsonl:3"]),
    ("jsonl-empty", lambda t, _: _preprocess(t, _write(t, "empty.jsonl", b"")), ["empty.jsonl"]),
    ("gz-truncated-second-member", lambda t, _: _preprocess(t, _gz_two_members_second_cut(t)),
     ["two.json.gz", "truncated", "member 2"]),
    ("input-missing", lambda t, _: _preprocess(t, t / "absent.jsonl"), ["absent.jsonl"]),
    ("tokenizer-missing", lambda t, _: _preprocess(t, _write(t, "a.jsonl", GOOD), extra=["--tokenizer", str(t / "no.model")]),
     ["no.model"]),
    ("output-prefix-not-writable", lambda t, _: ["preprocess", "--input", str(_write(t, "a.jsonl", GOOD)),
                                                 "--output-prefix", str(_not_a_dir(t) / "x")],
     ["--output-prefix", "sub"]),
    # eval
    ("eval-seq-len-above-max", lambda t, tr: _eval(tr, "--seq-len", "100000"), ["--seq-len", "max_seq_len 256"]),
    ("eval-seq-len-negative", lambda t, tr: _eval(tr, "--seq-len", "-5"), ["--seq-len", "-5", "positive"]),
    ("eval-seq-len-zero", lambda t, tr: _eval(tr, "--seq-len", "0"), ["--seq-len 0", "positive"]),
    ("eval-num-samples-zero", lambda t, tr: _eval(tr, "--num-samples", "0"), ["--num-samples", "positive"]),
    ("eval-micro-batch-zero", lambda t, tr: _eval(tr, "--micro-batch-size", "0"), ["--micro-batch-size", "positive"]),
    ("eval-truncated-shard", lambda t, tr: ["eval", "--checkpoint", str(_damaged_checkpoint(t, tr)),
                                             "--data", str(tr / "v")], ["ck: damaged: __0_0.distcp has 1000 bytes but was saved with "]),
    ("eval-flipped-bytes", lambda t, tr: ["eval", "--checkpoint", str(_flipped_checkpoint(t, tr)),
                                           "--data", str(tr / "v")],
     ["ck: damaged: __0_0.distcp has crc32 ", " but was saved with "]),
    ("resume-flipped-bytes", _resume_flipped, ["step_00000001: damaged (__0_0.distcp has crc32 ",
                                               "no complete checkpoint before it is left"]),
    # flops
    ("flops-seq-len-zero", lambda t, _: ["flops", "--seq-len", "0"], ["--seq-len", "positive"]),
    ("flops-gpus-zero", lambda t, _: ["flops", "--step-time", "1", "--global-batch", "8", "--gpus", "0"],
     ["--gpus", "positive"]),
    ("flops-step-time-negative", lambda t, _: ["flops", "--step-time", "-1", "--global-batch", "8"],
     ["--step-time", "positive"]),
    # convert, c4, launch
    ("convert-missing-source", lambda t, _: ["convert", "--from", "hf", "--to", "llamatron", str(t / "no"), str(t / "d")],
     ["no", "not a directory"]),
    ("convert-hf-config-incomplete", lambda t, _: ["convert", "--from", "hf", "--to", "llamatron",
                                                   str(_dir_with(t, "config.json", b"{}")), str(t / "d")],
     ["config.json", "num_attention_heads"]),
    ("convert-meta-without-params", lambda t, _: ["convert", "--from", "meta", "--to", "llamatron",
                                                  str(_dir_with(t, "x.txt", b"")), str(t / "d")], ["params.json"]),
    ("convert-destination-exists", lambda t, tr: ["convert", "--from", "llamatron", "--to", "hf", str(tr / "run"),
                                                  str(_dir_with(t, "x.txt", b""))], ["already exists"]),
    ("c4-missing-source", lambda t, _: ["c4", "--src", str(t / "no"), "--dst", str(t / "d")], ["no", "C4 shards"]),
    ("c4-truncated-shard", lambda t, _: ["c4", "--src", str(_c4_one_shard_cut(t)), "--dst", str(t / "d")],
     ["c4-train.00005-of-01024.json.gz", "truncated at byte", "member 1", "CRC/length trailer"]),
    ("launch-bad-key", lambda t, _: ["launch", "--config", "demo", "--set", "data.mock=true", "--set", "launch.nodes=0",
                                     "--dry-run"], ["launch.nodes", ">= 1"]),
]


def _c4_one_shard_cut(t):
    """All 1,032 shards (none missing, so no warning precedes the error), shard 5 without the last 8
    bytes: its trailer."""
    src = t / "c4"
    src.mkdir()
    data = gzip.compress(GOOD * 3)
    names = [f"c4-train.{i:05d}-of-01024.json.gz" for i in range(1024)]
    for name in names + [f"c4-validation.{i:05d}-of-00008.json.gz" for i in range(8)]:
        _write(src, name, data[:-8] if name == names[5] else data)
    return src


def _dir_with(t, name, data: bytes):
    d = t / "src"
    d.mkdir(exist_ok=True)
    _write(d, name, data)
    return d


def _snapshot(*roots):
    """Every existing file's bytes: a failed command may add files (a temporary) but must change none
    of those that were there (the run lock's holder line aside)."""
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def _eval(trained, *extra):
    return ["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "v"), *extra]


def _corrupt_idx(t):
    p = _tokens(t)
    idx = p.with_suffix(".idx")
    idx.write_bytes(b"GARBAGE!!" + idx.read_bytes()[9:])
    return p


def _truncate_bin(t):
    p = _tokens(t)
    b = p.with_suffix(".bin")
    b.write_bytes(b.read_bytes()[:-10])
    return p


def _without(t, name):
    p = _tokens(t)
    (t / name).unlink()
    return p


@pytest.mark.parametrize("setup,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, trained, capsys, setup, needles):
    argv = setup(tmp_path, trained)
    before = _snapshot(tmp_path, trained)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    after = _snapshot(tmp_path, trained)
    assert {p: after.get(p) for p in before} == before, "a failed command changed a file"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert re.match(r"llamatron \w+: error: ", lines[0]), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_finished_run_again_exits_0_without_retraining(trained, capsys):
    rows = (trained / "run" / "metrics.jsonl").read_text()
    assert main(_train(trained, "eval.samples=0", "checkpoint.every=1")) == 0
    assert "already finished: checkpoint at step 1" in capsys.readouterr().out
    assert (trained / "run" / "metrics.jsonl").read_text() == rows  # nothing reloaded, validated or appended


def test_demo_again_on_a_finished_workdir_exits_at_once(tmp_path, capsys):
    """`llamatron demo` calls train() itself, and run again on its workdir it reloaded, validated again
    and appended a duplicate eval row. The corpus and token files already in the workdir are used as
    they are (not written or tokenized again: seconds), so the debug model trains here on ids below its
    512 with a tokenizer that fits."""
    corpus, tokens = tmp_path / "demo" / "data" / "json", tmp_path / "demo" / "data" / "tokens"
    corpus.mkdir(parents=True)
    tokens.mkdir()
    for name in ["c4-train.00000-of-00002", "c4-train.00001-of-00002", "c4-validation.00000-of-00001"]:
        _write(corpus, f"{name}.json.gz", gzip.compress(GOOD))
    for split in ("train", "valid"):
        _tokens(tokens, f"corpus-{split}_text_document")
    argv = ["demo", "--workdir", str(tmp_path / "demo"), *DEBUG, "--set", f"data.tokenizer={_tokenizer_json(tmp_path)}",
            "--set", "train.steps=2", "--set", "eval.samples=2"]
    assert main(argv) == 0
    metrics = tmp_path / "demo" / "run" / "metrics.jsonl"
    rows = metrics.read_text()
    assert '"kind": "eval"' in rows and "run summary" in capsys.readouterr().out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'demo' / 'run'} already finished: checkpoint at step 2" in out and "run summary" not in out
    assert metrics.read_text() == rows


def test_resume_with_allowed_change_logs_the_keys(tmp_path, trained, capsys):
    argv = _resume_changed(tmp_path, trained, "data.seed=999", "checkpoint.allow_config_change=true")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "data.seed: 1234 -> 999" in out
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")


def test_lone_surrogate_with_a_tokenizer_json(tmp_path, capsys):
    """JSON allows a lone surrogate ("a\\ud800b"); the HF tokenizer takes it as tiktoken does (U+FFFD)
    instead of a TypeError traceback."""
    from llamatron.data.indexed import IndexedDataset
    from llamatron.tokenizer import load_tokenizer

    src = _write(tmp_path, "s.jsonl", b'{"text": "a\\ud800b"}\n' + GOOD)
    tok = _tokenizer_json(tmp_path)
    assert main(_preprocess(tmp_path, src, extra=["--tokenizer", str(tok)])) == 0
    ds = IndexedDataset(tmp_path / "out" / "x_text_document")
    assert ds[0].tolist() == load_tokenizer(str(tok)).encode("a\ufffdb") and len(ds) == 2


def test_c4_missing_shards_are_counted_not_listed(tmp_path, capsys):
    src = tmp_path / "c4"
    src.mkdir()
    for name in ["c4-train.00000-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"]:
        _write(src, name, gzip.compress(GOOD * 3))
    assert main(["c4", "--src", str(src), "--dst", str(tmp_path / "dst"), "--valid-documents", "2"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("missing:"))
    assert line == ("missing: 1030 shards (c4-train.00001-of-01024.json.gz ... "
                    "c4-validation.00007-of-00008.json.gz)")


def test_preprocess_removes_the_temporaries_of_a_killed_run(tmp_path):
    """`preprocess` killed with -9 left `*.bin.tmpPID.*` forever (defect 9): the next run of the same
    prefix removes those of dead writers of this host, and keeps a live writer's."""
    import subprocess
    import sys

    from llamatron.data.indexed import IndexedDatasetWriter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          start_new_session=True)
    with IndexedDatasetWriter(tmp_path / "probe", np.int32) as w:  # the temp-name format of this host
        live_name = w._tmp_bin.name
    pid = live_name.split(".tmp")[1].split(".")[0]
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / live_name.replace("probe", "x_text_document").replace(f".tmp{pid}.",
                                                                                   f".tmp{dead.stdout.strip()}.")
    live = tmp_path / "out" / live_name.replace("probe", "x_text_document")  # this process: alive
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    assert main(_preprocess(tmp_path, _write(tmp_path, "a.jsonl", GOOD), extra=["--tokenizer", str(_tokenizer_json(tmp_path))])) == 0
    assert not stale.exists() and live.exists()


def test_odd_seq_len_without_context_parallel_is_fine():
    from llamatron.config import load_config

    assert load_config("demo", ["model.size=debug", "data.mock=true", "data.seq_len=17"]).data.seq_len == 17


def test_memory_estimate_above_the_device_warns(tmp_path, monkeypatch, capsys):
    from llamatron import runtime

    monkeypatch.setattr(runtime, "device_memory", lambda device: 2**20)  # a 1 MiB device
    assert main(_train(tmp_path, "eval.samples=0")) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: the memory estimate per rank, [\d.]+ GiB, exceeds the 0\.0 GiB of ", out), out


def _index_cache_run(t, prefix, *sets):
    return _train_on(t, prefix, "train.steps=2", "train.log_every=1", "eval.samples=0", *sets)


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(out_dir / "metrics.jsonl")) if r["kind"] == "train"]


def test_sample_index_cached_next_to_the_data_by_default(tmp_path):
    """data.cache_dir unset (defect 11c): the index is cached where Megatron puts it, PREFIX/cache/
    GPTDataset_indices, and a second run reads it; the order (the losses) is the same with and without."""
    from llamatron.data.gpt_dataset import default_cache_dir

    prefix = _tokens(tmp_path)
    assert main(_index_cache_run(tmp_path, prefix)) == 0
    cache = tmp_path / default_cache_dir(prefix)
    files = sorted(p.name.split("-", 1)[1] for p in cache.iterdir())
    assert "GPTDataset-train-sample_index.npy" in files and "BlendedDataset-train-dataset_index.npy" not in files
    stamp = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    first = _losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    assert main(_index_cache_run(tmp_path, prefix)) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp  # read, not rebuilt
    shutil.rmtree(tmp_path / "run")
    assert main(_index_cache_run(tmp_path, prefix, "data.cache_index=false")) == 0
    assert _losses(tmp_path / "run") == first and len(first) == 2


def test_sample_index_cache_falls_back_to_out_dir(tmp_path):
    prefix = _tokens(tmp_path)
    prefix.write_bytes(b"")  # a file where Megatron's cache directory would go: not writable there
    assert main(_index_cache_run(tmp_path, prefix)) == 0
    assert any(p.name.endswith("GPTDataset-train-sample_index.npy") for p in (tmp_path / "run" / "cache").iterdir())
