"""qhl::w8a8_linear — int8 weights (per output channel), dynamic per-token int8 activations.

    y[..., N] = (Q(x) @ Wq.T) * s_x * s_w (+ b)        x [..., K] float, Wq [N, K] int8, s_w [N]

Q(x) is qhl::quantize_per_token. The int8 x int8 products accumulate exactly in int32; the
dequantize (+ bias) is the epilogue. Faces:
  spec    this file (CPU): torch._int_mm, which is exact and is the fast CPU int8 GEMM (the
          formulation is chosen by M, see below and benchmarks/cpu_spec_notes.md);
  fake    shape [..., N], dtype of x;
  kernel  codegen/triton/w8a8.py (CUDA): per-token quant prologue + int8 GEMM + dequant epilogue;
  grad    straight-through for x: dx = dy @ (Wq * s_w); db = sum(dy). The weight is frozen;
  onnx    (next issue) DynamicQuantizeLinear + MatMulInteger.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import quant

__all__ = ["w8a8_linear", "w8a8_linear_spec", "int8_gemm_cpu", "dequant_epilogue"]


# CPU: which GEMM formulation, by the number of tokens M (measured in benchmarks/cpu_spec_notes.md).
# M = 1 (a GEMV) is oneDNN's fastest s8 x s8 shape per token, so up to a few tokens run one GEMV
# each. Above that its s8 x s8 GEMM is much faster as acc^T = Wq @ q^T than as q @ Wq^T for
# small/medium M (the transpose back is paid in the epilogue). For large M, u8 x s8 (VNNI-native)
# wins once the transposed epilogue is counted: q + 128 as uint8, and one extra activation row of
# 128s whose output row is the compensation 128 * sum_k Wq[n, k], subtracted exactly in int32.
_ROWWISE_MAX_M = 4
_TRANSPOSED_MAX_M = 256


def int8_gemm_cpu(codes: Tensor, w_int8: Tensor, ws: Tensor) -> Tensor:
    """(codes @ w_int8.T) * ws as a fresh float32 [M, N], the int32 sums exact, on the CPU
    formulation chosen by M (above). `codes` [M, K] holds integers in [-127, 127], as int8 or as
    float32 (the rounded, clamped quotients, converted here straight into the layout the GEMM
    reads); w_int8 [N, K] contiguous int8; ws float32 [N]. Scratch buffers are reused per thread."""
    m, k = codes.shape
    n = w_int8.shape[0]
    if m <= _ROWWISE_MAX_M:
        xq = codes if codes.dtype == torch.int8 else codes.to(torch.int8)
        if m == 1:
            acc = torch._int_mm(xq, w_int8.t())
        else:
            acc = torch.empty(m, n, dtype=torch.int32)
            for i in range(m):
                torch._int_mm(xq[i : i + 1], w_int8.t(), out=acc[i : i + 1])
        return torch.mul(acc, ws)
    if m <= _TRANSPOSED_MAX_M:
        xq = codes if codes.dtype == torch.int8 else quant._scratch("w8a8.q", (m, k), torch.int8).copy_(codes)
        acc_t = quant._scratch("w8a8.acc", (n, m), torch.int32)
        torch._int_mm(w_int8, xq.t(), out=acc_t)
        y_t = quant._scratch("w8a8.yt", (n, m), torch.float32).copy_(acc_t)
        y_t.mul_(ws[:, None])
        return torch.empty(m, n).copy_(y_t.t())
    xu = quant._scratch("w8a8.u", (m + 1, k), torch.uint8)
    xu[:m].view(torch.int8).copy_(codes)
    xu[:m].bitwise_xor_(0x80)  # q + 128 in [1, 255]
    xu[m].fill_(128)
    acc = quant._scratch("w8a8.acc", (m + 1, n), torch.int32)
    torch._int_mm(xu, w_int8.t(), out=acc)
    acc[:m].sub_(acc[m])  # exact: sum (q + 128) w - sum 128 w
    y = acc[:m].to(torch.float32)
    return y.mul_(ws)


def dequant_epilogue(y: Tensor, xs: Tensor, bias: Optional[Tensor], x: Tensor, n: int) -> Tensor:
    """y = acc * s_w (fresh float32 [M, N]) -> y * s_x (+ b), in x's dtype and leading shape."""
    if bias is not None:
        y = torch.addcmul(bias.float(), y, xs, out=y)
    else:
        y.mul_(xs)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a8_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    n, k = w_int8.shape
    if not (quant._cpu_fast_path_ok(x, w_int8, w_scale, bias) and w_int8.is_contiguous()):
        return _w8a8_linear_generic(x, w_int8, w_scale, bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    if m <= _ROWWISE_MAX_M:
        codes, xs = quant.quantize_per_token(x2)
    else:
        # Prologue: quant.quantize_per_token bit for bit (same scale, x / scale, round, clamp),
        # through a reused buffer; the GEMM converts the float codes into its own layout.
        xf = x2.float()
        xs = quant._per_token_scale(xf)
        codes = torch.div(xf, xs, out=quant._scratch("w8a8.v", (m, k), torch.float32))
        codes.round_().clamp_(-quant.INT8_QMAX, quant.INT8_QMAX)
    return dequant_epilogue(int8_gemm_cpu(codes, w_int8, ws), xs, bias, x, n)


def _w8a8_linear_generic(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """The definition in plain ops (any device, autograd-visible): used off the CPU fast path."""
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)
    xq, xs = quant.quantize_per_token(x2)
    # w_int8 is stored [N, K] contiguous: the transposed view is the layout _int_mm is fast on.
    acc = torch._int_mm(xq, w_int8.t())
    y = acc.to(torch.float32).mul_(xs).mul_(w_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Spec face: see the module docstring."""
    return w8a8_linear_spec(x, w_int8, w_scale, bias)


@w8a8_linear.register_fake
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@w8a8_linear.register_kernel("cuda")
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from qhl.codegen.triton.w8a8 import w8a8_linear_triton

    return w8a8_linear_triton(x, w_int8, w_scale, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, w_int8, w_scale, bias = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    w_int8, w_scale = ctx.saved_tensors
    w = w_int8.to(torch.float32) * w_scale[:, None]
    grad_x = (grad.float() @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_b


w8a8_linear.register_autograd(_backward, setup_context=_setup_context)
