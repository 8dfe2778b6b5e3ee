"""bench/bench_zero_shot.py on the CPU: its rows and JSON, and a failing side that does not lose the others."""

import json
import sys

import pytest
import torch

from llamatron.testing.bench import load_bench


def _bench():
    return load_bench("bench_zero_shot")


def _argv(out, *extra):
    return ["bench_zero_shot.py", "--size", "debug", "--requests", "12", "--batch-sizes", "4", "--device", "cpu",
            "--dtype", "fp32", "--no-compile", "--json", str(out), *extra]


def test_smoke_rows_and_json_against_the_hf_backend(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval (the test extra) is not installed")
    out = tmp_path / "zs.json"
    monkeypatch.setattr(sys, "argv", _argv(out))
    torch.set_num_threads(1)
    assert _bench().main() == 0
    (record,) = json.loads(out.read_text())
    assert record["batch_size"] == 4 and record["requests"] == 12
    eager, hf = record["llamatron eager"], record["lm-eval HF"]
    assert eager["vs_hf"] == pytest.approx(eager["requests_per_s"] / hf["requests_per_s"], rel=1e-3)
    assert record["max_ll_difference"]["llamatron eager vs lm-eval HF"] < 1e-4  # the same weights, fp32
    printed = capsys.readouterr().out
    assert "ROW llamatron eager, batch 4:" in printed and "ROW lm-eval HF, batch 4:" in printed


def test_a_failing_side_is_reported_and_the_others_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "zs.json"
    monkeypatch.setattr(sys, "argv", _argv(out))
    bench = _bench()

    def hf_fails(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bench, "run_hf", hf_fails)
    torch.set_num_threads(1)
    assert bench.main() == 1
    (record,) = json.loads(out.read_text())
    assert "llamatron eager" in record and "lm-eval HF" not in record
    assert "lm-eval HF: failed: RuntimeError: simulated failure" in capsys.readouterr().out


def test_the_fp8_side_scores_differently_from_bf16_or_is_reported_failed(tmp_path, monkeypatch, capsys):
    """FP8 rounds differently from bf16, so the FP8 side's scores differ from the bf16 side's; a side
    whose FP8 layers never ran (identical scores: the cached compiled graphs of 2026-12-05) fails."""
    out = tmp_path / "zs.json"
    monkeypatch.setattr(sys, "argv", _argv(out, "--no-hf", "--fp8", "--fp8-min-features", "16", "--dtype", "bf16"))
    torch.set_num_threads(1)
    bench = _bench()
    assert bench.main() == 0
    (record,) = json.loads(out.read_text())
    assert record["max_ll_difference"]["llamatron eager vs llamatron fp8 rowwise"] > 0
    bench = _bench()
    monkeypatch.setattr(bench, "quantize_for_scoring", lambda model, min_features, recipe: ["layers.0.attention.wq"])
    assert bench.main() == 1
    assert "the FP8 side scored exactly as bf16" in capsys.readouterr().out
