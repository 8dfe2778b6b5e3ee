"""bench/bench_train_step.py's model settings (`--set model.KEY=VALUE`: the GLaM layer proxy of
docs/moe.md) and its smoke path on the CPU."""

import argparse
import json
import sys

import pytest
import torch

from llamatron.errors import LlamatronError
from llamatron.testing.bench import load_bench


def _bench():
    return load_bench("bench_train_step")


def _cli(size, layers, seq_len, sets):
    return argparse.Namespace(size=size, layers=layers, seq_len=seq_len, sets=sets)


def test_model_settings_make_the_glam_layer_proxy():
    """glam-64b-64e, 2 blocks, 8 experts: one MoE block then one dense, at the 64B's widths."""
    args = _bench().model_args(_cli("glam-64b-64e", 2, 4096, ["model.n_experts=8"]))
    assert (args.n_layers, args.n_experts, args.n_moe_layers, args.dim, args.expert_ffn_dim) == (2, 8, 1, 8192, 32768)
    assert args.max_seq_len == 4096
    with pytest.raises(LlamatronError, match="'model.n_expert'"):
        _bench().model_args(_cli("glam-64b-64e", 2, 2048, ["model.n_expert=8"]))
    with pytest.raises(LlamatronError, match="'model.top_k': must be <= n_experts 1"):
        _bench().model_args(_cli("glam-64b-64e", 2, 2048, ["model.n_experts=1"]))
    with pytest.raises(LlamatronError, match="only the model's keys"):
        _bench().model_args(_cli("glam-64b-64e", 2, 2048, ["train.steps=3"]))


def test_smoke_run_of_a_glam_proxy_on_the_cpu(tmp_path, monkeypatch, capsys):
    out = tmp_path / "glam.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_train_step.py", "--size", "glam-debug", "--layers", "2", "--set", "model.n_experts=4",
        "--seq-len", "64", "--micro-batch", "1", "--global-batch", "2", "--steps", "1", "--warmup", "1",
        "--variants", "fused-ce+adam", "--device", "cpu", "--json", str(out)])
    torch.set_num_threads(1)
    assert _bench().main() == 0
    assert "glam-debug x 2 layers model.n_experts=4" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["results"]
    assert row["model_sets"] == ["model.n_experts=4"] and row["tokens_per_s"] > 0
    # The MoE layer's time split into its experts' and the rest (routing, dispatch, combine).
    moe = row["moe"]
    assert moe["moe_layers"] == 1 and moe["moe_layer_ms"] > 0 and moe["experts_ms"] > 0
    assert moe["routing_dispatch_combine_ms"] == pytest.approx(max(moe["moe_layer_ms"] - moe["experts_ms"], 0.0))
    assert moe["experts_share_of_step"] == pytest.approx(moe["experts_ms"] * 1e-3 * 2 / row["step_time_s"])
    # glam-debug: dim 64, expert width 64; 4 experts of capacity int(64 x 2 / 4) = 32 rows (one sequence)
    assert moe["experts_tflops"] == pytest.approx(12 * 4 * 32 * 64 * 64 / (moe["experts_ms"] * 1e-3) / 1e12)
    assert moe["experts_grouped_mm_ms"] > 0


def test_bad_setting_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--size", "glam-debug", "--set", "model.n_expert=4",
                                      "--device", "cpu"])
    assert _bench().main() == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config key 'model.n_expert'" in err


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """A device run must not lose the variants after one that fails (a compile error, say): the failure
    is a row of its own, the JSON keeps every row, and the exit status says something failed."""
    bench = _bench()
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_train_step.py", "--size", "debug", "--layers", "1", "--seq-len", "32", "--micro-batch", "1",
        "--global-batch", "1", "--steps", "1", "--warmup", "0", "--variants", "baseline,fused-ce", "--device", "cpu",
        "--json", str(out)])
    real = bench.run_variant

    def run_variant(name, *args):
        if name == "baseline":
            raise RuntimeError("simulated compile failure")
        return real(name, *args)

    monkeypatch.setattr(bench, "run_variant", run_variant)
    assert bench.main() == 1
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r.get("error")) for r in rows] == [
        ("baseline", "RuntimeError: simulated compile failure"), ("fused-ce", None)]
    assert "baseline (global batch 1): failed: RuntimeError: simulated compile failure" in capsys.readouterr().out


def test_fp8loss_arith_runs_the_loss_kernels_as_they_were_and_the_next_variant_as_now(tmp_path, monkeypatch):
    """@fp8loss=arith: the kernels' casts by arithmetic and their fixed tile (the code of 2026-12-06), for
    an A/B in one process; the variant after it gets the defaults back."""
    from llamatron import loss_kernels

    bench, seen = _bench(), []
    monkeypatch.setattr(sys, "argv", [
        "bench_train_step.py", "--size", "debug", "--layers", "1", "--seq-len", "32", "--micro-batch", "1",
        "--global-batch", "1", "--steps", "1", "--warmup", "0", "--variants", "baseline@fp8loss=arith,baseline",
        "--device", "cpu", "--json", str(tmp_path / "rows.json")])
    real = bench.build_layout

    def build_layout(*args):
        seen.append((bench.fused_loss.FP8_LOSS_KERNELS, loss_kernels.HARDWARE_CASTS, loss_kernels.TUNE_GRAD))
        return real(*args)

    monkeypatch.setattr(bench, "build_layout", build_layout)
    assert bench.main() == 0
    assert seen == [("triton", False, False), ("triton", True, True)]


def test_variant_conditions_set_the_trainer_options_they_name():
    """NAME@KEY=VALUE: a variant's options (what build_layout and the step read) and its micro batch."""
    bench = _bench()
    label, opts, over = bench.parse_variant("compile+fp8-all@micro=8@res=bf16@sdpa=fa4@ctune=1")
    assert label == "compile+fp8-all@micro=8@res=bf16@sdpa=fa4@ctune=1" and over == {"micro_batch": 8}
    assert (opts["fp8"], opts["bf16_residual"], opts["attention"], opts["compile_tuning"]) == ("tensorwise", True, "fa4", True)
    assert "compile_tuning" not in bench.parse_variant("compile+fp8-all")[1]
    with pytest.raises(SystemExit, match=r"ctune=0\|1"):
        bench.parse_variant("compile@ctune=yes")
    assert bench.parse_variant("compile+fp8-all@swiglu=copy")[1]["fp8_fused_swiglu"] == "copy"
    assert bench.parse_variant("compile+fp8-all@fastaccum=grad_weight+output")[1]["fp8_fast_accum"] == ["output", "grad_weight"]
    assert bench.parse_variant("compile+fp8-all@fastaccum=none")[1]["fp8_fast_accum"] == []
    with pytest.raises(SystemExit, match="fastaccum=none"):
        bench.parse_variant("compile+fp8-all@fastaccum=1")
    cast = bench.parse_variant("compile+fp8-all@castonce=1@fusedwgrad=1")[1]
    assert cast["castonce"] is True and cast["fused_wgrad"] is True
    assert bench.parse_variant("compile+cudnn+castonce+fusedwgrad@fusedwgrad=0")[1]["fused_wgrad"] is False
    assert bench.parse_variant("compile+cudnn+castonce+fusedwgrad@outer=0")[1]["outer"] is False
    assert bench.parse_variant("compile+cudnn@bf16loss=triton")[1]["bf16_loss_kernels"] == "triton"
    with pytest.raises(SystemExit, match=r"swiglu=0\|1\|copy"):
        bench.parse_variant("compile+fp8-all@swiglu=yes")
