"""Zero-shot scoring throughput: llamatron's log-likelihood path next to lm-eval's HF backend on the
same weights, on one device, with the same requests.

The requests are random (context, continuation) token pairs shaped like LAMBADA (context ~ --context-len
tokens, continuation --cont-len); both sides score them at the token level (`loglikelihoods` and
`HFLM._loglikelihood_tokens`), so tokenization is not timed. The HF twin is made from the llamatron
model's weights through the family's HF mapping (what `llamatron convert --to hf` writes), both in bf16.

    python bench/bench_zero_shot.py --size llama3.1-8b --requests 2000 --batch-size 32 --json out.json
    python bench/bench_zero_shot.py --size debug --requests 32 --batch-size 8 --device cpu   # smoke test

Prints requests/s and tokens/s (model input tokens) of each, and the largest log-likelihood
difference between them (bf16: expect ~1e-2 on an 8B model, from different kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from llamatron.eval.loglikelihood import loglikelihoods
from llamatron.models import registry
from llamatron.parallel.parallelize import materialize
from llamatron.runtime import select_device


def requests(n: int, context_len: int, cont_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = int(torch.randint(context_len // 2, context_len * 3 // 2 + 1, (), generator=g))
        out.append((torch.randint(1, vocab, (c,), generator=g).tolist(),
                    torch.randint(1, vocab, (cont_len,), generator=g).tolist()))
    return out


def hf_twin(model, args, device, dtype):
    import transformers

    hf_module = registry.family_of(args).hf
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_module.hf_config(args, dtype).items()
                                      if k not in ("architectures", "torch_dtype", "transformers_version")})
    # Built on the device in `dtype` (its rotary buffers are computed at construction), then overwritten.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    state = dict(hf_module.to_hf(name, t.detach(), args) for name, t in model.state_dict().items())
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--context-len", type=int, default=80)  # LAMBADA passages: ~80 Llama 3 tokens
    ap.add_argument("--cont-len", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights of both models")
    ap.add_argument("--no-hf", action="store_true", help="only llamatron")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = select_device(a.device)
    entry = registry.get(a.size)
    args = dataclasses.replace(entry.args, n_layers=a.layers) if a.layers else entry.args
    with torch.device("meta"):
        model = entry.family.build(args)
    materialize(model, device, seed=0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = model.to(dtype).eval()  # the same weights and dtype on both sides
    reqs = requests(a.requests, a.context_len, a.cont_len, args.vocab_size)
    tokens = sum(len(c) + len(x) - 1 for c, x in reqs)
    loglikelihoods(model, reqs[: a.batch_size], a.batch_size, device)  # warm-up
    ours, t_ours = timed(lambda: loglikelihoods(model, reqs, a.batch_size, device), device)
    rows = {"llamatron": {"seconds": t_ours, "requests_per_s": len(reqs) / t_ours, "tokens_per_s": tokens / t_ours}}
    if not a.no_hf:
        from lm_eval.models.huggingface import HFLM
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        hf = hf_twin(model, args, device, dtype)
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0}, unk_token="<eos>")),
                                      eos_token="<eos>")
        lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=a.batch_size, device=str(device))
        items = [(None, c, x) for c, x in reqs]
        lm._loglikelihood_tokens(items[: a.batch_size], disable_tqdm=True)
        theirs, t_hf = timed(lambda: lm._loglikelihood_tokens(items, disable_tqdm=True), device)
        rows["lm-eval HF"] = {"seconds": t_hf, "requests_per_s": len(reqs) / t_hf, "tokens_per_s": tokens / t_hf}
        rows["max |ll difference|"] = max(abs(x[0] - y[0]) for x, y in zip(ours, theirs))
    print(f"{a.size}{f' ({a.layers} layers)' if a.layers else ''}, {len(reqs)} requests, {tokens:,} input tokens, "
          f"batch {a.batch_size}, {a.dtype}, {device}")
    for name, r in rows.items():
        if isinstance(r, dict):
            print(f"  {name:<12} {r['seconds']:8.2f} s  {r['requests_per_s']:10.1f} requests/s  "
                  f"{r['tokens_per_s']:12,.0f} tokens/s")
        else:
            print(f"  {name}: {r:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
