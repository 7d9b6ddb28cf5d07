"""GraLoRA / LoRA linear as Triton kernels (the kernel face of qhl::gralora_linear and
qhl::gralora_w4a16_linear). Notation of codegen/gralora.py: T tokens, k blocks, I = in/k,
O = out/k, R the GraLoRA rank, c = R/k, s the scaling, hr the hybrid rank.

Three kernels, each used forwards and backwards with different strides:

  block_project_regroup   dst[t, j, n*c + q] = sum_f src[t, n*F + f] * P[n, f, j*c + q]
                          forward: h = x_adapter A regrouped (g [T, k, R]);  backward: the
                          gradient dy B^T regrouped back (dh [T, k, R]). With k = 1 it is a plain
                          projection (the hybrid branch: u = x hybrid_a^T, du = dy hybrid_b).
  gemm_lowrank            y[t, m] = sum_q a[t, q] w[q, m] (+ base[t, m]) (+ b[m])
                                    + s * (lr[t, blk(m), :] @ E[blk(m), :, m mod D] + v[t, :] @ H[:, m])
                          the base GEMM with the block low-rank branch as its epilogue.
                          forward: a = x, w = W^T, lr = g, E = B, v = u, H = hybrid_b^T;
                          backward dx: a = dy, w = W, lr = dh, E = A^T, v = du, H = hybrid_a.
                          A tile of BLOCK_N columns may straddle output blocks, so the epilogue
                          loops over the (usually one) blocks the tile touches, masking E.
  batched_tn              out[b, p, q] = s * sum_t L[t, b, p] * Rt[t, b, q]
                          dA = s x_blocks^T dh, dB = s g^T dy_blocks, and the hybrid gradients.

The frozen base weight gets no gradient. Loads are cast to float32 before every tl.dot (fp16/bf16
inputs accumulate in float32), outputs are stored in the output's dtype. Block sizes are >= 16
on every dot dimension (the GPU minimum); the interpreter (TRITON_INTERPRET=1, read when this
module is imported) runs the same kernels on CPU for the tests.

The w4a16 variant runs the existing dequantizing GEMM (codegen/triton/weight_only.py) for the base
and feeds its output to gemm_lowrank as `base` (so it is two launches, not one fused GEMM).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.errors import KernelError

__all__ = [
    "gralora_linear_triton",
    "gralora_w4a16_linear_triton",
    "gralora_backward_triton",
    "block_project_regroup",
    "gemm_lowrank",
    "batched_tn",
    "supports",
    "MAX_RANK",
]

MIN_BLOCK = 16  # tl.dot's minimum per dimension on a GPU
# Ranks (R and hybrid_r) up to this fit in one register tile; larger adapters use the spec face
# (plain torch ops, which run on CUDA too): see `supports`.
MAX_RANK = 256


def supports(lora_a: Tensor, hybrid_a: Optional[Tensor]) -> bool:
    """Whether these kernels handle the adapter: every rank <= MAX_RANK."""
    return lora_a.shape[2] <= MAX_RANK and (hybrid_a is None or hybrid_a.shape[0] <= MAX_RANK)


def _pow2_block(n: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(max(int(n), 1)), MIN_BLOCK), cap)


@triton.jit
def _dot_k_loop(
    acc, a_ptrs, b_ptrs, mask_a, mask_b, K, stride_ak, stride_bk, BLOCK_K: tl.constexpr
):
    """acc + a @ b over K in BLOCK_K steps; the main loop of all three kernels.

    a_ptrs [BLOCK_A, BLOCK_K] and b_ptrs [BLOCK_K, BLOCK_B] point at the first K step (built with
    offsets tl.arange(0, BLOCK_K) along K); mask_a [BLOCK_A] masks a's rows, mask_b [BLOCK_B] b's
    columns; stride_ak / stride_bk step a and b along K. Loads are cast to float32 before the dot:
    fp16/bf16 inputs accumulate in float32, and a bf16 dot is wrong in the interpreter."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_a[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_b[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# --- kernel 1: per-block projection, stored regrouped --------------------------------------------


@triton.jit
def block_project_regroup_kernel(
    src_ptr,  # *src [T, k * F]: x_adapter (forward) or dy (backward)
    p_ptr,  # *P, indexed [n, f, r] through strides: A (forward) or B^T (backward)
    dst_ptr,  # *dst [T, k, R] float32 (out): g or dh
    T,
    stride_st,
    stride_sf,
    stride_pn,
    stride_pf,
    stride_pr,
    stride_dt,
    stride_dj,
    stride_dr,
    F: tl.constexpr,  # features per block (I or O)
    R: tl.constexpr,  # rank of one block's projection
    C: tl.constexpr,  # R / k: the chunk of the rank that goes to each output block
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1)  # the input block this program projects
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_F)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < R
    src_ptrs = src_ptr + offs_t[:, None] * stride_st + (n * F + offs_f[None, :]) * stride_sf
    p_ptrs = p_ptr + n * stride_pn + offs_f[:, None] * stride_pf + offs_r[None, :] * stride_pr

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc = _dot_k_loop(acc, src_ptrs, p_ptrs, mask_t, mask_r, F, stride_sf, stride_pf, BLOCK_F)

    # regroup: rank index r = j*C + q of block n lands at dst[t, j, n*C + q]
    j = offs_r // C
    q = offs_r % C
    dst_ptrs = (
        dst_ptr
        + offs_t[:, None] * stride_dt
        + j[None, :] * stride_dj
        + (n * C + q[None, :]) * stride_dr
    )
    tl.store(dst_ptrs, acc, mask=mask_t[:, None] & mask_r[None, :])


def block_project_regroup(
    src2: Tensor, p: Tensor, p_strides: tuple[int, int, int], k: int, r: int
) -> Tensor:
    """src2 [T, k*F]; p indexed [n, f, r] by p_strides -> float32 [T, k, R] (see the docstring)."""
    t, width = src2.shape
    f = width // k
    dst = torch.empty((t, k, r), dtype=torch.float32, device=src2.device)
    if t == 0:
        return dst
    block_t = _pow2_block(t, 64)
    grid = (triton.cdiv(t, block_t), k)
    block_project_regroup_kernel[grid](
        src2,
        p,
        dst,
        t,
        src2.stride(0),
        src2.stride(1),
        *p_strides,
        dst.stride(0),
        dst.stride(1),
        dst.stride(2),
        F=f,
        R=r,
        C=r // k,
        BLOCK_T=block_t,
        BLOCK_F=_pow2_block(f, 64),
        BLOCK_R=_pow2_block(r, MAX_RANK),
    )
    return dst


# --- kernel 2: base GEMM with the block low-rank epilogue ------------------------------------------


@triton.jit
def gemm_lowrank_kernel(
    a_ptr,  # *a [M, K]: x (forward) or dy (backward dx)
    w_ptr,  # *w indexed [K, N] through strides: W^T (forward) or W (backward)
    base_ptr,  # *base [M, N], added when ADD_BASE (the w4a16 base output)
    bias_ptr,  # *bias [N]
    lr_ptr,  # *lr [M, NB, R] float32: g (forward) or dh (backward)
    e_ptr,  # *E indexed [NB, R, D] through strides: B (forward) or A^T (backward)
    v_ptr,  # *v [M, HR] float32: the hybrid u (forward) or du (backward)
    h_ptr,  # *H indexed [HR, N] through strides: hybrid_b^T (forward) or hybrid_a (backward)
    y_ptr,  # *y [M, N] (out)
    M,
    N,
    K,
    scale,
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_basem,
    stride_basen,
    stride_lrm,
    stride_lrb,
    stride_lrr,
    stride_eb,
    stride_er,
    stride_ed,
    stride_vm,
    stride_vr,
    stride_hr,
    stride_hn,
    stride_ym,
    stride_yn,
    D: tl.constexpr,  # columns per block (O forward, I backward)
    R: tl.constexpr,
    HR: tl.constexpr,
    HAS_GEMM: tl.constexpr,
    ADD_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_HYBRID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # --- main loop: the frozen base, a @ w, float32 accumulation ---
    if HAS_GEMM:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = _dot_k_loop(acc, a_ptrs, w_ptrs, mask_m, mask_n, K, stride_ak, stride_wk, BLOCK_K)
    if ADD_BASE:
        base_ptrs = base_ptr + offs_m[:, None] * stride_basem + offs_n[None, :] * stride_basen
        acc += tl.load(base_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # --- epilogue: s * (block low-rank + hybrid), added to the tile ---
    lowrank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_first = pid_n * BLOCK_N
        n_last = tl.minimum(n_first + BLOCK_N, N) - 1
        # the output blocks this tile touches: one unless BLOCK_N does not divide D
        for blk in range(n_first // D, n_last // D + 1):
            lr_ptrs = (
                lr_ptr
                + offs_m[:, None] * stride_lrm
                + blk * stride_lrb
                + offs_r[None, :] * stride_lrr
            )
            lr = tl.load(lr_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            in_blk = mask_n & (offs_n // D == blk)
            e_ptrs = (
                e_ptr
                + blk * stride_eb
                + offs_r[:, None] * stride_er
                + (offs_n - blk * D)[None, :] * stride_ed
            )
            e = tl.load(e_ptrs, mask=mask_r[:, None] & in_blk[None, :], other=0.0).to(tl.float32)
            lowrank = tl.dot(lr, e, lowrank)
    if HAS_HYBRID:
        offs_h = tl.arange(0, BLOCK_HR)
        mask_h = offs_h < HR
        v = tl.load(
            v_ptr + offs_m[:, None] * stride_vm + offs_h[None, :] * stride_vr,
            mask=mask_m[:, None] & mask_h[None, :],
            other=0.0,
        )
        hh = tl.load(
            h_ptr + offs_h[:, None] * stride_hr + offs_n[None, :] * stride_hn,
            mask=mask_h[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        lowrank = tl.dot(v, hh, lowrank)
    acc += scale * lowrank

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_lowrank(
    m: int,
    n: int,
    out_dtype: torch.dtype,
    device: torch.device,
    scale: float,
    gemm: Optional[tuple[Tensor, Tensor, tuple[int, int]]] = None,
    base: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    lowrank: Optional[tuple[Tensor, Tensor, tuple[int, int, int], int]] = None,
    hybrid: Optional[tuple[Tensor, Tensor, tuple[int, int]]] = None,
) -> Tensor:
    """y [M, N] = a @ w (+ base) (+ bias) + scale * (block low-rank + hybrid); each part optional.

    gemm    = (a [M, K], w, (stride_wk, stride_wn))
    lowrank = (lr [M, NB, R] float32, E, (stride_eb, stride_er, stride_ed), D)
    hybrid  = (v [M, HR] float32, H, (stride_hr, stride_hn))"""
    y = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0:
        return y
    dummy = y
    a, w, w_strides = gemm if gemm is not None else (dummy, dummy, (0, 0))
    k_dim = a.shape[1] if gemm is not None else 0
    lr, e, e_strides, d = (
        lowrank if lowrank is not None else (dummy.new_empty(1, 1, 1), dummy, (0, 0, 0), 1)
    )
    r = lr.shape[2] if lowrank is not None else 1
    v, h, h_strides = hybrid if hybrid is not None else (dummy, dummy, (0, 0))
    hr = v.shape[1] if hybrid is not None else 1
    base_t = base if base is not None else dummy
    block_m = _pow2_block(m, 64)
    block_n = _pow2_block(n, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    gemm_lowrank_kernel[grid](
        a,
        w,
        base_t,
        bias if bias is not None else dummy,
        lr,
        e,
        v,
        h,
        y,
        m,
        n,
        k_dim,
        float(scale),
        a.stride(0),
        a.stride(1),
        *w_strides,
        base_t.stride(0),
        base_t.stride(1),
        lr.stride(0),
        lr.stride(1),
        lr.stride(2),
        *e_strides,
        v.stride(0),
        v.stride(1),
        *h_strides,
        y.stride(0),
        y.stride(1),
        D=d,
        R=r,
        HR=hr,
        HAS_GEMM=gemm is not None,
        ADD_BASE=base is not None,
        HAS_BIAS=bias is not None,
        HAS_LOWRANK=lowrank is not None,
        HAS_HYBRID=hybrid is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_pow2_block(k_dim, 64),
        BLOCK_R=_pow2_block(r, MAX_RANK),
        BLOCK_HR=_pow2_block(hr, MAX_RANK),
    )
    return y


# --- kernel 3: batched L^T @ Rt reduced over tokens (the adapter weight gradients) ------------------


@triton.jit
def batched_tn_kernel(
    l_ptr,  # *L indexed [t, b, p] through strides
    r_ptr,  # *Rt indexed [t, b, q] through strides
    out_ptr,  # *out [NB, P, Q] (out)
    T,
    P,
    Q,
    scale,
    stride_lt,
    stride_lb,
    stride_lp,
    stride_rt,
    stride_rb,
    stride_rq,
    stride_ob,
    stride_op,
    stride_oq,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    # L read as its transpose [BLOCK_P, BLOCK_T], no copy
    l_ptrs = l_ptr + b * stride_lb + offs_p[:, None] * stride_lp + offs_t[None, :] * stride_lt
    r_ptrs = r_ptr + b * stride_rb + offs_t[:, None] * stride_rt + offs_q[None, :] * stride_rq
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc = _dot_k_loop(acc, l_ptrs, r_ptrs, mask_p, mask_q, T, stride_lt, stride_rt, BLOCK_T)
    out_ptrs = out_ptr + b * stride_ob + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    tl.store(
        out_ptrs, (scale * acc).to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :]
    )


def batched_tn(
    lhs: Tensor,
    l_strides: tuple[int, int, int],
    rhs: Tensor,
    r_strides: tuple[int, int, int],
    t: int,
    nb: int,
    p: int,
    q: int,
    scale: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """out [NB, P, Q] = scale * sum_t L[t, b, :]^T Rt[t, b, :] (strides as (t, b, p) and (t, b, q))."""
    out = torch.empty((nb, p, q), dtype=out_dtype, device=lhs.device)
    if t == 0:
        return out.zero_()
    block_p, block_q = _pow2_block(p, 64), _pow2_block(q, 64)
    grid = (triton.cdiv(p, block_p), triton.cdiv(q, block_q), nb)
    batched_tn_kernel[grid](
        lhs,
        rhs,
        out,
        t,
        p,
        q,
        float(scale),
        *l_strides,
        *r_strides,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_T=_pow2_block(t, 64),
    )
    return out


# --- wrappers: validate, allocate, launch ------------------------------------------------------------


def _check(op, x, n_out, k_in, bias, lora_a, lora_b, hybrid_a, hybrid_b, x_adapter) -> None:
    from qhl.codegen.gralora import check_gralora_shapes

    emit.check_x_and_bias(op, x, n_out, k_in, bias)
    reason = check_gralora_shapes(k_in, n_out, lora_a, lora_b, hybrid_a, hybrid_b)
    if reason is not None:
        raise KernelError(f"{op}: {reason}")
    if not supports(lora_a, hybrid_a):
        raise KernelError(f"{op}: ranks above {MAX_RANK} are not supported by the Triton kernels")
    if x_adapter is not None and x_adapter.shape != x.shape:
        raise KernelError(
            f"{op}: x_adapter must have x's shape {list(x.shape)}, got {list(x_adapter.shape)}"
        )
    emit.check_device(
        op,
        x=x,
        bias=bias,
        lora_a=lora_a,
        lora_b=lora_b,
        hybrid_a=hybrid_a,
        hybrid_b=hybrid_b,
        x_adapter=x_adapter,
    )


def _blocks_down(x2: Tensor, lora_a: Tensor) -> Tensor:
    """g [T, k, R] float32: x2 [T, in] through each block's A, regrouped by output block."""
    k, _, r = lora_a.shape
    return block_project_regroup(x2, lora_a, tuple(lora_a.stride()), k, r)


def _hybrid_down(x2: Tensor, hybrid_a: Tensor) -> Tensor:
    """u [T, hr] float32 = x2 hybrid_a^T: one block, hybrid_a^T indexed [0, i, q]."""
    hr = hybrid_a.shape[0]
    u = block_project_regroup(x2, hybrid_a, (0, hybrid_a.stride(1), hybrid_a.stride(0)), 1, hr)
    return u[:, 0, :]


def _tn_2d(lhs: Tensor, rhs: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
    """[P, Q] = scale * lhs^T rhs for lhs [T, P], rhs [T, Q]: batched_tn with one batch."""
    t, p = lhs.shape
    l_strides = (lhs.stride(0), 0, lhs.stride(1))
    r_strides = (rhs.stride(0), 0, rhs.stride(1))
    return batched_tn(lhs, l_strides, rhs, r_strides, t, 1, p, rhs.shape[1], scale, out_dtype)[0]


def _adapter_epilogue_args(
    x: Tensor, x_adapter: Optional[Tensor], lora_a, lora_b, hybrid_a, hybrid_b
):
    """Forward prologue: g = regrouped x_adapter A, u = x_adapter hybrid_a^T (x_adapter or x);
    returns gemm_lowrank's lowrank and hybrid arguments."""
    k, i_blk, _ = lora_a.shape
    xa2 = (x if x_adapter is None else x_adapter).reshape(-1, k * i_blk)
    lowrank = (_blocks_down(xa2, lora_a), lora_b, tuple(lora_b.stride()), lora_b.shape[2])
    hybrid = None
    if hybrid_a is not None:
        hybrid = (_hybrid_down(xa2, hybrid_a), hybrid_b, (hybrid_b.stride(1), hybrid_b.stride(0)))
    return lowrank, hybrid


def gralora_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    x_adapter: Optional[Tensor] = None,
) -> Tensor:
    """y [..., out] = x W^T + b + scaling * adapter(x_adapter or x), in x's dtype."""
    op = "gralora_linear"
    n_out, k_in = weight.shape
    _check(op, x, n_out, k_in, bias, lora_a, lora_b, hybrid_a, hybrid_b, x_adapter)
    x2 = x.reshape(-1, k_in)
    lowrank, hybrid = _adapter_epilogue_args(x, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b)
    y = gemm_lowrank(
        x2.shape[0],
        n_out,
        x.dtype,
        x.device,
        scaling,
        gemm=(x2, weight, (weight.stride(1), weight.stride(0))),
        bias=bias,
        lowrank=lowrank,
        hybrid=hybrid,
    )
    return y.reshape(*x.shape[:-1], n_out)


def gralora_w4a16_linear_triton(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    group_size: int,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    x_adapter: Optional[Tensor] = None,
) -> Tensor:
    """The w4a16_linear Triton base (+ bias), then the adapter epilogue on its output."""
    from qhl.codegen.triton.weight_only import w4a16_linear_triton

    op = "gralora_w4a16_linear"
    n_out, k_in = w_packed.shape[0], w_packed.shape[1] * 2
    _check(op, x, n_out, k_in, bias, lora_a, lora_b, hybrid_a, hybrid_b, x_adapter)
    base = w4a16_linear_triton(x, w_packed, w_scale, w_zero, group_size, bias).reshape(-1, n_out)
    lowrank, hybrid = _adapter_epilogue_args(x, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b)
    y = gemm_lowrank(
        base.shape[0], n_out, x.dtype, x.device, scaling, base=base, lowrank=lowrank, hybrid=hybrid
    )
    return y.reshape(*x.shape[:-1], n_out)


def gralora_backward_triton(
    grad: Tensor,
    x_adapter: Tensor,
    weight: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    separate_adapter_input: bool,
    need: tuple[bool, bool, bool, bool, bool, bool],
):
    """Gradients given dy [..., out]; weight [out, in] is the (dequantized) frozen base.

    need = (dx, dA, dB, dhybrid_a, dhybrid_b, dx_adapter). Returns (dx [T, in] float32 or None,
    dx_adapter [T, in] float32 or None, dA, dB, dhybrid_a, dhybrid_b) with the adapters' dtypes.
    When the adapter reads x itself (not separate_adapter_input), dx includes the adapter's part."""
    need_x, need_a, need_b, need_ha, need_hb, need_xa = need
    k, i_blk, r = lora_a.shape
    n_out = lora_b.shape[0] * lora_b.shape[2]
    k_in = k * i_blk
    dy = grad.reshape(-1, n_out)
    xa = x_adapter.reshape(-1, k_in)
    t = dy.shape[0]
    has_h = hybrid_a is not None
    adapter_dx = need_xa if separate_adapter_input else need_x
    dx = dxa = da = db = dha = dhb = None

    dh = du = None
    if adapter_dx or need_a:
        # dh[t, n, j*c + q] = (dy_j B_j^T)[t, n*c + q]: B^T indexed [j, o, r]
        dh = block_project_regroup(
            dy, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), k, r
        )
    if has_h and (adapter_dx or need_ha):  # du = dy hybrid_b [T, hr]: hybrid_b indexed [0, o, q]
        du = block_project_regroup(
            dy, hybrid_b, (0, hybrid_b.stride(0), hybrid_b.stride(1)), 1, hybrid_b.shape[1]
        )[:, 0, :]
    lowrank = hybrid = None
    if adapter_dx:
        lowrank = (dh, lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), i_blk)
        if has_h:
            hybrid = (du, hybrid_a, (hybrid_a.stride(0), hybrid_a.stride(1)))
    base_gemm = None
    if need_x:
        base_gemm = (dy, weight, (weight.stride(0), weight.stride(1)))
    if separate_adapter_input:
        if need_x:
            dx = gemm_lowrank(t, k_in, torch.float32, dy.device, scaling, gemm=base_gemm)
        if need_xa:
            dxa = gemm_lowrank(
                t, k_in, torch.float32, dy.device, scaling, lowrank=lowrank, hybrid=hybrid
            )
    elif need_x:
        dx = gemm_lowrank(
            t,
            k_in,
            torch.float32,
            dy.device,
            scaling,
            gemm=base_gemm,
            lowrank=lowrank,
            hybrid=hybrid,
        )

    if need_a:  # dA[n, i, r] = s * sum_t xa[t, n*I + i] dh[t, n, r]
        da = batched_tn(
            xa,
            (xa.stride(0), i_blk * xa.stride(1), xa.stride(1)),
            dh,
            (dh.stride(0), dh.stride(1), dh.stride(2)),
            t,
            k,
            i_blk,
            r,
            scaling,
            lora_a.dtype,
        )
    if need_b:  # dB[j, r, o] = s * sum_t g[t, j, r] dy[t, j*O + o]
        g = _blocks_down(xa, lora_a)  # recomputed: the op returns y only
        o_blk = lora_b.shape[2]
        db = batched_tn(
            g,
            (g.stride(0), g.stride(1), g.stride(2)),
            dy,
            (dy.stride(0), o_blk * dy.stride(1), dy.stride(1)),
            t,
            k,
            r,
            o_blk,
            scaling,
            lora_b.dtype,
        )
    if has_h and need_hb:  # dhybrid_b[o, q] = s * sum_t dy[t, o] u[t, q]
        dhb = _tn_2d(dy, _hybrid_down(xa, hybrid_a), scaling, hybrid_b.dtype)
    if has_h and need_ha:  # dhybrid_a[q, i] = s * sum_t du[t, q] xa[t, i]
        dha = _tn_2d(du, xa, scaling, hybrid_a.dtype)
    return dx, dxa, da, db, dha, dhb
