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
