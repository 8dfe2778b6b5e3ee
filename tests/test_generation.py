"""Incremental decoding through the KV cache (`llamatron/models/kv_cache.py`) against full recompute,
for every family: each step's logits, greedy tokens, and batches of prompts of different lengths.

GLaM is tested with dropless routing (capacity_factor 0): with capacity, a token's second expert can
be dropped for tokens after it, so the full recompute itself is not causal (docs/evaluate.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamatron.eval.loglikelihood import greedy_generate
from llamatron.models import registry
from llamatron.models.kv_cache import KVCache

torch.set_num_threads(1)
CPU = torch.device("cpu")
FAMILIES = {"llama": ("debug", {}), "gpt": ("gpt-debug", {}), "glam": ("glam-debug", {"capacity_factor": 0.0})}


def _build(size, init_std=0.02, **extra):
    entry = registry.get(size)
    m = entry.family.build(dataclasses.replace(entry.args, init_std=init_std, **extra))
    m.init_weights(seed=5)
    return m.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    size, extra = FAMILIES[request.param]
    return _build(size, **extra)


@pytest.fixture(scope="module", params=list(FAMILIES))
def peaked(request):
    """A model with large weights: its greedy choices win by far more than rounding, so the token
    comparisons test the decode, not ties."""
    size, extra = FAMILIES[request.param]
    return _build(size, init_std=0.5, **extra)


def _tokens(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_prefill_and_each_step_equal_full_recompute(model):
    seq = _tokens([24])[0]
    full = model(torch.tensor([seq]))[0]
    cache = KVCache([0], capacity=len(seq))
    prefill = model(torch.tensor([seq[:9]]), cache=cache)[0]
    torch.testing.assert_close(prefill, full[:9], rtol=0, atol=1e-5)
    for t in range(9, len(seq)):
        step = model(torch.tensor([[seq[t]]]), cache=cache)[0, 0]
        torch.testing.assert_close(step, full[t], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="24 slots: 24 filled, 1 more do not fit"):
        model(torch.tensor([[0]]), cache=cache)


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(model):
    """Prompts of 5, 2 and 11 tokens prefilled together (left padding), then decoded one token per
    row, rows leaving the batch as their sequences end: every logit equals its sequence's own."""
    seqs, prompt = _tokens([11, 6, 19], seed=1), [5, 2, 11]
    full = [model(torch.tensor([s]))[0] for s in seqs]
    width = max(prompt)
    tokens = torch.zeros(3, width, dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompt)):
        tokens[r, width - p:] = torch.tensor(s[:p])
    cache = KVCache([width - p for p in prompt], capacity=width + 8)
    logits = model(tokens, cache=cache)
    for r, p in enumerate(prompt):
        torch.testing.assert_close(logits[r, width - p:], full[r][:p], rtol=0, atol=1e-5)
    rows = [0, 1, 2]
    for t in range(8):
        going = [r for r in rows if prompt[r] + t < len(seqs[r])]
        if going != rows:
            cache.keep([rows.index(r) for r in going])
            rows = going
        step = model(torch.tensor([[seqs[r][prompt[r] + t]] for r in rows]), cache=cache)[:, 0]
        for k, r in enumerate(rows):
            torch.testing.assert_close(step[k], full[r][prompt[r] + t], rtol=0, atol=1e-5)
    assert rows == [2]  # rows 1 then 0 left the batch on the way


@torch.no_grad()
def test_glam_capacity_prefill_leaves_the_left_padding_out():
    """GLaM with expert capacity: a left-padded prefill routes each prompt as the prompt alone. The
    padding comes first in token order: routed, it would take the experts' slots before any real token."""
    m = _build("glam-debug", init_std=0.5)  # large router weights: peaked routing, so capacity bites
    prompts = _tokens([5, 2, 11, 16], seed=4)
    width = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, width - len(p):] = torch.tensor(p)
    logits = m(tokens, cache=KVCache([width - len(p) for p in prompts], capacity=width))
    for r, p in enumerate(prompts):
        torch.testing.assert_close(logits[r, width - len(p):], m(torch.tensor([p]))[0], rtol=1e-5, atol=1e-4)
    assert sum(int(moe.last_stats[-4]) for moe in m.moe_layers()) > 0  # the last prompt alone drops some


@torch.no_grad()
def test_greedy_generation_with_cache_equals_recompute_and_single_prompts(peaked):
    prompts = _tokens([3, 9, 1, 6], seed=2)
    calls = []
    hook = peaked.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0].shape, kwargs.get("cache") is not None)), with_kwargs=True)
    try:
        recomputed = greedy_generate(peaked, prompts, 12, CPU, use_cache=False)
        calls.clear()
        cached = greedy_generate(peaked, prompts, 12, CPU)
    finally:
        hook.remove()
    assert cached == recomputed
    # One prefill of the left-padded prompts, then one token per row per step.
    assert calls == [(torch.Size([4, 9]), True)] + [(torch.Size([4, 1]), True)] * 11
    # A stop token taken from the output: rows stop at different steps and leave the cache.
    eos = recomputed[1][4]
    stopped = greedy_generate(peaked, prompts, 12, CPU, eos_id=eos, use_cache=False)
    assert len({len(o) for o in stopped}) > 1
    assert greedy_generate(peaked, prompts, 12, CPU, eos_id=eos) == stopped
    for p, o in zip(prompts, stopped):
        assert greedy_generate(peaked, [p], 12, CPU, eos_id=eos) == [o]


@torch.no_grad()
def test_cache_gives_way_to_recompute_when_the_context_slides(peaked):
    """Past max_len the sequence is left-truncated at each step (positions shift): the cached steps
    stop there and the rest recompute, the same tokens as recomputing throughout."""
    prompts = _tokens([6, 3], seed=3)
    calls = []
    hook = peaked.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("cache") is not None),
                                            with_kwargs=True)
    try:
        cached = greedy_generate(peaked, prompts, 10, CPU, max_len=10)
    finally:
        hook.remove()
    # Steps 0-4 fit in 10 tokens (6 + 4 fed at step 4); from step 5 the 6-token prompt's window slides.
    assert calls == [True] * 5 + [False] * 5
    assert cached == greedy_generate(peaked, prompts, 10, CPU, max_len=10, use_cache=False)
