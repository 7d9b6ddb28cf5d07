"""W4A8 / W4A4 linear as Triton kernels (the kernel face of qhl::w4a8_linear, qhl::w4a4_linear).

    xq, s_x = Q_b(x R)                       x [M, K] float -> int8 codes [M, K], float32 [M, 1]
    Wq      = unpack(w_packed) - 8           uint8 [N, K/2], two codes per byte -> int8 [-8, 7]
    acc     = xq @ Wq.T                      int8 x int8 -> int32, exact
    y       = (acc * s_w) * s_x (+ b)        float32 epilogue, stored in x's dtype

Q_b is the symmetric per-token quantizer with qmax = 2^(b-1) - 1 (127 for w4a8, 7 for w4a4): the
per-token kernel rendered by codegen/triton/per_token_quant.py with that qmax, bit-exact with
qhl.codegen.quant.quantize_per_token_bits. When hadamard_block >= 0
the prologue is qhl::hadamard_quantize_per_token instead (R = the Hadamard rotation), whose own
CUDA kernel runs; the GEMM is the same.

The GEMM never materialises the unpacked weight. Byte j of a weight row holds k = 2j (low
nibble) and k = 2j + 1 (high nibble), so each k-step loads BLOCK_KH bytes of W [BLOCK_KH, BLOCK_N],
splits them into the even-k and odd-k code tiles, and loads the matching even and odd columns of
xq: acc += xq[:, 0::2] @ lo + xq[:, 1::2] @ hi. Two int8 tl.dots per step, each with K-extent
BLOCK_KH (>= 32, the NVIDIA backend's minimum for int8 dots). The int32 sums are exact
(|acc| <= 127 * 8 * K), so the kernel equals the spec's torch._int_mm up to the float32
epilogue, where a GPU may fuse the bias add into an FMA (one rounding less).

The GEMM is not templated per node (unlike w8a8): K and N are runtime arguments, the rest
constexprs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.codegen.triton.per_token_quant import per_token_quant_bits
from qhl.errors import KernelError

__all__ = ["w4ax_linear_triton", "BLOCK_KH"]

BLOCK_KH = 32  # packed bytes per k-step: 64 values of K, two int8 dots of K-extent 32


@triton.jit
def w4ax_gemm_kernel(
    xq_ptr,  # *xq [M, K] int8: the per-token quantized activations
    xs_ptr,  # *s_x [M] float32
    w_ptr,  # *w_packed [N, K/2] uint8: code + 8, low nibble = even k
    ws_ptr,  # *s_w [N] float32
    b_ptr,  # *bias [N] (read only when HAS_BIAS)
    y_ptr,  # *y [M, N], x's dtype (out)
    M, N, KH,  # KH = K / 2, the packed row length
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    BF16_RNE: tl.constexpr,  # interpreter only: round fp32 -> bf16 to nearest even, as a GPU does
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KH)  # packed byte j <-> k = 2j (low nibble) and 2j + 1 (high)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # even / odd columns of xq [BLOCK_M, BLOCK_KH]; W read as its transpose [BLOCK_KH, BLOCK_N]
    x_even_ptrs = xq_ptr + offs_m[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_j[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # --- main loop: int8 x int8 -> int32, exact, so the order of the k-steps does not matter ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j0 in range(0, KH, BLOCK_KH):
        mask_j = offs_j < KH - j0
        a_even = tl.load(x_even_ptrs, mask=mask_m[:, None] & mask_j[None, :], other=0)
        a_odd = tl.load(x_even_ptrs + stride_xk, mask=mask_m[:, None] & mask_j[None, :], other=0)
        # other=0x88: a padded byte unpacks to codes 0 (its x columns are 0 too)
        packed = tl.load(w_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0x88)
        lo = (packed & 0xF).to(tl.int8) - 8
        hi = (packed >> 4).to(tl.int8) - 8
        acc = tl.dot(a_even, lo, acc, out_dtype=tl.int32)
        acc = tl.dot(a_odd, hi, acc, out_dtype=tl.int32)
        x_even_ptrs += 2 * BLOCK_KH * stride_xk
        w_ptrs += BLOCK_KH * stride_wk

    # --- epilogue: dequantize in the spec's order, (acc * s_w) * s_x (+ b), in float32 ---
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * ws[None, :] * xs[:, None]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        y += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if BF16_RNE:
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y_out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, y_out, mask=mask_m[:, None] & mask_n[None, :])


def _check(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    op = "w4ax_linear"
    emit.check_tensor(op, "w_packed", w_packed, (torch.uint8,))
    if w_packed.dim() != 2 or 0 in w_packed.shape:
        raise KernelError(f"{op}: w_packed must be a non-empty [N, K/2] matrix, got {list(w_packed.shape)}")
    N, K = w_packed.shape[0], 2 * w_packed.shape[1]
    emit.check_x_and_bias(op, x, N, K, bias)
    emit.check_tensor(op, "w_scale", w_scale, (torch.float32,), (N,))
    emit.check_device(op, x=x, w_packed=w_packed, w_scale=w_scale, bias=bias)
    return N, K


def w4ax_linear_triton(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int, bits: int
) -> Tensor:
    """y [..., N] = (Q_b(x R) @ Wq.T) * s_w * s_x (+ b), in x's dtype; see the module docstring."""
    N, K = _check(x, w_packed, w_scale, bias)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    if hadamard_block < 0:
        xq, xs = per_token_quant_bits(x2, bits)
    else:
        from qhl.codegen.w4ax import quantize_activations

        xq, xs = quantize_activations(x2, hadamard_block, bits)
    block_m = emit.block_m_for(M)
    block_n = min(max(triton.next_power_of_2(N), emit.MIN_BLOCK_MN), emit.MAX_BLOCK)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    w4ax_gemm_kernel[grid](
        xq, xs, w_packed, w_scale, bias, y,
        M, N, K // 2,
        xq.stride(0), xq.stride(1),
        w_packed.stride(0), w_packed.stride(1),
        bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        BF16_RNE=x.dtype == torch.bfloat16 and emit.interpret_mode(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KH=BLOCK_KH,
    )
    return y.reshape(*x.shape[:-1], N)
