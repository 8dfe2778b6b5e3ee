"""llamatron/loss_kernels.py's Triton kernels (the FP8 loss's gradient on CUDA) run on the CPU by Triton's
interpreter, in a process of their own (TRITON_INTERPRET is read when triton is imported): bit for bit
the eager E5M2 gradient, in both layouts, and its loss; and the FP8 fused loss through them against the
eager path. test_fp8.py's CUDA case runs them compiled."""

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
gt = torch.full((V, R + 30), 1.0).to(torch.float8_e5m2)
got_loss, got = loss_kernels.loss_and_grad_e5m2(logits, labels, loss._DLOGITS_SCALE, gt, 17)
alone_loss, alone = loss_kernels.loss_and_grad_e5m2(logits, labels, loss._DLOGITS_SCALE)
gt32 = torch.full((V, R), 1.0).to(torch.float8_e5m2)
loss_kernels.loss_and_grad_e5m2(logits, labels, loss._DLOGITS_SCALE, gt32, 0, transpose_fp32=True)
out = {
    "loss_rel": abs(float(got_loss) - float(ref_loss)) / float(ref_loss),
    "grad_bits_equal": torch.equal(got.view(torch.uint8), ref.view(torch.uint8)),
    "subnormals": int(((ref.float().abs() > 0) & (ref.float().abs() < 2.0**-14)).sum()),
    "transposed_bits_equal": torch.equal(gt[:, 17:17 + R].view(torch.uint8), ref.t().view(torch.uint8)),
    "columns_around_untouched": bool((gt[:, :17].float() == 1).all() and (gt[:, 17 + R:].float() == 1).all()),
    "without_transposed_equal": torch.equal(alone.view(torch.uint8), got.view(torch.uint8)) and float(alone_loss) == float(got_loss),
    "ignored_rows_zero": bool((got[[3, 50, 99]].float() == 0).all()),
    "fp32_transposed_bits_equal": torch.equal(gt32.view(torch.uint8), ref.t().contiguous().view(torch.uint8)),
}

# The whole FP8 output layer through the kernels (as on CUDA) against the eager path: three chunks,
# a weight-gradient GEMM over two of them and one over the last.
g = torch.Generator().manual_seed(1)
h = torch.randn(96, 128, generator=g).requires_grad_()
w = (0.05 * torch.randn(512, 128, generator=g)).requires_grad_()
lab = torch.randint(0, 512, (96,), generator=g)
lab[5] = loss.IGNORE_INDEX
runs = []
for mode in ("eager", "triton", "triton-fp32t", "triton-copy"):
    if mode != "eager":
        loss.FP8_LOSS_KERNELS = mode
        loss._fp8_loss_and_grad = lambda device: loss._triton_loss_and_grad
    h.grad = w.grad = None
    value = loss.linear_cross_entropy(h, w, lab, chunk_size=32, fp8=True)
    value.backward()
    runs.append((float(value), h.grad.clone(), w.grad.clone()))
l0, gh0, gw0 = runs[0]
out["layer_loss_rel"] = max(abs(l0 - l) / l0 for l, _, _ in runs[1:])
out["layer_grads_equal"] = all(torch.equal(gh0, gh) and torch.equal(gw0, gw) for _, gh, gw in runs[1:])
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
    for key in ("grad_bits_equal", "transposed_bits_equal", "columns_around_untouched", "without_transposed_equal",
                "ignored_rows_zero", "fp32_transposed_bits_equal", "layer_grads_equal"):
        assert out[key], (key, out)
