"""The SwiGLU feed-forward's gate and up projections in FP8 with their backward in llamatron's own
kernels (`train.fp8_fused_swiglu`, with `train.fp8 = tensorwise`).

torchao's `Float8Linear` makes each linear's E5M2 gradient from a bf16 tensor that autograd hands it:
for w1 and w3 those are da and db of h = silu(a) * b, which compile turns into an amax pass over dh, a
and b and a kernel writing both gradients in both layouts, two of them a byte at a stride (2.0-2.5
TB/s, 56 ms of the 8B proxy's 1.34 s FP8 step on an H200; docs/performance.md). Here the two
projections and the SwiGLU are one autograd function whose backward gets dh and makes the four E5M2
operands directly (`llamatron.swiglu_kernels` on CUDA), then runs the four FP8 GEMMs itself.

The recipe is torchao's tensorwise one: E4M3 inputs and weights, E5M2 gradients, one dynamic scale per
tensor, fp32 accumulation in the backward GEMMs (unless train.fp8_fast_accum names them), the same E4M3 and E5M2 values (tests/test_fp8_swiglu.py);
the weight gradients come out in the weights' dtype (fp32 master weights: no bf16 product cast back).
The down projection (w2) stays a `Float8Linear`, handed h = silu(a) * b already cast by torchao's own
function: given h in bf16, its backward would cast h again, an amax pass over a and b of its own (found in
the compiled graphs on 2026-12-07: the fused step's second `silu * b` amax). With train.cast_weights_once
the gate and up weights' E4M3 copies are made once per optimizer step (`FP8SwiGLU.cast_once`), as the
other FP8 layers'. Parameter names are unchanged (`feed_forward.w1.weight`, ...), so checkpoints are the
same either way.

Applied on one device or under FSDP (whose unsharded weights are plain tensors in forward); not with
tensor parallelism, FP8 all-gather (torchao's weights) or LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamatron.fp8_gemm import FastAccum, fp8_mm, to_fp8


# Where the token-major copies of da and db are written: by the cast kernel from its tiles (True), or by
# inductor's transposing copies of the row-major ones in the compiled backward (False; as the FP8 loss
# does, llamatron.loss._copy_transposed). bench/bench_fp8_swiglu.py times both.
TRANSPOSE_IN_KERNEL = True


@torch.library.custom_op("llamatron::swiglu_grad_e5m2", mutates_args=())
def swiglu_grad_e5m2(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For h = silu(a) * b (a, b [M, N] in the activations' dtype) and dh = g: da and db in E5M2 with one
    scale each, row-major [M, N], with `transposed` token-major [N, M] too (else empty), and their inverse
    scales (two 0-d fp32 tensors). The Triton kernels on CUDA; elsewhere the same values from torch ops."""
    if g.is_cuda:
        from llamatron.swiglu_kernels import swiglu_grad_e5m2 as kernels

        da8, db8, da8_t, db8_t, scales = kernels(g.contiguous(), a.contiguous(), b.contiguous(), transposed)
        # Two 0-d tensors, not one [2]: inductor's _scaled_mm lowering (torch 2.11) fails its size check
        # on a scale that is an element of another output (found on the H200, 2026-12-07).
        da_inv, db_inv = (s.clone() for s in scales.reciprocal().unbind(0))
    else:
        da, db = swiglu_grads(g, a, b)
        (da8, da_inv), (db8, db_inv) = to_fp8(da, torch.float8_e5m2), to_fp8(db, torch.float8_e5m2)
        da8_t, db8_t = (da8.t().contiguous(), db8.t().contiguous()) if transposed else (None, None)
    if not transposed:  # two empty tensors: a custom op's outputs may not alias each other
        da8_t, db8_t = da8.new_empty(0), da8.new_empty(0)
    return da8, db8, da8_t, db8_t, da_inv, db_inv


@swiglu_grad_e5m2.register_fake
def _(g, a, b, transposed):
    m, n = g.shape
    e5m2 = torch.float8_e5m2
    shape_t = (n, m) if transposed else (0,)
    return (g.new_empty((m, n), dtype=e5m2), g.new_empty((m, n), dtype=e5m2), g.new_empty(shape_t, dtype=e5m2),
            g.new_empty(shape_t, dtype=e5m2), g.new_empty((), dtype=torch.float32), g.new_empty((), dtype=torch.float32))


def swiglu_grads(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """da and db of h = silu(a) * b, rounded where eager autograd rounds them (the kernels' reference)."""
    a32 = a.float()
    e = 1 + torch.exp(-a32)
    sig = 1 / e
    db = (g.float() * (a32 / e).to(a.dtype).float()).to(a.dtype)
    da = ((g.float() * b.float()).to(a.dtype).float() * sig * (1 + a32 * (1 - sig))).to(a.dtype)
    return da, db


def _col_major(x8: torch.Tensor) -> torch.Tensor:
    """x8 [r, c] laid out column-major, as `_scaled_mm` takes its second operand."""
    return x8.t().contiguous().t()


class _FP8GateUp(torch.autograd.Function):
    """silu(x w1^T) * (x w3^T) for x [..., d] (bf16), w1 and w3 [N, d], the GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x, w1, w3, fast: FastAccum, w1_8=None, w1_scale=None, w3_8=None, w3_scale=None):
        """w*_8, w*_scale: the weights' E4M3 copies and scales made once per step (train.cast_weights_once:
        `FP8SwiGLU.cast_once`), else cast here from the weights' own dtype, as torchao casts under autocast."""
        x2 = x.reshape(-1, x.shape[-1])
        x8, x_inv = to_fp8(x2)
        w1_8, w1_inv = to_fp8(w1) if w1_8 is None else (w1_8, w1_scale.reciprocal())
        w3_8, w3_inv = to_fp8(w3) if w3_8 is None else (w3_8, w3_scale.reciprocal())
        # Accumulating as torchao's layers do (train.fp8_fast_accum; by default fast in forward only).
        # Without it in forward the fused step ran 1.1-1.3% slower than torchao's, with it 0.5-0.6% (H100, 2026-12-07).
        a = fp8_mm(x8, x_inv, w1_8.t(), w1_inv, x.dtype, fast_accum=fast.output)
        b = fp8_mm(x8, x_inv, w3_8.t(), w3_inv, x.dtype, fast_accum=fast.output)
        ctx.save_for_backward(x8, x_inv, w1_8, w1_inv, w3_8, w3_inv, a, b)
        ctx.weight_dtype, ctx.fast = w1.dtype, fast
        return (F.silu(a) * b).view(*x.shape[:-1], a.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        x8, x_inv, w1_8, w1_inv, w3_8, w3_inv, a, b = ctx.saved_tensors
        in_kernel = TRANSPOSE_IN_KERNEL
        da8, db8, da8_t, db8_t, da_inv, db_inv = torch.ops.llamatron.swiglu_grad_e5m2(dh.reshape(a.shape), a, b,
                                                                                    in_kernel)
        if not in_kernel:  # compiled: inductor's tiled transposing copies
            da8_t, db8_t = da8.t().contiguous(), db8.t().contiguous()
        fast = ctx.fast
        dx = fp8_mm(da8, da_inv, _col_major(w1_8), w1_inv, dh.dtype, fast.grad_input)
        dx = dx + fp8_mm(db8, db_inv, _col_major(w3_8), w3_inv, dh.dtype, fast.grad_input)
        x8_cols = _col_major(x8)
        dw1 = fp8_mm(da8_t, da_inv, x8_cols, x_inv, ctx.weight_dtype, fast.grad_weight)
        dw3 = fp8_mm(db8_t, db_inv, x8_cols, x_inv, ctx.weight_dtype, fast.grad_weight)
        return dx.view(*dh.shape[:-1], dx.shape[-1]), dw1, dw3, None, None, None, None, None


class FP8SwiGLU(nn.Module):
    """A SwiGLU feed-forward, w2(silu(w1 x) * w3 x), with w1 and w3 in `_FP8GateUp`: the same
    submodules and parameter names as the module it replaces."""

    def __init__(self, ffn: nn.Module, fast_accum: FastAccum = FastAccum()):
        super().__init__()
        self.fast_accum = fast_accum
        for name, child in ffn.named_children():  # the order of the original's parameters
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            cached = [self._buffers.get(n) for n in ("w1_fp8", "w1_scale", "w3_fp8", "w3_scale")]
            h = _FP8GateUp.apply(x.to(dtype), self.w1.weight, self.w3.weight, self.fast_accum, *cached)
            h = _as_float8_input(h, self.w2)
        return self.w2(h)

    def cast_once(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Keep w1's and w3's E4M3 copies and scales in buffers from now on (train.cast_weights_once), made
        by `fp8_weight_cast.refresh` after each optimizer step rather than in every micro-batch; returns
        its (copy, scale, weight) triples. Their weight gradients come out of the FP8 GEMMs in fp32 already,
        so there is no bf16 product to accumulate more cheaply (train.gradient_accumulation_fusion)."""
        triples = []
        for name in ("w1", "w3"):
            weight = getattr(self, name).weight
            self.register_buffer(f"{name}_fp8", torch.empty_like(weight, dtype=torch.float8_e4m3fn), persistent=False)
            self.register_buffer(f"{name}_scale", torch.ones((), dtype=torch.float32, device=weight.device),
                                 persistent=False)
            triples.append((self._buffers[f"{name}_fp8"], self._buffers[f"{name}_scale"], weight))
        return triples


def _as_float8_input(h: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """h cast to FP8 as torchao's `linear` would cast its input (its function, config and scale), handed
    to it already cast: torchao then keeps these E4M3 values for its weight gradient, where given h in
    bf16 its backward casts h again, a second amax pass over silu(a) * b that compile cannot fuse with this
    function's own backward kernels (10.6 ms a step of 8 calls at 65,536 x 14,336 on an H100). Compiled,
    the partitioner keeps the scale and either those bytes (one an element) or recomputes them pointwise
    from a and b (as on the CPU): no second amax either way. Not a tensorwise Float8Linear: h as it is."""
    if not _casts_input_tensorwise(linear):
        return h
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    cast = linear.config.cast_config_input
    return hp_tensor_to_float8_dynamic(h, cast.target_dtype, linear.linear_mm_config, gemm_input_role=GemmInputRole.INPUT,
                                       round_scales_to_power_of_2=linear.config.round_scales_to_power_of_2)


def _casts_input_tensorwise(linear: nn.Module) -> bool:
    """A torchao Float8Linear (cast-once's subclass too) casting its input with one dynamic scale, the same
    cast for its output and weight-gradient GEMMs."""
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_linear import Float8Linear

    if not isinstance(linear, Float8Linear):
        return False
    cast = linear.config.cast_config_input
    return (cast == linear.config.cast_config_input_for_grad_weight and cast.scaling_type is ScalingType.DYNAMIC
            and cast.scaling_granularity is ScalingGranularity.TENSORWISE)


def _eligible(ffn: nn.Module, min_features: int) -> bool:
    """A bias-free SwiGLU feed-forward whose gate and up projections FP8 would convert."""
    from llamatron.models.llama.model import FeedForward

    if type(ffn) is not FeedForward:
        return False
    return all(type(m) is nn.Linear and m.bias is None and min(m.weight.shape) >= min_features
               and m.weight.shape[0] % 16 == 0 and m.weight.shape[1] % 16 == 0 for m in (ffn.w1, ffn.w3))


def apply_fp8_swiglu(model: nn.Module, min_features: int = 1024, fast_accum: FastAccum = FastAccum()) -> list[str]:
    """Replace each eligible SwiGLU feed-forward of `model` by `FP8SwiGLU`, in place; returns the names
    of the gate and up projections it now runs (torchao's conversion must then leave them alone)."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if _eligible(child, min_features):
                setattr(module, child_name, FP8SwiGLU(child, fast_accum))
                full = f"{name}.{child_name}" if name else child_name
                names += [f"{full}.w1", f"{full}.w3"]
    return names
