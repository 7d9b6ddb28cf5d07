"""passes/w4a16_codes_gemv.py: w4a16 at 1-8 tokens, on a CPU with a fast int8 GEMM, written into the
graph as its CPU face's GEMV over the unpacked codes: golden graph, idempotence, the declines and
their reasons, exactness against the op, the codes shared with the face, and an in-place weight
change reaching the compiled graph."""
from __future__ import annotations

import copy

import torch
from qhl_testing import MLP, call_targets, make_graph, run_graph

import qhl
from qhl.codegen import cpu_onednn, w4a16
from qhl.driver import run_passes
from qhl.graph import attr_value
from qhl.passes import w4a16_codes_gemv
from qhl.passes.w4a16_codes_gemv import CODES_GEMV_META

W4A16 = "qhl.w4a16_linear.default"


def _quantized(tokens: int, group_size: int = 64) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(1, tokens, 64)
    gm, _ = run_passes(make_graph(model, x), qhl.recipe("w4a16", group_size=group_size))
    return gm


def test_w4a16_becomes_the_faces_gemv_in_aten_ops(int8_gemm, monkeypatch):
    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: False)
    gm = _quantized(tokens=1)
    kept = copy.deepcopy(gm)
    res = w4a16_codes_gemv(gm)
    assert res.changed and dict(res.stats) == {"lowered": 2, "kept": 0} and res.notes == ()
    # Golden: per layer, the unpacked codes (a uint8 [N, K] constant), (c - z) * s per group, one
    # reduction over K (no per-group partial sums in a buffer), the bias; no w4a16 op is left.
    assert W4A16 not in call_targets(res.gm)
    codes = [n for n in res.gm.graph.nodes if n.op == "get_attr" and n.target.startswith("qhl_codes_")]
    assert [tuple(getattr(res.gm, n.target).shape) for n in codes] == [(128, 64), (32, 128)]
    assert all(getattr(res.gm, n.target).dtype == torch.uint8 for n in codes)
    code = res.gm.code
    for step in (".view(", ".float()", " - ", ".sum((-1, -2))", " * ", " + ", ".to(torch.float32)", ".reshape("):
        assert code.count(step) >= 2, step
    assert ".sum(-1)" not in code
    assert sorted(n.meta[CODES_GEMV_META] for n in res.gm.graph.nodes if CODES_GEMV_META in n.meta) == ["fc1", "fc2"]
    # The input graph keeps its ops (it is the layer table's graph and the fallback).
    assert call_targets(gm).count(W4A16) == 2 and gm.code == kept.code
    # The face's own GEMV formulation: the same floats as the op (run eagerly here).
    [ref], [out] = run_graph(kept), run_graph(res.gm)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Idempotent: nothing left to lower.
    again = w4a16_codes_gemv(res.gm)
    assert not again.changed and dict(again.stats) == {"lowered": 0, "kept": 0}


def test_the_codes_are_the_cpu_faces_cache(int8_gemm, monkeypatch):
    """One unpacked copy per weight, whether the CPU face or a compiled graph reads it."""
    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: False)
    gm = _quantized(tokens=1)
    res = w4a16_codes_gemv(gm)
    op = torch.ops.qhl.w4a16_linear.default
    packed = [attr_value(gm, n.args[1].target) for n in gm.graph.nodes if n.target is op]
    codes = [attr_value(res.gm, n.target) for n in res.gm.graph.nodes
             if n.op == "get_attr" and n.target.startswith("qhl_codes_")]
    assert len(codes) == 2 and all(w4a16._unpacked(p) is c for p, c in zip(packed, codes))


def test_declines_say_why(int8_gemm, monkeypatch):
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: False)
    int8_gemm("float")
    res = w4a16_codes_gemv(_quantized(tokens=1))
    assert not res.changed and res.notes == (
        "nothing lowered: the face's cached-code GEMV does not run here (no fast int8 GEMM, or the fused "
        "path or cache is off)",)
    int8_gemm("int8")
    res = w4a16_codes_gemv(_quantized(tokens=9))
    assert not res.changed and dict(res.stats) == {"lowered": 0, "kept": 2}
    assert res.notes == tuple(f"{p} keeps its op: 9 tokens: the face's tiled dequantize-then-GEMM serves more "
                              "than 8" for p in ("fc1", "fc2"))
    # g128 (fc2 only: fc1's K=64 stays float) at 1-4 tokens without AMX
    res = w4a16_codes_gemv(_quantized(tokens=3, group_size=128))
    assert res.notes == ("fc2 keeps its op: Inductor's w4a16 decomposition takes it (the bit-mask GEMV over the "
                         "packed bytes)",)
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: True)  # there the decomposition declines
    assert w4a16_codes_gemv(_quantized(tokens=3, group_size=128)).stats == {"lowered": 1, "kept": 0}


def _spec_run(model, x):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=qhl.backend("w4a16", group_size=64, cpu_codegen="spec"))(x)
    torch._dynamo.reset()
    return out


def test_compiled_graph_runs_no_op_call_and_follows_an_in_place_weight_change(int8_gemm, monkeypatch):
    """Through the torch.compile door: the layers are GEMVs inside Inductor's graph (no op call),
    bit for bit the op-by-op graph here; the graph holds the unpacked codes as a constant, and
    when refresh re-packs a changed weight they are derived again in place. codes_gemv=False
    keeps the op call."""
    from torch._inductor.utils import run_and_get_code

    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: False)
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(1, 2, 64)
    ref = _spec_run(model, x)
    be = qhl.backend("w4a16", group_size=64)
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        [graph] = be.graphs
        assert graph.codegen == "inductor", graph.codegen_reason
        assert "qhl.w4a16_linear" not in "\n".join(codes)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        model.fc1.weight.mul_(-2.0)
        changed = compiled(x)
    torch._dynamo.reset()
    torch.testing.assert_close(changed, _spec_run(model, x), rtol=1e-6, atol=1e-6)
    be_off = qhl.backend("w4a16", group_size=64, codes_gemv=False)
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(model, backend=be_off), x)
    torch._dynamo.reset()
    assert "qhl.w4a16_linear.default(" in "\n".join(codes)
