"""GLaM's CUDA attention kernels judged inside the model: one forward + backward of the same batch with
each of `attention.KERNELS` (bf16 autocast; eager, or with `--compile` its blocks compiled as the
trainer compiles them, where inductor lays out the intermediates q, k and v itself), and how far each
parameter group's gradient lies from flex's, relative to its norm: a kernel whose gradients are right
lies as far from flex as the other right one does (bf16 rounding, amplified by routing decisions that
flip), a wrong one further.

    python bench/compare_glam_kernel_grads.py --size glam-126m-64e --layers 2 --micro-batch 8 [--compile]

Written when split_cudnn's compiled GLaM 126M step ended 5 steps 2-3e-3 above split's and flex's losses
on an H100 (2026-12-06). Its answer the same day (2 blocks, micro 8): split and split_cudnn each lie
0.12-0.18 of a group's norm from flex, eager and compiled, split_triton 0.09-0.13: rounding amplified
by routing, no kernel off.
"""

from __future__ import annotations

import argparse

import torch

from llamatron.config import parse_config, resolve_model
from llamatron.models import registry
from llamatron.models.glam import attention
from llamatron.parallel.parallelize import materialize
from llamatron.transforms.compile import apply_compile


def grads(model, tokens, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, torch.bfloat16, enabled=tokens.is_cuda):
        loss = model(tokens, labels)
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def group(name: str) -> str:
    for key in ("rel_bias", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "experts", "router",
                "feed_forward", "embedding", "norm"):
        if key in name:
            return key
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="glam-126m-64e")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (every way is the CPU's SDPA there)")
    p.add_argument("--compile", action="store_true", help="the blocks compiled, as the trainer runs them")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg, _ = parse_config(None, [f"model.size={args.size}", f"model.n_layers={args.layers}"])
    family, margs = resolve_model(cfg.model)
    with torch.device("meta"):
        model = registry.family_of(margs).build(margs)
    if args.compile:
        apply_compile(model)
    materialize(model, device, seed=0)
    with torch.no_grad():  # a bias that is not zero (the model starts at zero), so the table's part shows
        for n, prm in model.named_parameters():
            if "rel_bias" in n:
                prm.normal_(0.0, 1.0, generator=torch.Generator(device=device).manual_seed(1))
    model.train()
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, margs.vocab_size, (args.micro_batch, args.seq_len + 1), device=device, generator=gen)
    got, before = {}, attention.KERNEL
    try:
        for way in ("flex", *[k for k in attention.KERNELS if k != "flex"]):
            attention.KERNEL = way
            torch._dynamo.reset()  # compiled blocks guard on the kernel: each way traced afresh
            got[way] = grads(model, tokens[:, :-1], tokens[:, 1:])
    finally:
        attention.KERNEL = before
    ref = got["flex"]
    names = sorted({group(n) for n in ref})
    print(f"{args.size} x {args.layers} layers, micro {args.micro_batch}, seq {args.seq_len}, "
          f"{'compiled' if args.compile else 'eager'}; "
          "|g - g_flex| / |g_flex| per parameter group (the largest over its tensors)")
    print("way          " + " ".join(f"{n:>14s}" for n in names))
    for way, g in got.items():
        if way == "flex":
            continue
        cells = []
        for n in names:
            rel = max(float((g[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)) for k in ref if group(k) == n)
            cells.append(f"{rel:14.2e}")
        print(f"{way:12s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
