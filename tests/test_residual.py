"""The residual stream in bf16 under autocast (`train.bf16_residual`, llamatron/transforms/residual.py)."""

import pytest
import torch

from llamatron.models import registry
from llamatron.transforms.residual import apply_bf16_residual


def _model(size: str, seed: int = 0):
    entry = registry.entries()[size]
    torch.manual_seed(seed)
    model = entry.family.build(entry.args)
    model.init_weights(seed)
    return model, entry.args


def _block_input_dtypes(model, tokens, labels, autocast: bool):
    """The dtype of the hidden state each block receives, and the loss."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for block in model.layers.values()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens, labels)
    for h in hooks:
        h.remove()
    return seen, loss


@pytest.mark.parametrize("size", ["debug", "gpt-debug", "glam-debug"])
def test_blocks_add_in_bf16_and_the_loss_stays_close(size):
    model, args = _model(size)
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, args.vocab_size, (2, 32), generator=g) for _ in range(2))
    fp32_stream, want = _block_input_dtypes(model, tokens, labels, autocast=True)
    assert set(fp32_stream) == {torch.float32}  # what autocast over fp32 weights gives without the transform
    names = apply_bf16_residual(model)
    assert names == [*type(model).first_stage, *(f"layers.{i}" for i in model.layers)]
    bf16_stream, got = _block_input_dtypes(model, tokens, labels, autocast=True)
    assert bf16_stream == [torch.bfloat16] * len(model.layers)
    assert got.dtype == torch.float32 and got.dim() == 0  # GLaM's tied embedding also unembeds: its loss untouched
    assert not torch.equal(got, want) and torch.allclose(got, want, rtol=2e-2)
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_without_autocast_nothing_changes():
    model, args = _model("debug")
    tokens, labels = (torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    _, want = _block_input_dtypes(model, tokens, labels, autocast=False)
    apply_bf16_residual(model)
    dtypes, got = _block_input_dtypes(model, tokens, labels, autocast=False)
    assert set(dtypes) == {torch.float32} and torch.equal(got, want)
