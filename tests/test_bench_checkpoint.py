"""bench/bench_checkpoint.py on the CPU: a synchronous and an asynchronous save of the debug model, measured
as the H200 run measures them (the first async save after the background allocation of host buffers)."""

import json
import sys

import torch

from llamatron.testing.bench import load_bench


def test_smoke_sync_and_async_saves(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ck.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_checkpoint.py", "--size", "debug", "--layers", "0", "--seq-len", "64", "--device", "cpu",
        "--saves", "2", "--modes", "sync,async", "--out-dir", str(tmp_path / "ck"), "--json", str(out)])
    torch.set_num_threads(1)
    assert load_bench("bench_checkpoint").main() == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["save"]) for r in results] == [("sync", 1), ("sync", 2), ("async", 1), ("async", 2)]
    for r in results:
        assert r["save_s"] > 0 and r["stall_s"] >= r["save_call_s"] > 0 and r["state_gb"] > 0
    sync, first_async = results[0], results[2]
    assert not sync["parts"] and "prealloc" not in sync
    assert {"stage_s", "alloc_s", "prealloc_wait_s"} <= set(first_async["parts"])
    assert "prealloc" in first_async and "prealloc" not in results[3]  # the background allocation, once
    assert not list((tmp_path / "ck").rglob("*.distcp"))  # each checkpoint deleted once measured
    assert "| async | 2 |" in capsys.readouterr().out
