"""llamatron/loss_kernels.py's Triton kernels (the FP8 loss's gradient on CUDA) run on the CPU by Triton's
interpreter, in a process of their own (TRITON_INTERPRET is read when triton is imported): bit for bit
the eager E5M2 gradient, and its loss; and the FP8 fused loss through them against the eager path.
test_fp8.py's CUDA case runs them compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r"""
import json, torch
from llamatron import loss, loss_kernels

# Small tiles, so that a chunk has several programs both ways and its vocabulary several slices with a
# ragged last one (rows 100 and vocabulary 1000 are multiples of neither).
loss_kernels.TILE_ROWS, loss_kernels.TILE_COLS, loss_kernels.SLICE_COLS = 32, 64, 192
torch.manual_seed(0)
R, V = 100, 1000
logits = (4 * torch.randn(R, V)).bfloat16()
logits[7] = -3.0
logits[7, 11] = 40.0  # a row whose label takes all the mass: p - 1 underflows E5M2's subnormals
logits[8, :500] = -60.0  # far-negative logits: tiny probabilities, E5M2's subnormals and zeros
labels = torch.randint(0, V, (R,))
labels[7] = 11
labels[[3, 50, 99]] = loss.IGNORE_INDEX
ref_loss, ref = loss._loss_and_grad_e5m2_eager(logits, labels)
got_loss, got = loss_kernels.loss_and_grad_e5m2(logits, labels, loss._DLOGITS_SCALE)
out = {
    "loss_rel": abs(float(got_loss) - float(ref_loss)) / float(ref_loss),
    "grad_bits_equal": torch.equal(got.view(torch.uint8), ref.view(torch.uint8)),
    "subnormals": int(((ref.float().abs() > 0) & (ref.float().abs() < 2.0**-14)).sum()),
    "ignored_rows_zero": bool((got[[3, 50, 99]].float() == 0).all()),
}

# The whole FP8 output layer through the kernels (as on CUDA) against the eager path: three chunks,
# a weight-gradient GEMM over two of them and one over the last.
loss.FP8_WGRAD_CHUNKS = 2
g = torch.Generator().manual_seed(1)
h = torch.randn(96, 128, generator=g).requires_grad_()
w = (0.05 * torch.randn(512, 128, generator=g)).requires_grad_()
lab = torch.randint(0, 512, (96,), generator=g)
lab[5] = loss.IGNORE_INDEX
runs = []
for mode in ("eager", "triton"):
    if mode == "triton":  # what llamatron.loss runs on CUDA
        loss._loss_and_grad_fn = lambda device, fp8=False: loss._loss_and_grad_e5m2_triton
    h.grad = w.grad = None
    value = loss.linear_cross_entropy(h, w, lab, chunk_size=32, fp8=True)
    value.backward()
    runs.append((float(value), h.grad.clone(), w.grad.clone()))
(l0, gh0, gw0), (l1, gh1, gw1) = runs
out["layer_loss_rel"] = abs(l0 - l1) / l0
out["layer_grads_equal"] = torch.equal(gh0, gh1) and torch.equal(gw0, gw1)

# The BF16 loss through the same kernels (loss.BF16_LOSS_KERNELS = "triton") against the eager bf16 path.
ref_loss, ref = loss._loss_and_grad_inplace(logits, labels)
got_loss, got = loss_kernels.loss_and_grad(logits, labels)
out["bf16_dtype"] = str(got.dtype)
out["bf16_loss_rel"] = abs(float(got_loss) - float(ref_loss)) / float(ref_loss)
out["bf16_bits_equal"] = float((got.view(torch.int16) == ref.view(torch.int16)).float().mean())
out["bf16_max_rel"] = float(((got.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-30)).max())
out["bf16_ignored_rows_zero"] = bool((got[[3, 50, 99]].float() == 0).all())
print("RESULT " + json.dumps(out))
"""


def test_triton_loss_kernels_give_the_eager_e5m2_gradient_bit_for_bit():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["loss_rel"] < 1e-6 and out["layer_loss_rel"] < 1e-6  # fp32 sums in another order
    assert out["subnormals"] > 0  # the case reaches E5M2's subnormals, which the cast rounds by hand
    for key in ("grad_bits_equal", "ignored_rows_zero", "layer_grads_equal", "bf16_ignored_rows_zero"):
        assert out[key], (key, out)
    # BF16: the interpreter's exp and torch's may part in fp32's last bit, which rounds to another bf16 rarely
    assert out["bf16_dtype"] == "torch.bfloat16" and out["bf16_loss_rel"] < 1e-6
    assert out["bf16_bits_equal"] > 0.99 and out["bf16_max_rel"] <= 2.0**-7, out


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA")
def test_bf16_loss_kernels_on_cuda_as_inductors():
    """On a GPU, compiled: the BF16 loss's gradient from the Triton kernels against inductor's compiled
    loss (the default): the same loss, bf16 gradients within one rounding."""
    import torch

    from llamatron import loss, loss_kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(1024, 32000, generator=g, device="cuda")).bfloat16()
    labels = torch.randint(0, 32000, (1024,), generator=g, device="cuda")
    labels[:7] = loss.IGNORE_INDEX
    want_loss, want = loss._compiled_on_cuda(loss._loss_and_grad, None, logits.device)(logits, labels)
    got_loss, got = loss_kernels.loss_and_grad(logits, labels)
    assert got.dtype == torch.bfloat16 and bool((got[:7] == 0).all())
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=1e-7)


def test_bf16_loss_kernels_are_chosen_for_bf16_logits_on_cuda_only():
    """The Triton kernels make the BF16 loss's gradient on CUDA (the default, loss.BF16_LOSS_KERNELS);
    fp32 logits, whose gradient the kernels would round to bf16, and the CPU keep the other paths."""
    import torch

    from llamatron import loss, loss_kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loss.BF16_LOSS_KERNELS == "triton"
    assert loss._loss_and_grad_fn(cuda, dtype=torch.bfloat16) is loss_kernels.loss_and_grad
    assert loss._loss_and_grad_fn(cuda, dtype=torch.float32) is not loss_kernels.loss_and_grad
    assert loss._loss_and_grad_fn(cpu, dtype=torch.bfloat16) is loss._loss_and_grad_inplace
