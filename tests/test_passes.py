"""Golden tests for each pass (TVM style): before -> expected graph, lossless numerics, stats,
idempotence, and the negative cases with the reason each declines with.

Graphs come from the doors qhl uses (tests/qhl_testing.make_graph): the AOT door (Dynamo ->
AOTAutograd, what torch.compile hands the passes) and the torch.export door (qhl.inspect).
Graphs are compared as rendered expressions (qhl_testing.graph_expr): placeholders by position,
packed buffers by dtype and shape.
"""
from __future__ import annotations

import copy

import pytest
import torch
from qhl_testing import Conv1D, call_targets, expected_expr, graph_expr, make_graph, run_graph

import qhl
from qhl.codegen import quant
from qhl.graph import MATMUL_META, TRAINING_META, matmul_infos
from qhl.passes import PASSES, canonicalize_matmuls, quantize_linear, select_layers
from qhl.recipes import LayerOverride

aten = torch.ops.aten
qops = torch.ops.qhl


def _lossless(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> None:
    ref, out = run_graph(before), run_graph(after)
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert r.shape == o.shape and r.dtype == o.dtype
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def _idempotent(pass_fn, gm: torch.fx.GraphModule) -> None:
    code = gm.code
    again = pass_fn(gm)
    assert again.changed is False
    assert again.gm.code == code


def _canonicalize(model, *inputs, door="aot"):
    gm = make_graph(model, *inputs, door=door)
    before = copy.deepcopy(gm)
    res = canonicalize_matmuls(gm)
    return before, res


# --- canonicalize_matmuls -------------------------------------------------------------------------


def test_canonicalize_view_addmm_view_from_aot_door():
    """view(x,[M,K]) -> addmm(b, ., t(W)) -> view(.,[B,T,N])  ==>  linear(x, W, b)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(2, 3, 16)
    before, res = _canonicalize(model, x)
    # The AOT door really hands us the decomposed form.
    assert graph_expr(before) == (
        "(aten.view.default(aten.addmm.default(in1, aten.view.default(in2, [6, 16]), aten.t.default(in0)), [2, 3, 8]),)"
    )

    def expected(w, b, x):
        return (aten.linear.default(x, w, b),)

    assert graph_expr(res.gm) == expected_expr(expected)
    assert res.changed and dict(res.stats) == {"canonicalized": 1, "left_as_is": 0}
    [(node, info)] = matmul_infos(res.gm)
    assert node.target == aten.linear.default
    assert (info.path, info.op, info.in_features, info.out_features) == ("0", "addmm", 16, 8)
    assert info.has_bias and info.dtype == torch.float32 and tuple(info.x_shape) == (2, 3, 16)
    assert info.weight.path == "0.weight"
    assert torch.equal(info.weight.value, model[0].weight)
    assert info.form is None and info.reason is None
    assert info.weight_bytes_before == 8 * 16 * 4
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


def test_canonicalize_mm_without_bias():
    """mm(x, t(W)) (2-D) and view -> mm -> _unsafe_view (3-D)  ==>  linear(x, W)."""

    def expected(w, x):
        return (aten.linear.default(x, w),)

    for x in (torch.randn(4, 16), torch.randn(2, 4, 16)):
        model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
        before, res = _canonicalize(model, x)
        assert "aten.mm.default" in call_targets(before)
        assert graph_expr(res.gm) == expected_expr(expected)
        assert dict(res.stats) == {"canonicalized": 1, "left_as_is": 0}
        [(_, info)] = matmul_infos(res.gm)
        assert info.op == "mm" and not info.has_bias and info.weight.value.shape == (8, 16)
        _lossless(before, res.gm)
        _idempotent(canonicalize_matmuls, res.gm)


class _GPT2Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 16)  # weight stored [K=16, N=24]

    def forward(self, x):
        return self.c_fc(x)


def test_canonicalize_gpt2_conv1d_weight_stored_kn():
    """addmm(b, view(x), W_kn) -> view  ==>  linear(x, t(W_kn), b), MatmulInfo weight [N, K]."""
    model = _GPT2Block()
    x = torch.randn(2, 3, 16)
    before, res = _canonicalize(model, x)
    assert graph_expr(before) == (
        "(aten.view.default(aten.addmm.default(in1, aten.view.default(in0, [-1, 16]), in2), [2, 3, 24]),)"
    )

    def expected(x, b, w_kn):
        return (aten.linear.default(x, aten.t.default(w_kn), b),)

    assert graph_expr(res.gm) == expected_expr(expected)
    [(_, info)] = matmul_infos(res.gm)
    assert (info.path, info.in_features, info.out_features) == ("c_fc", 16, 24)
    assert info.weight.value.shape == (24, 16)
    assert torch.equal(info.weight.value, model.c_fc.weight.t())
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


def test_canonicalize_export_door_linear_annotated_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    before, res = _canonicalize(model, torch.randn(2, 3, 16), door="export")
    assert graph_expr(res.gm) == graph_expr(before) == (
        "(aten.linear.default(in0, attr<float32[8, 16]>, attr<float32[8]>),)"
    )
    assert res.gm.code == before.code  # annotated, not rewritten
    assert res.changed and dict(res.stats) == {"canonicalized": 1, "left_as_is": 0}
    [(node, info)] = matmul_infos(res.gm)
    assert node.target == aten.linear.default and info.op == "linear" and info.path == "0"
    assert info.weight.value is model[0].weight or torch.equal(info.weight.value, model[0].weight)
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


class _Attention(torch.nn.Module):
    def forward(self, q, k):
        return torch.bmm(q, k.transpose(1, 2))


def test_canonicalize_bmm_of_activations_recorded_and_left():
    before, res = _canonicalize(_Attention(), torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    assert graph_expr(res.gm) == graph_expr(before)
    assert "aten.linear.default" not in call_targets(res.gm)
    assert dict(res.stats) == {"canonicalized": 0, "left_as_is": 1}
    [(node, info)] = matmul_infos(res.gm)
    assert node.target == aten.bmm.default and info.op == "bmm" and info.weight is None
    assert info.reason == "bmm: batched matmul of two activations (no weight operand)"
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


class _WeightOnTheLeft(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):  # x [K, M]: W @ x is not a linear layer on x's rows
        return self.w @ x


def test_canonicalize_weight_on_the_left_is_declined():
    before, res = _canonicalize(_WeightOnTheLeft(), torch.randn(16, 3))
    assert graph_expr(res.gm) == graph_expr(before) == "(aten.mm.default(in0, in1),)"
    assert dict(res.stats) == {"canonicalized": 0, "left_as_is": 1}
    [(_, info)] = matmul_infos(res.gm)
    assert info.weight is None
    assert info.reason == "the weight is the left operand (W @ x); not a linear layer"
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


class _TwoActivations(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


def test_canonicalize_mm_of_two_activations_left_with_reason():
    before, res = _canonicalize(_TwoActivations(), torch.randn(3, 4), torch.randn(4, 5))
    assert graph_expr(res.gm) == graph_expr(before) == "(aten.mm.default(in0, in1),)"
    [(_, info)] = matmul_infos(res.gm)
    assert info.weight is None
    assert info.reason == "no weight operand: both operands are activations"
    _lossless(before, res.gm)
    _idempotent(canonicalize_matmuls, res.gm)


# --- select_layers ----------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, d=64, h=128, dtype=torch.float32):
        super().__init__()
        self.up = torch.nn.Linear(d, h, dtype=dtype)
        self.down = torch.nn.Linear(h, d, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _TinyLM(torch.nn.Module):
    """blocks.0.{up,down}, blocks.1.{up,down}, lm_head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(dtype=dtype), _Block(dtype=dtype)])
        self.lm_head = torch.nn.Linear(64, 32, bias=False, dtype=dtype)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)


PATHS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "lm_head"]


def _selected(model=None, recipe=None, x=None, training=False):
    model = model or _TinyLM().eval()
    x = torch.randn(2, 4, 64) if x is None else x
    gm = canonicalize_matmuls(make_graph(model, x, training=training)).gm
    code = gm.code
    res = select_layers(gm, recipe or qhl.recipe("w8a8"))
    assert res.gm.code == code  # bookkeeping only: the graph does not change
    return res, {info.path: info for _, info in matmul_infos(res.gm)}


def test_select_default_skip_keeps_lm_head_float():
    res, infos = _selected()
    assert list(infos) == PATHS
    for path in PATHS[:-1]:
        assert infos[path].selected and infos[path].reason is None
        assert infos[path].knobs == {"form": "w8a8", "group_size": 128, "symmetric": True, "weight_clip": "none"}
    assert not infos["lm_head"].selected
    assert infos["lm_head"].reason == "in the recipe's skip list ('lm_head')"
    assert res.changed and dict(res.stats) == {"selected": 4, "kept_float": 1}
    _idempotent(lambda gm: select_layers(gm, qhl.recipe("w8a8")), res.gm)
    assert [i.selected for _, i in matmul_infos(res.gm)] == [True] * 4 + [False]


def test_select_include_globs():
    _, infos = _selected(recipe=qhl.recipe("w8a16", include=("blocks.0.*",)))
    assert [p for p, i in infos.items() if i.selected] == ["blocks.0.up", "blocks.0.down"]
    assert infos["blocks.1.up"].reason == "not matched by the recipe's include globs ['blocks.0.*']"
    # skip wins over include for lm_head
    assert infos["lm_head"].reason == "in the recipe's skip list ('lm_head')"


def test_select_overrides_keep_float_and_per_layer_group_size():
    recipe = qhl.recipe(
        "w4a16",
        overrides=[
            LayerOverride("blocks.1.*", keep_float=True),
            {"glob": "blocks.0.down", "group_size": 32},
            LayerOverride("lm_head", form="w8a16"),  # overrides come before the skip list
        ],
    )
    _, infos = _selected(recipe=recipe)
    assert infos["blocks.0.up"].knobs == {"form": "w4a16", "group_size": 128, "symmetric": True, "weight_clip": "grid"}
    assert infos["blocks.0.down"].knobs == {"form": "w4a16", "group_size": 32, "symmetric": True, "weight_clip": "grid"}
    for path in ("blocks.1.up", "blocks.1.down"):
        assert not infos[path].selected
        assert infos[path].reason == "override 'blocks.1.*' keeps this layer float"
    assert infos["lm_head"].selected and infos["lm_head"].knobs["form"] == "w8a16"


def test_select_float64_matmul_left_alone_with_reason():
    model = _TinyLM(dtype=torch.float64).eval()
    res, infos = _selected(model=model, x=torch.randn(2, 4, 64, dtype=torch.float64))
    for path in PATHS[:-1]:
        assert not infos[path].selected
        assert infos[path].reason == "torch.float64 matmul: only float32/float16/bfloat16 matmuls are rewritten"
    assert dict(res.stats) == {"selected": 0, "kept_float": 5}


def test_select_trainable_weight_in_training_graph_is_selected():
    # Trainable weights are rewritten too (qhl.runtime.packed re-packs them when they change).
    model = _TinyLM().train()
    model.blocks[0].requires_grad_(False)
    res, infos = _selected(model=model, x=torch.randn(2, 4, 64), training=True)
    assert res.gm.meta[TRAINING_META] is True
    for path in ("blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"):
        assert infos[path].selected and infos[path].reason is None


def test_select_recipe_without_form_keeps_everything_float():
    _, infos = _selected(recipe=qhl.recipe("float"))
    assert all(not i.selected for i in infos.values())
    assert infos["blocks.0.up"].reason == "the recipe has no matmul form"


# --- quantize_linear ---------------------------------------------------------------------------------


def _quantized(recipe, model=None, x=None):
    model = model or torch.nn.Sequential(torch.nn.Linear(128, 48))
    x = torch.randn(2, 5, 128) if x is None else x
    gm = canonicalize_matmuls(make_graph(model, x)).gm
    gm = select_layers(gm, recipe).gm
    before = copy.deepcopy(gm)
    res = quantize_linear(gm)
    return model, x, before, res


def _buffers(gm):
    return [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]


@pytest.mark.parametrize("form", ["w8a8", "w8a8-tensor", "w8a16"])
def test_quantize_int8_forms(form):
    from qhl.codegen import w8a8_tensor

    model, x, before, res = _quantized(qhl.recipe(form))
    w, b = model[0].weight.detach(), model[0].bias.detach()
    wq_ref, ws_ref = quant.quantize_int8_per_channel(w)
    op_name = form.replace("-", "_") + "_linear"
    op = getattr(qops, op_name).default

    def expected(w_in, b_in, x_in):
        return (op(x_in, wq_ref, ws_ref, b_in),)

    assert graph_expr(res.gm) == expected_expr(expected)
    assert graph_expr(res.gm) == (
        f"(qhl.{op_name}.default(in2, attr<int8[48, 128]>, attr<float32[48]>, in1),)"
    )
    wq, ws = _buffers(res.gm)
    assert wq.dtype == torch.int8 and wq.shape == (48, 128) and wq.is_contiguous()
    assert ws.dtype == torch.float32 and ws.shape == (48,)
    assert torch.equal(wq, wq_ref) and torch.equal(ws, ws_ref)
    assert res.changed and dict(res.stats) == {"rewritten": 1, "declined": 0}
    [(node, info)] = matmul_infos(res.gm)
    assert node.target == op and info.form == form and info.node_name == node.name
    assert (info.weight_bytes_before, info.weight_bytes_after) == (48 * 128 * 4, 48 * 128 + 48 * 4)

    ref = getattr(w8a8_tensor if form == "w8a8-tensor" else quant, f"fake_quant_{op_name}")(x, w, b)
    [out] = run_graph(res.gm)
    # w8a8 (both): int32 accumulation is exact, only the float32 epilogue rounds;
    # w8a16: float32 accumulation-order noise against the float64 reference.
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()
    _idempotent(quantize_linear, res.gm)


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, False), (128, True)])
def test_quantize_w4a16(group_size, symmetric):
    recipe = qhl.recipe("w4a16", group_size=group_size, symmetric=symmetric)
    model, x, before, res = _quantized(recipe)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    packed_ref, scale_ref, zero_ref = quant.quantize_int4_groupwise(w, group_size, symmetric, recipe.weight_clip)
    groups = 128 // group_size

    def expected(w_in, b_in, x_in):
        return (qops.w4a16_linear.default(x_in, packed_ref, scale_ref, zero_ref, group_size, b_in),)

    assert graph_expr(res.gm) == expected_expr(expected)
    assert graph_expr(res.gm) == (
        f"(qhl.w4a16_linear.default(in2, attr<uint8[48, 64]>, attr<float32[48, {groups}]>, "
        f"attr<uint8[48, {groups}]>, {group_size}, in1),)"
    )
    packed, scale, zero = _buffers(res.gm)
    assert (packed.dtype, tuple(packed.shape)) == (torch.uint8, (48, 64))
    assert (scale.dtype, tuple(scale.shape)) == (torch.float32, (48, groups))
    assert (zero.dtype, tuple(zero.shape)) == (torch.uint8, (48, groups))
    assert torch.equal(packed, packed_ref) and torch.equal(scale, scale_ref) and torch.equal(zero, zero_ref)
    if symmetric:
        assert bool((zero == 8).all())
    [(_, info)] = matmul_infos(res.gm)
    assert info.weight_bytes_after == 48 * 64 + 48 * groups * 5

    ref = quant.fake_quant_w4a16_linear(x, w, b, group_size, symmetric, recipe.weight_clip)
    [out] = run_graph(res.gm)
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()
    _idempotent(quantize_linear, res.gm)


def test_quantize_gpt2_conv1d_packs_the_nk_weight():
    model = _GPT2Block()
    x = torch.randn(2, 3, 16)
    model, x, before, res = _quantized(qhl.recipe("w8a8"), model=model, x=x)
    assert graph_expr(res.gm) == "(qhl.w8a8_linear.default(in0, attr<int8[24, 16]>, attr<float32[24]>, in1),)"
    w_nk = model.c_fc.weight.detach().t()
    wq, ws = _buffers(res.gm)
    assert torch.equal(wq, quant.quantize_int8_per_channel(w_nk)[0])
    ref = quant.fake_quant_w8a8_linear(x, w_nk, model.c_fc.bias.detach())
    [out] = run_graph(res.gm)
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()


def test_quantize_declines_k_not_divisible_by_group_size():
    model = torch.nn.Sequential(torch.nn.Linear(96, 16))
    _, _, before, res = _quantized(qhl.recipe("w4a16", group_size=64), model=model, x=torch.randn(2, 96))
    assert graph_expr(res.gm) == graph_expr(before) == "(aten.linear.default(in2, in0, in1),)"
    assert dict(res.stats) == {"rewritten": 0, "declined": 1}
    [(_, info)] = matmul_infos(res.gm)
    assert info.form is None and not info.selected
    assert info.reason == (
        "in_features K=96 is not divisible by group_size=64; "
        "group_size=32 divides K (set it for the recipe or in overrides, or group_size='auto': per layer, the largest that divides K)"
    )
    _lossless(before, res.gm)
    _idempotent(quantize_linear, res.gm)


def test_quantize_leaves_unselected_layers_and_keeps_lm_head_float():
    model = _TinyLM().eval()
    x = torch.randn(2, 4, 64)
    gm = select_layers(canonicalize_matmuls(make_graph(model, x)).gm, qhl.recipe("w8a8")).gm
    res = quantize_linear(gm)
    targets = call_targets(res.gm)
    assert targets.count("qhl.w8a8_linear.default") == 4
    assert targets.count("aten.linear.default") == 1  # lm_head
    assert dict(res.stats) == {"rewritten": 4, "declined": 0}
    _idempotent(quantize_linear, res.gm)


def test_registry_order_and_meta_key():
    from qhl.passes import CODEGEN, INDUCTOR_ONLY, PRE_AOT

    assert list(PASSES) == [
        "lower_adapters", "merge_adapters", "canonicalize_matmuls", "select_layers", "rotate_residual",
        "rotate_online", "quantize_linear", "fold_weight_transforms", "adapter_layers", "fuse_sibling_linears",
        "float_codes_gemm", "w4a16_codes_gemv",
    ]
    assert PRE_AOT == ("lower_adapters",)
    # run by the torch.compile door on inference graphs (the last two only before Inductor), listed by no recipe
    assert CODEGEN == ("fuse_sibling_linears", "float_codes_gemm", "w4a16_codes_gemv")
    assert INDUCTOR_ONLY == {"float_codes_gemm", "w4a16_codes_gemv"}
    assert not any(set(CODEGEN) & set(qhl.recipe(name).passes) for name in qhl.recipes())
    assert MATMUL_META == "qhl_matmul"


# --- graph helpers the passes rely on -------------------------------------------------------------


@pytest.mark.parametrize(
    "source,path",
    [
        ("L['self']._modules['layers']._modules['0']._parameters['weight']", "layers.0.weight"),
        ("L['self']._modules['lm_head']._parameters['weight']", "lm_head.weight"),
        # a forward wrapped as f(*args) (transformers' decorators) reaches the module as args[0]
        ("L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['self_attn']"
         "._modules['q_proj']._parameters['weight']", "model.layers.0.self_attn.q_proj.weight"),
        ("L['self'].model.layers[3].mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
        ("L['self']._orig_mod._modules['fc1']._parameters['bias']", "fc1.bias"),
    ],
)
def test_source_to_path(source, path):
    from qhl.graph import source_to_path

    assert source_to_path(source) == path


def test_weight_source_follows_transposes_and_aliases():
    from qhl.graph import WEIGHT_META, WeightRef, weight_source

    g = torch.fx.Graph()
    w = g.placeholder("w")
    w.meta[WEIGHT_META] = WeightRef("fc.weight", torch.randn(4, 8))
    x = g.placeholder("x")
    t = g.call_function(aten.t.default, (w,))
    tt = g.call_function(aten.transpose.int, (g.call_function(aten.detach.default, (t,)), 0, 1))
    p = g.call_function(aten.permute.default, (w, [1, 0]))
    assert weight_source(t)[0] is w and weight_source(t)[2] is True
    assert weight_source(tt)[2] is False  # transposed twice
    assert weight_source(p)[2] is True
    assert weight_source(x) is None
    assert weight_source(g.call_function(aten.mul.Tensor, (w, 2.0))) is None
