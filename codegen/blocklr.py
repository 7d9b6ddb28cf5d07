"""qhl::blocklr_linear — a weight stored as a k x k grid of low-rank blocks (frozen).

    W[j-th row block, n-th column block] = W_jn = U_jn V_jn       (see codegen/lowrank.py)
    y[..., j-th N/k slice] = sum_n (x[..., n-th K/k slice] @ V_jn^T) @ U_jn^T (+ b)

x [..., K] float; u [R, N/k] and v [R, K/k] float16 (flat rank-major layout: block b = j*k + n
owns rows offsets[b]:offsets[b+1], offsets = cumsum of `ranks`); ranks: k*k static ints
(k = sqrt(len(ranks))); bias [N] or None. Math in float32, output in x's dtype. The dense W is
never formed: a token costs R * (N/k + K/k) multiply-adds, against N * K for the dense layer.

Faces: spec (here, plain torch ops), fake, kernel (codegen/triton/lowrank.py, CUDA), grad
(dx = the same product transposed; the factors are frozen), onnx (codegen/onnx/blocklr.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["blocklr_linear", "blocklr_linear_spec", "blocklr_grid", "blocklr_apply"]


def blocklr_grid(ranks: list[int]) -> int:
    """k from the k*k ranks (ValueError unless len(ranks) is a square)."""
    k = math.isqrt(len(ranks))
    if k < 1 or k * k != len(ranks):
        raise ValueError(f"blocklr: ranks must hold k*k entries, got {len(ranks)}")
    return k


def blocklr_apply(x2: Tensor, u: Tensor, v: Tensor, ranks: list[int], transpose: bool = False) -> Tensor:
    """x2 [M, K] float32 -> x2 @ W^T [M, N] (transpose=False) or x2 [M, N] -> x2 @ W [M, K]."""
    k = blocklr_grid(ranks)
    nb, kb = u.shape[1], v.shape[1]
    uf, vf = u.float(), v.float()
    in_b, out_b = (nb, kb) if transpose else (kb, nb)
    parts = [x2.new_zeros(x2.shape[0], out_b) for _ in range(k)]
    o = 0
    for b, r in enumerate(ranks):
        j, n = divmod(b, k)
        if r:
            ub, vb = uf[o : o + r], vf[o : o + r]
            if transpose:  # grad_x[:, n] += (g[:, j] @ U_jn) @ V_jn
                parts[n] = parts[n] + (x2[:, j * in_b : (j + 1) * in_b] @ ub.t()) @ vb
            else:  # y[:, j] += (x[:, n] @ V_jn^T) @ U_jn^T
                parts[j] = parts[j] + (x2[:, n * in_b : (n + 1) * in_b] @ vb.t()) @ ub
        o += r
    return torch.cat(parts, dim=1)


def blocklr_linear_spec(x: Tensor, u: Tensor, v: Tensor, ranks: list[int], bias: Optional[Tensor]) -> Tensor:
    k = blocklr_grid(ranks)
    n_out, n_in = k * u.shape[1], k * v.shape[1]
    y = blocklr_apply(x.reshape(-1, n_in).float(), u, v, ranks)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)


@torch.library.custom_op("qhl::blocklr_linear", mutates_args=())
def blocklr_linear(x: Tensor, u: Tensor, v: Tensor, ranks: list[int], bias: Optional[Tensor]) -> Tensor:
    """Spec face: see the module docstring."""
    return blocklr_linear_spec(x, u, v, ranks, bias)


@blocklr_linear.register_fake
def _(x, u, v, ranks, bias):
    return x.new_empty((*x.shape[:-1], blocklr_grid(ranks) * u.shape[1]))


@blocklr_linear.register_kernel("cuda")
def _(x, u, v, ranks, bias):
    from qhl.codegen.triton.lowrank import blocklr_linear_triton

    return blocklr_linear_triton(x, u, v, ranks, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, u, v, ranks, bias = inputs
    ctx.save_for_backward(u, v)
    ctx.ranks = list(ranks)
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    u, v = ctx.saved_tensors
    k = blocklr_grid(ctx.ranks)
    n_out = k * u.shape[1]
    g2 = grad.reshape(-1, n_out).float()
    grad_x = blocklr_apply(g2, u, v, ctx.ranks, transpose=True).to(ctx.x_dtype).reshape(*grad.shape[:-1], -1)
    grad_b = g2.sum(0).to(grad.dtype) if ctx.has_bias else None
    return grad_x, None, None, None, grad_b


blocklr_linear.register_autograd(_backward, setup_context=_setup_context)
