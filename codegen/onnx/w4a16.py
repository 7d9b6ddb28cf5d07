"""ONNX face of qhl::w4a16_linear: int4 group-wise weights (blocked uint4), float activations.

standard (opset >= 21):

    packed [N, K/2] uint8 ─ BitwiseAnd(15) / BitShift(4) ─ interleave ─ codes [N, K]
      ─ Transpose ─ Cast(uint4) ─────────────────────────────┐   (folded into a uint4
    scale [N, K/g] ─ Transpose ─ [K/g, N] ───────────────────┤    [K, N] initializer
    zero  [N, K/g] ─ Transpose ─ Cast(uint4) ─ [K/g, N] ─────┤    at export)
                       DequantizeLinear(axis=0, block_size=g) ─ W [K, N] ─ MatMul(x, W) ─ Add(b)

The unpacking subgraph depends only on initializers, and qhl.onnx_export folds it, so the file
holds the canonical blocked-uint4 DequantizeLinear -> MatMul, which ONNX Runtime fuses into
com.microsoft::MatMulNBits (bits 4, block g). The accuracy level of that fusion is a session
setting: qhl's sessions set `session.qdq_matmulnbits_accuracy_level` = "0" (float
activations: qhl's math); ORT's default, 4, quantizes the activations to int8.

onnxruntime target: com.microsoft::MatMulNBits emitted directly, with accuracy_level=0 in the
node itself (so any ORT session computes qhl's math), B = packed reshaped [N, K/g, g/2] (the
same bytes: low nibble = even k), zero points packed two per byte.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qhl.codegen.onnx.per_token_quant import const, ms_op, opset
from qhl.codegen.onnx.w8a16 import as_float32, finish

__all__ = ["OPS", "ADD_IS_BIAS", "translate", "translate_onnxruntime", "unpack_codes"]

# The translation's only Add is the bias (ops_for_form leaves it out for a layer without one).
ADD_IS_BIAS = True

OPS: dict[str, list[str]] = {
    "standard": ["DequantizeLinear", "MatMul", "Add"],
    "onnxruntime": ["MatMulNBits"],
}
ACCURACY_LEVEL = 0  # float activations: the MatMulNBits accuracy level that is qhl's math


def _static_shape(t: Any, name: str) -> tuple[int, ...]:
    from qhl.errors import UnsupportedError

    shape = getattr(t, "shape", None)
    dims = tuple(getattr(d, "value", d) for d in (shape or ()))
    if shape is None or not all(isinstance(d, int) for d in dims):
        raise UnsupportedError(f"w4a16 ONNX translation needs a static {name} shape, got {shape}")
    return dims


def unpack_codes(packed: Any, n: int, k: int) -> Any:
    """uint8 [N, K/2] two codes per byte -> uint8 codes [N, K] (low nibble = even k)."""
    op = opset()
    low = op.BitwiseAnd(packed, const(15, np.uint8))
    high = op.BitShift(packed, const(4, np.uint8), direction="RIGHT")
    axis = const([-1], np.int64)
    pairs = op.Concat(op.Unsqueeze(low, axis), op.Unsqueeze(high, axis), axis=-1)
    return op.Reshape(pairs, const([n, k], np.int64))


def translate(x: Any, packed: Any, scale: Any, zero: Any, group_size: int, bias: Any = None) -> Any:
    """qhl::w4a16_linear -> blocked uint4 DequantizeLinear + MatMul (+ Add)."""
    from onnxscript import ir

    op = opset()
    n, half_k = _static_shape(packed, "packed weight")
    k = 2 * half_k
    xf, x_dtype = as_float32(x)
    codes = op.Cast(op.Transpose(unpack_codes(packed, n, k), perm=[1, 0]), to=ir.DataType.UINT4)
    zp = op.Cast(op.Transpose(zero, perm=[1, 0]), to=ir.DataType.UINT4)
    w = op.DequantizeLinear(codes, op.Transpose(scale, perm=[1, 0]), zp, axis=0, block_size=int(group_size))
    return finish(op.MatMul(xf, w), bias, x_dtype)


def translate_onnxruntime(
    x: Any, packed: Any, scale: Any, zero: Any, group_size: int, bias: Any = None
) -> Any:
    """qhl::w4a16_linear -> com.microsoft::MatMulNBits(bits=4, accuracy_level=0)."""
    op = opset()
    n, half_k = _static_shape(packed, "packed weight")
    k, g = 2 * half_k, int(group_size)
    blocks = k // g
    xf, x_dtype = as_float32(x)
    b = op.Reshape(packed, const([n, blocks, g // 2], np.int64))
    # zero points: two 4-bit values per byte along the blocks (low nibble first), padded to even
    z = zero
    if blocks % 2:
        z = op.Concat(z, op.Expand(const(8, np.uint8), const([n, 1], np.int64)), axis=1)
    zs = op.Reshape(z, const([n, (blocks + 1) // 2, 2], np.int64))
    idx = lambda i: const([i], np.int64)  # noqa: E731
    z_lo = op.Squeeze(op.Slice(zs, idx(0), idx(1), idx(2)), idx(2))
    z_hi = op.Squeeze(op.Slice(zs, idx(1), idx(2), idx(2)), idx(2))
    zp = op.Reshape(op.BitwiseOr(z_lo, op.BitShift(z_hi, const(4, np.uint8), direction="LEFT")), const([-1], np.int64))
    y = ms_op("MatMulNBits")(
        xf, b, op.Reshape(scale, const([-1], np.int64)), zp,
        K=k, N=n, bits=4, block_size=g, accuracy_level=ACCURACY_LEVEL,
    )
    return finish(y, bias, x_dtype)
