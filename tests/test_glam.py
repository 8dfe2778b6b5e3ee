"""GLaM (issue 21): Pax's top-2 routing against a plain reference, grouped-GEMM experts against the
loop, the aux loss in the gradient, parameter counts and FLOPs of the presets, and glam-debug training
and resuming through the normal trainer."""

import json
import math

import numpy as np
import pytest
import torch

from llamatron.config import load_config, validate_config
from llamatron.data.indexed import IndexedDatasetWriter
from llamatron.errors import LlamatronError
from llamatron.models import parameter_count, registry
from llamatron.models.glam import experts as experts_mod
from llamatron.models.glam.model import MoE
from llamatron.models.glam.routing import expert_capacity, route, row_capacity
from llamatron.train.trainer import train

torch.set_num_threads(1)


def pax_top2_reference(logits: torch.Tensor, capacity_factor: float):
    """Pax's top2_gating_on_logits (legacy MTF) written with Python loops over one group [S, E]:
    returns {(token, expert): gate} of the kept assignments and the aux loss."""
    S, E = logits.shape
    probs = torch.softmax(logits.double(), -1)
    C = expert_capacity(S, E, capacity_factor) or S * 2
    first, second = [], []
    for s in range(S):
        p = probs[s].tolist()
        e1 = max(range(E), key=lambda e: (p[e], -e))
        e2 = max((e for e in range(E) if e != e1), key=lambda e: (p[e], -e))
        denom = p[e1] + p[e2] + 1e-9
        first.append((e1, p[e1] / denom))
        second.append((e2, p[e2] / denom))
    kept, fill = {}, [0] * E
    for choices in (first, second):  # every token's top-1 takes a slot before any top-2 does
        for s, (e, g) in enumerate(choices):
            if fill[e] < C:
                kept[(s, e)] = g
            fill[e] += 1
    density = [sum(1 for e, _ in first if e == x) / S for x in range(E)]
    proxy = probs.mean(0).tolist()
    aux = sum(density[e] * proxy[e] for e in range(E)) / E * E * E
    return kept, aux


def _as_dict(r, S):
    return {(int(t) % S, int(e)): float(g) for t, e, g in zip(r.token, r.expert, r.gate)}


def test_capacity_is_paxs_rule():
    assert expert_capacity(2048, 64, 2.0) == 64  # GLaM 126M/64E at seq 2048
    assert expert_capacity(32, 8, 2.0) == 8
    assert expert_capacity(10, 8, 2.0) == 4  # int(2.5) = 2, rounded up to a multiple of 4
    assert expert_capacity(4, 8, 2.0) == 1  # int(1.0) = 1: Pax's starting capacity, not rounded
    assert expert_capacity(32, 8, 0.0) == 0  # dropless


def test_top2_on_hand_built_logits():
    # 4 tokens, 4 experts, capacity int(4 x 2 / 4) = 2 -> 4 (rounded up): make it bite with factor 1.0:
    # int(4 x 1 / 4) = 1. Every token prefers expert 0, then expert 1 (tokens 0, 1) or 2 (tokens 2, 3).
    logits = torch.tensor([[[3.0, 2.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.0], [2.0, 0.0, 3.0, 0.0]]])
    r = route(logits, top_k=2, capacity_factor=1.0)
    got = {(int(t), int(e)) for t, e in zip(r.token, r.expert)}
    # Top-1: tokens 0, 1, 2 -> expert 0 (one slot: token 0 keeps it), token 3 -> expert 2 (kept).
    # Top-2: tokens 0, 1 -> expert 1 (token 0 keeps it), token 2 -> expert 2 (full: token 3's top-1 came
    # first), token 3 -> expert 0 (full).
    assert got == {(0, 0), (3, 2), (0, 1)}
    assert int(r.dropped) == 5 and r.assigned == 8
    assert r.counts.tolist() == [1, 1, 1, 0]
    g = dict(zip([(int(t), int(e)) for t, e in zip(r.token, r.expert)], r.gate.tolist()))
    # Gates renormalised over the two choices before drops: e / (e + e^-1) ... for logits 3 and 2.
    assert g[(0, 0)] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2)), rel=1e-6)
    assert g[(0, 0)] + g[(0, 1)] == pytest.approx(1.0, rel=1e-6)
    assert g[(3, 2)] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2)), rel=1e-6)  # its top-2 dropped
    # Aux: f = top-1 fractions (3/4, 0, 0, 1/4), P = mean probabilities; E^2 x mean_e(f_e P_e).
    p = torch.softmax(logits[0].double(), -1).mean(0)
    want = 16 * (0.75 * p[0] + 0.25 * p[2]) / 4
    assert float(r.aux_loss) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("capacity_factor", [2.0, 1.0, 0.0])
def test_top2_matches_the_pax_reference(capacity_factor):
    torch.manual_seed(0)
    logits = torch.randn(3, 24, 8) * 2
    r = route(logits, top_k=2, capacity_factor=capacity_factor)
    kept = _as_dict(r, 24)
    want, aux = {}, 0.0
    for g in range(3):
        k, a = pax_top2_reference(logits[g], capacity_factor)
        aux += a / 3
        # the test's dict keys are per group; keep group apart by offsetting the token index
        want.update({(s + 24 * g, e): v for (s, e), v in k.items()})
    kept = {(int(t), int(e)): float(v) for t, e, v in zip(r.token, r.expert, r.gate)}
    assert kept.keys() == want.keys()
    for key in want:
        assert kept[key] == pytest.approx(want[key], rel=1e-5)
    assert float(r.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert int(r.dropped) == 3 * 24 * 2 - len(want)
    if capacity_factor == 0.0:
        assert int(r.dropped) == 0
    # Sorted by expert, token order within an expert (what grouped GEMM and the loop both read).
    assert r.expert.tolist() == sorted(r.expert.tolist())


def test_row_capacity_is_expert_capacity_on_the_device():
    n = torch.arange(0, 600)
    for E, factor in [(8, 2.0), (64, 2.0), (64, 1.25), (8, 0.3)]:
        assert row_capacity(n, E, factor).tolist() == [expert_capacity(int(i), E, factor) for i in n]


@pytest.mark.parametrize("capacity_factor", [2.0, 1.0, 0.0])
def test_padding_takes_no_slot_and_each_row_routes_as_alone(capacity_factor):
    """Right-padded rows of 24, 13 and 5 real tokens in groups of 24: padding has no assignment, and
    each row's kept assignments, gates and drops are those of its real tokens routed alone."""
    torch.manual_seed(1)
    logits = torch.randn(3, 24, 8) * 2
    logits[:, :, 0] += 3  # a favourite expert: drops under capacity, and padding would compete for it
    n = torch.tensor([24, 13, 5])
    valid = torch.arange(24) < n[:, None]
    r = route(logits, 2, capacity_factor, valid)
    assert not r.kept[~valid].any()
    counts, dropped = torch.zeros(8, dtype=torch.int64), 0
    for g, ng in enumerate(n.tolist()):
        alone = route(logits[g : g + 1, :ng], 2, capacity_factor)
        assert torch.equal(r.kept[g, :ng], alone.kept[0])
        torch.testing.assert_close(r.choice_gate[g, :ng], alone.choice_gate[0], rtol=0, atol=0)
        counts += alone.counts
        dropped += int(alone.dropped)
    assert torch.equal(r.counts, counts) and int(r.dropped) == dropped and int(r.assigned) == 2 * 42
    if capacity_factor:
        assert dropped > 0
        # Unmasked (what scoring did), the padded length's capacity and the padding's slots change it.
        assert not torch.equal(route(logits, 2, capacity_factor).kept[valid], r.kept[valid])


@pytest.mark.skipif(not experts_mod._grouped_mm_works("cpu", torch.float32),
                    reason="this torch has no CPU torch._grouped_mm")
def test_grouped_gemm_equals_the_loop_forward_and_backward():
    torch.manual_seed(0)
    ex = experts_mod.GroupedExperts(6, 32, 48)
    with torch.no_grad():
        ex.w1.normal_(0, 0.1)
        ex.w2.normal_(0, 0.1)
    counts = torch.tensor([5, 0, 3, 9, 1, 2])
    x = torch.randn(int(counts.sum()), 32)
    results = []
    for grouped in (True, False):
        xg = x.clone().requires_grad_(True)
        y = ex(xg, counts, grouped=grouped)
        y.sum().backward()  # a zero-stride gradient: the grouped path must make it contiguous
        results.append((y.detach(), xg.grad, ex.w1.grad.clone(), ex.w2.grad.clone()))
        ex.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # And the loop is the plain per-expert FFN.
    rows = torch.split(x, counts.tolist())
    ref = torch.cat([torch.relu(r @ ex.w1[e]) @ ex.w2[e] for e, r in enumerate(rows)])
    torch.testing.assert_close(results[1][0], ref.detach())


def _debug_moe(**overrides):
    import dataclasses

    args = dataclasses.replace(registry.get("glam-debug").args, **overrides)
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return moe, args


def test_moe_layer_is_the_gate_weighted_sum_of_expert_outputs():
    moe, args = _debug_moe(capacity_factor=0.0)
    x = torch.randn(2, 16, args.dim)
    y = moe(x)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    top = probs.topk(2, -1)
    gates = top.values / top.values.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for b in range(2):
        for s in range(16):
            for j in range(2):
                e = int(top.indices[b, s, j])
                want[b, s] += gates[b, s, j] * (torch.relu(x[b, s] @ moe.experts.w1[e]) @ moe.experts.w2[e])
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capacity_factor,batch", [(2.0, 3), (0.5, 1)])
def test_capacity_buffer_equals_the_sorted_dispatch(capacity_factor, batch):
    # The static [E, G x C, d] buffer (gathers by slot, batched matmul) against the kept assignments
    # sorted by expert (index + index_add, the dropless path's code), on the same routing: forward and
    # every gradient, fp32. Factor 0.5 drops about half the choices.
    moe, args = _debug_moe(capacity_factor=capacity_factor)
    x = torch.randn(batch, 40, args.dim)
    got = []
    for path in (moe._capacity, moe._dropless):
        moe.zero_grad()
        xg = x.clone().requires_grad_(True)
        r = route((xg @ moe.router.weight.T), 2, capacity_factor)
        y = path(xg.reshape(-1, args.dim), r)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        got.append([y.detach(), xg.grad] + [p.grad.clone() for p in moe.parameters()])
    assert int(r.dropped) > 0
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capacity_moe_block_is_one_compiled_graph():
    import torch._dynamo

    model = registry.get("glam-debug").family.build(registry.get("glam-debug").args)
    model.init_weights(seed=0)
    block, buckets = model.layers["0"], model.rel_buckets
    assert block.compile_fullgraph and isinstance(block.feed_forward, MoE)
    x = torch.randn(2, 32, model.args.dim)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, buckets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # Compiled (fullgraph, no inductor: fast) it gives the eager outputs, gradients and statistics.
    results = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad()
        xg = x.clone().requires_grad_(True)
        fn(xg, buckets).pow(2).sum().backward()
        results.append([xg.grad, block.feed_forward.last_stats] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    block.feed_forward.capacity_factor = 0.0  # dropless: data-dependent sizes
    assert not block.compile_fullgraph


def test_aux_loss_enters_the_router_gradient():
    moe, args = _debug_moe()
    x = torch.randn(2, 16, args.dim)
    w = moe.router.weight.detach().clone().requires_grad_(True)
    r = route((x @ w.T).view(2, 16, -1), 2, args.capacity_factor)
    (0.5 * r.aux_loss).backward()
    assert w.grad.abs().sum() > 0
    # The block's output times zero: the only gradient the router gets is the attached aux loss's,
    # coef x loss_scale x d(aux)/dW.
    for coef, scale in ((0.5, 1.0), (0.5, 0.25), (0.0, 1.0)):
        moe.aux_coef, moe.loss_scale = coef, scale
        moe.zero_grad()
        (moe(x) * 0).sum().backward()
        torch.testing.assert_close(moe.router.weight.grad, 2 * coef * scale * w.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("seqlen", [150, 40])  # past the band (113) and not a multiple of its block; within it
def test_flex_relative_attention_equals_the_materialised_bias(seqlen):
    # What CUDA runs (flex_attention + score_mod, the table's gradient from the band) against the
    # [H, S, S] bias through SDPA: the output (flex runs forward-only on the CPU), and the table
    # gradient `table_grad` computes from the output, its gradient and the log-sum-exp.
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket

    torch.manual_seed(0)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, H, seqlen, D, requires_grad=True) for _ in range(3))
    table = torch.randn(32, H, requires_grad=True)
    pos = torch.arange(256)
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], 32, 128)
    band = attention.band_width(buckets[:, 0], 32)
    assert band == 113  # T5's 32 buckets up to distance 128: the last bucket from distance 113 on
    ref = attention.sdpa_attention(q, k, v, table, buckets)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    q, k, v, t = (x.detach() for x in (q, k, v, table))  # flex has no CPU backward
    mask = attention.causal_block_mask(seqlen, q.device)
    out, lse = attention._flex_with_lse(q, k, v, t[buckets[:seqlen, 0]].t().contiguous(), mask)
    got = attention.table_grad(q, k, v, out, lse, grad_out, t, buckets[:, 0], band)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, table.grad, rtol=1e-4, atol=1e-5)
    if seqlen > band:  # the last bucket's gradient is real (and zero below the band)
        assert table.grad[-1].abs().max() > 0.1 * table.grad.abs().max()


def test_an_unknown_glam_attention_kernel_is_one_clear_error(monkeypatch):
    from llamatron.errors import LlamatronError
    from llamatron.models.glam import attention

    assert attention.kernel() in attention.KERNELS
    monkeypatch.setattr(attention, "KERNEL", "cudnn_band")  # removed on 2026-12-05
    with pytest.raises(LlamatronError, match=r"LLAMATRON_GLAM_ATTENTION='cudnn_band': expected one of flex, split"):
        attention.kernel()


@pytest.mark.parametrize("seqlen", [300, 256, 114, 113, 40])  # past the band (113), at it, within it
def test_split_attention_equals_the_materialised_bias_with_every_gradient(seqlen):
    # split_attention.py: the flash kernel beyond the band (here the CPU's flash op), batched products
    # within it, merged by the log-sum-exp; its backward through the same kernels with the merged output.
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket
    from llamatron.models.glam.split_attention import split_attention

    torch.manual_seed(2)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, H, seqlen, D, requires_grad=True) for _ in range(3))
    table = (3 * torch.randn(32, H)).requires_grad_()
    pos = torch.arange(max(seqlen, 256))
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], 32, 128)
    ref = attention.sdpa_attention(q, k, v, table, buckets)
    grad_out = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, table), grad_out)
    got = split_attention(q, k, v, table, buckets[:, 0], attention.band_width(buckets[:, 0], 32))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("q", "k", "v", "table"), torch.autograd.grad(got, (q, k, v, table), grad_out), want):
        # The last bucket's gradient is minus the sum of the others': an absolute error of the largest's order.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(w.abs().max())),
                                   msg=lambda m: f"d{name}: {m}")


def test_split_attention_compiles_whole_and_gives_the_eager_numbers():
    # In a compiled block: the autograd.Function with the flash ops and the window products in one graph.
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket
    from llamatron.models.glam.split_attention import split_attention

    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 8, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    dist_bucket = relative_position_bucket(torch.arange(200), 32, 128)
    band = attention.band_width(dist_bucket, 32)
    compiled = torch.compile(split_attention, fullgraph=True, dynamic=False)
    outs = [f(q, k, v, table, dist_bucket, band) for f in (split_attention, compiled)]
    grads = [torch.autograd.grad(o, (q, k, v, table), torch.ones_like(o)) for o in outs]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels of split attention are CUDA's")
@pytest.mark.parametrize("far, near", [("flash", "efficient"), ("cudnn", "efficient"), ("cudnn", "triton")])
@pytest.mark.parametrize("heads_inside", [False, True])  # q, k, v [B, H, S, D] in memory, or [B, S, H, D] (the model's)
def test_split_attention_in_bf16_on_cuda_is_as_close_to_fp32_as_flex(far, near, heads_inside):
    """CUDA's fused kernels (bf16 only) for the far part: split's output and gradients against the fp32
    materialised bias no further off than flex's (on an H100 with flash: out 1.3e-2 against 7.9e-3,
    dq 2.1e-2 against 1.7e-2, of 3-6)."""
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket
    from llamatron.models.glam.split_attention import split_attention

    torch.manual_seed(0)
    B, H, S, D = 2, 4, 1024, 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda") for _ in range(3))
    table, grad = torch.randn(32, H, device="cuda"), torch.randn(B, H, S, D, device="cuda")
    pos = torch.arange(S, device="cuda")
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], 32, 128)
    band = attention.band_width(buckets[:, 0].cpu(), 32)

    def run(fn, dtype):
        laid = (lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if heads_inside else (lambda t: t)
        xs = [laid(t.to(dtype)).requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_()]
        out = fn(*xs)
        return [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, xs, grad.to(dtype)))]

    want = run(lambda q, k, v, t: attention.sdpa_attention(q, k, v, t, buckets), torch.float32)
    split = run(lambda q, k, v, t: split_attention(q, k, v, t, buckets[:, 0], band, far=far, near=near),
                torch.bfloat16)
    flex = run(lambda q, k, v, t: attention.flex_attention_biased(
        q, k, v, t, buckets[:, 0], band, attention.causal_block_mask(S, q.device)), torch.bfloat16)
    for name, w, a, b in zip(("out", "dq", "dk", "dv", "dtable"), want, split, flex):
        assert float((a - w).abs().max()) <= 3 * float((b - w).abs().max()) + 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels of split attention are CUDA's")
def test_split_ways_compiled_one_after_another_in_one_process_keep_their_gradients():
    """torch caches cuDNN's backward graph by q, k and v's strides alone: split_cudnn and then
    split_triton, both compiled, in one process, in the model's layout (on an H200 on 2026-12-06 a
    slice of the output handed to cuDNN as it was gave split_triton dq and dk 30% off after
    split_cudnn had run: `split_attention._layout_of`)."""
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket
    from llamatron.models.glam.split_attention import split_attention

    torch.manual_seed(0)
    B, H, S, D = 2, 4, 1024, 64
    q, k, v, grad = (torch.randn(B, S, H, D, device="cuda").transpose(1, 2) for _ in range(4))
    table = torch.randn(32, H, device="cuda")
    pos = torch.arange(S, device="cuda")
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], 32, 128)
    band = attention.band_width(buckets[:, 0].cpu(), 32)

    def run(fn, dtype):
        xs = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_()]
        out = fn(*xs)
        return [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, xs, grad.to(dtype)))]

    want = run(lambda q, k, v, t: attention.sdpa_attention(q, k, v, t, buckets), torch.float32)
    for near in ("efficient", "triton"):
        torch._dynamo.reset()
        way = torch.compile(lambda q, k, v, t: split_attention(q, k, v, t, buckets[:, 0], band, far="cudnn", near=near),
                            dynamic=False)
        for name, got, w in zip(("out", "dq", "dk", "dv", "dtable"), run(way, torch.bfloat16), want):
            assert float((got - w).abs().max()) <= 0.03 * float(w.abs().max()), (near, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core band products are CUDA's")
def test_table_grad_from_tensor_core_band_products_equals_fp32_on_cuda(monkeypatch):
    """bf16 q, k, v, output and gradient: the band's products with bf16 operands and fp32 accumulation
    (`BAND_MATMUL = tensor_cores`, the CUDA default) give the table gradient of fp32 operands (the
    products are exact in fp32; only their summation order differs)."""
    from llamatron.models.glam import attention
    from llamatron.models.glam.model import relative_position_bucket

    torch.manual_seed(0)
    B, H, S, D = 2, 12, 1000, 64
    q, k, v, out, grad = (torch.randn(B, H, S, D, device="cuda").to(torch.bfloat16) for _ in range(5))
    lse = torch.randn(B, H, S, device="cuda") + 6.0
    table = torch.randn(32, H, device="cuda")
    dist_bucket = relative_position_bucket(torch.arange(S, device="cuda"), 32, 128)
    band = attention.band_width(dist_bucket.cpu(), 32)
    monkeypatch.setattr(attention, "BAND_MATMUL", "fp32")
    want = attention.table_grad(q, k, v, out, lse, grad, table, dist_bucket, band)
    monkeypatch.setattr(attention, "BAND_MATMUL", "tensor_cores")
    got = attention.table_grad(q, k, v, out, lse, grad, table, dist_bucket, band)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_glam_forward_with_flex_attention_equals_sdpa():
    entry = registry.get("glam-debug")
    model = entry.family.build(entry.args)
    model.init_weights(seed=0)
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.rel_bias.weight.normal_(0, 1.0)  # zero at init: make the bias matter
    model.eval()
    tokens = torch.randint(0, entry.args.vocab_size, (2, 48))
    with torch.no_grad():
        want = model(tokens)
        model.flex_attention = True
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _dense_flex(q, k, v, bias, block_mask):
    """flex_attention's arithmetic with autograd (CPU flex has no backward): causal, bias[h, q - kv]."""
    pos = torch.arange(q.shape[2])
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, (pos[:, None] - pos[None, :]).clamp(min=0)]
    scores = scores.masked_fill(pos[:, None] < pos[None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _glam_with_a_bias():
    """glam-debug with its relative bias tables drawn (zero at init: made to matter), and a batch of
    sequences past the band of 113."""
    entry = registry.get("glam-debug")
    model = entry.family.build(entry.args)
    model.init_weights(seed=0)
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.rel_bias.weight.normal_(0, 1.0)
    tokens, labels = torch.randint(0, entry.args.vocab_size, (2, 2, 130))
    return model, tokens, labels


def _compile_blocks(model):
    import torch._dynamo

    torch._dynamo.reset()
    for block in model.layers.values():
        block.compile(fullgraph=True, backend="aot_eager")


def test_flex_path_gradients_equal_the_sdpa_path(monkeypatch):
    # The CUDA training path's wiring on the CPU: q, k, v gradients from the attention call, the table's
    # from the band (`_TableGrad`), nothing counted twice; eager and as one compiled graph.
    from llamatron.models.glam import attention

    monkeypatch.setattr(attention, "_flex", lambda device: _dense_flex)
    model, tokens, labels = _glam_with_a_bias()
    results = []
    for flex, compiled in ((False, False), (True, False), (True, True)):
        model.flex_attention = flex
        model.zero_grad()
        if compiled:
            _compile_blocks(model)
        model(tokens, labels).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for got in results[1:]:
        for name, want in results[0].items():
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7, msg=name)
    assert results[0]["layers.1.attention.rel_bias.weight"].abs().max() > 1e-4


def test_parameter_counts_of_the_presets():
    def expected(a):
        attention = 4 * a.dim * a.dim + a.rel_pos_buckets * a.n_heads + 2 * a.dim  # + its two norms
        moe = a.n_experts * 2 * a.dim * a.expert_ffn_dim + a.dim * a.n_experts
        dense = 3 * a.dim * a.ffn_dim
        M = a.n_moe_layers
        return a.n_layers * attention + M * moe + (a.n_layers - M) * dense + a.vocab_size * a.dim + a.dim

    counts = {}
    for name in ("glam-126m-64e", "glam-64b-64e"):
        entry = registry.get(name)
        counts[name] = parameter_count(entry.family, entry.args)
        assert counts[name] == expected(entry.args), name
    # The published ~1.9B and ~1.14T (GLaM paper Table 4: 1.9B and 1143B).
    assert counts["glam-126m-64e"] == 1_907_612_928
    assert counts["glam-64b-64e"] == 1_142_741_409_792


def test_flops_count_active_parameters():
    entry = registry.get("glam-126m-64e")
    a = entry.args
    S = 2048
    total = parameter_count(entry.family, a)
    inactive = a.n_moe_layers * (a.n_experts - a.top_k) * 2 * a.dim * a.expert_ffn_dim
    small = a.n_layers * (a.rel_pos_buckets * a.n_heads + 2 * a.dim) + a.dim  # biases and norms: not counted
    active_matmul = total - inactive - small
    assert entry.family.flops_per_token(a, S) == 6 * active_matmul + 12 * a.n_layers * S * a.dim


def test_ep_is_checked_against_the_model(tmp_path):
    base = ["data.mock=true", f"train.out_dir={tmp_path}", "train.device=cpu"]
    with pytest.raises(LlamatronError, match="parallel.ep.*no experts"):
        load_config(None, ["model.size=debug", "parallel.ep=2", "parallel.dp_shard=2", *base])
    with pytest.raises(LlamatronError, match="parallel.ep.*divisible"):
        load_config(None, ["model.size=glam-debug", "parallel.ep=3", "parallel.dp_shard=3", *base])
    with pytest.raises(LlamatronError, match="parallel.pp"):
        load_config(None, ["model.size=glam-debug", "parallel.pp=2", *base])
    # ep takes its ranks from dp_shard: it must divide it (the experts are FSDP-sharded over the rest).
    with pytest.raises(LlamatronError, match="'parallel.ep': must divide the FSDP degree dp_shard 6 "):
        load_config(None, ["model.size=glam-debug", "parallel.ep=4", "parallel.dp_shard=6", *base])
    cfg = load_config(None, ["model.size=glam-debug", "parallel.ep=2", *base])
    with pytest.raises(LlamatronError, match="'parallel.ep': must divide the FSDP degree dp_shard 3 "):
        validate_config(cfg, 3)
    for world, layout in ((4, ["parallel.dp_shard=4"]), (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
                          (8, ["parallel.tp=2", "parallel.dp_shard=4"])):
        validate_config(load_config(None, ["model.size=glam-debug", "parallel.ep=2", "train.micro_batch_size=1", *layout,
                                           *base]), world)


def _pattern_data(prefix, n_docs=64, length=200):
    """Documents that count up by one mod 64 from a random start: learnable from the previous token."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix) as w:
        for _ in range(n_docs):
            w.add_document((rng.integers(0, 64) + np.arange(length)) % 64 + 100)
    return str(prefix)


def _run(out_dir, data, steps, extra=()):
    cfg = load_config(None, ["model.size=glam-debug", "model.vocab_size=128256", f"data.train=[{data}]",
                             f"data.valid={data}", "data.seq_len=32", "train.device=cpu", "train.threads=1",
                             "train.global_batch_size=8", "train.micro_batch_size=4", f"train.steps={steps}",
                             "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1", "optim.schedule_steps=12",
                             "train.log_every=1", "eval.samples=8", "eval.every=100", "checkpoint.every=4",
                             f"train.out_dir={out_dir}", *extra])
    train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r["kind"] == "train"}, [r for r in rows if r["kind"] == "eval"]


def test_glam_debug_trains_logs_router_stats_and_resumes_exactly(tmp_path):
    data = _pattern_data(tmp_path / "data" / "count")
    whole, evals = _run(tmp_path / "whole", data, 8)
    # From ln(128256) = 11.76 (observed 9.35 after 8 steps): the router and experts train along.
    assert evals[0]["val_loss"] > 11 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals
    assert whole[8]["loss"] < whole[1]["loss"] - 1.5
    for r in whole.values():
        assert 0.0 <= r["moe_dropped_fraction"] < 1.0
        assert r["moe_aux_loss"] >= 1.0 - 1e-6  # E^2 mean(f P) >= 1, equality when balanced
        assert r["moe_max_load"] >= 1.0 >= r["moe_min_load"]
    _run(tmp_path / "split", data, 4)
    resumed, _ = _run(tmp_path / "split", data, 8)
    for step in (5, 8):
        assert resumed[step]["loss"] == whole[step]["loss"], step
        assert resumed[step]["grad_norm"] == whole[step]["grad_norm"], step
        assert resumed[step]["moe_aux_loss"] == whole[step]["moe_aux_loss"], step
    # Activation checkpointing reruns each block's forward in backward: the same numbers, and the
    # router statistics are not counted twice.
    ac, _ = _run(tmp_path / "ac", data, 2, ["train.activation_checkpointing=true"])
    for step in (1, 2):
        for key in ("loss", "grad_norm", "moe_aux_loss", "moe_dropped_fraction", "moe_max_load"):
            assert ac[step][key] == pytest.approx(whole[step][key], rel=1e-6), (step, key)
    # The run report draws the router statistics of the runs that log them (two runs overlaid).
    from llamatron.cli import main as cli_main
    from llamatron.report.load import load_run
    from llamatron.report.plots import routing_figure

    page = tmp_path / "report.html"
    assert cli_main(["report", str(tmp_path / "whole"), str(tmp_path / "ac"), "--out", str(page)]) == 0
    assert "id='fig-routing'" in page.read_text()
    assert routing_figure([load_run(tmp_path / "whole")]).startswith(b"\x89PNG")
    from llamatron.report import text_report

    last = whole[8]
    assert (f"aux loss {last['moe_aux_loss']:.3f}, dropped {100 * last['moe_dropped_fraction']:.1f}%"
            in text_report([str(tmp_path / "whole")]))
