"""FP8 training: configuration, the layers it converts, the error when it cannot run, and the FP8
path itself (torch emulates FP8 GEMMs on the CPU, so the numerics are the GPU's)."""

import dataclasses
import sys

import pytest
import torch

from llamatron.config import Config, load_config, validate_config
from llamatron.errors import LlamatronError
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import ModelArgs, Transformer
from llamatron.transforms.fp8 import apply_fp8, check_fp8

torchao = pytest.importorskip("torchao.float8")


@pytest.mark.parametrize("key,value,message", [
    ("fp8", "e4m3", "train.fp8"),
    ("fp8_min_features", -1, "train.fp8_min_features"),
])
def test_bad_fp8_keys_name_the_key(key, value, message):
    cfg = Config()
    setattr(cfg.train, key, value)
    with pytest.raises(LlamatronError, match=message):
        validate_config(cfg)


def test_fp8_all_gather_needs_tensorwise():
    cfg = Config()
    cfg.train.fp8, cfg.train.fp8_all_gather = "rowwise", True
    with pytest.raises(LlamatronError, match="train.fp8_all_gather.*tensorwise"):
        validate_config(cfg)
    cfg.train.fp8 = "tensorwise"
    cfg.data.mock = True
    validate_config(cfg)


def test_fused_swiglu_needs_tensorwise_without_all_gather():
    cfg = Config()
    cfg.data.mock = True
    cfg.train.fp8_fused_swiglu = True
    for recipe, all_gather in (("none", False), ("rowwise", False), ("tensorwise", True)):
        cfg.train.fp8, cfg.train.fp8_all_gather = recipe, all_gather
        with pytest.raises(LlamatronError, match="train.fp8_fused_swiglu.*tensorwise"):
            validate_config(cfg)
    cfg.train.fp8, cfg.train.fp8_all_gather = "tensorwise", False
    validate_config(cfg)


def test_fp8_with_tensor_parallel_is_refused():
    cfg = Config()
    cfg.train.fp8 = "tensorwise"
    cfg.parallel.tp = 2
    with pytest.raises(LlamatronError, match="train.fp8.*tensor parallel"):
        validate_config(cfg)


def test_8b_converts_every_block_linear_but_not_the_output_layer():
    args = dataclasses.replace(SIZES["llama3.1-8b"], n_layers=2)
    with torch.device("meta"):
        model = Transformer(args)
    converted = apply_fp8(model, "tensorwise")
    per_block = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert sorted(converted) == sorted(f"layers.{i}.{n}" for i in range(2) for n in per_block)
    assert type(model.output) is torch.nn.Linear
    assert all(type(m).__name__ == "Float8Linear" for n, m in model.named_modules() if n in converted)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fast_accumulation_reaches_every_converted_layers_gemms(recipe):
    """train.fp8_fast_accum (a FastAccum) sets which of torchao's three GEMMs accumulate fast, in every
    converted layer; by default the forward's only, as torchao's recipe."""
    from llamatron.config import load_config
    from llamatron.fp8_gemm import FastAccum

    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=512, max_seq_len=64)
    default = FastAccum.of(load_config(None, ["data.mock=true"]).train.fp8_fast_accum)
    assert default == FastAccum() == FastAccum(output=True, grad_input=False, grad_weight=False)
    for fast in (default, FastAccum.of(["grad_input", "grad_weight"])):
        with torch.device("meta"):
            model = Transformer(args)
        converted = apply_fp8(model, recipe, min_features=16, fast_accum=fast)
        assert len(converted) == 7
        for name in converted:
            mm = model.get_submodule(name).linear_mm_config
            assert (mm.output.use_fast_accum, mm.grad_input.use_fast_accum, mm.grad_weight.use_fast_accum) == (
                fast.output, fast.grad_input, fast.grad_weight), name


def test_small_layers_stay_bf16():
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=1024, vocab_size=512, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(args)
    # wk/wv are 256 -> 64 wide: below the threshold; the others are >= 256 on both sides.
    converted = apply_fp8(model, "rowwise", min_features=256)
    assert sorted(converted) == sorted(f"layers.0.{n}" for n in
                                       ["attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                        "feed_forward.w3"])
    assert apply_fp8(Transformer(args), "rowwise", min_features=4096) == []


def test_missing_torchao_gives_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes `import torchao.float8` fail
    with pytest.raises(LlamatronError, match="train.fp8.*torchao") as e:
        check_fp8("tensorwise", torch.device("cpu"))
    assert "\n" not in str(e.value)
    check_fp8("none", torch.device("cpu"))  # nothing asked, nothing checked


def test_old_gpu_gives_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(LlamatronError, match="A100.*8.0"):
        check_fp8("rowwise", torch.device("cuda", 0))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_forward_and_backward_track_bf16(recipe):
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, max_seq_len=64)
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(fp8: bool):
        model = Transformer(args)
        model.init_weights(seed=0)
        if fp8:
            assert apply_fp8(model, recipe, min_features=16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_bf16, grads_bf16 = loss_and_grads(False)
    loss_fp8, grads_fp8 = loss_and_grads(True)
    assert loss_fp8 != loss_bf16  # FP8 GEMMs really ran
    assert abs(loss_fp8 - loss_bf16) / loss_bf16 < 0.01
    for name, g in grads_bf16.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads_fp8[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def _train_losses(tmp_path, name, *extra):
    import json
    import subprocess

    out = tmp_path / name
    cmd = [sys.executable, "-m", "llamatron", "train", "--config", "demo", *extra]
    for o in ("data.mock=true", "model.size=debug", "train.fp8=tensorwise", "train.fp8_min_features=16",
              "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=1", "train.log_every=1",
              "eval.samples=0", "eval.at_start=false", "checkpoint.enabled=false", f"train.out_dir={out}"):
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, start_new_session=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_fp8_composes_with_fsdp_all_gather_and_checkpointing(tmp_path):
    """FP8 under FSDP2 over 2 gloo ranks, gathering FP8 weights, with activation checkpointing: the
    same losses and gradient norms as one process with FP8 alone. FP8 all-gather keeps the output layer
    in bf16 (the fused loss needs its gathered weight in bf16); without it the default runs the output
    layer in FP8 under FSDP too, as in one process."""
    blocks = _train_losses(tmp_path, "single", "--set", "train.fp8_include_output=false")
    fsdp = _train_losses(tmp_path, "fsdp", "--nproc-per-node", "2", "--set", "train.fp8_all_gather=true",
                         "--set", "train.activation_checkpointing=true")
    everywhere = _train_losses(tmp_path, "single_all")
    fsdp_everywhere = _train_losses(tmp_path, "fsdp_all", "--nproc-per-node", "2")
    assert len(blocks) == len(fsdp) == len(everywhere) == len(fsdp_everywhere) == 3
    assert everywhere != blocks  # the default's output layer in FP8
    for one, two in ((blocks, fsdp), (everywhere, fsdp_everywhere)):
        for (l1, g1), (l2, g2) in zip(one, two):
            assert l2 == pytest.approx(l1, rel=1e-4)
            assert g2 == pytest.approx(g1, rel=1e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp8_fused_cross_entropy_tracks_the_exact_one(device, monkeypatch):
    """Three chunks: a weight-gradient GEMM over two (loss.FP8_WGRAD_CHUNKS) and one over the last, added.
    On CUDA (compiled casts and transposes, llamatron/loss_kernels.py's loss) as on the CPU (eager)."""
    from llamatron import loss
    from llamatron.loss import linear_cross_entropy

    monkeypatch.setattr(loss, "FP8_WGRAD_CHUNKS", 2)

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(96, 128, generator=g).to(device).requires_grad_()
    w = (0.05 * torch.randn(512, 128, generator=g)).to(device).requires_grad_()
    labels = torch.randint(0, 512, (96,), generator=g).to(device)
    exact = linear_cross_entropy(h, w, labels)
    exact.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fp8 = linear_cross_entropy(h, w, labels, chunk_size=32, fp8=True)
    fp8.backward()
    assert fp8.item() != exact.item()
    assert fp8.item() == pytest.approx(exact.item(), rel=1e-3)
    cos = torch.nn.functional.cosine_similarity
    assert cos(gh.flatten(), h.grad.flatten(), dim=0) > 0.999
    assert cos(gw.flatten(), w.grad.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("gemms", [["output"], ["output", "grad_input"], ["grad_weight"], []])
def test_fp8_loss_fast_accumulates_the_gemms_it_is_told(monkeypatch, gemms):
    """fp8=True: the logits' GEMM with the tensor cores' fast accumulation (the default since its 2,000-step
    convergence check, docs/performance.md), the two gradient GEMMs without, as torchao's recipe has it; a
    FastAccum (train.fp8_fast_accum) names others."""
    from llamatron import loss
    from llamatron.fp8_gemm import FastAccum

    calls, real = [], loss.fp8_mm

    def fp8_mm(a, a_inv, b, b_inv, out_dtype, fast_accum=False):
        calls.append((out_dtype, fast_accum))
        return real(a, a_inv, b, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(loss, "fp8_mm", fp8_mm)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 128, generator=g).requires_grad_()
    w = (0.05 * torch.randn(256, 128, generator=g)).requires_grad_()
    fp8 = True if gemms == ["output"] else FastAccum.of(gemms)
    loss.linear_cross_entropy(h, w, torch.randint(0, 256, (64,), generator=g), chunk_size=32, fp8=fp8).backward()
    # Per chunk: logits then the input gradient; one weight-gradient GEMM for the group, in fp32.
    f32, out, grad_in, grad_w = torch.float32, "output" in gemms, "grad_input" in gemms, "grad_weight" in gemms
    assert calls == [(f32, out), (f32, grad_in)] * 2 + [(f32, grad_w)]


def test_fp8_output_layer_goes_through_the_fused_loss():
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, max_seq_len=64)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for include_output in (False, True):
        model = Transformer(args)
        model.init_weights(seed=0)
        converted = apply_fp8(model, "tensorwise", min_features=16, include_output=include_output)
        assert ("output" in converted) == include_output
        # The trainer passes what apply_fp8 reports to the fused loss (Layout.fp8_output).
        losses.append(model(tokens[:, :-1], tokens[:, 1:], fp8_loss="output" in converted).item())
    assert losses[0] != losses[1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_the_output_layer_runs_in_fp8_by_default_where_the_loss_is_fused():
    """train.fp8_include_output unset: on for tensorwise with the fused loss (no tp or pp), off for
    rowwise, pipelines, the plain loss, FP8 all-gather and LoRA; an explicit value wins."""
    from llamatron.config import TrainConfig
    from llamatron.transforms.fp8 import fp8_output

    tw = TrainConfig(fp8="tensorwise")
    assert fp8_output(tw, 1, 1, lora=False)
    assert not fp8_output(tw, 1, 2, lora=False) and not fp8_output(tw, 2, 1, lora=False)
    assert not fp8_output(tw, 1, 1, lora=True) and not fp8_output(TrainConfig(), 1, 1, lora=False)
    assert not fp8_output(TrainConfig(fp8="rowwise"), 1, 1, lora=False)
    assert not fp8_output(TrainConfig(fp8="tensorwise", fused_cross_entropy=False), 1, 1, lora=False)
    assert not fp8_output(TrainConfig(fp8="tensorwise", fp8_all_gather=True), 1, 1, lora=False)
    assert not fp8_output(TrainConfig(fp8="tensorwise", fp8_include_output=False), 1, 1, lora=False)
    assert fp8_output(TrainConfig(fp8="rowwise", fp8_include_output=True), 1, 2, lora=False)
    with pytest.raises(LlamatronError, match="train.fp8_include_output.*fp8_all_gather"):
        load_config("demo", ["train.fp8=tensorwise", "train.fp8_all_gather=true", "train.fp8_include_output=true"])
