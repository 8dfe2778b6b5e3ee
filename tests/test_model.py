import math

import pytest
import torch
import torch.nn.functional as F

from llamatron.models.llama import SIZES
from llamatron.models import count_parameters
from llamatron.models.llama.model import Transformer, apply_rope, rope_frequencies


@pytest.mark.parametrize(
    "size,expected",
    [("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496), ("llama3.1-405b", 405_853_388_800)],
)
def test_exact_parameter_counts_on_meta(size, expected):
    with torch.device("meta"):
        model = Transformer(SIZES[size])
    assert count_parameters(model) == expected


def test_published_shapes():
    a = SIZES["llama3.1-8b"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert SIZES["llama3.1-70b"].ffn_dim == 28672
    assert SIZES["llama3.1-405b"].ffn_dim == 53248
    assert all(SIZES[s].rope_theta == 500000.0 and SIZES[s].norm_eps == 1e-5 for s in SIZES if not s.startswith("llama2"))
    # LLaMA-2: theta 10,000 without the Llama 3.1 frequency scaling (tests/test_gpt.py counts them).
    assert all(SIZES[s].rope_theta == 10000.0 and SIZES[s].rope_scaling_factor == 0 for s in SIZES if s.startswith("llama2"))


def _scaled_freq_reference(theta=500000.0, head_dim=128):
    """The Llama 3.1 rule written out per frequency, in plain Python floats."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            out.append(f)
        elif wavelen > 8192 / 1:
            out.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - s) * f / 8 + s * f)
    return out


def test_rope_scaling_matches_independent_formula():
    got = rope_frequencies(SIZES["llama3.1-8b"]).double()
    want = torch.tensor(_scaled_freq_reference(), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # All three regimes occur: unchanged, divided by 8, and blended.
    unscaled = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ratio = got / unscaled
    assert (ratio - 1).abs().min() < 1e-6
    assert (ratio - 1 / 8).abs().min() < 1e-6
    assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


def test_rope_interleaved_pairs_match_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    freqs = torch.rand(4)
    angles = torch.outer(torch.arange(5).float(), freqs)
    got = apply_rope(x, angles.cos(), angles.sin())
    xc = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2))
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(got, want)


def _naive_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """An independent, loop-free-of-tricks Llama forward (explicit softmax, explicit GQA mapping)."""
    a = model.args
    h = model.tok_embeddings.weight[tokens]
    T = tokens.shape[1]
    freqs = rope_frequencies(a)
    ang = torch.outer(torch.arange(T).float(), freqs)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]).flatten(-2)

    mask = torch.full((T, T), float("-inf")).triu(1)
    for layer in model.layers.values():
        at = layer.attention
        x = rms(h, layer.attention_norm.weight)
        q = (x @ at.wq.weight.T).view(*x.shape[:2], a.n_heads, a.head_dim)
        k = (x @ at.wk.weight.T).view(*x.shape[:2], a.n_kv_heads, a.head_dim)
        v = (x @ at.wv.weight.T).view(*x.shape[:2], a.n_kv_heads, a.head_dim)
        q, k = rot(q), rot(k)
        heads = []
        for hq in range(a.n_heads):
            hk = hq // (a.n_heads // a.n_kv_heads)
            s = q[:, :, hq] @ k[:, :, hk].transpose(-1, -2) / math.sqrt(a.head_dim) + mask
            heads.append(torch.softmax(s, -1) @ v[:, :, hk])
        h = h + torch.cat(heads, -1) @ at.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, model.norm.weight) @ model.output.weight.T


def test_forward_matches_naive_reference():
    torch.manual_seed(0)
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=0)
    # Non-trivial norm weights so a mistake in their use shows.
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 512, (2, 17))
    torch.testing.assert_close(model(tokens), _naive_forward(model, tokens), rtol=1e-4, atol=1e-5)


def test_causality():
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=1)
    tokens = torch.randint(0, 512, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 512
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_init_is_deterministic_and_scaled():
    a = SIZES["debug"]
    m1, m2 = Transformer(a), Transformer(a)
    m1.init_weights(seed=7)
    m2.init_weights(seed=7)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    with torch.device("meta"):
        big = Transformer(SIZES["tiny"])
    big.to_empty(device="cpu")
    big.init_weights(seed=0)
    std_in = big.layers["0"].attention.wq.weight.std().item()
    std_out = big.layers["0"].feed_forward.w2.weight.std().item()
    assert abs(std_in - 0.02) < 0.002
    assert abs(std_out - 0.02 / math.sqrt(2 * 4)) < 0.001
    assert torch.equal(big.norm.weight, torch.ones_like(big.norm.weight))
