"""The Triton kernel face of qhl::w8a8_tensor_linear (codegen/triton/w8a8_tensor.py) against its
spec face (codegen/w8a8_tensor.py).

Runs natively on CUDA; without CUDA, under Triton's CPU interpreter (TRITON_INTERPRET=1, set
below before any kernel module is imported, because @triton.jit reads it at decoration time).
Shapes are small: the interpreter costs ~2 ms per (program, k-step).

(a) the quantize prologue (min/max partials, scale, quantize) gives q, s and z bit-identical to
    quantize_per_tensor_u8, on one-sided, all-zero, constant and tie inputs, with several partial
    blocks, a K tail and a K loop;
(b) the linear matches w8a8_tensor_linear_spec. Tolerance: the codes are bit-exact (a), the
    int32 GEMM and its zero-point correction are exact, and the epilogue does the spec's float32
    ops in its order, except that a GPU may fuse the bias add into an FMA (<= 1 float32 ulp
    before the final rounding). So rtol 1e-5 for float32 outputs, and one ulp (the dtype's eps)
    of the output dtype for fp16/bf16, where that float32 ulp can flip the last bit; atol is the
    same fraction of max|ref|, for outputs near zero after cancellation. Under the interpreter
    there is no FMA, so there the result must be bit-identical. K stays <= 128 here so that the
    spec's own GEMM is exact on every CPU plan: its float32 plan (AVX2 only) sums integers below
    255 * 127 * 128 < 2**24 exactly;
(c) the wrapper's validation, the block-size check, the rendered text, and that the rendered
    kernels compile for sm_80 / sm_90 (needs Triton's ptxas, not a GPU).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import qhl  # noqa: E402
from qhl.codegen import quant  # noqa: E402
from qhl.codegen.triton import emit  # noqa: E402
from qhl.codegen.triton import w8a8_tensor as tw  # noqa: E402
from qhl.codegen.triton.w8a8_tensor import (  # noqa: E402
    per_tensor_quant_u8,
    w8a8_tensor_linear_triton,
)
from qhl.codegen.w8a8_tensor import quantize_per_tensor_u8, w8a8_tensor_linear_spec  # noqa: E402
from qhl.errors import KernelError  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILY = "w8a8-tensor"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- (a) the quantize prologue: q, s, z bit-identical to the spec ---


def _ties(lo: float, hi: float) -> torch.Tensor:
    """A row [lo, hi, k + 0.5 ...] whose range gives s = 1: every k + 0.5 is a tie of x / s."""
    assert hi - lo == 255
    return torch.tensor([[lo, hi, *[k + 0.5 for k in range(int(lo), int(hi))]]])


_GEN = torch.Generator().manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=_GEN)


QUANT_CASES = {
    # name: (x, dtype); with K = 40 a prologue block holds 64 rows, with K = 1100 it holds 4
    "gaussian": (_randn(3, 40) * 3, torch.float32),
    "scaled up": (_randn(3, 40) * 1e3, torch.float32),
    "scaled down": (_randn(3, 40) * 1e-3, torch.float32),
    "all positive": (_randn(5, 40).abs() + 0.5, torch.float32),  # lo = 0: z = 0
    "all negative": (-_randn(5, 40).abs() - 0.5, torch.float32),  # hi = 0: z = 255
    "all zero": (torch.zeros(4, 40), torch.float32),  # hi == lo: s = 1, z = 0
    "one value": (torch.full((4, 8), 3.0), torch.float32),
    "several blocks": (_randn(130, 40), torch.float32),  # 3 partials, the last one partial
    "K loop and tail": (_randn(9, 1100), torch.float32),  # BLOCK_K 1024: 2 K steps, 3 partials
    "float16 3-D": (_randn(2, 3, 96) * 4, torch.float16),
    "bfloat16": (_randn(6, 64) * 4, torch.bfloat16),
    # s = 1 and the codes hit every .5 tie; z = 100 (no tie) and z = round(100.5) = 100,
    # round(101.5) = 102 (ties to even)
    "ties": (_ties(-100.0, 155.0), torch.float32),
    "tie zero point down": (_ties(-100.5, 154.5), torch.float32),
    "tie zero point up": (_ties(-101.5, 153.5), torch.float32),
}


def _check_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, s, z = per_tensor_quant_u8(x)
    q_ref, s_ref, z_ref = quantize_per_tensor_u8(x.cpu())
    assert q.shape == x.shape and q.dtype == torch.uint8
    assert s.shape == () and s.dtype == torch.float32 and z.shape == () and z.dtype == torch.float32
    assert torch.equal(s.cpu(), s_ref), (s.item(), s_ref.item())
    assert torch.equal(z.cpu(), z_ref), (z.item(), z_ref.item())
    assert torch.equal(q.cpu(), q_ref), (q.cpu().int() - q_ref.int()).abs().max()
    return q.cpu(), s.cpu(), z.cpu()


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_quantize_prologue_is_bit_exact(name):
    x, dtype = QUANT_CASES[name]
    _check_quant(x.to(dtype).to(DEVICE))


def test_quantize_prologue_edges_land_where_onnx_puts_them():
    _, s, z = _check_quant(QUANT_CASES["all zero"][0].to(DEVICE))
    assert s.item() == 1.0 and z.item() == 0.0
    _, _, z = _check_quant(QUANT_CASES["all positive"][0].to(DEVICE))
    assert z.item() == 0.0
    _, _, z = _check_quant(QUANT_CASES["all negative"][0].to(DEVICE))
    assert z.item() == 255.0
    q, s, z = _check_quant(QUANT_CASES["ties"][0].to(DEVICE))
    assert s.item() == 1.0 and z.item() == 100.0
    # -99.5 -> -100, -98.5 -> -98, -97.5 -> -98, -96.5 -> -96 (half to even), then + z
    assert q[0, 2:6].tolist() == [0, 2, 2, 4]
    assert _check_quant(QUANT_CASES["tie zero point down"][0].to(DEVICE))[2].item() == 100.0
    assert _check_quant(QUANT_CASES["tie zero point up"][0].to(DEVICE))[2].item() == 102.0


def test_scale_kernel_reduces_partials_over_several_steps(monkeypatch):
    """The final reduce loops over the partials BLOCK_P at a time: with BLOCK_P = 2 and 3
    partials it takes a full step and a masked one, and the extremes sit in the last partial."""
    monkeypatch.setattr(tw, "BLOCK_P", 2)
    monkeypatch.setattr(emit, "_LOADED", {})  # render again with the patched constant
    x = torch.randn(130, 40)
    x[-1, 0], x[-1, 1] = -7.0, 9.0
    _check_quant(x.to(DEVICE))
    assert "BLOCK_P: tl.constexpr = 2" in emit.render(emit.make_spec(FAMILY, 40, 16))


# --- (b) the linear against the spec ---

GEMM_CASES = [
    # (x shape, N, dtype, bias): BLOCK_K = 64 unless K <= 32, BLOCK_N = min(next_pow2(N), 64)
    ((3, 40), 24, torch.float32, True),  # K tail, N tail
    ((1, 96), 33, torch.float16, False),  # M = 1, K tail over 2 K steps, N tail
    ((2, 3, 64), 24, torch.float16, True),  # 3-D x
    ((70, 40), 33, torch.bfloat16, True),  # M > BLOCK_M = 64: 2 M blocks
    ((5, 128), 80, torch.bfloat16, False),  # 2 N blocks, the second partial; BLOCK_K divides K
    ((70, 40), 24, torch.float32, False),
]


def _linear_case(x: torch.Tensor, N: int, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(N, K)))
    bias = torch.randn(N).to(x.dtype).to(DEVICE) if with_bias else None
    y = w8a8_tensor_linear_triton(x, wq, ws, bias)
    ref = w8a8_tensor_linear_spec(x.cpu(), wq.cpu(), ws.cpu(), None if bias is None else bias.cpu())
    assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
    _assert_matches(y.cpu(), ref)
    return y, ref


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    eps = 1e-5 if y.dtype == torch.float32 else torch.finfo(y.dtype).eps
    torch.testing.assert_close(y, ref, rtol=eps, atol=eps * ref.float().abs().max().item())
    if DEVICE == "cpu":  # the interpreter fuses nothing: the spec's float ops, bit for bit
        assert torch.equal(y, ref)


@pytest.mark.parametrize("x_shape, N, dtype, with_bias", GEMM_CASES)
def test_linear_matches_spec(x_shape, N, dtype, with_bias):
    _linear_case(torch.randn(x_shape).to(dtype).to(DEVICE), N, with_bias)


def test_linear_one_sided_and_strided_activations():
    # post-ReLU activations: lo = 0, so z = 0 and the correction is 128 * colsum
    x = torch.randn(6, 40).relu().to(DEVICE)
    _linear_case(x, 24, True)
    # a non-contiguous x (every other column): the kernels read it through its strides
    x = torch.randn(6, 80, dtype=torch.float16).to(DEVICE)[:, ::2]
    assert not x.is_contiguous()
    _linear_case(x, 24, False)


def test_linear_of_no_tokens_is_empty():
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(24, 40)))
    y = w8a8_tensor_linear_triton(torch.empty(0, 5, 40, device=DEVICE), wq, ws)
    assert y.shape == (0, 5, 24)


@pytest.mark.skipif(DEVICE != "cuda", reason="the op dispatches to the Triton kernel on CUDA only")
def test_cuda_op_runs_the_triton_kernel():
    x = torch.randn(4, 64, device=DEVICE)
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(24, 64)))
    b = torch.randn(24, device=DEVICE)
    y = torch.ops.qhl.w8a8_tensor_linear(x, wq, ws, b)
    torch.testing.assert_close(y, w8a8_tensor_linear_triton(x, wq, ws, b), rtol=0, atol=0)
    _assert_matches(y.cpu(), w8a8_tensor_linear_spec(x.cpu(), wq.cpu(), ws.cpu(), b.cpu()))


# --- (c) validation and codegen ---


def test_wrapper_validates_its_inputs():
    x = torch.randn(3, 64, device=DEVICE)
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(24, 64)))
    with pytest.raises(KernelError, match="w_int8 must be torch.int8"):
        w8a8_tensor_linear_triton(x, wq.float(), ws)
    with pytest.raises(KernelError, match="w_int8 must be torch.int8"):
        w8a8_tensor_linear_triton(x, wq.view(torch.uint8), ws)
    with pytest.raises(KernelError, match=r"x must be \[..., K=64\]"):
        w8a8_tensor_linear_triton(x[:, :40], wq, ws)
    with pytest.raises(KernelError, match=r"bias must have shape \[24\]"):
        w8a8_tensor_linear_triton(x, wq, ws, torch.randn(3, device=DEVICE))
    with pytest.raises(KernelError, match="non-empty"):
        per_tensor_quant_u8(torch.empty(0, 64, device=DEVICE))


def test_blocks_and_names():
    # int8 dots: the GPU minimum BLOCK_K is 32 whatever x's dtype
    with pytest.raises(KernelError, match=r"BLOCK_K=16 .*int8.*>= 32"):
        emit.make_spec(FAMILY, 96, 32, torch.float16, block_k=16)
    assert emit.make_spec(FAMILY, 8, 32, torch.float32).block_k == 32
    spec = emit.make_spec(FAMILY, 40, 24, torch.bfloat16, has_bias=True)
    assert spec.name == "qhl_w8a8_tensor_k40_n24_bias_bf16" and spec.name.isidentifier()
    text = emit.render(spec)
    for kernel in ("_minmax", "_scale", "_quant", ""):
        assert f"def {spec.name}{kernel}(" in text
    assert "K: tl.constexpr = 40" in text and "N: tl.constexpr = 24" in text
    assert "(offs_k[None, :] < K - k0)" in text and "y += bias" in text  # K tail, bias epilogue
    assert "BLOCK_R: tl.constexpr = 64" in text  # 4096 elements / BLOCK_K 64
    no_bias = emit.render(dataclasses.replace(spec, has_bias=False, dtype="float16"))
    assert "tl.load(b_ptr" not in no_bias and "y.to(tl.float16)" in no_bias


def test_inspect_shows_the_rendered_kernels_that_run():
    linears = (torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24))
    model = torch.nn.Sequential(*linears).eval()
    report = qhl.inspect(model, (torch.randn(3, 64),), recipe=FAMILY)
    assert [r.form for r in report.rewritten] == [FAMILY, FAMILY]
    for row, (K, N) in zip(report.rewritten, ((64, 32), (32, 24))):
        spec = emit.make_spec(FAMILY, K, N, torch.float32, has_bias=True)
        assert row.kernel_name == spec.name
        with open(emit.load(spec).__file__, encoding="utf-8") as f:
            assert f.read() == row.kernel_source


def test_rendering_does_not_import_triton():
    code = (
        "import sys, torch\n"
        "from qhl.codegen.triton import emit\n"
        f"spec = emit.make_spec({FAMILY!r}, 64, 32, torch.float16, True)\n"
        "assert 'K: tl.constexpr = 64' in emit.render(spec)\n"
        "assert 'triton' not in sys.modules, 'rendering imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- the rendered kernels compile for real GPUs (no GPU needed: Triton compiles ahead of time) ---

AOT_SPECS = [
    # (K, N, dtype, bias): every activation dtype, a K tail in the GEMM and the prologue, a K loop
    (96, 33, "bfloat16", True),
    (1100, 24, "float32", False),
    (64, 64, "float16", True),
]
AOT_ARCHS = (80, 90)  # A100 (mma.sync) and H100 (wgmma) lower tl.dot differently


def _signatures(spec: emit.KernelSpec) -> dict[str, tuple[dict, dict]]:
    x = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[spec.dtype]
    i32 = dict.fromkeys
    gemm = {"xq_ptr": "*i8", "sz_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "cs_ptr": "*i32",
            "b_ptr": x if spec.has_bias else "constexpr", "y_ptr": x, "M": "i32",
            **i32(["stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ws", "stride_cs",
                   "stride_b", "stride_ym", "stride_yn"], "i32"),
            "BLOCK_M": "constexpr"}
    constants = {"BLOCK_M": 16, **({} if spec.has_bias else {"b_ptr": None})}
    return {
        "_minmax": ({"x_ptr": x, "part_ptr": "*fp32", "M": "i32",
                     **i32(["stride_xm", "stride_xk", "stride_pp"], "i32")}, {}),
        "_scale": ({"part_ptr": "*fp32", "sz_ptr": "*fp32", "P": "i32", "stride_pp": "i32"}, {}),
        "_quant": ({"x_ptr": x, "sz_ptr": "*fp32", "q_ptr": "*i8", "M": "i32",
                    **i32(["stride_xm", "stride_xk", "stride_qm", "stride_qk"], "i32")}, {}),
        "": (gemm, {(list(gemm).index(k),): v for k, v in constants.items()}),
    }


def _compile_for_gpus() -> None:
    """Compile the GPU text (interpret=False) of each spec to sm_80/sm_90 cubins; needs no GPU.
    Runs in a fresh process without TRITON_INTERPRET (@jit returns interpreter objects then)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for K, N, dtype, with_bias in AOT_SPECS:
        spec = dataclasses.replace(emit.make_spec(FAMILY, K, N, dtype, with_bias), interpret=False)
        module = emit.load(spec)
        for suffix, (sig, constants) in _signatures(spec).items():
            source = ASTSource(getattr(module, spec.name + suffix), sig, constexprs=constants)
            for arch in AOT_ARCHS:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm["cubin"], (spec.name + suffix, arch)


def test_rendered_kernels_compile_for_gpus():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as e:  # noqa: BLE001  (no NVIDIA backend or ptxas in this triton build)
        pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {e}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, __file__, "--compile-for-gpus"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-gpus"]:
    _compile_for_gpus()
