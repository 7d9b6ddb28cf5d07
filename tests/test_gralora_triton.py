"""GraLoRA Triton kernels (codegen/triton/gralora.py) against the spec face (codegen/gralora.py).

Runs natively on CUDA; without CUDA under Triton's CPU interpreter (TRITON_INTERPRET=1, set before
the kernel module is imported). Shapes are small: the interpreter costs ~ms per program step.

Tolerance: float32 inputs, float32 accumulation on both sides; only the summation order differs
(the kernels tile K, the spec uses bmm/addmm), measured ~1e-7 relative. We allow 1e-5 of the
reference's norm (on a GPU, tl.dot on float32 may use TF32, ~1e-3 relative: the bound is relaxed
to 5e-3 there).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import qhl.codegen  # noqa: E402,F401
from qhl.codegen import gralora as G  # noqa: E402
from qhl.codegen import quant  # noqa: E402
from qhl.codegen.triton.gralora import (  # noqa: E402
    gralora_backward_triton,
    gralora_linear_triton,
    gralora_w4a16_linear_triton,
)
from qhl.errors import KernelError  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 5e-3 if DEVICE == "cuda" else 1e-5

# (k, R, in, out, hybrid_r, x shape[:-1]); out/k = 18 and 10 make 64-wide tiles straddle blocks
CASES = [
    (2, 8, 32, 48, 4, (5,)),
    (4, 8, 64, 40, 0, (2, 3)),
    (2, 4, 24, 36, 3, (2, 2, 3)),
    (1, 8, 32, 24, 0, (6,)),  # LoRA
]
IDS = ["k2-hyb", "k4-straddle", "k2-4d-hyb", "lora"]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(k, r, d_in, d_out, hr, lead, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(DEVICE)

    x = rnd(*lead, d_in)
    adapter = (
        rnd(k, d_in // k, r),
        rnd(k, r, d_out // k),
        rnd(hr, d_in) if hr else None,
        rnd(d_out, hr) if hr else None,
    )
    return x, rnd(d_out, d_in), rnd(d_out), adapter


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("separate", [False, True], ids=["x", "x_adapter"])
def test_forward(case, separate):
    x, w, b, (la, lb, ha, hb) = _case(*case)
    xa = torch.randn_like(x) if separate else None
    y = gralora_linear_triton(x, w, b, la, lb, ha, hb, 0.7, xa)
    ref = G.gralora_linear_spec(
        x.cpu(),
        w.cpu(),
        b.cpu(),
        la.cpu(),
        lb.cpu(),
        None if ha is None else ha.cpu(),
        None if hb is None else hb.cpu(),
        0.7,
        None if xa is None else xa.cpu(),
    )
    assert y.shape == ref.shape
    assert _rel(y.cpu(), ref) <= TOL


@pytest.mark.parametrize("hybrid", [False, True])
def test_forward_w4a16(hybrid):
    k, r, d_in, d_out, g = 2, 8, 64, 48, 32
    packed, scale, zero = quant.quantize_int4_groupwise(torch.randn(d_out, d_in), g, False)
    x, _, b, (la, lb, ha, hb) = _case(k, r, d_in, d_out, 4 if hybrid else 0, (3, 2))
    dev = [t.to(DEVICE) for t in (packed, scale, zero)]
    y = gralora_w4a16_linear_triton(x, *dev, g, b, la, lb, ha, hb, 0.5)
    cpu = [None if t is None else t.cpu() for t in (la, lb, ha, hb)]
    ref = G.gralora_w4a16_linear_spec(x.cpu(), packed, scale, zero, g, b.cpu(), *cpu, 0.5)
    assert _rel(y.cpu(), ref) <= TOL


def _spec_grads(gy, x, w, xa, la, lb, ha, hb, s):
    """Gradients by autograd through the spec's plain ops (an independent path from both backwards)."""
    leaves = [
        t.detach().cpu().double().requires_grad_(True)
        for t in (x, la, lb) + ((ha, hb) if ha is not None else ())
    ]
    xa_leaf = None if xa is None else xa.detach().cpu().double().requires_grad_(True)
    h = (leaves[3], leaves[4]) if ha is not None else (None, None)
    adapter_in = leaves[0] if xa_leaf is None else xa_leaf
    y = leaves[0] @ w.cpu().double().t() + G.gralora_adapter_spec(
        adapter_in, leaves[1], leaves[2], *h, s
    )
    y.backward(gy.cpu().double())
    out = {"x": leaves[0].grad, "a": leaves[1].grad, "b": leaves[2].grad}
    if ha is not None:
        out.update(ha=leaves[3].grad, hb=leaves[4].grad)
    if xa_leaf is not None:
        out["xa"] = xa_leaf.grad
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("separate", [False, True], ids=["x", "x_adapter"])
def test_backward(case, separate):
    x, w, _, (la, lb, ha, hb) = _case(*case)
    xa = torch.randn_like(x) if separate else None
    gy = torch.randn(*x.shape[:-1], w.shape[0], device=DEVICE)
    has_h = ha is not None
    dx, dxa, da, db, dha, dhb = gralora_backward_triton(
        gy,
        x if xa is None else xa,
        w,
        la,
        lb,
        ha,
        hb,
        0.7,
        separate,
        (True, True, True, has_h, has_h, separate),
    )
    ref = _spec_grads(gy, x, w, xa, la, lb, ha, hb, 0.7)
    assert _rel(dx.cpu(), ref["x"].reshape(dx.shape)) <= TOL
    assert _rel(da.cpu(), ref["a"]) <= TOL
    assert _rel(db.cpu(), ref["b"]) <= TOL
    if has_h:
        assert _rel(dha.cpu(), ref["ha"]) <= TOL
        assert _rel(dhb.cpu(), ref["hb"]) <= TOL
    if separate:
        assert _rel(dxa.cpu(), ref["xa"].reshape(dxa.shape)) <= TOL


class _Ctx(SimpleNamespace):
    def save_for_backward(self, *t):
        self.saved_tensors = t


def test_grad_face_cuda_glue():
    """The op's CUDA grad branch (G._backward_cuda), driven through its setup_context with a
    stand-in ctx, equals the CPU grad branch (both branches of the same register_autograd)."""
    x, w, b, (la, lb, ha, hb) = _case(2, 8, 32, 48, 4, (2, 3))
    gy = torch.randn(2, 3, 48, device=DEVICE)
    inputs = (x, w, b, la, lb, ha, hb, 0.7, None)
    ctx = _Ctx(needs_input_grad=(True, False, True, True, True, True, True, False, False))
    G._setup_context(ctx, inputs, None)
    got = G._backward_cuda(ctx, gy, w)
    cpu_ctx = _Ctx(needs_input_grad=ctx.needs_input_grad)
    G._setup_context(
        cpu_ctx, tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs), None
    )
    want = G._backward(cpu_ctx, gy.cpu())
    want = (want[0], want[2], want[3], want[4], want[5], want[6], want[8])
    for a, b_ in zip(got, want, strict=True):
        assert (a is None) == (b_ is None)
        if a is not None:
            assert _rel(a.cpu(), b_) <= TOL


def test_bad_shapes_raise():
    x, w, b, (la, lb, _, _) = _case(2, 8, 32, 48, 0, (3,))
    with pytest.raises(KernelError, match="lora_b"):
        gralora_linear_triton(x, w, b, la, lb[:, :, :-1], None, None, 1.0)


def test_rank_above_tile_limit_declines():
    """Ranks above MAX_RANK: the kernels refuse (the CUDA face then uses the spec face)."""
    from qhl.codegen.triton.gralora import MAX_RANK, supports

    x, w, b, _ = _case(2, 8, 32, 48, 0, (3,))
    la = torch.randn(2, 16, 2 * MAX_RANK, device=DEVICE)
    lb = torch.randn(2, 2 * MAX_RANK, 24, device=DEVICE)
    assert not supports(la, None)
    with pytest.raises(KernelError, match="ranks above"):
        gralora_linear_triton(x, w, b, la, lb, None, None, 1.0)
