"""FlashAttention 4 as `train.attention_backend = "fa4"`: the config key, the clear error where it
cannot run, and the wiring into torch's FA4 slot (with a stand-in for the flash-attn-4 package,
which needs an H100-class GPU; the kernels themselves are measured by bench/bench_attention.py)."""

import sys
import types

import pytest
import torch

from llamatron import runtime
from llamatron.config import load_config, validate_config
from llamatron.errors import LlamatronError


def test_fa4_is_a_backend_name_and_a_typo_names_them_all():
    cfg = load_config(None, ["model.size=debug", "data.mock=true", "train.attention_backend=fa4"])
    validate_config(cfg, world_size=1)
    assert cfg.train.attention_backend == "fa4"
    with pytest.raises(LlamatronError, match=r"train.attention_backend.*cudnn, flash, fa4.*got 'fa5'"):
        load_config(None, ["model.size=debug", "data.mock=true", "train.attention_backend=fa5"])


def test_fa4_on_a_cpu_is_refused_at_start_with_the_key():
    with pytest.raises(LlamatronError, match=r"config key 'train.attention_backend': fa4 asked for, but"):
        runtime.check_attention_backend("fa4", torch.device("cpu"))
    runtime.check_attention_backend("cudnn", torch.device("cpu"))  # the others are torch's own: nothing to check


@pytest.fixture
def stand_in_fa4(monkeypatch):
    """A flash_attn.cute.interface whose entry points return as flash-attn-4 4.0.0b36's do: the forward
    (out, lse, three auxiliaries), the backward more than the three gradients."""
    calls = []

    def fwd(q, k, v, **kwargs):
        calls.append(("fwd", kwargs))
        return q * 2, q.sum(-1), None, None, None

    def bwd(q, k, v, out, dout, lse, **kwargs):
        calls.append(("bwd", kwargs))
        return dout + 1, k * 3, v * 4, None

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "llamatron.models.fa4_kernels", raising=False)
    return calls


def test_the_kernels_module_returns_what_torchs_slot_unpacks(stand_in_fa4):
    from llamatron.models import fa4_kernels

    q, k, v = torch.ones(1, 4, 2, 8), torch.ones(1, 4, 1, 8), torch.full((1, 4, 1, 8), 2.0)
    out, lse = fa4_kernels._flash_attn_fwd(q, k, v, causal=True, softmax_scale=0.5)
    assert torch.equal(out, q * 2) and torch.equal(lse, q.sum(-1))
    dq, dk, dv = fa4_kernels._flash_attn_bwd(q, k, v, out, q, lse, causal=True)
    assert torch.equal(dq, q + 1) and torch.equal(dk, k * 3) and torch.equal(dv, v * 4)
    assert stand_in_fa4 == [("fwd", {"causal": True, "softmax_scale": 0.5}), ("bwd", {"causal": True})]


@pytest.mark.skipif(not hasattr(torch.nn.attention, "current_flash_attention_impl"),
                    reason="this torch has no flash attention registry")
def test_activating_fa4_puts_llamatrons_kernels_module_in_torchs_slot(stand_in_fa4):
    from torch.nn import attention

    try:
        runtime.activate_fa4()
        assert attention.current_flash_attention_impl() == runtime.FA4_IMPL
        runtime.activate_fa4()  # a second step: already active, nothing registered again
        assert attention.current_flash_attention_impl() == runtime.FA4_IMPL
        from torch.nn.attention import _fa4

        assert _fa4._FA4_MODULE_PATH == "llamatron.models.fa4_kernels"
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
