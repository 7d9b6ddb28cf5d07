"""W8A8 linear with per-tensor uint8 activations as Triton kernels (the kernel face of
qhl::w8a8_tensor_linear; the spec face and the math are in codegen/w8a8_tensor.py).

    lo, hi  = min(0, min x), max(0, max x)          x [M, K] float, the whole tensor
    s       = (hi - lo) / 255, or 1 where hi == lo   float32
    z       = round_half_even(clamp(0 - lo / s, 0, 255))
    q       = clamp(round_half_even(x / s) + z, 0, 255)               uint8 [M, K]
    acc     = (q - 128) @ Wq.T + (128 - z) * colsum   int8 x int8 -> int32, exact
    y       = acc * (s * s_w[None, :]) (+ b)          float32 epilogue, stored in x's dtype

Wq [N, K] int8 and s_w [N] float32 come from quant.quantize_int8_per_channel; colsum [N] int32 =
sum_k Wq[n, k] is the spec's cached `weight_column_sums`. acc is sum_k (q - z) * Wq exactly:
the int32 sums are exact, and the wrap-around arithmetic of int32 keeps the result exact even
where a partial sum would overflow, as long as the result itself fits (K < 66,000).

Four kernels, in launch order, rendered into one module specialised on K (and N for the GEMM):

    {name}_minmax   grid over blocks of BLOCK_R rows: the min and max of each block (partials),
                    starting from 0, which is the spec's clamp of lo and hi to 0 folded in
    {name}_scale    one program: reduce the partials, then s and z by the spec's float32 ops in
                    its order (IEEE divisions by tl.math.div_rn), written to sz [2] float32
    {name}_quant    the same row blocks: q - 128 as int8 (the uint8 code xor 0x80), so the GEMM
                    dots int8 x int8
    {name}          the GEMM: tl.dot over the codes - 128, then the (128 - z) * colsum correction
                    and the dequantizing epilogue

s, z and q are bit-identical to quantize_per_tensor_u8 (min and max are exact whatever the
reduction order; the divisions are div_rn; rounding adds and subtracts 1.5 * 2**23 so the FPU's
round-to-nearest-even rounds, as in per_token_quant.py), except on inputs with NaN or inf, where
neither result means anything. The int32 GEMM is exact, so y matches the spec bit for bit up to
the float32 epilogue, where a GPU may fuse the bias add into an FMA (one rounding less).
s and z stay on the device: the wrapper never synchronises with the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.codegen.w8a8_tensor import weight_column_sums
from qhl.errors import KernelError

__all__ = ["w8a8_tensor_linear_triton", "per_tensor_quant_u8", "render", "FAMILY"]

FAMILY = "w8a8-tensor"  # the form's name: emit.FAMILIES maps it here
QUANT_TILE = 4096  # elements of x per prologue step: BLOCK_R = QUANT_TILE // BLOCK_K rows
BLOCK_P = 1024  # partials the scale kernel reduces per step

PROLOGUE = '''

@triton.jit
def {name}_minmax(
    x_ptr,  # *x [M, K] float32 / float16 / bfloat16
    part_ptr,  # *partials [2, P] float32 (out): row 0 the block minima, row 1 the block maxima
    M,
    stride_xm, stride_xk,
    stride_pp,  # distance between the two rows of partials
):
    # --- specialisation (baked in by qhl codegen) ---
    K: tl.constexpr = {K}
    BLOCK_K: tl.constexpr = {quant_block_k}
    BLOCK_R: tl.constexpr = {block_r}

    # --- the block of BLOCK_R rows this program reduces ---
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < M
    # int64: a row offset times its stride can pass 2**31 on large inputs
    x_ptrs = x_ptr + offs_r.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk

    # Starting from 0 is the spec's lo = min(0, min x), hi = max(0, max x); masked lanes read 0,
    # which therefore changes nothing. min and max are exact: the order does not matter.
    lo = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    hi = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_r[:, None]{x_kmask}, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, x)
        hi = tl.maximum(hi, x)
        x_ptrs += BLOCK_K * stride_xk
    tl.store(part_ptr + pid, tl.min(tl.min(lo, axis=1), axis=0))
    tl.store(part_ptr + stride_pp + pid, tl.max(tl.max(hi, axis=1), axis=0))


@triton.jit
def {name}_scale(
    part_ptr,  # *partials [2, P] float32, from {name}_minmax
    sz_ptr,  # *(s, z) [2] float32 (out)
    P,
    stride_pp,
):
    BLOCK_P: tl.constexpr = {block_p}
    QMAX: tl.constexpr = 255.0
    # Adding 1.5 * 2**23 leaves no fraction bits in a float32, so the add itself rounds half to
    # even; subtracting it back is exact. Valid for |v| < 2**22, and here 0 <= v <= 255.
    RNE_MAGIC: tl.constexpr = 12582912.0

    offs_p = tl.arange(0, BLOCK_P)
    lo = tl.zeros((BLOCK_P,), dtype=tl.float32)
    hi = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        mask = offs_p < P - p0
        lo = tl.minimum(lo, tl.load(part_ptr + p0 + offs_p, mask=mask, other=0.0))
        hi = tl.maximum(hi, tl.load(part_ptr + stride_pp + p0 + offs_p, mask=mask, other=0.0))
    lo_all = tl.min(lo, axis=0)
    hi_all = tl.max(hi, axis=0)

    # --- s and z as the spec computes them, op for op: IEEE divisions (div_rn), not x * (1/y) ---
    s = tl.math.div_rn(hi_all - lo_all, tl.full((), QMAX, tl.float32))
    s = tl.where(hi_all == lo_all, 1.0, s)
    t = 0.0 - tl.math.div_rn(lo_all, s)
    t = tl.minimum(tl.maximum(t, 0.0), QMAX)
    z = (t + RNE_MAGIC) - RNE_MAGIC
    tl.store(sz_ptr, s)
    tl.store(sz_ptr + 1, z)


@triton.jit
def {name}_quant(
    x_ptr,  # *x [M, K] float32 / float16 / bfloat16
    sz_ptr,  # *(s, z) [2] float32, from {name}_scale
    q_ptr,  # *q - 128 [M, K] int8 (out): the uint8 code xor 0x80
    M,
    stride_xm, stride_xk,
    stride_qm, stride_qk,
):
    # --- specialisation (baked in by qhl codegen) ---
    K: tl.constexpr = {K}
    BLOCK_K: tl.constexpr = {quant_block_k}
    BLOCK_R: tl.constexpr = {block_r}
    QMAX: tl.constexpr = 255.0
    RNE_MAGIC: tl.constexpr = 12582912.0  # round half to even, as in {name}_scale; |x / s| <= 255

    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < M
    x_ptrs = x_ptr + offs_r.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    q_ptrs = q_ptr + offs_r.to(tl.int64)[:, None] * stride_qm + offs_k[None, :] * stride_qk
    s = tl.load(sz_ptr)
    z = tl.load(sz_ptr + 1)

    # --- q = clamp(round_half_even(x / s) + z, 0, 255), the spec's order; stored as q - 128 ---
    for k0 in range(0, K, BLOCK_K):
        mask = mask_r[:, None]{x_kmask}
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), s)
        v = (v + RNE_MAGIC) - RNE_MAGIC
        v = tl.minimum(tl.maximum(v + z, 0.0), QMAX)
        tl.store(q_ptrs, (v.to(tl.int32) - 128).to(tl.int8), mask=mask)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K * stride_qk
'''

TEMPLATE = '''

@triton.jit
def {name}(
    xq_ptr,  # *q - 128 [M, K] int8: the per-tensor uint8 codes, shifted to int8
    sz_ptr,  # *(s, z) [2] float32: the activation scale and zero point
    w_ptr,  # *Wq [N, K] int8
    ws_ptr,  # *s_w [N] float32
    cs_ptr,  # *colsum [N] int32: sum_k Wq[n, k]
    b_ptr,  # *bias [N] (read only when the epilogue adds one)
    y_ptr,  # *y [M, N], x's dtype (out)
    M,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ws, stride_cs, stride_b,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr,  # chosen at launch from M, the only size not known at codegen
):
''' + emit.GEMM_TILE_PROLOGUE + '''\
    # Wq is [N, K]: read it as its transpose [BLOCK_K, BLOCK_N], K contiguous, no copy.
    xq_ptrs = xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # --- main loop: (q - 128) x Wq, int8 x int8 -> int32, exact, in any order of the K steps ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(xq_ptrs, mask=mask_m[:, None]{x_kmask}, other=0)
        b = tl.load(w_ptrs, mask=mask_n[None, :]{w_kmask}, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        xq_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # --- zero point: sum_k (q - z) Wq = sum_k (q - 128) Wq + (128 - z) * colsum, exact int32 ---
    s = tl.load(sz_ptr)
    z = tl.load(sz_ptr + 1)
    colsum = tl.load(cs_ptr + offs_n * stride_cs, mask=mask_n, other=0)
    acc += ((128 - z.to(tl.int32)) * colsum)[None, :]

    # --- epilogue: dequantize in the spec's order, acc * (s * s_w), in float32 ---
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * (s * ws)[None, :]
{epilogue}
'''


def _quant_blocks(spec: emit.KernelSpec) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_R) of the prologue: a power-of-two K step up to 1024, and as many rows as
    keep a step's tile at QUANT_TILE elements (at least 4)."""
    block_k = emit.make_spec("per_token_quant", spec.K, dtype=spec.dtype).block_k
    return block_k, max(QUANT_TILE // block_k, 1)


def render(spec: emit.KernelSpec) -> str:
    """Prologue (min/max, scale, quantize: this K) + GEMM (this K, N, blocks, epilogue, dtype)."""
    quant_block_k, block_r = _quant_blocks(spec)
    prologue = PROLOGUE.format(
        name=spec.name,
        K=spec.K,
        quant_block_k=quant_block_k,
        block_r=block_r,
        block_p=BLOCK_P,
        x_kmask="" if spec.K % quant_block_k == 0 else " & (offs_k[None, :] < K - k0)",
    )
    return prologue + TEMPLATE.format(
        **emit.gemm_fields(spec),
        extra_constants="",
        epilogue=emit.render_epilogue(spec),
    )


def _quantize(module, spec: emit.KernelSpec, x2: Tensor) -> tuple[Tensor, Tensor]:
    """Run the prologue on a non-empty 2-D x: (q - 128 int8 [M, K], (s, z) float32 [2])."""
    M, K = x2.shape
    _, block_r = _quant_blocks(spec)
    P = (M + block_r - 1) // block_r
    partials = torch.empty((2, P), dtype=torch.float32, device=x2.device)
    sz = torch.empty((2,), dtype=torch.float32, device=x2.device)
    xq = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    getattr(module, f"{spec.name}_minmax")[(P,)](
        x2, partials, M, x2.stride(0), x2.stride(1), partials.stride(0)
    )
    getattr(module, f"{spec.name}_scale")[(1,)](partials, sz, P, partials.stride(0))
    getattr(module, f"{spec.name}_quant")[(P,)](
        x2, sz, xq, M, x2.stride(0), x2.stride(1), xq.stride(0), xq.stride(1)
    )
    return xq, sz


def per_tensor_quant_u8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The prologue alone, in the spec's terms: x [..., K] non-empty -> (q uint8 like x,
    s float32 [], z float32 []), as quantize_per_tensor_u8. For tests and inspection; the
    wrapper keeps q as int8 q - 128. The prologue depends on K and dtype only, so it runs from
    the module rendered for the smallest N."""
    op = "per_tensor_quant_u8"
    emit.check_tensor(op, "x", x, tuple(emit.DTYPES))
    emit.check_device(op, x=x)
    if x.dim() == 0 or x.numel() == 0:
        raise KernelError(f"{op}: x must be a non-empty [..., K], got shape {list(x.shape)}")
    K = x.shape[-1]
    spec = emit.make_spec(FAMILY, K, emit.MIN_BLOCK_MN, x.dtype)
    xq, sz = _quantize(emit.load(spec), spec, x.reshape(-1, K))
    q = (xq.view(torch.uint8) ^ 0x80).reshape(x.shape)
    return q, sz[0], sz[1]


def w8a8_tensor_linear_triton(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """y [..., N] = (D(x) - z) @ Wq.T * (s * s_w) (+ b), in x's dtype; see the module docstring."""
    N, K = emit.check_int8_linear("w8a8_tensor_linear", x, w_int8, w_scale, bias)
    spec = emit.make_spec(FAMILY, K, N, x.dtype, has_bias=bias is not None)
    module = emit.load(spec)

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    xq, sz = _quantize(module, spec, x2)
    colsum = weight_column_sums(w_int8)  # int32 [N], cached per weight

    block_m = emit.block_m_for(M)
    grid = ((M + block_m - 1) // block_m, (N + spec.block_n - 1) // spec.block_n)
    getattr(module, spec.name)[grid](
        xq, sz, w_int8, w_scale, colsum, bias, y,
        M,
        xq.stride(0), xq.stride(1),
        w_int8.stride(0), w_int8.stride(1),
        w_scale.stride(0), colsum.stride(0), bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        BLOCK_M=block_m,
    )
    return y.reshape(*x.shape[:-1], N)
