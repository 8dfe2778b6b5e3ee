"""Measured timings for the planner's cost model: what `llamatron plan --calibrate` writes
(`measure.py`), and how `llamatron plan` reads them (`Table`).

A table is one JSON file (docs/planner.md, "Calibration tables", has the format): the device, torch
version and date, then measurements, each with its shape and the median seconds of a few repeats after
warm-up: GEMMs (forward, input gradient, weight gradient) at the models' block and output-layer shapes,
the MoE experts' batched GEMMs (`grouped`; absent from tables written before them), attention forward
and backward, element-wise copies and adds, a fused AdamW step, and, when measured under
torchrun, all-gather / reduce-scatter / all-to-all / point-to-point at a few sizes.

The planner asks for shapes that were not measured, so a table interpolates: a GEMM's throughput is
taken from the measured (k, n) nearest in log scale and interpolated linearly in log m between the
measured m around it (constant beyond the ends), and its time is its FLOPs at that rate; attention
likewise, by head dimension, sequence length and the call's size (its query rows over all heads: a
table measured at one size, as those before the windowed attention timings, gives every call that
size's rate). `llamatron plan --gpu KIND` reads
`llamatron/calibration/KIND.json` (h200.json, ...) when that file exists, `--calibration FILE` any
table.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from llamatron.errors import LlamatronError

FORMAT = "llamatron-calibration/1"
DIR = Path(__file__).parent
GEMM_OPS = ("fwd", "dgrad", "wgrad")
COLLECTIVES = ("all_gather", "reduce_scatter", "all_to_all")
SECTIONS = {
    "gemm": ("op", "m", "k", "n", "seconds"),
    "attention": ("batch", "heads", "seq", "head_dim", "mask", "fwd_seconds", "bwd_seconds"),
    "elementwise": ("op", "bytes", "seconds"),
    "optimizer": ("params", "seconds"),
    "comm": ("op", "world", "bytes", "seconds"),
}
# Sections a table may lack (tables written before they were measured): the planner then falls back.
OPTIONAL = {"grouped": ("op", "groups", "m", "k", "n", "seconds")}


def default_table(gpu: str) -> Table | None:
    """The shipped table of a GPU kind (`--gpu H200` -> llamatron/calibration/h200.json), if there is one."""
    for path in sorted(DIR.glob("*.json"), key=lambda p: -len(p.stem)):
        if path.stem.upper() in gpu.upper():
            return load(path)
    return None


def load(path) -> Table:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamatronError(f"--calibration {path}: no such file (write one with `llamatron plan --calibrate "
                             f"--out {path}`)") from None
    except (OSError, ValueError) as e:
        raise LlamatronError(f"{path}: not a calibration table: {str(e).splitlines()[0]}") from None
    check(data, str(path))
    return Table(data, path.name)


def check(data, source: str) -> None:
    """One line naming the file and key when `data` is not a table this planner reads."""
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise LlamatronError(f"{source}: calibration key '{key}': {rule}")

    need(isinstance(data, dict), "(top level)", "expected a JSON object")
    need(data.get("format") == FORMAT, "format", f"expected {FORMAT!r}, got {data.get('format')!r}")
    for section, keys in (SECTIONS | {k: v for k, v in OPTIONAL.items() if k in data}).items():
        rows = data.get(section)
        need(isinstance(rows, list), section, "expected a list of measurements")
        for i, row in enumerate(rows):
            need(isinstance(row, dict) and all(k in row for k in keys), f"{section}[{i}]",
                 f"expected the keys {', '.join(keys)}")
            for k in keys:
                if k.endswith("seconds") or k in ("m", "k", "n", "groups", "bytes", "params", "batch", "heads", "seq",
                                                  "head_dim"):
                    value = row[k]
                    need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                         and math.isfinite(value), f"{section}[{i}].{k}", f"expected a positive number, got {value!r}")
    for op in GEMM_OPS:
        need(any(r["op"] == op for r in data["gemm"]), "gemm", f"no {op} measurement")
    need(bool(data["attention"]), "attention", "no measurement")
    need(bool(data["elementwise"]), "elementwise", "no measurement")
    need(bool(data["optimizer"]), "optimizer", "no measurement")


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points, constant beyond the ends."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _sdpa_flop(r: dict) -> float:
    return 4.0 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"]


def _attention_rates(by_size: dict[int, list[dict]], key: str, length: float) -> list[tuple[float, float]]:
    """(log call size, FLOP/s at this log sequence length) per measured call size, sorted."""
    return sorted((math.log(size), _interpolate(_rates([dict(r, seconds=r[key]) for r in rows], _sdpa_flop,
                                                       lambda r: r["seq"]), length))
                  for size, rows in by_size.items())


def _rates(rows, flop, coord) -> list[tuple[float, float]]:
    """(log coordinate, median FLOP/s) per measured coordinate, sorted."""
    by: dict[float, list[float]] = {}
    for r in rows:
        by.setdefault(math.log(coord(r)), []).append(flop(r) / r["seconds"])
    return sorted((x, statistics.median(v)) for x, v in by.items())


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bus bytes per second
    latency: float  # seconds per call


class Table:
    def __init__(self, data: dict, source: str = "table"):
        self.data, self.source = data, source
        self.missing: set[str] = set()  # attention masks asked for that the table has no rows of
        self.used: set[str] = set()  # attention masks asked for
        # Kernels asked for a mask that the table timed with other kernels only: (mask, kernel asked) -> (the
        # kernel whose rows stood in, the table whose ratio of the two scaled them; None: unscaled).
        self.other_kernel: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._peers: list[Table] | None = None
        self._gemm: dict[str, dict[tuple[int, int], list[tuple[float, float]]]] = {}
        for op in GEMM_OPS:
            groups: dict[tuple[int, int], list[dict]] = {}
            for r in data["gemm"]:
                if r["op"] == op:
                    groups.setdefault((r["k"], r["n"]), []).append(r)
            self._gemm[op] = {kn: _rates(rows, lambda r: 2.0 * r["m"] * r["k"] * r["n"], lambda r: r["m"])
                              for kn, rows in groups.items()}
        self._grouped: dict[str, dict[tuple[int, int, int], list[tuple[float, float]]]] = {}
        for r in data.get("grouped", []):
            self._grouped.setdefault(r["op"], {}).setdefault((r["groups"], r["k"], r["n"]), []).append(r)
        for op, shapes in self._grouped.items():
            shapes.update({gkn: _rates(rows, lambda r: 2.0 * r["groups"] * r["m"] * r["k"] * r["n"], lambda r: r["m"])
                           for gkn, rows in shapes.items()})

    def describe(self) -> str:
        d = self.data
        date = str(d.get("date", "?"))[:10]
        return f"calibration {self.source} ({d.get('device', '?')}, torch {d.get('torch', '?')}, {date})"

    def gemm(self, op: str, m: int, k: int, n: int) -> float:
        """Seconds of x [m, k] @ W [k, n] (fwd), its input gradient (dgrad) or weight gradient (wgrad)."""
        groups = self._gemm[op]
        near = min(groups, key=lambda kn: (abs(math.log(kn[0] / k)) + abs(math.log(kn[1] / n)), kn))
        return 2.0 * m * k * n / _interpolate(groups[near], math.log(m))

    def grouped(self, op: str, groups: int, m: int, k: int, n: int) -> float:
        """Seconds of `groups` experts' x [m, k] @ W [k, n] in one batched GEMM (fwd, dgrad or wgrad), from
        the measured (experts, k, n) nearest in log scale, the rate interpolated in log m (rows per
        expert); a table without such measurements: `groups` separate GEMMs of m rows."""
        shapes = self._grouped.get(op)
        if not shapes:
            return groups * self.gemm(op, m, k, n)
        near = min(shapes, key=lambda gkn: (abs(math.log(gkn[0] / groups)) + abs(math.log(gkn[1] / k))
                                            + abs(math.log(gkn[2] / n)), gkn))
        return 2.0 * groups * m * k * n / _interpolate(shapes[near], math.log(m))

    def kernel_of(self, row: dict) -> str | None:
        """The kernel a biased attention row timed: its own `kernel`, or (tables before rows had one) the
        table's `glam_attention`; None for a causal row (SDPA's own choice)."""
        return row.get("kernel", self.data.get("glam_attention")) if row["mask"] == "bias" else None

    def kernels(self, mask: str) -> set:
        """The kernels the table timed attention of this mask with."""
        return {self.kernel_of(r) for r in self.data["attention"] if r["mask"] == mask}

    def attention(self, batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, mask: str,
                  kernel: str | None = None) -> tuple[float, float]:
        """Seconds of SDPA forward and backward for `batch` x `heads` queries of seq_q over seq_k keys;
        `kernel`: the rows of that kernel where the table timed several for the mask (GLaM's biased
        attention). A kernel the table did not time: its default kernel's rows, times that kernel's
        ratio to the default at this call in another shipped table that timed both (kernels are the same
        code on every GPU of a kind, and their ratios travel: flex against split_triton made GLaM 126M's
        step 1.22x on an H100, 1.23x on an H200); `other_kernel` says which."""
        rows = [r for r in self.data["attention"] if r["mask"] == mask]
        self.used.add(mask)
        call = (batch, heads, seq_q, seq_k, head_dim)
        if not rows:  # e.g. a run whose budget ended before GLaM's biased shapes: planned at causal speed
            self.missing.add(mask)
            return self._attention_from(self.data["attention"], *call)
        if kernel is None or mask != "bias":
            return self._attention_from(rows, *call)
        timed = self.kernels(mask)
        if kernel in timed:
            return self._attention_from([r for r in rows if self.kernel_of(r) == kernel], *call)
        default = self.data.get("glam_attention")
        base = default if default in timed else sorted(timed, key=str)[0]
        fwd, bwd = self._attention_from([r for r in rows if self.kernel_of(r) == base], *call)
        peer = next((t for t in self.peers() if {kernel, base} <= t.kernels(mask)), None)
        self.other_kernel[(mask, kernel)] = (base, peer.source if peer is not None else None)
        if peer is None:
            return fwd, bwd
        (kf, kb), (bf, bb) = (peer.attention(*call, mask, k) for k in (kernel, base))
        return fwd * kf / bf, bwd * kb / bb

    def peers(self) -> list[Table]:
        """The other shipped tables (llamatron/calibration/*.json), by name: where a kernel's ratio is read."""
        if self._peers is None:
            self._peers = [load(p) for p in sorted(DIR.glob("*.json")) if p.name != self.source]
        return self._peers

    def _attention_from(self, rows: list[dict], batch: int, heads: int, seq_q: int, seq_k: int,
                        head_dim: int) -> tuple[float, float]:
        d = min((r["head_dim"] for r in rows), key=lambda x: (abs(math.log(x / head_dim)), x))
        by_size: dict[int, list[dict]] = {}
        for r in rows:
            if r["head_dim"] == d:
                by_size.setdefault(r["batch"] * r["heads"] * r["seq"], []).append(r)
        flop = 4.0 * batch * heads * seq_q * seq_k * head_dim
        length, size = math.log(math.sqrt(seq_q * seq_k)), math.log(batch * heads * seq_q)
        fwd, bwd = (flop / _interpolate(_attention_rates(by_size, key, length), size)
                    for key in ("fwd_seconds", "bwd_seconds"))
        return fwd, bwd

    def bandwidth(self) -> float:
        """Bytes per second moved by element-wise kernels: the largest measured add (or copy)."""
        rows = self.data["elementwise"]
        adds = [r for r in rows if r["op"] == "add"] or rows
        top = max(r["bytes"] for r in adds)
        return statistics.median(r["bytes"] / r["seconds"] for r in adds if r["bytes"] == top)

    def optimizer(self) -> float:
        """Seconds per parameter of an AdamW step (the largest measured)."""
        top = max(self.data["optimizer"], key=lambda r: r["params"])
        return top["seconds"] / top["params"]

    def link(self, op: str) -> Link | None:
        """Bus bandwidth and latency of a collective (least squares over the measured sizes), or None."""
        rows = [r for r in self.data["comm"] if r["op"] == op]
        if not rows:
            return None
        xs = [r["bytes"] * ((r["world"] - 1) / r["world"] if op in COLLECTIVES else 1.0) for r in rows]
        ys = [r["seconds"] for r in rows]
        if len(set(xs)) < 2:
            return Link(xs[0] / ys[0], 0.0)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope <= 0:
            return Link(max(x / y for x, y in zip(xs, ys)), 0.0)
        return Link(1.0 / slope, max(0.0, my - slope * mx))

    def apply(self, hw):
        """`hw` (a plan.Hardware) computing from this table, with its measured links inside a node."""
        links = [self.link(op) for op in ("all_gather", "reduce_scatter")]
        links = [x for x in links if x is not None]
        out = replace(hw, calibration=self)
        if links:
            out = replace(out, intra_node_bw=statistics.fmean(x.bandwidth for x in links),
                          latency=statistics.fmean(x.latency for x in links))
        a2a, p2p = self.link("all_to_all"), self.link("p2p")
        return replace(out, a2a_bw=a2a.bandwidth if a2a else out.a2a_bw, p2p_bw=p2p.bandwidth if p2p else out.p2p_bw)
