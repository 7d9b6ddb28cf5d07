"""qhl::w8a8_linear — int8 weights (per output channel), dynamic per-token int8 activations.

    y[..., N] = (Q(x) @ Wq.T) * s_x * s_w (+ b)        x [..., K] float, Wq [N, K] int8, s_w [N]

Q(x) is qhl::quantize_per_token. The int8 x int8 products accumulate exactly in int32; the
dequantize (+ bias) is the epilogue. Faces:
  spec    this file (CPU): torch._int_mm, which is exact and is the fast CPU int8 GEMM;
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

__all__ = ["w8a8_linear", "w8a8_linear_spec"]


def w8a8_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
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
