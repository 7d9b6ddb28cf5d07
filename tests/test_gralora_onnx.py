"""ONNX face of qhl::gralora_linear / qhl::gralora_w4a16_linear (codegen/onnx/gralora.py).

A tiny module calling the op is exported with torch.onnx.export(dynamo=True,
custom_translation_table=qhl.codegen.onnx.TRANSLATIONS / translation_table("onnxruntime")), run in
ONNX Runtime and compared with the op's spec face on the same inputs (and on a second input of
another leading shape: the leading dims are dynamic).

Tolerances: both sides compute in float32 in different orders (ORT's MatMul vs torch's bmm/addmm),
~1e-7 relative; we require cosine >= 0.9999 (the issue's bound) and elementwise
|ort - spec| <= 1e-4 * max|spec| + 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qhl.codegen  # noqa: F401
import qhl.codegen.onnx as qonnx
from qhl.codegen import quant

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from qhl.runtime import ort as qort  # noqa: E402


class _GraloraLayer(nn.Module):
    def __init__(self, d_in=32, d_out=48, k=2, r=8, hybrid_r=4, w4=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_out, d_in, generator=g)
        self.w4 = w4
        if w4:
            packed, scale, zero = quant.quantize_int4_groupwise(w, 32, False)
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out, generator=g))
        self.lora_a = nn.Parameter(torch.randn(k, d_in // k, r, generator=g))
        self.lora_b = nn.Parameter(torch.randn(k, r, d_out // k, generator=g))
        self.hybrid_a = nn.Parameter(torch.randn(hybrid_r, d_in, generator=g)) if hybrid_r else None
        self.hybrid_b = (
            nn.Parameter(torch.randn(d_out, hybrid_r, generator=g)) if hybrid_r else None
        )
        self.scaling = 16 / (r + hybrid_r)

    def forward(self, x):
        adapter = (self.lora_a, self.lora_b, self.hybrid_a, self.hybrid_b, self.scaling)
        if self.w4:
            return torch.ops.qhl.gralora_w4a16_linear(
                x, self.packed, self.scale, self.zero, 32, self.bias, *adapter
            )
        return torch.ops.qhl.gralora_linear(x, self.weight, self.bias, *adapter)


def _export_and_compare(model, tmp_path, table, name):
    x = torch.randn(2, 5, 32)
    program = torch.onnx.export(
        model.eval(),
        (x,),
        dynamo=True,
        opset_version=21,
        verbose=False,
        custom_translation_table=table,
        dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},),
    )
    path = tmp_path / f"{name}.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = qort.session(path)
    for inp in (x, torch.randn(3, 7, 32)):
        with torch.no_grad():
            ref = model(inp).numpy()
        got = qort.run(sess, (inp,))[0]
        assert got.shape == ref.shape
        cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
        assert cos >= 0.9999
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max() + 1e-5)
    return ops


@pytest.mark.parametrize("k,hybrid_r", [(2, 4), (4, 0), (1, 0)], ids=["k2-hybrid", "k4", "lora"])
def test_export_gralora(tmp_path, k, hybrid_r):
    ops = _export_and_compare(
        _GraloraLayer(k=k, hybrid_r=hybrid_r), tmp_path, qonnx.TRANSLATIONS, "g"
    )
    assert "MatMul" in ops
    assert set(ops) <= set(qonnx.ops_for_form("gralora")) | {"Constant", "Cast"}, ops


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_export_gralora_w4a16(tmp_path, target):
    ops = _export_and_compare(
        _GraloraLayer(w4=True), tmp_path, qonnx.translation_table(target), f"g4_{target}"
    )
    expected = "MatMulNBits" if target == "onnxruntime" else "DequantizeLinear"
    assert expected in ops
