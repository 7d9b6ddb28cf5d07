"""qhl::lr_w4a16_linear — a float low-rank part plus an int4 group-wise residual (frozen).

    W = L1 L2 + (C - z) * s                  (see codegen/lowrank.py for how it is built)
    y[..., N] = (x @ L2^T) @ L1^T + x @ ((C - z) * s)^T (+ b)

x [..., K] float; l1 [N, r] and l2 [r, K] float16; w_packed uint8 [N, K/2], w_scale float32
[N, K/g], w_zero uint8 [N, K/g]: exactly qhl::w4a16_linear's arguments (codegen/w4a16.py), so
the residual runs through the w4a16 faces. Math in float32, output in x's dtype.

Faces: spec (here: w4a16's spec on float32 x plus the low-rank product), fake, kernel (CUDA:
w4a16's Triton GEMM plus codegen/triton/lowrank.py's low-rank kernel, two launches), grad (dx;
everything frozen), onnx (codegen/onnx/lr_w4a16.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import quant
from qhl.codegen.w4a16 import w4a16_linear_spec

__all__ = ["lr_w4a16_linear", "lr_w4a16_linear_spec"]


def lr_w4a16_linear_spec(
    x: Tensor, l1: Tensor, l2: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor,
    group_size: int, bias: Optional[Tensor],
) -> Tensor:
    n, k = l1.shape[0], l2.shape[1]
    x2 = x.reshape(-1, k).float()
    y = w4a16_linear_spec(x2, w_packed, w_scale, w_zero, group_size, None)  # float32 [M, N]
    y = y + (x2 @ l2.float().t()) @ l1.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::lr_w4a16_linear", mutates_args=())
def lr_w4a16_linear(
    x: Tensor, l1: Tensor, l2: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor,
    group_size: int, bias: Optional[Tensor],
) -> Tensor:
    """Spec face: see the module docstring."""
    return lr_w4a16_linear_spec(x, l1, l2, w_packed, w_scale, w_zero, group_size, bias)


@lr_w4a16_linear.register_fake
def _(x, l1, l2, w_packed, w_scale, w_zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], l1.shape[0]))


@lr_w4a16_linear.register_kernel("cuda")
def _(x, l1, l2, w_packed, w_scale, w_zero, group_size, bias):
    from qhl.codegen.triton.lowrank import lr_w4a16_linear_triton

    return lr_w4a16_linear_triton(x, l1, l2, w_packed, w_scale, w_zero, group_size, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, l1, l2, w_packed, w_scale, w_zero, group_size, bias = inputs
    ctx.save_for_backward(l1, l2, w_packed, w_scale, w_zero)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    l1, l2, w_packed, w_scale, w_zero = ctx.saved_tensors
    g = grad.float()
    w = quant.dequantize_int4_groupwise(w_packed, w_scale, w_zero, ctx.group_size)
    grad_x = (g @ w + (g @ l1.float()) @ l2.float()).to(ctx.x_dtype)
    grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(grad.dtype) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, None, grad_b


lr_w4a16_linear.register_autograd(_backward, setup_context=_setup_context)
