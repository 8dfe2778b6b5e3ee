"""The report page: one self-contained HTML file (figures inline as base64 PNG, no scripts, no
external files), a summary table at the top, then the figures, then events, config and environment."""

from __future__ import annotations

import base64
import html
import time

from llamatron.report.load import Run
from llamatron.report.summary import Summary
from llamatron.report.text import summary_rows

STYLE = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 1.5em auto; max-width: 1120px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary td:first-child { color: #555; } img { max-width: 100%; display: block; margin: 0.4em 0; }
.note { color: #a15c00; } .small { color: #777; font-size: 0.85em; }
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _summary_table(summaries: list[Summary]) -> str:
    per_run = [dict(summary_rows(s)) for s in summaries]
    labels = list(dict.fromkeys(k for rows in per_run for k in rows))
    return _table(["", *[s.name for s in summaries]], [[k, *[r.get(k, "") for r in per_run]] for k in labels], "summary")


def _events_table(summaries: list[Summary]) -> str:
    rows = []
    for s in summaries:
        rows += [[s.name, r["step"], "gradient-norm spike", f"norm {r.get('grad_norm', 0):.3g}, median {r.get('median', 0):.3g}"]
                 for r in s.spikes]
        rows += [[s.name, r["step"], "non-finite step", f"policy {r.get('policy')}, samples {r.get('samples')}"]
                 for r in s.nonfinite]
        rows += [[s.name, r["step"], "checkpoint", f"save {r.get('save_s', float('nan')):.2f} s, stall "
                  f"{r.get('stall_s', float('nan')):.2f} s, {r.get('path', '')}"] for r in s.checkpoints]
    if not rows:
        return "<p>No spikes, non-finite steps or checkpoints recorded.</p>"
    return _table(["run", "step", "event", "details"], sorted(rows, key=lambda r: (r[0], r[1])))


def _config_table(runs: list[Run]) -> str:
    """Every key of every run's config.yaml; with several runs, the differing keys first."""
    flat = [{f"{sec}.{k}": v for sec, keys in (r.config or {}).items() if isinstance(keys, dict) for k, v in keys.items()}
            for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    ordered = differ + [k for k in keys if k not in differ]
    return _table(["key", *[r.name for r in runs]], [[k, *[f.get(k, "") for f in flat]] for k in ordered], "config")


def _env_table(summaries: list[Summary]) -> str:
    keys = list(dict.fromkeys(k for s in summaries for k in s.env if k not in ("kind", "step")))
    if not keys:
        return "<p>No env row (runs from before llamatron wrote one).</p>"
    return _table(["", *[s.name for s in summaries]], [[k, *[s.env.get(k, "") for s in summaries]] for k in keys])


def render_html(runs: list[Run], summaries: list[Summary], figures: dict[str, tuple[str, bytes]]) -> str:
    title = "llamatron run report: " + ", ".join(s.name for s in summaries)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
             f"</head><body><h1>{_e(title)}</h1>",
             f"<p class='small'>{_e(', '.join(str(r.path) for r in runs))} &middot; generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by <code>llamatron report</code></p>",
             _summary_table(summaries)]
    notes = [f"{s.name}: {n}" for s in summaries for n in s.notes]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    for name, (fig_title, png) in figures.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{_e(fig_title)}</h2><img id='fig-{name}' alt='{_e(fig_title)}' src='data:image/png;base64,{data}'>")
    parts += ["<h2>Events</h2>", _events_table(summaries), "<h2>Environment</h2>", _env_table(summaries),
              "<h2>Configuration</h2>", _config_table(runs), "</body></html>"]
    return "\n".join(parts)
