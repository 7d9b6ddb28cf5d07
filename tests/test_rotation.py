"""The rotation passes: rotate_residual (offline, QuaRot), rotate_online, fold_weight_transforms.

Golden before -> expected graphs on a tiny hand-written Llama-style model, invariance of the
`hadamard` recipe (rotations are exact in real arithmetic, so float32 outputs may move only by
rounding: relative error <= 1e-5 here, the issue's bar is 1e-4), idempotence, and the cases that
decline with their reasons (LayerNorm streams, sizes with no Hadamard, training graphs).
"""
from __future__ import annotations

import copy

import pytest
import torch
from qhl_testing import call_targets, graph_expr, graph_inputs, make_graph, run_graph

import qhl
from qhl.driver import run_passes
from qhl.graph import matmul_infos
from qhl.passes import bind

aten = torch.ops.aten


class RMSNorm(torch.nn.Module):
    """HF Llama's RMSNorm, as transformers writes it."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(n))

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)  # a no-op cast in float32 that torch.export keeps as aten.to
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + 1e-6)).to(dtype)


class Block(torch.nn.Module):
    def __init__(self, n: int, f: int):
        super().__init__()
        self.norm = RMSNorm(n)
        self.up_proj = torch.nn.Linear(n, f, bias=False)
        self.down_proj = torch.nn.Linear(f, n, bias=False)

    def forward(self, h):
        return h + self.down_proj(torch.relu(self.up_proj(self.norm(h))))


class TinyLM(torch.nn.Module):
    """embedding -> 2 blocks (norm -> up -> relu -> down, residual) -> norm -> lm_head."""

    def __init__(self, vocab=40, n=32, f=48):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, n)
        self.layers = torch.nn.ModuleList([Block(n, f), Block(n, f)])
        self.norm = RMSNorm(n)
        self.lm_head = torch.nn.Linear(n, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def _ids():
    return torch.randint(0, 40, (2, 5))


def _run(gm, recipe):
    out, records = run_passes(gm, recipe)
    return out, {r.name: r for r in records}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rotation", ["offline", "online", "auto"])
def test_hadamard_recipe_is_invariant(rotation):
    model, ids = TinyLM().eval(), _ids()
    gm = make_graph(model, ids)
    ref = run_graph(copy.deepcopy(gm))[0]
    out_gm, _ = _run(gm, qhl.recipe("hadamard", rotation=rotation, skip=()))
    assert _rel(run_graph(out_gm)[0], ref) < 1e-5
    rows = {i.path: i for _, i in matmul_infos(out_gm)}
    if rotation == "online":
        assert all(r.rotation.startswith("online") for r in rows.values())
    else:
        assert rows["layers.0.up_proj"].rotation.startswith("offline")
        assert rows["layers.1.down_proj"].rotation.startswith("offline")
        assert "(output)" in rows["layers.1.down_proj"].rotation
    if rotation == "auto":  # down_proj's input is not the stream: it gets an online one too
        assert "online H48" in rows["layers.0.down_proj"].rotation
    if rotation == "offline":
        assert "online" not in rows["layers.0.down_proj"].rotation


def test_rotate_residual_golden_graph():
    """embedding reads E Q; the norms lose their scale g (folded into the consumers); the
    consumers and producers read rotated float weights; nothing runs online."""
    model, ids = TinyLM().eval(), _ids()
    gm = make_graph(model, ids)
    out_gm, records = _run(gm, qhl.recipe("hadamard", rotation="offline", skip=()))
    assert dict(records["rotate_residual"].stats) == {"consumers": 3, "producers": 2, "norms_folded": 3}
    assert dict(records["fold_weight_transforms"].stats) == {"folded": 5}
    targets = call_targets(out_gm)
    assert "qhl.hadamard.default" not in targets
    # 3 RMSNorms: pow/mean/add/rsqrt/mul(h, r) each; no mul by g is left.
    assert targets.count("aten.rsqrt.default") == 3
    assert targets.count("aten.mul.Tensor") == 3
    expr = graph_expr(out_gm)
    assert expr.startswith("(aten.linear.default(aten.mul.Tensor(")
    assert "aten.embedding.default(attr<float32[40, 32]>, in" in expr
    attrs = sorted(n.target for n in out_gm.graph.nodes if n.op == "get_attr")
    assert len(attrs) == 6 and all(a.startswith("qhl_rot_") for a in attrs)  # E Q + 5 rotated weights
    linears = [n for n in out_gm.graph.nodes if n.target == aten.linear.default]
    assert len(linears) == 5 and all(n.args[1].op == "get_attr" for n in linears)
    # The model's own parameters are untouched.
    fresh = TinyLM().eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids), fresh(ids))


def test_rotate_online_golden_graph_and_sharing():
    """Online: one qhl.hadamard per distinct (input, block), shared by the layers reading it."""

    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.q_proj(x) * self.k_proj(x)

    model, x = QKV(), torch.randn(3, 64)
    gm = make_graph(model, x)
    ref = run_graph(copy.deepcopy(gm))[0]
    out_gm, records = _run(gm, qhl.recipe("hadamard", rotation="online", skip=()))
    assert dict(records["rotate_online"].stats) == {"rotated": 2, "fused": 0, "unrotatable": 0, "stays_float": 0}
    h = "qhl.hadamard.default(in2, 0, False, True)"
    w = "attr<float32[16, 64]>"
    assert graph_expr(out_gm) == f"(aten.mul.Tensor(aten.linear.default({h}, {w}, in1), aten.linear.default({h}, {w}, in4)),)"
    assert call_targets(out_gm).count("qhl.hadamard.default") == 1
    torch.testing.assert_close(run_graph(out_gm)[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotation", ["auto", "online"])
def test_rotation_passes_are_idempotent(rotation):
    model, ids = TinyLM().eval(), _ids()
    recipe = qhl.recipe("hadamard-w8a8", skip=(), rotation=rotation)
    gm, _ = _run(make_graph(model, ids), recipe)
    code = gm.code
    for name in recipe.passes:
        res = bind(name, recipe)(gm)
        assert res.changed is False, name
        gm = res.gm
    assert gm.code == code


def test_layernorm_stream_declines_offline_with_reason_and_auto_goes_online():
    class LNBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 32)
            self.ln = torch.nn.LayerNorm(32)
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, ids):
            h = self.embed(ids)
            return h + self.fc(self.ln(h))

    model, ids = LNBlock().eval(), torch.randint(0, 10, (2, 3))
    gm = make_graph(model, ids)
    ref = run_graph(copy.deepcopy(gm))[0]
    out_gm, records = _run(gm, qhl.recipe("hadamard", skip=()))
    assert records["rotate_residual"].changed is False
    [(_, info)] = matmul_infos(out_gm)
    assert "offline residual rotation declined" in info.rotation_reason
    assert "not an RMSNorm" in info.rotation_reason or "not one RMSNorm" in info.rotation_reason
    assert info.rotation == "online H32"  # auto: online where offline was not proven
    torch.testing.assert_close(run_graph(out_gm)[0], ref, rtol=1e-5, atol=1e-5)


def test_stream_as_graph_output_declines():
    class Base(torch.nn.Module):  # a base model: returns the residual stream itself
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 16)
            self.block = Block(16, 32)

        def forward(self, ids):
            return self.block(self.embed(ids))

    gm = make_graph(Base().eval(), torch.randint(0, 10, (1, 4)))
    out_gm, _ = _run(gm, qhl.recipe("hadamard", rotation="offline", skip=()))
    reasons = {i.rotation_reason for _, i in matmul_infos(out_gm)}
    assert len(reasons) == 1 and "is a graph output" in reasons.pop()


def test_size_with_no_hadamard_stays_unrotated_with_reason():
    model, x = torch.nn.Sequential(torch.nn.Linear(22, 8)), torch.randn(2, 22)
    gm = make_graph(model, x)
    out_gm, _ = _run(gm, qhl.recipe("hadamard-w8a8", rotation="online", skip=()))
    [(_, info)] = matmul_infos(out_gm)
    assert info.form == "w8a8" and info.rotation is None
    assert "no Hadamard construction for size 22" in info.rotation_reason
    assert "qhl.hadamard.default" not in call_targets(out_gm)


def test_block_diagonal_fallback_and_forced_block():
    # 944 = 59 * 16: no K * 2^m construction (K would be 236 or 472, not buildable), so the
    # largest power-of-two block dividing it (16) is used.
    model, x = torch.nn.Sequential(torch.nn.Linear(944, 8)), torch.randn(2, 944)
    gm = make_graph(model, x)
    ref = run_graph(copy.deepcopy(gm))[0]
    out_gm, _ = _run(gm, qhl.recipe("hadamard", rotation="online", skip=()))
    [(_, info)] = matmul_infos(out_gm)
    assert info.rotation == "online I(x)H16"
    torch.testing.assert_close(run_graph(out_gm)[0], ref, rtol=1e-5, atol=1e-5)
    gm = make_graph(torch.nn.Sequential(torch.nn.Linear(64, 8)), torch.randn(2, 64))
    out_gm, _ = _run(gm, qhl.recipe("hadamard", rotation="online", hadamard_block=16, skip=()))
    assert matmul_infos(out_gm)[0][1].rotation == "online I(x)H16"


@pytest.mark.parametrize("rotation", ["auto", "online"])
def test_training_graph_is_left_unrotated_with_reason(rotation):
    model = TinyLM()
    gm = make_graph(model, _ids(), training=True)
    out_gm, _ = _run(gm, qhl.recipe("hadamard-w8a8", skip=(), rotation=rotation))
    infos = [i for _, i in matmul_infos(out_gm) if i.weight is not None]
    assert infos and all(i.rotation is None for i in infos)
    assert all("training graph" in (i.rotation_reason or "") for i in infos)


def test_verify_mode_checks_rotation_groups():
    model, ids = TinyLM().eval(), _ids()
    gm = make_graph(model, ids)
    out, records = run_passes(gm, qhl.recipe("hadamard", skip=(), verify=True), graph_inputs(gm))
    by = {r.name: r for r in records}
    assert by["rotate_residual"].verified_sqnr_db is None and by["rotate_residual"].notes
    assert by["fold_weight_transforms"].verified_sqnr_db > 80


@pytest.mark.parametrize("recipe", ["hadamard-w8a8", "hadamard-w4a8", "hadamard-w4a4", "hadamard-w4a16"])
def test_rotated_quantized_recipes_run_and_report(recipe):
    model, ids = TinyLM(n=64, f=128).eval(), _ids()
    report = qhl.inspect(model, (ids,), recipe=qhl.recipe(recipe, group_size=32, rotation="auto"))
    rows = {r.path: r for r in report.layers}
    assert rows["layers.0.up_proj"].form == recipe.split("-")[1]
    assert rows["layers.0.up_proj"].rotation.startswith("offline")
    assert "online" in rows["layers.0.down_proj"].rotation
    assert rows["lm_head"].form is None and rows["lm_head"].rotation.startswith("offline")
    assert all(r.sqnr_db is not None for r in report.layers if r.form)
    assert "rotation" in str(report)


@pytest.mark.parametrize("recipe", ["hadamard", "hadamard-w8a8", "hadamard-w4a8"])
def test_rotated_export_runs_in_onnxruntime(tmp_path, recipe):
    """Offline rotations are new weights; online ones are qhl::hadamard's onnx face. ORT must
    compute what qhl's torch graph computes (cosine >= 0.9999: the same math)."""
    pytest.importorskip("onnxruntime")
    from qhl.metrics import cosine
    from qhl.runtime import ort as qort

    model, ids = TinyLM(n=64, f=128).eval(), _ids()
    res = qhl.export_onnx(model, (ids,), tmp_path / "m.onnx", recipe=recipe, skip=())
    with torch.no_grad():
        want = res.report.graph_module(ids)
    want = torch.utils._pytree.tree_leaves(want)[0]
    got = torch.from_numpy(qort.run(qort.session(res.path), (ids,))[0])
    assert cosine(got, want) >= 0.9999
    if recipe == "hadamard":
        torch.testing.assert_close(got, model(ids).detach(), rtol=1e-4, atol=1e-4)


def test_hadamard_presets_and_knobs():
    assert {"hadamard", "hadamard-w8a8", "hadamard-w4a8", "hadamard-w4a4", "hadamard-w4a16"} <= set(qhl.recipes())
    r = qhl.recipe("hadamard-w4a8")
    assert (r.form, r.rotation, r.weight_clip) == ("w4a8", "online", "mse")
    assert qhl.recipe("hadamard", rotation="offline").rotation == "offline"
    assert qhl.Recipe.from_json(qhl.recipe("hadamard-w4a4", hadamard_block=64).to_json()).hadamard_block == 64
    with pytest.raises(qhl.RecipeError, match="rotation='sideways'; valid"):
        qhl.recipe("hadamard", rotation="sideways")
    with pytest.raises(qhl.RecipeError, match="power of two"):
        qhl.recipe("hadamard", hadamard_block=12)


def test_offline_rotation_through_the_export_door():
    """torch.export keeps no-op casts (aten.to) and metadata asserts on the stream; the analysis
    sees through them, so inspect / export_onnx rotate offline too, and exactly."""
    model, ids = TinyLM().eval(), _ids()
    report = qhl.inspect(model, (ids,), recipe=qhl.recipe("hadamard", rotation="offline", skip=()))
    assert all(r.rotation and r.rotation.startswith("offline") for r in report.layers)
    assert report.output_sqnr_db > 100


def test_online_rotation_skips_layers_the_form_leaves_float():
    """hadamard-w4a16 at group 128: a K = 96 layer stays float (quantize_linear's check), so it
    gets no Hadamard (it would only cost time); the K = 128 layer is rotated and quantized."""
    from qhl_testing import MLP

    torch.manual_seed(0)
    model, x = MLP(d=96, h=128, o=32).eval(), torch.randn(2, 5, 96)
    report = qhl.inspect(model, (x,), recipe="hadamard-w4a16", group_size=128)
    rows = {r.path: r for r in report.layers}
    assert rows["fc1"].form is None and rows["fc1"].rotation is None
    assert rows["fc1"].rotation_reason == (
        "online rotation skipped: w4a16 leaves this layer float (in_features K=96 is not divisible by "
        "group_size=128; group_size=32 divides K (set it for the recipe or in overrides, or group_size='auto': per layer, the largest that divides K))"
    )
    assert rows["fc2"].form == "w4a16" and rows["fc2"].rotation == "online H128"
    hadamards = [n for n in report.graph_module.graph.nodes if n.target == torch.ops.qhl.hadamard.default]
    assert len(hadamards) == 1
    assert dict(next(p for p in report.passes if p.name == "rotate_online").stats)["stays_float"] == 1
