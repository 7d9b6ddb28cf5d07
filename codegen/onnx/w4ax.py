"""ONNX face of qhl::w4a8_linear and qhl::w4a4_linear (standard ONNX, opset >= 21).

    x [..., K] float ─ [rotation] ─ s_x = amax / qmax ─ QuantizeLinear(uint8, zp 128) ─ xq ─┐
    w_packed [N, K/2] ─ BitwiseAnd / BitShift ─ codes q + 8 [N, K] ─ Transpose ─ Cast(int8)│
        (folded at export into one int8 [K, N] initializer of codes q + 8) ─────────────────┤
                                         MatMulInteger(xq, W, a_zp = 128, b_zp = 8) ─ int32 [..., N]
      ─ Cast(float) ─ Mul(s_x) ─ Mul(s_w) ─ Add(b)                                  = y [..., N]

The integers are the spec's: (q_x + 128) - 128 = q_x and (q_w + 8) - 8 = q_w, so MatMulInteger
sums exactly q_x * q_w in int32, as the spec's torch._int_mm does. uint8 activations x int8
weights is ONNX Runtime's fast CPU path (codegen/onnx/w8a8.py lists the traps: int8 x int8 is
slow, and the epilogue is two chained Muls so that ORT does not fuse the bias into a
MatMulIntegerToFloat). The weight's zero point 8 is one scalar, which MLAS folds into its column
sums.

Activations: qmax = 127 (w4a8) or 7 (w4a4). QuantizeLinear rounds half to even like the spec;
the spec's clamp to [-qmax, qmax] never binds for s = amax / qmax (|x / s| <= qmax up to one
rounding, which rounds back to qmax), so QuantizeLinear's uint8 saturation is not needed either
and the codes are the spec's bit for bit (tests/test_w4ax.py checks that through ORT).

Stored weight: the exporter folds the unpacking into one int8 [K, N] initializer of codes q + 8,
then stores it as uint4 (half a byte per weight) widened by a Cast(int8)
(`qhl.onnx_export._store_int4_codes`). ONNX Runtime folds that Cast into a constant when it loads
the file, so no Cast runs per call.

hadamard_block >= 0 (rotated recipes): x is rotated by qhl.codegen.onnx.hadamard (the Hadamard
form's translation) before the quantizer; without it the export raises UnsupportedError.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qhl.codegen.onnx.per_token_quant import QUANT_OPS, _float32, _quantize, const, opset, per_token_scale
from qhl.codegen.onnx.w4a16 import _static_shape, unpack_codes
from qhl.errors import UnsupportedError

__all__ = ["OPS", "ADD_IS_BIAS", "translate_w4ax", "per_token_scale_bits"]

_OPS = QUANT_OPS + ["MatMulInteger", "Cast", "Mul", "Add"]
# The translation's only Add is the bias (ops_for_form leaves it out for a layer without one).
ADD_IS_BIAS = True

OPS: dict[str, list[str]] = {"standard": _OPS, "onnxruntime": _OPS}


def per_token_scale_bits(x: Any, qmax: int) -> Any:
    """s [..., 1] = amax(|x|, -1) / qmax, and 1 where that is 0."""
    return per_token_scale(x, qmax)


def _rotate(x: Any, hadamard_block: int) -> Any:
    try:
        from qhl.codegen.onnx import hadamard
    except ImportError:
        hadamard = None
    fn = getattr(hadamard, "rotate", None)
    if fn is None:
        raise UnsupportedError(
            f"hadamard_block={hadamard_block}: the rotated w4a8/w4a4 export needs the Hadamard ONNX "
            "translation (qhl.codegen.onnx.hadamard.rotate(x, block)), which this qhl does not have"
        )
    return fn(x, hadamard_block)


def translate_w4ax(
    x: Any, w_packed: Any, w_scale: Any, bias: Any, hadamard_block: int, bits: int
) -> Any:
    """y [..., N] (dtype of x) for qhl::w4a{bits}_linear; see the module docstring."""
    from onnxscript import ir

    op = opset()
    n, half_k = _static_shape(w_packed, "packed weight")
    x_dtype = getattr(x, "dtype", None)
    xf = _float32(x)
    if hadamard_block >= 0:
        xf = _rotate(xf, hadamard_block)
    sx = per_token_scale_bits(xf, (1 << (bits - 1)) - 1)
    xq = _quantize(xf, sx, 128, ir.DataType.UINT8)
    codes = op.Transpose(unpack_codes(w_packed, n, 2 * half_k), perm=[1, 0])  # q + 8, uint8 [K, N]
    acc = op.MatMulInteger(xq, op.Cast(codes, to=ir.DataType.INT8), const(128, np.uint8), const(8, np.int8))
    y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), sx), w_scale)
    if bias is not None:
        y = op.Add(y, _float32(bias))
    if x_dtype not in (None, ir.DataType.FLOAT):
        y = op.Cast(y, to=x_dtype)
    return y
