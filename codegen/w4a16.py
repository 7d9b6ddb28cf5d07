"""qhl::w4a16_linear — int4 group-wise weight-only (symmetric or asymmetric).

    W[n, k] = (c[n, k] - z[n, k // g]) * s[n, k // g]     c: 4-bit codes, two per byte along K
    y[..., N] = x @ W.T (+ b)

x [..., K] float; packed uint8 [N, K/2]; scale float32 [N, K/g]; zero uint8 [N, K/g] (8 when
symmetric). Faces: spec (CPU, here), fake, kernel (codegen/triton/weight_only.py, CUDA: a
dequantizing GEMM), grad (dx through the dequantized weight; weight frozen), onnx (next issue:
blocked uint4 DequantizeLinear + MatMul).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import quant

__all__ = ["w4a16_linear", "w4a16_linear_spec"]


def w4a16_linear_spec(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    n = packed.shape[0]
    k = packed.shape[1] * 2
    w = quant.dequantize_int4_groupwise(packed, scale, zero, group_size)
    y = x.reshape(-1, k).float() @ w.t()
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """Spec face: see the module docstring."""
    return w4a16_linear_spec(x, packed, scale, zero, group_size, bias)


@w4a16_linear.register_fake
def _(x, packed, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@w4a16_linear.register_kernel("cuda")
def _(x, packed, scale, zero, group_size, bias):
    from qhl.codegen.triton.weight_only import w4a16_linear_triton

    return w4a16_linear_triton(x, packed, scale, zero, group_size, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scale, zero, group_size, bias = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    packed, scale, zero = ctx.saved_tensors
    w = quant.dequantize_int4_groupwise(packed, scale, zero, ctx.group_size)
    grad_x = (grad.float() @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_b


w4a16_linear.register_autograd(_backward, setup_context=_setup_context)
