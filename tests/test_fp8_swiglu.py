"""train.fp8_fused_swiglu (llamatron/transforms/fp8_swiglu.py): the SwiGLU feed-forward's gate and up
projections in one FP8 function against torchao's Float8Linear layers, and its kernels
(llamatron/swiglu_kernels.py) under Triton's CPU interpreter against eager autograd's gradients."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamatron.models.llama.model import FeedForward, ModelArgs, Transformer
from llamatron.transforms.fp8 import apply_fp8
from llamatron.transforms.fp8_swiglu import FP8SwiGLU, swiglu_grads

torchao = pytest.importorskip("torchao.float8")


def _ffn_run(base: torch.nn.Module, x: torch.Tensor, fused: bool, compiled: bool = False):
    model = torch.nn.Sequential(copy.deepcopy(base))
    names = apply_fp8(model, "tensorwise", min_features=16, fused_swiglu=fused)
    run = torch.compile(model) if compiled else model
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(xi)
    y.float().pow(2).sum().backward()
    return model, names, y, xi.grad, {n: p.grad for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fused_feed_forward_is_torchaos_recipe():
    """The same E4M3 and E5M2 operands and GEMMs as torchao's three Float8Linear layers: the same output
    and input gradient bit for bit; the gate and up weights' gradients as torchao's before its bf16
    rounding (torchao returns them in the gradient's bf16, cast to fp32 after)."""
    torch.manual_seed(0)
    base = FeedForward(64, 192)
    x = torch.randn(2, 40, 64).bfloat16()  # the bf16 stream (torchao casts only under CUDA's autocast)
    plain, names0, y0, gx0, g0 = _ffn_run(base, x, fused=False)
    fused, names1, y1, gx1, g1 = _ffn_run(base, x, fused=True)
    assert sorted(names0) == sorted(names1) == ["0.w1", "0.w2", "0.w3"]
    assert isinstance(fused[0], FP8SwiGLU) and type(fused[0].w1) is torch.nn.Linear
    assert type(fused[0].w2).__name__ == "Float8Linear"
    assert list(fused.state_dict()) == list(plain.state_dict()) == ["0.w1.weight", "0.w3.weight", "0.w2.weight"]
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    assert torch.equal(g1["0.w2.weight"], g0["0.w2.weight"])
    for name in ("0.w1.weight", "0.w3.weight"):
        assert g1[name].dtype == torch.float32
        assert not torch.equal(g1[name], g0[name])  # not rounded to bf16 on the way
        assert torch.equal(g1[name].bfloat16(), g0[name].bfloat16().float().bfloat16()) or _rel(g1[name], g0[name]) < 4e-3


def test_the_down_projection_gets_h_already_in_fp8():
    """w2 (torchao's Float8Linear) is handed silu(a) * b cast by torchao's own function, so that its backward
    keeps those E4M3 values rather than casting h again (a second amax pass); the same values either way,
    as the test above checks bit for bit."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    model = torch.nn.Sequential(FeedForward(64, 128))
    apply_fp8(model, "tensorwise", min_features=16, fused_swiglu=True)
    seen = []
    model[0].w2.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0])))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8, 64)).float().sum()
    assert seen == [Float8TrainingTensor]


@pytest.mark.parametrize("gemms", [None, ["grad_input"], ["output", "grad_weight"]])
def test_fused_feed_forward_accumulates_as_torchaos_gemms(monkeypatch, gemms):
    """By default fast accumulation where torchao's Float8LinearConfig has it (the forward GEMM), not in the
    four gradient GEMMs (without it in forward the fused step ran 1.3% slower than torchao's on an H100,
    2026-12-07); train.fp8_fast_accum's GEMMs otherwise, as in torchao's layers."""
    from llamatron.fp8_gemm import FastAccum
    from llamatron.transforms import fp8_swiglu
    from torchao.float8 import Float8LinearConfig

    calls, real = [], fp8_swiglu.fp8_mm

    def fp8_mm(a, a_inv, b, b_inv, out_dtype, fast_accum=False):
        calls.append(fast_accum)
        return real(a, a_inv, b, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(fp8_swiglu, "fp8_mm", fp8_mm)
    torch.manual_seed(0)
    fast = FastAccum() if gemms is None else FastAccum.of(gemms)
    model = torch.nn.Sequential(FeedForward(64, 128))
    apply_fp8(model, "tensorwise", min_features=16, fused_swiglu=True, fast_accum=fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8, 64, requires_grad=True)).float().pow(2).sum().backward()
    assert calls == [fast.output] * 2 + [fast.grad_input] * 2 + [fast.grad_weight] * 2
    assert type(model[0].w2).__name__ == "Float8Linear"
    assert model[0].w2.config.gemm_config_grad_input.use_fast_accum == fast.grad_input
    if gemms is None:
        config = Float8LinearConfig()
        assert calls == ([config.gemm_config_output.use_fast_accum] * 2 + [config.gemm_config_grad_input.use_fast_accum] * 2
                         + [config.gemm_config_grad_weight.use_fast_accum] * 2)
        assert calls[0] and not calls[2]


@pytest.mark.parametrize("in_kernel", [True, False])
def test_fused_feed_forward_compiles(in_kernel, monkeypatch):
    """Compiled (inductor, the trainer's way) it runs the custom op in backward and stays within FP8's
    rounding of the eager function (compile's fp32 SwiGLU moves a few E4M3 values by a step), with
    the token-major gradients from the op or from inductor's copies."""
    from llamatron.transforms import fp8_swiglu

    monkeypatch.setattr(fp8_swiglu, "TRANSPOSE_IN_KERNEL", in_kernel)
    torch.manual_seed(1)
    base = FeedForward(64, 128)
    x = torch.randn(2, 32, 64).bfloat16()
    _, _, y0, gx0, g0 = _ffn_run(base, x, fused=True)
    _, _, y1, gx1, g1 = _ffn_run(base, x, fused=True, compiled=True)
    assert _rel(y1, y0) < 0.05 and _rel(gx1, gx0) < 0.1
    for name, g in g0.items():
        assert F.cosine_similarity(g1[name].flatten(), g.flatten(), dim=0) > 0.99, name


def test_model_level_fused_and_torchao_agree():
    """A whole Llama model under apply_fp8 with and without the fused feed-forward: the same loss to
    FP8's precision, gradients pointing the same way, the same parameter names."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=256, max_seq_len=32)
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = Transformer(args)
        model.init_weights(seed=0)
        converted = apply_fp8(model, "tensorwise", min_features=16, fused_swiglu=fused)
        assert ("layers.0.feed_forward.w1" in converted) and ("layers.1.feed_forward.w2" in converted)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l1 - l0) / l0 < 0.01 and g0.keys() == g1.keys()
    for name, g in g0.items():
        assert F.cosine_similarity(g1[name].flatten(), g.flatten(), dim=0) > 0.98, name


def test_only_tensorwise_and_eligible_feed_forwards_are_fused():
    args = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=256, max_seq_len=32)
    for recipe, min_features, all_gather, expected in (("rowwise", 16, False, False), ("tensorwise", 512, False, False),
                                                       ("tensorwise", 16, True, False), ("tensorwise", 16, False, True)):
        with torch.device("meta"):
            model = Transformer(args)
        apply_fp8(model, recipe, min_features=min_features, fsdp_all_gather=all_gather, fused_swiglu=True)
        assert isinstance(model.layers["0"].feed_forward, FP8SwiGLU) == expected, (recipe, min_features, all_gather)


def test_the_reference_gradients_are_eager_autogradss():
    torch.manual_seed(2)
    a = (3 * torch.randn(50, 40)).bfloat16().requires_grad_()
    b = torch.randn(50, 40).bfloat16().requires_grad_()
    g = torch.randn(50, 40).bfloat16()
    (F.silu(a) * b).backward(g)
    da, db = swiglu_grads(g, a.detach(), b.detach())
    assert torch.equal(da, a.grad) and torch.equal(db, b.grad)


KERNEL_SCRIPT = r"""
import json, torch
import torch.nn.functional as F
from llamatron import swiglu_kernels as K
from llamatron.fp8_gemm import to_fp8

# Small tiles and blocks: several programs each way, ragged last ones (100 x 72 is a multiple of neither).
K.TILE_ROWS, K.TILE_COLS, K.AMAX_BLOCK = 16, 32, 256
torch.manual_seed(0)
a = (3 * torch.randn(100, 72)).bfloat16().requires_grad_()
b = torch.randn(100, 72).bfloat16().requires_grad_()
g = (1e-3 * torch.randn(100, 72)).bfloat16()
g[5, :] = 0.0
g[7, :] *= 1e-8  # a billionth of the largest: E5M2's subnormals and zeros after the scale
(F.silu(a) * b).backward(g)
out = {}
for name, grad in (("da", a.grad), ("db", b.grad)):
    ref, inv = to_fp8(grad, torch.float8_e5m2)
    out[name] = (ref, inv)
da8, db8, da8_t, db8_t, scales = K.swiglu_grad_e5m2(g, a.detach(), b.detach())
rows_only = K.swiglu_grad_e5m2(g, a.detach(), b.detach(), False)

def bits(x):
    # -0.0 read as 0.0: Triton 3.6's interpreter (torch 2.11's) drops the sign of zero (the GPU keeps it)
    u = x.contiguous().view(torch.uint8)
    return torch.where(u == 0x80, 0, u)


same = lambda x, y: torch.equal(bits(x), bits(y))


def fp32_agree():
    # fp32 activations (no autocast): no rounding between the steps. The interpreter's exp and the CPU's
    # may differ in the last bit, so the share of equal E5M2 values, not all of them.
    a32 = a.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_()
    (F.silu(a32) * b32).backward(g.float())
    got = K.swiglu_grad_e5m2(g.float(), a32.detach(), b32.detach())
    ref = to_fp8(a32.grad, torch.float8_e5m2)[0]
    return float((bits(got[0]) == bits(ref)).float().mean())
print(json.dumps({
    "da": same(da8, out["da"][0]), "db": same(db8, out["db"][0]),
    "da_t": same(da8_t, out["da"][0].t()), "db_t": same(db8_t, out["db"][0].t()),
    "rows_only": same(rows_only[0], da8) and rows_only[2] is None,
    "scales": torch.allclose(scales.reciprocal(), torch.stack([out["da"][1], out["db"][1]]), rtol=1e-6),
    "subnormals": int(((db8.float().abs() > 0) & (db8.float().abs() < 2.0**-14)).sum()),
    "fp32_agree": fp32_agree(),
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_match_eager_autograd_and_casts_bit_for_bit():
    """Under Triton's CPU interpreter (its own process: TRITON_INTERPRET is read at import): the E5M2
    gradients in both layouts bit for bit those of eager autograd cast with torchao's recipe."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("subnormals") > 0  # the small gradients reach E5M2's subnormals
    assert out.pop("fp32_agree") > 0.995
    assert all(out.values()), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_cuda_track_the_reference():
    """On the GPU (Triton's fast exp): the kernels' E5M2 values against the reference op's, all but a few
    a rounding step apart at most."""
    torch.manual_seed(3)
    a = (3 * torch.randn(1000, 768, device="cuda")).bfloat16()
    b = torch.randn(1000, 768, device="cuda").bfloat16()
    g = torch.randn(1000, 768, device="cuda").bfloat16()
    got = torch.ops.llamatron.swiglu_grad_e5m2(g, a, b, True)
    ref = torch.ops.llamatron.swiglu_grad_e5m2(g.cpu(), a.cpu(), b.cpu(), True)
    for x, y in zip(got[:4], ref[:4]):
        assert (x.cpu().view(torch.uint8) == y.view(torch.uint8)).float().mean() > 0.999
    for x, y in zip(got[4:], ref[4:]):  # the two inverse scales
        assert torch.allclose(x.cpu(), y, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_feed_forward_on_cuda_tracks_torchaos():
    """Compiled on the GPU, as the trainer runs it (the kernels in backward, `_scaled_mm` GEMMs): the
    output and gradients of torchao's three Float8Linear layers, to FP8's rounding."""
    torch.manual_seed(4)
    base = FeedForward(1024, 2048).cuda()
    x = torch.randn(4, 512, 1024, device="cuda").bfloat16()
    runs = []
    for fused in (False, True):
        model = torch.nn.Sequential(copy.deepcopy(base))
        apply_fp8(model, "tensorwise", min_features=16, fused_swiglu=fused)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = torch.compile(model)(xi)
        y.float().pow(2).mean().backward()
        runs.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = runs
    assert _rel(y1, y0) < 0.03 and _rel(gx1, gx0) < 0.06
    for name, g in g0.items():
        assert F.cosine_similarity(g1[name].flatten().float(), g.flatten().float(), dim=0) > 0.995, name
