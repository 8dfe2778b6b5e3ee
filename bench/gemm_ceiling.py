"""The MFU a step could reach if only its GEMMs and attention took time: the FLOP-weighted rate of the
step's own GEMM shapes and attention in a calibration table (`llamatron plan --calibrate`), against the
GPU's dense peak. No GPU needed: it reads the table.

    python bench/gemm_ceiling.py --model llama3.1-8b --layers 4 --seq-len 8192 --micro-batch 8
    python bench/gemm_ceiling.py --model gpt-126m --seq-len 2048 --micro-batch 32 --table llamatron/calibration/h200.json

Per micro-batch: every block GEMM (forward, input and weight gradient) at its rows (micro x seq), the
output layer's three in the fused loss's 8,192-row chunks, and SDPA forward + backward, each timed by
the table (interpolated as the planner does); the formula's FLOPs (`llamatron/flops.py`) over that
time is the ceiling. docs/performance.md, "What bounds BF16 MFU on this H200", quotes it.
"""

from __future__ import annotations

import argparse

from llamatron import calibration, flops
from llamatron.plan import FUSED_LOSS_ROWS, workload


def ceiling(model: str, layers: int | None, seq_len: int, micro: int, table_path: str, peak: float) -> dict:
    w = workload(model, seq_len, micro, layers)
    table, args, shapes = calibration.load(table_path), w.args, w.shapes
    tokens = micro * seq_len
    gemm_s = gemm_flops = 0.0
    for g in shapes.gemms:
        rows = tokens * g.rows // g.groups
        for op in ("fwd", "dgrad", "wgrad"):
            gemm_s += g.share * g.groups * table.gemm(op, rows, g.k, g.n) * args.n_layers
            gemm_flops += g.share * 2 * tokens * g.rows * g.k * g.n * args.n_layers
    chunks = tokens / FUSED_LOSS_ROWS
    for op in ("fwd", "dgrad", "wgrad"):
        gemm_s += chunks * table.gemm(op, FUSED_LOSS_ROWS, args.dim, args.vocab_size)
        gemm_flops += 2 * tokens * args.dim * args.vocab_size
    fwd, bwd = table.attention(micro, shapes.heads, seq_len, seq_len, shapes.head_dim, shapes.attention_mask,
                               shapes.attention_kernel)
    step_flops = micro * flops.flops_per_sequence(args, seq_len)
    seconds = gemm_s + args.n_layers * (fwd + bwd)
    return {"gemm_tflops": gemm_flops / gemm_s / 1e12, "gemm_share_of_peak": gemm_flops / gemm_s / peak,
            "formula_tflop": step_flops / 1e12, "seconds": seconds, "mfu_ceiling": step_flops / seconds / peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--table", default="llamatron/calibration/h200.json")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak of the table's GPU")
    a = p.parse_args()
    r = ceiling(a.model, a.layers, a.seq_len, a.micro_batch, a.table, a.peak_tflops * 1e12)
    print(f"GEMMs at {r['gemm_tflops']:.0f} TFLOP/s ({100 * r['gemm_share_of_peak']:.1f}% of the peak); "
          f"GEMMs + attention only: {r['seconds'] * 1e3:.1f} ms per micro-batch for {r['formula_tflop']:.1f} "
          f"formula TFLOP, an MFU ceiling of {100 * r['mfu_ceiling']:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
