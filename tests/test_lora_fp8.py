"""LoRA with `train.fp8`: the frozen base layers' forward and input-gradient GEMMs in FP8 from copies
made once (llamatron/transforms/fp8_frozen.py), no weight-gradient GEMM. On the CPU torch runs the FP8
GEMMs with the same numerics as the GPU (emulated): the tests check the definition, the trainer path,
checkpoints and merging."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from llamatron.config import load_config
from llamatron.errors import LlamatronError
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.train.trainer import train
from llamatron.transforms.fp8_frozen import (FP8FrozenLinear, FP8FrozenWeight, check_lora_fp8, gather_frozen_linears,
                                             quantize_frozen_linears)
from llamatron.transforms.lora import apply_lora, lora_modules, merge_lora, unmerge_lora

from tests.test_finetune import _boolq, _losses, _tokenizer

torch.set_num_threads(1)


def _quantized(t, dtype):
    """t rounded to `dtype` with the tensorwise dynamic scale, back in fp32: what the FP8 GEMM reads."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.abs().amax().float()
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def test_frozen_fp8_linear_is_the_product_of_the_fp8_operands():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=gen) * 0.05).bfloat16()
    x = torch.randn(3, 5, 64, generator=gen).bfloat16().requires_grad_()
    bias = torch.randn(48, generator=gen).bfloat16()
    base = FP8FrozenWeight(w)
    assert base.w8.dtype == torch.float8_e4m3fn and base.w8_t.shape == (64, 48) and not base.state_dict()
    out = base(x, bias)
    ref = (_quantized(x, torch.float8_e4m3fn) @ _quantized(w, torch.float8_e4m3fn).t()).bfloat16() + bias
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    exact = x.float() @ w.float().t() + bias.float()
    assert (out.float() - exact).norm() / exact.norm() < 0.05  # FP8's rounding, not a wrong product
    g = torch.randn(3, 5, 48, generator=gen).bfloat16()
    out.backward(g)
    ref_dx = _quantized(g, torch.float8_e5m2) @ _quantized(w, torch.float8_e4m3fn)
    torch.testing.assert_close(x.grad.float(), ref_dx, rtol=1e-2, atol=1e-2)
    assert x.grad.dtype == torch.bfloat16


def _lora_model():
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=3)
    apply_lora(model, rank=4, alpha=8.0, targets=["attention"])
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
            m.weight.data = m.weight.data.bfloat16()  # lora.base_dtype = auto under bf16 autocast
    return model


def test_every_frozen_linear_but_the_output_gets_fp8_copies_and_merge_refreshes_them():
    model = _lora_model()
    names = quantize_frozen_linears(model, min_features=16)
    assert "layers.0.attention.wq" in names and "layers.0.feed_forward.w1" in names and "output" not in names
    assert isinstance(model.layers["0"].feed_forward.w1, FP8FrozenLinear)  # frozen, no adapter
    assert not any("fp8_base" in k for k in model.state_dict())  # checkpoints see the bf16 weights only
    gen = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05
    tokens = torch.randint(0, 512, (2, 16), generator=gen)
    wq = model.layers["0"].attention.wq
    old = wq.fp8_base.w8.clone()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        adapted = model(tokens)
        merge_lora(model)
        assert not torch.equal(wq.fp8_base.w8, old)  # the merged weight's FP8 copy, not the stale one
        merged = model(tokens)
        unmerge_lora(model)  # (in bf16 not exactly the weight before: rounding)
        assert torch.equal(wq.fp8_base.w8, FP8FrozenWeight(wq.weight).w8)
    assert (merged.float() - adapted.float()).abs().max() < 0.1 * adapted.float().abs().max()


def _cfg(tmp_path, out, steps, extra=()):
    return load_config("llamatron-finetune-test", [
        f"data.tokenizer={_tokenizer(tmp_path)}", f"finetune.data={_boolq(tmp_path / 'boolq.jsonl', repeat=4)}",
        f"train.out_dir={out}", f"train.steps={steps}", "train.precision=bf16", "lora.rank=4", "lora.alpha=8",
        "optim.lr=1e-2", "optim.schedule_steps=6", "checkpoint.every=3", "train.fp8_min_features=16", *extra])


def test_lora_with_fp8_trains_checkpoints_and_resumes(tmp_path):
    """The FP8 run follows the bf16 one within FP8's rounding, keeps no FP8 tensor in its checkpoint,
    and a resume (which makes the FP8 copies again from the loaded weights) continues bit for bit."""
    bf16 = train(_cfg(tmp_path, tmp_path / "bf16", 6), progress=False, log=lambda *a: None)
    logged = []
    fp8 = train(_cfg(tmp_path, tmp_path / "fp8", 6, ["train.fp8=tensorwise"]), progress=False, log=logged.append)
    assert any("frozen linears run their GEMMs in FP8, from FP8 copies made once" in str(line) for line in logged)
    a, b = _losses(bf16.out_dir), _losses(fp8.out_dir)
    assert a != b  # the FP8 path ran
    assert all(abs(a[s] - b[s]) < 0.05 * a[s] for s in a) and b[6] < b[1]
    keys = dcp.FileSystemReader(str(fp8.checkpoint)).read_metadata().state_dict_metadata
    assert not any("fp8_base" in k or k.endswith(".w8") for k in keys)
    resumed = tmp_path / "resumed"
    train(_cfg(tmp_path, resumed, 3, ["train.fp8=tensorwise"]), progress=False, log=lambda *a: None)
    train(_cfg(tmp_path, resumed, 6, ["train.fp8=tensorwise"]), progress=False, log=lambda *a: None)
    assert _losses(resumed) == b
    row = [json.loads(line) for line in open(Path(fp8.out_dir) / "metrics.jsonl") if '"train"' in line][-1]
    assert "mfu_fp8_peak" in row  # an FP8 run's rows are also read against the FP8 peak


@pytest.mark.parametrize("extra, match", [
    (["train.fp8=rowwise"], "train.fp8.*tensorwise recipe only"),
    (["train.fp8=tensorwise", "train.fp8_include_output=true"], "train.fp8_include_output.*not with LoRA"),
    (["train.fp8=tensorwise", "lora.base_dtype=fp32"], "lora.base_dtype.*needs bf16 base weights"),
    (["train.fp8=tensorwise", "train.fp8_fused_swiglu=true"], "train.fp8_fused_swiglu.*not with LoRA"),
])
def test_config_refuses_what_lora_fp8_cannot_run(tmp_path, extra, match):
    with pytest.raises(LlamatronError, match=match):
        load_config("llamatron-finetune-test", ["finetune.data=x.jsonl", "lora.rank=4", "train.precision=bf16", *extra])


def test_lora_fp8_needs_bf16_compute():
    cfg = load_config("llamatron-finetune-test", ["finetune.data=x.jsonl", "lora.rank=4", "train.precision=bf16",
                                                  "train.fp8=tensorwise"])
    check_lora_fp8(cfg.train, cfg.lora, torch.bfloat16)  # one GPU: bf16 frozen weights
    check_lora_fp8(cfg.train, cfg.lora, None, torch.bfloat16)  # FSDP gathering bf16
    with pytest.raises(LlamatronError, match="train.fp8.*bf16 compute"):
        check_lora_fp8(cfg.train, cfg.lora, None)  # fp32 frozen weights, no FSDP
    with pytest.raises(LlamatronError, match="train.fp8.*tensor parallelism"):
        load_config("llamatron-finetune-test", ["finetune.data=x.jsonl", "lora.rank=4", "train.fp8=tensorwise",
                                                "parallel.tp=2"])


def test_under_fsdp_the_frozen_layers_cast_the_gathered_weight_as_the_copies_would_be():
    """FSDP gathers the frozen weights per block: the marked layers cast them at each use, with the
    numbers of the copies made once (the same casts of the same bf16 weight)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=gen) * 0.05).bfloat16()
    copies, gathered = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 48, bias=False)
    for lin in (copies, gathered):
        lin.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    assert quantize_frozen_linears(copies, 16) == [""] and gather_frozen_linears(gathered, 16) == [""]
    assert isinstance(gathered, FP8FrozenLinear) and not list(gathered.buffers())
    x = torch.randn(3, 64, generator=gen).bfloat16()
    outs = []
    for lin in (copies, gathered):
        xi = x.clone().requires_grad_()
        out = lin(xi)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_fp8_frozen_blocks_compile_as_one_graph():
    """The trainer compiles each block with fullgraph: the FP8 autograd function and its buffers trace
    (aot_eager here; inductor on a GPU), with the eager numbers."""
    model = _lora_model()
    quantize_frozen_linears(model, min_features=16)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager = loss_and_grads()
    torch._dynamo.reset()
    for block in model.layers.values():
        block.compile(fullgraph=True, backend="aot_eager")
    compiled = loss_and_grads()
    torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-3, atol=0)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, rtol=0.05, atol=0.05 * e.abs().max().item())


@pytest.mark.slow
def test_fsdp_over_two_ranks_runs_the_frozen_layers_in_fp8(tmp_path):
    """LoRA with train.fp8 under FSDP (2 gloo ranks, bf16 gathers): the frozen layers cast the gathered
    weights at each use, and the run follows the one-process FP8 run (bf16 autocast there, FSDP's bf16
    parameters here: close, not equal) and differs from the FSDP run without FP8."""
    from test_parallel_layouts import _trajectory, torchrun

    common = [f"data.tokenizer={_tokenizer(tmp_path)}", f"finetune.data={_boolq(tmp_path / 'boolq.jsonl', repeat=4)}",
              "train.steps=3", "train.precision=bf16", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2",
              "optim.schedule_steps=6", "train.fp8_min_features=16", "checkpoint.enabled=false", "parallel.dp_shard=2"]
    out = torchrun(2, "llamatron-finetune-test", tmp_path / "fsdp_fp8", *common, "train.fp8=tensorwise")
    assert "frozen linears run their GEMMs in FP8, cast at each use" in out
    torchrun(2, "llamatron-finetune-test", tmp_path / "fsdp_bf16", *common)
    one = train(_cfg(tmp_path, tmp_path / "one", 3, ["train.fp8=tensorwise", "checkpoint.enabled=false"]),
                progress=False, log=lambda *a: None)
    fp8, bf16, ref = (_trajectory(d) for d in (tmp_path / "fsdp_fp8", tmp_path / "fsdp_bf16", one.out_dir))
    for step in (1, 2, 3):
        assert fp8[("train", step)][0] == pytest.approx(ref[("train", step)][0], rel=2e-2), step
    assert [fp8[("train", s)] for s in (1, 2, 3)] != [bf16[("train", s)] for s in (1, 2, 3)]


def test_scoring_in_fp8_returns_compiled_blocks_to_eager_and_scores_without_autograd():
    """quantize_for_scoring on a model whose blocks were compiled for scoring: the compiled code (which
    may keep running the replaced layers) is dropped, so the next compile traces the FP8 layers; under
    no_grad an FP8 copy gives the forward GEMM alone, equal to the autograd path's output."""
    from llamatron.transforms.compile import compile_for_eval
    from llamatron.transforms.fp8_frozen import quantize_for_scoring

    model = Transformer(SIZES["debug"]).bfloat16()
    model.init_weights(seed=3)
    assert compile_for_eval(model) == len(model.layers)
    converted = quantize_for_scoring(model, 16)
    assert converted and all(b._compiled_call_impl is None for b in model.layers.values())
    assert compile_for_eval(model) == len(model.layers)  # compiled afresh on the next scoring
    base = model.get_submodule(converted[0]).fp8_base
    x = torch.randn(2, 3, base.w8.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        plain = base(x)
    assert torch.equal(plain, base(x.requires_grad_()).detach())


def test_rowwise_scoring_weight_is_the_product_of_per_row_fp8_operands():
    """FP8 scoring's default recipe: E4M3 with a scale per input row (token) and per weight row (output
    feature); closer to the exact product than one scale per tensor when rows differ in magnitude."""
    from llamatron.transforms.fp8_frozen import FP8RowwiseScoringWeight, quantize_for_scoring

    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 64, generator=gen) * torch.logspace(-2, 0, 48).unsqueeze(1)).bfloat16()
    x = (torch.randn(3, 5, 64, generator=gen) * torch.logspace(-1, 1, 5).view(1, 5, 1)).bfloat16()
    base = FP8RowwiseScoringWeight(w)
    assert base.w8.dtype == torch.float8_e4m3fn and base.w_inv.shape == (1, 48) and not base.state_dict()
    out = base(x)

    def rowwise(t):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        scale = fmax / t.abs().amax(-1, keepdim=True).float()
        return (t.float() * scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() / scale

    torch.testing.assert_close(out.float(), rowwise(x) @ rowwise(w).t(), rtol=1e-2, atol=1e-3)
    exact = x.float() @ w.float().t()
    tensorwise = FP8FrozenWeight(w)(x).float()
    assert (out.float() - exact).norm() < (tensorwise - exact).norm()
    with pytest.raises(LlamatronError, match="--fp8 'blockwise'"):
        quantize_for_scoring(Transformer(SIZES["debug"]), 16, "blockwise")
