"""A second model family added from outside llamatron: a 2-layer attention-only transformer defined in
this file, registered through `llamatron.models.registry.register`, trains, checkpoints and resumes
through the normal trainer. Nothing in llamatron names it: this is the test that adding a family
needs its files and a registry entry only (issue 16)."""

import dataclasses
import json
import math
import zlib

import pytest
import torch
from torch import nn

from llamatron.config import load_config
from llamatron.errors import LlamatronError
from llamatron.models import registry
from llamatron.models.family import Family
from llamatron.train.trainer import train


@dataclasses.dataclass(frozen=True)
class ToyArgs:
    n_layers: int = 2
    dim: int = 32
    n_heads: int = 2
    vocab_size: int = 512
    max_seq_len: int = 64
    init_std: float = 0.02


class ToyBlock(nn.Module):
    """Pre-norm causal self-attention and nothing else (no MLP)."""

    def __init__(self, args: ToyArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.norm = nn.LayerNorm(args.dim)
        self.qkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.proj = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, s, d))


class ToyModel(nn.Module):
    first_stage = ("embed",)
    last_stage = ("norm", "head")

    def __init__(self, args: ToyArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): ToyBlock(args) for i in range(args.n_layers)})
        self.norm = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def initial_value(self, name, shape, seed):
        if len(shape) == 1:
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
        return torch.empty(shape).normal_(0.0, self.args.init_std, generator=gen)

    def init_buffers(self):
        pass

    def sequence_buffers(self):
        return []

    def forward(self, tokens, labels=None, fp8_loss=False):
        h = self.embed(tokens) if self.embed is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        if self.head is None:
            return h
        logits = self.head(self.norm(h))
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _validate(args):
    if args.dim % args.n_heads:
        raise LlamatronError(f"config key 'model.n_heads': dim {args.dim} must be divisible by n_heads {args.n_heads}")


def _tensor_parallel(model, mesh):
    raise LlamatronError("the toy family has no tensor-parallel plan")


TOY = Family(
    name="toy",
    args_type=ToyArgs,
    model_type=ToyModel,
    flops_per_token=lambda a, seq: 6 * (a.n_layers * 4 * a.dim**2 + a.dim * a.vocab_size) + 6 * a.n_layers * a.dim * seq,
    validate=_validate,
    tp_divisible=lambda a: {"n_heads": a.n_heads, "vocab_size": a.vocab_size},
    tensor_parallel=_tensor_parallel,
    activation_bytes_per_token=lambda a, r, c, saving=None: a.dim * (r + 4 * c),
)


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    registry.register("toy-test", TOY, ToyArgs())
    yield
    registry.unregister("toy-test")


def _run(out_dir, steps, extra=()):
    cfg = load_config(None, ["model.size=toy-test", "data.mock=true", "data.seq_len=32", "train.device=cpu",
                             "train.threads=1", "train.global_batch_size=4", "train.micro_batch_size=2",
                             f"train.steps={steps}", "optim.schedule_steps=6", "optim.warmup_steps=1",
                             "train.log_every=1", "eval.samples=4", "eval.every=3", "checkpoint.every=2",
                             f"train.out_dir={out_dir}", *extra])
    train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r["kind"] == "train"}, [r for r in rows if r["kind"] == "eval"]


def test_toy_family_trains_checkpoints_and_resumes(tmp_path):
    whole, evals = _run(tmp_path / "whole", 6)
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in whole.values())
    # Starts near ln(vocab) (uniform predictions from a small init) and the updates move it.
    assert abs(whole[1]["loss"] - math.log(512)) < 0.1
    assert len({r["loss"] for r in whole.values()}) == 6
    assert evals and all(math.isfinite(e["val_loss"]) for e in evals)
    assert (tmp_path / "whole" / "checkpoints" / "step_00000006" / ".metadata").is_file()

    # Stopped after step 4 (its checkpoint), then resumed to 6: the same losses as the whole run.
    _run(tmp_path / "split", 4)
    resumed, _ = _run(tmp_path / "split", 6)
    for step in (5, 6):
        assert resumed[step]["loss"] == whole[step]["loss"], step
        assert resumed[step]["grad_norm"] == whole[step]["grad_norm"], step


def test_toy_family_checks_its_shapes_through_the_registry(tmp_path):
    with pytest.raises(LlamatronError, match="model.n_heads"):
        load_config(None, ["model.size=toy-test", "model.n_heads=5", "data.mock=true", f"train.out_dir={tmp_path}"])


def test_registering_a_family_keeps_the_built_in_ones():
    # A family registered before the first lookup once hid every built-in size.
    assert registry.get("llama3.1-8b").family.name == "llama"
    assert registry.get("toy-test").family is TOY
