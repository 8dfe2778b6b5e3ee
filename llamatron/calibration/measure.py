"""`llamatron plan --calibrate`: measure, on this machine's device, the timings the planner's cost model
is built from, and write them as a table (llamatron/calibration/__init__.py reads it).

On CUDA in bf16 (timed with CUDA events), else on the CPU in fp32 (wall clock): GEMMs at the models'
block and output-layer shapes, each at a ladder of row counts and tensor-parallel splits (forward,
input gradient, weight gradient); the MoE models' expert products as one batched GEMM over the experts
at a ladder of rows per expert; attention forward and backward at a few sequence lengths and call sizes
(GLaM's biased attention as its blocks run it on the device, compiled, `attention.KERNEL` on CUDA, last);
element-wise copies and adds; one fused AdamW step. Under torchrun with several processes, also
all-gather, reduce-scatter, all-to-all and ring send/receive at a few sizes (NCCL on GPUs, gloo on
CPUs). Every timing is the median of REPEATS samples after WARMUP calls, on random (never all-zero)
inputs; on a GPU each sample is a window of back-to-back calls (`Clock.time`).

Attention too: forward alone and forward + backward pairs (backward the difference), at 8,192, 32,768
and 131,072 query rows a call (batch x seq). Before, it was timed one call at a time at 8,192 rows,
which measured the host's time to launch SDPA and its backward (~0.14 and ~0.26 ms on the H200 of
2026-12-04) wherever the kernels are shorter: GPT 126M's head-dim-64 rows took 0.142 and 0.144 ms
forward for one and two times the work. A training step queues its kernels ahead of the GPU, so it
pays the kernels' time, and its calls hold micro batch x seq rows (GPT 126M at micro 16: 32,768).

The run is bounded: measurements stop at `budget_s` (what was not reached is counted in the table's
"skipped"), and a GEMM or attention call whose buffers would take more than a quarter of the free
device memory is left out. On one H200 the default grid is ~600 GEMM timings (29 shapes x 7 row
counts x 3): with 5 ms windows ~22 s, ~36 attention shapes under 10 s, copies and the optimizer a few
seconds, torch's start and CUDA's another ~10: about a minute.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llamatron.calibration import FORMAT

WARMUP, REPEATS = 2, 5
WINDOW_S = 0.005  # each GPU timing sample: back-to-back calls for at least this long
MODELS = ("llama3.1-8b", "gpt-126m", "glam-126m-64e")  # the families' reference shapes
QUICK_MODELS = ("debug",)
ROWS = (256, 1024, 4096, 8192, 16384, 32768, 65536)
QUICK_ROWS = (32, 128)
GROUP_ROWS = (128, 512, 2048, 8192)  # rows per expert of the MoE models' batched expert GEMMs
QUICK_GROUP_ROWS = (8, 32)
TP_SPLITS = (1, 2, 8)
SEQS = (1024, 2048, 4096, 8192)
# GLaM's biased attention on CUDA compiles per shape (tens of seconds each): its training length and the
# call sizes of micro batches 8 and 32 only (micro 8 is bench_train_step's GLaM run, whose compilation
# inductor's cache may keep).
BIAS_SEQS, BIAS_TOKENS = (2048,), (16384, 65536)
BIAS_COMPILE_S = 45.0  # budget left to begin one: its compilation must not run past --budget-s
HOLD_MAX_S = 0.05  # the longest the GPU waits for the host to queue a window
HOST_BOUND = 0.5  # a call whose launch takes over this share of its GPU time is timed with the GPU held
SLEEP_CYCLES_PER_S = 2.0e9  # torch.cuda._sleep spins on the SM clock (H100 / H200: 1.6-2.0 GHz): at least the hold
QUICK_SEQS = (64, 128)
# batch x seq of the attention measurements: the old single size, and the rows of the models' micro-batches
ATTENTION_TOKENS = (8192, 32768, 131072)
QUICK_ATTENTION_TOKENS = (256, 1024)
COMM_BYTES = (1 << 20, 16 << 20, 256 << 20)
QUICK_COMM_BYTES = (64 << 10, 1 << 20)


class Clock:
    """Median seconds of a function on a device, and the run's time budget."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.deadline, self.skipped = device, time.monotonic() + budget_s, 0
        self._hold_s = self._launch_s = 0.0  # how long the GPU waits before a window (`time`); host s a call

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def time(self, fn) -> float:
        """Median seconds of one call of `fn`, each sample a window of back-to-back calls at least
        WINDOW_S long on a GPU: sustained throughput, as inside a training step, where kernels follow
        each other without a host wait (single calls would count launch gaps and cooler clocks)."""
        for _ in range(WARMUP):
            fn()
        inner, self._hold_s = 1, 0.0
        if self.device.type == "cuda":
            once = self._window(fn, 1)
            inner = max(1, min(1000, int(WINDOW_S / max(once, 1e-6))))
            self._hold_s = hold_seconds(self._launch_s, once, inner)
        return statistics.median(self._window(fn, inner) for _ in range(REPEATS))

    def _window(self, fn, calls: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self._hold_s > 0:
                torch.cuda._sleep(int(self._hold_s * SLEEP_CYCLES_PER_S))  # before `start`: not timed
            start.record()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            self._launch_s = (time.perf_counter() - t) / calls  # the host's time to queue a call
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls


def hold_seconds(launch_s: float, gpu_s: float, calls: int) -> float:
    """How long the GPU waits before a window of `calls` calls, each `launch_s` of host time to queue and
    `gpu_s` of kernels. A call the host is about as slow to launch as the GPU to run (GLaM's compiled
    attention at batch 8 on an H100: 2.4 ms a call timed back to back, 1.5 ms of kernels; the smallest
    GEMMs): 1.5 times the window's launch time, so that the window times the kernels, as in a training
    step, where the host runs ahead. Not the others: the pause would let the GPU cool, and their
    back-to-back rate is the sustained one of a step (on 2026-12-06 a pause before every window made the
    large GEMMs read 3-8% faster than that)."""
    if launch_s <= HOST_BOUND * gpu_s:
        return 0.0
    return min(HOLD_MAX_S, 1.5 * launch_s * calls)


def gemm_shapes(models, quick: bool) -> list[tuple[int, int]]:
    """(k, n) of every block product and output layer of the models, and their tensor-parallel splits of n."""
    from llamatron.models import registry

    pairs: dict[tuple[int, int], None] = {}
    for name in models:
        entry = registry.get(name)
        shapes = entry.family.shapes(entry.args)
        base = [(g.k, g.n) for g in shapes.gemms] + [(entry.args.dim, entry.args.vocab_size)]
        for k, n in base:
            for tp in (1,) if quick else TP_SPLITS:
                if n % tp == 0 and (tp == 1 or n // tp >= 64):
                    pairs[(k, n // tp)] = None
    return list(pairs)


def grouped_shapes(models) -> list[tuple[int, int, int]]:
    """(experts, k, n) of the MoE models' expert products (`Gemm.groups` > 1)."""
    from llamatron.models import registry

    out: dict[tuple[int, int, int], None] = {}
    for name in models:
        entry = registry.get(name)
        for g in entry.family.shapes(entry.args).gemms:
            if g.groups > 1:
                out[(g.groups, g.k, g.n)] = None
    return list(out)


def measure_grouped(clock: Clock, dtype, shapes, rows, limit_bytes: float) -> list[dict]:
    """The experts' products as the capacity path runs them: one batched matmul over [E, m, k] rows."""
    return _measure_products(clock, dtype, shapes, rows, limit_bytes,
                             lambda g, m, k, n: [dict(r, groups=g) for r in _grouped(clock, dtype, g, m, k, n)])


def _grouped(clock: Clock, dtype, groups: int, m: int, k: int, n: int) -> list[dict]:
    """y = x W (fwd), dx = dy W^T (dgrad), dW = x^T dy (wgrad), per expert, W as the experts hold it: [E, k, n]."""
    x = torch.randn(groups, m, k, device=clock.device, dtype=dtype)
    w = torch.randn(groups, k, n, device=clock.device, dtype=dtype)
    dy = torch.randn(groups, m, n, device=clock.device, dtype=dtype)
    y, dx, dw = torch.empty_like(dy), torch.empty_like(x), torch.empty_like(w)
    ops = {"fwd": lambda: torch.bmm(x, w, out=y), "dgrad": lambda: torch.bmm(dy, w.transpose(1, 2), out=dx),
           "wgrad": lambda: torch.bmm(x.transpose(1, 2), dy, out=dw)}
    return [{"op": op, "m": m, "k": k, "n": n, "seconds": clock.time(fn)} for op, fn in ops.items()]


def attention_shapes(models, quick: bool) -> list[tuple[int, int, str]]:
    from llamatron.models import registry

    out: dict[tuple[int, int, str], None] = {}
    for name in models:
        entry = registry.get(name)
        s = entry.family.shapes(entry.args)
        out[(s.heads, s.head_dim, s.attention_mask)] = None
    return list(out)


def measure_gemms(clock: Clock, dtype, pairs, rows, limit_bytes: float) -> list[dict]:
    return _measure_products(clock, dtype, [(1, k, n) for k, n in pairs], rows, limit_bytes,
                             lambda g, m, k, n: _gemm(clock, dtype, m, k, n))


def _measure_products(clock: Clock, dtype, shapes, rows, limit_bytes: float, timings) -> list[dict]:
    """timings(groups, m, k, n) at every m of `rows` and (groups, k, n) of `shapes` whose buffers fit
    `limit_bytes`, until the budget runs out; what is left out counts in `skipped` (3 a shape)."""
    out = []
    size = torch.finfo(dtype).bits // 8
    for m in rows:
        for groups, k, n in shapes:
            if clock.expired or groups * (m * k + k * n + m * n) * size * 2 > limit_bytes:
                clock.skipped += 3
                continue
            try:
                out += timings(groups, m, k, n)
            except torch.OutOfMemoryError:  # the estimate above missed the allocator's own needs
                clock.skipped += 3
                torch.cuda.empty_cache()
    return out


def _gemm(clock: Clock, dtype, m: int, k: int, n: int) -> list[dict]:
    """y = x W^T (fwd), dx = dy W (dgrad), dW = dy^T x (wgrad), W as nn.Linear holds it: [n, k]."""
    x = torch.randn(m, k, device=clock.device, dtype=dtype)
    w = torch.randn(n, k, device=clock.device, dtype=dtype)
    dy = torch.randn(m, n, device=clock.device, dtype=dtype)
    y, dx, dw = torch.empty_like(dy), torch.empty_like(x), torch.empty_like(w)
    ops = {"fwd": lambda: torch.mm(x, w.t(), out=y), "dgrad": lambda: torch.mm(dy, w, out=dx),
           "wgrad": lambda: torch.mm(dy.t(), x, out=dw)}
    return [{"op": op, "m": m, "k": k, "n": n, "seconds": clock.time(fn)} for op, fn in ops.items()]


def _measure_all_attention(clock: Clock, dtype, models, quick: bool, limit: float, biased: bool = False) -> list[dict]:
    """The models' causal attention shapes, or (`biased`) those with a bias: on CUDA those compile once per
    (batch, seq) (`_biased_attention`), so only at BIAS_SEQS and BIAS_TOKENS."""
    shapes = [s for s in attention_shapes(models, quick) if (s[2] == "bias") == biased]
    cuda = clock.device.type == "cuda"
    if biased and cuda and not quick:
        return _measure_biased_kernels(clock, dtype, shapes, limit)
    rows = measure_attention(clock, dtype, shapes, *((QUICK_SEQS, QUICK_ATTENTION_TOKENS) if quick
                                                     else (SEQS, ATTENTION_TOKENS)), limit)
    kernel = _glam_kernel() if cuda else "sdpa"  # the way `_biased_attention` ran the biased rows
    return [{**r, "kernel": kernel} if r["mask"] == "bias" else r for r in rows]


def _measure_biased_kernels(clock: Clock, dtype, shapes, limit: float) -> list[dict]:
    """The biased shapes with each CUDA kernel GLaM's blocks can run (`attention.KERNELS`), the default
    first, so that the planner costs a run of any of them by its own rows; a shape is begun only with
    time left to compile it (what is not reached counts as skipped, and plans fall back to the default's)."""
    from llamatron.models.glam import attention as glam

    default = glam.kernel()
    out = []
    try:
        for kernel in (default, *(k for k in glam.KERNELS if k != default)):
            glam.KERNEL = kernel  # what fast_relative_attention dispatches on
            for tokens in BIAS_TOKENS:
                if clock.left() < BIAS_COMPILE_S:
                    clock.skipped += len(shapes) * len(BIAS_SEQS)
                    continue
                rows = measure_attention(clock, dtype, shapes, BIAS_SEQS, (tokens,), limit)
                out += [{**r, "kernel": kernel} for r in rows]
    finally:
        glam.KERNEL = default
    return out


def measure_attention(clock: Clock, dtype, shapes, seqs, calls, limit_bytes: float) -> list[dict]:
    """Attention at each (heads, head_dim, mask) and sequence, with `calls` rows (batch x seq) a call."""
    out = []
    for heads, head_dim, mask in shapes:
        for tokens in calls:
            for seq in seqs:
                batch = max(1, tokens // seq)
                flex = mask == "bias" and clock.device.type == "cuda"
                if clock.expired or _attention_bytes(dtype, batch, heads, seq, head_dim, mask, flex) > limit_bytes:
                    clock.skipped += 1
                    continue
                try:
                    fwd, bwd = _attention(clock, dtype, batch, heads, seq, head_dim, mask)
                except torch.OutOfMemoryError:  # the estimate missed the kernels' own workspace
                    clock.skipped += 1
                    torch.cuda.empty_cache()
                    continue
                out.append({"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "mask": mask,
                            "fwd_seconds": fwd, "bwd_seconds": bwd})
    return out


def _attention_bytes(dtype, batch: int, heads: int, seq: int, head_dim: int, mask: str, flex: bool = False) -> int:
    """q, k, v, the output, its gradient and q, k, v's; with an SDPA bias, it, its masked copy and two
    batch-wide S x S buffers of backward (flex makes none)."""
    size = torch.finfo(dtype).bits // 8
    bias = 4 * batch * heads * seq * seq * size if mask == "bias" and not flex else 0
    return 8 * batch * heads * seq * head_dim * size + bias


def _attention(clock: Clock, dtype, batch: int, heads: int, seq: int, head_dim: int, mask: str) -> tuple[float, float]:
    """Seconds of the attention's forward (recording for backward, as in training) and of its backward:
    windows of forwards, and of forward + backward pairs. Causal: SDPA. With a bias: what GLaM trains
    with on this device (`_biased_attention`)."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=clock.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, device=clock.device, dtype=dtype)
    inputs = (q, k, v)
    if mask == "bias":
        forward, table = _biased_attention(q, k, v)
        inputs += (table,)
    else:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd = clock.time(forward)
    both = clock.time(lambda: torch.autograd.grad(forward(), inputs, grad))
    # Backward takes longer than forward; only the noise of two medians could make the difference <= 0.
    return fwd, max(both - fwd, 1e-3 * fwd)


def _glam_kernel() -> str:
    from llamatron.models.glam import attention as glam

    return glam.kernel()


def _biased_attention(q, k, v, flex: bool | None = None):
    """GLaM's causal attention with its T5 relative position bias (default buckets and distance), as
    the model trains on this device (`flex` None: the fast path on CUDA, `fast_relative_attention`,
    whichever kernel `attention.KERNEL` names: split attention by default, or flex_attention with the
    bias table in its score_mod), compiled whole with static shapes, so each (batch, seq) compiles once,
    in the timing's warm-up calls; elsewhere SDPA with the [heads, S, S] bias looked up. Returns (forward, the bias table: a leaf with a gradient)."""
    from llamatron.models.glam import attention as glam
    from llamatron.models.glam.model import GLaMArgs, fast_relative_attention, relative_position_bucket

    args, seq = GLaMArgs(), q.shape[2]
    table = torch.randn(args.rel_pos_buckets, q.shape[1], device=q.device, requires_grad=True)
    distance = torch.arange(seq, device=q.device)
    if q.is_cuda if flex is None else flex:
        dist_bucket = relative_position_bucket(distance, args.rel_pos_buckets, args.rel_pos_max_distance)
        band = glam.band_width(dist_bucket.cpu(), args.rel_pos_buckets)
        block_mask = glam.causal_block_mask(seq, q.device)
        # Compiled whole, as inside the model's compiled blocks (eager, the band's element-wise work
        # took three times as long on an H100); a fresh cache per shape (a few shapes, each compiled once).
        attention = fast_relative_attention
        if q.is_cuda:
            torch._dynamo.reset()
            attention = torch.compile(fast_relative_attention, dynamic=False)
        return (lambda: attention(q, k, v, table, dist_bucket, band, block_mask)), table
    buckets = relative_position_bucket((distance[:, None] - distance[None, :]).clamp(min=0), args.rel_pos_buckets,
                                       args.rel_pos_max_distance)
    return (lambda: glam.sdpa_attention(q, k, v, table, buckets)), table


def measure_elementwise(clock: Clock, dtype, sizes) -> list[dict]:
    out = []
    for size in sizes:
        numel = size // (torch.finfo(dtype).bits // 8)
        a, b, c = (torch.randn(numel, device=clock.device, dtype=dtype) for _ in range(3))
        out.append({"op": "copy", "bytes": 2 * size, "seconds": clock.time(lambda: c.copy_(a))})
        out.append({"op": "add", "bytes": 3 * size, "seconds": clock.time(lambda: torch.add(a, b, out=c))})
        del a, b, c
    return out


def measure_optimizer(clock: Clock, params: int) -> list[dict]:
    """One AdamW step over fp32 parameters (fused on CUDA, as the trainer's), gradients random."""
    tensors = [torch.randn(params // 8, device=clock.device, requires_grad=True) for _ in range(8)]
    for t in tensors:
        t.grad = torch.randn_like(t)
    fused = clock.device.type == "cuda"
    opt = torch.optim.AdamW(tensors, lr=1e-4, fused=fused or None, foreach=None if fused else True)
    return [{"params": sum(t.numel() for t in tensors), "fused": fused, "seconds": clock.time(opt.step)}]


def measure_comm(clock: Clock, sizes) -> list[dict]:
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for size in sizes:
        numel = size // 4
        full = torch.randn(numel, device=clock.device)
        part = torch.randn(numel // world, device=clock.device)
        recv = torch.empty_like(full)
        ring = lambda: [r.wait() for r in dist.batch_isend_irecv(  # noqa: E731
            [dist.P2POp(dist.isend, full, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)])]
        ops = {"all_gather": lambda: dist.all_gather_into_tensor(full, part),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
               "all_to_all": lambda: dist.all_to_all_single(recv, full), "p2p": ring}
        for op, fn in ops.items():
            dist.barrier()
            seconds = torch.tensor(clock.time(fn), dtype=torch.float64, device=clock.device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
            out.append({"op": op, "world": world, "bytes": numel * 4, "seconds": float(seconds)})
    return out


def run(out_path: str, models=None, quick: bool = False, budget_s: float = 150.0, log=print) -> dict | None:
    """Measure and write the table (rank 0 under torchrun); returns it (None on other ranks)."""
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    clock = Clock(device, budget_s)
    models = tuple(models or (QUICK_MODELS if quick else MODELS))
    comm = _comm(clock, quick)
    if comm is None:  # not rank 0
        return None
    pairs, rows = gemm_shapes(models, quick), QUICK_ROWS if quick else ROWS
    limit = (torch.cuda.mem_get_info(device)[0] if cuda else 4 * 2**30) / 4
    log(f"calibrating on {torch.cuda.get_device_name(device) if cuda else 'cpu'} ({dtype}): {3 * len(pairs) * len(rows)} "
        f"GEMMs of {len(pairs)} shapes, attention, element-wise, AdamW; {len(comm)} collective timings; "
        f"at most {budget_s:g} s")
    if cuda:
        _warm_up(device, dtype)
    table = {
        "format": FORMAT, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "device_type": device.type,
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."), "warmup": WARMUP, "repeats": REPEATS, "quick": quick,
        "models": list(models), "world_size": max((c["world"] for c in comm), default=1),
        "glam_attention": _glam_kernel() if cuda else "sdpa",  # which way its biased rows time
        "elementwise": measure_elementwise(clock, dtype, (4 << 20, 16 << 20) if quick else (256 << 20, 1 << 30)),
        "optimizer": measure_optimizer(clock, (1 << 18) if quick else (64 << 20)),
        "attention": _measure_all_attention(clock, dtype, models, quick, limit),
    }
    # Compiled last, their compilation must not crowd out the GEMMs; but the GEMMs leave them time (on
    # an H200 on 2026-12-06 a 65 s budget ran out in the GEMMs and GLaM's biased rows were skipped, so
    # its attention was planned at causal speed).
    reserve = bias_reserve(models, quick, cuda, budget_s)
    clock.deadline -= reserve
    table["gemm"] = measure_gemms(clock, dtype, pairs, rows, limit)
    table["grouped"] = measure_grouped(clock, dtype, grouped_shapes(models), QUICK_GROUP_ROWS if quick else GROUP_ROWS,
                                       limit)
    table["comm"] = comm
    clock.deadline += reserve
    try:
        table["attention"] += _measure_all_attention(clock, dtype, models, quick, limit, biased=True)
    except Exception as e:  # noqa: BLE001 - a failed extra kernel must not lose the table measured so far
        log(f"biased attention not measured ({type(e).__name__}: {str(e)[:300]}); the planner will use causal rows")
    table.update(skipped=clock.skipped, elapsed_s=round(time.monotonic() - start, 1))
    write_json(Path(out_path), table)
    return table


def bias_reserve(models, quick: bool, cuda: bool, budget_s: float) -> float:
    """Seconds the GEMM sweep leaves to the biased attention's compiled shapes (CUDA, full runs): one
    compilation's worth per call size, at most half the budget."""
    if not cuda or quick or not any(mask == "bias" for _, _, mask in attention_shapes(models, quick)):
        return 0.0
    return min(BIAS_COMPILE_S * len(BIAS_TOKENS), budget_s / 2)


def _warm_up(device: torch.device, dtype) -> None:
    """Half a second of large GEMMs first, so that the first timings do not see idle clocks."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)


def _comm(clock: Clock, quick: bool) -> list[dict] | None:
    """Collective timings under torchrun (WORLD_SIZE > 1): [] on one process, None on ranks other than 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return []
    import torch.distributed as dist

    dist.init_process_group("nccl" if clock.device.type == "cuda" else "gloo")
    try:
        rows = measure_comm(clock, QUICK_COMM_BYTES if quick else COMM_BYTES)
    finally:
        dist.destroy_process_group()
    return rows if int(os.environ.get("RANK", "0")) == 0 else None


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a temporary file beside it, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def summary(table: dict, path: str) -> str:
    from llamatron.calibration import Table

    t = Table(table, Path(path).name)
    big = max(table["gemm"], key=lambda r: 2.0 * r["m"] * r["k"] * r["n"])
    rate = 2.0 * big["m"] * big["k"] * big["n"] / big["seconds"]
    return (f"wrote {path}: {len(table['gemm'])} GEMM, {len(table['attention'])} attention, {len(table['elementwise'])} "
            f"element-wise, {len(table['comm'])} collective timings in {table['elapsed_s']} s "
            f"({table['skipped']} skipped); largest GEMM {big['m']}x{big['k']}x{big['n']} at {rate / 1e12:.3g} TFLOP/s, "
            f"element-wise {t.bandwidth() / 1e9:.0f} GB/s, AdamW {t.optimizer() * 1e12:.1f} ps/parameter")
