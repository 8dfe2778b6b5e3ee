"""HostStager, the staging copy of an asynchronous checkpoint (llamatron/train/host_staging.py): a
snapshot into host buffers kept for the run, which DCP plans and writes exactly as it does torch's
DefaultStager's copy (DTensors included). In process, on the CPU; the CUDA test (pinned buffers)
runs where CUDA is."""

import ctypes
import mmap

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from llamatron.config import CheckpointConfig
from llamatron.models.llama import SIZES
from llamatron.models.llama.model import Transformer
from llamatron.train import checkpoint as ckpt
from llamatron.testing import faults
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


def _resident(address: int, nbytes: int) -> int:
    """Bytes of [address, address + nbytes) in memory now (mincore; untouched anonymous pages are not)."""
    libc, page = ctypes.CDLL(None, use_errno=True), mmap.PAGESIZE
    start = address - address % page
    pages = (address + nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) * page


def test_preallocated_buffers_are_resident_and_the_next_stage_allocates_nothing():
    sd, stager = _state(), HostStager(pinned=False)
    stager.preallocate(sd)
    stager._thread.join(60)
    assert stager.preallocated() and stager.prealloc["buffers"] == 3 and stager.prealloc["error"] is None
    assert stager.prealloc["bytes"] == (12 + (1 << 19) + 1) * 4 and stager.prealloc["s"] > 0
    big = stager._ready[("model", "big")].tensor
    untouched = mmap.mmap(-1, big.nbytes, flags=mmap.MAP_PRIVATE)  # what the check sees before any write
    assert _resident(ctypes.addressof(ctypes.c_char.from_buffer(untouched)), big.nbytes) == 0
    assert _resident(big.data_ptr(), big.nbytes) == big.nbytes  # faulted in by the thread, not by the copy
    staged = stager.stage(sd)
    assert stager.allocated == 0 and stager.alloc_s == 0.0 and staged["model"]["big"].data_ptr() == big.data_ptr()
    assert all(torch.equal(staged["model"][k], sd["model"][k]) for k in sd["model"])
    sd["model"]["w"] = torch.zeros(5)  # a changed shape is still allocated by the save
    stager.stage(sd)
    assert stager.allocated == 1
    stager.close()


def test_a_failed_background_allocation_is_raised_by_the_next_stage():
    sd, stager = _state(), HostStager(pinned=False)
    with faults.installed("staging_nomem"):  # ENOMEM in the allocating thread
        stager.preallocate(sd)
        stager._thread.join(60)
    with pytest.raises(RuntimeError, match=r"^allocating the 2\.1 MB of host buffers") as e:
        stager.stage(sd)
    assert "Cannot allocate memory" in str(e.value) and "checkpoint.async_save=false" in str(e.value)
    assert torch.equal(stager.stage(sd)["model"]["big"], sd["model"]["big"])  # the next save allocates
    assert stager.allocated == 3
    stager.close()


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


def test_8bit_optimizer_state_is_staged_packed_and_saved_as_a_synchronous_save_saves_it(tmp_path):
    """torchao's 8-bit moments (optim.name = adamw8bit) are staged as their uint8 codes and fp32
    scales, rebuilt over the host buffers: the checkpoint is the synchronous save's, bit for bit (a
    plain buffer of their shape would have held a dequantized fp32 copy, 4x the bytes)."""
    subclass = pytest.importorskip("torchao.optim.subclass_8bit")
    state = subclass.OptimState8bit.zeros((64, 256), signed=True)
    state.copy_(torch.randn(64, 256))
    sd = {"optim": {"state.w.exp_avg": state, "state.w.step": torch.tensor(2.0)}}
    stager = HostStager(pinned=False)
    staged = stager.stage(sd)
    copy = staged["optim"]["state.w.exp_avg"]
    assert type(copy) is type(state) and copy.codes.dtype == torch.uint8
    assert torch.equal(copy.codes, state.codes) and torch.equal(copy.scale, state.scale)
    assert copy.codes.data_ptr() != state.codes.data_ptr()
    inner = [getattr(state, a) for a in state.__tensor_flatten__()[0]]  # codes, scales, the 256-entry code map
    assert stager.nbytes == sum(t.numel() * t.element_size() for t in inner) + 4 < 64 * 256 * 4 / 3  # + the step
    state.copy_(torch.randn(64, 256))  # training goes on; the snapshot does not
    assert not torch.equal(copy.codes, state.codes)
    state.copy_(copy.dequantize())
    dcp.save(sd, checkpoint_id=str(tmp_path / "sync"))
    dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path / "async")), async_stager=stager).result()
    stager.close()
    for name in ("sync", "async"):
        loaded = {"optim": {"state.w.exp_avg": subclass.OptimState8bit.zeros((64, 256), signed=True),
                            "state.w.step": torch.tensor(0.0)}}
        dcp.load(loaded, checkpoint_id=str(tmp_path / name))
        assert torch.equal(loaded["optim"]["state.w.exp_avg"].codes, state.codes), name


def test_fp8_all_gather_weights_are_staged_as_plain_tensors():
    """FP8 all-gather's weights (torchao's WeightWithDynamicFloat8CastTensor) wrap an fp32 tensor like
    themselves, with a precomputed scale once `precompute_fp8_scales` ran: staged as that fp32 data,
    a plain tensor, not taken apart as the 8-bit optimizer state is."""
    fsdp_utils = pytest.importorskip("torchao.float8.fsdp_utils")
    from torchao.float8.float8_training_tensor import LinearMMConfig

    data = torch.randn(64, 256)
    weight = fsdp_utils.WeightWithDynamicFloat8CastTensor(data, LinearMMConfig(), torch.float8_e4m3fn,
                                                           precomputed_scale=torch.tensor(2.0))
    assert weight.__tensor_flatten__()[0] == ["_tensor", "_precomputed_scale"]
    stager = HostStager(pinned=False)
    staged = stager.stage({"model": {"w": weight}})["model"]["w"]
    assert type(staged) is torch.Tensor and torch.equal(staged, data) and stager.nbytes == data.numel() * 4
    stager.close()


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


def test_checkpointer_allocates_the_staging_buffers_in_the_background_after_the_first_step(tmp_path):
    """The trainer polls after every step: with async saves, the first poll after an optimizer step
    (not before: AdamW has no state yet, and get_state_dict would make it with a step of lr 0) starts
    allocating every buffer of the staging copy in a background thread; the first save then only copies."""
    torch.manual_seed(0)
    model, lines = Transformer(SIZES["debug"]), []
    opt = torch.optim.AdamW(model.parameters())
    sync = ckpt.Checkpointer(CheckpointConfig(enabled=True, async_save=False), tmp_path / "sync", log=lines.append)
    ck = ckpt.Checkpointer(CheckpointConfig(enabled=True, async_save=True), tmp_path, log=lines.append)
    for c in (sync, ck):
        c.attach([model], [opt], "")
    ck.poll()
    assert ck._stager is None and not opt.state  # nothing before the first step, the optimizer untouched
    model(torch.randint(0, SIZES["debug"].vocab_size, (1, 16))).float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for c in (sync, ck):
        c.poll()
    assert sync._stager is None  # synchronous saves stage nothing
    stager = ck._stager
    stager._thread.join(60)
    ck.poll()
    n = len(list(model.parameters()))
    assert stager.prealloc["buffers"] == 4 * n and stager.prealloc["error"] is None  # weights, 2 moments, step
    assert lines == [f"{stager.prealloc['bytes'] / 1e6:.1f} MB of host buffers for the checkpoint staging "
                     f"allocated in the background in {stager.prealloc['s']:.2f} s"]
    ready = {k: b.tensor.data_ptr() for k, b in stager._ready.items()}
    ck.save(1, {"step": 1, "consumed_samples": 0})
    assert stager.allocated == 0 and ck.pending.parts["alloc_s"] == 0.0 and "prealloc_wait_s" in ck.pending.parts
    assert {k: b.tensor.data_ptr() for k, b in stager._buffers.items()} == ready
    ck.poll()
    assert stager.prealloc["started"] < ck.pending.started  # started once, reported once:
    assert sum("host buffers for the checkpoint staging" in line for line in lines) == 1
    ck.close()
    saved = ckpt.consolidated_state_dict(ckpt.checkpoints_root(tmp_path) / "step_00000001")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging needs CUDA")
def test_cuda_buffers_are_pinned_by_the_background_thread():
    sd, stager = _state("cuda"), HostStager(pinned=True)
    stager.preallocate(sd)
    stager._thread.join(60)
    big = stager._ready[("model", "big")]
    assert big.registered == big.tensor.data_ptr() and big.tensor.is_pinned()  # registered on the tensors' device
    staged = stager.stage(sd)
    assert stager.allocated == 0 and staged["model"]["big"].data_ptr() == big.registered
    assert all(torch.equal(staged["model"][k], t.cpu()) for k, t in sd["model"].items())
    stager.close()
    assert big.registered is None
