"""qhl.onnx_w4a16_halves: float activations as two int8 halves into ORT's level-4 MatMulNBits.

The rewrite is held to the float-activation MatMulNBits (accuracy level 0, qhl's w4a16 math) at a
tolerance derived from the halves: level 4 leaves at most max|x_block| / 64516 of each element
(module docstring), so |y_halves - y_float| <= sum over blocks of max|x_block| / 64516 * sum |W|
over the block, plus float32 rounding of the two products (2e-6 of sum |x| |W| covers it).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from qhl.errors import UnsupportedError  # noqa: E402
from qhl.onnx_export import export_onnx  # noqa: E402
from qhl.onnx_w4a16_halves import decline_reason, ops_after_split, split_w4a16_activations  # noqa: E402
from qhl.runtime import ort as qort  # noqa: E402

K, N = 256, 48
RESIDUE = 1 / (2 * 127 * 254)  # level 4 leaves at most this fraction of a block's max |x|


def _weights(block: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (N, K // block, block // 2), np.uint8)
    scales = (rng.random(N * (K // block), np.float32) * 0.1 + 0.01).astype(np.float32)
    zeros = rng.integers(0, 16, (N, K // block), np.uint8)  # one 4-bit zero point per block
    return packed, scales, zeros


def _packed_zeros(zeros: np.ndarray) -> np.ndarray:
    """MatMulNBits' zero_points input: two per byte along the blocks, low nibble first."""
    z = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)), constant_values=8)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)


def _dequantized(packed, scales, zeros, block, zero_points: bool = False) -> np.ndarray:
    """W [K, N] float64 that MatMulNBits stands for (without zero points: zero point 8)."""
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(N, K // block, block).astype(np.float64)
    zp = zeros[..., None].astype(np.float64) if zero_points else 8.0
    return ((codes - zp) * scales.reshape(N, K // block, 1)).reshape(N, K).T


def _model(block: int, bias: bool = False, zero_points: bool = False, **attrs) -> onnx.ModelProto:
    packed, scales, zeros = _weights(block)
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")]
    inputs = ["x", "w", "s"]
    if zero_points:
        inits.append(numpy_helper.from_array(_packed_zeros(zeros), "z"))
        inputs.append("z")
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, N, dtype=np.float32), "bias"))
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    kw = dict(K=K, N=N, bits=4, block_size=block, accuracy_level=0) | attrs
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", name="mm", **kw)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _rewritten(proto: onnx.ModelProto, mode: str, max_rows: int = 4, min_weights: int = 0) -> tuple[onnx.ModelProto, int]:
    model = ir.from_proto(proto)
    changed = split_w4a16_activations(model, mode, max_rows=max_rows, min_weights=min_weights)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, changed


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return qort.session(proto.SerializeToString()).run(None, {"x": x})[0]


def _bound(x: np.ndarray, w: np.ndarray, block: int) -> np.ndarray:
    """Per output element: the halves' residue times |W| per block, plus float32 rounding."""
    xb = np.abs(x.astype(np.float64)).reshape(-1, K // block, block)
    amax = xb.max(-1)  # [rows, blocks]
    wabs = np.abs(w).reshape(K // block, block, N).sum(1)  # [blocks, N]
    return (amax * RESIDUE) @ wabs + 2e-6 * (np.abs(x.reshape(-1, K)).astype(np.float64) @ np.abs(w))


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bias, zero_points", [(False, False), (True, False), (False, True), (True, True)])
def test_halves_match_float_activations_within_the_derived_bound(block, bias, zero_points):
    proto = _model(block, bias, zero_points)
    halves, changed = _rewritten(proto, "int8x2")
    assert changed == 1
    w = _dequantized(*_weights(block), block, zero_points)
    x0 = np.random.default_rng(0).standard_normal((1, 1, K)).astype(np.float32)
    np.testing.assert_allclose(_run(proto, x0).reshape(-1), x0.reshape(-1).astype(np.float64) @ w + (
        np.linspace(-1, 1, N) if bias else 0), rtol=1e-4, atol=1e-4)  # the helper's W is ORT's
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (2, 3), (1, 9)]:
        x = (rng.standard_normal((*shape, K)) * rng.uniform(0.01, 10, (*shape, 1))).astype(np.float32)
        x[..., :block] = 0  # an all-zero block: scale 1, codes 0, no NaN
        want, got = _run(proto, x), _run(halves, x)
        assert got.shape == want.shape and np.isfinite(got).all()
        err = np.abs(got.astype(np.float64) - want).reshape(-1, N)
        assert (err <= _bound(x, w, block)).all(), err.max()
        # and far from int8 activations (level 4 alone): the point of the halves
        one_digit = _run(_model(block, bias, zero_points, accuracy_level=4), x)
        assert err.max() < 0.1 * np.abs(one_digit - want).max()


def test_auto_switches_to_the_float_kernel_above_max_rows():
    proto = _model(32)
    auto, _ = _rewritten(proto, "auto", max_rows=4)
    ifs = [n for n in auto.graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    branches = {a.name: a.g for a in ifs[0].attribute}
    levels = {name: [next(a.i for a in n.attribute if a.name == "accuracy_level")
                     for n in g.node if n.op_type == "MatMulNBits"] for name, g in branches.items()}
    assert levels == {"then_branch": [4], "else_branch": [0]}
    rng = np.random.default_rng(2)
    for rows, halves in [(1, True), (4, True), (5, False), (12, False)]:
        x = rng.standard_normal((1, rows, K)).astype(np.float32)
        want, got = _run(proto, x), _run(auto, x)
        if halves:
            assert 0 < np.abs(got - want).max() <= _bound(x, _dequantized(*_weights(32), 32), 32).max()
        else:
            np.testing.assert_array_equal(got, want)  # the node as it was


def test_rewrite_is_idempotent_and_float_mode_changes_nothing():
    once, changed = _rewritten(_model(32), "auto")
    assert changed == 1
    _, again = _rewritten(once, "auto")
    assert again == 0  # the level-0 node now lives inside the If
    _, none = _rewritten(_model(32), "float")
    assert none == 0


@pytest.mark.parametrize("attrs, reason", [
    ({"accuracy_level": 4}, "accuracy_level=4"),
    ({"bits": 8}, "bits=8"),
])
def test_declines_other_matmulnbits_and_says_why(attrs, reason):
    proto = _model(32, **attrs)
    node = ir.from_proto(proto).graph.node(0)
    assert reason in decline_reason(node)
    _, changed = _rewritten(proto, "auto")
    assert changed == 0


def test_unnamed_nodes_get_unique_names():
    proto = _model(32)  # y = MatMulNBits(x); add z = the same node, both unnamed
    proto.graph.node[0].name = ""
    twin = onnx.NodeProto()
    twin.CopyFrom(proto.graph.node[0])
    twin.output[0] = "z"
    proto.graph.node.append(twin)
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "t", N]))
    out, changed = _rewritten(proto, "auto")
    assert changed == 2
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))
    x = np.random.default_rng(3).standard_normal((1, 2, K)).astype(np.float32)
    y, z = qort.session(out.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(y, z)


def test_declines_a_block_that_does_not_divide_k():
    node = ir.from_proto(_model(32)).graph.node(0)
    node.attributes["block_size"] = ir.AttrInt64("block_size", 24)
    assert "block_size=24" in decline_reason(node)


def test_auto_leaves_small_layers_and_int8x2_does_not():
    assert "K x N = 256 x 48 < 4194304" in decline_reason(ir.from_proto(_model(32)).graph.node(0), 2**22)
    _, changed = _rewritten(_model(32), "auto", min_weights=2**22)
    assert changed == 0
    _, changed = _rewritten(_model(32), "int8x2", min_weights=2**22)  # asked for: every size
    assert changed == 1


def test_ops_after_split():
    assert ops_after_split(["DequantizeLinear", "MatMul"], "auto") == ["DequantizeLinear", "MatMul"]
    assert ops_after_split(["MatMulNBits", "Add"], "auto", weights=576 * 1536) == ["MatMulNBits", "Add"]
    ops = ops_after_split(["MatMulNBits", "Add"], "auto", weights=2**22)
    assert ops[:4] == ["Size", "LessOrEqual", "If", "MatMulNBits"] and "Round" in ops
    assert "If" not in ops_after_split(["MatMulNBits"], "int8x2")
    assert ops_after_split(["MatMulNBits"], "float") == ["MatMulNBits"]


def _stack(width: int = 256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width // 2)).eval()


def test_export_onnxruntime_target_defaults_to_auto_and_keeps_parity(tmp_path):
    # 2048 x 2048 = 2^22 weights: split at few rows; 2048 x 1024: too small, left as it was
    model = _stack(2048)
    res = export_onnx(model, (torch.randn(1, 8, 2048),), tmp_path / "m.onnx", recipe="w4a16",
                      target="onnxruntime", group_size=64)
    assert res.w4a16_activations == "auto"
    proto = onnx.load(str(res.path))
    assert [n.op_type for n in proto.graph.node].count("If") == 1
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 1
    assert {p.key: p.value for p in proto.metadata_props}["qhl.w4a16_activations"] == "auto"
    assert ["If" in r.onnx_ops for r in res.report.layers if r.form] == [True, False]
    gm, sess = res.report.graph_module, qort.session(res.path)
    for shape in [(1, 1, 2048), (1, 3, 2048), (1, 40, 2048)]:  # halves, halves, float kernel (batch 1: static)
        x = torch.randn(*shape)
        got, want = qort.run(sess, (x,))[0], gm(x).detach().numpy()
        cos = float((got.ravel().astype(np.float64) @ want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert got.shape == want.shape and cos >= 0.99999, (shape, cos)


def test_export_rejects_halves_for_the_standard_target_and_unknown_modes(tmp_path):
    x = (torch.randn(1, 4, 256),)
    with pytest.raises(UnsupportedError, match="needs target='onnxruntime'"):
        export_onnx(_stack(), x, tmp_path / "a.onnx", recipe="w4a16", w4a16_activations="int8x2")
    with pytest.raises(UnsupportedError, match="unknown w4a16_activations 'int4'"):
        export_onnx(_stack(), x, tmp_path / "b.onnx", recipe="w4a16", target="onnxruntime", w4a16_activations="int4")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_cli_flag_reaches_the_export(tmp_path):
    import os
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qhl.cli", "export", "tests.qhl_testing:mlp_factory",
                               "--recipe", "w4a16", "--knob", "group_size=32", *args],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)

    ok = run("-o", str(tmp_path / "a.onnx"), "--target", "onnxruntime", "--w4a16-activations", "int8x2")
    assert ok.returncode == 0 and "w4a16 activations int8x2" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    bad = run("-o", str(tmp_path / "b.onnx"), "--w4a16-activations", "int8x2")  # standard target
    said = " ".join((bad.stdout + bad.stderr).split())  # the log handler wraps long lines
    assert bad.returncode == 2 and "UnsupportedError: w4a16_activations='int8x2' needs target='onnxruntime'" in said
    assert not (tmp_path / "b.onnx").exists()
