"""passes/float_codes_gemm.py: w8a8 at 5+ tokens, on a CPU without a fast int8 GEMM, written into the
graph as its 'f32' plan (per-token codes, a float32 GEMM against the weight's float32 codes, the
dequantize) for Inductor: golden graph, idempotence, the declines and their reasons, exactness
against the op, and an in-place weight change reaching the compiled graph's float32 codes."""
from __future__ import annotations

import copy

import pytest
import torch
from qhl_testing import MLP, call_targets, make_graph, run_graph

import qhl
from qhl.codegen import w8a8
from qhl.driver import run_passes
from qhl.graph import attr_value
from qhl.passes import float_codes_gemm
from qhl.passes.float_codes_gemm import FLOAT_GEMM_META

W8A8 = "qhl.w8a8_linear.default"


def _quantized(tokens: int, recipe: str = "w8a8") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model, x = MLP(head=True).eval(), torch.randn(2, tokens, 64)
    gm, _ = run_passes(make_graph(model, x), qhl.recipe(recipe))
    return gm


def test_w8a8_becomes_the_float_plan_in_aten_ops(int8_gemm):
    int8_gemm("float")
    gm = _quantized(tokens=5)  # 10 tokens: past the 1-4 of the bit-mask GEMV
    kept = copy.deepcopy(gm)
    res = float_codes_gemm(gm)
    assert res.changed and dict(res.stats) == {"lowered": 2, "kept": 0} and res.notes == ()
    # Golden: per layer, the per-token prologue, one matmul against the float32 codes (a constant
    # [N, K] of the graph), the scales, and the bias; no w8a8 op is left.
    targets = call_targets(res.gm)
    assert W8A8 not in targets
    codes = [n for n in res.gm.graph.nodes if n.op == "get_attr" and n.target.startswith("qhl_f32codes_")]
    assert [tuple(getattr(res.gm, n.target).shape) for n in codes] == [(128, 64), (32, 128)]
    assert all(getattr(res.gm, n.target).dtype == torch.float32 for n in codes)
    code = res.gm.code
    for step in (".abs()", ".amax(dim = -1, keepdim = True)", "/ 127", "torch.where(", "torch.round(",
                 ".clamp(-127, 127)", ".t()", " @ ", ".type_as("):
        assert code.count(step) == 2, step
    assert sorted(n.meta[FLOAT_GEMM_META] for n in res.gm.graph.nodes if FLOAT_GEMM_META in n.meta) == ["fc1", "fc2"]
    # The input graph keeps its ops (it is the layer table's graph and the fallback).
    assert call_targets(gm).count(W8A8) == 2 and gm.code == kept.code
    # The same math as the op's CPU face ('f32' plan): the codes and products are exact, the sums
    # float32's in the same GEMM; allowed float32 accumulation-order noise.
    [ref], [out] = run_graph(kept), run_graph(res.gm)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Idempotent: nothing left to lower.
    again = float_codes_gemm(res.gm)
    assert not again.changed and dict(again.stats) == {"lowered": 0, "kept": 0}


def test_the_float_codes_are_the_cpu_faces_cache(int8_gemm):
    """One float32 copy of the codes per weight, whether the CPU face or a compiled graph reads it."""
    int8_gemm("float")
    gm = _quantized(tokens=5)
    res = float_codes_gemm(gm)
    op = torch.ops.qhl.w8a8_linear.default
    weights = [attr_value(gm, n.args[1].target) for n in gm.graph.nodes if n.target is op]
    codes = [attr_value(res.gm, n.target) for n in res.gm.graph.nodes
             if n.op == "get_attr" and n.target.startswith("qhl_f32codes_")]
    assert len(codes) == 2 and all(w8a8.float_codes(w) is c for w, c in zip(weights, codes))


def test_declines_say_why(int8_gemm):
    int8_gemm("int8")
    gm = _quantized(tokens=5)
    res = float_codes_gemm(gm)
    assert not res.changed and res.gm is gm and res.notes == ("nothing lowered: this CPU has a fast int8 GEMM",)
    int8_gemm("float")
    few = _quantized(tokens=1)  # 2 tokens: the bit-mask GEMV decomposition takes them
    res = float_codes_gemm(few)
    assert not res.changed and dict(res.stats) == {"lowered": 0, "kept": 2}
    assert res.notes == tuple(f"{p} keeps its op: 2 token(s): the bit-mask GEMV decomposition reads the int8 codes"
                              for p in ("fc1", "fc2"))
    assert float_codes_gemm(_quantized(tokens=5, recipe="w8a16")).stats == {"lowered": 0, "kept": 0}


def test_compiled_graph_follows_an_in_place_weight_change(int8_gemm):
    """The compiled graph holds the float32 codes as a constant: when refresh re-packs the int8
    codes of a changed weight, the float32 codes are derived again in place."""
    int8_gemm("float")
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        compiled(x)
        [graph] = be.graphs
        assert graph.codegen == "inductor", graph.codegen_reason
        [record] = [p for p in graph.passes if p.name == "float_codes_gemm"]
        assert record.stats == {"lowered": 2, "kept": 0}
        model.fc1.weight.mul_(-2.0)
        out = compiled(x)
    torch._dynamo.reset()
    ref, _ = _spec_run(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _spec_run(model, x, recipe="w8a8"):
    torch._dynamo.reset()
    be = qhl.backend(recipe, cpu_codegen="spec")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    torch._dynamo.reset()
    return out, be


def test_a_dynamic_token_count_is_lowered_and_exact_at_every_count(int8_gemm):
    int8_gemm("float")
    torch.manual_seed(0)
    model = MLP().eval()
    xs = [torch.randn(1, t, 64) for t in (8, 200, 3)]
    refs = [_spec_run(model, x)[0] for x in xs]
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        outs = [compiled(x) for x in xs]
    torch._dynamo.reset()
    assert [g.codegen for g in be.graphs] == ["inductor"]
    [record] = [p for p in be.graphs[0].passes if p.name == "float_codes_gemm"]
    assert record.stats == {"lowered": 2, "kept": 0}
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_the_float_gemm_knob_keeps_the_op_call(int8_gemm):
    """float_gemm=False: a shorter first compile, the op stays a call to its CPU face."""
    int8_gemm("float")
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    ref, _ = _spec_run(model, x)
    r = qhl.recipe("w8a8", float_gemm=False)
    assert qhl.Recipe.from_json(r.to_json()) == r and qhl.recipe("w8a8").float_gemm is True
    torch._dynamo.reset()
    be = qhl.backend(r)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    torch._dynamo.reset()
    assert be.graphs[0].codegen == "inductor" and "float_codes_gemm" not in [p.name for p in be.graphs[0].passes]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4", "hadamard-w4a8"])
def test_int4_weight_forms_lower_too_and_follow_a_weight_change(recipe, int8_gemm):
    """w4a8 / w4a4: the unpacked int4 codes as float32 (w4ax.float_codes); with an online rotation
    the fused rotate-and-quantize op stays, once per x. Equal to the op-by-op graph, before and
    after an in-place weight change (re-packed by the same compiled graph)."""
    int8_gemm("float")
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 5, 64)
    ref_before, _ = _spec_run(model, x, recipe)
    be = qhl.backend(recipe)
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        out_before = compiled(x)
        model.fc2.weight.copy_(torch.randn_like(model.fc2.weight) * 0.1)  # new codes, not only new scales
        out_after = compiled(x)
    torch._dynamo.reset()
    ref_after, _ = _spec_run(model, x, recipe)
    [graph] = be.graphs  # one graph: the second call re-packed, it did not recompile
    [record] = [p for p in graph.passes if p.name == "float_codes_gemm"]
    assert graph.codegen == "inductor" and record.stats == {"lowered": 2, "kept": 0}
    rotations = record.after.count("torch.ops.qhl.hadamard_quantize_per_token.default(")
    assert rotations == (2 if recipe.startswith("hadamard") else 0)
    assert "w4a8_linear" not in record.after and "w4a4_linear" not in record.after
    torch.testing.assert_close(out_before, ref_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_after, ref_after, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref_after, ref_before)
