"""HostStager, the staging copy of an asynchronous checkpoint (llamatron/train/host_staging.py): a
snapshot into host buffers kept for the run, which DCP plans and writes exactly as it does torch's
DefaultStager's copy (DTensors included). In process, on the CPU; the CUDA test (pinned buffers)
runs where CUDA is."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from llamatron.config import CheckpointConfig
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.train import checkpoint as ckpt
from llamatron.train.host_staging import HostStager

torch.set_num_threads(1)


def _state(device="cpu"):
    return {"model": {"w": torch.randn(3, 4, device=device), "big": torch.randn(1 << 19, device=device)},
            "optim": {"state.w.step": torch.tensor(3.0, device=device), "param_groups.w.lr": 1e-3,
                      "param_groups.w.betas": (0.9, 0.95), "param_groups.w.params": ["w"]}}


def _ptrs(staged):
    return {k: t.data_ptr() for part in staged.values() for k, t in part.items() if torch.is_tensor(t)}


def test_stage_is_a_snapshot_into_buffers_kept_across_saves():
    sd, stager = _state(), HostStager(pinned=False)
    staged = stager.stage(sd)
    want = {k: t.clone() for k, t in staged["model"].items()}
    sd["model"]["w"].add_(1.0)  # training goes on
    sd["optim"]["param_groups.w.params"].append("v")
    assert all(torch.equal(staged["model"][k], t) for k, t in want.items())
    assert staged["optim"]["param_groups.w.params"] == ["w"] and staged["optim"]["param_groups.w.betas"] == (0.9, 0.95)
    assert all(staged["model"][k].data_ptr() != sd["model"][k].data_ptr() for k in want)
    first = _ptrs(staged)
    again = stager.stage(sd)
    assert _ptrs(again) == first and torch.equal(again["model"]["w"], sd["model"]["w"])
    sd["model"]["w"] = torch.zeros(5, dtype=torch.float64)  # another shape and dtype: a new buffer
    del sd["model"]["big"]  # an entry gone: its buffer is freed
    third = stager.stage(sd)
    assert third["model"]["w"].dtype == torch.float64 and torch.equal(third["model"]["w"], sd["model"]["w"])
    assert set(stager._buffers) == {("model", "w"), ("optim", "state.w.step")} and stager.nbytes == 5 * 8 + 4
    stager.close()
    assert stager.nbytes == 0
    assert torch.equal(stager.stage(sd)["model"]["w"], sd["model"]["w"])  # allocated again


def _sharded_state():
    """A model and AdamW state after one step, FSDP2 over a one-rank gloo mesh: DTensors throughout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Transformer(SIZES["debug"])
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, SIZES["debug"].vocab_size, (1, 16))).float().square().mean().backward()
    opt.step()
    return model, opt


def test_dcp_writes_the_same_checkpoint_as_from_default_stager(tmp_path):
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, opt = _sharded_state()
        sd = ckpt._gather([model], [opt])
        staged = HostStager(pinned=False).stage(sd)
        for k, t in sd["model"].items():
            assert isinstance(staged["model"][k], DTensor) and staged["model"][k].placements == t.placements
            assert staged["model"][k].device_mesh == t.device_mesh and staged["model"][k].stride() == t.stride()
            assert staged["model"][k].to_local().data_ptr() != t.to_local().data_ptr()
        torch_stager = DefaultStager(StagingOptions(False, False, False, False))  # unpinned, in this thread
        for name, stager in (("ours", HostStager(pinned=False)), ("torch", torch_stager)):
            dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path / name)), async_stager=stager).result()
            stager.close()
        ours, theirs = (dcp.FileSystemReader(str(tmp_path / n)).read_metadata() for n in ("ours", "torch"))
        assert len(ours.state_dict_metadata) == len(sd["model"]) + len(sd["optim"])
        assert ours.state_dict_metadata == theirs.state_dict_metadata
    finally:
        dist.destroy_process_group()
    a, b = (ckpt.consolidated_state_dict(tmp_path / n, verify=False) for n in ("ours", "torch"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointer_reuses_the_buffers_of_its_first_async_save(tmp_path):
    """Two async saves through the Checkpointer: the second stages into the first's buffers (a
    second stage on torch 2.11's DefaultStager failed with KeyError <class 'type'> on the H200,
    2026-12-02), and each checkpoint holds the weights of its own step."""
    model = Transformer(SIZES["debug"])
    opt = torch.optim.AdamW(model.parameters())
    ck = ckpt.Checkpointer(CheckpointConfig(enabled=True, keep=2, async_save=True), tmp_path, log=lambda *_: None)
    ck.attach([model], [opt], "")
    weights, buffers = {}, []
    for step in (1, 2):
        with torch.no_grad():
            model.output.weight.fill_(step)
        weights[step] = model.output.weight.clone()
        ck.save(step, {"step": step, "consumed_samples": 0})
        parts = ck.pending.parts
        buffers.append({k: b.tensor.data_ptr() for k, b in ck._stager._buffers.items()})
        ck.wait()
    assert buffers[0] == buffers[1] and len(buffers[0]) == 4 * len(list(model.parameters()))  # weights, 2 moments, step
    assert parts["alloc_s"] == 0.0 and parts["stage_s"] > 0 and set(parts) >= {"begin_s", "gather_s", "rng_s",
                                                                               "async_save_s", "check_s"}
    ck.close()
    assert ck._stager is None
    for step in (1, 2):
        saved = ckpt.consolidated_state_dict(ckpt.checkpoints_root(tmp_path) / f"step_{step:08d}")
        assert torch.equal(saved["output.weight"], weights[step])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging needs CUDA")
def test_cuda_tensors_are_staged_into_pinned_buffers():
    sd, stager = _state("cuda"), HostStager(pinned=True)
    staged = stager.stage(sd)
    want = {k: t.cpu() for k, t in sd["model"].items()}
    for t in sd["model"].values():
        t.mul_(2.0)  # queued after the copies: stage() returned once they were done
    assert all(torch.equal(staged["model"][k], want[k]) for k in want)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in (*staged["model"].values(),
                                                                  staged["optim"]["state.w.step"]))
    registered = stager._buffers[("model", "big")]
    assert registered.registered == staged["model"]["big"].data_ptr()  # 2 MiB: pages of its own, registered
    assert stager._buffers[("model", "w")].registered is None  # small: torch's pinned allocator
    first = _ptrs(staged)
    assert _ptrs(stager.stage(sd)) == first
    stager.close()
    assert registered.registered is None
