"""Bad input at the command line: one line naming the culprit, a non-zero exit, no traceback."""

import gzip
import json
import subprocess
import sys

import numpy as np

from llamatron.cli import main
from llamatron.data.indexed import IndexedDatasetWriter


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    # Progress bars may precede it; the error itself is exactly one line, the last.
    lines = [l for l in err.strip().splitlines() if "error:" in l]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_tokenizer_file(tmp_path, capsys):
    inp = tmp_path / "a.jsonl"
    inp.write_text(json.dumps({"text": "hello"}) + "\n")
    code, err = run_cli(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / "o"),
                         "--tokenizer", str(tmp_path / "nope.model")], capsys)
    assert_one_line_error(code, err, "nope.model")
    assert not list(tmp_path.glob("o*"))


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
    inp = tmp_path / "c4.json.gz"
    with gzip.open(inp, "wt") as f:
        f.write(json.dumps({"text": "fine"}) + "\n")
        f.write('{"text": "broken\n')
    code, err = run_cli(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "c4.json.gz", "2")
    assert not list(tmp_path.glob("o_*"))


def test_empty_corpus(tmp_path, capsys):
    inp = tmp_path / "empty.jsonl"
    inp.write_text("")
    code, err = run_cli(["preprocess", "--input", str(inp), "--output-prefix", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "empty.jsonl")


def test_prefix_without_idx(tmp_path, capsys):
    with IndexedDatasetWriter(tmp_path / "d", np.int32) as w:
        w.add_document(np.arange(100))
    (tmp_path / "d.idx").unlink()
    code, err = run_cli(["train", "--config", "demo", "--set", f"data.train={tmp_path / 'd'}",
                         "--set", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "d.idx")


def test_unknown_config_key(tmp_path, capsys):
    code, err = run_cli(["train", "--config", "demo", "--set", "train.bogus=1"], capsys)
    assert_one_line_error(code, err, "train.bogus")


def test_impossible_batch_arithmetic(capsys):
    code, err = run_cli(["train", "--config", "demo", "--set", "data.mock=true",
                         "--set", "train.global_batch_size=6", "--set", "train.micro_batch_size=4"], capsys)
    assert_one_line_error(code, err, "train.global_batch_size", "divisible")


def test_eval_prints_validation_log_perplexity(tmp_path, capsys):
    """Train a debug model a few steps, then `llamatron eval` scores it on a dataset."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "v", np.int32) as w:
        for _ in range(20):
            w.add_document(rng.integers(0, 512, size=50))
    assert main(["train", "--config", "demo", "--set", "model.size=debug", "--set", "data.mock=true",
                 "--set", "train.steps=2", "--set", "data.seq_len=32", "--set", f"train.out_dir={tmp_path / 'run'}",
                 "--set", "eval.samples=2"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "v"),
                 "--num-samples", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("validation log perplexity: ")
    val = float(out[-1].split(": ")[1])
    assert 5.0 < val < 8.0  # near ln(512) = 6.24 for a barely trained model on random tokens


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llamatron", "eval", "--checkpoint", str(tmp_path / "none"),
                        "--data", "x"], capture_output=True, text=True, start_new_session=True)
    assert r.returncode == 2 and "none" in r.stderr and "Traceback" not in r.stderr
