"""`llamatron report`: a run directory (metrics.jsonl, config.yaml, mlperf.log) as one self-contained
HTML page with plots, or a one-screen text summary.

load.py reads the files (tolerating the half-written last line of a live or crashed run), summary.py
computes the figures people quote, plots.py draws them with matplotlib (Agg, no display), html.py and
text.py lay them out.
"""

from __future__ import annotations

import os
from pathlib import Path

from llamatron.report.load import Run, load_run
from llamatron.report.summary import Summary, summarize


def load(run_dirs: list[str], target: float | None = None) -> tuple[list[Run], list[Summary]]:
    runs = [load_run(d) for d in run_dirs]
    return runs, [summarize(r, target) for r in runs]


def text_report(run_dirs: list[str], target: float | None = None) -> str:
    from llamatron.report.text import render_text

    return render_text(load(run_dirs, target)[1])


def write_report(run_dirs: list[str], out: str | Path | None = None, png_dir: str | Path | None = None,
                 target: float | None = None) -> tuple[Path, str]:
    """Writes the HTML page (default RUN_DIR/report.html of the first run) and, with png_dir, each
    figure as NAME.png; returns the page's path and the text summary."""
    from llamatron.report.html import render_html
    from llamatron.report.plots import all_figures
    from llamatron.report.text import render_text

    runs, summaries = load(run_dirs, target)
    figures = all_figures(runs)
    out = Path(out) if out is not None else runs[0].path / "report.html"
    _write_atomic(out, render_html(runs, summaries, figures).encode())
    if png_dir is not None:
        for name, (_, png) in figures.items():
            _write_atomic(Path(png_dir) / f"{name}.png", png)
    return out, render_text(summaries)


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader (a browser reloading the page) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
