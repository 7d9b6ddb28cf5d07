"""Block low-rank GEMM (kernel face of qhl::blocklr_linear, and the low-rank half of
qhl::lr_w4a16_linear). x [M, K] float, y [M, N] in x's dtype, fp32 accumulation.

    y[:, j-th N/k slice] = sum_n (x[:, n-th K/k slice] @ V_jn^T) @ U_jn^T (+ b) (+ y if ACCUMULATE)

    u [R, N/k], v [R, K/k] (float16 as stored; any float works): block b = j*k + n owns rows
    offs[b]:offs[b+1] of both (codegen/lowrank.py's flat rank-major layout); offs int32 [k*k + 1].

Each program owns a [BLOCK_M, BLOCK_N] tile of y inside one output block j. For every block
(j, n) of that row it computes the rank-space tile t = x_n @ V_jn^T [BLOCK_M, BLOCK_R] with a
K-loop, then accumulates t @ U_jn^T: two chained dots, the [M, r] intermediate never leaves
registers. The cost is recomputing t once per N-tile of the block (N/k / BLOCK_N times), which
is small next to the dense GEMM this replaces while r << N/k. Ranks are read at run time
(offs), so one compiled kernel serves every layer of the same (k, N/k, K/k, dtype).
All dots take fp32 operands with input_precision="ieee": the factors are float16, the
intermediate t is fp32, and TF32 would round both to 10 bits.

lr-w4a16 runs qhl's w4a16 GEMM (codegen/triton/weight_only.py) into y and then this kernel with
k = 1 and ACCUMULATE: two launches, not fused into one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.errors import KernelError

__all__ = ["blocklr_linear_triton", "lr_w4a16_linear_triton", "blocklr_kernel"]

BLOCK_N = 32
BLOCK_K = 32
BLOCK_R = 16  # tl.dot needs >= 16 per dimension on a GPU


@triton.jit
def blocklr_kernel(
    x_ptr,  # *x [M, K] float
    u_ptr,  # *u [R, N/k]
    v_ptr,  # *v [R, K/k]
    offs_ptr,  # *offs int32 [k*k + 1]: block b's rows are offs[b]:offs[b+1]
    b_ptr,  # *bias [N] (read only when HAS_BIAS)
    y_ptr,  # *y [M, N], x's dtype (out; also in when ACCUMULATE)
    M,
    stride_xm, stride_xk,
    stride_ur, stride_un,
    stride_vr, stride_vk,
    stride_b,
    stride_ym, stride_yn,
    GRID_K: tl.constexpr,  # k: the grid is GRID_K x GRID_K blocks
    OUT_B: tl.constexpr,  # N / k
    IN_B: tl.constexpr,  # K / k
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # --- the [BLOCK_M, BLOCK_N] tile of y: output block j, columns offs_c inside it ---
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_block = tl.cdiv(OUT_B, BLOCK_N)
    j = pid_n // tiles_per_block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (pid_n % tiles_per_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_c = offs_c < OUT_B

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n in range(GRID_K):
        start = tl.load(offs_ptr + j * GRID_K + n)
        end = tl.load(offs_ptr + j * GRID_K + n + 1)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + offs_r
            mask_r = rows < end
            # t = x_n @ V_jn^T for BLOCK_R of the block's ranks
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, IN_B, BLOCK_K):
                cols = k0 + offs_k
                mask_k = cols < IN_B
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + (n * IN_B + cols)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0,
                )
                v_t = tl.load(  # V_jn^T tile [BLOCK_K, BLOCK_R], read in place
                    v_ptr + rows[None, :] * stride_vr + cols[:, None] * stride_vk,
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0,
                )
                t = tl.dot(x.to(tl.float32), v_t.to(tl.float32), t, input_precision="ieee")
            u_t = tl.load(  # U_jn^T tile [BLOCK_R, BLOCK_N]: u is stored rank-major already
                u_ptr + rows[:, None] * stride_ur + offs_c[None, :] * stride_un,
                mask=mask_r[:, None] & mask_c[None, :], other=0.0,
            )
            acc = tl.dot(t, u_t.to(tl.float32), acc, input_precision="ieee")

    # --- epilogue: bias, the tile already in y (lr-w4a16), store in y's dtype ---
    offs_n = j * OUT_B + offs_c
    mask = mask_m[:, None] & mask_c[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def _offsets(ranks: tuple[int, ...], device: str) -> Tensor:
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    return torch.tensor(offs, dtype=torch.int32, device=device)


def _launch(x2: Tensor, u_rn: tuple[Tensor, int, int], v: Tensor, ranks: tuple[int, ...], k: int,
            out_b: int, bias: Optional[Tensor], y: Tensor, accumulate: bool) -> None:
    """Run blocklr_kernel; u_rn = (u, stride along rank, stride along N) so l1 [N, r] needs no copy."""
    M = x2.shape[0]
    if M == 0:
        return
    u, stride_ur, stride_un = u_rn
    block_m = emit.block_m_for(M)
    grid = (triton.cdiv(M, block_m), k * triton.cdiv(out_b, BLOCK_N))
    blocklr_kernel[grid](
        x2, u, v, _offsets(ranks, str(x2.device)), bias, y,
        M,
        x2.stride(0), x2.stride(1),
        stride_ur, stride_un,
        v.stride(0), v.stride(1),
        bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        GRID_K=k, OUT_B=out_b, IN_B=v.shape[1],
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
    )


def blocklr_linear_triton(
    x: Tensor, u: Tensor, v: Tensor, ranks: list[int], bias: Optional[Tensor] = None
) -> Tensor:
    """y [..., N] = the block low-rank product (+ b) in x's dtype; see the module docstring."""
    from qhl.codegen.blocklr import blocklr_grid

    op = "blocklr_linear"
    k = blocklr_grid(list(ranks))
    floats = (torch.float16, torch.bfloat16, torch.float32)
    emit.check_tensor(op, "u", u, floats)
    emit.check_tensor(op, "v", v, floats)
    R = sum(ranks)
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != R or v.shape[0] != R or min(ranks) < 0:
        raise KernelError(
            f"{op}: u must be [R, N/k] and v [R, K/k] with R = sum(ranks) = {R}, got "
            f"u {list(u.shape)}, v {list(v.shape)}"
        )
    out_b, in_b = u.shape[1], v.shape[1]
    N, K = k * out_b, k * in_b
    emit.check_x_and_bias(op, x, N, K, bias)
    emit.check_device(op, x=x, u=u, v=v, bias=bias)
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    _launch(x2, (u, u.stride(0), u.stride(1)), v, tuple(ranks), k, out_b, bias, y, accumulate=False)
    return y.reshape(*x.shape[:-1], N)


def lr_w4a16_linear_triton(
    x: Tensor, l1: Tensor, l2: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor,
    group_size: int, bias: Optional[Tensor] = None,
) -> Tensor:
    """y = x @ ((C - z) * s)^T (+ b) by the w4a16 GEMM, then += (x @ L2^T) @ L1^T here."""
    from qhl.codegen.triton.weight_only import w4a16_linear_triton

    op = "lr_w4a16_linear"
    floats = (torch.float16, torch.bfloat16, torch.float32)
    emit.check_tensor(op, "l1", l1, floats)
    emit.check_tensor(op, "l2", l2, floats)
    N, K = w_packed.shape[0], w_packed.shape[1] * 2
    if l1.dim() != 2 or l2.dim() != 2 or l1.shape[0] != N or l2.shape[1] != K or l1.shape[1] != l2.shape[0]:
        raise KernelError(
            f"{op}: l1 must be [N={N}, r] and l2 [r, K={K}], got l1 {list(l1.shape)}, l2 {list(l2.shape)}"
        )
    y = w4a16_linear_triton(x, w_packed, w_scale, w_zero, group_size, bias)  # checks x, bias, devices
    r = l1.shape[1]
    if r:
        x2, y2 = x.reshape(-1, K), y.view(-1, N)
        _launch(x2, (l1, l1.stride(1), l1.stride(0)), l2, (r,), 1, N, None, y2, accumulate=True)
    return y
