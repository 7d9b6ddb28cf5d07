"""qhl::hadamard and qhl::hadamard_quantize_per_token — fast Walsh–Hadamard rotations.

    hadamard(x [..., n], block_size=0, transpose=False, fp32=True) -> y [..., n]
        y = x @ M          M = hadamard_matrix(n)                  when block_size in (0, n)
                           M = I_{n/b} ⊗ hadamard_matrix(b)        when block_size = b (block-diagonal)
        transpose=True applies Mᵀ = M⁻¹ (M is orthonormal): hadamard(hadamard(x), transpose=True) = x.
        fp32=True computes in float32 and returns x.dtype; fp32=False computes in x.dtype.

    hadamard_quantize_per_token(x [..., n], block_size, bits) -> (q int8 [..., n], scale f32 [..., 1])
        v = hadamard(x, block_size) in float32 (block_size >= 0), or v = x (block_size = -1)
        scale = amax(|v_row|) / qmax (1 for an all-zero row),  qmax = 2^(bits-1) - 1,  bits in {4, 8}
        q = clamp(round_half_even(v / scale), -qmax, qmax)
        The prologue of rotated W4A4 / W4A8 matmuls; for bits = 8 the quantization is
        qhl.codegen.quant.quantize_per_token bit for bit.

The transform of one row of size n = K·2^m (qhl.hadamard.hadamard_plan), with the K-chunk slowest:

    z = x.reshape(K, 2^m) @ H_{2^m}     log2(2^m) butterfly stages  (a, b) -> (a + b, a - b)
    y = H_Kᵀ @ z / sqrt(n)              a K×K matmul across the chunks (H_K for transpose=True)

O(n log n + n K) work, never a dense n×n matmul. For up to 16 rows (decoding), the CPU spec runs
the 2^m part as two small GEMMs instead, H_{2^m} = H_a ⊗ H_b with a·b = 2^m (O(n^1.5) work, but
two calls instead of log2(n) of them). Otherwise it runs the butterflies on two
reused ping-pong buffers (torch.add/sub with out=), largest stride first, and the last
log2(16) = 4 stages as one [.., 16] @ H_16 matmul: strided add/sub on 1..8-wide halves is
slow in eager torch, a 16-point Hadamard is the same ±1 sum and runs as one small GEMM
(measured on this 2-core box, 1 thread, 64-512 rows: 1.9-3.3x faster than all-add/sub stages at
n = 1536..4096). Inputs under 32768 values run all stages as add/sub, and a tiny K stage as a
broadcast multiply-sum: a small BLAS call can stall for milliseconds on a busy OpenMP worker.
benchmarks/hadamard_speed.py: the op vs x @ hadamard_matrix(n), 1 thread: 13x (1 row), 24x (64),
29x (512) at n = 4096.

Faces: spec (here, CPU), fake, kernel (codegen/triton/hadamard.py, CUDA), grad (hadamard only:
dx = hadamard(dy, block_size, not transpose), since M⁻¹ = Mᵀ), onnx (codegen/onnx/hadamard.py).
Quantization has no grad face.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qhl import hadamard as hlib
from qhl.codegen import quant
from qhl.errors import UnsupportedError

__all__ = [
    "hadamard",
    "hadamard_spec",
    "hadamard_quantize_per_token",
    "hadamard_quantize_per_token_spec",
    "resolve_block",
    "QUANT_BITS",
]

QUANT_BITS = (4, 8)
_BASE = 16  # the butterfly's last log2(_BASE) stages run as one [.., 16] @ H_16 matmul
_MATMUL_BASE_MIN_NUMEL = 32768  # ... on inputs at least this big (torch's parallel grain size)
# Up to this many transforms (rows x blocks), the 2^m part runs as two GEMMs (_kron_sylvester):
# measured on this 2-core box against the butterflies, n = 576 / 1536 / 4096: 1.7x / 2.3x / 4.2x
# faster at 1 row, 1.1x / 1.8x / 1.4x at 16 rows, 0.9x at 32 rows.
_KRON_MAX_RUNS = 16


def resolve_block(n: int, block_size: int) -> int:
    """The size b of the Hadamard blocks applied to a last dim n (b = n for a full rotation).

    Raises UnsupportedError when b does not divide n or qhl cannot build H_b.
    """
    if n <= 0:
        raise UnsupportedError(f"qhl::hadamard needs a last dim n > 0, got n={n}")
    b = n if block_size in (0, n) else block_size
    if b < 0 or n % b:
        raise UnsupportedError(
            f"qhl::hadamard: block_size={block_size} must be 0 (full) or a divisor of n={n}"
        )
    if not hlib.can_build(b):
        try:
            hlib.hadamard_plan(b)
        except ValueError as e:
            raise UnsupportedError(f"qhl::hadamard on n={n}, block {b}: {e}") from None
    return b


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


def hadamard_spec(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    """The definition of qhl::hadamard in torch ops (see the module docstring)."""
    n = x.shape[-1]
    b = resolve_block(n, block_size)
    compute = torch.float32 if fp32 else x.dtype
    if x.numel() == 0:
        return torch.empty_like(x)
    y = _transform_rows(x.reshape(-1, n).to(compute), b, transpose)
    return y.to(x.dtype).reshape(x.shape)


@torch.library.custom_op("qhl::hadamard", mutates_args=())
def hadamard(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    """Spec face: see the module docstring."""
    return hadamard_spec(x, block_size, transpose, fp32)


@hadamard.register_fake
def _(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    resolve_block(x.shape[-1], block_size)
    return torch.empty_like(x)


@hadamard.register_kernel("cuda")
def _(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    from qhl.codegen.triton.hadamard import hadamard_triton

    return hadamard_triton(x, block_size, transpose, fp32)


def _setup_context(ctx, inputs, output) -> None:
    _, block_size, transpose, fp32 = inputs
    ctx.block_size, ctx.transpose, ctx.fp32 = block_size, transpose, fp32


def _backward(ctx, grad: Tensor):
    # y = x M  =>  dx = dy Mᵀ, and Mᵀ is the transform with `transpose` flipped.
    dx = torch.ops.qhl.hadamard(grad, ctx.block_size, not ctx.transpose, ctx.fp32)
    return dx, None, None, None


hadamard.register_autograd(_backward, setup_context=_setup_context)


# --- fused rotation + per-token quantization -------------------------------------------------

def _check_quant_args(block_size: int, bits: int) -> None:
    if bits not in QUANT_BITS:
        raise UnsupportedError(f"qhl::hadamard_quantize_per_token: bits={bits}; valid: {QUANT_BITS}")
    if block_size < -1:
        raise UnsupportedError(
            f"qhl::hadamard_quantize_per_token: block_size={block_size}; use -1 (no rotation), "
            "0 (full) or a block size dividing the last dim"
        )


def hadamard_quantize_per_token_spec(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    """The definition of qhl::hadamard_quantize_per_token (see the module docstring)."""
    _check_quant_args(block_size, bits)
    v = x.float() if block_size == -1 else hadamard_spec(x.float(), block_size, False, True)
    qmax = 2 ** (bits - 1) - 1
    scale = quant._safe_scale(v.abs().amax(dim=-1, keepdim=True), qmax)
    q = torch.round(v / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


@torch.library.custom_op("qhl::hadamard_quantize_per_token", mutates_args=())
def hadamard_quantize_per_token(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    """Spec face: see the module docstring."""
    return hadamard_quantize_per_token_spec(x, block_size, bits)


@hadamard_quantize_per_token.register_fake
def _(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    _check_quant_args(block_size, bits)
    if block_size != -1:
        resolve_block(x.shape[-1], block_size)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


@hadamard_quantize_per_token.register_kernel("cuda")
def _(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    from qhl.codegen.triton.hadamard import hadamard_quantize_triton

    return hadamard_quantize_triton(x, block_size, bits)
