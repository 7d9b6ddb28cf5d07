"""ONNX face of qhl::hadamard and qhl::hadamard_quantize_per_token (standard ONNX, opset >= 21).

Three formulations of y = x @ M, M = I_{n/b} ⊗ hadamard_matrix(b), b = K · P (P = 2^m):

  "butterfly"  x ─ Reshape [-1, 2, h] ─ Split ─ Add / Sub ─ Concat ─ ... (log2 P stages, h = P/2 .. 1)
                 ─ Reshape [-1, K, P] ─ MatMul(A [K, K], ·) ─ Mul(1/sqrt(b)) ─ Reshape(shape of x)
               O(n log n) work, constants of K² values.
  "kron"       x ─ Reshape ─ MatMul(·, H_P) (P <= 64), or MatMul(·, H_c) ─ MatMul(H_a, ·) with
                 H_P = H_a ⊗ H_c (P > 64) ─ the K×K stage as above. Small GEMMs, few nodes.
  "matmul"     x ─ Reshape [-1, b] ─ MatMul(hadamard_matrix(b) [b, b] constant) ─ Reshape(shape of x)
               one GEMM; a b² float32 initializer (64 MiB at 4096).

Which one ORT runs faster on CPU was measured by benchmarks/hadamard_onnx_choice.py (ONNX
Runtime CPU, 1 intra-op thread, medians of 20, round-robin, on this shared 2-core box; the table
in benchmarks/results/hadamard_onnx_choice.md). "kron" was fastest at every size and row count
measured (576, 1536, 4096 at 1 and 64 rows; 2.3-4.1x faster than the butterflies, 2.4-53x
faster than the dense MatMul). One MatMul by H_P beats two factors up to P = 64 (576 = 36·16,
768 = 12·64); two factors win from P = 128 (1536 = 12·128; at 4096 one 4096² factor would be
the dense matmul). So FORMULATION = "kron"; "butterfly" and "matmul" stay selectable
(benchmarks and tests).

The quantizing op rotates the same way and then quantizes per token exactly as
qhl.codegen.onnx.per_token_quant does (QuantizeLinear with one block per row, round half to
even), with qmax = 2^(bits-1) - 1: for s = amax / qmax every |v / s| <= qmax, so QuantizeLinear's
int8 saturation never binds and the codes equal the spec's clamp(round(v / s)).

The rotation is computed in float32 (Cast in, Cast back to x's dtype) whatever `fp32` says.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qhl import hadamard as hlib
from qhl.codegen.onnx.per_token_quant import QUANT_OPS, _float32, const, opset, per_token_scale, static_dim
from qhl.errors import UnsupportedError

__all__ = [
    "OPS",
    "FORMULATIONS",
    "FORMULATION",
    "rotate",
    "translate",
    "translate_quantize",
    "rotation_matrix_np",
]

FORMULATIONS = ("butterfly", "kron", "matmul")
FORMULATION = "kron"  # measured fastest in ORT at every size (module docstring)
KRON_ONE_FACTOR_MAX_P = 64  # P up to this: one MatMul by H_P; above: two, by H_a and H_c

_KRON_OPS = ["Cast", "Reshape", "MatMul", "Mul", "Shape"]  # what the default formulation emits
OPS: dict[str, list[str]] = {"standard": _KRON_OPS, "onnxruntime": _KRON_OPS}


def rotation_matrix_np(b: int, transpose: bool = False) -> np.ndarray:
    """hadamard_matrix(b) (or its transpose) as a float32 numpy array."""
    import torch

    m = hlib.hadamard_matrix(b, torch.float64)
    return (m.T if transpose else m).contiguous().to(torch.float32).numpy()


def _choose(b: int, formulation: str) -> str:
    if formulation not in FORMULATIONS:
        raise UnsupportedError(f"ONNX Hadamard formulation {formulation!r}; valid: {FORMULATIONS}")
    return formulation


def _butterfly(x: Any, b: int, transpose: bool) -> Any:
    """x float32 [..., n] (n static, n % b == 0) -> x @ (I ⊗ H_b), shaped [-1, b]."""
    op = opset()
    _, p = hlib.hadamard_plan(b)
    z = x
    h = p // 2
    while h >= 1:
        pair = op.Reshape(z, const([-1, 2, h], np.int64))
        a, c = op.Split(pair, axis=1, num_outputs=2)
        z = op.Concat(op.Add(a, c), op.Sub(a, c), axis=1)
        h //= 2
    return _k_stage_and_scale(z, b, transpose)


def _k_stage_and_scale(z: Any, b: int, transpose: bool) -> Any:
    """The power-of-two part done (z holds runs of P): the K×K stage across the K chunks of each
    block, then 1/sqrt(b); shaped [-1, b]."""
    op = opset()
    k, p = hlib.hadamard_plan(b)
    if k > 1:
        hk = hlib.hadamard_factor(k).numpy()
        a_mat = hk if transpose else hk.T  # y = A @ z, A = H_Kᵀ forward, H_K for the inverse
        z = op.MatMul(const(np.ascontiguousarray(a_mat)), op.Reshape(z, const([-1, k, p], np.int64)))
    return op.Mul(op.Reshape(z, const([-1, b], np.int64)), const(1.0 / math.sqrt(b)))


def _kron(x: Any, b: int, transpose: bool) -> Any:
    """x float32 [..., n] -> x @ (I ⊗ H_b), shaped [-1, b]: the power-of-two part as one MatMul by
    H_P (P <= 64), or as two, H_P = H_a ⊗ H_c (a * c = P; Sylvester matrices are symmetric, so a
    run viewed as an [a, c] matrix X maps to H_a X H_c). Then the K×K stage."""
    op = opset()
    _, p = hlib.hadamard_plan(b)
    m = p.bit_length() - 1
    a, c = (1, p) if p <= KRON_ONE_FACTOR_MAX_P else (1 << (m // 2), 1 << (m - m // 2))
    z = op.Reshape(x, const([-1, a, c], np.int64))
    if c > 1:
        z = op.MatMul(z, const(hlib.hadamard_factor(c).numpy()))
    if a > 1:
        z = op.MatMul(const(hlib.hadamard_factor(a).numpy()), z)
    return _k_stage_and_scale(z, b, transpose)


def _dense(x: Any, b: int, transpose: bool) -> Any:
    op = opset()
    return op.MatMul(op.Reshape(x, const([-1, b], np.int64)), const(rotation_matrix_np(b, transpose)))


def rotate(x: Any, block_size: int = 0, transpose: bool = False, formulation: str | None = None) -> Any:
    """x [..., n] -> x @ M in float32 (shape of x); the translation's body, also used by the
    rotated W4A8/W4A4 translations (codegen/onnx/w4ax.py)."""
    from qhl.codegen.hadamard import resolve_block

    op = opset()
    n = static_dim(x, -1)
    if n is None:
        raise UnsupportedError("qhl::hadamard ONNX export needs a static last dim")
    b = resolve_block(n, block_size)
    xf = _float32(x)
    form = _choose(b, formulation or FORMULATION)
    y = {"butterfly": _butterfly, "kron": _kron, "matmul": _dense}[form](xf, b, transpose)
    return op.Reshape(y, op.Shape(xf))


def translate(x: Any, block_size: int = 0, transpose: bool = False, fp32: bool = True) -> Any:
    """qhl::hadamard(x, block_size, transpose, fp32) -> y [..., n] (dtype of x)."""
    from onnxscript import ir

    y = rotate(x, block_size, transpose)
    x_dtype = getattr(x, "dtype", None)
    if x_dtype is not None and x_dtype != ir.DataType.FLOAT:
        y = opset().Cast(y, to=x_dtype)
    return y


def translate_quantize(x: Any, block_size: int, bits: int) -> tuple[Any, Any]:
    """qhl::hadamard_quantize_per_token(x, block_size, bits) -> (q int8 [..., n], s f32 [..., 1])."""
    from qhl.codegen.hadamard import QUANT_BITS

    if bits not in QUANT_BITS:
        raise UnsupportedError(f"qhl::hadamard_quantize_per_token: bits={bits}; valid: {QUANT_BITS}")
    op = opset()
    v = _float32(x) if block_size == -1 else rotate(x, block_size)
    s = per_token_scale(v, 2 ** (bits - 1) - 1)
    n = static_dim(x, -1)
    zp = op.Expand(const(0, np.int8), op.Shape(s))  # blocked Q: the zero point has s's shape
    q = op.QuantizeLinear(v, s, zp, axis=-1, block_size=n)
    return q, s


class _QuantizeForm:
    """FORM_MODULES entry for qhl::hadamard_quantize_per_token (its translate is translate_quantize)."""

    OPS = {t: sorted(set(v + QUANT_OPS)) for t, v in OPS.items()}
    translate = staticmethod(translate_quantize)


quantize_form = _QuantizeForm
