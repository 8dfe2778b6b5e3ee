"""The process a run executes in: its device, process group and precision, and batches moved to it.

One process, or one per GPU under torchrun: with WORLD_SIZE > 1 the process joins the group (NCCL on
GPUs, gloo on CPUs) through torchrun's env:// rendezvous.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llamatron.errors import LlamatronError


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(name: str) -> torch.device:
    """The device of this process: under torchrun, GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LlamatronError("config key 'train.device': cuda requested but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", env_local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has (a GPU's own; the host's for the CPU), None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. bf16 is autocast over fp32 master weights."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


@dataclass(frozen=True)
class Precision:
    """How a step computes: `amp` is the autocast dtype (None: none), `params` the dtype FSDP gathers
    parameters in (None: FSDP off, or fp32). Under FSDP bf16 comes from the gather
    (MixedPrecisionPolicy, fp32 master weights) and no autocast is needed."""

    amp: torch.dtype | None
    params: torch.dtype | None

    @classmethod
    def choose(cls, precision: str, device: torch.device, fsdp: bool) -> "Precision":
        amp = autocast_dtype(precision, device)
        return cls(None, amp) if fsdp and amp is not None else cls(amp, None)

    @property
    def compute(self) -> torch.dtype:
        return self.params or self.amp or torch.float32

    def autocast(self, device: torch.device):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp)


def attention_backend(name: str):
    """A context that pins scaled_dot_product_attention to one kernel (forward and backward), e.g.
    cuDNN, which on Hopper runs about twice as fast as the flash backend; "auto" leaves torch's choice.
    "fa4": torch's flash backend with FlashAttention 4's kernels (`flash-attn-4`, CuTe DSL) put in
    its place through torch's own registry (`activate_flash_attention_impl`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    if name == "fa4":
        activate_fa4()
    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "fa4": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


# The name llamatron's FA4 registration has in torch's flash attention registry.
FA4_IMPL = "FA4-llamatron"


def fa4_unavailable_reason(device: torch.device) -> str | None:
    """Why FlashAttention 4 cannot run on `device` here, or None if it can."""
    if importlib.util.find_spec("torch.nn.attention._fa4") is None:
        return f"torch {torch.__version__} has no FA4 slot in its flash attention registry (torch >= 2.10 has)"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "the flash-attn-4 package is not installed (pip install flash-attn-4)"
    if device.type != "cuda":
        return f"FA4's kernels run on NVIDIA GPUs only; this run's device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FA4 runs on compute capability 9.0 or 10.x (H100, H200, B200); {torch.cuda.get_device_name(device)} has {major}.{minor}"
    return None


def check_attention_backend(name: str, device: torch.device) -> None:
    """At start, one line if `train.attention_backend` cannot run here (fa4 without its package, torch
    slot or GPU), rather than an error inside the first compiled step."""
    reason = fa4_unavailable_reason(device) if name == "fa4" else None
    if reason:
        raise LlamatronError(f"config key 'train.attention_backend': fa4 asked for, but {reason}")


def activate_fa4() -> None:
    """Put FA4's kernels behind torch's flash attention ops, once per process: from then on every
    flash SDPA call of the process, compiled or eager, runs them. Through torch's own FA4 slot, with
    the kernels' module llamatron.models.fa4_kernels (it adapts their return values to the slot)."""
    from torch.nn import attention
    from torch.nn.attention import _fa4  # torch's FA4 slot: its registration takes the kernels' module

    if attention.current_flash_attention_impl() == FA4_IMPL:
        return
    attention.register_flash_attention_impl(
        FA4_IMPL, register_fn=functools.partial(_fa4.register_flash_attention_fa4,
                                                module_path="llamatron.models.fa4_kernels"))
    attention.activate_flash_attention_impl(FA4_IMPL)


def init_distributed(device: torch.device, world_size: int) -> bool:
    """Join torchrun's process group (env:// rendezvous); True if this call created it."""
    if world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of int64 windows [n, seq_len + 1] on `device` (pinned, asynchronous on CUDA)."""
    window = torch.from_numpy(windows)
    if device.type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    # Two tensors of their own, not views of one window: context parallelism resizes them in place.
    return window[:, :-1].clone(), window[:, 1:].clone()


def configure(threads: int | None, deterministic: bool) -> None:
    """Process-wide settings of a run, before the first CUDA allocation."""
    # Whole-segment growth instead of fixed blocks: far less fragmentation with large, varying
    # activations (a user's setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def load_batch(dataset, indices, device: torch.device, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of the windows `indices` of `dataset` on `device` (ids checked against
    `vocab_size` if given: `llamatron.data.build.read_windows`)."""
    from llamatron.data.build import read_windows

    return to_device(read_windows(dataset, indices, vocab_size), device)
