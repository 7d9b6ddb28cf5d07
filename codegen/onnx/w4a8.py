"""ONNX face of qhl::w4a8_linear: 8-bit per-token activations x int4 per-channel weights.

The translation is shared with w4a4 (codegen/onnx/w4ax.py, where the graph is drawn).
"""
from __future__ import annotations

from typing import Any

from qhl.codegen.onnx.w4ax import ADD_IS_BIAS, OPS, translate_w4ax

__all__ = ["OPS", "ADD_IS_BIAS", "translate"]


def translate(x: Any, w_packed: Any, w_scale: Any, bias: Any = None, hadamard_block: int = -1) -> Any:
    """qhl::w4a8_linear -> uint8 QuantizeLinear + MatMulInteger (int8 weight codes, zp 8) + Muls."""
    return translate_w4ax(x, w_packed, w_scale, bias, hadamard_block, 8)
