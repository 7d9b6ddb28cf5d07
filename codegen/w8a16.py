"""qhl::w8a16_linear — int8 weight-only, one scale per output channel.

    y[..., N] = (x @ Wq.T) * s_w (+ b)         x [..., K] float, Wq [N, K] int8, s_w [N]

Applying s_w after the product is the same math as x @ (Wq * s_w).T and saves a pass over W.
Faces: spec (CPU, here), fake, kernel (codegen/triton/weight_only.py, CUDA), grad (dx through
the dequantized weight; weight frozen), onnx (next issue: DequantizeLinear + MatMul).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["w8a16_linear", "w8a16_linear_spec"]


def w8a16_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
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
