"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state), as
PNG bytes. Each figure overlays every run given, one colour per run."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llamatron.report.load import Run
from llamatron.report.summary import zero_shot_metrics

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DPI = 100


def _figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.2 * panels, 3.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _from_zero(ax) -> None:
    """y from 0 (memory and speed against their scale, not a zoom on small changes) with headroom."""
    top = max((float(max(line.get_ydata())) for line in ax.get_lines() if len(line.get_ydata())), default=0.0)
    ax.set_ylim(0, 1.12 * top if top > 0 else 1)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _tokens(run: Run, rows: list[dict]) -> list[dict]:
    """Rows with a "tokens" key: consumed samples x the run's sequence length."""
    seq = (run.config.get("data") or {}).get("seq_len")
    if not seq:
        return []
    return [{**r, "tokens": r["consumed_samples"] * seq} for r in rows if isinstance(r.get("consumed_samples"), int)]


def _label(run: Run, runs: list[Run], what: str) -> str:
    return what if len(runs) == 1 else f"{run.name}: {what}"


def loss_figure(runs: list[Run]) -> bytes:
    fig, (by_step, by_tokens) = _figure(2)
    for run, color in zip(runs, COLORS):
        train, evals = run.of("train"), run.of("eval")
        by_step.plot(*_series(train, "loss"), color=color, lw=1.2, label=_label(run, runs, "training loss"))
        by_step.plot(*_series(evals, "val_loss"), "o--", color=color, ms=4, label=_label(run, runs, "validation"))
        by_tokens.plot(*_series(_tokens(run, train), "loss", "tokens"), color=color, lw=1.2)
        by_tokens.plot(*_series(_tokens(run, evals), "val_loss", "tokens"), "o--", color=color, ms=4)
    by_step.set(xlabel="step", ylabel="loss (nats/token)", title="Loss against steps")
    by_tokens.set(xlabel="tokens trained", ylabel="loss (nats/token)", title="Loss against tokens")
    by_step.legend(fontsize=8)
    return _png(fig)


def optimizer_figure(runs: list[Run]) -> bytes:
    fig, (lr, norm) = _figure(2)
    for run, color in zip(runs, COLORS):
        train = run.of("train")
        lr.plot(*_series(train, "lr"), color=color, label=run.name)
        norm.plot(*_series(train, "grad_norm"), color=color, lw=1.0, label=_label(run, runs, "gradient norm"))
        spikes = run.of("grad_spike")
        if spikes:
            norm.plot(*_series(spikes, "grad_norm"), "x", color="black", ms=8, label=_label(run, runs, "spike"))
        for i, row in enumerate(run.of("nonfinite")):
            norm.axvline(row["step"], color=color, ls=":", label=_label(run, runs, "non-finite step") if i == 0 else None)
    lr.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    norm.set(xlabel="step", ylabel="gradient norm (before clipping)", title="Gradient norm")
    norms = [v for run in runs for v in _series(run.of("train"), "grad_norm")[1] if v > 0]
    if norms and max(norms) > 10 * min(norms):  # early steps' large norms would flatten the rest
        norm.set_yscale("log")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    norm.legend(fontsize=8)
    return _png(fig)


def throughput_figure(runs: list[Run]) -> bytes:
    fig, (tps, util) = _figure(2)
    # MFU needs the device's peak; without one (a CPU run), the achieved TFLOP/s still compare runs.
    has_mfu = any(_series(run.of("train"), "mfu")[0] for run in runs)
    for run, color in zip(runs, COLORS):
        train = run.of("train")
        tps.plot(*_series(train, "tokens_per_s_per_gpu"), ".-", color=color, label=run.name)
        steps, values = _series(train, "mfu" if has_mfu else "tflops_per_gpu")
        util.plot(steps, [100 * v for v in values] if has_mfu else values, ".-", color=color, label=run.name)
    tps.set(xlabel="step", ylabel="tokens/s per GPU", title="Throughput (mean over each log interval)")
    if has_mfu:
        util.set(xlabel="step", ylabel="MFU (%)", title="Model FLOPs utilisation")
    else:
        util.set(xlabel="step", ylabel="TFLOP/s per GPU", title="Model TFLOP/s per GPU (no known peak: MFU n/a)")
    _from_zero(tps)
    _from_zero(util)
    if len(runs) > 1:
        tps.legend(fontsize=8)
    return _png(fig)


def memory_figure(runs: list[Run]) -> bytes:
    fig, (mem, ckpt) = _figure(2)
    for run, color in zip(runs, COLORS):
        train = run.of("train")
        mem.plot(*_series(train, "peak_mem_gib"), ".-", color=color, label=_label(run, runs, "largest rank"))
        per_rank = [(r["step"], min(r["peak_mem_gib_per_rank"])) for r in train
                    if isinstance(r.get("peak_mem_gib_per_rank"), list) and len(r["peak_mem_gib_per_rank"]) > 1]
        if per_rank:
            mem.plot(*zip(*per_rank), ":", color=color, label=_label(run, runs, "smallest rank"))
        saves = [c for c in run.of("checkpoint") if isinstance(c.get("save_s"), (int, float))]
        if saves:
            ckpt.plot(*_series(saves, "save_s"), "s-", color=color, label=_label(run, runs, "save"))
            if any(c.get("stall_s") is not None and c["stall_s"] != c["save_s"] for c in saves):
                ckpt.plot(*_series(saves, "stall_s"), "^--", color=color, label=_label(run, runs, "training stalled"))
    mem.set(xlabel="step", ylabel="GiB", title="Peak memory per rank")
    _from_zero(mem)
    _from_zero(ckpt)
    ckpt.set(xlabel="step", ylabel="seconds", title="Checkpoint saves")
    mem.legend(fontsize=8)
    if ckpt.get_lines():
        ckpt.legend(fontsize=8)
    else:
        ckpt.text(0.5, 0.5, "no checkpoint rows", ha="center", va="center", transform=ckpt.transAxes)
    return _png(fig)


def zero_shot_figure(runs: list[Run]) -> bytes | None:
    """Task metrics against steps (eval.tasks), or None when no run scored any."""
    if not any(run.of("zero_shot") for run in runs):
        return None
    fig, (ax,) = _figure(1)
    markers = "osd^v<>p"
    for run, color in zip(runs, COLORS):
        rows = run.of("zero_shot")
        keys = list(dict.fromkeys(k for r in rows for k in zero_shot_metrics(r)))
        for key, marker in zip(keys, markers * 4):
            ax.plot(*_series(rows, key), marker + "-", color=color, label=_label(run, runs, key))
    ax.set(xlabel="step", ylabel="score", title="Zero-shot tasks")
    ax.legend(fontsize=8)
    return _png(fig)


def routing_figure(runs: list[Run]) -> bytes | None:
    """A mixture of experts' router statistics against steps (the `moe_*` keys of `train` rows: the
    aux loss, the fraction of assignments dropped for capacity, the busiest and idlest expert's load
    against the mean), or None when no run has any."""
    if not any(_series(run.of("train"), "moe_aux_loss")[0] for run in runs):
        return None
    fig, (aux, load) = _figure(2)
    for run, color in zip(runs, COLORS):
        train = run.of("train")
        aux.plot(*_series(train, "moe_aux_loss"), ".-", color=color, label=run.name)
        load.plot(*_series(train, "moe_max_load"), "^-", color=color, ms=4, label=_label(run, runs, "busiest expert"))
        load.plot(*_series(train, "moe_min_load"), "v-", color=color, ms=4, label=_label(run, runs, "idlest expert"))
        steps, dropped = _series(train, "moe_dropped_fraction")
        if any(dropped):
            load.plot(steps, dropped, "x:", color=color, label=_label(run, runs, "dropped fraction"))
    aux.set(xlabel="step", ylabel="aux loss (1.0 = balanced)", title="Router load-balancing loss")
    load.axhline(1.0, color="grey", lw=0.8, ls="--")
    load.set(xlabel="step", ylabel="load / mean load; fraction", title="Expert load and dropped assignments")
    if len(runs) > 1:
        aux.legend(fontsize=8)
    load.legend(fontsize=8)
    return _png(fig)


FIGURES = {
    "loss": ("Loss", loss_figure),
    "optimizer": ("Learning rate and gradient norm", optimizer_figure),
    "throughput": ("Throughput and MFU", throughput_figure),
    "memory": ("Memory and checkpoints", memory_figure),
    "zero_shot": ("Zero-shot tasks", zero_shot_figure),
    "routing": ("Mixture-of-experts routing", routing_figure),
}


def all_figures(runs: list[Run]) -> dict[str, tuple[str, bytes]]:
    """name -> (title, PNG bytes)."""
    figures = {name: (title, draw(runs)) for name, (title, draw) in FIGURES.items()}
    return {name: (title, png) for name, (title, png) in figures.items() if png is not None}
