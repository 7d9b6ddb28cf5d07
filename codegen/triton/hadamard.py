"""Fast Walsh–Hadamard transform as Triton kernels (the kernel face of qhl::hadamard and of
qhl::hadamard_quantize_per_token).

    x [R, n] float  ->  y [R, n] = x @ M          M = I_{n/b} ⊗ hadamard_matrix(b),  b = K · P
                                                   (b = n for a full rotation; P = 2^m)
    fused:            ->  q int8 [R, n], scale float32 [R, 1]  per-token quantization of y

One program transforms one row of n = NB blocks of b = K·P values. Per block:

  1. load the block as a [K_PAD, P] register tile (row i = chunk i; the K-chunk is the slowest
     index, as in qhl.hadamard), rows >= K masked to 0;
  2. log2(P) butterfly stages along the last axis, unrolled (tl.static_range): the tile is viewed
     as [K_PAD, P / 2h, 2, h] and (a, b) -> (a + b, a - b). The pair is formed with a sum over the
     size-2 axis (times +1/-1) and put back with tl.where, which needs only reshape, reduce and
     broadcast (no permute/join), so the same code runs in the interpreter and on a GPU;
  3. multiply by 1/sqrt(b);
  4. K > 1: write z to a float32 scratch row, barrier, and form y = A z with A = H_Kᵀ (forward)
     or H_K (transpose), a [K_PAD, K_PAD] zero-padded ±1 matrix: K rank-1 updates
     acc += A[:, i] ⊗ z_i, each z_i re-read from the scratch row (L1/L2 resident). This is
     O(K · b) FMAs, the same work as the spec's K×K matmul, and needs no tl.dot size minimum.

The fused variant stores y (float32) into the scratch row, keeps the running amax, and then runs
the per-token quantization of qhl.codegen.triton.per_token_quant on the scratch row
(div_rn, round-half-even by the 1.5·2²³ trick, clamp to ±QMAX) — one launch, y never leaves L2
on a GPU for the sizes qhl uses.

Arithmetic is float32 whatever `fp32` says: the kernel is memory-bound, so float32 costs nothing
on a GPU, and fp32=False then differs from the spec (which computes in x.dtype) only by rounding.
The butterfly order differs from the spec's (the spec finishes with a 16-point matmul), so the
kernel equals the spec to float32 rounding, not bit for bit; the quantized codes can differ by 1
where y / scale lies within rounding of a half-integer.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qhl import hadamard as hlib
from qhl.codegen.triton import emit
from qhl.errors import KernelError

__all__ = ["hadamard_triton", "hadamard_quantize_triton", "MAX_N"]

MAX_N = 16384  # one row of up to 16384 float32 values per program (64 KiB of registers/spill)


@triton.jit
def _fwht_tile(x, K_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """Unnormalised Sylvester transform along axis 1 of a [K_PAD, P] float32 tile."""
    for st in tl.static_range(LOG_P):
        # stage st pairs elements 2^st apart: [K_PAD, P / 2^(st+1), 2, 2^st]. The shape is written
        # inline: the compiler turns a plain local into a tensor, and a tl.constexpr local cannot
        # be reassigned in the next unrolled iteration (the interpreter allows both).
        x4 = tl.reshape(x, (K_PAD, P // (2 << st), 2, 1 << st))
        pair = tl.arange(0, 2)[None, None, :, None]  # [1, 1, 2, 1]: 0 = first half, 1 = second
        sign = (1 - 2 * pair).to(tl.float32)
        s = tl.sum(x4, axis=2)  # a + b
        d = tl.sum(x4 * sign, axis=2)  # a - b
        x4 = tl.where(pair == 0, tl.expand_dims(s, 2), tl.expand_dims(d, 2))
        x = tl.reshape(x4, (K_PAD, P))
    return x


@triton.jit
def hadamard_kernel(
    x_ptr,  # *x [R, n] float32 / float16 / bfloat16, last dim contiguous
    y_ptr,  # *y [R, n] x.dtype (out); unused when QUANT
    a_ptr,  # *A [K_PAD, K_PAD] float32: H_Kᵀ (forward) or H_K (transpose), zero padded
    scr_ptr,  # *scratch [R, n] float32 (z, and y for QUANT); unused when K == 1 and not QUANT
    q_ptr,  # *q [R, n] int8 (out, QUANT only)
    s_ptr,  # *scale [R] float32 (out, QUANT only)
    stride_xr, stride_yr, stride_sr, stride_qr,
    scale_b,  # 1 / sqrt(b)
    NB: tl.constexpr,  # blocks per row (n / b)
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    B: tl.constexpr = K * P
    N: tl.constexpr = NB * B
    RNE_MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23: adding it rounds half to even (|v| < 2**22)

    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31
    offs_k = tl.arange(0, K_PAD)
    offs_p = tl.arange(0, P)
    tile_offs = offs_k[:, None] * P + offs_p[None, :]  # [K_PAD, P] offsets inside one block
    tile_mask = (offs_k[:, None] < K) & (offs_p[None, :] < P)
    amax = tl.zeros((K_PAD, P), dtype=tl.float32)

    for blk in range(NB):
        base = blk * B
        x = tl.load(x_ptr + row * stride_xr + base + tile_offs, mask=tile_mask, other=0.0)
        z = _fwht_tile(x.to(tl.float32), K_PAD, P, LOG_P) * scale_b
        if K > 1:
            # the K×K stage reads whole chunks that other threads computed: go through memory
            tl.store(scr_ptr + row * stride_sr + base + tile_offs, z, mask=tile_mask)
            tl.debug_barrier()
            acc = tl.zeros((K_PAD, P), dtype=tl.float32)
            for i in range(K):
                z_i = tl.load(scr_ptr + row * stride_sr + base + i * P + offs_p)
                a_col = tl.load(a_ptr + offs_k * K_PAD + i)  # A[:, i]
                acc += a_col[:, None] * z_i[None, :]
            tl.debug_barrier()  # every z_i is read before this block's y overwrites the scratch
            z = acc
        if QUANT:
            amax = tl.maximum(amax, tl.abs(z))
            tl.store(scr_ptr + row * stride_sr + base + tile_offs, z, mask=tile_mask)
        else:
            tl.store(y_ptr + row * stride_yr + base + tile_offs,
                     z.to(y_ptr.dtype.element_ty), mask=tile_mask)

    if QUANT:
        # per-token quantization, as qhl.codegen.quant: scale = amax / QMAX (1 if 0), v / scale
        tl.debug_barrier()
        row_amax = tl.max(tl.max(amax, axis=1), axis=0)
        scale = tl.math.div_rn(row_amax, tl.full((), QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        tl.store(s_ptr + row, scale)
        offs_q = tl.arange(0, BLOCK_Q)
        for q0 in range(0, N, BLOCK_Q):
            mask = offs_q < N - q0
            v = tl.load(scr_ptr + row * stride_sr + q0 + offs_q, mask=mask, other=0.0)
            v = tl.math.div_rn(v, scale)
            v = (v + RNE_MAGIC) - RNE_MAGIC
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            tl.store(q_ptr + row * stride_qr + q0 + offs_q, v.to(tl.int8), mask=mask)


@functools.lru_cache(maxsize=None)
def _a_matrix(k: int, transpose: bool, device: str) -> Tensor:
    """[K_PAD, K_PAD] float32, A = H_Kᵀ (forward) or H_K (transpose), zero padded."""
    k_pad = triton.next_power_of_2(k)
    h = hlib.hadamard_factor(k, torch.float32)
    a = torch.zeros(k_pad, k_pad, dtype=torch.float32)
    a[:k, :k] = h if transpose else h.T
    return a.to(device)


def _launch(x: Tensor, block_size: int, transpose: bool, quant_bits: int | None, out_dtype: torch.dtype):
    from qhl.codegen.hadamard import resolve_block

    op = "hadamard" if quant_bits is None else "hadamard_quantize_per_token"
    emit.check_tensor(op, "x", x, tuple(emit.DTYPES))
    emit.check_device(op, x=x)
    if x.dim() == 0:
        raise KernelError(f"{op}: x must be [..., n], got a 0-d tensor")
    n = x.shape[-1]
    if n > MAX_N:
        raise KernelError(f"{op}: n={n} is above the kernel's MAX_N={MAX_N}")
    b = resolve_block(n, block_size)
    k, p = hlib.hadamard_plan(b)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    dev = x.device
    y = torch.empty((rows, n), dtype=out_dtype, device=dev) if quant_bits is None else x2
    need_scratch = k > 1 or quant_bits is not None
    scratch = torch.empty((rows, n), dtype=torch.float32, device=dev) if need_scratch else x2
    if quant_bits is not None:
        q = torch.empty((rows, n), dtype=torch.int8, device=dev)
        s = torch.empty((rows, 1), dtype=torch.float32, device=dev)
    else:
        q, s = x2, x2  # unused pointers
    a = _a_matrix(k, transpose, str(dev))
    if rows > 0:
        hadamard_kernel[(rows,)](
            x2, y, a, scratch, q, s,
            x2.stride(0), y.stride(0), scratch.stride(0), q.stride(0),
            1.0 / math.sqrt(b),
            NB=n // b, K=k, K_PAD=a.shape[0], P=p, LOG_P=p.bit_length() - 1,
            QUANT=quant_bits is not None,
            QMAX=float(2 ** ((quant_bits or 8) - 1) - 1),
            BLOCK_Q=min(1024, triton.next_power_of_2(n)),
            num_warps=4 if b <= 2048 else 8,
        )
    return y, q, s


def hadamard_triton(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    """x [..., n] -> x @ M (or x @ Mᵀ), x.dtype; see the module docstring. `fp32` is accepted for
    the op's signature: the kernel always computes in float32."""
    y, _, _ = _launch(x, block_size, transpose, None, x.dtype)
    return y.reshape(x.shape)


def hadamard_quantize_triton(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    """x [..., n] -> (q int8 [..., n], scale float32 [..., 1]); block_size -1 skips the rotation."""
    from qhl.codegen.hadamard import QUANT_BITS

    if bits not in QUANT_BITS:
        raise KernelError(f"hadamard_quantize_per_token: bits={bits}; valid: {QUANT_BITS}")
    if block_size == -1:
        from qhl.codegen.hadamard import hadamard_quantize_per_token_spec

        # no rotation: the plain per-token quantization (a rotation by the identity)
        return hadamard_quantize_per_token_spec(x, -1, bits)
    _, q, s = _launch(x, block_size, False, bits, x.dtype)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
