"""Grouped-query attention without expanding K/V (SDPA's enable_gqa) against the expanded path."""

import pytest
import torch

from llamatron.errors import LlamatronError
from llamatron.models import attention_ops
from llamatron.models.attention_ops import gqa_attention, set_gqa_mode


@pytest.fixture(autouse=True)
def restore_mode():
    before = attention_ops._mode
    yield
    attention_ops._mode = before


def _qkv(n_heads=8, n_kv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 16, n_heads, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 16, n_kv, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 16, n_kv, 8, generator=g, requires_grad=True)
    return q, k, v


def _run(mode, q, k, v):
    set_gqa_mode(mode)
    out = gqa_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out, grads


def test_native_equals_expanded_within_fp32_rounding():
    torch.set_num_threads(1)
    q, k, v = _qkv()
    out_e, grads_e = _run("expand", q, k, v)
    out_n, grads_n = _run("native", q, k, v)
    assert out_n.shape == q.shape
    torch.testing.assert_close(out_n, out_e, rtol=1e-5, atol=1e-6)
    for gn, ge in zip(grads_n, grads_e):  # K/V gradients: summed over each group in both paths
        torch.testing.assert_close(gn, ge, rtol=1e-5, atol=1e-5)


def test_head_grouping_is_llamas():
    """Query head h reads KV head h // 4: with KV heads of different values, query heads 0-3 see
    the first, 4-7 the second (an interleaved grouping would mix them)."""
    q, k, v = _qkv(n_kv=2)
    v = torch.stack([torch.zeros(2, 16, 8), torch.ones(2, 16, 8)], dim=2)
    for mode in ("expand", "native"):
        set_gqa_mode(mode)
        out = gqa_attention(q.detach(), k.detach(), v, is_causal=True)
        assert torch.all(out[:, :, :4] == 0) and torch.allclose(out[:, :, 4:], torch.ones(()))


def test_auto_is_expand_on_cpu_and_bad_value_names_variable():
    set_gqa_mode("auto")
    assert not attention_ops.native_gqa(torch.device("cpu"))
    assert attention_ops.native_gqa(torch.device("cuda")) == attention_ops.HAS_ENABLE_GQA
    with pytest.raises(LlamatronError, match=attention_ops.ENV):
        set_gqa_mode("sometimes")


def test_debug_model_loss_native_close_to_expanded():
    from llamatron.models import registry

    torch.set_num_threads(1)
    entry = registry.get("debug")
    assert entry.args.n_kv_heads < entry.args.n_heads  # the grouped path is taken
    torch.manual_seed(0)
    model = entry.family.build(entry.args)
    model.init_weights(seed=0)
    tokens = torch.randint(0, entry.args.vocab_size, (2, 33))
    losses = []
    for mode in ("expand", "native"):
        set_gqa_mode(mode)
        losses.append(model(tokens[:, :-1], tokens[:, 1:]))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
