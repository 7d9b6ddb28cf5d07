"""ONNX face of qhl::lr_w4a16_linear: low-rank float part + int4 residual, standard ONNX.

    x ─ MatMul(Cast(L2^T [K, r])) ─ MatMul(Cast(L1^T [r, N])) ──────────────┐
    x ─ MatMul(DequantizeLinear(blocked uint4 residual, as w4a16)) ─────────┴ Add ─ Add(b)

The int4 half is codegen/onnx/w4a16.py's translation (blocked uint4 DequantizeLinear + MatMul,
its unpacking folded at export); the transposes of the float16 factors fold into float16
initializers, and the Casts to float32 run in ONNX Runtime. Target "onnxruntime": the int4 half
becomes com.microsoft::MatMulNBits (accuracy level 0), as for w4a16.
"""
from __future__ import annotations

from typing import Any

from qhl.codegen.onnx import w4a16
from qhl.codegen.onnx.per_token_quant import opset
from qhl.codegen.onnx.w8a16 import as_float32, finish

__all__ = ["OPS", "translate", "translate_onnxruntime"]

OPS: dict[str, list[str]] = {
    "standard": ["MatMul", "DequantizeLinear", "Add"],
    "onnxruntime": ["MatMul", "MatMulNBits", "Add"],
}


def _low_rank(xf: Any, l1: Any, l2: Any) -> Any:
    from onnxscript import ir

    op = opset()
    l2t = op.Cast(op.Transpose(l2, perm=[1, 0]), to=ir.DataType.FLOAT)
    l1t = op.Cast(op.Transpose(l1, perm=[1, 0]), to=ir.DataType.FLOAT)
    return op.MatMul(op.MatMul(xf, l2t), l1t)


def translate(x: Any, l1: Any, l2: Any, w_packed: Any, w_scale: Any, w_zero: Any, group_size: int, bias: Any = None) -> Any:
    """qhl::lr_w4a16_linear -> low-rank MatMuls + w4a16's DequantizeLinear/MatMul, summed."""
    xf, x_dtype = as_float32(x)
    y = opset().Add(w4a16.translate(xf, w_packed, w_scale, w_zero, group_size), _low_rank(xf, l1, l2))
    return finish(y, bias, x_dtype)


def translate_onnxruntime(
    x: Any, l1: Any, l2: Any, w_packed: Any, w_scale: Any, w_zero: Any, group_size: int, bias: Any = None
) -> Any:
    """As translate, with the int4 half as com.microsoft::MatMulNBits."""
    xf, x_dtype = as_float32(x)
    y = opset().Add(w4a16.translate_onnxruntime(xf, w_packed, w_scale, w_zero, group_size), _low_rank(xf, l1, l2))
    return finish(y, bias, x_dtype)
