"""The terminal summary: the headline figures of each run, one screen."""

from __future__ import annotations

from llamatron.report.summary import Summary


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _num(v, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    """(label, value) pairs, the same in the terminal and in the HTML header table."""
    steps = f"{s.steps:,}" + (f" of {s.planned_steps:,}" if s.planned_steps else "")
    rows = [
        ("model", s.model or "n/a"),
        ("device x world size", f"{s.device or 'n/a'} x {s.world_size if s.world_size is not None else 'n/a'}"),
        ("layout", s.layout or "n/a"),
        ("steps", steps),
        ("tokens trained", f"{s.tokens:,}"),
        ("jobs", f"{s.jobs}"),
        ("training time (sum of step times)", _duration(s.train_time_s)),
        ("tokens/s (median)", _num(s.tokens_per_s)),
        ("tokens/s per GPU (median)", _num(s.tokens_per_s_per_gpu)),
        ("MFU (median)", "n/a (device peak unknown)" if s.mfu is None else f"{100 * s.mfu:.1f}%"),
        ("step time (median)", "n/a" if s.step_time_s is None else f"{1000 * s.step_time_s:,.1f} ms"),
        ("peak memory (largest rank)", "n/a" if s.peak_mem_gib is None else f"{s.peak_mem_gib:.2f} GiB"),
        ("training loss first -> last", f"{_num(s.first_loss, '.4f')} -> {_num(s.final_loss, '.4f')}"),
    ]
    if s.validation:
        step, value = s.validation[-1]
        rows.append(("validation log perplexity (last)", f"{value:.4f} @ step {step}"))
        rows.append(("validation log perplexity (best)", f"{s.best_val[1]:.4f} @ step {s.best_val[0]}"))
    rows += [(f"zero-shot {k} (last)", f"{v:.4f} @ step {step}") for k, (step, v) in s.zero_shot.items()]
    if s.routing is not None:  # a mixture of experts: its router's last log interval
        r = s.routing
        rows.append(("MoE router (last interval)", f"aux loss {r['moe_aux_loss']:.3f}, dropped "
                     f"{100 * r.get('moe_dropped_fraction', 0.0):.1f}%, expert load {r.get('moe_min_load', 0.0):.2f}-"
                     f"{r.get('moe_max_load', 0.0):.2f} x mean @ step {r['step']}"))
    if s.target is not None:
        reached = (f"step {s.target_step}, {_duration(s.time_to_target_s)} of training"
                   if s.target_step is not None else "not reached")
        rows.append((f"target {s.target}", reached))
    if s.mlperf_status is not None:
        rows.append(("MLPerf status, time to train", f"{s.mlperf_status}, {_duration(s.mlperf_time_to_train_s)}"))
    rows.append(("skipped steps (non-finite)", f"{s.skipped_steps}"))
    rows.append(("gradient-norm spikes", f"{len(s.spikes)}" + (
        f" (steps {', '.join(str(r['step']) for r in s.spikes[:8])}{' ...' if len(s.spikes) > 8 else ''})" if s.spikes else "")))
    ckpt = f"{len(s.checkpoints)}"
    if s.checkpoint_save_s is not None:
        ckpt += f", median save {s.checkpoint_save_s:.2f} s, training stalled {s.checkpoint_stall_s:.1f} s in all"
    rows.append(("checkpoints saved", ckpt))
    rows.append(("validation time", _duration(s.eval_time_s)))
    return rows


def render_text(summaries: list[Summary]) -> str:
    out = []
    for s in summaries:
        rows = summary_rows(s)
        width = max(len(k) for k, _ in rows)
        out.append(f"run {s.name}")
        out.append("-" * min(100, width + 40))
        out += [f"{k:<{width}}  {v}" for k, v in rows]
        out += [f"note: {n}" for n in s.notes]
        out.append("")
    return "\n".join(out)
