"""qhl.hadamard (the matrices) and the qhl::hadamard / qhl::hadamard_quantize_per_token ops.

What is checked, and the tolerances:

* Orthonormality, float64, max |H Hᵀ - I| <= 1e-6 (the issue's bound; the builds reach ~1e-15).
  Every K factor of every supported size <= 16384 is checked exactly (integer ±1, H Hᵀ = K I).
  Dense H Hᵀ for every supported n <= 512, every power of two <= 2048, and 576 and 1536. Dense checks of all 574 sizes would be ~3 TFLOP in float64 and
  n = 16384 alone 2 GiB, too slow and big for CI, so for EVERY other supported n <= 16384
  four random rows R of H are built from the factors (row r = H_K[r // P] ⊗ H_P[r % P] / sqrt n)
  and R Hᵀ = the matching rows of I is checked through the spec's transposed transform in
  float64: a row sample of the same identity, through an independent code path.
* Spec vs x @ hadamard_matrix(n): 1e-10 absolute in float64 (values O(1), log2 n + K adds);
  1e-5 in float32 (float32 eps 1.2e-7 times ~log2 n + sqrt(K) growth, with margin).
* Triton (interpreter) vs spec: 1e-5 absolute in float32 (different summation order). Fused
  quantization: scales to 1e-6 relative, codes equal except at most 1 code step at a
  round-half tie (different float32 rounding of y), on at most 1 % of the entries.
* ONNX Runtime vs spec: 1e-5 absolute (float32); codes as for Triton.
"""
from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import qhl
import qhl.codegen  # noqa: F401  (registers the ops)
from qhl import hadamard as hlib
from qhl.codegen import quant
from qhl.codegen.hadamard import hadamard_quantize_per_token_spec, hadamard_spec
from qhl.errors import UnsupportedError

SIZES_ALL = hlib.supported_sizes(16384)
K_LIST = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
# Orders with no Paley construction: qhl builds them from torchao's matrices, so only where torchao
# is installed (the test extra installs it; a GPU machine's own Python may not have it).
TORCHAO_ONLY = (156, 172)
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
_needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="order 156/172 is built from torchao's matrices")
SPEC_SIZES = tuple(pytest.param(n, marks=_needs_torchao) if n in TORCHAO_ONLY else n for n in (
    1, 2, 4, 12, 16, 20, 24, 28, 36, 40, 52, 60, 108, 140, 156, 172, 384, 576, 768, 1536, 4096, 5120, 11008))


def _eye_err(h: torch.Tensor) -> float:
    return (h @ h.T - torch.eye(h.shape[0], dtype=h.dtype)).abs().max().item()


# --- the matrices ------------------------------------------------------------------------------

def test_required_sizes_build():
    for k in K_LIST:
        assert hlib.can_build(k) == (HAVE_TORCHAO or k not in TORCHAO_ONLY), k
        for m in range(1, 7):  # 312 and 344 are Paley I: k·2^m builds without torchao for m >= 1
            assert hlib.can_build(k << m), (k, m)
    plan_11008 = (172, 64) if HAVE_TORCHAO else (344, 32)
    for n, plan in {576: (36, 16), 1536: (12, 128), 11008: plan_11008, 14336: (28, 512),
                    4096: (1, 4096), 5120: (20, 256)}.items():
        assert hlib.hadamard_plan(n) == plan
    assert 16384 in SIZES_ALL and len(SIZES_ALL) > 500


def test_every_k_factor_is_exactly_hadamard():
    ks = sorted({hlib.hadamard_plan(n)[0] for n in SIZES_ALL} | {k for k in K_LIST if hlib.can_build(k)})
    for k in ks:
        h = hlib.hadamard_factor(k, torch.float32)  # ±1 sums of k <= 1024 terms: exact in float32
        assert bool((h.abs() == 1).all()), k
        assert torch.equal(h @ h.T, k * torch.eye(k)), k


def _dense_sizes() -> list[int]:
    """Every supported n <= 512 (so every K <= 512 at its own size), powers of two <= 2048, and
    the issue's 576 and 1536 (the larger K are checked exactly as integer factors, and by rows)."""
    return sorted({n for n in SIZES_ALL if n <= 512} | {1 << i for i in range(12)} | {576, 1536})


def test_orthonormal_dense_float64():
    worst = 0.0
    for n in _dense_sizes():
        err = _eye_err(hlib.hadamard_matrix(n, torch.float64))
        assert err <= 1e-6, n
        worst = max(worst, err)
    assert worst < 1e-12  # the builds are exact up to the 1/sqrt(n) rounding


def _sylvester_row(p: int, i: int) -> torch.Tensor:
    """Row i of Sylvester's H_p, (-1)^popcount(i & j), without forming H_p."""
    bits = torch.arange(p) & i
    parity = torch.zeros(p, dtype=torch.int64)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float64)


def test_sylvester_rows_match_factor():
    h = hlib.hadamard_factor(64, torch.float64)
    assert all(torch.equal(_sylvester_row(64, i), h[i]) for i in range(64))


def test_orthonormal_large_sizes_by_rows():
    rng = random.Random(0)
    dense = set(_dense_sizes())
    for n in (n for n in SIZES_ALL if n not in dense):
        k, p = hlib.hadamard_plan(n)
        hk = hlib.hadamard_factor(k, torch.float64)
        rows = sorted(rng.sample(range(n), 4))
        r = torch.stack([torch.kron(hk[i // p], _sylvester_row(p, i % p)) for i in rows]) / n**0.5
        got = hadamard_spec(r, transpose=True, fp32=False)  # R Hᵀ
        want = torch.zeros(4, n, dtype=torch.float64)
        want[range(4), rows] = 1.0
        assert (got - want).abs().max().item() <= 1e-6, n


def test_matrix_structure_and_dtype():
    h = hlib.hadamard_matrix(24, torch.float64)
    want = torch.kron(hlib.hadamard_factor(12, torch.float64), hlib.hadamard_factor(2, torch.float64)) / 24**0.5
    assert torch.equal(h, want)
    assert qhl.hadamard_matrix(16).dtype == torch.float32
    assert "hadamard_matrix" in qhl.__all__
    hlib.hadamard_matrix(16, torch.float64).zero_()  # callers get a copy, the cache is untouched
    assert _eye_err(hlib.hadamard_matrix(16, torch.float64)) < 1e-12


@pytest.mark.parametrize("n, below, above", [(6, 4, 8), (22, 20, 24), (92, 88, 96)])
def test_unbuildable_size_names_neighbours(n, below, above):
    assert not hlib.can_build(n)
    with pytest.raises(ValueError, match=rf"{below} below and {above} above"):
        hlib.hadamard_matrix(n)
    with pytest.raises(ValueError):
        hlib.hadamard_plan(n)


def test_block_fallback_and_signs():
    assert [hlib.block_fallback(n) for n in (48, 96, 12288, 1000, 100, 8)] == [16, 32, 256, None, None, None]
    assert hlib.block_fallback(92 * 16) == 64 and hlib.block_fallback(1 << 20) == 256
    s = hlib.random_signs(1000, 3)
    assert s.dtype == torch.float32 and set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, hlib.random_signs(1000, 3)) and not torch.equal(s, hlib.random_signs(1000, 4))


def test_torchao_matrices_are_hadamard_too():
    tao = pytest.importorskip("torchao.prototype.spinquant._hadamard_matrices")
    for k in K_LIST:
        getter = getattr(tao, f"get_had{k}", None)
        if getter is None:
            continue
        theirs = getter().to(torch.float64)
        ours = hlib.hadamard_factor(k, torch.float64)
        for h in (theirs, ours):  # different matrices are fine; both must be Hadamard
            assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), k


# --- the op: spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SPEC_SIZES)
def test_spec_equals_dense_matmul(n):
    torch.manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64)
    if n <= 2048:
        m = hlib.hadamard_matrix(n, torch.float64)
        want, want_t = x @ m, x @ m.T
    else:  # the same product through the two dense factors (no n×n matrix in memory)
        k, p = hlib.hadamard_plan(n)
        hk, hp = hlib.hadamard_factor(k, torch.float64), hlib.hadamard_factor(p, torch.float64)
        xr = x.reshape(3, k, p)
        want = torch.einsum("rip,ij,pq->rjq", xr, hk, hp).reshape(3, n) / n**0.5
        want_t = torch.einsum("rip,ji,pq->rjq", xr, hk, hp).reshape(3, n) / n**0.5
    assert (hadamard_spec(x, fp32=False) - want).abs().max().item() <= 1e-10
    assert (hadamard_spec(x, transpose=True, fp32=False) - want_t).abs().max().item() <= 1e-10
    y32 = torch.ops.qhl.hadamard(x.float())
    assert y32.dtype == torch.float32
    assert (y32.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n, b", [(96, 16), (96, 32), (96, 12), (96, 24), (96, 48), (96, 96), (576, 64),
                                  (2048, 256), (1536, 128)])
def test_spec_block_diagonal(n, b):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    m = torch.kron(torch.eye(n // b, dtype=torch.float64), hlib.hadamard_matrix(b, torch.float64))
    assert (hadamard_spec(x, b, fp32=False) - x @ m).abs().max().item() <= 1e-10
    y = hadamard_spec(x, b, fp32=False)
    assert (hadamard_spec(y, b, transpose=True, fp32=False) - x).abs().max().item() <= 1e-10


@pytest.mark.parametrize("rows", [1, 16, 17, 200])  # <= 16 transforms: two GEMMs; more: butterflies
@pytest.mark.parametrize("n, b", [(576, 0), (4096, 0), (1536, 128)])
def test_spec_formulations_by_row_count(rows, n, b):
    """Both CPU formulations of the 2^m part (codegen/hadamard.py picks by the number of
    transforms) equal the dense product, forward and transposed."""
    torch.manual_seed(rows)
    x = torch.randn(rows, n, dtype=torch.float64)
    size = b or n
    m = torch.kron(torch.eye(n // size, dtype=torch.float64), hlib.hadamard_matrix(size, torch.float64))
    assert (hadamard_spec(x, b, fp32=False) - x @ m).abs().max().item() <= 1e-10
    assert (hadamard_spec(x, b, transpose=True, fp32=False) - x @ m.T).abs().max().item() <= 1e-10
    assert (torch.ops.qhl.hadamard(x.float(), b).double() - x @ m).abs().max().item() <= 1e-5


def test_dtypes_and_bad_blocks():
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    ref = x.double() @ hlib.hadamard_matrix(96, torch.float64)
    y32 = torch.ops.qhl.hadamard(x)  # fp32=True: float32 inside, bf16 out
    ylo = torch.ops.qhl.hadamard(x, 0, False, False)  # computed in bf16
    assert y32.dtype == ylo.dtype == torch.bfloat16
    assert (y32.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # one bf16 rounding
    assert (ylo.double() - ref).abs().max() <= 2 ** -4 * ref.abs().max()  # log2 n bf16 roundings
    with pytest.raises(UnsupportedError, match="divisor"):
        torch.ops.qhl.hadamard(x, 7)
    with pytest.raises(UnsupportedError, match="22 below|cannot build"):
        torch.ops.qhl.hadamard(torch.randn(2, 22))
    assert torch.ops.qhl.hadamard(torch.randn(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("n, b, transpose", [(24, 0, False), (24, 0, True), (32, 16, False), (40, 0, True)])
def test_gradcheck(n, b, transpose):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.qhl.hadamard(t, b, transpose, False), (x,))


def test_opcheck():
    x = torch.randn(2, 3, 48)
    torch.library.opcheck(torch.ops.qhl.hadamard.default, (x, 0, False, True))
    torch.library.opcheck(torch.ops.qhl.hadamard.default, (x.requires_grad_(), 16, True, True))
    torch.library.opcheck(torch.ops.qhl.hadamard_quantize_per_token.default, (x.detach(), 0, 4),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# --- the fused quantizing op ----------------------------------------------------------------------

@pytest.mark.parametrize("block", [0, 16, -1])
def test_fused_quant_is_quantize_of_hadamard(block):
    torch.manual_seed(1)
    x = torch.randn(5, 96) * 3
    x[1] = 0  # all-zero row: scale 1, codes 0
    x[2, 7] = 40.0  # an outlier channel
    v = x if block == -1 else hadamard_spec(x, block)
    q8, s8 = torch.ops.qhl.hadamard_quantize_per_token(x, block, 8)
    wq, ws = quant.quantize_per_token(v)
    assert torch.equal(q8, wq) and torch.equal(s8, ws)
    q4, s4 = torch.ops.qhl.hadamard_quantize_per_token(x, block, 4)
    s_want = torch.where(v.abs().amax(-1, keepdim=True) > 0, v.abs().amax(-1, keepdim=True) / 7, 1.0)
    assert torch.equal(s4, s_want)
    assert torch.equal(q4, torch.round(v / s_want).clamp(-7, 7).to(torch.int8))
    assert q4.abs().max() <= 7 and torch.equal(s4[1], torch.ones(1)) and not q4[1].any()
    with pytest.raises(UnsupportedError, match="bits"):
        torch.ops.qhl.hadamard_quantize_per_token(x, 0, 3)


@pytest.mark.parametrize("rows, n, b", [(1, 576, 0), (3, 576, 64), (1, 1536, 0), (40, 576, 0), (2, 96, 12)])
def test_decomposed_rotation_is_the_spec_bit_for_bit(rows, n, b):
    """rotate_rows_decomposed (the rotated w4a8/w4a4 prologue in Inductor's graph) traces under
    fake tensors into functional aten ops with the ±1 factors as constants, and computes the
    spec's floats bit for bit: eagerly, and compiled by Inductor (the tiny K stage sums in
    float64, exactly, so that eager torch.sum's order and Inductor's give the same floats)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qhl.codegen.hadamard import rotate_rows_decomposed

    x = torch.randn(rows, n) * 3
    ref = hadamard_spec(x, b)
    assert torch.equal(rotate_rows_decomposed(x, b), ref)
    gm = make_fx(lambda t: rotate_rows_decomposed(t, b), tracing_mode="fake")(x)
    assert not [nd for nd in gm.graph.nodes if nd.op == "call_function" and nd.target._schema.is_mutable]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(gm, backend="inductor")(x), ref)


@pytest.mark.parametrize("shape, b, bits", [((1, 576), 0, 8), ((2, 3, 1536), 0, 4), ((5, 576), 64, 8), ((2, 64), -1, 4)])
def test_decomposed_fused_quant_is_the_spec_bit_for_bit(shape, b, bits):
    """hadamard_quantize_per_token_decomposed (Inductor's lowering of the rotated prologue) gives
    the spec's codes and scales bit for bit, eagerly and traced under fake tensors; a symbolic
    token count declines (the op stays a call)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qhl.codegen.hadamard import hadamard_quantize_per_token_decomposed as decomposed

    torch.manual_seed(5)
    x = torch.randn(*shape) * 3
    x[..., 1] = 40.0
    want = hadamard_quantize_per_token_spec(x, b, bits)
    got = decomposed(x, b, bits)
    assert got[0].dtype == torch.int8 and got[0].shape == x.shape and got[1].shape == (*shape[:-1], 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gm = make_fx(lambda t: decomposed(t, b, bits), tracing_mode="fake")(x)
    traced = gm(x)
    assert torch.equal(traced[0], want[0]) and torch.equal(traced[1], want[1])
    seen = []
    make_fx(lambda t: seen.append(decomposed(t, b, bits)), tracing_mode="symbolic")(x)
    assert seen == [NotImplemented]


@pytest.mark.parametrize("n, b, transpose", [(576, 0, False), (576, 0, True), (1536, 128, False)])
def test_hadamard_decomposition_in_inductors_graph(n, b, transpose):
    """hadamard_decomposed: the spec bit for bit, eagerly and compiled by Inductor; declines
    (NotImplemented) a computation in another dtype than float32."""
    from qhl.codegen.hadamard import hadamard_decomposed

    x = torch.randn(2, n)
    want = hadamard_spec(x, b, transpose)
    assert torch.equal(hadamard_decomposed(x, b, transpose), want)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(lambda t: hadamard_decomposed(t, b, transpose), backend="inductor")(x), want)
    xb = x.bfloat16()  # computed in float32 (fp32=True), returned in x's dtype, as the spec
    assert torch.equal(hadamard_decomposed(xb, b, transpose), hadamard_spec(xb, b, transpose))
    assert hadamard_decomposed(xb, b, transpose, False) is NotImplemented


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_quant_cpu_face_is_the_spec(bits):
    """The CPU face quantizes with the Inductor-fused loop (codegen/cpu_fused.py; its tests cover
    .5 ties): the same codes and scales as the spec, on a 3-D input with a zero row."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64) * 3
    x[1, 1] = 0
    x[0, 2, 5] = 40.0
    got = torch.ops.qhl.hadamard_quantize_per_token(x, 0, bits)
    want = hadamard_quantize_per_token_spec(x, 0, bits)
    assert got[0].shape == (2, 3, 64) and got[1].shape == (2, 3, 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rotation_spreads_outlier():
    # the point of the rotation: an outlier channel no longer sets the whole row's 4-bit scale
    torch.manual_seed(2)
    x = torch.randn(64, 512)
    x[:, 3] *= 50
    err = {}
    for block in (-1, 0):
        q, s = hadamard_quantize_per_token_spec(x, block, 4)
        v = q.float() * s
        y = v if block == -1 else hadamard_spec(v, 0, transpose=True)
        err[block] = ((y - x).norm() / x.norm()).item()
    assert err[0] < 0.5 * err[-1]


# --- the Triton kernels (interpreter) -------------------------------------------------------------

def _triton():
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU and TRITON_INTERPRET != 1")
    from qhl.codegen.triton import hadamard as th

    return th


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n, b", [(12, 0), (16, 0), (96, 0), (96, 16), (128, 32), (576, 0), (1024, 0)])
def test_triton_hadamard_matches_spec(n, b):
    th = _triton()
    torch.manual_seed(n + b)
    x = torch.randn(3, n, device=_dev())
    for transpose in (False, True):
        want = hadamard_spec(x.cpu(), b, transpose)
        got = th.hadamard_triton(x, b, transpose).cpu()
        assert (got - want).abs().max().item() <= 1e-5, (n, b, transpose)
    xh = x.to(torch.float16)
    got = th.hadamard_triton(xh, b).cpu()
    assert got.dtype == torch.float16
    assert (got.float() - hadamard_spec(xh.cpu(), b).float()).abs().max().item() <= 2e-3 * 4


@pytest.mark.parametrize("n, b, bits", [(96, 0, 4), (96, 16, 8), (576, 0, 4), (64, -1, 8)])
def test_triton_fused_quant_matches_spec(n, b, bits):
    th = _triton()
    torch.manual_seed(7)
    x = torch.randn(6, n, device=_dev()) * 2
    x[0] = 0
    q, s = th.hadamard_quantize_triton(x, b, bits)
    wq, ws = hadamard_quantize_per_token_spec(x.cpu(), b, bits)
    assert torch.allclose(s.cpu(), ws, rtol=1e-6, atol=0)
    diff = (q.cpu().int() - wq.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


def test_triton_rejects_bad_input():
    th = _triton()
    from qhl.errors import KernelError

    with pytest.raises(KernelError, match="MAX_N"):
        th.hadamard_triton(torch.randn(1, 32768, device=_dev()))
    with pytest.raises(KernelError):
        th.hadamard_triton(torch.randint(0, 3, (2, 16), device=_dev()))


# --- ONNX ------------------------------------------------------------------------------------------

class _Rotate(nn.Module):
    def __init__(self, block: int, transpose: bool):
        super().__init__()
        self.block, self.transpose = block, transpose

    def forward(self, x):
        return torch.ops.qhl.hadamard(x, self.block, self.transpose, True)


class _RotQuant(nn.Module):
    def forward(self, x):
        return torch.ops.qhl.hadamard_quantize_per_token(x, 0, 4)


def _export(module, x, path):
    from qhl.codegen.onnx import TRANSLATIONS

    program = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=21, verbose=False,
                                custom_translation_table=TRANSLATIONS,
                                dynamic_shapes=({0: torch.export.Dim.AUTO},))
    program.save(str(path))
    from qhl.runtime import ort as qort

    return qort.session(path)


@pytest.mark.parametrize("formulation", ["butterfly", "kron", "matmul"])
@pytest.mark.parametrize("n, block, transpose", [(96, 0, False), (96, 16, True), (64, 0, True), (1536, 0, True),
                                                 (512, 128, False)])
def test_onnx_hadamard_matches_spec(formulation, n, block, transpose, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from qhl.codegen.onnx import hadamard as oh

    monkeypatch.setattr(oh, "FORMULATION", formulation)
    sess = _export(_Rotate(block, transpose), torch.randn(2, n), tmp_path / "h.onnx")
    x = torch.randn(5, n)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, hadamard_spec(x, block, transpose).numpy(), atol=1e-5, rtol=0)


def test_onnx_fused_quant_matches_spec(tmp_path):
    pytest.importorskip("onnxruntime")
    sess = _export(_RotQuant(), torch.randn(2, 96), tmp_path / "hq.onnx")
    x = torch.randn(7, 96) * 3
    x[2] = 0
    q, s = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    wq, ws = hadamard_quantize_per_token_spec(x, 0, 4)
    np.testing.assert_allclose(s, ws.numpy(), rtol=1e-6)
    diff = np.abs(q.astype(np.int32) - wq.numpy().astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_onnx_bad_formulation_is_refused():
    from qhl.codegen.onnx import hadamard as oh

    assert oh.FORMULATION == "kron"  # measured fastest in ORT (benchmarks/results/hadamard_onnx_choice.md)
    with pytest.raises(UnsupportedError, match="formulation 'fast'"):
        oh._choose(64, "fast")


def test_onnx_ops_listed():
    from qhl.codegen.onnx import ops_for_form

    assert "MatMul" in ops_for_form("hadamard") and "Split" not in ops_for_form("hadamard")
    assert "QuantizeLinear" in ops_for_form("hadamard_quantize_per_token")


@pytest.mark.parametrize("n", (0, -4))
def test_non_positive_size_says_so(n):
    with pytest.raises(ValueError, match="must be a positive integer"):
        hlib.hadamard_matrix(n)
