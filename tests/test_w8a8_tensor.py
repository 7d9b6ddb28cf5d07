"""w8a8-tensor (qhl::w8a8_tensor_linear): per-tensor uint8 activations as ONNX's
DynamicQuantizeLinear, per-channel int8 weights.

(a) the quantizer is ONNX Runtime's DynamicQuantizeLinear bit for bit (scale, zero point, codes),
    on inputs chosen for their edges (one-sided, all zero, ties);
(b) the spec's integer GEMM is exact on each CPU formulation (u8 x s8 with VNNI, the codes - 128
    as int8 without, float32 over exact products without a fast int8 GEMM), and the linear
    matches the float64 fake-quant reference;
(c) the straight-through gradient, the fake face, torch.compile;
(d) the ONNX face: the standard file is the op pattern ORT fuses into DynamicQuantizeMatMul (the
    fused node is checked in ORT's optimized graph), both targets and both int8_operands agree
    with qhl's torch graph, and onnx.reference agrees too; a config model exports.
The Triton kernel face is tested in tests/test_w8a8_tensor_triton.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import qhl
from qhl.codegen import cpu_onednn, quant
from qhl.codegen import w8a8_tensor as wt

ort = pytest.importorskip("onnxruntime")


def _edge_inputs():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 129, generator=gen)
    yield "gaussian", base
    yield "scaled up", base * 1e3
    yield "scaled down", base * 1e-3
    yield "all positive", base.abs() + 0.5
    yield "all negative", -base.abs() - 0.5
    yield "all zero", torch.zeros(5, 8)
    yield "one value", torch.full((4, 4), 3.0)
    # codes landing exactly on .5: range [-1, 254/255 * ...] built so x / s hits ties
    s = 2.0 / 255
    yield "ties", torch.tensor([[-1.0, 1.0, 0.5 * s, 1.5 * s, 2.5 * s, -0.5 * s, -1.5 * s, 0.0]])


def _dql_session():
    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, None),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.UINT8, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name,x", list(_edge_inputs()), ids=[n for n, _ in _edge_inputs()])
def test_quantizer_is_onnx_runtimes_dynamic_quantize_linear_bit_for_bit(name, x):
    q, s, z = wt.quantize_per_tensor_u8(x)
    oq, os_, oz = _dql_session().run(None, {"x": x.numpy()})
    assert q.dtype == torch.uint8 and q.shape == x.shape
    np.testing.assert_array_equal(q.numpy(), oq)
    assert s.item() == float(os_) and int(z) == int(oz)


def test_quantizer_covers_the_range_with_all_codes():
    x = torch.linspace(-1.0, 3.0, 1001)
    q, s, z = wt.quantize_per_tensor_u8(x)
    assert int(q.min()) == 0 and int(q.max()) == 255  # asymmetric: [lo, hi] gets all 256 codes
    assert int(z) == 64  # round(1 / (4 / 255))
    # dequantized error is at most half a step
    assert float(((q.float() - z) * s - x).abs().max()) <= float(s) / 2 + 1e-7


def _gemm_reference(q, z, w_int8):
    return (q.to(torch.int64) - int(z)) @ w_int8.to(torch.int64).t()


@pytest.mark.parametrize("plan", ["vnni_u8", "s8", "f32"])
def test_integer_gemm_is_exact_on_every_cpu_formulation(plan, monkeypatch):
    if plan != "f32" and not cpu_onednn.int8_gemm_is_fast():
        pytest.skip("this CPU runs the f32 formulation only")
    if plan == "vnni_u8" and not cpu_onednn.x86_has_int8_vnni():
        pytest.skip("u8 x s8 is exact only with VNNI/AMX")
    monkeypatch.setattr(cpu_onednn, "x86_has_int8_vnni", lambda: plan == "vnni_u8")
    monkeypatch.setattr(cpu_onednn, "int8_gemm_is_fast", lambda: plan != "f32")
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (48, 200), dtype=torch.int8, generator=gen)
    for m in (1, 3, 40):
        x = torch.randn(m, 200, generator=gen) + 0.7
        q, s, z = wt.quantize_per_tensor_u8(x)
        acc = wt.int_gemm_zero_point(q, z, w)
        ref = _gemm_reference(q, z, w)
        if plan == "f32":  # exact products, float32 sums: |sum| < 2^24 here, so exact too
            assert acc.dtype == torch.float32 and float(ref.abs().max()) < 2**24
        else:
            assert acc.dtype == torch.int32
        assert torch.equal(acc.to(torch.int64), ref), plan


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 33, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_the_fake_quant_reference(shape, with_bias):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 96, generator=gen)
    b = torch.randn(40, generator=gen) if with_bias else None
    x = torch.randn(*shape, generator=gen)
    wq, ws = quant.quantize_int8_per_channel(w)
    y = torch.ops.qhl.w8a8_tensor_linear(x, wq, ws, b)
    ref = wt.fake_quant_w8a8_tensor_linear(x, w, b)
    assert y.shape == (*shape[:-1], 40) and y.dtype == x.dtype
    # the int32 sums are exact; float32 rounds the scale product and the epilogue: ~1e-7 relative
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
    # and it is a quantization, not a float matmul: per-tensor codes lose ~30-40 dB
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert qhl.sqnr_db(exact, y) < 50


def test_bfloat16_activations_and_empty_batch():
    w = torch.randn(16, 32)
    wq, ws = quant.quantize_int8_per_channel(w)
    x = torch.randn(3, 32).bfloat16()
    y = torch.ops.qhl.w8a8_tensor_linear(x, wq, ws, None)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)
    assert torch.ops.qhl.w8a8_tensor_linear(torch.empty(0, 32), wq, ws, None).shape == (0, 16)


def test_gradient_is_straight_through_and_fake_face_has_the_shape():
    w = torch.randn(16, 32)
    wq, ws = quant.quantize_int8_per_channel(w)
    b = torch.randn(16, requires_grad=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = torch.ops.qhl.w8a8_tensor_linear(x, wq, ws, b)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ (wq.float() * ws[:, None]))
    torch.testing.assert_close(b.grad, g.sum((0, 1)))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fy = torch.ops.qhl.w8a8_tensor_linear(torch.empty(4, 7, 32), torch.empty(16, 32, dtype=torch.int8),
                                              torch.empty(16), None)
    assert fy.shape == (4, 7, 16)


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    return model, torch.randn(4, 16, 64)


def test_torch_compile_runs_the_recipe_and_matches_the_rewritten_graph():
    model, x = _mlp()
    report = qhl.inspect(model, (x,), recipe="w8a8-tensor")
    assert {r.form for r in report.rewritten} == {"w8a8-tensor"}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qhl.backend("w8a8-tensor"))
    with torch.no_grad():
        got, want, ref = compiled(x), report.graph_module(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert qhl.sqnr_db(ref, got) > 25


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    from collections import Counter

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("int8_operands", ["u8u8", "u8s8"])
def test_onnx_export_is_ort_dynamic_quantize_matmul_and_matches_torch(target, int8_operands, tmp_path):
    from qhl.runtime import ort as qort

    model, x = _mlp()
    res = qhl.export_onnx(model, (x,), tmp_path / "m.onnx", recipe="w8a8-tensor", target=target,
                          int8_operands=int8_operands)
    if target == "standard":
        assert res.ops == {"DynamicQuantizeLinear": 2, "MatMulInteger": 2, "Cast": 2, "Mul": 4, "Add": 2, "Gelu": 1}
    else:
        assert res.ops == {"com.microsoft::DynamicQuantizeMatMul": 2, "Gelu": 1}
    # ORT runs the standard file as its fused kernel: quantize, GEMM, scales and bias in one node
    fused = _optimized_ops(res.path, tmp_path)
    assert fused.get("DynamicQuantizeMatMul") == 2 and "MatMulInteger" not in fused, fused
    weights = [i for i in onnx.load(str(res.path)).graph.initializer if len(i.dims) == 2]
    want = TensorProto.UINT8 if int8_operands == "u8u8" else TensorProto.INT8
    assert {w.data_type for w in weights} == {want}
    if int8_operands == "u8s8" and not qort.u8s8_is_exact():
        pytest.skip("ORT's u8 x s8 GEMM saturates on this CPU (no VNNI): the parity would not hold")
    for inp in (x, torch.randn(3, 5, 64)):  # dynamic batch and sequence
        cmp = qort.compare(res.path, res.report.graph_module, (inp,))
        assert cmp["cosine"] >= 0.99999 and cmp["max_abs"] < 1e-4, cmp


def test_onnx_reference_evaluator_agrees(tmp_path):
    from onnx.reference import ReferenceEvaluator

    model, x = _mlp()
    res = qhl.export_onnx(model, (x,), tmp_path / "m.onnx", recipe="w8a8-tensor")
    got = ReferenceEvaluator(str(res.path)).run(None, {onnx.load(str(res.path)).graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = res.report.graph_module(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_config_model_exports_and_matches_torch(tmp_path):
    models = pytest.importorskip("qhl.models")
    pytest.importorskip("transformers")
    from qhl.runtime import ort as qort

    model, (ids,) = models.config_model("bert")
    res = qhl.export_onnx(model, (ids,), tmp_path / "bert.onnx", recipe="w8a8-tensor")
    assert {r.form for r in res.report.rewritten} == {"w8a8-tensor"}
    assert qort.compare(res.path, res.report.graph_module, (ids,))["cosine"] >= 0.9999



def test_inductor_graph_holds_the_integer_gemm_and_equals_the_op_by_op_graph(int8_gemm):
    """Under torch.compile's CPU codegen, 5+ tokens lower to aten ops: the per-tensor quantize and
    the dequantize become Inductor loops around one `_int_mm` per layer, whose extra row of ones
    gives the column sums (no per-weight cache inside a graph); no call of the op is left, and
    the result is the op-by-op graph's."""
    from torch._inductor.utils import run_and_get_code

    int8_gemm("int8")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(3)]).eval()
    x = torch.randn(16, 128) + 0.3
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qhl.backend("w8a8-tensor", cpu_codegen="spec"))(x)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=qhl.backend("w8a8-tensor"), dynamic=False), x)
    source = "\n".join(codes)
    assert source.count("_int_mm(") == 3
    assert "torch.ops.qhl.w8a8_tensor_linear.default(" not in source
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-6


@pytest.mark.parametrize("vnni", [True, False])
def test_decomposition_equals_the_spec_on_both_gemm_formulations(vnni, int8_gemm, monkeypatch):
    """The aten decomposition run eagerly: u8 x s8 (VNNI) and s8 x s8 with their extra row of
    ones both give the spec's integers, so the same floats; few tokens decline (op call)."""
    if vnni and not cpu_onednn.x86_has_int8_vnni():
        pytest.skip("u8 x s8 is exact only with VNNI/AMX")
    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "x86_has_int8_vnni", lambda: vnni)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 80, generator=gen)
    wq, ws = quant.quantize_int8_per_channel(w)
    b = torch.randn(24, generator=gen)
    x = torch.randn(2, 9, 80, generator=gen) * 2 + 1
    got = wt.w8a8_tensor_linear_decomposed(x, wq, ws, b)
    want = wt.w8a8_tensor_linear_spec(x, wq, ws, b)
    assert got.shape == want.shape and torch.equal(got, want)
    assert wt.w8a8_tensor_linear_decomposed(x[:1, :wt.DECOMPOSE_MIN_TOKENS], wq, ws, b) is NotImplemented


def test_per_layer_mix_with_w8a8_exports_and_matches_torch(tmp_path):
    """A recipe override mixes the forms per layer (per-tensor where a layer loses little,
    per-token where it loses most): both translations in one file, ORT equal to torch."""
    from qhl.runtime import ort as qort

    model, x = _mlp()
    res = qhl.export_onnx(model, (x,), tmp_path / "mix.onnx", recipe="w8a8-tensor",
                          overrides=[{"glob": "2", "form": "w8a8"}])
    assert {r.path: r.form for r in res.report.rewritten} == {"0": "w8a8-tensor", "2": "w8a8"}
    assert res.ops["DynamicQuantizeLinear"] == 1 and res.ops["QuantizeLinear"] == 1
    cmp = qort.compare(res.path, res.report.graph_module, (x,))
    assert cmp["cosine"] >= 0.99999, cmp


def test_mixed_recipe_takes_per_tensor_activations_where_a_layer_loses_little(tmp_path):
    """qhl.mixed_w8a8_recipe measures each layer under both forms and keeps w8a8 (per token)
    where one scale per call would cost more than max_loss_db of the layer's output SQNR."""
    from qhl.runtime import ort as qort

    model, x = _mlp()
    x = x.clone()
    x[0, 0] *= 50  # one outlier token: one scale for the whole tensor suits the other tokens badly
    token = {r.path: r.sqnr_db for r in qhl.inspect(model, (x,), recipe="w8a8").rewritten}
    tensor = {r.path: r.sqnr_db for r in qhl.inspect(model, (x,), recipe="w8a8-tensor").rewritten}
    loss = {p: token[p] - tensor[p] for p in token}
    assert abs(loss["0"] - loss["2"]) > 1  # distinct, so a threshold between them separates them
    middle = (loss["0"] + loss["2"]) / 2
    for max_loss, want in ((-1e9, set()), (middle, {p for p in loss if loss[p] <= middle}), (1e9, {"0", "2"})):
        r = qhl.mixed_w8a8_recipe(model, (x,), max_loss_db=max_loss)
        report = qhl.inspect(model, (x,), recipe=r)
        got = {row.path for row in report.rewritten if row.form == "w8a8-tensor"}
        assert got == want and {row.form for row in report.rewritten} <= {"w8a8", "w8a8-tensor"}
        assert qhl.Recipe.from_json(r.to_json()) == r and r.name == "w8a8-mixed"
    res = qhl.export_onnx(model, (x,), tmp_path / "mixed.onnx", recipe=qhl.mixed_w8a8_recipe(model, (x,), middle))
    assert qort.compare(res.path, res.report.graph_module, (x,))["cosine"] >= 0.99999
