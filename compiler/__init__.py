"""qhl: lower PyTorch matmuls into quantized, Hadamard-rotated and low-rank forms.

    torch.compile(model, backend="qhl", options={"recipe": "w8a8"})   # run, infer or train
    print(qhl.inspect(model, (x,), recipe="w4a16"))                     # see what was rewritten
    qhl.export_onnx(model, (x,), "model.onnx", recipe="w4a16")          # deploy anywhere
"""
from __future__ import annotations

import logging

from qhl.errors import (
    CaptureError,
    KernelError,
    QhlError,
    RecipeError,
    UnsupportedError,
    VerificationError,
)
from qhl.errors import AdapterError
from qhl.recipes import LayerOverride, Recipe, recipe, recipes

__all__ = [
    "backend",
    "inspect",
    "export_onnx",
    "ExportResult",
    "recipe",
    "recipes",
    "Recipe",
    "LayerOverride",
    "Report",
    "QhlError",
    "RecipeError",
    "CaptureError",
    "UnsupportedError",
    "KernelError",
    "VerificationError",
    "sqnr_db",
    "hadamard_matrix",
    "mixed_w8a8_recipe",
    "prepare",
    "merge",
    "load_adapter",
    "AdapterError",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    # The heavy parts (torch.library op registration, capture) load on first use.
    if name == "backend":
        from qhl.compile_backend import backend

        return backend
    if name in ("inspect", "Report"):
        from qhl import report

        return getattr(report, name)
    if name in ("export_onnx", "ExportResult"):
        from qhl import onnx_export

        return getattr(onnx_export, name)
    if name in ("prepare", "merge", "load_adapter"):
        from qhl import adapters

        return getattr(adapters, name)
    if name == "mixed_w8a8_recipe":
        from qhl.mixed_w8a8 import mixed_w8a8_recipe

        return mixed_w8a8_recipe
    if name == "sqnr_db":
        from qhl.metrics import sqnr_db

        return sqnr_db
    if name == "hadamard_matrix":
        from qhl.hadamard import hadamard_matrix

        return hadamard_matrix
    raise AttributeError(f"module 'qhl' has no attribute {name!r}")
