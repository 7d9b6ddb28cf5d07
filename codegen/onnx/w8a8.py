"""ONNX face of qhl::w8a8_linear: per-token int8 activations x per-channel int8 weights.

    x [..., K] float ─ per-token quantize (uint8, zero point 128) ─┐
    Wq [N, K] int8 ── Transpose (folded at export) ── Wq^T [K, N] ─┴─ MatMulInteger ─ int32 [..., N]
      ─ Cast(float) ─ Mul(s_x [..., 1]) ─ Mul(s_w [N]) ─ Add(b)                      = y [..., N]

The activation codes are the spec's int8 codes shifted by 128 into uint8 with a_zero_point 128,
so MatMulInteger computes exactly sum((q_u8 - 128) * Wq) = sum(q_i8 * Wq) in int32, the same
integers as the spec's torch._int_mm. After export, qhl.onnx_export stores Wq^T as uint8 (+128,
b_zero_point 128) unless int8_operands="u8s8": ORT's u8 x s8 kernel saturates on x86 CPUs without
VNNI (compiler/onnx_export.py's docstring has the measurement). Why this formulation (all standard ONNX, opset >= 21),
measured on the 4x Linear(4096) stack in ONNX Runtime 1.32 CPU (docs/onnx.md has the numbers):

* int8 x int8 MatMulInteger: ORT's CPU kernel for s8s8 is slow (0.05-0.4x float32);
  uint8 x int8 (zero point 128) is the fast path (VNNI): 2.4-5x float32.
* QuantizeLinear with one block of size K per row vs Div/Round/Add/Clip/Cast: the same codes;
  on the 4096 stack A/B QuantizeLinear was as fast or faster (5.0x vs 3.0x float32 at 64 tokens,
  equal within noise at 1/256/512). `per_token_quant.QUANTIZER` switches.
* The QDQ form (QuantizeLinear -> DequantizeLinear -> float MatMul): ORT 1.32 fuses it into
  MatMulIntegerToFloat with a per-row zero point, which then fails at run time.
* DynamicQuantizeLinear + MatMulInteger (what ORT's quantize_dynamic emits) is per-tensor
  asymmetric uint8: not qhl's math (it is less accurate), so it is only a speed baseline.
* Do not spell the epilogue Add(Mul(Cast(acc), Mul(s_x, s_w)), b): ORT 1.32 fuses that pattern
  into MatMulIntegerToFloat although s_x is per token, and the fused node then scales the bias by
  s_x too (measured 15-80 % error per row on one Linear(512); exact without a bias). The two
  chained Muls below are not matched.
* DequantizeLinear on the int32 accumulator (per-axis s_w, or blocked s_x) in place of Cast + one
  Mul: the same floats, no faster in ORT 1.32 (MiniLM 1.45-1.47x vs 1.49x float32, the 4096
  stack within 3 %; one A/B run, 2026-12-03).

onnxruntime target: com.microsoft::MatMulIntegerToFloat(q, Wq^T, 1, s_w, 128) applies the
per-channel weight scale inside the GEMM's output stage (saving the Cast and one Mul pass over
[..., N]); the per-token scale and the bias stay a Mul and an Add. ORT 1.32 also accepts s_x
[..., 1] as a per-row a_scale, but applies it as a pass of its own after the GEMM (bit-identical
output) and measured 3-5 % slower on MiniLM, equal on the 4096 stack (two A/B runs, 2026-12-03);
and with a per-row a_scale it scales the op's bias input by s_x as well (the fusion bug above).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qhl.codegen.onnx.per_token_quant import QUANT_OPS as _PROLOGUE_OPS
from qhl.codegen.onnx.per_token_quant import const, ms_op, opset, quantize_activations_u8

__all__ = ["OPS", "ADD_IS_BIAS", "translate", "translate_onnxruntime"]

# The translation's only Add is the bias (ops_for_form leaves it out for a layer without one).
ADD_IS_BIAS = True

OPS: dict[str, list[str]] = {
    "standard": _PROLOGUE_OPS + ["MatMulInteger", "Cast", "Mul", "Add"],
    "onnxruntime": _PROLOGUE_OPS + ["MatMulIntegerToFloat", "Mul", "Add"],
}


def translate(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """qhl::w8a8_linear(x, Wq [N, K] int8, s_w [N], b) -> y [..., N] (dtype of x)."""
    from onnxscript import ir

    op = opset()
    x_dtype = getattr(x, "dtype", None)
    xq, sx = quantize_activations_u8(x)
    acc = op.MatMulInteger(xq, op.Transpose(w_int8, perm=[1, 0]), const(128, np.uint8))
    y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), sx), w_scale)
    if bias is not None:
        y = op.Add(y, bias if getattr(bias, "dtype", None) == ir.DataType.FLOAT else op.Cast(bias, to=ir.DataType.FLOAT))
    if x_dtype not in (None, ir.DataType.FLOAT):
        y = op.Cast(y, to=x_dtype)
    return y


def translate_onnxruntime(x: Any, w_int8: Any, w_scale: Any, bias: Any = None) -> Any:
    """The onnxruntime target: MatMulIntegerToFloat applies s_w in the GEMM's output stage."""
    from onnxscript import ir

    op = opset()
    x_dtype = getattr(x, "dtype", None)
    xq, sx = quantize_activations_u8(x)
    acc = ms_op("MatMulIntegerToFloat")(
        xq, op.Transpose(w_int8, perm=[1, 0]), const(1.0), w_scale, const(128, np.uint8)
    )
    y = op.Mul(acc, sx)
    if bias is not None:
        y = op.Add(y, bias if getattr(bias, "dtype", None) == ir.DataType.FLOAT else op.Cast(bias, to=ir.DataType.FLOAT))
    if x_dtype not in (None, ir.DataType.FLOAT):
        y = op.Cast(y, to=x_dtype)
    return y
