"""Would one GEMM for q, k and v (and one for the MLP's gate and up) beat the three (two) the Llama
block runs now? Times the block's input projections forward + backward on one GPU, in one process:
`separate` (wq, wk, wv, w1, w3 as `nn.Linear`s, the model as it is) against `fused` (one [q; k; v]
weight and one [gate; up] weight, outputs split), in BF16 and in torchao's tensorwise FP8, each
compiled. Medians of CUDA-event timings after warm-up, on random inputs and gradients (never zeros).

    python bench/bench_fused_projections.py --rows 16384,65536 --json OUT.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from bench_fp8_loss import median_ms  # the script beside this one: CUDA-event medians after warm-up


class Separate(nn.Module):
    def __init__(self, dim: int, kv_dim: int, hidden: int):
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, kv_dim, bias=False), nn.Linear(dim, kv_dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.wq(x), self.wk(x), self.wv(x), F.silu(self.w1(x)) * self.w3(x)


class Fused(nn.Module):
    def __init__(self, dim: int, kv_dim: int, hidden: int):
        super().__init__()
        self.sizes = (dim, kv_dim, kv_dim)
        self.wqkv, self.w13 = nn.Linear(dim, dim + 2 * kv_dim, bias=False), nn.Linear(dim, 2 * hidden, bias=False)

    def forward(self, x):
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        gate, up = self.w13(x).chunk(2, dim=-1)
        return q, k, v, F.silu(gate) * up


def time_module(module: nn.Module, rows: int, dim: int, repeats: int) -> float:
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(module)
    grads = [torch.randn_like(t) for t in compiled(x)]

    def step():
        torch.autograd.backward(compiled(x), grads)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return median_ms(step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16384,65536", help="token rows (micro batch x seq), comma-separated")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--kv-dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for precision in ("bf16", "fp8"):
        for rows in (int(r) for r in args.rows.split(",")):
            row = {"precision": precision, "rows": rows}
            for name, cls in (("separate", Separate), ("fused", Fused)):
                module = cls(args.dim, args.kv_dim, args.hidden).to("cuda", torch.bfloat16)
                if precision == "fp8":
                    from torchao.float8 import convert_to_float8_training
                    convert_to_float8_training(module)
                row[f"{name}_ms"] = round(time_module(module, rows, args.dim, args.repeats), 3)
                del module
                torch.cuda.empty_cache()
            flops = 6 * rows * args.dim * (args.dim + 2 * args.kv_dim + 2 * args.hidden)
            row["separate_tflops"] = round(flops / row["separate_ms"] / 1e9, 1)
            row["fused_tflops"] = round(flops / row["fused_ms"] / 1e9, 1)
            row["fused_speedup"] = round(row["separate_ms"] / row["fused_ms"], 4)
            print("ROW", json.dumps(row), flush=True)
            results.append(row)
    from bench_train_step import write_json  # written whole or not at all, with the date and command

    write_json(args.json, torch.cuda.get_device_name(), results)


if __name__ == "__main__":
    main()
