"""qhl.codegen.onnx: the onnx face of every qhl:: op, one file per form.

    torch.ops.qhl.quantize_per_token  ->  per_token_quant.py   ReduceMax/ReduceMin scale + blocked QuantizeLinear
    torch.ops.qhl.w8a8_linear         ->  w8a8.py              uint8 (zp 128) QuantizeLinear + MatMulInteger + scale Muls
    torch.ops.qhl.w8a8_tensor_linear  ->  w8a8_tensor.py       DynamicQuantizeLinear + MatMulInteger + Mul (ORT: DynamicQuantizeMatMul)
    torch.ops.qhl.w8a16_linear        ->  w8a16.py             Cast(int8 W) + MatMul + Mul
    torch.ops.qhl.w4a16_linear        ->  w4a16.py             blocked uint4 DequantizeLinear + MatMul
                                                               (target "onnxruntime": com.microsoft MatMulNBits)
    torch.ops.qhl.blocklr_linear      ->  blocklr.py           Slice + 2k MatMuls (float16 factors) + Concat
    torch.ops.qhl.lr_w4a16_linear     ->  lr_w4a16.py          low-rank MatMuls + w4a16's DequantizeLinear/MatMul, Add

TRANSLATIONS (standard ONNX, opset >= 21; exports use 23) is what `qhl.export_onnx` hands torch.onnx.export as its
custom_translation_table; `translation_table("onnxruntime")` swaps in contrib ops where they
were measured faster. `ops_for_form(form, target)` lists the ONNX op types a form becomes, for
the inspect report. Importing this package does not import onnxscript.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import qhl.codegen  # noqa: F401  (registers the qhl:: ops named below)
from qhl.codegen.onnx import per_token_quant, w4a16, w8a8, w8a8_tensor, w8a16
from qhl.codegen.onnx.per_token_quant import DEFAULT_OPSET, set_opset
from qhl.errors import UnsupportedError

__all__ = [
    "TRANSLATIONS",
    "TARGETS",
    "FORM_MODULES",
    "ACCURACY_LEVEL",
    "DEFAULT_OPSET",
    "translation_table",
    "ops_for_form",
    "set_opset",
]

TARGETS = ("standard", "onnxruntime")
# The MatMulNBits accuracy level qhl chooses (0: activations stay float, which is qhl's math).
ACCURACY_LEVEL = w4a16.ACCURACY_LEVEL

# form name -> (module, the qhl:: op it translates)
FORM_MODULES: dict[str, tuple[Any, Any]] = {
    "quantize_per_token": (per_token_quant, torch.ops.qhl.quantize_per_token.default),
    "w8a8": (w8a8, torch.ops.qhl.w8a8_linear.default),
    "w8a8-tensor": (w8a8_tensor, torch.ops.qhl.w8a8_tensor_linear.default),
    "w8a16": (w8a16, torch.ops.qhl.w8a16_linear.default),
    "w4a16": (w4a16, torch.ops.qhl.w4a16_linear.default),
}
from qhl.codegen.onnx import blocklr, lr_w4a16  # noqa: E402  (issue 6: low-rank compression)

FORM_MODULES.update({
    "blocklr": (blocklr, torch.ops.qhl.blocklr_linear.default),
    "lr-w4a16": (lr_w4a16, torch.ops.qhl.lr_w4a16_linear.default),
})
from qhl.codegen.onnx import gralora as _gralora  # noqa: E402  (issue 6: GraLoRA / LoRA adapters)

FORM_MODULES.update({
    "gralora": (_gralora, torch.ops.qhl.gralora_linear.default),
    "gralora_w4a16": (_gralora.w4a16_form, torch.ops.qhl.gralora_w4a16_linear.default),
})
from qhl.codegen.onnx import w4a4, w4a8  # noqa: E402  (issue 5: int4 weights, 8/4-bit activations)

FORM_MODULES.update({
    "w4a8": (w4a8, torch.ops.qhl.w4a8_linear.default),
    "w4a4": (w4a4, torch.ops.qhl.w4a4_linear.default),
})
from qhl.codegen.onnx import hadamard as _hadamard  # noqa: E402  (issue 5: Hadamard rotations)

FORM_MODULES.update({
    "hadamard": (_hadamard, torch.ops.qhl.hadamard.default),
    "hadamard_quantize_per_token": (_hadamard.quantize_form, torch.ops.qhl.hadamard_quantize_per_token.default),
})


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise UnsupportedError(f"unknown ONNX target {target!r}; valid targets: {list(TARGETS)}")


def translation_table(target: str = "standard") -> dict[Any, Callable[..., Any]]:
    """torch.ops.qhl.<op>.default -> onnxscript translation, for one target."""
    _check_target(target)
    table = {}
    for module, overload in FORM_MODULES.values():
        fn = getattr(module, "translate_onnxruntime", None) if target == "onnxruntime" else None
        table[overload] = fn or module.translate
    return table


TRANSLATIONS: dict[Any, Callable[..., Any]] = translation_table("standard")


def ops_for_form(form: str, target: str = "standard", has_bias: bool = True) -> list[str]:
    """The ONNX op types one form becomes (e.g. "w4a16" -> ["DequantizeLinear", "MatMul", "Add"];
    without a bias, no "Add" where the form module says its only Add is the bias: ADD_IS_BIAS).

    A form qhl has no translation for returns [] (the float ops of an unrewritten layer are the
    exporter's: MatMul/Gemm).
    """
    _check_target(target)
    entry = FORM_MODULES.get(form)
    if entry is None:
        return []
    ops = list(entry[0].OPS.get(target, entry[0].OPS["standard"]))
    if has_bias or not getattr(entry[0], "ADD_IS_BIAS", False):
        return ops
    return [o for o in ops if o != "Add"]
