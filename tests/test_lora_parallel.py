"""LoRA under tensor and pipeline parallelism, 2 gloo ranks under torchrun: the same losses, gradient
norms and PEFT adapter as one process, and the layout's adapter-only checkpoint resuming in one
process.

TP lays the adapters out as Megatron does (llamatron/parallel/tensor_parallel.py): on a
column-parallel layer lora_A replicated and lora_B split by output rows, on a row-parallel one lora_A
split by input columns and lora_B replicated. Pipeline stages hold their layers' adapters, which the
PEFT export gathers from every stage."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llamatron.config import load_config
from llamatron.train.trainer import train
from llamatron.transforms.lora import add_adapter
from test_finetune import _boolq, _tokenizer
from test_parallel_layouts import REL, _config, _trajectory, torchrun

torch.set_num_threads(1)

def test_tp_styles_lay_adapters_out_as_megatron_and_merge_on_the_shards(tmp_path):
    """One rank (a real gloo group and mesh): the placements, the forward, and merge/unmerge keeping
    every placement (B A has W's, so each rank merges its own shard)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from llamatron.parallel.tensor_parallel import colwise, rowwise

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    for layer in mlp:
        add_adapter(layer, 4, 8.0, 0.0)
        nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    want = mlp(x).detach()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        parallelize_module(mlp, init_device_mesh("cpu", (1,)), {"0": colwise(mlp[0]), "1": rowwise(mlp[1])})
        placements = {n: p.placements for n, p in mlp.named_parameters()}
        assert placements == {
            "0.weight": (Shard(0),), "0.bias": (Shard(0),), "0.lora_A.weight": (Replicate(),),
            "0.lora_B.weight": (Shard(0),), "1.weight": (Shard(1),), "1.bias": (Replicate(),),
            "1.lora_A.weight": (Shard(1),), "1.lora_B.weight": (Replicate(),)}
        torch.testing.assert_close(mlp(x), want)
        with torch.no_grad():
            for layer in mlp:
                layer.merge()
            merged = mlp(x)
            for layer in mlp:
                layer.unmerge()
        assert {n: p.placements for n, p in mlp.named_parameters()} == placements
        torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


LORA = ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "optim.schedule_steps=6"]


def _equals_one_process(tmp_path, config, overrides, layout):
    """Steps 1-3 on 2 ranks with `layout` (adapter-only checkpoints) as in one process, adapters
    included; then step 4 of the layout's run, resumed in one process, as the one-process run's."""
    def one(out, steps, *extra):
        cfg = load_config(str(config), [f"train.out_dir={out}", f"train.steps={steps}", *overrides, *extra])
        return train(cfg, progress=False, log=lambda *a: None)

    small = "checkpoint.save_frozen=false"
    one(tmp_path / "one", 3, f"lora.peft_out={tmp_path / 'a1'}")
    torchrun(2, config, tmp_path / "two", "train.steps=3", *overrides, *layout, small,
             f"lora.peft_out={tmp_path / 'a2'}")
    ref, got = (load_file(str(tmp_path / a / "adapter_model.safetensors")) for a in ("a1", "a2"))
    assert got.keys() == ref.keys()  # whole adapters, gathered from the shards or stages
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    one(tmp_path / "one", 4)
    one(tmp_path / "two", 4, small)  # DCP reshards the layout's adapters and AdamW moments
    want, got = _trajectory(tmp_path / "one"), _trajectory(tmp_path / "two")
    for step in (1, 2, 3, 4):
        (gl, gn), (wl, wn) = got[("train", step)], want[("train", step)]
        assert gl == pytest.approx(wl, rel=REL) and gn == pytest.approx(wn, rel=REL), step


@pytest.mark.slow
def test_lora_fine_tuning_with_tp2_equals_one_process(tmp_path):
    data = [f"data.tokenizer={_tokenizer(tmp_path)}", f"finetune.data={_boolq(tmp_path / 'boolq.jsonl', repeat=4)}"]
    _equals_one_process(tmp_path, "llamatron-finetune-test", [*data, *LORA], ["parallel.tp=2"])


@pytest.mark.slow
def test_lora_with_pp2_1f1b_equals_one_process(tmp_path):
    # Pretraining data (mock tokens): fine-tuning data does not run pipelined (config refuses it).
    _equals_one_process(tmp_path, _config(tmp_path), [*LORA, "eval.samples=0"], ["parallel.pp=2"])
