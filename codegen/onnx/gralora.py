"""ONNX face of qhl::gralora_linear and qhl::gralora_w4a16_linear (unmerged adapters), opset >= 21.

With T = prod(x.shape[:-1]), k blocks, I = in/k, O = out/k, R the rank, c = R/k
(codegen/gralora.py has the math):

    xa ─ Reshape [T, k, I] ─ Transpose [k, T, I] ─ MatMul(A [k, I, R]) ─ h [k, T, R]     batched
    h ─ Reshape [k, T, k, c] ─ Transpose(2, 1, 0, 3) ─ Reshape [k, T, R] ─ g              regroup
    g ─ MatMul(B [k, R, O]) ─ [k, T, O] ─ Transpose [T, k, O] ─ Reshape [..., out] ─ z     batched
    (hybrid) xa ─ MatMul(hybrid_a^T) ─ MatMul(hybrid_b^T) ─ Add(z)
    y = base(x) + Mul(z, scaling)

base: gralora        MatMul(x, W^T) (+ Add(b)); W^T depends only on an initializer and is folded;
      gralora_w4a16  the w4a16 translation (codegen/onnx/w4a16.py): blocked uint4
                     DequantizeLinear + MatMul, or MatMulNBits for target "onnxruntime".
Everything is float32 (other activation dtypes are cast in and back), like the spec. A merged
layer (the merge pass) is a plain Linear and exports as the exporter's MatMul/Gemm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qhl.codegen.onnx import w4a16
from qhl.codegen.onnx.per_token_quant import const, opset
from qhl.codegen.onnx.w8a16 import as_float32, finish

__all__ = [
    "OPS",
    "OPS_W4A16",
    "translate",
    "translate_w4a16",
    "translate_w4a16_onnxruntime",
    "adapter",
]

# the adapter's op types (Shape/Slice/Concat rebuild the leading dims of x for the output)
_ADAPTER_OPS = ["Reshape", "Transpose", "MatMul", "Shape", "Slice", "Concat", "Mul", "Add"]
OPS: dict[str, list[str]] = {"standard": _ADAPTER_OPS}
OPS_W4A16: dict[str, list[str]] = {
    "standard": ["DequantizeLinear"] + _ADAPTER_OPS,
    "onnxruntime": ["MatMulNBits"] + _ADAPTER_OPS,
}


def _dim(t: Any, axis: int) -> int:
    from qhl.errors import UnsupportedError

    d = t.shape[axis] if getattr(t, "shape", None) is not None else None
    d = getattr(d, "value", d)
    if not isinstance(d, int):
        raise UnsupportedError(
            f"gralora ONNX translation needs static adapter shapes, got {getattr(t, 'shape', None)}"
        )
    return d


def _float(t: Any) -> Any:
    from onnxscript import ir

    if getattr(t, "dtype", None) in (None, ir.DataType.FLOAT):
        return t
    return opset().Cast(t, to=ir.DataType.FLOAT)


def _i64(values) -> Any:
    return const(list(values), np.int64)


def adapter(xa: Any, lora_a: Any, lora_b: Any, hybrid_a: Any, hybrid_b: Any, scaling: float) -> Any:
    """scaling * (gralora(xa) + xa hybrid_a^T hybrid_b^T), float32, shape [..., out]."""
    op = opset()
    k, i_blk, r = (_dim(lora_a, a) for a in range(3))
    o_blk = _dim(lora_b, 2)
    c = r // k
    xf = _float(xa)
    h = op.MatMul(
        op.Transpose(op.Reshape(xf, _i64([-1, k, i_blk])), perm=[1, 0, 2]), _float(lora_a)
    )  # [k, T, R]
    g = op.Reshape(
        op.Transpose(op.Reshape(h, _i64([k, -1, k, c])), perm=[2, 1, 0, 3]), _i64([k, -1, r])
    )
    z = op.Transpose(op.MatMul(g, _float(lora_b)), perm=[1, 0, 2])  # [T, k, O]
    out_shape = op.Concat(op.Slice(op.Shape(xf), _i64([0]), _i64([-1])), _i64([k * o_blk]), axis=0)
    z = op.Reshape(z, out_shape)
    if hybrid_a is not None:
        u = op.MatMul(xf, op.Transpose(_float(hybrid_a), perm=[1, 0]))
        z = op.Add(z, op.MatMul(u, op.Transpose(_float(hybrid_b), perm=[1, 0])))
    return op.Mul(z, const(float(scaling), np.float32))


def _add_adapter(base, xf, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling) -> Any:
    """base (float32) + the adapter of x_adapter, or of x (xf: x as float32) when it is None."""
    xa = xf if x_adapter is None else x_adapter
    return opset().Add(base, adapter(xa, lora_a, lora_b, hybrid_a, hybrid_b, scaling))


def translate(
    x: Any,
    weight: Any,
    bias: Any,
    lora_a: Any,
    lora_b: Any,
    hybrid_a: Any,
    hybrid_b: Any,
    scaling: float,
    x_adapter: Any = None,
) -> Any:
    """qhl::gralora_linear -> MatMul base + batched MatMul adapter."""
    op = opset()
    xf, x_dtype = as_float32(x)
    base = op.MatMul(xf, op.Transpose(_float(weight), perm=[1, 0]))
    y = _add_adapter(base, xf, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling)
    return finish(y, bias, x_dtype)


def _w4a16_translation(base_translate, name: str, doc: str):
    """A translation of qhl::gralora_w4a16_linear on top of `base_translate`, one of the w4a16
    translations (codegen/onnx/w4a16.py): the targets differ only in the base. A factory so that
    the op's argument list, which the exporter reads from each translation's signature, is
    written once for both targets."""

    def translation(
        x,
        w_packed,
        w_scale,
        w_zero,
        group_size,
        bias,
        lora_a,
        lora_b,
        hybrid_a,
        hybrid_b,
        scaling,
        x_adapter=None,
    ):
        xf, x_dtype = as_float32(x)
        base = base_translate(xf, w_packed, w_scale, w_zero, group_size, bias)  # float32, + bias
        y = _add_adapter(base, xf, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling)
        return finish(y, None, x_dtype)

    translation.__name__ = translation.__qualname__ = name
    translation.__doc__ = doc
    return translation


translate_w4a16 = _w4a16_translation(
    w4a16.translate,
    "translate_w4a16",
    "qhl::gralora_w4a16_linear -> blocked uint4 DequantizeLinear + MatMul base + adapter.",
)
translate_w4a16_onnxruntime = _w4a16_translation(
    w4a16.translate_onnxruntime,
    "translate_w4a16_onnxruntime",
    "qhl::gralora_w4a16_linear -> com.microsoft::MatMulNBits base + adapter.",
)


class _W4A16Form:
    """The FORM_MODULES entry of "gralora_w4a16": translate / translate_onnxruntime / OPS."""

    OPS = OPS_W4A16
    translate = staticmethod(translate_w4a16)
    translate_onnxruntime = staticmethod(translate_w4a16_onnxruntime)


w4a16_form = _W4A16Form()
