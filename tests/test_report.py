"""`llamatron report` on real runs: the debug model trained a few steps on synthetic tokens, read back
as HTML and text; damaged metrics files."""

import json
import shutil
import statistics

import pytest
import torch

from llamatron.cli import main
from llamatron.config import load_config
from llamatron.report import load_run, summarize, text_report
from llamatron.report.load import drop_superseded
from llamatron.train.trainer import train

STEPS = 4


def _train(out, lr):
    cfg = load_config(None, [
        "model.size=debug", "data.mock=true", "data.seq_len=32", f"train.steps={STEPS}", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.device=cpu", "train.threads=1", "train.log_every=1", f"optim.lr={lr}",
        "eval.samples=4", "eval.every=2", "checkpoint.every=2", f"train.out_dir={out}",
    ])
    train(cfg, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    return _train(root / "lr-high", 1e-2), _train(root / "lr-low", 1e-3)


def _rows(run_dir, kind):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == kind]


def test_text_summary_numbers_are_those_of_the_rows(runs):
    run = runs[0]
    train_rows = _rows(run, "train")
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    steady = train_rows[1:]  # the first row of the job holds the warm-up
    s = summarize(load_run(run))
    assert s.tokens_per_s == statistics.median(r["tokens_per_s"] for r in steady)
    assert s.step_time_s == statistics.median(r["step_time_s"] for r in steady)
    assert s.train_time_s == pytest.approx(sum(r["step_time_s"] for r in train_rows))
    assert s.peak_mem_gib == max(r["peak_mem_gib"] for r in train_rows)
    assert s.final_loss == train_rows[-1]["loss"] and s.steps == STEPS and s.tokens == STEPS * 4 * 32
    assert s.validation == [(r["step"], r["val_loss"]) for r in _rows(run, "eval")] and len(s.validation) == 3
    assert [c["step"] for c in s.checkpoints] == [2, 4] and all(c["save_s"] > 0 for c in s.checkpoints)
    assert s.env["world_size"] == 1 and s.env["torch"] == torch.__version__ and s.device == "cpu"
    assert s.mfu is None  # no known peak for a CPU: reported as unknown, never guessed

    text = text_report([str(run)])
    assert f"{s.tokens_per_s:,.0f}" in text and f"{1000 * s.step_time_s:,.1f} ms" in text
    assert f"{s.peak_mem_gib:.2f} GiB" in text and f"{s.validation[-1][1]:.4f} @ step {STEPS}" in text
    assert f"2, median save {s.checkpoint_save_s:.2f} s" in text


def test_html_has_the_summary_the_figures_and_the_config(runs, tmp_path):
    out = tmp_path / "page" / "report.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out), "--png-dir", str(tmp_path / "png")]) == 0
    page = out.read_text()
    s = summarize(load_run(runs[0]))
    assert page.count("<img ") == 4 and page.count("data:image/png;base64,") == 4
    assert f"{s.tokens_per_s:,.0f}" in page and f"{s.peak_mem_gib:.2f} GiB" in page
    assert "lr-high" in page and "lr-low" in page  # both runs, overlaid and side by side
    # The config table, the differing key (the learning rate) first
    config = page[page.index("<h2>Configuration</h2>"):]
    assert config.index("optim.lr") < config.index("model.size") and "0.001" in config
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["loss.png", "memory.png", "optimizer.png",
                                                                    "throughput.png"]
    assert (tmp_path / "png" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*tmp*"))  # written under a temporary name, then renamed


def test_text_flag_writes_nothing(runs, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    assert main(["report", str(run), "--text"]) == 0
    assert "tokens/s (median)" in capsys.readouterr().out and not (run / "report.html").exists()


def test_truncated_last_line_is_tolerated(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "loss": 6.1, "lr"')  # a writer killed mid-line
    s = summarize(load_run(run))
    assert s.steps == STEPS and any("last line incomplete" in n for n in s.notes)
    assert main(["report", str(run), "--text"]) == 0
    assert "note:" in capsys.readouterr().out


def test_corrupted_middle_line_is_one_clear_error(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\x00garbage\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / 'metrics.jsonl'}:3: not a JSON object" in err
    assert not (run / "report.html").exists()


def test_a_directory_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_rows_of_work_redone_after_a_resume_are_dropped():
    rows = [{"kind": "env", "step": 0}, *({"kind": "train", "step": i, "loss": 10 - i} for i in (1, 2, 3)),
            {"kind": "env", "step": 2}, {"kind": "resume", "step": 2}, {"kind": "train", "step": 3, "loss": 0.5}]
    kept, dropped = drop_superseded(rows)
    assert dropped == 1 and [r["loss"] for r in kept if r["kind"] == "train"] == [9, 8, 0.5]


def test_time_to_target_and_mlperf_log(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    evals = _rows(run, "eval")
    target = evals[-1]["val_loss"]
    hit = next(r["step"] for r in evals if r["val_loss"] <= target)  # the first validation at the target
    (run / "mlperf.log").write_text(
        ':::MLLOG {"key": "run_start", "value": null, "time_ms": 1000, "metadata": {}}\n'
        'not an event line\n'
        ':::MLLOG {"key": "run_stop", "value": null, "time_ms": 61000, "metadata": {"status": "success"}}\n')
    s = summarize(load_run(run), target=target)
    before = [r for r in _rows(run, "train") if r["step"] <= hit]
    assert s.target_step == hit and s.time_to_target_s == pytest.approx(sum(r["step_time_s"] for r in before))
    assert summarize(load_run(run), target=min(r["val_loss"] for r in evals) - 1).target_step is None
    assert s.mlperf_status == "success" and s.mlperf_time_to_train_s == 60.0


def test_spikes_nonfinite_steps_and_unknown_kinds_are_reported(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:  # rows as the step guard writes them (train/reliability.py)
        f.write(json.dumps({"kind": "grad_spike", "step": 3, "grad_norm": 50.0, "median": 1.0}) + "\n")
        f.write(json.dumps({"kind": "nonfinite", "step": 4, "grad_norm": None, "samples": [12, 16], "policy": "skip"}) + "\n")
        f.write(json.dumps({"kind": "some_future_kind", "step": 4, "x": 1}) + "\n")
        f.write(json.dumps({"kind": "zero_shot", "step": 4, "lambada/acc": 0.25, "zero_shot_s": 3.0}) + "\n")
    s = summarize(load_run(run))
    assert [r["step"] for r in s.spikes] == [3] and [r["step"] for r in s.nonfinite] == [4]
    text = text_report([str(run)])
    assert "gradient-norm spikes               1 (steps 3)" in text and "zero-shot lambada/acc (last)" in text
    assert s.zero_shot == {"lambada/acc": (4, 0.25)}
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<img ") == 5 and "id='fig-zero_shot'" in page  # the task figure, only where tasks ran
    assert "gradient-norm spike" in page and "norm 50, median 1" in page and "policy skip, samples [12, 16]" in page


CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium: installed from Debian's packages as root where missing (as the Slurm test
    does with slurm-wlm); skipped with the reason where it cannot be had."""
    import os
    import subprocess

    found = next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=600,
                       start_new_session=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium, and installing Debian's needs root and apt-get")
    return found


def _screenshot(browser: str, page, png, width=1200, height=2600) -> None:
    import subprocess

    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
                         capture_output=True, text=True, timeout=120, start_new_session=True)
    assert res.returncode == 0 and png.is_file(), res.stderr[-2000:]


@pytest.mark.slow
def test_page_renders_in_headless_chromium_with_both_runs_plotted(runs, chromium, tmp_path):
    """The page as a browser draws it: the figures are there (both runs' lines, in the report's first
    two colours, which nothing else on the page uses) and the page is not blank."""
    import matplotlib.image
    import numpy as np

    out = tmp_path / "report.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    png = tmp_path / "page.png"
    _screenshot(chromium, out, png)
    rgb = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    assert rgb.shape[:2] == (2600, 1200)

    def pixels_near(colour) -> int:
        return int((np.abs(rgb - np.array(colour)).sum(axis=-1) < 40).sum())

    from llamatron.report.plots import COLORS

    first, second = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in COLORS[:2])
    assert pixels_near(first) > 500 and pixels_near(second) > 500  # each run's lines
    assert (rgb.sum(axis=-1) < 600).mean() > 0.02  # text, tables and axes: not an empty page
