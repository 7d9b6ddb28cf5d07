"""ONNX face of qhl::quantize_per_token, and the helpers every ONNX translation shares.

    x [..., K] float  ->  Max(ReduceMax(x), Neg(ReduceMin(x))) -> Div(127) -> Where(> 0, s, 1) = s [..., 1]
                      ->  QuantizeLinear(x, s, axis=-1, block_size=K, int8)            = q [..., K]

One block of size K along the last axis *is* one scale per token (opset 21 blocked quantization),
and QuantizeLinear rounds half to even and saturates, which is the spec's round + clamp: with
s = amax / 127 every |x / s| <= 127, so the [-128, 127] saturation never bites. When K is not
static (or QUANTIZER = "round") the same math is spelled Div -> Round -> Clip(-127, 127) ->
Cast(int8); both give identical codes, and on the 4096 stack QuantizeLinear was as fast or faster
(A/B in benchmarks/onnx_speed.py). max|x| is spelled as the larger of max(x) and -min(x), not
ReduceMax(Abs(x)): the same float exactly (negation is exact), without writing |x| out as a
second [..., K] tensor; 25-30 % faster in ORT 1.32 on [64..1024, 384..4096] inputs.

`quantize_activations_u8` is the prologue of the W8A8 translation: the same codes shifted by 128
into uint8 (zero point 128), because ONNX Runtime's CPU MatMulInteger is fast for uint8 x int8
and slow for int8 x int8 (measured: docs/onnx.md).

Translations are plain Python functions called by torch.onnx's exporter in tracing mode: their
tensor arguments are symbolic values, weights have static shapes, and `opset()` is the onnxscript
opset the exporter was asked for. onnxscript is imported on first use, not at import time.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = [
    "OPS",
    "DEFAULT_OPSET",
    "opset",
    "set_opset",
    "ms_op",
    "const",
    "static_dim",
    "abs_max",
    "QUANT_OPS",
    "SCALE_OPS",
    "per_token_scale",
    "quantize_activations_u8",
    "translate",
]

QUANTIZER = "quantize_linear"  # or "round": Div -> Round -> (Add zero) -> Clip -> Cast
DEFAULT_OPSET = 21  # the first opset with blocked (block_size) Q/DQ and int4/uint4 types
_opset_version = DEFAULT_OPSET

# The ONNX op types this form becomes, per target (what the inspect report lists).
SCALE_OPS = ["ReduceMax", "ReduceMin", "Neg", "Max", "Div", "Greater", "Where"]  # per_token_scale
QUANT_OPS = SCALE_OPS + ["Shape", "Expand", "QuantizeLinear"]  # the whole prologue
OPS: dict[str, list[str]] = {"standard": QUANT_OPS, "onnxruntime": QUANT_OPS}


def set_opset(version: int) -> None:
    """Select the default-domain opset the translations emit (must equal the export's opset)."""
    global _opset_version
    _opset_version = int(version)


@functools.lru_cache(maxsize=None)
def _opset(version: int) -> Any:
    from onnxscript import values

    return values.Opset("", version)


def opset() -> Any:
    """The onnxscript default-domain opset of the current export."""
    return _opset(_opset_version)


@functools.lru_cache(maxsize=None)
def ms_op(name: str) -> Any:
    """An onnxscript op of the com.microsoft contrib domain (target="onnxruntime").

    onnx does not know ONNX Runtime's contrib schemas, so the schema is declared here from
    ORT's documentation (only the ops qhl emits).
    """
    import onnx
    from onnxscript import values

    if name not in _MS_SCHEMAS:
        raise KeyError(f"qhl declares no com.microsoft schema for {name!r}; known: {sorted(_MS_SCHEMAS)}")
    inputs, attrs, constraints = _MS_SCHEMAS[name]
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        name, "com.microsoft", 1,
        inputs=[P(n, t, param_option=opt) if o else P(n, t) for n, t, o in inputs],
        outputs=[P("Y", "T3" if name == "MatMulIntegerToFloat" else "T1")],
        type_constraints=[(t, allowed, "") for t, allowed in constraints],
        attributes=[A(a, onnx.defs.OpSchema.AttrType.INT, "", required=True) for a in attrs],
        doc=f"ONNX Runtime contrib op {name} (declared by qhl for emission only)",
    )
    return values.Op(values.Opset("com.microsoft", 1), name, schema)


# name -> ([(input, type var, optional)], required int attributes, [(type var, allowed types)])
_MS_SCHEMAS: dict[str, Any] = {
    "MatMulNBits": (
        [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
         ("g_idx", "T4", True), ("bias", "T1", True)],
        ["K", "N", "bits", "block_size", "accuracy_level"],
        [("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("T2", ["tensor(uint8)", "tensor(int32)"]),
         ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)", "tensor(bfloat16)"]),
         ("T4", ["tensor(int32)"])],
    ),
    "MatMulIntegerToFloat": (
        [("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
         ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)],
        [],
        [("T1", ["tensor(int8)", "tensor(uint8)"]), ("T2", ["tensor(int8)", "tensor(uint8)"]),
         ("T3", ["tensor(float)", "tensor(float16)"])],
    ),
    "DynamicQuantizeMatMul": (
        [("A", "T1", False), ("B", "T2", False), ("b_scale", "T1", False), ("b_zero_point", "T2", True),
         ("bias", "T1", True)],
        [],
        [("T1", ["tensor(float)"]), ("T2", ["tensor(int8)", "tensor(uint8)"])],
    ),
}


def const(value: Any, dtype: Any = np.float32) -> Any:
    """A Constant node holding a numpy value of `dtype` (scalars stay 0-d)."""
    from onnxscript import ir

    return opset().Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def static_dim(t: Any, axis: int) -> int | None:
    """The static size of one axis of a symbolic tensor, or None when it is symbolic/unknown."""
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    try:
        d = shape[axis]
    except IndexError:
        return None
    d = getattr(d, "value", d)
    return d if isinstance(d, int) else None


def abs_max(x: Any) -> Any:
    """max(|x|) over the last axis, kept [..., 1]: Max(ReduceMax(x), Neg(ReduceMin(x)))."""
    op = opset()
    axes = const([-1], np.int64)
    return op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))


def per_token_scale(x: Any, qmax: int = 127) -> Any:
    """s [..., 1] = amax(|x|, -1) / qmax, and 1 where that is 0 (all-zero rows dequantize to 0)."""
    op = opset()
    s = op.Div(abs_max(x), const(float(qmax)))
    return op.Where(op.Greater(s, const(0.0)), s, const(1.0))


def _float32(x: Any) -> Any:
    from onnxscript import ir

    return x if getattr(x, "dtype", None) in (None, ir.DataType.FLOAT) else opset().Cast(x, to=ir.DataType.FLOAT)


def _quantize(x: Any, s: Any, zero: int, dtype: Any) -> Any:
    """round_half_even(x / s) + zero, saturated to `dtype`, one scale per row of the last axis."""
    from onnxscript import ir

    op = opset()
    k = static_dim(x, -1)
    np_dtype = np.uint8 if dtype == ir.DataType.UINT8 else np.int8
    if k is not None and QUANTIZER == "quantize_linear":
        zp = op.Expand(const(zero, np_dtype), op.Shape(s))  # blocked Q/DQ: zero point has s's shape
        return op.QuantizeLinear(x, s, zp, axis=-1, block_size=k)
    lo, hi = (zero - 127, zero + 127)
    r = op.Round(op.Div(x, s))
    if zero:
        r = op.Add(r, const(float(zero)))
    return op.Cast(op.Clip(r, const(float(lo)), const(float(hi))), to=dtype)


def quantize_activations_u8(x: Any) -> tuple[Any, Any]:
    """(q + 128 as uint8 [..., K], s float32 [..., 1]): the W8A8 prologue, zero point 128."""
    from onnxscript import ir

    x = _float32(x)
    s = per_token_scale(x)
    return _quantize(x, s, 128, ir.DataType.UINT8), s


def translate(x: Any) -> tuple[Any, Any]:
    """qhl::quantize_per_token -> (q int8 [..., K], s float32 [..., 1])."""
    from onnxscript import ir

    x = _float32(x)
    s = per_token_scale(x)
    return _quantize(x, s, 0, ir.DataType.INT8), s
