"""band_kernel.py's Triton kernels (split_triton's band) run on the CPU by Triton's interpreter, in a
process of their own (TRITON_INTERPRET is read when triton is imported), against the materialised bias
through SDPA: output and every gradient, fp32. The CUDA test in test_glam.py checks their bf16 numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# (sequence, q/k/v laid out [B, S, H, D], head dim): past the band (113), at it, within it; GLaM 64B's heads
CASES = [(300, False, 16), (256, True, 16), (114, False, 16), (113, True, 16), (40, False, 16), (200, True, 128)]

SCRIPT = r"""
import json, sys, torch
from llamatron.models.glam import attention
from llamatron.models.glam.model import relative_position_bucket
from llamatron.models.glam.split_attention import split_attention

results = []
for seqlen, heads_inside, D in json.loads(sys.argv[1]):
    torch.manual_seed(seqlen)
    B, H = 2, 3
    q, k, v = (torch.randn(B, H, seqlen, D) for _ in range(3))
    if heads_inside:  # [B, S, H, D] in memory, as the model's projections lay them out
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_()
    table = (3 * torch.randn(32, H)).requires_grad_()
    pos = torch.arange(max(seqlen, 256))
    buckets = relative_position_bucket(pos[:, None] - pos[None, :], 32, 128)
    ref = attention.sdpa_attention(q, k, v, table, buckets)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, table), grad)
    got = split_attention(q, k, v, table, buckets[:, 0], attention.band_width(buckets[:, 0], 32), near="triton")
    gots = torch.autograd.grad(got, (q, k, v, table), grad)
    errors = {"out": [float((got - ref).abs().max()), float(ref.abs().max())]}
    for name, a, b in zip(("q", "k", "v", "table"), gots, want):
        errors[name] = [float((a - b).abs().max()), float(b.abs().max())]
    errors["layout"] = list(got.stride())
    results.append(errors)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(CASES, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", CASES, ids=[f"S{s}-D{d}{'-heads-inside' if h else ''}" for s, h, d in CASES])
def test_triton_band_kernels_give_the_materialised_bias_and_every_gradient(interpreted, case):
    errors = interpreted[case]
    for name in ("out", "q", "k", "v", "table"):
        err, scale = errors[name]
        # The table's last bucket is minus the others' sum: an error of the largest gradient's order.
        assert err <= 1e-5 * max(1.0, scale), f"{name}: {err:.2e} of {scale:.2e}"
    seqlen, heads_inside, _ = case
    # The output is written in q's layout (cuDNN's backward and the next GEMM take it as it is).
    assert (errors["layout"][1] < errors["layout"][2]) == heads_inside
