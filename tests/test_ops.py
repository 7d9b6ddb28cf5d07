"""The qhl:: ops' faces against the float64 fake-quant references in qhl.codegen.quant.

Tolerances (relative to the reference's norm):
  w8a8   the int8 x int8 products accumulate exactly in int32; only the float32 dequant epilogue
         rounds: 1e-5.
  w8a16, w4a16   float32 accumulation-order noise against float64: 1e-5 (K <= 256 here).
  fp16 / bf16 inputs: the output is rounded to the input dtype: 2e-3 (fp16) and 1e-2 (bf16).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qhl
import qhl.codegen  # noqa: F401  (registers the ops)
from qhl.codegen import quant

qops = torch.ops.qhl

REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _w8(n=24, k=64):
    w = torch.randn(n, k)
    return w, *quant.quantize_int8_per_channel(w)


def _w4(n=24, k=128, g=32, symmetric=True):
    """A random weight and its int4 packing; symmetric ones on the w4a16 preset's "grid" scales,
    so the faces see code 0 (q = -8) too."""
    w = torch.randn(n, k)
    return w, *quant.quantize_int4_groupwise(w, g, symmetric, "grid" if symmetric else "none")


# --- spec face vs fake-quant reference -----------------------------------------------------------

SHAPES = [(1, 64), (7, 64), (2, 5, 64), (3, 1, 4, 64)]  # 2-D, odd M, 3-D, 4-D


@pytest.mark.parametrize("x_shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_w8a8_spec_matches_fake_quant(x_shape, bias):
    w, wq, ws = _w8()
    x = torch.randn(*x_shape)
    b = torch.randn(24) if bias else None
    out = qops.w8a8_linear(x, wq, ws, b)
    ref = quant.fake_quant_w8a8_linear(x, w, b)
    assert out.shape == (*x_shape[:-1], 24) and out.dtype == torch.float32
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("x_shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_w8a16_spec_matches_fake_quant(x_shape, bias):
    w, wq, ws = _w8()
    x = torch.randn(*x_shape)
    b = torch.randn(24) if bias else None
    out = qops.w8a16_linear(x, wq, ws, b)
    assert out.shape == (*x_shape[:-1], 24)
    assert _rel_err(out, quant.fake_quant_w8a16_linear(x, w, b)) < 1e-5


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4a16_spec_matches_fake_quant(group_size, symmetric):
    w, packed, scale, zero = _w4(g=group_size, symmetric=symmetric)
    x = torch.randn(2, 5, 128)
    b = torch.randn(24)
    out = qops.w4a16_linear(x, packed, scale, zero, group_size, b)
    assert out.shape == (2, 5, 24)
    clip = "grid" if symmetric else "none"
    assert _rel_err(out, quant.fake_quant_w4a16_linear(x, w, b, group_size, symmetric, clip)) < 1e-5


def test_w8a8_int32_accumulation_is_exact():
    """Integer-valued activations/weights: every product and sum is exact, so the output is exactly
    (sum q_x q_w) * s_x * s_w computed in float32."""
    k = 256
    x = torch.full((2, k), 127.0)  # s_x = 1, q_x = 127
    w = torch.full((3, k), -127.0)  # s_w = 1, q_w = -127
    wq, ws = quant.quantize_int8_per_channel(w)
    out = qops.w8a8_linear(x, wq, ws, None)
    assert torch.equal(out, torch.full((2, 3), -127.0 * 127.0 * k))


def test_w8a8_fake_quant_reference_is_close_to_float():
    """Sanity of the reference itself: per-token x per-channel int8 on Gaussian data ~ 38 dB."""
    from qhl.metrics import sqnr_db

    w = torch.randn(64, 256)
    x = torch.randn(32, 256)
    assert 30 < sqnr_db(x.double() @ w.double().T, quant.fake_quant_w8a8_linear(x, w, None)) < 45


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["w8a8", "w8a16", "w4a16"])
def test_half_precision_inputs(form, dtype):
    x = torch.randn(2, 3, 128).to(dtype)
    b = torch.randn(24).to(dtype)
    if form == "w4a16":
        w, *packed = _w4(k=128, g=64)
        out = qops.w4a16_linear(x, *packed, 64, b)
        ref = quant.fake_quant_w4a16_linear(x, w, b, 64, True, "grid")
    else:
        w, wq, ws = _w8(k=128)
        out = getattr(qops, f"{form}_linear")(x, wq, ws, b)
        ref = getattr(quant, f"fake_quant_{form}_linear")(x, w, b)
    assert out.dtype == dtype and out.shape == (2, 3, 24)
    assert _rel_err(out, ref) < REL_TOL[dtype]


def test_non_contiguous_input():
    w, wq, ws = _w8()
    x = torch.randn(64, 6).t()  # [6, 64], strides (1, 6)
    assert not x.is_contiguous()
    assert _rel_err(qops.w8a8_linear(x, wq, ws, None), quant.fake_quant_w8a8_linear(x, w, None)) < 1e-5


# --- quantize_per_token ---------------------------------------------------------------------------


def test_quantize_per_token_matches_reference_and_definition():
    x = torch.randn(3, 4, 64)
    q, s = qops.quantize_per_token(x)
    q_ref, s_ref = quant.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 4, 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 127)
    assert int(q.abs().max()) == 127
    assert (q.float() * s - x).abs().max() <= s.max() / 2 + 1e-6


def test_quantize_per_token_all_zero_row_gives_scale_one():
    x = torch.randn(3, 16)
    x[1] = 0
    q, s = qops.quantize_per_token(x)
    assert s[1].item() == 1.0
    assert bool((q[1] == 0).all())
    assert torch.equal(quant.dequantize_per_token(q, s)[1], torch.zeros(16))


def test_quantize_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5]])  # s = 1
    q, s = qops.quantize_per_token(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0]]


def test_zero_weight_row_dequantizes_to_zero():
    w = torch.randn(4, 64)
    w[2] = 0
    wq, ws = quant.quantize_int8_per_channel(w)
    assert ws[2].item() == 1.0
    out = qops.w8a8_linear(torch.randn(3, 64), wq, ws, None)
    assert bool((out[:, 2] == 0).all())


# --- int4 packing --------------------------------------------------------------------------------


def test_int4_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(quant.unpack_int4(packed), codes)
    # low nibble = even k, high nibble = odd k
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_int4_symmetric_codes_and_dequant():
    w = torch.randn(8, 64)
    packed, scale, zero = quant.quantize_int4_groupwise(w, 32, symmetric=True)
    assert bool((zero == 8).all())
    torch.testing.assert_close(scale, w.reshape(8, 2, 32).abs().amax(-1) / 7)
    wd = quant.dequantize_int4_groupwise(packed, scale, zero, 32)
    assert (wd - w).abs().reshape(8, 2, 32).amax(-1).le(scale / 2 + 1e-6).all()


def test_int4_asymmetric_uses_zero_point():
    w = torch.rand(8, 64) + 0.5  # all positive: the asymmetric grid spans [0, max]
    packed, scale, zero = quant.quantize_int4_groupwise(w, 32, symmetric=False)
    codes = quant.unpack_int4(packed)
    assert bool((zero == 0).all())  # min clamps to 0 -> zero point 0
    assert int(codes.max()) == 15
    torch.testing.assert_close(scale, w.reshape(8, 2, 32).amax(-1) / 15)
    w2 = torch.randn(8, 64)
    _, scale2, zero2 = quant.quantize_int4_groupwise(w2, 32, symmetric=False)
    assert bool(((zero2 > 0) & (zero2 < 15)).any())
    wd = quant.dequantize_int4_groupwise(*quant.quantize_int4_groupwise(w2, 32, False), 32)
    assert (wd - w2).abs().reshape(8, 2, 32).amax(-1).le(scale2 / 2 + 1e-6).all()


def test_int4_asymmetric_more_accurate_than_symmetric_on_skewed_weights():
    from qhl.metrics import sqnr_db

    w = torch.rand(32, 128) * 2 - 0.2  # skewed range
    sym = quant.dequantize_int4_groupwise(*quant.quantize_int4_groupwise(w, 32, True), 32)
    asym = quant.dequantize_int4_groupwise(*quant.quantize_int4_groupwise(w, 32, False), 32)
    assert sqnr_db(w, asym) > sqnr_db(w, sym)


# --- fake face ------------------------------------------------------------------------------------


def test_fake_faces_give_shapes_and_dtypes():
    w, wq, ws = _w8()
    _, packed, scale, zero = _w4(k=64, g=32)
    with FakeTensorMode() as mode:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.empty(2, 7, 64, dtype=dtype)
            fwq, fws = mode.from_tensor(wq), mode.from_tensor(ws)
            for op in (qops.w8a8_linear, qops.w8a16_linear):
                y = op(x, fwq, fws, None)
                assert y.shape == (2, 7, 24) and y.dtype == dtype
            y = qops.w4a16_linear(x, mode.from_tensor(packed), mode.from_tensor(scale), mode.from_tensor(zero), 32, None)
            assert y.shape == (2, 7, 24) and y.dtype == dtype
            q, s = qops.quantize_per_token(x)
            assert q.shape == (2, 7, 64) and q.dtype == torch.int8
            assert s.shape == (2, 7, 1) and s.dtype == torch.float32


# --- opcheck --------------------------------------------------------------------------------------


def _opcheck_cases():
    w, wq, ws = _w8(k=32, n=16)
    _, packed, scale, zero = _w4(k=64, n=16, g=32)
    x32 = lambda: torch.randn(2, 3, 32, requires_grad=True)  # noqa: E731
    x64 = lambda: torch.randn(2, 3, 64, requires_grad=True)  # noqa: E731
    b = lambda: torch.randn(16, requires_grad=True)  # noqa: E731
    return [
        ("w8a8", qops.w8a8_linear.default, (x32(), wq, ws, b())),
        ("w8a8_nobias", qops.w8a8_linear.default, (x32(), wq, ws, None)),
        ("w8a16", qops.w8a16_linear.default, (x32(), wq, ws, b())),
        ("w4a16", qops.w4a16_linear.default, (x64(), packed, scale, zero, 32, b())),
        ("quantize_per_token", qops.quantize_per_token.default, (torch.randn(2, 3, 32),)),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(case):
    _, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --- grad face ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["w8a8", "w8a16", "w4a16"])
def test_grad_face_is_straight_through(form):
    """dx = dy @ dequant(W) (the weight is frozen), db = sum over tokens of dy."""
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    if form == "w4a16":
        _, packed, scale, zero = _w4(k=64, g=32)
        w_deq = quant.dequantize_int4_groupwise(packed, scale, zero, 32)
        y = qops.w4a16_linear(x, packed, scale, zero, 32, b)
    else:
        _, wq, ws = _w8()
        w_deq = wq.float() * ws[:, None]
        y = getattr(qops, f"{form}_linear")(x, wq, ws, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w_deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


def test_grad_face_half_precision_keeps_dtypes():
    _, wq, ws = _w8()
    x = torch.randn(3, 64, dtype=torch.float16, requires_grad=True)
    b = torch.randn(24, dtype=torch.float16, requires_grad=True)
    qops.w8a16_linear(x, wq, ws, b).float().sum().backward()
    assert x.grad.dtype == torch.float16 and b.grad.dtype == torch.float16
    assert torch.isfinite(x.grad).all()


# --- the int4 "grid" scale choices (weight_clip="grid", the w4a16 preset's default, and "grid_clip") --


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("clip", ["grid", "grid_clip"])
def test_int4_grid_takes_the_closest_symmetric_grid(group_size, clip):
    """Per group, the dequantized weight is exactly one of the candidates, the one with the
    smallest squared error (ties keep the earlier): amax/7 on [-7, 7], then on [-8, 7]
    ("grid_clip" only: amax/7.5,) max(max/7, -min/8) and -max(max/8, -min/7). Each wins somewhere
    on a Gaussian weight; the last two clip nothing and put a negative or a positive (a negative
    scale) peak on q = -8 exactly. "grid" never clips: every group's peaks are held exactly or
    inside the grid."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    amax = groups.abs().amax(-1, keepdim=True)
    top, bottom = groups.amax(-1, keepdim=True), -groups.amin(-1, keepdim=True)
    fine = torch.maximum(top / 7, bottom / 8)
    mirrored = -torch.maximum(top / 8, bottom / 7)
    candidates = [torch.round(groups / (amax / 7)).clamp(-7, 7) * (amax / 7)]
    if clip == "grid_clip":
        candidates.append(torch.round(groups / (amax / 7.5)).clamp(-8, 7) * (amax / 7.5))
    candidates += [torch.round(groups / fine).clamp(-8, 7) * fine, torch.round(groups / mirrored).clamp(-8, 7) * mirrored]
    fine_at, mirror_at = len(candidates) - 2, len(candidates) - 1
    errors = torch.stack([(c - groups).pow(2).sum(-1) for c in candidates])  # [grids, N, K/g]
    winner = errors.argmin(0)  # argmin returns the first minimum: ties keep the earlier grid
    want = torch.stack(candidates).gather(0, winner[None, ..., None].expand(1, *groups.shape))[0]
    packed, scale, zero = quant.quantize_int4_groupwise(w, group_size, True, clip)
    got = quant.dequantize_int4_groupwise(packed, scale, zero, group_size).reshape(groups.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(winner.unique().tolist()) == set(range(len(candidates)))  # each grid wins somewhere
    assert torch.equal(scale < 0, winner == mirror_at)  # only the mirrored grid has a negative scale
    assert int((quant.unpack_int4(packed) == 0).sum()) > 0 and torch.all(zero == 8)
    # a group of the finest grid whose negative peak sets its scale (-min / 8 > max / 7) holds it exactly
    third = (winner == fine_at) & (-groups.amin(-1) / 8 > groups.amax(-1) / 7)
    assert third.any()
    torch.testing.assert_close(got.amin(-1)[third], groups.amin(-1)[third], rtol=1e-6, atol=0)
    fourth = (winner == mirror_at) & (groups.amax(-1) / 8 > -groups.amin(-1) / 7)  # and the mirror, a positive peak
    assert fourth.any()
    torch.testing.assert_close(got.amax(-1)[fourth], groups.amax(-1)[fourth], rtol=1e-6, atol=0)
    # never worse than plain rounding, group by group
    plain = quant.dequantize_int4_groupwise(*quant.quantize_int4_groupwise(w, group_size, True), group_size)
    assert torch.all((got - groups).pow(2).sum(-1) <= (plain.reshape(groups.shape) - groups).pow(2).sum(-1) + 1e-9)
    # every weight lies within half a step of its dequantized value: "grid" never clips, and
    # "grid_clip"'s amax / 7.5 saturates a positive peak (7.5 s -> 7 s) by exactly half a step
    assert torch.all((got - groups).abs() <= scale.abs()[..., None] / 2 * (1 + 1e-5))


def test_int4_grid_is_plain_rounding_for_asymmetric_groups_and_refused_per_channel():
    w = torch.randn(16, 64)
    for clip in ("grid", "grid_clip"):
        for a, b in zip(quant.quantize_int4_groupwise(w, 32, False, clip), quant.quantize_int4_groupwise(w, 32, False)):
            assert torch.equal(a, b)
    for clip in ("grid", "grid_clip"):
        with pytest.raises(ValueError, match="'grid' and 'grid_clip' are group-wise only"):
            quant.quantize_int4_per_channel(w, clip)
        with pytest.raises(qhl.RecipeError, match="per-channel int4 takes 'mse' or 'none'"):
            qhl.recipe("w4a8", weight_clip=clip)
    assert qhl.recipe("w4a16").weight_clip == "grid"


@pytest.mark.parametrize("form", ["w8a16", "w4a16"])
def test_tiled_cpu_faces_over_several_tiles_match_fake_quant(form):
    """The weight-only CPU faces above their GEMV's token counts dequantize W a tile of rows at a
    time (256 rows of K = 4096 here) and write y^T tile by tile: N = 600 is two full tiles and a
    partial one. The result is row-major [M, N] and the fake-quant reference's."""
    w, x, b = torch.randn(600, 4096), torch.randn(20, 4096), torch.randn(600)
    if form == "w8a16":
        wq, ws = quant.quantize_int8_per_channel(w)
        out, ref = qops.w8a16_linear(x, wq, ws, b), quant.fake_quant_w8a16_linear(x, w, b)
    else:
        packed, scale, zero = quant.quantize_int4_groupwise(w, 128, False)
        out = qops.w4a16_linear(x, packed, scale, zero, 128, b)
        ref = quant.fake_quant_w4a16_linear(x, w, b, 128, False, "none")
    assert out.shape == (20, 600) and out.is_contiguous()
    assert _rel_err(out, ref) < 1e-5
