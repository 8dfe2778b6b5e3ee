import dataclasses

import pytest
import torch

from llamatron import flops
from llamatron.cli import main
from llamatron.config import LoraConfig
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer


def test_8b_flops_per_token_and_sequence():
    a = SIZES["llama3.1-8b"]
    assert flops.flops_per_token(a, 8192) / 1e9 == pytest.approx(57.91, abs=0.005)
    assert flops.flops_per_sequence(a, 8192) == pytest.approx(4.744e14, rel=1e-4)


def test_worked_examples():
    tps = flops.tokens_per_second(8192, 252, 12.84)
    assert round(tps) == 160_778
    assert round(flops.days_to_train(1e12, 160_778), 2) == 71.99
    # 405B FP8, 576 GPUs, GBS 252, 11.24 s/step. The recipe's "2.17e16 FLOP/sequence" is the formula
    # with 16 KV heads (the MP16 variant): 2.1715e16, which gives its 42.71%. With the 8 KV heads of
    # the released 405B the formula gives 2.1507e16.
    peak = flops.peak_flops("NVIDIA H100 80GB HBM3", "fp8")
    assert peak == 1979e12
    mp16 = dataclasses.replace(SIZES["llama3.1-405b"], n_kv_heads=16)
    per_seq = flops.flops_per_sequence(mp16, 8192)
    assert round(per_seq / 1e16, 2) == 2.17
    assert round(100 * flops.mfu(mp16, 8192, 252, 11.24, 576, peak), 2) == 42.71
    assert round(flops.flops_per_sequence(SIZES["llama3.1-405b"], 8192) / 1e16, 4) == 2.1507


def test_peak_lookup_is_not_fooled_and_unknown_is_unknown():
    assert flops.peak_flops("NVIDIA H200", "bf16") == 989e12
    assert flops.peak_flops("NVIDIA H20", "bf16") == 148e12
    assert flops.peak_flops("cpu", "bf16") is None
    assert flops.mfu(SIZES["tiny"], 256, 8, 1.0, 1, None) is None


def test_flops_cli_reproduces_worked_examples(capsys):
    assert main(["flops", "--model", "llama3.1-8b", "--step-time", "12.84", "--global-batch", "252",
                 "--tokens", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "160,778" in out and "71.99" in out and "57.91 GFLOP" in out
    assert main(["flops", "--model", "llama3.1-405b", "--kv-heads", "16", "--step-time", "11.24",
                 "--global-batch", "252", "--gpus", "576", "--precision", "fp8"]) == 0
    assert "42.71%" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# LoRA steps: 4 FLOPs per frozen matrix weight (forward, input gradient), 6 per adapter weight


def _counted_step(lora_rank: int, seq: int = 32) -> tuple[float, torch.nn.Module]:
    """Matrix-product FLOPs of one forward + backward of the debug model (fused loss), counted by torch.

    SDPA's math backend: its two batched products per head are counted, over the full (masked)
    sequence, the convention of the family formula; the fused kernels are not counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from llamatron.runtime import attention_backend
    from llamatron.transforms.lora import apply_lora

    torch.manual_seed(0)
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=0)
    if lora_rank:
        apply_lora(model, lora_rank, 2.0 * lora_rank)
    tokens, labels = torch.randint(0, 512, (2, seq)), torch.randint(0, 512, (2, seq))
    with attention_backend("math"), FlopCounterMode(display=False) as counter:
        model(tokens, labels).backward()
    return counter.get_total_flops(), model


def test_full_step_formula_is_what_torch_counts():
    counted, _ = _counted_step(0)
    assert counted == flops.flops_per_sequence(SIZES["debug"], 32) * 2


def test_lora_formula_is_what_torch_counts_of_a_lora_step():
    """Frozen base: forward and input gradient; adapters: all three products; the frozen output layer
    inside the fused loss: no weight gradient. The one difference, stated in docs/performance.md:
    the first block's input (the frozen embedding's output) needs no gradient, so autograd skips the
    input gradients of the layers that read it (wq, wk, wv and their lora_A)."""
    rank, seq = 4, 32
    counted, model = _counted_step(rank, seq)
    args = SIZES["debug"]
    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    first = model.layers["0"].attention
    skipped = sum(2 * (m.weight.numel() + m.lora_A.weight.numel()) for m in (first.wq, first.wk, first.wv))
    assert counted == flops.flops_per_sequence(args, seq, lora) * 2 - skipped * 2 * seq
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert flops.adapter_weights(args, lora) == adapters
    assert flops.flops_per_token(args, seq) - flops.flops_per_token(args, seq, lora) == pytest.approx(
        2 * flops.frozen_matrix_weights_per_token(args) - 6 * adapters)


def test_lora_8b_figures_and_cli(capsys):
    """LoRA rank 32 on every linear of Llama 3.1 8B at seq 4096: 30.0 GFLOP of frozen products
    (4 x 7.50B), 0.50 of adapters (6 x 83.9M), 6.44 of attention."""
    a, lora = SIZES["llama3.1-8b"], LoraConfig(rank=32, alpha=32.0)
    assert flops.frozen_matrix_weights_per_token(a) == pytest.approx(7.5044e9, rel=1e-4)
    assert flops.adapter_weights(a, lora) == 83_886_080
    assert flops.flops_per_token(a, 4096, lora) / 1e9 == pytest.approx(36.96, abs=0.005)
    assert main(["flops", "--model", "llama3.1-8b", "--seq-len", "4096", "--lora-rank", "32"]) == 0
    assert "36.96 GFLOP" in capsys.readouterr().out


def test_throughput_row_of_a_lora_run_uses_the_lora_formula(monkeypatch):
    from llamatron.train import metrics

    times = iter([100.0, 102.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(times))
    args, lora = SIZES["debug"], LoraConfig(rank=4, alpha=8.0)
    meter = metrics.ThroughputMeter(args, seq_len=64, global_batch=8, n_gpus=1, device=torch.device("cpu"),
                                    device_name="NVIDIA H200", fp8=False, step=0, lora=lora)
    row = meter.row(step=4, loss=1.5, lr=1e-3, grad_norm=0.3, consumed=32, skipped=0)
    per_seq = flops.flops_per_sequence(args, 64, lora)
    assert per_seq < 0.9 * flops.flops_per_sequence(args, 64)
    assert row["mfu"] == pytest.approx(per_seq * 8 / 0.5 / 989e12)
    assert row["tflops_per_gpu"] == pytest.approx(per_seq * 8 / 0.5 / 1e12)
