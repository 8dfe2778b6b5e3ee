"""Greedy generation speed: through the KV cache against recomputing the sequence for every token
(`greedy_generate(use_cache=...)`), on one device, the same random prompts and weights.

    python bench/bench_generate.py --size tiny --prompts 4 --prompt-len 32 --new 64 --device cpu
    python bench/bench_generate.py --size llama3.1-8b --prompts 16 --prompt-len 512 --new 256 --dtype bf16

Prompts have lengths spread around --prompt-len (a left-padded batch); no stop token, so every row
generates --new tokens. Prints the seconds and new tokens/s of each way, the speed-up, and whether
the two produced the same tokens (random weights give nearly flat logits: in bf16, or on a large
model, a near-tie may break differently; fp32 on a small model is expected to agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from llamatron.eval.loglikelihood import greedy_generate
from llamatron.models import registry
from llamatron.parallel.parallelize import materialize
from llamatron.runtime import select_device

from bench_zero_shot import timed  # the same clock (synchronised around the call on CUDA)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length * 3 // 2 + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (c,), generator=g).tolist() for c in lengths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4, help="one batch of this many prompts")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = select_device(a.device)
    entry = registry.get(a.size)
    args = dataclasses.replace(entry.args, n_layers=a.layers) if a.layers else entry.args
    with torch.device("meta"):
        model = entry.family.build(args)
    materialize(model, device, seed=0)
    model = model.to(torch.bfloat16 if a.dtype == "bf16" else torch.float32).eval()
    batch = prompts(a.prompts, a.prompt_len, args.vocab_size)
    rows, outputs = {}, {}
    for name, cache in (("kv cache", True), ("recompute", False)):
        greedy_generate(model, batch, 2, device, use_cache=cache)  # warm-up
        outputs[name], seconds = timed(lambda: greedy_generate(model, batch, a.new, device, use_cache=cache), device)
        rows[name] = {"seconds": seconds, "new_tokens_per_s": a.prompts * a.new / seconds}
    rows["speedup"] = rows["recompute"]["seconds"] / rows["kv cache"]["seconds"]
    rows["same_tokens"] = outputs["kv cache"] == outputs["recompute"]
    print(f"{a.size}{f' ({a.layers} layers)' if a.layers else ''}, {a.prompts} prompts of "
          f"{min(map(len, batch))}-{max(map(len, batch))} tokens, {a.new} new tokens each, {a.dtype}, {device}, "
          f"{torch.get_num_threads()} threads")
    for name in ("kv cache", "recompute"):
        print(f"  {name:<10} {rows[name]['seconds']:8.2f} s  {rows[name]['new_tokens_per_s']:10.1f} new tokens/s")
    print(f"  speed-up {rows['speedup']:.1f}x, same tokens: {rows['same_tokens']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
