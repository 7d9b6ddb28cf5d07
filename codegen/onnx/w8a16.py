"""ONNX face of qhl::w8a16_linear: int8 per-channel weights, float activations.

    standard (default):   x ─ MatMul(Cast(Wq^T [K, N] int8 -> float)) ─ Mul(s_w [N]) ─ Add(b)
    dequantize variant:   x ─ MatMul(DequantizeLinear(Wq^T [K, N] int8, s_w [N], axis=1)) ─ Add(b)

Both are standard ONNX and store the weight as int8 (a quarter of the float32 bytes). The
default is the spec's own order, (x @ Wq^T) * s_w: ONNX Runtime folds the Cast at load time
and runs a float GEMM, at about float32 speed (0.5-1.5x measured). The DequantizeLinear variant is the textbook QDQ form;
ORT fuses it into an 8-bit com.microsoft::MatMulNBits, which at accuracy level 0 (float
activations, qhl's math) ran at 0.02-0.6x float32 on this CPU (no fast 8-bit float kernel), and
at level 4 quantizes the activations to int8, which is W8A8 math, not W8A16. So the default
is the Cast form; `translate_dequantize` is kept for consumers that want QDQ graphs.
The `Transpose` of the weight is folded into the initializer at export.

The weight-only helpers here (float32 in, dtype of x out, bias) are shared with w4a16.
"""
from __future__ import annotations

from typing import Any

from qhl.codegen.onnx.per_token_quant import opset

__all__ = ["OPS", "ADD_IS_BIAS", "translate", "translate_dequantize", "as_float32", "finish"]

# The translation's only Add is the bias (ops_for_form leaves it out for a layer without one).
ADD_IS_BIAS = True

OPS: dict[str, list[str]] = {
    "standard": ["Cast", "MatMul", "Mul", "Add"],
    "onnxruntime": ["Cast", "MatMul", "Mul", "Add"],
    "dequantize": ["DequantizeLinear", "MatMul", "Add"],
}


def as_float32(x: Any) -> tuple[Any, Any]:
    """(x as float32, x's original dtype or None)."""
    from onnxscript import ir

    dtype = getattr(x, "dtype", None)
    if dtype in (None, ir.DataType.FLOAT):
        return x, None
    return opset().Cast(x, to=ir.DataType.FLOAT), dtype


def finish(y: Any, bias: Any, x_dtype: Any) -> Any:
    """y (+ b), cast back to the activations' dtype."""
    from onnxscript import ir

    op = opset()
    if bias is not None:
        b = bias if getattr(bias, "dtype", None) in (None, ir.DataType.FLOAT) else op.Cast(bias, to=ir.DataType.FLOAT)
        y = op.Add(y, b)
    return y if x_dtype is None else op.Cast(y, to=x_dtype)


def translate(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """qhl::w8a16_linear(x, Wq [N, K] int8, s_w [N], b) -> y [..., N]: Cast + MatMul + Mul."""
    from onnxscript import ir

    op = opset()
    xf, x_dtype = as_float32(x)
    w = op.Cast(op.Transpose(w_int8, perm=[1, 0]), to=ir.DataType.FLOAT)
    return finish(op.Mul(op.MatMul(xf, w), w_scale), bias, x_dtype)


def translate_dequantize(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """The QDQ variant: DequantizeLinear(int8 per-axis) + MatMul (ORT: 8-bit MatMulNBits)."""
    op = opset()
    xf, x_dtype = as_float32(x)
    w = op.DequantizeLinear(op.Transpose(w_int8, perm=[1, 0]), w_scale, axis=1)
    return finish(op.MatMul(xf, w), bias, x_dtype)


def translate_onnxruntime(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """The onnxruntime target: the standard form (8-bit MatMulNBits at level 0 is slower)."""
    return translate(x, w_int8, w_scale, bias)
