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

    z = x.reshape(K, 2^m) @ H_{2^m}     the Sylvester part, as GEMMs (below)
    y = H_Kᵀ @ z / sqrt(n)              a K×K matmul across the chunks (H_K for transpose=True)

The Sylvester part is one GEMM by H_p for p = 2^m <= 64 and otherwise two, by the Kronecker
factors H_p = H_a ⊗ H_b (a·b = p): a run viewed as an [a, b] matrix X maps to H_a X H_b, one GEMM
on the right over all runs and one batched GEMM on the left, with no transposes. That is
O(n·(K + sqrt(p))) work instead of the butterflies' O(n log n), but two BLAS calls instead of
log2(p) memory passes: measured on the AMX Xeon (benchmarks/hadamard_speed.py, 2026-12-03, 1
and 2 threads, n = 576 / 1536 / 4096), 1.16-2.6x faster than the butterflies (their last 4
stages as one H_16 GEMM) at 64-512 rows and 0.92-1.56x at 1 row. It is also the ONNX face's
formulation. A
tiny K stage (under 32768 values) runs as a broadcast multiply-sum: a small BLAS call can stall
for milliseconds on a busy OpenMP worker (measured on the earlier EPYC machine).
benchmarks/hadamard_speed.py: the op against x @ hadamard_matrix(n).

Faces: spec (here, CPU), fake, kernel (codegen/triton/hadamard.py, CUDA), grad (hadamard only:
dx = hadamard(dy, block_size, not transpose), since M⁻¹ = Mᵀ), onnx (codegen/onnx/hadamard.py).
Quantization has no grad face. Both ops also have an aten decomposition for Inductor's
whole-graph CPU codegen (hadamard_decomposed, hadamard_quantize_per_token_decomposed; and the
w4a8/w4a4 decompositions rotate with rotate_rows_decomposed): the spec's own GEMMs and sums with
the ±1 factors as graph constants, so the same floats, without an op call per rotation. For
that, the tiny K stage sums in float64 (exact for all but extreme inputs, so in any order).
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
    "hadamard_quantize_per_token_cpu",
    "resolve_block",
    "rotate_rows_decomposed",
    "hadamard_decomposed",
    "hadamard_quantize_per_token_decomposed",
    "QUANT_BITS",
]

QUANT_BITS = (4, 8)
_ONE_GEMM_MAX = 64  # a power-of-two part up to this size is one GEMM by H_p; above, two (H_a ⊗ H_b)
_TINY_NUMEL = 32768  # K stages on inputs below this (torch's parallel grain) skip BLAS


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


@functools.lru_cache(maxsize=None)
def _entries(k: int, transpose: bool | None) -> tuple[tuple[float, ...], ...]:
    """The ±1 entries of H_k (transpose None) or of the K-matrix `_factor(k, ., transpose)`, as
    Python numbers, read with every dispatch mode off (a decomposition runs under fake tracing)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        h = hlib.hadamard_factor(k, torch.float64) if transpose is None else _factor(k, torch.float64, transpose)
        return tuple(tuple(row) for row in h.tolist())


def _constant(k: int, dtype: torch.dtype, transpose: bool | None, in_graph: bool) -> Tensor:
    """H_k (transpose None) or the K-matrix; in_graph: built from its entries, so that a traced
    decomposition records it as a graph constant (a cached real tensor can't enter fake tracing)."""
    if in_graph:
        return torch.tensor(_entries(k, transpose), dtype=dtype)
    return hlib.hadamard_factor(k, dtype) if transpose is None else _factor(k, dtype, transpose)


def _sylvester(x: Tensor, p: int, in_graph: bool = False) -> Tensor:
    """Unnormalised Sylvester transform of every length-p run of the flat tensor x, as GEMMs:
    one by H_p for p <= 64; above, H_p = H_a ⊗ H_b (a * b = p, a <= b), so a run viewed as an
    [a, b] matrix X maps to H_a X H_b (Sylvester matrices are symmetric): one GEMM on the right
    over all runs, then one batched GEMM on the left. No transposes, a new flat tensor."""
    if p <= _ONE_GEMM_MAX:
        return torch.matmul(x.view(-1, p), _constant(p, x.dtype, None, in_graph)).view(-1)
    m = p.bit_length() - 1
    a, b = 1 << (m // 2), 1 << (m - m // 2)
    z = torch.matmul(x.view(-1, b), _constant(b, x.dtype, None, in_graph))
    return torch.matmul(_constant(a, x.dtype, None, in_graph), z.view(-1, a, b)).view(-1)


def _transform_rows(x2: Tensor, b: int, transpose: bool, in_graph: bool = False) -> Tensor:
    """x2 [R, n] (compute dtype, n % b == 0) -> x2 @ (I ⊗ H_b) (or its transpose), a new tensor.
    in_graph: for a traced decomposition (constants from entries, no in-place op; same floats)."""
    k, p = hlib.hadamard_plan(b)
    flat = x2.contiguous().view(-1)
    z = _sylvester(flat, p, in_graph) if p > 1 else flat
    if k == 1 and p == 1:
        z = z.clone()  # n = 1: the result must not alias the input (scaled in place below)
    if k > 1:
        zk = z.view(-1, k, p)
        a_mat = _constant(k, z.dtype, transpose, in_graph)
        if z.numel() * k < _TINY_NUMEL:  # tiny: broadcast multiply-sum, no BLAS call
            # Summed in float64, then rounded once: each term is ±z (exact), and float64 holds
            # the sum of k <= 172 float32 values exactly unless their magnitudes span more than
            # 2^21 (24 + 8 + 21 = 53 bits), so the order of the additions does not matter. That
            # lets the decomposition (in_graph: Inductor's loop) compute the eager spec's floats
            # bit for bit; a float32 sum's order differs between eager torch.sum and Inductor.
            terms = a_mat[:, :, None] * zk[:, None, :, :]
            z = terms.double().sum(dim=2).to(terms.dtype).reshape(-1)
        else:
            z = torch.matmul(a_mat, zk).view(-1)
    z = z.view(x2.shape)
    return z * (1.0 / math.sqrt(b)) if in_graph else z.mul_(1.0 / math.sqrt(b))


def hadamard_spec(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Tensor:
    """The definition of qhl::hadamard in torch ops (see the module docstring)."""
    n = x.shape[-1]
    b = resolve_block(n, block_size)
    compute = torch.float32 if fp32 else x.dtype
    if x.numel() == 0:
        return torch.empty_like(x)
    y = _transform_rows(x.reshape(-1, n).to(compute), b, transpose)
    return y.to(x.dtype).reshape(x.shape)


def rotate_rows_decomposed(x2: Tensor, block_size: int) -> Tensor:
    """float32 x2 [M, n] @ (I ⊗ H_b): hadamard_spec's own ops (the same GEMMs and sums, so the same
    floats), with its ±1 factors as graph constants, for aten decompositions in Inductor's
    whole-graph CPU codegen (the rotated w4a8/w4a4 prologue, codegen/w4ax.py)."""
    b = resolve_block(x2.shape[-1], block_size)
    return _transform_rows(x2.float(), b, False, in_graph=True)


def _lowerable(x: Tensor) -> bool:
    """What the decompositions lower: a non-empty CPU tensor of static shape (the spec picks its
    tiny-K formulation by size, so a symbolic size keeps the op call)."""
    return x.device.type == "cpu" and all(isinstance(d, int) for d in x.shape) and x.numel() > 0


def hadamard_decomposed(x: Tensor, block_size: int = 0, transpose: bool = False, fp32: bool = True):
    """qhl::hadamard in aten ops for Inductor's whole-graph CPU codegen (runtime/inductor_cpu.py):
    the spec's own GEMMs and sums (rotate_rows_decomposed), so the same floats, with Inductor
    fusing the scale and casts into the neighbouring ops instead of an op call per rotation (the
    online rotations of hadamard-w8a8 / hadamard-w4a16, one to four a decoder layer). Declines
    (NotImplemented, the op stays a call) off the CPU, for a symbolic shape (the spec picks its
    tiny-K formulation by size), and for a computation in another dtype than float32."""
    if not _lowerable(x) or (not fp32 and x.dtype != torch.float32):
        return NotImplemented
    n = x.shape[-1]
    y = _transform_rows(x.reshape(-1, n).float(), resolve_block(n, block_size), transpose, in_graph=True)
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


def _rotated_float32(x: Tensor, block_size: int, bits: int) -> Tensor:
    """v = x H in float32 (v = x for block_size = -1), after checking the arguments."""
    _check_quant_args(block_size, bits)
    return x.float() if block_size == -1 else hadamard_spec(x.float(), block_size, False, True)


def hadamard_quantize_per_token_spec(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    """The definition of qhl::hadamard_quantize_per_token (see the module docstring)."""
    v = _rotated_float32(x, block_size, bits)
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


def hadamard_quantize_per_token_decomposed(x: Tensor, block_size: int, bits: int):
    """qhl::hadamard_quantize_per_token in aten ops for Inductor's whole-graph CPU codegen (the
    rotated prologue float_codes_gemm writes into the graph): rotate_rows_decomposed, then the
    per-token quantizer in aten ops, so the spec's codes and scales bit for bit. Declines
    (NotImplemented) off the CPU and for a symbolic shape, as hadamard_decomposed."""
    from qhl.codegen.w8a8 import per_token_codes_decomposed

    if not _lowerable(x):
        return NotImplemented
    _check_quant_args(block_size, bits)
    x2 = x.reshape(-1, x.shape[-1])
    v = x2.float() if block_size == -1 else rotate_rows_decomposed(x2, block_size)
    codes, scale = per_token_codes_decomposed(v, bits)
    return codes.to(torch.int8).view(x.shape), scale.view(*x.shape[:-1], 1)


@hadamard_quantize_per_token.register_kernel("cpu")
def hadamard_quantize_per_token_cpu(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    """CPU face: the spec's rotation, then the per-token quantizer as one Inductor-fused loop
    (codegen/cpu_fused.py, bit for bit the spec's quantizer) instead of ~6 eager passes; the
    spec where Inductor cannot compile. Other ops' CPU faces may call it directly (no
    dispatch, ~35 µs a call)."""
    from qhl.codegen import cpu_fused

    if x.numel() == 0 or not cpu_fused.enabled():
        return hadamard_quantize_per_token_spec(x, block_size, bits)
    v = _rotated_float32(x, block_size, bits)
    n = v.shape[-1]
    q, scale = cpu_fused.per_token_codes(v.reshape(-1, n), 2 ** (bits - 1) - 1)
    return q.view(v.shape), scale.view(*v.shape[:-1], 1)


@hadamard_quantize_per_token.register_kernel("cuda")
def _(x: Tensor, block_size: int, bits: int) -> tuple[Tensor, Tensor]:
    from qhl.codegen.triton.hadamard import hadamard_quantize_triton

    return hadamard_quantize_triton(x, block_size, bits)
