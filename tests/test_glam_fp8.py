"""FP8 experts (issue 21, item 4): the padding and layouts handed to torchao's FP8 grouped GEMM, the
CPU emulation of its rounding, the transform's width rule, and a whole GLaM forward and backward
with FP8 linears and experts. torchao's CUDA kernel itself is checked on H100-class GPUs only."""

import dataclasses

import pytest
import torch

from llamatron.models import registry
from llamatron.models.glam import experts as ex

torch.set_num_threads(1)
COUNTS = [5, 0, 3, 17, 1, 2]  # an empty expert, and one with more than a tile of 16 rows


def _exact_grouped_mm(calls):
    """torchao's contract checked, then plain fp32 per-group matmuls: the plumbing alone."""

    def mm(a, b_t, offs):
        ex.check_fp8_grouped_operands(a, b_t, offs)
        bounds = offs.tolist()
        assert all(b % 16 == 0 for b in bounds), bounds
        calls.append(bounds)
        starts = [0, *bounds[:-1]]
        out = torch.cat([a[s:e] @ b_t[g] for g, (s, e) in enumerate(zip(starts, bounds))])
        return torch.cat([out, out.new_zeros(a.shape[0] - bounds[-1], b_t.shape[2])])

    return mm


def _weights(k=32, n=48, E=len(COUNTS)):
    torch.manual_seed(0)
    return torch.randn(E, k, n) * 0.1


def _run(fn, x, w):
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fn(xg, wg)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), xg.grad, wg.grad


def test_padded_groups_and_column_major_weights_change_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(ex, "_fp8_grouped_mm", _exact_grouped_mm(calls))
    w, counts = _weights(), torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 32)
    got = _run(lambda a, b: ex.fp8_grouped_matmul(a, b, counts), x, w)
    want = _run(lambda a, b: ex.grouped_matmul(a, b, counts, grouped=False), x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Each expert's rows start at a multiple of 16: 5 -> 16, 0 -> 0, 3 -> 16, 17 -> 32, 1 -> 16, 2 -> 16.
    assert calls[0] == [16, 16, 32, 64, 80, 96]


@pytest.mark.parametrize("rows", [12, 16])
def test_capacity_buffer_through_the_grouped_gemm_equals_bmm(monkeypatch, rows):
    calls = []
    monkeypatch.setattr(ex, "_fp8_grouped_mm", _exact_grouped_mm(calls))
    w = _weights()
    x = torch.randn(len(COUNTS), rows, 32)
    got = _run(ex.fp8_batched_matmul, x, w)
    want = _run(torch.bmm, x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got[0].shape == (len(COUNTS), rows, 48) and got[0].is_contiguous()
    assert calls[0] == [16 * (g + 1) for g in range(len(COUNTS))]  # 12 rows padded to 16; 16 kept


def test_emulated_fp8_rounds_like_e4m3_and_trains_like_bf16():
    # The CPU stand-in for torchao's kernel: its outputs are E4M3-rounded (not the fp32 product,
    # within E4M3's relative rounding of 2^-4 per operand), and gradients pass straight through.
    experts = ex.GroupedExperts(len(COUNTS), 32, 48)
    with torch.no_grad():
        experts.w1.normal_(0, 0.1)
        experts.w2.normal_(0, 0.1)
    counts, x = torch.tensor(COUNTS), torch.randn(sum(COUNTS), 32)
    results = []
    for fp8 in (False, True):
        experts.fp8_grouped_mm = fp8
        experts.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = experts(xg, counts, grouped=False)
        y.float().pow(2).sum().backward()
        results.append((y.detach().float(), xg.grad.float(), experts.w1.grad.clone(), experts.w2.grad.clone()))
    assert results[1][0].dtype == torch.float32
    (y32, *g32), (y8, *g8) = results
    error = ((y8 - y32).norm() / y32.norm()).item()
    assert 1e-3 < error < 0.08, error
    for a, b in zip(g32, g8):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_emulation_refuses_what_torchao_refuses():
    w = _weights()
    a = torch.zeros(32, 32)
    offs = torch.tensor([16, 16, 16, 32, 32, 32], dtype=torch.int32)
    ex._emulated_fp8_grouped_mm(a, ex.column_major(w, torch.float32), offs, torch.bfloat16)
    with pytest.raises(ValueError, match="column-major"):
        ex._emulated_fp8_grouped_mm(a, w, offs, torch.bfloat16)  # row-major weights
    with pytest.raises(ValueError, match="multiple of 16"):
        ex._emulated_fp8_grouped_mm(a, ex.column_major(w, torch.float32), offs - 8, torch.bfloat16)
    with pytest.raises(ValueError, match="int32"):
        ex._emulated_fp8_grouped_mm(a, ex.column_major(w, torch.float32), offs.long(), torch.bfloat16)


def _glam(**overrides):
    entry = registry.get("glam-debug")
    args = dataclasses.replace(entry.args, **overrides)
    model = entry.family.build(args)
    model.init_weights(seed=0)
    return model, args


def test_fp8_transform_turns_on_experts_by_the_width_rule():
    pytest.importorskip("torchao.float8")
    from llamatron.transforms.fp8 import apply_fp8

    model, args = _glam()  # experts: d 64, hidden 64
    names = apply_fp8(model, "tensorwise", min_features=64)
    experts = [n for n, m in model.named_modules() if isinstance(m, ex.GroupedExperts)]
    assert experts and set(experts) <= set(names)
    assert all(m.fp8_grouped_mm for m in model.modules() if isinstance(m, ex.GroupedExperts))
    model, _ = _glam()
    assert not set(experts) & set(apply_fp8(model, "tensorwise", min_features=128))  # narrower than the rule
    model, _ = _glam()
    assert not set(experts) & set(apply_fp8(model, "rowwise", min_features=16, experts=False))
    assert not any(m.fp8_grouped_mm for m in model.modules() if isinstance(m, ex.GroupedExperts))


@pytest.mark.parametrize("capacity_factor", [2.0, 0.0])
def test_glam_with_fp8_linears_and_experts_tracks_bf16(capacity_factor):
    # The whole model, capacity (static buffer) and dropless (sorted rows) routing, under bf16
    # autocast: FP8 linears (torchao's CPU emulation) and FP8 experts (ours) against BF16.
    pytest.importorskip("torchao.float8")
    from llamatron.transforms.fp8 import apply_fp8

    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for fp8 in (False, True):
        model, _ = _glam(capacity_factor=capacity_factor)
        if fp8:
            assert apply_fp8(model, "tensorwise", min_features=64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([model.layers["0"].feed_forward.experts.w1.grad.flatten(),
                                model.layers["0"].feed_forward.experts.w2.grad.flatten()]))
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], losses
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torchao's FP8 grouped GEMM needs an H100-class GPU")
def test_torchao_fp8_grouped_gemm_on_the_gpu():
    pytest.importorskip("torchao.prototype.moe_training")
    torch.manual_seed(0)
    counts = torch.tensor([300, 0, 45, 1000, 17, 160], device="cuda")
    x = torch.randn(int(counts.sum()), 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), 768, 3072, device="cuda") * 0.02
    got = _run(lambda a, b: ex.fp8_grouped_matmul(a, b, counts), x, w)
    ref = _run(lambda a, b: ex.grouped_matmul(a, b.to(torch.bfloat16), counts), x, w)
    for a, b in zip(got, ref):  # output, input gradient, weight gradient: FP8's rounding, no more
        error = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert error < 0.08, error


def test_capacity_block_with_fp8_experts_stays_one_compiled_graph():
    # The static path's FP8 experts (padding, layouts, the CPU emulation) trace without a break.
    model, _ = _glam()
    block, buckets = model.layers["0"], model.rel_buckets
    block.feed_forward.experts.fp8_grouped_mm = True
    x = torch.randn(2, 32, model.args.dim)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad()
        xg = x.clone().requires_grad_(True)
        fn(xg, buckets).float().pow(2).sum().backward()
        results.append([xg.grad] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_fp8_experts_on_a_gpu_without_fp8_grouped_gemms_is_one_line(monkeypatch):
    """torchao's FP8 grouped GEMM needs compute capability 9.0 (FP8 linears run from 8.9): the trainer
    says so at start, naming the key that keeps the experts in BF16; nothing to say when no expert
    passes the width rule or FP8 experts are off."""
    from llamatron.config import TrainConfig
    from llamatron.errors import LlamatronError
    from llamatron.transforms.fp8 import check_fp8_experts

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    args, gpu = registry.get("glam-126m-64e").args, torch.device("cuda")
    train = TrainConfig(fp8="tensorwise", fp8_min_features=768)
    with pytest.raises(LlamatronError, match=r"'train.fp8_experts'.*9.0 or newer; NVIDIA L40S has 8.9"):
        check_fp8_experts(train, args, gpu)
    check_fp8_experts(dataclasses.replace(train, fp8_min_features=1024), args, gpu)  # 768 wide: none convert
    check_fp8_experts(dataclasses.replace(train, fp8_experts=False), args, gpu)
    check_fp8_experts(train, registry.get("debug").args, gpu)  # a dense model: no experts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_experts(train, args, gpu)
