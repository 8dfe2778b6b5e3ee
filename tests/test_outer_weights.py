"""train.cast_weights_once's embedding and output layer (llamatron/transforms/outer_weights.py): the output
weight's copies kept from one step to the next, and both gradients added into fp32 buffers, against what
autograd computes over the fp32 weights."""

import pytest
import torch
from torch import nn

from llamatron import loss
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.transforms import outer_weights, weight_cast
from tests.test_weight_cast import _batches, _family, _grads_after_backward


def _model(device="cpu"):
    torch.manual_seed(0)
    return Transformer(SIZES["debug"]).to(device)


def test_gradients_go_into_buffers_and_equal_autograds():
    """Two micro-batches under bf16 autocast with the fused weight gradients: the embedding's and output
    layer's gradients are their fp32 buffers, equal to autograd's (the embedding's rows summed in
    another order: within fp32 rounding; the rest bit for bit), and the embedding's buffer holds only
    the rows of the micro-batches' tokens."""
    batches = _batches(2)
    want = _grads_after_backward(_model(), batches)
    model = _model()
    weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=True)
    assert model.outer_weights == ["tok_embeddings", "output"]
    assert type(model.tok_embeddings) is outer_weights.BufferedGradEmbedding and type(model.output) is nn.Linear
    got = _grads_after_backward(model, batches)
    assert got.keys() == want.keys()
    for n in want:
        if n == "tok_embeddings.weight":
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(got[n], want[n]), n
    table = model.tok_embeddings.main_grad
    used = torch.zeros(table.shape[0], dtype=torch.bool)
    used[torch.cat([tokens.reshape(-1) for tokens, _ in batches])] = True
    assert table[used].abs().sum(1).gt(0).all() and table[~used].eq(0).all()
    assert torch.equal(loss._KEPT[model.output.weight].main_grad, want["output.weight"])


def test_output_copy_made_once_until_the_weights_change():
    """The loss's bf16 copy of the output weight is made at the first micro-batch and reused by the next;
    `refresh` drops it, and the next micro-batch makes it from the new weights."""
    model = _model()
    weight_cast.cast_weights_once([model], torch.bfloat16)
    kept = loss._KEPT[model.output.weight]
    assert kept.main_grad is None and not kept.copies  # no fusion: the copy only, made when first needed
    tokens, labels = _batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, labels).backward()
        first = kept.copies[torch.bfloat16]
        model(tokens, labels).backward()
    assert kept.copies[torch.bfloat16] is first and torch.equal(first, model.output.weight.to(torch.bfloat16))
    with torch.no_grad():
        model.output.weight.mul_(2.0)
    weight_cast.refresh([model])
    assert not kept.copies
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(tokens, labels)  # evaluation takes the copy too
    assert torch.equal(kept.copies[torch.bfloat16], model.output.weight.to(torch.bfloat16))


def test_outer_off_leaves_the_embedding_and_output_layer_alone():
    model = _model()
    weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=True, outer=False)
    assert type(model.tok_embeddings) is nn.Embedding and model.output.weight not in loss._KEPT
    assert not hasattr(model, "outer_weights")


def test_tied_and_other_families():
    """GPT's tied output layer reads the embedding's table: the loss's gradient comes through autograd and
    is added to the buffer (within fp32 rounding of autograd's order); GLaM's tied embedding is neither
    an nn.Embedding nor an nn.Linear and is left alone."""
    for size, names in [("gpt-debug", ["embeddings.tok", "embeddings.pos"]), ("glam-debug", [])]:
        build, batches = _family(size)
        want = _grads_after_backward(build(), batches)
        model = build()
        weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=True)
        assert model.outer_weights == names
        got = _grads_after_backward(model, batches)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9)


def test_fp8_loss_takes_the_kept_e4m3_copies():
    """The FP8 loss's E4M3 weight, its transpose and scale made once and reused; the loss and both
    gradients as with casts in every call."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g)
    w = nn.Parameter(torch.randn(256, 32, generator=g) * 0.1)
    labels = torch.randint(0, 256, (64,), generator=g)

    def run():
        hh = h.clone().requires_grad_()
        value = loss.linear_cross_entropy(hh, w, labels, chunk_size=32, fp8=True)
        value.backward()
        grads = hh.grad, w.grad.clone()
        w.grad = None
        return value, grads

    want = run()
    kept = loss.keep_output_weight(w)
    got = run()
    first = kept.copies["e4m3"]
    assert run()[0] == want[0] and kept.copies["e4m3"] is first
    assert got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_on_cuda_with_and_without_the_outer_weights():
    """On a GPU (fp32 accumulation inside the GEMMs, the embedding's rows by the sorted CUDA kernel): the
    fused gradients with the embedding and output layer in buffers equal those without, the blocks' bit
    for bit, the two outer weights within fp32 rounding."""
    batches = [tuple(t.cuda() for t in b) for b in _batches(2)]
    grads = []
    for outer in (False, True):
        model = _model("cuda")
        weight_cast.cast_weights_once([model], torch.bfloat16, fuse_wgrad=True, outer=outer)
        grads.append(_grads_after_backward(model, batches, torch.device("cuda")))
    for n, want in grads[0].items():
        if n in ("tok_embeddings.weight", "output.weight"):
            torch.testing.assert_close(grads[1][n], want, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(grads[1][n], want), n
