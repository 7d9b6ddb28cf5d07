"""qhl::gralora_linear / qhl::gralora_w4a16_linear: the spec face against peft (as an oracle) and
the hand-checked reference value of techniques.md section 3.2.

Tolerances (float32 unless stated):
  section 3.2 value   small integers, every product exact in float32: equality.
  peft parity         forward relative error (norm of the difference / norm of peft's output)
                      <= 1e-5 and gradients of A, B, x (and hybrid_a/b) <= 1e-4: the issue's
                      numbers. Both sides are float32 with different summation orders (bmm vs
                      einsum, a recomputed h); the measured errors are ~1e-7.
  delta weight        <= 1e-6 relative: the same products, summed in another order.
  w4a16 base          the base is the same w4a16_linear_spec call: <= 1e-6 relative.
  gradcheck           float64, torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qhl.codegen  # noqa: F401  (registers the ops)
from qhl.codegen import quant
from qhl.codegen.gralora import check_gralora_shapes, gralora_delta_weight
from qhl.errors import UnsupportedError

peft = pytest.importorskip("peft")
qops = torch.ops.qhl

FWD_TOL = 1e-5
GRAD_TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --- techniques.md section 3.2 ---------------------------------------------------------------------


def _reference_adapter():
    # A_n is R x in/k, B_j is out/k x R (the paper's layout); peft stores A_n^T and B_j^T stacked.
    a = torch.tensor([[[1.0, 2], [3, 4]], [[5, 6], [7, 8]]])
    b = torch.tensor([[[1.0, 0], [0, 1], [1, 1]], [[2, 0], [0, 2], [1, -1]]])
    return a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()


def test_reference_value():
    lora_a, lora_b = _reference_adapter()
    x = torch.tensor([[1.0, 2, 3, 4]])
    y = qops.gralora_linear(x, torch.zeros(6, 4), None, lora_a, lora_b, None, None, 2.0)
    assert torch.equal(y, torch.tensor([[10.0, 78, 88, 44, 212, -84]]))
    dw = gralora_delta_weight(lora_a, lora_b, None, None, 2.0)
    expected = torch.tensor(
        [
            [2.0, 4, 0, 0],
            [0, 0, 10, 12],
            [2, 4, 10, 12],
            [12, 16, 0, 0],
            [0, 0, 28, 32],
            [6, 8, -14, -16],
        ]
    )
    assert torch.equal(dw, expected)
    assert torch.equal(x @ dw.t(), y)  # merged == unmerged


# --- parity with peft ------------------------------------------------------------------------------


class _One(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _peft_gralora(d_in, d_out, r, k, hybrid_r, alpha=16):
    torch.manual_seed(0)
    cfg = peft.GraloraConfig(
        r=r, alpha=alpha, gralora_k=k, hybrid_r=hybrid_r, init_weights=False, target_modules=["lin"]
    )
    model = peft.get_peft_model(_One(d_in, d_out), cfg)
    layer = model.base_model.model.lin
    params = dict(
        lora_a=layer.gralora_A["default"],
        lora_b=layer.gralora_B["default"],
        hybrid_a=layer.gralora_A_general["default"].weight if hybrid_r else None,
        hybrid_b=layer.gralora_B_general["default"].weight if hybrid_r else None,
    )
    return model, layer, params, layer.scaling["default"]


def _peft_lora(d_in, d_out, r, alpha=16):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=["lin"])
    model = peft.get_peft_model(_One(d_in, d_out), cfg)
    layer = model.base_model.model.lin
    a_w, b_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # k = 1: lora_a = A^T[None], lora_b = B^T[None] (views, so gradients flow back to peft's params).
    params = dict(lora_a=a_w.t()[None], lora_b=b_w.t()[None], hybrid_a=None, hybrid_b=None)
    return model, layer, params, layer.scaling["default"], (a_w, b_w)


def _run_both(model, layer, params, scaling, x_shape, d_out):
    """Forward + backward through peft (on the 3-D view of x) and through the op (on x as given)."""
    torch.manual_seed(1)
    x = torch.randn(*x_shape)
    gy = torch.randn(*x_shape[:-1], d_out)
    base = layer.base_layer

    x_peft = x.reshape(-1, x_shape[-2], x_shape[-1]).clone().requires_grad_(True)
    y_peft = model(x_peft)
    (y_peft * gy.reshape(y_peft.shape)).sum().backward()
    peft_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    x_op = x.clone().requires_grad_(True)
    y_op = qops.gralora_linear(x_op, base.weight, base.bias, scaling=scaling, **params)
    (y_op * gy).sum().backward()
    op_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    errs = {
        "y": _rel(y_op.reshape(y_peft.shape), y_peft),
        "x": _rel(x_op.grad.reshape(x_peft.shape), x_peft.grad),
    }
    assert set(op_grads) == set(peft_grads)
    for name in peft_grads:
        errs[name] = _rel(op_grads[name], peft_grads[name])
    return errs


X_SHAPES = [(6, 32), (2, 5, 32), (2, 3, 4, 32)]  # 2-D, 3-D, 4-D


def _assert_errs(errs):
    assert errs["y"] <= FWD_TOL, errs
    for name, err in errs.items():
        assert err <= GRAD_TOL, (name, errs)


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("k", [2, 4])
def test_peft_gralora_parity(k, hybrid_r, x_shape):
    model, layer, params, scaling = _peft_gralora(32, 48, r=8, k=k, hybrid_r=hybrid_r)
    assert scaling == 16 / (8 + hybrid_r)
    errs = _run_both(model, layer, params, scaling, x_shape, 48)
    assert any("gralora_A" in n for n in errs) and any("gralora_B" in n for n in errs)
    if hybrid_r:
        assert any("gralora_A_general" in n for n in errs) and any(
            "gralora_B_general" in n for n in errs
        )
    _assert_errs(errs)


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=["2d", "3d", "4d"])
def test_peft_lora_parity(x_shape):
    model, layer, params, scaling, _ = _peft_lora(32, 48, r=8)
    errs = _run_both(model, layer, params, scaling, x_shape, 48)
    assert any("lora_A" in n for n in errs) and any("lora_B" in n for n in errs)
    _assert_errs(errs)


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 4), (1, 0)])
def test_delta_weight_matches_peft(k, hybrid_r):
    if k == 1:
        model, layer, params, scaling, _ = _peft_lora(32, 48, r=8)
    else:
        model, layer, params, scaling = _peft_gralora(32, 48, r=8, k=k, hybrid_r=hybrid_r)
    with torch.no_grad():
        dw = gralora_delta_weight(scaling=scaling, **params)
        ref = layer.get_delta_weight("default")
        assert _rel(dw, ref) <= 1e-6
        # and merged == unmerged through the op
        x = torch.randn(5, 32)
        y = qops.gralora_linear(
            x, layer.base_layer.weight, layer.base_layer.bias, scaling=scaling, **params
        )
        y_merged = torch.nn.functional.linear(
            x, layer.base_layer.weight + dw, layer.base_layer.bias
        )
        assert _rel(y, y_merged) <= 1e-5


def test_dropout_input_and_shapes():
    """x_adapter feeds only the adapter path; bad shapes raise UnsupportedError with the reason."""
    model, layer, params, scaling = _peft_gralora(32, 48, r=8, k=2, hybrid_r=4)
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    p = {n: t.detach() for n, t in params.items()}
    x, xa = torch.randn(3, 32), torch.randn(3, 32)
    y = qops.gralora_linear(x, w, b, scaling=scaling, x_adapter=xa, **p)
    ref = torch.nn.functional.linear(x, w, b) + xa @ gralora_delta_weight(scaling=scaling, **p).t()
    assert _rel(y, ref) <= 1e-5
    assert check_gralora_shapes(30, 48, p["lora_a"], p["lora_b"], None, None) is not None
    bad_a = torch.randn(2, 16, 7)
    assert "divisible" in check_gralora_shapes(32, 48, bad_a, torch.randn(2, 7, 24), None, None)
    with pytest.raises(UnsupportedError):
        qops.gralora_linear(x, w, b, bad_a, torch.randn(2, 7, 24), None, None, 1.0)


# --- w4a16 base --------------------------------------------------------------------------------------


def _w4_case(hybrid: bool, dtype=torch.float32):
    torch.manual_seed(2)
    n, kk, g, k, r = 48, 64, 32, 2, 8
    packed, scale, zero = quant.quantize_int4_groupwise(torch.randn(n, kk), g, False)
    lora_a, lora_b = torch.randn(k, kk // k, r, dtype=dtype), torch.randn(k, r, n // k, dtype=dtype)
    ha = torch.randn(4, kk, dtype=dtype) if hybrid else None
    hb = torch.randn(n, 4, dtype=dtype) if hybrid else None
    return (packed, scale, zero, g, torch.randn(n, dtype=dtype)), (lora_a, lora_b, ha, hb, 0.5)


@pytest.mark.parametrize("hybrid", [False, True])
def test_w4a16_base(hybrid):
    (packed, scale, zero, g, bias), (la, lb, ha, hb, s) = _w4_case(hybrid)
    x = torch.randn(2, 3, 64)
    y = qops.gralora_w4a16_linear(x, packed, scale, zero, g, bias, la, lb, ha, hb, s)
    ref = (
        qops.w4a16_linear(x, packed, scale, zero, g, bias)
        + x @ gralora_delta_weight(la, lb, ha, hb, s).t()
    )
    assert _rel(y, ref) <= 1e-6
    # gradients: x through the dequantized base + the adapter; A, B against autograd of the merged form
    w = quant.dequantize_int4_groupwise(packed, scale, zero, g)
    leaves = [t.clone().requires_grad_(True) for t in (x, la, lb) + ((ha, hb) if hybrid else ())]
    y = qops.gralora_w4a16_linear(
        leaves[0],
        packed,
        scale,
        zero,
        g,
        bias,
        *leaves[1:3],
        *(leaves[3:] if hybrid else (None, None)),
        s,
    )
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.clone().requires_grad_(True) for t in leaves]
    dw = gralora_delta_weight(
        ref_leaves[1], ref_leaves[2], *(ref_leaves[3:] if hybrid else (None, None)), s
    )
    y_ref = ref_leaves[0] @ (w + dw).t() + bias
    want = torch.autograd.grad(y_ref, ref_leaves, gy)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= 1e-5


# --- opcheck / gradcheck -------------------------------------------------------------------------------


def _float_args(dtype, hybrid, x_adapter, bias=True):
    torch.manual_seed(3)
    k, r, d_in, d_out = 2, 4, 8, 12
    x = torch.randn(2, 3, d_in, dtype=dtype)
    args = [
        x,
        torch.randn(d_out, d_in, dtype=dtype),
        torch.randn(d_out, dtype=dtype) if bias else None,
        torch.randn(k, d_in // k, r, dtype=dtype),
        torch.randn(k, r, d_out // k, dtype=dtype),
        torch.randn(3, d_in, dtype=dtype) if hybrid else None,
        torch.randn(d_out, 3, dtype=dtype) if hybrid else None,
        0.75,
        torch.randn_like(x) if x_adapter else None,
    ]
    return args


@pytest.mark.parametrize("hybrid,x_adapter", [(False, False), (True, False), (True, True)])
def test_opcheck_gralora(hybrid, x_adapter):
    args = _float_args(torch.float32, hybrid, x_adapter)
    for i in (0, 2, 3, 4, 5, 6, 8):
        if args[i] is not None:
            args[i].requires_grad_(True)
    torch.library.opcheck(qops.gralora_linear.default, tuple(args))


@pytest.mark.parametrize("hybrid", [False, True])
def test_opcheck_gralora_w4a16(hybrid):
    (packed, scale, zero, g, bias), (la, lb, ha, hb, s) = _w4_case(hybrid)
    x = torch.randn(3, 64, requires_grad=True)
    la.requires_grad_(True)
    lb.requires_grad_(True)
    torch.library.opcheck(
        qops.gralora_w4a16_linear.default,
        (x, packed, scale, zero, g, bias, la, lb, ha, hb, s, None),
    )


@pytest.mark.parametrize("hybrid,x_adapter", [(True, False), (True, True), (False, False)])
def test_gradcheck_float64(hybrid, x_adapter):
    args = _float_args(torch.float64, hybrid, x_adapter)
    grad_idx = [i for i in (0, 2, 3, 4, 5, 6, 8) if args[i] is not None]

    def f(*leaves):
        a = list(args)
        for i, t in zip(grad_idx, leaves, strict=True):
            a[i] = t
        return qops.gralora_linear(*a)

    leaves = tuple(args[i].clone().requires_grad_(True) for i in grad_idx)
    assert torch.autograd.gradcheck(f, leaves)


def test_bf16_base_float32_adapter():
    """A bf16 model with float32 adapters (peft's usual mix): output in x's dtype, adapter grads in
    float32; within bf16 rounding (2^-8 relative) of the float32 merged reference."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    la, lb = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 8, 24, requires_grad=True)
    ha, hb = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    y = qops.gralora_linear(x, w, b, la, lb, ha, hb, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert (
        x.grad.dtype == torch.bfloat16
        and la.grad.dtype == torch.float32
        and hb.grad.dtype == torch.float32
    )
    ref = x.float() @ (w.float() + gralora_delta_weight(la, lb, ha, hb, 0.5)).t() + b.float()
    assert _rel(y, ref) <= 2**-8
