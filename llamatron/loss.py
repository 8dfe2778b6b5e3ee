"""Cross-entropy over the 128K-token vocabulary without materialising the full fp32 logits.

At 8192 tokens the logits of Llama 3.1 are 8192 x 128256: 2.1 GB in bf16 and 4.2 GB again when
upcast for a numerically safe softmax, plus as much for their gradient. Here the output projection and
the loss are computed together in chunks of rows; since the loss is a scalar, the gradients with
respect to the hidden states and the output weight can be computed in the same pass (softmax minus
one-hot, times the chunk's inputs), so backward only rescales them. Same three GEMMs as the plain path,
no recomputation, the logits kept in the compute dtype (bf16) and only one chunk of them alive.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from llamatron.fp8_gemm import FastAccum, fp8_mm, to_fp8

# Labels equal to this contribute no loss and no gradient (prompt tokens in fine-tuning, padding): the
# value torch's cross_entropy ignores by default.
IGNORE_INDEX = -100

# FP8 output GEMMs (opt-in, train.fp8_include_output): E4M3 hidden states and weight, E5M2 logit
# gradients, one scale per tensor. The gradient softmax - one_hot lies in [-1, 1], so it needs no amax:
# a fixed power-of-two scale puts 1 at 2^15 (E5M2 holds up to 57344) and keeps values down to ~1e-9.
_DLOGITS_SCALE = 2.0**15
# Chunks per FP8 weight-gradient GEMM: each GEMM's fp32 product is added into the accumulator, a 6 GB
# pass for the 128K x 4096 weight (2.7 ms on an H100). Four chunks' token-major gradients side by side
# (4.2 GB of E5M2 at 8,192-row chunks) leave one add in a micro-batch of 65,536 tokens, against three
# with two chunks: the 8B proxy's FP8 step 0.5% faster for 1.1 GiB more at its peak (H100, 2026-12-06).
FP8_WGRAD_CHUNKS = 4
# Who makes the FP8 loss and its gradient on CUDA: "triton" (llamatron/loss_kernels.py) or "inductor"
# (the compiled loss, as before them; bench/bench_train_step.py's NAME@fp8loss=inductor).
FP8_LOSS_KERNELS = "triton"
# Who makes the BF16 loss and its gradient on CUDA, for bf16 logits: "triton" (llamatron/loss_kernels.py's
# tiled kernels, as the FP8 loss's) or "inductor" (the compiled `_loss_and_grad`, one kernel that reads each
# chunk twice with a row per program). The BF16 step of the 8B proxy at micro 8 was 0.6% faster with the
# Triton kernels, in both orders, and the 8-layer proxy at micro 2 0.1% (H200, 2026-12-07; docs/performance.md);
# bench/bench_train_step.py's NAME@bf16loss=inductor times the other. fp32 logits stay with inductor's.
BF16_LOSS_KERNELS = "triton"


class KeptOutputWeight:
    """An output weight's operands kept from one optimizer step to the next (train.cast_weights_once:
    transforms/outer_weights.py): its compute-dtype copy, or its E4M3 copies for the FP8 loss, made at
    the first micro-batch that needs them and dropped at `invalidate` (the weights changed); and, with
    gradient-accumulation fusion, `main_grad`, the fp32 buffer the loss adds the weight's gradient into
    instead of returning it to autograd."""

    def __init__(self, main_grad: torch.Tensor | None = None):
        self.main_grad = main_grad
        self.copies: dict = {}

    def copy(self, kind, make):
        if kind not in self.copies:
            self.copies[kind] = make()
        return self.copies[kind]

    def invalidate(self) -> None:
        self.copies.clear()


# weight -> its KeptOutputWeight; by identity, and gone with the weight.
_KEPT = WeakIdKeyDictionary()


def keep_output_weight(weight: torch.Tensor, main_grad: torch.Tensor | None = None) -> KeptOutputWeight:
    """From now on the loss takes `weight`'s operands from copies kept between `invalidate` calls."""
    _KEPT[weight] = kept = KeptOutputWeight(main_grad)
    return kept


def _in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    kept = _KEPT.get(weight)
    return weight.to(dtype) if kept is None else kept.copy(dtype, lambda: weight.to(dtype))


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a chunk and d(sum)/d(logits) = softmax - one_hot, in logits' dtype.

    The statistics are fp32 whatever the logits' dtype. On CUDA this runs compiled: one reduction and
    one element-wise kernel over the chunk instead of a handful of eager passes over gigabytes.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    grad = torch.where(valid[:, None], torch.exp(x - lse[:, None]) - one_hot.to(x.dtype), 0.0).to(logits.dtype)
    return loss, grad


def _loss_and_grad_inplace(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, eagerly, overwriting the fp32 logits with their gradient: no temporaries the size
    of the chunk, which on a CPU cost more in page faults than the arithmetic."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != IGNORE_INDEX
    if bool(valid.all()):  # the pretraining path: no extra pass over the chunk
        loss = (lse - x.gather(1, labels[:, None]).squeeze(1)).sum()
        x.sub_(lse[:, None]).exp_()
        x[torch.arange(x.shape[0], device=x.device), labels] -= 1.0
        return loss, x.to(logits.dtype)
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    x.sub_(lse[:, None]).exp_()
    x[torch.arange(x.shape[0], device=x.device), safe] -= 1.0
    x[~valid] = 0.0
    return loss, x.to(logits.dtype)


def _loss_and_grad_e5m2(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, the gradient scaled by _DLOGITS_SCALE and cast to E5M2 in the same kernel."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    grad = torch.where(valid[:, None], torch.exp(x - lse[:, None]) - one_hot.to(x.dtype), 0.0) * _DLOGITS_SCALE
    return loss, grad.to(torch.float8_e5m2)


def _loss_and_grad_e5m2_eager(logits, labels):
    loss, grad = _loss_and_grad_inplace(logits.float(), labels)
    return loss, grad.mul_(_DLOGITS_SCALE).to(torch.float8_e5m2)


_compiled: dict = {}


def _compiled_on_cuda(fn, eager, device: torch.device):
    """fn compiled once (one fused kernel or two over the chunk) on CUDA; `eager` elsewhere."""
    if device.type != "cuda":
        return eager
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _loss_and_grad_fn(device: torch.device, fp8: bool = False, dtype: torch.dtype = torch.bfloat16):
    if fp8:
        return _compiled_on_cuda(_loss_and_grad_e5m2, _loss_and_grad_e5m2_eager, device)
    if device.type == "cuda" and dtype == torch.bfloat16 and BF16_LOSS_KERNELS == "triton":
        from llamatron.loss_kernels import loss_and_grad

        return loss_and_grad
    return _compiled_on_cuda(_loss_and_grad, _loss_and_grad_inplace, device)


def _to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x in E4M3, the same transposed (written by the compiled cast, not an eager copy), the inverse scale."""
    x8, inv = to_fp8(x, torch.float8_e4m3fn)
    return x8, x8.t().contiguous(), inv


def _chunks(h, weight, labels, chunk_size: int, need_w: bool, dtype: torch.dtype):
    """The summed loss, the hidden states' gradient and the weight's (None: not needed), chunk by chunk."""
    loss_and_grad = _loss_and_grad_fn(h.device, dtype=dtype)  # h and the weight in dtype: so are the logits
    weight = _in_dtype(weight, dtype)  # under autocast the bf16 copy the GEMMs read
    grad_h, grad_w = torch.empty_like(h), None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        loss, dlogits = loss_and_grad(h[rows] @ weight.t(), labels[rows])
        total += loss
        grad_h[rows] = dlogits @ weight
        if need_w:
            grad_w = accumulate_weight_grad(grad_w, dlogits, h[rows], several=h.shape[0] > chunk_size)
    return total, grad_h, grad_w


def _copy_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (a [V, R] slice of a row-major buffer) = src.t(): compiled on CUDA, one tiled copy (eager's
    strided copy of a 1-byte [8192, 128256] chunk ran at a tenth of the bandwidth: 9.8 ms against 0.9 on
    an H100)."""
    dst.copy_(src.t())


def _loss_and_grad_e5m2_triton(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from llamatron.loss_kernels import loss_and_grad_e5m2

    return loss_and_grad_e5m2(logits, labels, _DLOGITS_SCALE)


def _fp8_loss_and_grad(device: torch.device):
    """(logits, labels, transposed, first) -> (summed loss, E5M2 scaled gradient), the gradient also
    copied token-major into `transposed`'s columns first.. (when given). The loss and gradient on CUDA
    from llamatron's own Triton kernels (`llamatron.loss_kernels`) unless FP8_LOSS_KERNELS says
    "inductor" (the compiled loss), the copy compiled; elsewhere both eager."""
    if device.type == "cuda" and FP8_LOSS_KERNELS == "triton":
        loss_and_grad = _loss_and_grad_e5m2_triton
    else:
        loss_and_grad = _loss_and_grad_fn(device, fp8=True)
    copy_transposed = _compiled_on_cuda(_copy_transposed, _copy_transposed, device)

    def run(logits, labels, transposed, first):
        loss, g8 = loss_and_grad(logits, labels)
        if transposed is not None:
            copy_transposed(transposed[:, first : first + g8.shape[0]], g8)
        return loss, g8

    return run


def _fp8_chunks(h, weight, labels, chunk_size: int, need_w: bool, fast: FastAccum):
    """The same with the three GEMMs in FP8. Hopper's FP8 GEMMs take A row-major and B column-major
    only, so each operand is made in the layout its GEMMs read: W [V, d] (its .t() is B of h @ W^T) and
    W^T [d, V] (B of dlogits @ W); each group of FP8_WGRAD_CHUNKS chunks of hidden states with one
    scale, row-major (A of the logits) and transposed (B of the weight gradient); each chunk's E5M2
    gradient row-major (A of its input gradient) and token-major into the group's [V, rows] (A of one
    weight-gradient GEMM per group). `fast`: which of the three accumulate fast (train.fp8_fast_accum). The
    logits' GEMM (K = 4096 at 8B) does by default, as torchao's forward GEMMs: the FP8 step 0.3-1.0% faster
    (H100, 2026-12-07), and the 2,000-step convergence check ended 0.9% (training) and 1.2% (validation)
    below BF16 with it, 0.3% / 0.5% without (docs/performance.md)."""
    to_e4m3 = _compiled_on_cuda(_to_e4m3, _to_e4m3, h.device)
    loss_and_grad = _fp8_loss_and_grad(h.device)
    kept = _KEPT.get(weight)
    w8, w8_t, w_inv = to_e4m3(weight) if kept is None else kept.copy("e4m3", lambda: to_e4m3(weight))
    g_inv = torch.tensor(1.0 / _DLOGITS_SCALE, device=h.device)
    grad_h, grad_w = torch.empty_like(h), None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    group = FP8_WGRAD_CHUNKS * chunk_size
    for first in range(0, h.shape[0], group):
        h8, h8_t, h_inv = to_e4m3(h[first : first + group])
        g8_t = torch.empty((weight.shape[0], h8.shape[0]), dtype=torch.float8_e5m2, device=h.device) if need_w else None
        for start in range(0, h8.shape[0], chunk_size):
            rows = slice(first + start, first + start + chunk_size)
            logits = fp8_mm(h8[start : start + chunk_size], h_inv, w8.t(), w_inv, h.dtype, fast.output)
            loss, g8 = loss_and_grad(logits, labels[rows], g8_t, start)  # E5M2, scaled
            del logits
            total += loss
            grad_h[rows] = fp8_mm(g8, g_inv, w8_t.t(), w_inv, h.dtype, fast.grad_input)
        if need_w:
            gw = fp8_mm(g8_t, g_inv, h8_t.t(), h_inv, torch.float32, fast.grad_weight)
            grad_w = gw if grad_w is None else grad_w.add_(gw)
    return total, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size, fp8, dtype):
        # A frozen output layer (LoRA) needs no weight gradient: one GEMM of three saved.
        need_w = ctx.needs_input_grad[1]
        if fp8:
            total, grad_h, grad_w = _fp8_chunks(h, weight, labels, chunk_size, need_w, fp8)
        else:
            total, grad_h, grad_w = _chunks(h, weight, labels, chunk_size, need_w, dtype)
        ctx.save_for_backward(grad_h, grad_w)
        # The mean over valid tokens; all valid (pretraining) it is the division by n as before.
        n = _valid_count(labels, h.shape[0])
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        kept = _KEPT.get(weight)
        ctx.main_grad = None if kept is None else kept.main_grad
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        if grad_w is not None and ctx.main_grad is not None:
            # Scaled and added into the fp32 buffer in one pass (3 x 2.1 GB at 8B), where autograd would
            # scale (2 x 2.1 GB) and then add into .grad (3 x 2.1 GB) in every micro-batch after the first.
            if grad_w.dtype == ctx.main_grad.dtype:
                ctx.main_grad.addcmul_(grad_w, scale)
            else:  # one chunk's bf16 product: scaled in bf16 first, as the path through autograd does
                ctx.main_grad.add_(grad_w * scale)
            grad_w = None
        # In the weight's own dtype (fp32 under autocast): the fp32 accumulator is not rounded to bf16 and
        # cast back, two passes over the 128K x 4096 gradient per micro-batch.
        grad_w = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return grad_h * scale.to(grad_h.dtype), grad_w, None, None, None, None


def accumulate_weight_grad(grad_w, dlogits: torch.Tensor, hc: torch.Tensor, several: bool) -> torch.Tensor:
    """grad_w + dlogits^T hc, the output weight's gradient over the chunks (and a block linear's over
    micro-batches: transforms/weight_cast.py, where grad_w is fp32 and the result is it, in place on the
    CPU and where the GPU's kernel writes into its input). Several bf16 chunks on a
    GPU that has the kernel: accumulated in fp32 inside the GEMM (cuBLAS `out_dtype`), with no bf16
    product and fp32 add pass per chunk (1.2 ms a chunk for the 128K x 4096 weight on an H200); else
    one bf16 product per chunk added into an fp32 accumulator (one chunk: no accumulator at all)."""
    mode = _fp32_accumulating_mm(dlogits.device) if several and dlogits.dtype == torch.bfloat16 else None
    if mode is not None:
        if grad_w is None:
            return torch.mm(dlogits.t(), hc, out_dtype=torch.float32)
        if mode == "in_place":  # the accumulator is the GEMM's C and D: no second 2 GB buffer
            return torch.addmm(grad_w, dlogits.t(), hc, out_dtype=torch.float32, out=grad_w)
        return torch.addmm(grad_w, dlogits.t(), hc, out_dtype=torch.float32)
    if grad_w is None:
        return dlogits.t() @ hc
    if grad_w.dtype == dlogits.dtype == torch.float32:
        return grad_w.addmm_(dlogits.t(), hc)
    return grad_w.float().add_(dlogits.t() @ hc)


def accumulate_batched_weight_grad(grad_w: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """grad_w [E, k, n] (fp32) += x^T grad_out per group (x [E, m, k], grad_out [E, m, n]), in place: a
    mixture of experts' weights over micro-batches (transforms/weight_cast.py). bf16 operands on a GPU
    that has the kernel: fp32 inside the GEMM; else a product in the operands' dtype added in fp32
    (autocast's arithmetic)."""
    xt = x.transpose(1, 2)
    mode = _fp32_accumulating_bmm(x.device) if x.dtype == torch.bfloat16 else None
    if mode == "in_place":
        torch.baddbmm(grad_w, xt, grad_out, out_dtype=torch.float32, out=grad_w)
    elif mode == "new":
        grad_w.copy_(torch.baddbmm(grad_w, xt, grad_out, out_dtype=torch.float32))
    else:
        grad_w.add_(torch.bmm(xt, grad_out))


_FP32_MM: dict[torch.device, str | None] = {}
_FP32_BMM: dict[torch.device, str | None] = {}


def _fp32_accumulating_mm(device: torch.device) -> str | None:
    """How `torch.mm` / `torch.addmm` take bf16 operands with `out_dtype=torch.float32` on this device,
    probed once: "in_place" (addmm also into its own input), "new" (into a new tensor), None (no such
    kernel: the CPU, older torch)."""
    if device.type != "cuda":
        return None
    if device not in _FP32_MM:
        _FP32_MM[device] = _probe_fp32_gemm(torch.mm, torch.addmm, (16, 16), device)
    return _FP32_MM[device]


def _fp32_accumulating_bmm(device: torch.device) -> str | None:
    """The same for `torch.bmm` / `torch.baddbmm`."""
    if device.type != "cuda":
        return None
    if device not in _FP32_BMM:
        _FP32_BMM[device] = _probe_fp32_gemm(torch.bmm, torch.baddbmm, (2, 16, 16), device)
    return _FP32_BMM[device]


def _probe_fp32_gemm(product, accumulate, shape: tuple[int, ...], device: torch.device) -> str | None:
    a = torch.full(shape, 0.5, dtype=torch.bfloat16, device=device)
    unsupported = (RuntimeError, TypeError, NotImplementedError)
    try:
        acc = accumulate(product(a, a, out_dtype=torch.float32), a, a, out_dtype=torch.float32)  # 8.0 everywhere
    except unsupported:
        return None
    try:
        accumulate(acc, a, a, out_dtype=torch.float32, out=acc)
    except unsupported:
        return "new"
    return "in_place" if bool((acc == 12.0).all()) else "new"


def _valid_count(labels: torch.Tensor, n: int):
    """Tokens whose label is not IGNORE_INDEX, at least 1 (a chunk of prompt tokens only has loss 0,
    not NaN). On CUDA a tensor (no host sync); on the CPU `n` itself when all are valid, so the
    pretraining arithmetic is exactly what it was."""
    if labels.is_cuda:
        return (labels != IGNORE_INDEX).sum().clamp(min=1)
    count = int((labels != IGNORE_INDEX).sum())
    return n if count == n else max(count, 1)


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
    fp8: bool | FastAccum = False,
) -> torch.Tensor:
    """mean_i CE(h_i @ weight.T, labels_i) for h [..., dim], weight [vocab, dim], labels [...], over
    the tokens whose label is not IGNORE_INDEX (-100), as torch's cross_entropy.

    chunk_size rows at a time; by default 8192 on GPU (one chunk per 8K-token sequence) and, on CPU,
    chunks of fp32 logits of about 16 MB, which the allocator recycles instead of mapping fresh pages.
    fp8: the three GEMMs in FP8 (training only; the softmax and the loss stay fp32), accumulating as a
    `FastAccum` says (True: its default, torchao's recipe).
    """
    if chunk_size is None:
        chunk_size = 8192 if h.is_cuda else max(1, (16 << 20) // (4 * weight.shape[0]))
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    h2 = h2.to(dtype)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            # The weight as it is (fp32 under autocast): cast inside, its gradient returned in fp32.
            fp8 = FastAccum() if fp8 is True else fp8
            return _FusedLinearCrossEntropy.apply(h2, weight, lab, chunk_size, fp8, dtype)
    w = _in_dtype(weight, dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h2.shape[0], chunk_size):
        logits = (h2[start : start + chunk_size] @ w.t()).float()
        total += torch.nn.functional.cross_entropy(logits, lab[start : start + chunk_size], reduction="sum")
    return total / _valid_count(lab, h2.shape[0])
