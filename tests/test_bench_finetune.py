"""bench/bench_finetune.py's smoke path on the CPU: every line but the CUDA-only ones runs (the GPU
figures in docs/performance.md come from the same code on the 8B)."""

import json
import sys

import pytest
import torch

from llamatron.testing.bench import load_bench


def _bench():
    return load_bench("bench_finetune")


def test_smoke_run_reports_lora_and_sft_variants(tmp_path, monkeypatch, capsys):
    bench = _bench()
    out = tmp_path / "ft.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_finetune.py", "--model", "debug", "--seq-len", "128", "--min-len", "16", "--max-len", "80",
        "--device", "cpu", "--precision", "bf16", "--steps", "2", "--warmup", "1", "--global-batch", "2",
        "--lora-rank", "4", "--lora-alpha", "8", "--variants", "lora,lora@base=fp32,lora+ac@micro=2,sft+ac,lora+fp8",
        "--fp8-min-features", "32", "--profile", "lora",
        "--json", str(out)])
    torch.set_num_threads(1)
    assert bench.main() == 0
    text = capsys.readouterr().out
    printed = [json.loads(line[len("SUMMARY "):]) for line in text.splitlines() if line.startswith("SUMMARY ")]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert [r["variant"] for r in printed] == list(rows) == ["lora", "lora@base=fp32", "lora+ac@micro=2", "sft+ac",
                                                             "lora+fp8"]
    for r in rows.values():
        assert r["tokens_per_s"] > r["non_padding_tokens_per_s"] > r["trained_tokens_per_s"] > 0
        assert 0 < r["padding_fraction"] < 0.5 and r["mfu"] is None  # the CPU has no known peak
        assert r["doc_attention_seq"] < 80  # no document is longer than --max-len
        assert len(r["step_times_s"]) == 2 and all(map(torch.isfinite, torch.tensor(r["losses"])))
    lora, sft = rows["lora"], rows["sft+ac"]
    # --profile: one more step of that variant under torch.profiler (the CPU has no device kernels)
    assert lora["profile"]["wall_ms"] > 0 and "profile" not in sft and "profile of one lora step" in text
    # bf16 autocast: the frozen linears stored in bf16 unless base=fp32, with the same losses
    assert (lora["frozen_linear_dtype"], rows["lora@base=fp32"]["frozen_linear_dtype"]) == ("bfloat16", "float32")
    assert lora["losses"] == rows["lora@base=fp32"]["losses"]
    assert lora["losses"] == pytest.approx(rows["lora+ac@micro=2"]["losses"], rel=1e-5)  # the same samples
    fp8 = rows["lora+fp8"]  # every block linear (all dimensions >= 32) from FP8 copies: close, not equal
    assert fp8["fp8_frozen_layers"] == 2 * 7 and lora["fp8_frozen_layers"] == 0
    assert fp8["losses"] != lora["losses"] and fp8["losses"] == pytest.approx(lora["losses"], rel=0.05)
    assert lora["trainable_params"] == 2 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 3 * (64 + 160))
    debug = bench.registry.get("debug")
    assert sft["trainable_params"] == sum(p.numel() for p in debug.family.build(debug.args).parameters())
    from llamatron import flops

    assert lora["gflop_per_token"] < sft["gflop_per_token"] == pytest.approx(
        flops.flops_per_token(bench.registry.get("debug").args, 128) / 1e9)


def test_variant_names_are_checked():
    bench = _bench()
    v = bench.parse_variant("lora+compile+ac@micro=4@base=fp32")
    assert (v.lora, v.compile, v.ac, v.micro, v.base) == (True, True, True, 4, "fp32")
    assert bench.parse_variant("lora+fp8@micro=2").fp8
    eight = bench.parse_variant("sft+compile+ac+adam8bit@micro=2")
    assert (eight.optim, bench.parse_variant("sft+ac").optim) == ("adamw8bit", "adamw")
    for bad in ("full", "lora+fp4", "lora@micro=0", "sft@base=bf16", "lora@gqa=expand"):
        with pytest.raises(SystemExit, match="--variants"):
            bench.parse_variant(bad)
