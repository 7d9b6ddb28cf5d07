"""fuse_sibling_linears (passes/fuse_sibling_linears.py): before -> expected graph, exact numerics,
shared memory and re-packs through the views, idempotence, the cases it declines with their
reasons, and the torch.compile door that runs it before Inductor."""
from __future__ import annotations

import copy

import pytest
import torch
from qhl_testing import call_targets, compile_run, graph_expr, make_graph, run_graph

import qhl
from qhl.driver import run_passes
from qhl.passes import fuse_sibling_linears
from qhl.passes.fuse_sibling_linears import FUSED_FROM_META, sibling_groups
from qhl.recipes import LayerOverride
from qhl.runtime.packed import PACKED_META, refresh

qops = torch.ops.qhl


class _Attention(torch.nn.Module):
    """q/k/v read one x (Llama's projections, or BERT's with biases), o reads their mix."""

    def __init__(self, d: int = 64, kv: int = 32, bias: bool = False):
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=bias)
        self.k = torch.nn.Linear(d, kv, bias=bias)
        self.v = torch.nn.Linear(d, kv, bias=bias)
        self.o = torch.nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) * torch.cat([self.k(x), self.v(x)], -1).sigmoid())


def _fusion_record(graph):
    [record] = [p for p in graph.passes if p.name == "fuse_sibling_linears"]
    return record


def _quantized(recipe, model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm, _ = run_passes(make_graph(model, x), recipe)
    return gm


def _ops(gm: torch.fx.GraphModule, op) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == op]


@pytest.mark.parametrize("form", ["w8a8", "w8a8-tensor", "w8a16", "w4a16", "w4a8"])
def test_siblings_become_one_linear_and_slices(form):
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 3, 64)
    knobs = {"group_size": 32} if form == "w4a16" else {}
    before = _quantized(qhl.recipe(form, **knobs), model, x)
    kept = copy.deepcopy(before)
    res = fuse_sibling_linears(before)
    op = getattr(qops, f"{form.replace('-', '_')}_linear").default
    assert res.changed and dict(res.stats) == {"groups": 1, "fused_linears": 3, "declined": 0}
    # Golden: one op over the concatenated weight, each old output a slice of its channels.
    expr = graph_expr(res.gm)
    fused = {
        "w8a8": "qhl.w8a8_linear.default(in1, attr<int8[128, 64]>, attr<float32[128]>, None)",
        "w8a8-tensor": "qhl.w8a8_tensor_linear.default(in1, attr<int8[128, 64]>, attr<float32[128]>, None)",
        "w8a16": "qhl.w8a16_linear.default(in1, attr<int8[128, 64]>, attr<float32[128]>, None)",
        "w4a16": "qhl.w4a16_linear.default(in1, attr<uint8[128, 32]>, attr<float32[128, 2]>, attr<uint8[128, 2]>, 32, None)",
        "w4a8": "qhl.w4a8_linear.default(in1, attr<uint8[128, 32]>, attr<float32[128]>, None)",
    }[form]
    assert expr.count(fused) == 3
    for start, end in [(0, 64), (64, 96), (96, 128)]:
        assert f"aten.slice.Tensor({fused}, -1, {start}, {end})" in expr
    assert len(_ops(res.gm, op)) == 2  # the fused q/k/v and o
    [node] = [n for n in _ops(res.gm, op) if FUSED_FROM_META in n.meta]
    assert node.meta[FUSED_FROM_META] == ["q", "k", "v"]
    # Exact: every output element is computed as before (same rows, same x quantization).
    [ref], [out] = run_graph(kept), run_graph(res.gm)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Idempotent: nothing left to fuse.
    again = fuse_sibling_linears(res.gm)
    assert not again.changed and again.gm.code == res.gm.code


def test_inputs_graph_shares_the_memory_and_a_repack_reaches_the_fused_weight():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(1, 1, 64)
    gm = _quantized(qhl.recipe("w8a16"), model, x)
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    res = fuse_sibling_linears(gm)
    [(whole_name, whole)] = [(n.target, getattr(res.gm, n.target)) for n in res.gm.graph.nodes
                             if n.op == "get_attr" and getattr(res.gm, n.target).dtype == torch.int8
                             and getattr(res.gm, n.target).shape[0] == 128]
    q_codes = next(getattr(gm, t) for t in names if t.startswith("qhl_q_") and getattr(gm, t).dtype == torch.int8)
    # The input graph's q codes are rows 0..63 of the fused buffer, in both graphs: no copy.
    assert q_codes._base is whole and q_codes.data_ptr() == whole.data_ptr()
    assert getattr(res.gm, [t for t in names if t.startswith("qhl_q_")][0]).data_ptr() == whole.data_ptr()
    # An in-place weight change re-packs through the view: the fused graph computes the new weight.
    with torch.no_grad():
        model.k.weight.mul_(-2.0)
    assert refresh(res.gm, res.gm.meta[PACKED_META]) >= 1
    fresh = _quantized(qhl.recipe("w8a16"), model, x)
    [want], [got] = run_graph(fresh), run_graph(res.gm)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert whole_name not in names


def test_graph_input_biases_are_concatenated_in_the_graph():
    torch.manual_seed(0)
    model, x = _Attention(bias=True), torch.randn(2, 3, 64)
    before = _quantized(qhl.recipe("w8a16"), model, x)
    kept = copy.deepcopy(before)
    res = fuse_sibling_linears(before)
    assert dict(res.stats)["fused_linears"] == 3
    # The door passes biases as graph inputs: their concatenation is part of the graph, so a new
    # bias value is used on the next call.
    assert "aten.cat.default([in1, in4, in6])" in graph_expr(res.gm)
    [ref], [out] = run_graph(kept), run_graph(res.gm)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class _Mixed(torch.nn.Module):
    """Three linears on one x that can't all fuse: k has a bias the others lack; u a different x."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(64, 64, bias=False)
        self.k = torch.nn.Linear(64, 32, bias=True)
        self.v = torch.nn.Linear(64, 32, bias=False)
        self.u = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum(-1) + self.k(x).sum(-1) * self.v(x).sum(-1) + self.u(x.relu()).sum(-1)


def test_declines_a_sibling_whose_arguments_differ_and_says_why():
    torch.manual_seed(0)
    model, x = _Mixed(), torch.randn(2, 3, 64)
    gm = _quantized(qhl.recipe("w8a16"), model, x)
    groups, declined = sibling_groups(gm)
    assert [[n.meta["qhl_matmul"].path for n in g] for g in groups] == [["q", "v"]]
    [(node, reason)] = declined
    assert node.meta["qhl_matmul"].path == "k"
    assert reason.startswith("its op or arguments differ from every other linear reading")
    kept = copy.deepcopy(gm)
    res = fuse_sibling_linears(gm)
    assert dict(res.stats) == {"groups": 1, "fused_linears": 2, "declined": 1}
    # The reason reaches the pass record (backend.graphs[i].passes, the fusion's record), by layer path.
    assert res.notes == (f"k stays unfused: {reason}",)
    [ref], [out] = run_graph(kept), run_graph(res.gm)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_different_group_sizes_do_not_fuse():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(1, 2, 64)
    recipe = qhl.recipe("w4a16", group_size=64, overrides=[LayerOverride("k", group_size=32)])
    gm = _quantized(recipe, model, x)
    groups, declined = sibling_groups(gm)
    assert [sorted(n.meta["qhl_matmul"].path for n in g) for g in groups] == [["q", "v"]]
    assert [(n.meta["qhl_matmul"].path, r.split(" reading")[0]) for n, r in declined] == [
        ("k", "its op or arguments differ from every other linear")]
    # Through the compile door, the reason is in the graph's pass record.
    _, be = compile_run(model, (x,), recipe)
    [graph] = be.graphs
    record = _fusion_record(graph)
    assert record.name == "fuse_sibling_linears" and record.stats["fused_linears"] == 2, graph.codegen_reason
    assert [n.split(" reading")[0] for n in record.notes] == [
        "k stays unfused: its op or arguments differ from every other linear"]


def test_a_lone_linear_and_a_float_graph_are_left_alone():
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)), torch.randn(2, 64)
    gm = _quantized(qhl.recipe("w8a8"), model, x)
    code = gm.code
    res = fuse_sibling_linears(gm)
    assert not res.changed and res.gm.code == code and dict(res.stats) == {"groups": 0, "fused_linears": 0, "declined": 0}


@pytest.mark.parametrize("tokens", [1, 7])
def test_compile_door_fuses_before_inductor_and_keeps_the_layer_table(tokens):
    torch.manual_seed(0)
    model, x = _Attention(bias=True).eval(), torch.randn(1, tokens, 64)
    out, be = compile_run(model, (x,), "w8a16")
    ref, be_off = compile_run(model, (x,), "w8a16", fuse_siblings=False)
    [graph] = be.graphs
    assert graph.codegen == "inductor", graph.codegen_reason
    record = _fusion_record(graph)
    assert record.name == "fuse_sibling_linears" and record.changed and record.stats["fused_linears"] == 3
    assert "slice" in record.after and "slice" not in record.before
    # The layer table (and the kept GraphModule) still have one row and one node per layer.
    assert [i.path for i in graph.layers] == ["q", "k", "v", "o"]
    assert call_targets(graph.gm).count("qhl.w8a16_linear.default") == 4
    assert "fuse_sibling_linears" not in [p.name for p in be_off.graphs[0].passes]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_op_by_op_inference_graphs_fuse_too(monkeypatch):
    from qhl.codegen import w8a16

    # cpu_codegen="spec" runs the GraphModule op by op, as CUDA does with its Triton kernels: the
    # fused graph makes one op call for q/k/v instead of three.
    torch.manual_seed(0)
    model, x = _Attention(bias=True).eval(), torch.randn(1, 3, 64)
    ref, _ = compile_run(model, (x,), "w8a16", cpu_codegen="spec", fuse_siblings=False)
    calls = []
    spec = w8a16.w8a16_linear_spec
    monkeypatch.setattr(w8a16, "w8a16_linear_spec", lambda x, w, *a: calls.append(w.shape[0]) or spec(x, w, *a))
    out, be = compile_run(model, (x,), "w8a16", cpu_codegen="spec")
    [graph] = be.graphs
    assert graph.codegen == "graph" and _fusion_record(graph).changed
    assert "float_codes_gemm" not in [p.name for p in graph.passes]  # Inductor only
    assert calls == [64 + 32 + 32, 64]  # q/k/v fused (their rows), and o
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_training_graphs_are_not_fused():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(1, 3, 64, requires_grad=True)
    torch._dynamo.reset()
    be = qhl.backend("w8a16")
    torch.compile(model, backend=be)(x).sum().backward()
    torch._dynamo.reset()
    assert {g.kind for g in be.graphs} == {"forward", "backward"}
    assert all(p.name != "fuse_sibling_linears" for g in be.graphs for p in g.passes)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_failed_inductor_compile_runs_the_unfused_graph_and_says_so(monkeypatch):
    from qhl.runtime import inductor_cpu

    def fail(gm, fake_inputs):
        raise RuntimeError("no compiler today")

    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(1, 2, 64)
    ref, _ = compile_run(model, (x,), "w8a16", fuse_siblings=False, cpu_codegen="spec")
    monkeypatch.setattr(inductor_cpu, "compile_inference_graph", fail)
    out, be = compile_run(model, (x,), "w8a16")
    [graph] = be.graphs
    assert graph.codegen == "graph" and "no compiler today" in graph.codegen_reason
    record = _fusion_record(graph)
    assert record.name == "fuse_sibling_linears" and record.notes == [
        "not used: Inductor failed and the graph before this pass runs op by op"]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_fuse_siblings_is_a_recipe_knob_that_round_trips():
    r = qhl.recipe("w8a8", fuse_siblings=False)
    assert r.fuse_siblings is False and qhl.Recipe.from_json(r.to_json()) == r
    assert qhl.recipe("w8a8").fuse_siblings is True


def test_a_models_graphs_share_one_copy_of_the_packed_and_fused_weights():
    """Recompiling for a new shape (a decode step after the prompt) used to pack every weight again."""
    torch.manual_seed(0)
    model = _Attention().eval()
    torch._dynamo.reset()
    be = qhl.backend("w8a16")
    compiled = torch.compile(model, backend=be)
    xs = [torch.randn(1, t, 64) for t in (1, 2, 3)]
    with torch.no_grad():
        for x in xs:
            compiled(x)
    assert len(be.graphs) >= 2
    storages = {getattr(g.gm, n.target).untyped_storage().data_ptr()
                for g in be.graphs for n in g.gm.graph.nodes if n.op == "get_attr"}
    assert len(storages) == 4  # fused q/k/v codes and scales, o's codes and scales: once for all graphs
    # A weight changed in place reaches every graph (each re-packs the shared buffer in place).
    with torch.no_grad():
        model.v.weight.mul_(3.0)
        outs = [compiled(x) for x in xs]
    torch._dynamo.reset()
    fresh = _Attention().eval()
    fresh.load_state_dict(model.state_dict())
    for x, out in zip(xs, outs):
        ref, _ = compile_run(fresh, (x,), "w8a16", fuse_siblings=False)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_pack_once_packs_again_after_an_in_place_change_or_once_unheld():
    import gc

    from qhl.runtime.packed import pack_once

    w = torch.randn(8, 16)
    calls = []

    def pack():
        calls.append(1)
        return (w * 2,)

    first = pack_once(w, ("test",), pack)
    assert pack_once(w, ("test",), pack)[0] is first[0] and len(calls) == 1
    w.add_(1.0)
    again = pack_once(w, ("test",), pack)
    assert again[0] is not first[0] and len(calls) == 2
    torch.testing.assert_close(again[0], w * 2)
    assert pack_once(w, ("other knobs",), pack)[0] is not again[0]
    # Held weakly: once no graph holds the packed tensors, they are freed and packed again.
    del first, again
    gc.collect()
    pack_once(w, ("test",), pack)
    assert len(calls) == 4


def test_siblings_sharing_a_packed_buffer_are_declined():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(1, 2, 64)
    gm = _quantized(qhl.recipe("w8a16"), model, x)
    q, k, v = [n for n in gm.graph.nodes if n.target == qops.w8a16_linear.default][:3]
    # Make k read v's packed buffers (same shapes): a graph a pass must not fuse into one buffer.
    k.args = (k.args[0], v.args[1], v.args[2], k.args[3])
    gm.recompile()
    groups, declined = sibling_groups(gm)
    assert groups == []
    assert sorted(n.name for n, r in declined if r == "it shares a packed buffer with a sibling") == sorted(
        [q.name, k.name, v.name])



def test_fuses_qhl_inspects_exported_graph_whose_biases_are_parameters():
    """qhl.inspect's graph comes from torch.export, which keeps biases as parameters: fusing it
    makes the parameters row views of the concatenation (a module takes no plain tensor in a
    parameter's place) and computes the same output."""
    torch.manual_seed(0)
    model, x = _Attention(bias=True).eval(), torch.randn(2, 5, 64)
    gm = qhl.inspect(model, (x,), recipe="w8a16").graph_module
    before = gm(x)
    result = fuse_sibling_linears(gm)
    assert result.changed and dict(result.stats)["fused_linears"] == 3
    after = result.gm(x)
    assert torch.equal(after[0] if isinstance(after, tuple) else after, before[0] if isinstance(before, tuple) else before)
