"""qhl::w4a8_linear and qhl::w4a4_linear: every face against the float64 fake-quant references.

int4 per-channel weights (codes in [-7, 7], two per byte), dynamic per-token activations with
8-bit (w4a8) or 4-bit (w4a4, codes in [-7, 7]) codes. Tolerances, relative to the reference's norm:
  spec vs reference, float32 x: 1e-5. The activation and weight codes are the reference's bit for
  bit (same float32 quantizer), the int8 x int8 products accumulate exactly in int32, so only the
  float32 dequant epilogue (acc * s_x * s_w + b, three roundings of 2^-24) separates the two.
  fp16 / bf16 x: the output is rounded to x's dtype (half an ulp: 2^-11, 2^-8 relative), and
  the codes are computed from the same rounded x in both: 2e-3 (fp16), 1e-2 (bf16).
  Triton (interpreted) vs spec: identical outputs (torch.equal). Exact int32 sums and the same
  float32 epilogue in the same order; on a GPU the bias add may become an FMA, which the
  interpreter does not do, so this holds under TRITON_INTERPRET only (CI).
  STE gradient: float32 matmul against float64 of the same formula: 1e-5.
  ONNX Runtime vs the rewritten graph: cosine >= 0.9999 (exact integers, float32 epilogue in
  another order), and the activation and weight codes equal where the file exposes them.
  Rotated path (hadamard_block >= 0, needs the Hadamard helper's ops; skipped without them): the
  op rotates x in float32 with a FWHT, the reference in float64; codes could differ at an exact
  rounding tie, none does on the fixed seeds, so the same 1e-5 / 0.9999 apply.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from qhl_testing import expected_expr, graph_expr, make_graph, run_graph

import qhl
from qhl.codegen import quant
from qhl.graph import matmul_infos
from qhl.passes import canonicalize_matmuls, quantize_linear, select_layers

qops = torch.ops.qhl
FORMS = ("w4a8", "w4a4")
BITS = {"w4a8": 8, "w4a4": 4}
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
try:  # the Hadamard helper's ops (codegen/hadamard.py), registered by qhl.codegen once wired in
    import qhl.codegen.hadamard  # noqa: F401
except ImportError:
    pass
HAS_HADAMARD = hasattr(torch.ops.qhl, "hadamard_quantize_per_token") and hasattr(torch.ops.qhl, "hadamard")
needs_hadamard = pytest.mark.skipif(
    not HAS_HADAMARD, reason="qhl::hadamard_quantize_per_token not registered yet"
)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _op(form: str):
    return getattr(qops, f"{form}_linear")


def _ref(form: str):
    return getattr(quant, f"fake_quant_{form}_linear")


# --- quantizers --------------------------------------------------------------------------------------


def test_per_token_bits_8_is_quantize_per_token_and_4_bit_codes_are_in_range():
    x = torch.randn(3, 7, 96) * 5
    x[0, 0] = 0  # all-zero row: scale 1, codes 0
    q8, s8 = quant.quantize_per_token_bits(x, 8)
    q, s = quant.quantize_per_token(x)
    assert torch.equal(q8, q) and torch.equal(s8, s)
    q4, s4 = quant.quantize_per_token_bits(x, 4)
    assert q4.dtype == torch.int8 and s4.shape == (3, 7, 1)
    assert int(q4.min()) == -7 and int(q4.max()) == 7  # each row's amax lands on +-7
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(s4, torch.where(amax > 0, amax / 7, 1.0))
    assert bool((q4[0, 0] == 0).all()) and s4[0, 0].item() == 1.0
    with pytest.raises(ValueError, match="bits=9"):
        quant.quantize_per_token_bits(x, 9)


@pytest.mark.parametrize("clip", ["none", "mse"])
def test_int4_per_channel_codes_scales_and_clip(clip):
    w = torch.randn(32, 96)
    w[3] = 0
    packed, scale = quant.quantize_int4_per_channel(w, clip)
    assert (packed.dtype, tuple(packed.shape)) == (torch.uint8, (32, 48))
    assert (scale.dtype, tuple(scale.shape)) == (torch.float32, (32,))
    q = quant.unpack_int4_signed(packed)
    assert q.dtype == torch.int8 and int(q.min()) >= -7 and int(q.max()) <= 7
    assert torch.equal(quant.unpack_int4(packed), (q + 8).to(torch.uint8))  # pack_int4's layout, zero 8
    assert scale[3].item() == 1.0 and bool((q[3] == 0).all())
    amax_scale = w.abs().amax(-1) / 7
    if clip == "none":
        assert torch.equal(scale[torch.arange(32) != 3], amax_scale[torch.arange(32) != 3])
    else:  # a clip ratio <= 1 per row, and never more squared error than plain amax
        assert bool((scale <= amax_scale * (1 + 1e-6) + (w.abs().amax(-1) == 0)).all())
        plain = quant.dequantize_int4_per_channel(*quant.quantize_int4_per_channel(w, "none"))
        mse = quant.dequantize_int4_per_channel(packed, scale)
        assert bool(((mse - w).pow(2).sum(-1) <= (plain - w).pow(2).sum(-1) + 1e-6).all())
        assert ((mse - w).pow(2).sum() < (plain - w).pow(2).sum())  # randn rows: clipping helps
    with pytest.raises(ValueError, match="even K"):
        quant.quantize_int4_per_channel(torch.randn(4, 7))


# --- spec face vs fake-quant reference ----------------------------------------------------------------

SHAPES = [(1, 64), (7, 64), (2, 5, 64), (3, 1, 4, 64)]  # 2-D, odd M, 3-D, 4-D


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("x_shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_spec_matches_fake_quant(form, x_shape, bias):
    w, x = torch.randn(24, 64), torch.randn(*x_shape)
    b = torch.randn(24) if bias else None
    packed, scale = quant.quantize_int4_per_channel(w)
    out = _op(form)(x, packed, scale, b)
    assert out.shape == (*x_shape[:-1], 24) and out.dtype == torch.float32
    assert _rel_err(out, _ref(form)(x, w, b)) < 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", ["none", "mse"])
def test_spec_half_inputs_and_clip(form, dtype, clip):
    w, x, b = torch.randn(40, 128), torch.randn(2, 6, 128).to(dtype), torch.randn(40).to(dtype)
    packed, scale = quant.quantize_int4_per_channel(w, clip)
    out = _op(form)(x, packed, scale, b)
    assert out.dtype == dtype and out.shape == (2, 6, 40)
    assert _rel_err(out, _ref(form)(x, w, b, clip)) < REL_TOL[dtype]


def test_w4a4_is_coarser_than_w4a8_and_both_track_float():
    """Sanity on the math, not a tolerance: 4-bit activations lose more than 8-bit ones."""
    w, x = torch.randn(64, 256), torch.randn(32, 256)
    exact = x.double() @ w.double().T
    packed, scale = quant.quantize_int4_per_channel(w)
    e8 = _rel_err(qops.w4a8_linear(x, packed, scale, None), exact)
    e4 = _rel_err(qops.w4a4_linear(x, packed, scale, None), exact)
    assert 0.02 < e8 < e4 < 0.5


def test_int32_accumulation_is_exact():
    """Integer-valued x (amax 127 -> s_x 1) and weights (amax 7 -> s_w 1): y is the exact sum."""
    k = 512
    x = torch.randint(-127, 128, (3, k)).float()
    x[:, 0] = 127
    w = torch.randint(-7, 8, (5, k)).float()
    w[:, 0] = 7
    packed, scale = quant.quantize_int4_per_channel(w)
    assert bool((scale == 1).all())
    assert torch.equal(qops.w4a8_linear(x, packed, scale, None), (x.double() @ w.double().T).float())


@pytest.mark.parametrize("m", [1, 3, 64, 300])  # each CPU GEMM formulation (codegen/w8a8.py)
@pytest.mark.parametrize("form", FORMS)
def test_cpu_formulations_and_unpacked_cache(form, m, monkeypatch):
    """The CPU face on cached int8 codes equals the fake-quant reference at every formulation;
    the cache is keyed by the packed tensor, not used once that tensor is modified in place, and
    off when CPU_UNPACKED_CACHE is False."""
    from qhl.codegen import w4ax

    w, x, b = torch.randn(48, 128), torch.randn(m, 128), torch.randn(48)
    packed, scale = quant.quantize_int4_per_channel(w)
    out = _op(form)(x, packed, scale, b)
    assert w4ax._unpacked.get(packed) is not None  # unpacked once, kept beside the packed weight
    assert _rel_err(out, _ref(form)(x, w, b)) < 1e-5
    torch.testing.assert_close(_op(form)(x, packed, scale, b), out, rtol=0, atol=0)
    w2 = torch.randn(48, 128)
    packed2, scale2 = quant.quantize_int4_per_channel(w2)
    packed.copy_(packed2)  # in place: the cached codes are stale and must not be used
    assert _rel_err(_op(form)(x, packed, scale2, b), _ref(form)(x, w2, b)) < 1e-5
    monkeypatch.setattr(w4ax, "CPU_UNPACKED_CACHE", False)
    fresh, _ = quant.quantize_int4_per_channel(w2)
    assert _rel_err(_op(form)(x, fresh, scale2, b), _ref(form)(x, w2, b)) < 1e-5
    assert w4ax._unpacked.get(fresh) is None


@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_compiled_w4a8_follows_in_place_weight_updates(inference_mode):
    """A weight changed in place is re-packed before the next call (runtime/packed.py), and the
    CPU face's cached int8 codes follow, also for buffers made under inference_mode (which have
    no version counter): the second call equals a fresh fake-quant of the new weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    mode = torch.inference_mode if inference_mode else torch.no_grad
    with mode():
        compiled = torch.compile(model, backend=qhl.backend("w4a8"))
        first = compiled(x)
    assert _rel_err(first, quant.fake_quant_w4a8_linear(x, model[0].weight, model[0].bias)) < 1e-5
    with torch.no_grad():
        model[0].weight.mul_(-3.0)  # in place: same tensor, new values
    with mode():
        second = compiled(x)
    assert _rel_err(second, quant.fake_quant_w4a8_linear(x, model[0].weight, model[0].bias)) < 1e-5


def test_unpacked_codes_of_inference_tensors_follow_a_repack():
    """Buffers made under inference_mode have no version counter: runtime/packed.py's refresh
    tells the cache when it rewrites one in place."""
    from qhl.runtime.packed import PackedWeight, refresh

    source = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        packed, scale = quant.quantize_int4_per_channel(source)
        holder = torch.nn.Module()
        holder.register_buffer("packed", packed)
        assert holder.packed.is_inference()
        before = qops.w4a8_linear(x, holder.packed, scale, None)  # caches the codes
    assert _rel_err(before, quant.fake_quant_w4a8_linear(x, source, None)) < 1e-5
    record = PackedWeight("fc", source, source._version, lambda w: (quant.quantize_int4_per_channel(w)[0],), ("packed",))
    with torch.no_grad():
        source.neg_()  # the codes flip sign; the per-channel scales stay the same
    with torch.inference_mode():
        assert refresh(holder, [record]) == 1
        after = qops.w4a8_linear(x, holder.packed, scale, None)
    assert _rel_err(after, quant.fake_quant_w4a8_linear(x, source, None)) < 1e-5


def test_empty_tokens():
    packed, scale = quant.quantize_int4_per_channel(torch.randn(8, 32))
    assert qops.w4a4_linear(torch.randn(0, 32), packed, scale, None).shape == (0, 8)


# --- opcheck, fake, grad ------------------------------------------------------------------------------


@pytest.mark.parametrize("form, bias", [("w4a8", True), ("w4a4", False)])  # same code path for both
def test_opcheck(form, bias):
    packed, scale = quant.quantize_int4_per_channel(torch.randn(16, 64))
    x = torch.randn(2, 3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if bias else None
    torch.library.opcheck(_op(form).default, (x, packed, scale, b))


@pytest.mark.parametrize("form", FORMS)
def test_grad_face_is_straight_through(form):
    """dx = dy @ dequant(W) (the weight is frozen), db = sum over tokens of dy."""
    w = torch.randn(24, 64)
    packed, scale = quant.quantize_int4_per_channel(w)
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    dy = torch.randn(2, 5, 24)
    _op(form)(x, packed, scale, b).backward(dy)
    wd = quant.dequantize_int4_per_channel(packed, scale).double()
    assert _rel_err(x.grad, dy.double() @ wd) < 1e-5
    assert _rel_err(b.grad, dy.double().sum((0, 1))) < 1e-5


# --- the rotated path (needs the Hadamard helper's ops) ---------------------------------------------


@needs_hadamard
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block", [0, 16])
def test_rotated_spec_and_grad(form, block):
    """y = Q_b(x R) @ Q4(W R)^T with R = H (block 0: full size) or I (x) H_16; dx = (dy Wq) R^T."""
    k = 64
    from qhl.hadamard import hadamard_matrix

    h = hadamard_matrix(k if block == 0 else block, dtype=torch.float64)
    r = h if block == 0 else torch.block_diag(*[h] * (k // block))
    w, x, b = torch.randn(24, k), torch.randn(2, 5, k, requires_grad=True), torch.randn(24)
    w_rot = (w.double() @ r).float()
    packed, scale = quant.quantize_int4_per_channel(w_rot)
    out = _op(form)(x, packed, scale, b, block)
    ref = _ref(form)((x.detach().double() @ r).float(), w_rot, b)
    # the op rotates in float32 (FWHT), the reference in float64 then rounds to float32: a code
    # could differ by one step at an exact rounding tie; none does on this seed, so 1e-5 as above
    assert _rel_err(out, ref) < 1e-5
    unrotated = _ref(form)(x.detach(), w, b)
    exact = x.detach().double() @ w.double().T + b.double()
    assert _rel_err(out, exact) < 2 * _rel_err(unrotated, exact) + 0.05  # a rotation, not garbage
    dy = torch.randn(2, 5, 24)
    out.backward(dy)
    wd = quant.dequantize_int4_per_channel(packed, scale).double()
    assert _rel_err(x.grad, dy.double() @ wd @ r.T) < 1e-5


# --- recipes and the quantize_linear rule ---------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_recipe_presets_round_trip(form):
    r = qhl.recipe(form, weight_clip="mse")
    assert r.form == form and r.weight_clip == "mse" and r.passes[-1] == "quantize_linear"
    assert type(r).from_json(r.to_json()) == r
    from qhl.recipes import FORMS as RECIPE_FORMS

    assert form in RECIPE_FORMS and form in qhl.recipes()


def _quantized(recipe, model=None, x=None):
    model = model or torch.nn.Sequential(torch.nn.Linear(128, 48))
    x = torch.randn(2, 5, 128) if x is None else x
    gm = select_layers(canonicalize_matmuls(make_graph(model, x)).gm, recipe).gm
    before = copy.deepcopy(gm)
    return model, x, before, quantize_linear(gm)


def _idempotent(gm) -> None:
    code = gm.code
    again = quantize_linear(gm)
    assert again.changed is False and again.gm.code == code


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("clip", ["none", "mse"])
def test_quantize_linear_golden(form, clip):
    model, x, before, res = _quantized(qhl.recipe(form, weight_clip=clip))
    assert graph_expr(before) == "(aten.linear.default(in2, in0, in1),)"
    w, b = model[0].weight.detach(), model[0].bias.detach()
    packed_ref, scale_ref = quant.quantize_int4_per_channel(w, clip)
    op = _op(form).default

    def expected(w_in, b_in, x_in):
        return (op(x_in, packed_ref, scale_ref, b_in),)

    assert graph_expr(res.gm) == expected_expr(expected)
    assert graph_expr(res.gm) == f"(qhl.{form}_linear.default(in2, attr<uint8[48, 64]>, attr<float32[48]>, in1),)"
    packed, scale = [getattr(res.gm, n.target) for n in res.gm.graph.nodes if n.op == "get_attr"]
    assert torch.equal(packed, packed_ref) and torch.equal(scale, scale_ref)
    assert dict(res.stats) == {"rewritten": 1, "declined": 0}
    [(node, info)] = matmul_infos(res.gm)
    assert node.target == op and info.form == form
    assert (info.weight_bytes_before, info.weight_bytes_after) == (48 * 128 * 4, 48 * 64 + 48 * 4)
    [out] = run_graph(res.gm)
    assert _rel_err(out, _ref(form)(x, w, b, clip)) < 1e-5
    _idempotent(res.gm)


def test_quantize_linear_passes_hadamard_block_after_the_bias():
    """The rotation pass sets knobs["hadamard_block"]; the rule passes it as the keyword after b."""
    from qhl.passes.quantize_linear import RULES

    rule = RULES["w4a8"]
    assert rule.static_args({}) == () and rule.static_kwargs({}) == {}
    assert rule.static_kwargs({"hadamard_block": None}) == {}
    assert rule.static_kwargs({"hadamard_block": 0}) == {"hadamard_block": 0}
    assert rule.static_kwargs({"hadamard_block": 64}) == {"hadamard_block": 64}


@pytest.mark.parametrize("form", FORMS)
def test_quantize_linear_declines_odd_k(form):
    model = torch.nn.Sequential(torch.nn.Linear(63, 16))
    _, _, before, res = _quantized(qhl.recipe(form), model=model, x=torch.randn(2, 63))
    assert graph_expr(res.gm) == graph_expr(before) == "(aten.linear.default(in2, in0, in1),)"
    assert dict(res.stats) == {"rewritten": 0, "declined": 1}
    [(_, info)] = matmul_infos(res.gm)
    assert info.form is None and not info.selected
    assert info.reason == "in_features K=63 is odd; int4 weights are packed two per byte along K, so K must be even"
    _idempotent(res.gm)


def test_compile_backend_runs_w4a4_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(2, 8, 64)
    be = qhl.backend("w4a4")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
        h = torch.relu(quant.fake_quant_w4a4_linear(x, model[0].weight, model[0].bias).float())
        ref = quant.fake_quant_w4a4_linear(h, model[2].weight, model[2].bias)
    assert [i.form for i in be.graphs[-1].layers] == ["w4a4", "w4a4"]
    assert _rel_err(out, ref) < 1e-5


# --- Triton kernel face (interpreted on CPU) --------------------------------------------------------------

TRITON_CASES = [
    # (x shape, N, dtype, bias): K/2 not a multiple of BLOCK_KH, N not of BLOCK_N, 3-D x
    ((3, 40), 24, torch.float32, True),
    ((2, 3, 96), 33, torch.float16, False),
    ((20, 200), 40, torch.bfloat16, True),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("x_shape, n, dtype, with_bias", TRITON_CASES)
def test_triton_matches_spec(form, x_shape, n, dtype, with_bias):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from qhl.codegen.triton.per_token_quant import per_token_quant_bits
    from qhl.codegen.triton.w4ax import w4ax_linear_triton
    from qhl.codegen.w4ax import w4ax_linear_spec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(x_shape) * 3).to(dtype).to(device)
    x.reshape(-1, x_shape[-1])[0] = 0  # an all-zero token
    packed, scale = (t.to(device) for t in quant.quantize_int4_per_channel(torch.randn(n, x_shape[-1])))
    b = torch.randn(n).to(dtype).to(device) if with_bias else None
    q, s = per_token_quant_bits(x.reshape(-1, x_shape[-1]), BITS[form])
    q_ref, s_ref = quant.quantize_per_token_bits(x.reshape(-1, x_shape[-1]), BITS[form])
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    y = w4ax_linear_triton(x, packed, scale, b, -1, BITS[form])
    ref = w4ax_linear_spec(x, packed, scale, b, -1, BITS[form])
    assert y.shape == ref.shape and y.dtype == dtype
    if device == "cpu" and not (with_bias and dtype == torch.float32):
        assert torch.equal(y, ref)
    else:  # the bias add may be one fused rounding (a GPU's FMA; the CPU face's torch.addcmul)
        torch.testing.assert_close(y, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


# --- ONNX face ------------------------------------------------------------------------------------------


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _cos(a, b) -> float:
    a, b = torch.as_tensor(a).double().ravel(), torch.as_tensor(b).double().ravel()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("form", FORMS)
def test_onnx_export_parity_and_codes(form, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from qhl.onnx_export import export_onnx
    from qhl.runtime import ort as qort

    torch.manual_seed(0)
    model, x = _MLP().eval(), torch.randn(2, 8, 64)
    res = export_onnx(model, (x,), tmp_path / f"{form}.onnx", recipe=form)
    assert set(qhl.codegen.onnx.ops_for_form(form)) <= set(res.ops) | {"Cast"}
    assert res.ops["MatMulInteger"] == 2 and "MatMul" not in res.ops
    assert [r.onnx_ops for r in res.report.layers] == [qhl.codegen.onnx.ops_for_form(form)] * 2
    gm = res.report.graph_module
    sess = qort.session(res.path)
    for inp in (x, torch.randn(3, 5, 64)):  # dynamic batch and sequence axes
        got, want = qort.run(sess, (inp,))[0], gm(inp).detach()
        assert got.shape == tuple(want.shape) and _cos(got, want) >= 0.9999

    # the stored weight: fc1's uint4 [K, N] initializer holds codes q + 8 (q the spec's codes),
    # widened by a Cast to int8 that ONNX Runtime folds at load time
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    mmi = [n for n in proto.graph.node if n.op_type == "MatMulInteger"][0]
    cast = producers[mmi.input[1]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT8
    stored = inits[cast.input[0]]
    assert stored.data_type == onnx.TensorProto.UINT4 and len(stored.raw_data) == 64 * 128 // 2  # 4 bits each
    w_codes = torch.from_numpy(numpy_helper.to_array(stored).astype("int8"))
    packed, _ = quant.quantize_int4_per_channel(model.fc1.weight.detach())
    assert torch.equal(w_codes, quant.unpack_int4(packed).T.to(torch.int8))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(res.path), so, providers=["CPUExecutionProvider"])
    loaded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert sum(n.op_type == "Cast" for n in loaded.graph.node) == 2  # only the int32 accumulators' Casts
    # the activation codes: expose fc1's QuantizeLinear output; it is q + 128 with q the spec's
    quant_out = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"][0].output[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(quant_out, onnx.TensorProto.UINT8, None))

    s2 = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = s2.run([quant_out], {s2.get_inputs()[0].name: x.numpy()})[0]
    q, _ = quant.quantize_per_token_bits(x, BITS[form])
    assert torch.equal(torch.from_numpy(codes).to(torch.int16) - 128, q.to(torch.int16))


class _RotatedW4(torch.nn.Module):
    def __init__(self, form: str, block: int):
        super().__init__()
        self.op, self.block = _op(form).default, block
        w = torch.randn(48, 128)
        from qhl.hadamard import hadamard_matrix

        h = hadamard_matrix(block if block else 128, dtype=torch.float64)
        r = h if block in (0, 128) else torch.block_diag(*[h] * (128 // block))
        packed, scale = quant.quantize_int4_per_channel((w.double() @ r).float())
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", torch.randn(48))

    def forward(self, x):
        return self.op(x, self.packed, self.scale, self.bias, self.block)


@pytest.mark.parametrize("form, block", [("w4a8", 0), ("w4a4", 16)])  # full size and block-diagonal
def test_onnx_rotated_export(form, block, tmp_path):
    from qhl.codegen.onnx import w4ax as onnx_w4ax
    from qhl.errors import UnsupportedError

    try:
        from qhl.codegen.onnx import hadamard as onnx_hadamard
    except ImportError:
        onnx_hadamard = None
    if not hasattr(onnx_hadamard, "rotate"):
        with pytest.raises(UnsupportedError, match="hadamard_block=0: .*Hadamard ONNX translation"):
            onnx_w4ax._rotate(object(), 0)
        return
    if not HAS_HADAMARD:
        pytest.skip("qhl::hadamard_quantize_per_token not registered yet")
    pytest.importorskip("onnxruntime")
    from qhl.codegen.onnx import TRANSLATIONS
    from qhl.runtime import ort as qort

    torch.manual_seed(0)
    model, x = _RotatedW4(form, block).eval(), torch.randn(4, 16, 128)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=21, verbose=False,
                                custom_translation_table=TRANSLATIONS)
    program.save(str(tmp_path / "rot.onnx"))
    got, want = qort.run(qort.session(tmp_path / "rot.onnx"), (x,))[0], model(x)
    # The rotation is float32 in both, summed in another order, so a code could move by one step
    # at a rounding tie (none does on this seed: 1 - cos ~ 5e-15); 0.9999 as for the unrotated.
    assert _cos(got, want) >= 0.9999


@needs_hadamard
@pytest.mark.interpreter
@pytest.mark.parametrize("form", FORMS)
def test_triton_rotated_matches_spec(form):
    """The rotated prologue is the Hadamard helper's op on either face; the GEMM is the same."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from qhl.codegen.triton.w4ax import w4ax_linear_triton
    from qhl.codegen.w4ax import w4ax_linear_spec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 64, device=device)
    packed, scale = (t.to(device) for t in quant.quantize_int4_per_channel(torch.randn(24, 64)))
    y = w4ax_linear_triton(x, packed, scale, None, 16, BITS[form])
    ref = w4ax_linear_spec(x, packed, scale, None, 16, BITS[form])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
