"""ONNX face of qhl::w8a8_tensor_linear: per-tensor uint8 activations x per-channel int8 weights.

    x [..., K] float ─ DynamicQuantizeLinear ─ q uint8, s [], z uint8 [] ─┐
    Wq [N, K] int8 ── Transpose (folded) ── Wq^T [K, N] ──────────────────┴ MatMulInteger(q, Wq^T, z)
      ─ Cast(float) ─ Mul(Mul(s, s_w [N])) ─ Add(b)                                     = y [..., N]

This is the op pattern ONNX Runtime's own `quantize_dynamic` writes, and ORT's graph optimizer
fuses it (level 2, ORT_ENABLE_EXTENDED and above) into one com.microsoft `DynamicQuantizeMatMul`
kernel with the bias: min/max, quantize, integer GEMM and the scale-and-bias output stage in one
node. DynamicQuantizeLinear is the spec's D exactly (codegen/w8a8_tensor.py): the same range,
scale, zero point and half-to-even rounding. MatMulInteger subtracts z from every code in int32,
the spec's exact sum; the output stage multiplies by the product s * s_w[n], the spec's order.

After export, qhl.onnx_export stores Wq^T as uint8 (+128, b_zero_point 128) unless
int8_operands="u8s8", as for w8a8: ORT's u8 x s8 kernel saturates on x86 CPUs without VNNI.

onnxruntime target: com.microsoft::DynamicQuantizeMatMul(x, Wq^T, s_w, [b_zero_point], b) written
directly (what the standard file becomes inside ORT; no fusion needed).
"""
from __future__ import annotations

from typing import Any

from qhl.codegen.onnx.per_token_quant import ms_op, opset
from qhl.codegen.onnx.w8a16 import as_float32

__all__ = ["OPS", "ADD_IS_BIAS", "translate", "translate_onnxruntime"]

# The translation's only Add is the bias (ops_for_form leaves it out for a layer without one).
ADD_IS_BIAS = True

OPS: dict[str, list[str]] = {
    "standard": ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add"],
    "onnxruntime": ["DynamicQuantizeMatMul"],
}


def _out(y: Any, x_dtype: Any) -> Any:
    return y if x_dtype is None else opset().Cast(y, to=x_dtype)


def _float_bias(bias: Any) -> Any:
    from onnxscript import ir

    if bias is None or getattr(bias, "dtype", None) in (None, ir.DataType.FLOAT):
        return bias
    return opset().Cast(bias, to=ir.DataType.FLOAT)


def translate(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """qhl::w8a8_tensor_linear(x, Wq [N, K] int8, s_w [N], b) -> y [..., N] (dtype of x)."""
    from onnxscript import ir

    op = opset()
    xf, x_dtype = as_float32(x)
    q, s, z = op.DynamicQuantizeLinear(xf)
    acc = op.MatMulInteger(q, op.Transpose(w_int8, perm=[1, 0]), z)
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(s, w_scale))
    b = _float_bias(bias)
    return _out(y if b is None else op.Add(y, b), x_dtype)


def translate_onnxruntime(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """The onnxruntime target: one com.microsoft DynamicQuantizeMatMul."""
    op = opset()
    xf, x_dtype = as_float32(x)
    b = _float_bias(bias)
    args = [xf, op.Transpose(w_int8, perm=[1, 0]), w_scale] + ([None, b] if b is not None else [])
    return _out(ms_op("DynamicQuantizeMatMul")(*args), x_dtype)
