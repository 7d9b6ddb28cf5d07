"""Low-rank compression forms (issue 6): blocklr and lr-w4a16, every face and the pass.

(a) the math (qhl.codegen.lowrank): truncated SVD reproduces W at full rank; the budget's greedy
    rank choice keeps the largest sigma^2 across blocks, fits the budget, and beats a uniform
    rank of the same bytes; lr-w4a16 at rank 0 is plain w4a16; LQ-LoRA alternation never
    increases the error;
(b) the ops: spec vs a float64 dense reference, the grad face, opcheck, the Triton kernels vs
    the spec (interpreted on CPU);
(c) the pass: golden graph, bytes, idempotence, declined layers with their reasons, recipes;
(d) ONNX: a tiny model exported with each form runs in ONNX Runtime, cosine >= 0.9999.

Tolerances: the spec computes in float32 from float16-stored factors, the references in float64
from the same stored factors, so they differ by float32 rounding only: rtol 1e-5 / atol 1e-5 on
outputs of magnitude ~1-10 (K <= 128 terms). The full-rank SVD check is float64: 1e-10. The
Triton kernel sums in another order (fp32): atol 1e-4 for float32 inputs; float16 inputs and
outputs round to 11 bits: atol/rtol 1e-2.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import qhl
from qhl.codegen import lowrank, quant
from qhl.errors import RecipeError
from qhl.passes.canonicalize_matmuls import canonicalize_matmuls
from qhl.passes.quantize_linear import quantize_linear
from qhl.passes.select_layers import select_layers
from qhl.recipes import Recipe
from qhl_testing import call_targets, make_graph, run_graph

qops = torch.ops.qhl


def _recipe(form: str, **kw) -> Recipe:
    return qhl.recipe(form, **kw)


def _lowrankish(n: int, k: int, rank: int = 6, noise: float = 0.05) -> torch.Tensor:
    """A weight with a decaying spectrum (low rank plus noise), like trained weights."""
    return torch.randn(n, rank) @ torch.randn(rank, k) / rank**0.5 + noise * torch.randn(n, k)


# --- (a) the math ----------------------------------------------------------------------------


def test_truncated_svd_full_rank_reproduces_w():
    w = torch.randn(48, 80, dtype=torch.float64)
    a, b = lowrank.truncated_svd(w, 48)
    torch.testing.assert_close(a @ b, w, rtol=0, atol=1e-10)
    # blocklr at full rank in every block, float64 factors: W exactly (up to float64 rounding)
    ranks = lowrank.blocklr_ranks(w, 2, rank=1000)
    assert ranks == [24] * 4
    u, v = lowrank.blocklr_factorize(w, 2, ranks, dtype=torch.float64)
    torch.testing.assert_close(lowrank.blocklr_dense(u, v, ranks).double(), w, rtol=0, atol=1e-5)
    # (blocklr_dense returns float32: 1e-5 is float32 rounding of values ~ 1-10)


def test_budget_greedy_keeps_largest_energy_and_fits():
    w = torch.cat([_lowrankish(32, 64, 3, 0.01), 4 * _lowrankish(32, 64, 8, 0.2)])  # blocks differ
    k, budget = 2, 0.2
    ranks = lowrank.blocklr_ranks(w, k, budget=budget)
    n, kk = w.shape
    cost = 2 * (n // k + kk // k)
    limit = int(budget * 2 * n * kk)
    assert lowrank.blocklr_bytes(n, kk, k, ranks) <= limit < lowrank.blocklr_bytes(n, kk, k, ranks) + cost
    # the kept sigma^2 are the largest ones over all blocks
    blocks = [w[j * 32 : (j + 1) * 32, c * 32 : (c + 1) * 32] for j in range(2) for c in range(2)]
    sig = [torch.linalg.svdvals(b.double()) ** 2 for b in blocks]
    kept = torch.cat([s[:r] for s, r in zip(sig, ranks)])
    dropped = torch.cat([s[r:] for s, r in zip(sig, ranks)])
    assert kept.min() >= dropped.max() * (1 - 1e-9)  # ties only within float64 rounding
    assert len(set(ranks)) > 1  # the blocks got different ranks
    # and the greedy choice beats a uniform rank of (at most) the same bytes
    uniform = [sum(ranks) // (k * k)] * (k * k)

    def err(rk):
        u, v = lowrank.blocklr_factorize(w, k, rk, dtype=torch.float32)
        return (lowrank.blocklr_dense(u, v, rk) - w).pow(2).sum().item()

    assert err(ranks) < err(uniform)


def test_lr_w4a16_rank0_is_w4a16_and_alternation_does_not_hurt():
    w = _lowrankish(64, 128, 4, 0.1) + 3 * torch.randn(64, 128) * (torch.rand(64, 128) < 0.01)  # outliers
    l1, l2, p, s, z = lowrank.lr_w4a16_factorize(w, 0, 32)
    assert l1.shape == (64, 0) and l2.shape == (0, 128)
    p0, s0, z0 = quant.quantize_int4_groupwise(w, 32)
    assert torch.equal(p, p0) and torch.equal(s, s0) and torch.equal(z, z0)

    def err(iters):
        d = lowrank.lr_w4a16_dense(*lowrank.lr_w4a16_factorize(w, 8, 32, iters=iters), 32)
        return (d - w).pow(2).sum().item()

    e0, e3 = err(0), err(3)
    assert e3 <= e0
    assert e0 < (quant.dequantize_int4_groupwise(p0, s0, z0, 32) - w).pow(2).sum().item()  # rank 8 helps
    # bytes for a budget: the rank fills what the int4 residual leaves
    r = lowrank.lr_w4a16_rank_for_budget(64, 128, 32, 0.4)
    total = lowrank.int4_bytes(64, 128, 32) + 2 * r * (64 + 128)
    assert total <= 0.4 * 2 * 64 * 128 < total + 2 * (64 + 128)


# --- (b) the ops -----------------------------------------------------------------------------


def _blocklr_case(n=64, k_in=96, grid=2, ranks=None):
    w = _lowrankish(n, k_in, 5, 0.1)
    ranks = ranks or lowrank.blocklr_ranks(w, grid, budget=0.3)
    u, v = lowrank.blocklr_factorize(w, grid, ranks)
    return u, v, ranks, lowrank.blocklr_dense(u, v, ranks).double()


def _lr_case(n=48, k_in=128, g=32, rank=6):
    w = _lowrankish(n, k_in, 4, 0.1)
    t = lowrank.lr_w4a16_factorize(w, rank, g, iters=2)
    return t, lowrank.lr_w4a16_dense(*t, g).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocklr_spec_vs_dense_reference(dtype):
    u, v, ranks, wd = _blocklr_case(ranks=[3, 0, 17, 5])  # a rank-0 block too
    x = torch.randn(2, 3, 96).to(dtype)
    b = torch.randn(64)
    y = qops.blocklr_linear(x, u, v, ranks, b)
    assert y.dtype == dtype and y.shape == (2, 3, 64)
    ref = (x.double() @ wd.t() + b.double()).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lr_w4a16_spec_vs_dense_reference(dtype):
    t, wd = _lr_case()
    x = torch.randn(4, 128).to(dtype)
    y = qops.lr_w4a16_linear(x, *t, 32, None)
    ref = (x.double() @ wd.t()).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, ref, **tol)


def test_grad_faces_are_straight_through():
    """dx = dy @ W (the stored weight, frozen); db = the sum over tokens of dy."""
    u, v, ranks, wd = _blocklr_case(ranks=[2, 7, 0, 4])
    (l1, l2, p, s, z), wl = _lr_case()
    for op, args, w, k_in in (
        (qops.blocklr_linear, (u, v, ranks), wd, 96),
        (qops.lr_w4a16_linear, (l1, l2, p, s, z, 32), wl, 128),
    ):
        x = torch.randn(2, 5, k_in, requires_grad=True)
        b = torch.randn(w.shape[0], requires_grad=True)
        dy = torch.randn(2, 5, w.shape[0])
        op(x, *args, b).backward(dy)
        torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, dy.sum((0, 1)))


def test_opcheck():
    u, v, ranks, _ = _blocklr_case(ranks=[2, 7, 0, 4])
    (l1, l2, p, s, z), _ = _lr_case()
    torch.library.opcheck(qops.blocklr_linear.default, (torch.randn(2, 3, 96, requires_grad=True), u, v, ranks, torch.randn(64)))
    torch.library.opcheck(qops.blocklr_linear.default, (torch.randn(5, 96), u, v, ranks, None))
    torch.library.opcheck(
        qops.lr_w4a16_linear.default, (torch.randn(2, 3, 128, requires_grad=True), l1, l2, p, s, z, 32, torch.randn(48))
    )


_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_blocklr_vs_spec(dtype, bias):
    from qhl.codegen.blocklr import blocklr_linear_spec
    from qhl.codegen.triton.lowrank import blocklr_linear_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # N/k = 40 is not a multiple of BLOCK_N, rank 21 spans two BLOCK_R chunks, one block is rank 0
    u, v, ranks, _ = _blocklr_case(n=80, k_in=96, ranks=[21, 0, 3, 16])
    x = torch.randn(3, 7, 96).to(dtype)
    b = torch.randn(80).to(dtype) if bias else None
    want = blocklr_linear_spec(x, u, v, ranks, b)
    got = blocklr_linear_triton(x.to(dev), u.to(dev), v.to(dev), ranks, None if b is None else b.to(dev)).cpu()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(not _TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lr_w4a16_vs_spec(dtype):
    from qhl.codegen.lr_w4a16 import lr_w4a16_linear_spec
    from qhl.codegen.triton.lowrank import lr_w4a16_linear_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t, _ = _lr_case(n=48, k_in=128, g=32, rank=18)
    x = torch.randn(5, 128).to(dtype)
    b = torch.randn(48).to(dtype)
    want = lr_w4a16_linear_spec(x, *t, 32, b)
    got = lr_w4a16_linear_triton(x.to(dev), *(a.to(dev) for a in t), 32, b.to(dev)).cpu()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)


# --- (c) the pass ----------------------------------------------------------------------------


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 96)
        self.odd = torch.nn.Linear(96, 30, bias=False)  # 30 % 4 != 0, 96 % 64 != 0

    def forward(self, x):
        return self.odd(torch.relu(self.up(x)))


def _run_pass(recipe):
    torch.manual_seed(0)
    model = _Two().eval()
    with torch.no_grad():
        model.up.weight.copy_(_lowrankish(96, 64, 6, 0.05))
    x = torch.randn(2, 5, 64)
    gm = select_layers(canonicalize_matmuls(make_graph(model, x)).gm, recipe).gm
    res = quantize_linear(gm)
    infos = {i.path: i for i in (n.meta.get("qhl_matmul") for n in res.gm.graph.nodes) if i is not None}
    return model, x, res, infos


def test_pass_blocklr_golden_bytes_idempotent_declined():
    model, x, res, infos = _run_pass(_recipe("blocklr", lowrank_k=4, budget=0.3))
    assert res.stats == {"rewritten": 1, "declined": 1}
    assert call_targets(res.gm).count("qhl.blocklr_linear.default") == 1
    up = infos["up"]
    assert up.form == "blocklr" and up.reason is None
    node = next(n for n in res.gm.graph.nodes if "blocklr" in str(n.target))
    u, v = (getattr(res.gm, a.target) for a in node.args[1:3])
    ranks = node.args[3]
    assert len(ranks) == 16 and u.dtype == v.dtype == torch.float16 and u.shape == (sum(ranks), 24)
    assert up.weight_bytes_after == u.nbytes + v.nbytes == lowrank.blocklr_bytes(96, 64, 4, ranks)
    assert up.weight_bytes_after <= 0.3 * 2 * 96 * 64
    odd = infos["odd"]
    assert odd.form is None and "divisible by lowrank_k=4" in odd.reason and "N=30" in odd.reason
    # the graph computes the stored factors' math
    want = model.odd(torch.relu(x @ lowrank.blocklr_dense(u, v, ranks).t() + model.up.bias))
    torch.testing.assert_close(run_graph(res.gm)[0], want, rtol=1e-5, atol=1e-5)
    again = quantize_linear(res.gm)
    assert not again.changed and again.stats == {"rewritten": 0, "declined": 0}


def test_pass_lr_w4a16_golden_and_declined():
    model, x, res, infos = _run_pass(_recipe("lr-w4a16", group_size=64, rank=5, lowrank_iters=2))
    up, odd = infos["up"], infos["odd"]
    assert up.form == "lr-w4a16" and "not divisible by group_size=64" in odd.reason
    node = next(n for n in res.gm.graph.nodes if "lr_w4a16" in str(n.target))
    t = [getattr(res.gm, a.target) for a in node.args[1:6]]
    assert t[0].shape == (96, 5) and t[1].shape == (5, 64) and node.args[6] == 64
    assert up.weight_bytes_after == sum(a.nbytes for a in t) == lowrank.int4_bytes(96, 64, 64) + 2 * 5 * (96 + 64)
    want = model.odd(torch.relu(x @ lowrank.lr_w4a16_dense(*t, 64).t() + model.up.bias))
    torch.testing.assert_close(run_graph(res.gm)[0], want, rtol=1e-5, atol=1e-5)
    # a budget below the int4 residual's own bytes is declined with the numbers
    _, _, _, infos = _run_pass(_recipe("lr-w4a16", group_size=64, budget=0.2))
    assert "smaller than the int4 residual alone" in infos["up"].reason


def test_recipe_knobs_validate():
    with pytest.raises(RecipeError, match="one of budget"):
        _recipe("blocklr", budget=0.2, rank=4)
    with pytest.raises(RecipeError, match="group_size=100"):
        _recipe("lr-w4a16", group_size=100)
    assert _recipe("lr-w4a16", group_size=192).group_size == 192
    r = _recipe("blocklr", budget=0.2, lowrank_k=3)
    assert Recipe.from_json(r.to_json()) == r
    assert r.layer_knobs("x.up")[0]["lowrank_k"] == 3


def test_inspect_report_shows_bytes_and_sqnr():
    model = _Two().eval()
    rep = qhl.inspect(model, (torch.randn(2, 5, 64),), recipe=_recipe("blocklr", lowrank_k=2, rank=8))
    row = next(r for r in rep.layers if r.path == "up")
    assert row.form == "blocklr" and row.sqnr_db is not None and np.isfinite(row.sqnr_db)
    assert row.weight_bytes_after == 2 * 4 * 8 * (48 + 32) < row.weight_bytes_before
    assert "blocklr" in str(rep)


# --- (d) ONNX --------------------------------------------------------------------------------


@pytest.mark.parametrize("form,kw", [("blocklr", dict(lowrank_k=2, budget=0.3)), ("lr-w4a16", dict(group_size=32, rank=4))])
def test_onnx_export_runs_in_ort(form, kw, tmp_path):
    pytest.importorskip("onnxruntime")
    from qhl.onnx_export import export_onnx
    from qhl.runtime import ort as qort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(2, 8, 64)
    res = export_onnx(model, (x,), tmp_path / f"{form}.onnx", recipe=_recipe(form, **kw))
    assert sum(1 for r in res.report.layers if r.form == form) == 2
    assert {"MatMul"} <= set(res.ops)
    gm = res.report.graph_module
    cmp = qort.compare(res.path, gm, (torch.randn(3, 5, 64),))
    assert cmp["cosine"] >= 0.9999, cmp
    if form == "lr-w4a16":
        assert "DequantizeLinear" in res.ops
        ort_res = export_onnx(model, (x,), tmp_path / f"{form}_ort.onnx", recipe=_recipe(form, **kw), target="onnxruntime")
        assert "com.microsoft::MatMulNBits" in ort_res.ops
        assert qort.compare(ort_res.path, ort_res.report.graph_module, (torch.randn(3, 5, 64),))["cosine"] >= 0.9999
