import math

import pytest
import torch

from llamatron.config import OptimConfig
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.train.optim import build_optimizer, lr_at


def test_warmup_then_cosine_values():
    c = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, schedule_steps=14)
    # Warmup: peak * (s + 1) / (W + 1), reaching the peak at s = W.
    assert [lr_at(s, c, 100) for s in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    # Halfway through the cosine: the mean of peak and min.
    assert lr_at(9, c, 100) == pytest.approx(5.5e-4)
    assert lr_at(14, c, 100) == pytest.approx(1e-4)
    assert lr_at(15, c, 100) == 1e-4
    s = 6
    assert lr_at(s, c, 100) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))


def test_schedule_defaults_to_run_length_and_no_warmup():
    c = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, c, 10) == pytest.approx(2.0)
    assert lr_at(5, c, 10) == pytest.approx(1.0)
    assert lr_at(10, c, 10) == pytest.approx(0.0)


def test_no_weight_decay_on_1d_tensors():
    model = Transformer(SIZES["debug"])
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * model.args.n_layers + 1
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5
    assert isinstance(opt, torch.optim.AdamW)


# --------------------------------------------------------------------------------------------------
# optim.name = adamw8bit: torchao's AdamW8bit

def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def test_adamw8bit_takes_adamws_steps_within_its_quantization_and_keeps_8bit_moments():
    pytest.importorskip("torchao.optim")
    from llamatron.train.optim import set_lr

    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 64)  # a 16,384-value weight (8-bit moments) and a 64-value bias (fp32 ones)
    small = torch.nn.Linear(256, 64)
    small.load_state_dict(plain.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta2=0.95)
    reference = build_optimizer(plain, cfg, "cpu")
    opt = build_optimizer(small, OptimConfig(**{**cfg.__dict__, "name": "adamw8bit"}), "cpu")
    assert type(opt).__name__ == "AdamW8bit" and isinstance(reference, torch.optim.AdamW)
    start = plain.weight.detach().clone()
    for step in range(3):
        for model, o in ((plain, reference), (small, opt)):
            _grads(model, step)
            set_lr(o, 1e-2 * (step + 1) / 3)
            o.step()
    moved, error = plain.weight - start, small.weight - plain.weight
    assert moved.abs().mean() > 1e-2  # three steps of ~lr each: the comparison is not between unmoved weights
    # Observed: 0.9% of the move on average, 5% at most; not zero: the moments really are 8-bit.
    assert error.abs().mean() < 0.02 * moved.abs().mean() and 0 < error.abs().max() < 0.1 * moved.abs().max()
    torch.testing.assert_close(small.bias, plain.bias)  # fp32 moments below 4096 values: AdamW itself
    state = opt.state[small.weight]
    codes = {getattr(state["exp_avg"], a).dtype for a in state["exp_avg"].__tensor_flatten__()[0]}
    assert torch.uint8 in codes and state["exp_avg"].shape == small.weight.shape
    assert opt.state[small.bias]["exp_avg"].dtype == torch.float32
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2)  # set_lr filled torchao's tensor


def test_changing_the_optimizer_or_the_8bit_layout_on_resume_is_refused():
    from llamatron.errors import LlamatronError
    from llamatron.train.resume_check import check_optimizer_state

    from llamatron.config import ParallelConfig
    from llamatron.parallel.dims import ParallelDims

    def sharding(world, **keys):
        return ParallelDims.from_config(ParallelConfig(**keys), world).sharding()

    adamw, eight = "optim:\n  name: adamw\n", "optim:\n  name: adamw8bit\n"
    one, fsdp2, tp2 = sharding(1), sharding(2, dp_shard=2), sharding(2, tp=2)
    check_optimizer_state("ckpt", "optim:\n  lr: 0.1\n", adamw, one, tp2)  # a checkpoint without the key: adamw
    check_optimizer_state("ckpt", eight, eight, fsdp2, fsdp2)
    # Pipeline stages and HSDP replicas hold whole shards: the same cut of every tensor.
    assert sharding(4, dp_shard=2, pp=2) == fsdp2 == sharding(4, dp_shard=2, dp_replicate=2)
    with pytest.raises(LlamatronError, match="ckpt: its optimizer state is adamw's, this run's optim.name is adamw8bit"):
        check_optimizer_state("ckpt", adamw, eight, one, one)
    with pytest.raises(LlamatronError, match=r"sharded as when saved \(dp_shard x cp 2, tp 1, ep 1; this run: "
                                             r"dp_shard x cp 1, tp 2, ep 1\).*checkpoint.init_from"):
        check_optimizer_state("ckpt", eight, eight, fsdp2, tp2)


def test_memory_estimate_counts_8bit_moments():
    from llamatron.parallel.memory import estimate_memory

    args = SIZES["llama3.1-8b"]
    plain, eight = (estimate_memory(args, 4096, 1, activation_checkpointing=True, optim=o) for o in ("adamw", "adamw8bit"))
    assert plain.optimizer / 2**30 == pytest.approx(8 * 8.03e9 / 2**30, rel=0.01)
    # Matrices at 2 x (1 + 4/256) bytes; the norms' 2 x 4096 x 32 + 4096 vectors at 8.
    assert eight.optimizer / 2**30 == pytest.approx(2.03125 * 8.03e9 / 2**30, rel=0.01)
    assert plain.total - eight.total == pytest.approx(plain.optimizer - eight.optimizer)


def _two_steps(fused: bool, grad_clip: float):
    """Two train_steps of the debug model with torch's AdamW (fused or not), from the same weights."""
    from llamatron.train.step import train_step

    torch.manual_seed(0)
    model = Transformer(SIZES["debug"])
    opt = build_optimizer(model, OptimConfig(lr=1e-2, fused=fused), "cpu")
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(2):
        tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=g)
        batch = [(tokens[:, :-1], tokens[:, 1:])]
        _, norm = train_step(model, opt, batch, 1, lr=1e-2, device=torch.device("cpu"), grad_clip=grad_clip)
        norms.append(float(norm))
    return model, opt, norms


def test_fused_adamw_takes_the_clip_inside_its_step():
    """With torch's fused AdamW the clip's scaling is its `grad_scale` (no pass of its own): the same
    update as clipping the gradients first (the foreach AdamW, which clips them), within rounding,
    whether the clip is active or not; the scale is gone after the step."""
    from llamatron.train.optim import folds_clip

    for clip in (0.05, 1e6):  # clipping in both steps; never clipping
        plain, _, plain_norms = _two_steps(False, clip)
        fused, opt, fused_norms = _two_steps(True, clip)
        assert folds_clip([opt]) and not hasattr(opt, "grad_scale")
        assert fused_norms == pytest.approx(plain_norms, rel=1e-5)
        assert clip != 0.05 or plain_norms[0] > 0.05 * 10  # the clip is active
        for a, b in zip(plain.parameters(), fused.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    unfused = build_optimizer(plain, OptimConfig(fused=False), "cpu")
    assert not folds_clip([unfused])
