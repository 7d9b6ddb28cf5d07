"""qhl::w8a16_linear — int8 weight-only, one scale per output channel.

    y[..., N] = (x @ Wq.T) * s_w (+ b)         x [..., K] float, Wq [N, K] int8, s_w [N]

Applying s_w after the product is the same math as x @ (Wq * s_w).T and saves a pass over W.
Faces: spec (CPU, here: Wq converted to float32 one cache-sized tile of rows at a time; at a
static 1 token (1-16 without AMX) w8a16_linear_decomposed is the GEMV Inductor's CPU codegen
lowers it to, and on a CPU with AVX2 alone the spec runs cpu_fused.int8_gemv_bits, a GEMV over W's bytes read as int32 lanes:
1.1 ms a 4096 x 4096 layer against float32's 3.1, AMD EPYC, 2 threads; under torch.compile the
decomposition puts that GEMV in Inductor's graph at 1-4 tokens), fake, kernel
(codegen/triton/weight_only.py, CUDA), grad (dx through the dequantized weight; weight frozen),
onnx (codegen/onnx/w8a16.py: Cast + MatMul + Mul).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import cpu_fused, cpu_onednn, quant

__all__ = ["w8a16_linear", "w8a16_linear_spec", "w8a16_linear_decomposed", "gemv_max_tokens"]


# CPU: dequantize the weight a tile of rows at a time into a reused float32 buffer that stays in
# cache for the GEMM, instead of writing (and page-faulting) a full float32 copy of W every call.
# 4 MiB stays in L3 and is best for few tokens; with many tokens the GEMM dominates and fewer,
# larger tiles (fewer re-packs of x) win.
_TILE_BYTES = 4 << 20
_TILE_BYTES_MANY_TOKENS = 16 << 20
_MANY_TOKENS = 256


def _tile_rows(m: int, n: int, k: int) -> int:
    tile_bytes = _TILE_BYTES_MANY_TOKENS if m >= _MANY_TOKENS else _TILE_BYTES
    return min(n, max(16, (tile_bytes // (4 * k)) // 16 * 16))


def w8a16_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    n, k = w_int8.shape
    if not quant._cpu_fast_path_ok(x, w_int8, w_scale, bias):
        return _w8a16_linear_generic(x, w_int8, w_scale, bias)
    x2 = x.reshape(-1, k).float()
    m = x2.shape[0]
    ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    if cpu_fused.int8_bits_gemv_worthwhile(m, n, k) and cpu_fused.enabled() and not cpu_onednn.int8_gemm_is_fast():
        # few tokens on a CPU with AVX2 alone: the bit-mask GEMV reads W as int8 (cpu_fused.py).
        y = cpu_fused.int8_gemv_bits(x2, w_int8, ws)
        if y is not None:
            if bias is not None:
                y = y + bias.float()
            return y.to(x.dtype).reshape(*x.shape[:-1], n)
    tile = quant._scratch("w8a16.w", (_tile_rows(m, n, k), k), torch.float32)
    # int8 -> float32 is exact; the scale is applied once per output, after the GEMM
    y = quant.tiled_mm(x2, n, tile.shape[0], lambda n0, r: tile[:r].copy_(w_int8[n0 : n0 + r]))
    if bias is not None:
        torch.addcmul(bias.float(), y, ws, out=y)
    else:
        y.mul_(ws)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# Token counts up to which the GEMV form below (W read as int8 inside the reduction) beats the CPU
# face's dequantize-a-tile-then-GEMM, on a CPU with a fast int8 GEMM. With AMX: 1 (the AMX Xeon,
# one layer in cache, before x was realized: at 2 tokens it no longer beat float32; not re-measured
# since). Without AMX (AVX-512 VNNI, Zen 5 EPYC, 2 threads), qhl w8a16 on 4 x Linear(4096) under
# torch.compile, in one run each (medians of 21 round-robin calls), eager float32 12-28 ms:
#   tokens           1     2     4     6     8     16
#   face / old GEMV  4.0*  11.3  15.5  37.2  38.7  43.5 ms   (* the GEMV with x inlined)
#   this GEMV        2.0   2.7   4.9   7.9   10.1  18.7 ms
# (results/speed_cpu_quick_zen5_w8a16_gemv.md has the stack at 1 and 4 tokens.)
GEMV_MAX_TOKENS_AMX = 1
GEMV_MAX_TOKENS = 16


def gemv_max_tokens() -> int:
    """The largest static token count the decomposition lowers to its GEMV on this CPU (fast
    int8 GEMM; with AVX2 alone the bit-mask GEMV's cpu_fused.BITS_GEMV_MAX_TOKENS applies)."""
    return GEMV_MAX_TOKENS_AMX if cpu_onednn.cpu_has_amx() else GEMV_MAX_TOKENS


def w8a16_linear_decomposed(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
    """The spec in aten ops for Inductor's CPU codegen (runtime/inductor_cpu.py), at a static
    token count the GEMV formulations win at; other token counts (and dynamic ones) decline with
    NotImplemented and keep the CPU face.

    With a fast int8 GEMM (AVX-512/VNNI/AMX), 1 to gemv_max_tokens() tokens: a GEMV whose int8 ->
    float32 conversion happens inside the reduction loop, so W is read as int8 (the CPU face writes
    and re-reads float32 tiles of it). Measured on one 4096 x 4096 layer with its weights in cache
    (AMX Xeon, 2 threads): 0.74 ms against the CPU face's 2.34 and float32's 1.19 at 1 token; at 2
    tokens it no longer beat float32 there. Without AMX, up to 16 tokens (GEMV_MAX_TOKENS).
    With AVX2 alone, 1-4 tokens: the bit-mask GEMV (cpu_fused.int8_bits_dot_graph; there the plain
    GEMV's int8 loads are slow, 11.9 ms a 4096 x 4096 layer against float32's 3.1)."""
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x.device.type != "cpu" or not isinstance(m, int):
        return NotImplemented
    if not cpu_onednn.int8_gemm_is_fast():
        if not 1 <= m <= cpu_fused.BITS_GEMV_MAX_TOKENS:
            return NotImplemented
        acc = cpu_fused.int8_bits_dot_graph(x2.float(), w_int8)
        if acc is None:
            return NotImplemented
        y = acc * w_scale.float()
    elif not 1 <= m <= gemv_max_tokens():
        return NotImplemented
    else:  # x realized: not the previous layer's epilogue recomputed per output row
        y = (cpu_fused.realized(x2.float())[:, None, :] * w_int8.float()).sum(-1) * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _w8a16_linear_generic(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """The definition in plain ops (any device, autograd-visible): used off the CPU fast path."""
    n, k = w_int8.shape
    x2 = x.reshape(-1, k).float()
    y = (x2 @ w_int8.t().to(torch.float32)).mul_(w_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::w8a16_linear", mutates_args=())
def w8a16_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Spec face: see the module docstring."""
    return w8a16_linear_spec(x, w_int8, w_scale, bias)


@w8a16_linear.register_fake
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@w8a16_linear.register_kernel("cuda")
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from qhl.codegen.triton.weight_only import w8a16_linear_triton

    return w8a16_linear_triton(x, w_int8, w_scale, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, w_int8, w_scale, bias = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    w_int8, w_scale = ctx.saved_tensors
    grad_x = (grad.float() @ (w_int8.to(torch.float32) * w_scale[:, None])).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_b


w8a16_linear.register_autograd(_backward, setup_context=_setup_context)
