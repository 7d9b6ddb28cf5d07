"""The CPU formulation of qhl::hadamard before 2026-12-03, kept only as the A/B baseline of
benchmarks/hadamard_speed.py: the 2^m part of n = K·2^m as butterfly stages (a, b) -> (a + b, a - b)
on two ping-pong buffers, largest stride first, the last 4 as one [.., 16] @ H_16 GEMM; up to 16
rows two GEMMs by H_a ⊗ H_b with transposes; tiny inputs all add/sub. The library now runs the
2^m part as one or two GEMMs without transposes (codegen/hadamard.py).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qhl import hadamard as hlib

_BASE = 16  # the butterfly's last log2(_BASE) stages run as one [.., 16] @ H_16 matmul
_MATMUL_BASE_MIN_NUMEL = 32768  # ... on inputs at least this big (torch's parallel grain size)
# Up to this many transforms (rows x blocks), the 2^m part runs as two GEMMs (_kron_sylvester):
# measured on the EPYC box against the butterflies, n = 576 / 1536 / 4096: 1.7x / 2.3x / 4.2x
# faster at 1 row, 1.1x / 1.8x / 1.4x at 16 rows, 0.9x at 32 rows.
_KRON_MAX_RUNS = 16


@functools.lru_cache(maxsize=None)
def _factor(k: int, dtype: torch.dtype, transpose: bool) -> Tensor:
    """The ±1 K-matrix as applied on the left of z: H_Kᵀ (forward) or H_K (transpose)."""
    h = hlib.hadamard_factor(k, dtype)
    return h if transpose else h.T.contiguous()


def _butterflies(a: Tensor, b: Tensor, p: int) -> Tensor:
    """Unnormalised Sylvester transform of every length-p run of `a` (flat contiguous buffers
    a and b of equal size, both overwritten); returns the buffer that holds the result."""
    # Small inputs run every stage as add/sub: a tiny BLAS call can wait on a busy OpenMP
    # thread for milliseconds on a loaded machine, elementwise ops below torch's grain size don't.
    stop = _BASE if a.numel() >= _MATMUL_BASE_MIN_NUMEL else 1
    h = p // 2
    while h >= stop:  # stage with half-width h: (first half, second half) -> (sum, difference)
        src, dst = a.view(-1, 2, h), b.view(-1, 2, h)
        torch.add(src[:, 0], src[:, 1], out=dst[:, 0])
        torch.sub(src[:, 0], src[:, 1], out=dst[:, 1])
        a, b = b, a
        h //= 2
    base = min(p, _BASE)
    if base > 1 and h >= 1:
        torch.matmul(a.view(-1, base), hlib.hadamard_factor(base, a.dtype), out=b.view(-1, base))
        a = b
    return a


def _kron_sylvester(x: Tensor, p: int) -> Tensor:
    """Unnormalised Sylvester transform of every length-p run of the flat tensor x, as two small
    GEMMs: H_p = H_a ⊗ H_b (a * b = p), so a run viewed as an [a, b] matrix X maps to H_a X H_b
    (Sylvester matrices are symmetric). A new flat tensor."""
    m = p.bit_length() - 1
    a, b = 1 << (m // 2), 1 << (m - m // 2)
    runs = x.numel() // p
    z = torch.matmul(x.view(-1, b), _factor(b, x.dtype, True)).view(runs, a, b)
    z = torch.matmul(z.transpose(1, 2).reshape(-1, a), _factor(a, x.dtype, True))
    return z.view(runs, b, a).transpose(1, 2).contiguous().view(-1)


def _transform_rows(x2: Tensor, b: int, transpose: bool) -> Tensor:
    """x2 [R, n] (compute dtype, n % b == 0) -> x2 @ (I ⊗ H_b) (or its transpose), a new tensor."""
    k, p = hlib.hadamard_plan(b)
    if x2.numel() // b <= _KRON_MAX_RUNS and p >= _BASE:
        # few rows (decoding): two GEMMs beat log2(p) op dispatches; x2 is only read
        a = z = _kron_sylvester(x2.contiguous().view(-1), p)
        buf = torch.empty_like(z) if k > 1 else z  # the K stage below writes into buf
    else:
        a = x2.contiguous().clone().view(-1)
        buf = torch.empty_like(a)
        z = _butterflies(a, buf, p)
    if k > 1:
        zk = z.view(-1, k, p)
        other = buf if z is a else a
        a_mat = _factor(k, z.dtype, transpose)
        if z.numel() * k < _MATMUL_BASE_MIN_NUMEL:  # tiny: broadcast multiply-sum, no BLAS call
            z = torch.sum(a_mat[:, :, None] * zk[:, None, :, :], dim=2, out=other.view(-1, k, p)).view(-1)
        else:
            z = torch.matmul(a_mat, zk, out=other.view(-1, k, p)).view(-1)
    return z.view(x2.shape).mul_(1.0 / math.sqrt(b))


def previous(x: Tensor) -> Tensor:
    """x [R, n] float32 -> x @ hadamard_matrix(n), the previous way (full rotation only)."""
    return _transform_rows(x, x.shape[-1], False)
