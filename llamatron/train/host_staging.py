"""The staging copy of an asynchronous checkpoint: every tensor of the state dict copied into host
buffers that are kept for the whole run, so that training may go on while a writer thread saves them.

With torch's `DefaultStager` (torch 2.11, H200, 17.8 GB of model and AdamW state) every save's
snapshot took ~5.5 s, and a second `stage` on the same stager failed inside its deep copy
(`KeyError: <class 'type'>`). `HostStager` keeps one buffer per state-dict entry, and each save is
only the copies and one synchronize: 0.32 s for those 17.8 GB on the H200 (55 GB/s). The buffers
are allocated before the first save, in a background thread (`preallocate`), or by the save that
first needs them (again only if an entry's shape or dtype changes): allocating and pinning those
17.8 GB inside the first save stalled it 5.8 s.

Buffers of 1 MiB and more are private anonymous memory maps, made resident at once by several
threads (transparent huge pages where the kernel gives them: far fewer page faults), pinned ones
then registered with CUDA (`cudaHostRegister`) rather than taken from torch's pinned allocator,
which rounds every allocation up to a power of two (up to twice the memory: a 2.1 GB embedding and
its two moments take 4.3 GB each) and keeps what is freed in its cache; each map holds pages of its
own, so no two registrations share a page. Smaller ones come from torch's allocators.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from llamatron import hooks

_OWN_PAGES = 1 << 20

# Faulting in fresh pages is the kernel zeroing them: it scales with threads until memory bandwidth
# runs out. Half the cores at most (training and the other ranks of the host need theirs), 8 at most.
_FAULT_THREADS = min(8, max(1, len(os.sched_getaffinity(0)) // 2))
_FAULT_CHUNK = 8 << 20  # small enough that the threads share out a 64 MB matrix too
# Linux 5.14+: the kernel makes the pages resident without our writing them (1.7x faster without huge
# pages on a test VM); older kernels refuse it (EINVAL) and the chunk is written with zeros instead.
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_pool: ThreadPoolExecutor | None = None


def _fault_in(address: int, nbytes: int) -> None:
    """Make the pages of a fresh map resident now (ctypes calls release the GIL: the threads run
    beside training). cudaHostRegister would fault them in itself, in one thread, holding the CUDA
    driver's lock; torch's allocator prefaults before registering for the same reason."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_FAULT_THREADS, thread_name_prefix="llamatron-staging-fault")

    def fault(start: int) -> None:
        n = min(_FAULT_CHUNK, nbytes - start)
        if _libc.madvise(address + start, n, _MADV_POPULATE_WRITE) != 0:
            ctypes.memset(address + start, 0, n)

    list(_pool.map(fault, range(0, nbytes, _FAULT_CHUNK)))


class _Buffer:
    """One host buffer; `registered`: the address it is pinned at with cudaHostRegister."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, pinned: bool, device: torch.device | None = None):
        self.shape, self.dtype, self.pinned, self.registered = shape, dtype, pinned, None
        nbytes = shape.numel() * dtype.itemsize
        if nbytes < _OWN_PAGES:
            self.tensor = torch.empty(shape, dtype=dtype, pin_memory=pinned)
            return
        # Private: huge pages for anonymous shared memory follow shmem_enabled, "never" by default.
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # the tensor keeps the map alive
        # Not in forked children: fork would copy every pinned page (the kernel's early copy-on-write).
        area.madvise(mmap.MADV_DONTFORK)
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            area.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(area, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
        _fault_in(self.tensor.data_ptr(), nbytes)
        if pinned:
            self._register(nbytes, device)

    def _register(self, nbytes: int, device: torch.device) -> None:
        # The device of the tensors it stages: a new thread's current device is 0, and registering
        # there would create a context on GPU 0 from every rank's process.
        with torch.cuda.device(device):
            error = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0))
        if error == 0:
            self.registered = self.tensor.data_ptr()
        else:  # still correct, only the copy is synchronous and slower
            print(f"warning: checkpoint staging: cannot pin {nbytes / 1e9:.2f} GB of host memory (cudaError "
                  f"{error}); that part of the snapshot is copied to pageable memory", file=sys.stderr, flush=True)

    def fits(self, t: torch.Tensor, pinned: bool) -> bool:
        return self.shape == t.shape and self.dtype == t.dtype and self.pinned == pinned

    def free(self) -> None:
        if self.registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self.registered)
            self.registered = None
        self.tensor = None


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _packed(t) -> bool:
    """A tensor subclass whose data is held in another dtype or shape than its own (torchao's 8-bit
    optimizer state: uint8 codes, then fp32 scales). A subclass that wraps a tensor like itself (FP8
    all-gather's weights, whose second inner tensor may be a precomputed scale) is staged as a plain
    tensor, as before: decided by the first inner tensor, the data."""
    if not is_traceable_wrapper_subclass(t):
        return False
    data = getattr(t, t.__tensor_flatten__()[0][0])
    return data.dtype != t.dtype or data.shape != t.shape


class HostStager(AsyncStager):
    """DCP's AsyncStager for `dcp.async_save`: `stage` returns the state dict with every tensor
    replaced by this stager's host buffer for its entry, filled (CUDA tensors: non-blocking copies
    into pinned buffers, then one synchronize) before it returns, so training may change the
    originals from then on. DTensors stay DTensors over the host copy of their local shard (same
    mesh, placements, global shape and stride: DCP plans the same chunks); other values are copied.

    `preallocate` allocates the buffers of a state dict in a background thread; the next `stage`
    waits for it (`wait_s`) and raises what it raised. A buffer is overwritten by the next `stage`:
    one save in flight at a time. `close` frees the buffers (the end of the run; torch's
    `async_save` leaves a caller's stager open, in 2.11 and 2.13); a `stage` after it allocates them
    again. pinned=False (a CPU run): plain host memory."""

    _synchronize_after_execute = False  # stage() returns a finished copy: nothing to wait for

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._buffers: dict[tuple, _Buffer] = {}
        self.stage_s = self.alloc_s = self.wait_s = 0.0  # the last stage(), the allocation and the wait in it
        self.allocated = 0  # buffers allocated by stage() calls, all of them (not by preallocate)
        # preallocate's record: started/ended (perf_counter), seconds, buffers, bytes, error
        self.prealloc: dict | None = None
        self._thread: threading.Thread | None = None
        self._ready: dict[tuple, _Buffer] = {}

    def preallocate(self, state_dict: dict) -> None:
        """Start allocating a buffer for every tensor of `state_dict` in a background thread. Only the
        shapes, dtypes and devices are read, here: the thread touches no tensor of training and no
        CUDA stream (cudaHostRegister is a driver call, not a stream operation)."""
        self._await_preallocation()
        specs = list(self._specs(state_dict, ()))
        self.prealloc = {"started": time.perf_counter(), "ended": None, "s": None, "buffers": len(specs),
                         "bytes": sum(s.numel() * d.itemsize for _, s, d, _, _ in specs), "error": None}
        # Not a daemon: a run that fails meanwhile exits once the thread is out of the CUDA driver,
        # not while it is inside cudaHostRegister as the context is torn down.
        self._thread = threading.Thread(target=self._allocate, args=(specs, _rank()), name="llamatron-staging-alloc")
        self._thread.start()

    def _specs(self, value, key: tuple):
        """(key, shape, dtype, pinned, device) of each tensor, keyed as `stage` keys its buffers."""
        if isinstance(value, DTensor):
            value = value.to_local()
        if _packed(value):
            attrs, _ = value.__tensor_flatten__()
            for attr in attrs:
                yield from self._specs(getattr(value, attr), (*key, attr))
        elif isinstance(value, torch.Tensor):
            yield key, value.shape, value.dtype, self.pinned and value.is_cuda, value.device
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from self._specs(v, (*key, k))
        elif type(value) in (list, tuple):
            for i, v in enumerate(value):
                yield from self._specs(v, (*key, i))

    def _allocate(self, specs: list, rank: int) -> None:
        record = self.prealloc
        try:
            hooks.fire("staging", rank=rank)
            for key, shape, dtype, pinned, device in specs:
                self._ready[key] = _Buffer(shape, dtype, pinned, device)
        except BaseException as e:  # raised by the next stage(), on the training thread
            record["error"] = e
        finally:
            record["ended"] = time.perf_counter()
            record["s"] = record["ended"] - record["started"]

    def preallocated(self) -> bool:
        """No background allocation is running (local: never blocks)."""
        return self._thread is None or not self._thread.is_alive()

    def _await_preallocation(self) -> None:
        """Wait for the background allocation; its buffers become this stager's, its error is raised."""
        t0, thread = time.perf_counter(), self._thread
        if thread is None:
            return
        thread.join()
        self.wait_s, self._thread = time.perf_counter() - t0, None
        ready, self._ready = self._ready, {}
        for key, buffer in ready.items():
            if key in self._buffers:
                self._buffers[key].free()
            self._buffers[key] = buffer
        error = self.prealloc["error"]
        if error is not None:
            raise RuntimeError(f"allocating the {size_text(self.prealloc['bytes'])} of host buffers of the staging "
                               f"copy in the background failed ({type(error).__name__}: {error}); "
                               "checkpoint.async_save=false saves without them") from error

    def stage(self, state_dict: dict) -> dict:
        t0, self.alloc_s, self.wait_s = time.perf_counter(), 0.0, 0.0
        self._await_preallocation()
        seen, devices = set(), set()
        with torch.no_grad():
            staged = self._copy(state_dict, (), seen, devices)
        for key in self._buffers.keys() - seen:  # entries gone since the last save
            self._buffers.pop(key).free()
        for device in devices:
            torch.cuda.synchronize(device)
        self.stage_s = time.perf_counter() - t0
        return staged

    def _copy(self, value, key: tuple, seen: set, devices: set):
        if isinstance(value, DTensor):
            local = self._copy(value.to_local(), key, seen, devices)
            return DTensor(local, value._spec, requires_grad=False)
        if _packed(value):
            # A tensor subclass (torchao's 8-bit optimizer state: uint8 codes and fp32 scales) is staged
            # as its inner tensors and rebuilt over the copies: DCP then writes what a synchronous save
            # writes, where a plain buffer of its shape would hold a dequantized fp32 copy.
            attrs, context = value.__tensor_flatten__()
            inner = {a: self._copy(getattr(value, a), (*key, a), seen, devices) for a in attrs}
            return type(value).__tensor_unflatten__(inner, context, value.size(), value.stride())
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, key, seen, devices)
        if isinstance(value, dict):
            return {k: self._copy(v, (*key, k), seen, devices) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._copy(v, (*key, i), seen, devices) for i, v in enumerate(value))
        return copy.deepcopy(value)

    def _copy_tensor(self, t: torch.Tensor, key: tuple, seen: set, devices: set) -> torch.Tensor:
        pinned = self.pinned and t.is_cuda
        held = self._buffers.get(key)
        if held is None or not held.fits(t, pinned):
            if held is not None:
                held.free()
            t0 = time.perf_counter()
            held = self._buffers[key] = _Buffer(t.shape, t.dtype, pinned, t.device)
            self.alloc_s += time.perf_counter() - t0
            self.allocated += 1
        seen.add(key)
        held.tensor.copy_(t.detach(), non_blocking=pinned)
        if t.is_cuda:
            devices.add(t.device)
        return held.tensor

    def synchronize_staging(self) -> None:
        pass  # stage() has synchronized

    def close(self) -> None:
        """Free (and unpin) every buffer, those of a background allocation too (its error is dropped:
        no save needs them any more)."""
        with contextlib.suppress(RuntimeError):
            self._await_preallocation()
        for held in self._buffers.values():
            held.free()
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self._buffers.values())
