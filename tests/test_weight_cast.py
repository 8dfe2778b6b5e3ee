"""The block linears' bf16 copies made once per step and the fp32 weight gradients accumulated inside
the GEMM (llamatron/transforms/weight_cast.py), against what autocast over fp32 weights computes."""

import pytest
import torch
from torch import nn

from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.runtime import Precision
from llamatron.train.step import train_step
from llamatron.transforms import weight_cast


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(SIZES["debug"])


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, SIZES["debug"].vocab_size, (2, 16), generator=g) for _ in range(2)) for _ in range(n)]


def _grads_after_backward(model, batches, device=torch.device("cpu")):
    """Each parameter's gradient after the micro-batches' backward (clipping off, no update: lr 0)."""
    grads = {}

    class Keep(torch.optim.SGD):
        def step(self, closure=None):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    opt = Keep(model.parameters(), lr=0.0)
    train_step(model, opt, iter(batches), len(batches), lr=0.0, device=device,
               precision=Precision(torch.bfloat16, None), fused_cross_entropy=True)
    return grads


@pytest.mark.parametrize("fuse", [False, True], ids=["cast-once", "cast-once+fused-wgrad"])
def test_gradients_equal_autocasts_over_two_micro_batches(fuse):
    """Two micro-batches under bf16 autocast: every parameter's gradient bit for bit as autocast's; the
    fused layers' gradients are their fp32 buffers (attached after backward), and those are really
    where the accumulation happened."""
    batches = _batches(2)
    want = _grads_after_backward(_model(), batches)
    model = _model()
    names = weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=fuse)
    assert len(names) == 2 * 7 and all(type(model.get_submodule(n)) is weight_cast.CastOnceLinear for n in names)
    got = _grads_after_backward(model, batches)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    wq = model.get_submodule("layers.0.attention.wq")
    assert hasattr(model, "wgrad_buffers") == fuse
    if fuse:
        assert torch.equal(wq.main_grad, want["layers.0.attention.wq.weight"]) and wq.main_grad.abs().sum() > 0


def test_the_copies_follow_the_weights_only_when_refreshed():
    model = _model()
    weight_cast.cast_weights_once([model], torch.bfloat16)
    wq = model.get_submodule("layers.0.attention.wq")
    assert wq.weight_copy.dtype == torch.bfloat16 and torch.equal(wq.weight_copy, wq.weight.to(torch.bfloat16))
    with torch.no_grad():
        wq.weight.add_(1.0)
    assert not torch.equal(wq.weight_copy, wq.weight.to(torch.bfloat16))
    weight_cast.refresh([model])
    assert torch.equal(wq.weight_copy, wq.weight.to(torch.bfloat16))


def test_only_trainable_exact_linears_in_the_blocks_are_converted():
    model = _model()
    model.layers["1"].feed_forward.w2.weight.requires_grad_(False)
    names = weight_cast.cast_weights_once([model], torch.bfloat16)
    assert "layers.1.feed_forward.w2" not in names and len(names) == 13
    assert type(model.output) is nn.Linear  # the output layer: the fused loss keeps its copy (outer_weights.py)


def _family(size: str, seqlen: int = 16):
    """A registry model's builder (the same weights at every call) and two micro-batches of it."""
    from llamatron.models import registry
    from llamatron.parallel.parallelize import materialize

    entry = registry.get(size)

    def build():
        with torch.device("meta"):
            model = entry.family.build(entry.args)
        materialize(model, torch.device("cpu"), seed=0)
        return model

    g = torch.Generator().manual_seed(1)
    return build, [tuple(torch.randint(0, entry.args.vocab_size, (2, seqlen), generator=g) for _ in range(2))
                   for _ in range(2)]


@pytest.mark.parametrize("size", ["gpt-debug", "glam-debug"])
def test_fused_gradients_of_the_other_families_equal_autocasts(size):
    """GPT (biased linears) and GLaM, whose router reads its weight directly (fp32 logits), not
    through the layer's forward: its gradient comes from autograd and is added to the (empty) fused
    buffer, not lost. (GPT's tied embedding table: tests/test_outer_weights.py.)"""
    build, batches = _family(size)
    want = _grads_after_backward(build(), batches)
    model = build()
    names = weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=True, outer=False)
    assert names and any(n.endswith("feed_forward.router") for n in names) == (size == "glam-debug")
    got = _grads_after_backward(model, batches)
    assert all(want[n].abs().sum() > 0 for n in want if n.endswith(("router.weight", ".bias")))
    for n in want:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("fuse", [False, True], ids=["cast-once", "cast-once+fused-wgrad"])
def test_glam_experts_cast_once_give_autocasts_gradients(fuse):
    """GLaM's experts (cast by hand in every micro-batch, as autocast would) from their bf16 copies, and
    their weight gradients accumulated in fp32 buffers (the capacity path's batched matmuls): two
    micro-batches' gradients as before, within fp32 rounding, the copies following the weights on refresh."""
    build, batches = _family("glam-debug", seqlen=32)
    want = _grads_after_backward(build(), batches)
    m = build()
    names = weight_cast.cast_weights_once([m], torch.bfloat16, fuse_wgrad=fuse)
    experts = [n for n in names if type(m.get_submodule(n)) is weight_cast.CastOnceExperts]
    assert len(experts) == sum(b.moe for b in m.layers.values()) > 0
    got = _grads_after_backward(m, batches)
    assert got.keys() == want.keys()
    # Within fp32 rounding: on one CPU bit for bit, on another (an AMD EPYC, 2026-12-07) the fused path's sums
    # over tokens came out in another order for two of the 42 tensors (the embedding table's and layer 2's
    # attention norm's, 1e-7 apart, with and without the outer weights' buffers). A lost or bf16-rounded
    # gradient would be 1e-3 apart and more.
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9, msg=n)
    ex = m.get_submodule(experts[0])
    if fuse:  # the buffers are the gradients, and the accumulation happened there
        assert torch.equal(ex.w1_grad, want[f"{experts[0]}.w1"]) and torch.equal(ex.w2_grad, want[f"{experts[0]}.w2"])
        assert ex.w1_grad.abs().sum() > 0
    with torch.no_grad():
        ex.w1.add_(1.0)
    assert not torch.equal(ex.w1_copy, ex.w1.to(torch.bfloat16))
    weight_cast.refresh([m])
    assert torch.equal(ex.w1_copy, ex.w1.to(torch.bfloat16)) and torch.equal(ex.w2_copy, ex.w2.to(torch.bfloat16))


@pytest.mark.parametrize("cast, fuse, pays, want", [
    (None, None, True, (True, True)), (None, None, False, (False, False)),
    (True, None, False, (True, False)), (True, None, True, (True, True)), (True, False, True, (True, False)),
    (False, None, True, (False, False)), (None, True, False, (True, True)), (None, False, True, (True, False)),
])
def test_what_the_options_and_their_unset_defaults_choose(cast, fuse, pays, want):
    """train.cast_weights_once and gradient_accumulation_fusion: explicit values win; unset, both follow
    the trainer's judgement (`pays`); an explicit fusion implies cast-once."""
    assert weight_cast.wanted(cast, fuse, pays) == want


def test_the_runs_where_the_unset_options_turn_on():
    """weight_cast.pays: one CUDA GPU under bf16 autocast with several micro-batches, and nothing that makes
    the copies cost memory (activation checkpointing) or leaves nothing to cast (LoRA, rowwise FP8)."""
    base = dict(cuda=True, autocast=True, world_size=1, accum=4, activation_checkpointing=False, lora=False, fp8="none")
    assert weight_cast.pays(**base)
    assert weight_cast.pays(**{**base, "fp8": "tensorwise"})
    for change in (dict(cuda=False), dict(autocast=False), dict(world_size=2), dict(accum=1), dict(lora=True),
                   dict(activation_checkpointing=True), dict(fp8="rowwise"), dict(fp8="tensorwise", fp8_all_gather=True)):
        assert not weight_cast.pays(**{**base, **change}), change
