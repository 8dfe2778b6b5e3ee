import torch
import torch.nn.functional as F

from llamatron.loss import linear_cross_entropy
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer


def test_fused_loss_and_gradients_match_plain_path():
    torch.manual_seed(0)
    h = torch.randn(2, 150, 64, requires_grad=True)
    w = torch.randn(1000, 64, requires_grad=True)
    lab = torch.randint(0, 1000, (2, 150))
    fused = linear_cross_entropy(h, w, lab, chunk_size=64)  # several chunks, the last one partial
    (3.0 * fused).backward()  # a non-unit upstream gradient must be applied
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = F.cross_entropy((h @ w.T).flatten(0, 1), lab.flatten())
    (3.0 * plain).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, lab, chunk_size=7), plain, rtol=1e-5, atol=1e-5)


def test_model_with_labels_equals_logits_path():
    torch.manual_seed(0)
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=3)
    tokens = torch.randint(0, 512, (2, 33))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    ref = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(64, 32)
    w = torch.randn(500, 32) * 0.1
    lab = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, lab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(h @ w.T, lab), rtol=2e-2, atol=2e-2)


def test_several_bf16_chunks_accumulate_the_weight_gradient():
    """The output weight's gradient summed over bf16 chunks: in fp32 inside the GEMM on a GPU that has
    it (`out_dtype`), else a bf16 product per chunk into an fp32 accumulator; close to fp32 either way
    and to each other (the GEMM path only rounds less)."""
    import pytest

    from llamatron import loss as L

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        assert (L._fp32_accumulating_mm(device) is not None) == hasattr(torch.ops.aten.mm, "dtype")
    else:
        assert L._fp32_accumulating_mm(device) is None
    g = torch.Generator().manual_seed(0)
    h = torch.randn(96, 64, generator=g).to(device)
    w = (0.05 * torch.randn(512, 64, generator=g)).to(device)
    lab = torch.randint(0, 512, (96,), generator=g).to(device)
    ref_w = w.clone().requires_grad_()
    F.cross_entropy(h @ ref_w.T, lab).backward()
    grads = []
    for fp32_mm in (True, False):
        if not fp32_mm:
            L._FP32_MM[device] = None  # the accumulator path, on any device
        hh, ww = h.bfloat16().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            linear_cross_entropy(hh, ww.bfloat16(), lab, chunk_size=32).backward()
        grads.append(ww.grad.float())
    L._FP32_MM.pop(device, None)
    for gw in grads:
        torch.testing.assert_close(gw, ref_w.grad, rtol=5e-2, atol=5e-3)
    if device.type != "cuda":
        pytest.skip("the fp32-accumulating GEMM is a CUDA kernel; the CPU checked the accumulator path")
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-3)
