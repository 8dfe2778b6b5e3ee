"""Zero-shot scoring throughput: llamatron's log-likelihood path, eager and compiled, next to lm-eval's
HF backend on the same weights, on one device, with the same requests, at each batch size.

The requests are random (context, continuation) token pairs shaped like LAMBADA (context ~ --context-len
tokens, continuation --cont-len); every side scores them at the token level (`loglikelihoods` and
`HFLM._loglikelihood_tokens`), so tokenization is not timed. The HF twin (`LlamaForCausalLM`,
`GPT2LMHeadModel`) is made from the llamatron model's weights through the family's HF mapping (the
tensors `llamatron convert --to hf` writes), in the same dtype.

    PYTHONPATH=. python bench/bench_zero_shot.py --size llama3.1-8b --requests 2000 --batch-sizes 32,128
    PYTHONPATH=. python bench/bench_zero_shot.py --size gpt-126m --requests 4000 --batch-sizes 32,128
    PYTHONPATH=. python bench/bench_zero_shot.py --size debug --requests 32 --batch-sizes 8 --device cpu \\
        --dtype fp32 --no-compile   # smoke test

Order: llamatron eager at every batch size, then the HF backend, then compiled (compiling is in place
and cannot be undone), then with --fp8 the same model with its block linears scoring from FP8 copies
(`llamatron evaluate --fp8`: converted in place, last, once per recipe given; the blocks compiled for
the bf16 side compile afresh, and a FP8 side that scores exactly as bf16 is reported failed; `--profile`
profiles the last side's largest batch). Every side warms up on one untimed pass
over all the requests, so that each batch shape has run once before the timed pass (cuBLAS's
per-shape heuristics and the allocator's first growth on every side alike; compiled: the blocks' one
dynamic-shape graph, then no recompile for any batch length); its time is reported apart as
`warmup_s` and excluded from the throughput. (Until 2026-12-05 eager and HF warmed up on one batch
only.) Each side prints a `ROW` line per batch size when it ends and rewrites `--json` with what has
run so far; a side that fails is reported in one line and the rest still run (exit status 1). At the
end, per batch size: requests/s, model-input tokens/s, the ratio to the HF backend, the largest
per-request log-likelihood difference, and one `SUMMARY {json}` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from unittest import mock

import torch

from llamatron.eval import loglikelihood
from llamatron.eval.loglikelihood import loglikelihoods
from llamatron.models import registry
from llamatron.parallel.parallelize import materialize
from llamatron.runtime import device_name, select_device
from llamatron.transforms import compile as compile_options
from llamatron.transforms.fp8_frozen import quantize_for_scoring


def requests(n: int, context_len: int, cont_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = int(torch.randint(context_len // 2, context_len * 3 // 2 + 1, (), generator=g))
        out.append((torch.randint(1, vocab, (c,), generator=g).tolist(),
                    torch.randint(1, vocab, (cont_len,), generator=g).tolist()))
    return out


def hf_twin(model, args, device, dtype):
    """The transformers model of the family's HF format holding `model`'s weights."""
    import transformers

    from llamatron.convert import hf_state_dict

    hf_module = registry.family_of(args).hf
    cfg = {k: v for k, v in hf_module.hf_config(args, dtype).items()
           if k not in ("architectures", "torch_dtype", "transformers_version")}
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    # Built on the device in `dtype` (its rotary buffers are computed at construction), then overwritten.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    state = hf_state_dict({n: p.detach() for n, p in model.named_parameters()}, args)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not hf_module.hf_ignored(k, args)]  # tied lm_head, mask buffers
    if missing or unexpected:
        raise RuntimeError(f"HF twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _row(scores, seconds: float, n: int, tokens: int, **extra) -> dict:
    return {"scores": scores, "seconds": seconds, "requests_per_s": n / seconds, "tokens_per_s": tokens / seconds,
            **extra}


def run_llamatron(model, reqs, sizes, device, tokens: int, compile: bool, profile: bool = False) -> dict[int, dict]:
    """{batch size: row}: a full untimed pass first (compiled: the compile, then every length once).
    `profile`: then one more pass at the largest batch size under torch.profiler (where the time goes)."""
    out = {}
    for bs in sizes:
        _, warmup = timed(lambda: loglikelihoods(model, reqs, bs, device, compile=compile), device)
        scores, seconds = timed(lambda: loglikelihoods(model, reqs, bs, device, compile=compile), device)
        out[bs] = _row(scores, seconds, len(reqs), tokens, warmup_s=warmup)
    if profile and device.type == "cuda":
        out[max(sizes)]["profile"] = profile_pass(lambda: loglikelihoods(model, reqs, max(sizes), device,
                                                                         compile=compile))
    return out


def profile_pass(fn) -> dict:
    """One scoring pass under torch.profiler: device time by kernel bucket and the top kernels
    (bench_train_step.py's summary), printed and returned."""
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from bench_train_step import print_profile, profile_summary

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        _, wall = timed(fn, torch.device("cuda"))
    summary = profile_summary(prof, wall)
    print_profile(summary, "one scoring pass")
    return summary


def run_hf(model, args, reqs, sizes, device, dtype, tokens: int) -> dict[int, dict]:
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = hf_twin(model, args, device, dtype)
    # Token-level requests: the tokenizer is never used, but HFLM wants one.
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0}, unk_token="<eos>")),
                                  eos_token="<eos>")
    items = [(None, c, x) for c, x in reqs]
    out = {}
    for bs in sizes:
        lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=bs, device=str(device))
        _, warmup = timed(lambda: lm._loglikelihood_tokens(items, disable_tqdm=True), device)
        scores, seconds = timed(lambda: lm._loglikelihood_tokens(items, disable_tqdm=True), device)
        out[bs] = _row(scores, seconds, len(reqs), tokens, warmup_s=warmup)
    del hf, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _largest_difference(a, b) -> float:
    return max(abs(x[0] - y[0]) for x, y in zip(a, b))


def summary_record(rows: dict[str, dict], bs: int, header: dict) -> dict:
    """One batch size's SUMMARY record: each side's figures, its ratio to the HF backend, and the largest
    per-request log-likelihood difference of every pair of sides."""
    hf = rows.get("lm-eval HF")
    summary = {**header, "batch_size": bs}
    for name, r in rows.items():
        summary[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "scores"}
        if hf and r is not hf:
            summary[name]["vs_hf"] = round(r["requests_per_s"] / hf["requests_per_s"], 4)
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            summary.setdefault("max_ll_difference", {})[f"{a} vs {b}"] = _largest_difference(rows[a]["scores"],
                                                                                           rows[b]["scores"])
    return summary


def summarize(rows: dict[str, dict], bs: int, header: dict) -> dict:
    """Print one batch size's rows (ratios to the HF backend) and return its SUMMARY record."""
    summary = summary_record(rows, bs, header)
    print(f"batch {bs}:")
    for name, r in rows.items():
        ratio = summary[name].get("vs_hf")
        warm = f"  (warm-up {r['warmup_s']:.1f} s, not counted)" if "warmup_s" in r else ""
        print(f"  {name:<20} {r['seconds']:8.2f} s  {r['requests_per_s']:10.1f} requests/s  "
              f"{r['tokens_per_s']:12,.0f} tokens/s" + (f"  {ratio:5.2f}x HF" if ratio else "") + warm)
    for pair, d in summary.get("max_ll_difference", {}).items():
        a, b = pair.split(" vs ")
        flags = sum(x[1] != y[1] for x, y in zip(rows[a]["scores"], rows[b]["scores"]))
        print(f"  max |ll difference| {pair}: {d:.3g}  (is_greedy differs on {flags})")
    print("SUMMARY " + json.dumps(summary))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="llama3.1-8b", help="a named model (llama3.1-8b, gpt-126m, debug, gpt-debug)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--context-len", type=int, default=80)  # LAMBADA passages: ~80 Llama 3 tokens
    ap.add_argument("--cont-len", type=int, default=2)
    ap.add_argument("--batch-sizes", "--batch-size", default="32,128", help="comma-separated")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights of every model")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled llamatron run")
    ap.add_argument("--no-hf", action="store_true", help="skip lm-eval's HF backend")
    ap.add_argument("--fp8", nargs="?", const="rowwise", default=None, metavar="RECIPES",
                    help="then score with FP8 block linears (H100-class GPUs), per recipe in turn: rowwise "
                         "(the default), tensorwise, or both comma-separated; RECIPE+nomultikernel compiles that "
                         "side without inductor's triton.multi_kernel (long-row reductions always looped), "
                         "RECIPE+pad8 pads each batch's width to a multiple of 8 tokens (as until 2026-12-06)")
    ap.add_argument("--fp8-min-features", type=int, default=1024)
    ap.add_argument("--profile", action="store_true",
                    help="profile one more pass of the last llamatron side at the largest batch size")
    ap.add_argument("--json", default=None, help="write the SUMMARY records here")
    a = ap.parse_args()
    sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    device = select_device(a.device)
    entry = registry.get(a.size)
    args = dataclasses.replace(entry.args, n_layers=a.layers) if a.layers else entry.args
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = entry.family.build(args)
    materialize(model, device, seed=0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = model.to(dtype).eval()  # the same weights and dtype on every side
    reqs = requests(a.requests, a.context_len, a.cont_len, args.vocab_size)
    tokens = sum(len(c) + len(x) - 1 for c, x in reqs)
    header = {"size": a.size, "layers": args.n_layers, "requests": len(reqs), "input_tokens": tokens,
              "dtype": a.dtype, "device": device_name(device), "torch": torch.__version__}
    print(f"{a.size}{f' ({a.layers} layers)' if a.layers else ''}, {len(reqs)} requests, {tokens:,} input tokens, "
          f"{a.dtype}, {header['device']}, torch {torch.__version__} (model built in {time.perf_counter() - t0:.0f} s)")

    def fp8_side(spec: str, last: bool):
        recipe, _, knob = spec.partition("+")
        converted = quantize_for_scoring(model, a.fp8_min_features, recipe)  # compiled blocks compile afresh
        print(f"FP8 {spec}: {len(converted)} block linears score from FP8 copies")
        # The scoring compile's multi_kernel (one-pass reductions over long rows) off, or the batches'
        # width aligned to 8 tokens, to measure what each does.
        options = {} if knob == "nomultikernel" else compile_options.EVAL_INDUCTOR_OPTIONS
        width = 8 if knob == "pad8" else loglikelihood.WIDTH_MULTIPLE
        with mock.patch.object(compile_options, "EVAL_INDUCTOR_OPTIONS", options), \
                mock.patch.object(loglikelihood, "WIDTH_MULTIPLE", width):
            rows = run_llamatron(model, reqs, sizes, device, tokens, compile=not a.no_compile,
                                 profile=a.profile and last)
        bf16 = runs.get("llamatron compiled") or runs.get("llamatron eager")
        if bf16 and all(rows[bs]["scores"] == bf16[bs]["scores"] for bs in sizes):
            # FP8 rounds differently from bf16: identical scores mean its GEMMs never ran (torch 2.11's
            # cached graphs did that to this side's rows of 2026-12-05).
            raise RuntimeError("the FP8 side scored exactly as bf16: its FP8 layers did not run")
        return rows

    recipes = [r for r in (a.fp8 or "").split(",") if r]
    sides = {"llamatron eager": lambda: run_llamatron(model, reqs, sizes, device, tokens, compile=False)}
    if not a.no_hf:
        sides["lm-eval HF"] = lambda: run_hf(model, args, reqs, sizes, device, dtype, tokens)
    if not a.no_compile:
        sides["llamatron compiled"] = lambda: run_llamatron(model, reqs, sizes, device, tokens, compile=True,
                                                            profile=a.profile and not recipes)
    for i, recipe in enumerate(recipes):
        name = " ".join(["llamatron fp8"] + ([] if recipe == "tensorwise" else [recipe.replace("+", " ")])
                        + ([] if a.no_compile else ["compiled"]))
        sides[name] = lambda recipe=recipe, last=i == len(recipes) - 1: fp8_side(recipe, last)
    runs, failed = {}, []
    for name, side in sides.items():  # each printed and written as it ends: a run cut short keeps them
        try:
            runs[name] = side()
        except Exception as e:  # noqa: BLE001 - one failing side (a compile error) must not lose the others
            traceback.print_exc()
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
            failed.append(name)
            continue
        for bs, r in runs[name].items():
            print(f"ROW {name}, batch {bs}: {r['requests_per_s']:.1f} requests/s, {r['tokens_per_s']:,.0f} tokens/s",
                  flush=True)
        write_json(a.json, [summary_record({n: r[bs] for n, r in runs.items()}, bs, header) for bs in sizes])
    summaries = [summarize({name: r[bs] for name, r in runs.items()}, bs, header) for bs in sizes]
    write_json(a.json, summaries)
    return 1 if failed else 0


def write_json(path: str | None, summaries: list[dict]) -> None:
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(summaries, f, indent=2)
        os.replace(tmp, path)

if __name__ == "__main__":
    raise SystemExit(main())
