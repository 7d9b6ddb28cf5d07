"""Triton kernel faces against their spec faces, and the per-node codegen that renders them.

Runs natively on CUDA; without CUDA, under Triton's CPU interpreter (TRITON_INTERPRET=1, set
below before any kernel module is imported, because @triton.jit reads it at decoration time).
The interpreter costs ~2 ms per (program, k-step), so shapes are small and blocks large.

Tolerances, by kernel:
* per-token quant: bit-exact q and scale (the kernel does the spec's float32 ops in its order).
* w8a8: the int32 accumulation is exact, and the epilogue does the spec's float32 ops, except
  that a GPU may fuse the bias add into an FMA (<= 1 float32 ulp). So: rtol 1e-5 for float32
  outputs, and one ulp of the output dtype for fp16/bf16 (a float32 ulp can flip its last bit).
* w8a16 / w4a16: the dot's operands are exact (integer codes, x), only the order of the fp32
  sums differs from the spec, ~1e-7 relative; we allow 1e-4 of the output norm for float32, and
  the output dtype's epsilon for fp16/bf16, whose final rounding can move by one ulp.
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
from qhl.codegen.triton.per_token_quant import per_token_quant  # noqa: E402
from qhl.codegen.triton.w8a8 import w8a8_linear_triton  # noqa: E402
from qhl.codegen.triton.weight_only import w4a16_linear_triton, w8a16_linear_triton  # noqa: E402
from qhl.codegen.w4a16 import w4a16_linear_spec  # noqa: E402
from qhl.codegen.w8a8 import w8a8_linear_spec  # noqa: E402
from qhl.codegen.w8a16 import w8a16_linear_spec  # noqa: E402
from qhl.errors import KernelError  # noqa: E402
from qhl.graph import WEIGHT_META, MatmulInfo  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error of the output allowed for weight-only kernels (see the module docstring).
WEIGHT_ONLY_TOL = {torch.float32: 1e-4, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# --- per-token quant ---


@pytest.mark.parametrize(
    "shape, dtype",
    [((3, 40), torch.float32), ((2, 3, 96), torch.float16), ((4, 1100), torch.bfloat16)],
)
def test_per_token_quant_is_bit_exact(shape, dtype):
    # (4, 1100): K > 1024 = the largest BLOCK_K, so both passes loop and have a K tail.
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    x.reshape(-1, shape[-1])[0] = 0  # an all-zero row: scale 1, q 0
    q, scale = per_token_quant(x)
    q_ref, scale_ref = quant.quantize_per_token(x)
    assert q.shape == x.shape and q.dtype == torch.int8
    assert scale.shape == (*shape[:-1], 1) and scale.dtype == torch.float32
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)


def test_per_token_quant_rounds_half_to_even():
    # amax 127 gives scale exactly 1, so x / scale hits every .5 tie; torch.round goes to even.
    ties = [k + 0.5 for k in range(-64, 64)]
    x = torch.tensor([[127.0, *ties], [-127.0, *[-t for t in ties]]], device=DEVICE)
    q, scale = per_token_quant(x)
    q_ref, scale_ref = quant.quantize_per_token(x)
    assert torch.equal(scale, scale_ref) and torch.all(scale == 1)
    assert torch.equal(q, q_ref)
    assert q[0, 1:5].tolist() == [-64, -62, -62, -60]  # -63.5 -> -64, -62.5 -> -62, ...


# --- int8 GEMM with the per-token prologue ---

GEMM_CASES = [
    # (x shape, N, dtype, bias): K not a multiple of BLOCK_K, N not of BLOCK_N, M of BLOCK_M
    ((3, 40), 24, torch.float32, True),
    ((3, 96), 33, torch.float16, False),
    ((2, 3, 64), 24, torch.float16, True),
    ((20, 40), 33, torch.bfloat16, True),
]


@pytest.mark.parametrize("x_shape, N, dtype, with_bias", GEMM_CASES)
def test_w8a8_matches_spec(x_shape, N, dtype, with_bias):
    K = x_shape[-1]
    x = torch.randn(x_shape).to(dtype).to(DEVICE)
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(N, K)))
    bias = torch.randn(N).to(dtype).to(DEVICE) if with_bias else None
    y = w8a8_linear_triton(x, wq, ws, bias)
    ref = w8a8_linear_spec(x.cpu(), wq.cpu(), ws.cpu(), None if bias is None else bias.cpu())
    assert y.shape == (*x_shape[:-1], N) and y.dtype == dtype
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu(), ref, rtol=eps, atol=eps * ref.float().abs().max().item())


@pytest.mark.parametrize("x_shape, N, dtype, with_bias", GEMM_CASES)
def test_w8a16_matches_spec(x_shape, N, dtype, with_bias):
    K = x_shape[-1]
    x = torch.randn(x_shape).to(dtype).to(DEVICE)
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(N, K)))
    bias = torch.randn(N).to(dtype).to(DEVICE) if with_bias else None
    y = w8a16_linear_triton(x, wq, ws, bias)
    ref = w8a16_linear_spec(x.cpu(), wq.cpu(), ws.cpu(), None if bias is None else bias.cpu())
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y.cpu(), ref) <= WEIGHT_ONLY_TOL[dtype]


@pytest.mark.parametrize(
    "x_shape, N, group_size, symmetric, dtype, with_bias",
    [
        ((3, 64), 24, 32, True, torch.float32, True),
        ((3, 128), 33, 64, False, torch.float16, False),
        ((2, 3, 64), 24, 64, True, torch.float16, True),
        ((20, 96), 33, 32, False, torch.float32, False),
        ((3, 64), 24, 32, False, torch.bfloat16, True),
    ],
)
def test_w4a16_matches_spec(x_shape, N, group_size, symmetric, dtype, with_bias):
    K = x_shape[-1]
    x = torch.randn(x_shape).to(dtype).to(DEVICE)
    # symmetric weights on the preset's "grid" scales: the kernel sees code 0 (q = -8) too
    packed, scale, zero = quant.quantize_int4_groupwise(torch.randn(N, K), group_size, symmetric,
                                                        "grid" if symmetric else "none")
    bias = torch.randn(N).to(dtype) if with_bias else None
    args = [t.to(DEVICE) for t in (packed, scale, zero)]
    y = w4a16_linear_triton(x, *args, group_size, None if bias is None else bias.to(DEVICE))
    ref = w4a16_linear_spec(x.cpu(), packed, scale, zero, group_size, bias)
    assert y.shape == ref.shape and y.dtype == dtype
    assert _rel_err(y.cpu(), ref) <= WEIGHT_ONLY_TOL[dtype]


# --- codegen: block sizes, validation, rendering ---


def test_block_sizes_below_gpu_minimums_raise():
    # The interpreter runs a BLOCK_K=16 int8 dot fine; the NVIDIA backend refuses to compile it.
    with pytest.raises(KernelError, match=r"BLOCK_K=16 .*int8.*>= 32"):
        emit.make_spec("w8a8", 96, 32, torch.float16, block_k=16)
    with pytest.raises(KernelError, match=r"BLOCK_K=8 .*float16.*>= 16"):
        emit.make_spec("w8a16", 96, 32, torch.float16, block_k=8)
    with pytest.raises(KernelError, match="BLOCK_N=8"):
        emit.make_spec("w8a16", 96, 32, torch.float32, block_n=8)
    with pytest.raises(KernelError, match="must divide group_size"):
        emit.make_spec("w4a16", 128, 32, torch.float16, group_size=32, block_k=64)
    assert emit.make_spec("w8a16", 96, 32, torch.float32, block_k=8).block_k == 8  # fp32: K >= 8
    assert emit.make_spec("w8a8", 96, 32, torch.float16).block_k >= 32


def test_wrappers_validate_their_inputs(monkeypatch):
    x = torch.randn(3, 64, device=DEVICE)
    wq, ws = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(torch.randn(24, 64)))
    with pytest.raises(KernelError, match="w_int8 must be torch.int8"):
        w8a8_linear_triton(x, wq.float(), ws, None)
    with pytest.raises(KernelError, match=r"x must be \[..., K=64\]"):
        w8a16_linear_triton(x[:, :40], wq, ws, None)
    with pytest.raises(KernelError, match=r"w_scale must have shape \[24\]"):
        w8a16_linear_triton(x, wq, ws[:3], None)
    with pytest.raises(KernelError, match="x must be torch.float32 or torch.float16"):
        per_token_quant(x.double())
    w4 = quant.quantize_int4_groupwise(torch.randn(24, 64), 32)
    packed, scale, zero = (t.to(DEVICE) for t in w4)
    with pytest.raises(KernelError, match="group_size=48 must divide K=64"):
        w4a16_linear_triton(x, packed, scale, zero, 48, None)
    with pytest.raises(KernelError, match=r"zero must be torch.uint8"):
        w4a16_linear_triton(x, packed, scale, zero.float(), 32, None)
    # Without the interpreter, CPU tensors cannot run a Triton kernel: say so, name the fix.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="need CUDA tensors"):
        w8a16_linear_triton(x.cpu(), wq.cpu(), ws.cpu(), None)


def test_rendering_does_not_import_triton():
    code = (
        "import sys, torch\n"
        "from qhl.codegen.triton import emit\n"
        "for f, g in (('w8a8', 0), ('w8a16', 0), ('w4a16', 32), ('per_token_quant', 0)):\n"
        "    spec = emit.make_spec(f, 64, 32, torch.float16, True, g)\n"
        "    assert 'K: tl.constexpr = 64' in emit.render(spec)\n"
        "assert 'triton' not in sys.modules, 'rendering imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_specs_specialise_the_text():
    base = emit.make_spec("w8a16", 40, 24, torch.float16, has_bias=True)
    text = emit.render(base)
    assert "K: tl.constexpr = 40" in text and "N: tl.constexpr = 24" in text
    assert "BLOCK_K: tl.constexpr = 64" in text and "(offs_k[None, :] < K - k0)" in text  # K tail
    assert "y += bias" in text and "y.to(tl.float16)" in text
    no_bias = emit.render(dataclasses.replace(base, has_bias=False))
    assert "tl.load(b_ptr" not in no_bias and "y += bias" not in no_bias  # epilogue chosen by code
    even_k = emit.render(emit.make_spec("w8a16", 64, 24, torch.float16))
    assert "K - k0" not in even_k  # BLOCK_K divides K: codegen drops the K mask
    bf16 = emit.render(dataclasses.replace(base, dtype="bfloat16", interpret=True))
    assert "x.to(tl.float32)" in bf16 and 'input_precision="ieee"' in bf16  # interpreter bf16 dot


def test_decode_and_wide_tiles_are_their_own_kernels():
    wide = emit.make_spec("w8a16", 4096, 4096, torch.bfloat16)
    decode = emit.make_spec("w8a16", 4096, 4096, torch.bfloat16, tile="decode")
    assert (wide.block_n, wide.block_k) == emit.TILES[("w8a16", "wide", "16")]
    assert (decode.block_n, decode.block_k) == emit.TILES[("w8a16", "decode", "16")]
    assert decode.name == wide.name + "_decode" and emit.render(decode) != emit.render(wide)
    # int8 dot operands: w8a8's tiles whatever x's dtype
    w8a8 = emit.make_spec("w8a8", 4096, 4096, torch.float32, tile="decode")
    assert (w8a8.block_n, w8a8.block_k) == emit.TILES[("w8a8", "decode", "any")]
    # No tile of its own: the wide kernel serves every token count (fp32 x keeps 64 x 64 here).
    f32 = emit.make_spec("w8a16", 4096, 4096, torch.float32, tile="decode")
    assert f32 == emit.make_spec("w8a16", 4096, 4096, torch.float32) and (f32.block_n, f32.block_k) == (64, 64)
    # Clamped by a small N and K, and w4a16's BLOCK_K still divides the group.
    small = emit.make_spec("w4a16", 128, 24, torch.float16, group_size=32, tile="decode")
    assert (small.block_n, small.block_k, small.tile) == (16, 32, "decode")
    # Blocks given explicitly win over the table.
    given = emit.make_spec("w8a8", 4096, 4096, torch.float16, block_n=64, block_k=64, tile="decode")
    assert (given.block_n, given.block_k, given.tile) == (64, 64, "wide")
    with pytest.raises(KernelError, match="tile='narrow'"):
        emit.make_spec("w8a8", 64, 64, tile="narrow")
    assert emit.tile_for(emit.DECODE_MAX_M) == "decode" and emit.tile_for(emit.DECODE_MAX_M + 1) == "wide"


@pytest.mark.parametrize("family", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("m", [3, 40])
def test_wrappers_launch_the_tile_of_their_token_count(family, m):
    K, N, dtype = 256, 80, torch.float16
    x = torch.randn(m, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K)
    if family == "w4a16":
        packed, scale, zero = (t.to(DEVICE) for t in quant.quantize_int4_groupwise(w, 128, False))
        y = w4a16_linear_triton(x, packed, scale, zero, 128)
        ref = w4a16_linear_spec(x.cpu(), packed.cpu(), scale.cpu(), zero.cpu(), 128, None)
    else:
        q8, s8 = (t.to(DEVICE) for t in quant.quantize_int8_per_channel(w))
        triton_fn, spec_fn = {"w8a16": (w8a16_linear_triton, w8a16_linear_spec),
                              "w8a8": (w8a8_linear_triton, w8a8_linear_spec)}[family]
        y = triton_fn(x, q8, s8)
        ref = spec_fn(x.cpu(), q8.cpu(), s8.cpu(), None)
    tile = emit.tile_for(m)
    spec = emit.make_spec(family, K, N, dtype, group_size=128 if family == "w4a16" else 0, tile=tile)
    assert spec.tile == tile and spec in emit._LOADED  # the kernel of this token count ran
    # w8a8: bit-exact codes, so only the fp32 epilogue and the fp16 store round
    assert _rel_err(y.cpu(), ref) <= WEIGHT_ONLY_TOL[dtype]


def test_per_token_quant_qmax_is_specialised_and_only_for_that_family():
    """The w4a4 prologue is the same template with qmax 7 (4-bit codes), named for it."""
    spec = emit.make_spec("per_token_quant", 96, dtype=torch.float16, qmax=7)
    assert spec.name == "qhl_per_token_quant_k96_q7_fp16"
    assert "QMAX: tl.constexpr = 7.0" in emit.render(spec)
    assert "QMAX: tl.constexpr = 127.0" in emit.render(emit.make_spec("per_token_quant", 96))
    with pytest.raises(KernelError, match="only per_token_quant takes a qmax"):
        emit.make_spec("w8a8", 96, 32, qmax=7)
    with pytest.raises(KernelError, match=r"qmax=0"):
        emit.make_spec("per_token_quant", 96, qmax=0)


# --- codegen through torch.compile: one rendered kernel per rewritten node ---


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 32)
        self.down = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _node_args(gm: torch.fx.GraphModule, info: MatmulInfo) -> list:
    """The real values of a rewritten node's arguments after x: packed buffers, knobs, bias."""
    node = next(n for n in gm.graph.nodes if n.name == info.node_name)

    def value(a):
        if not isinstance(a, torch.fx.Node):
            return a
        if a.op == "get_attr":
            return getattr(gm, a.target)
        return a.meta[WEIGHT_META].value.detach()  # a parameter lifted to a graph input

    return [value(a) for a in node.args[1:]]


def test_torch_compile_attaches_and_runs_per_node_kernels():
    torch._dynamo.reset()
    model = _Mlp().to(DEVICE)
    backend = qhl.backend("w4a16", group_size=32)
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        compiled_out = torch.compile(model, backend=backend)(x)
    graph = backend.graphs[-1]
    rewritten = [i for i in graph.layers if i.form == "w4a16"]
    up, down = sorted(rewritten, key=lambda i: i.in_features, reverse=True)
    assert up.kernel_name == "qhl_w4a16_k64_n32_g32_bias_fp32"
    assert down.kernel_name == "qhl_w4a16_k32_n24_g32_nobias_fp32"
    for info, K, N in ((up, 64, 32), (down, 32, 24)):
        src = info.kernel_source
        assert f"K: tl.constexpr = {K}" in src and f"N: tl.constexpr = {N}" in src
        assert "GROUP_SIZE: tl.constexpr = 32" in src and f"def {info.kernel_name}(" in src
    assert "y += bias" in up.kernel_source and "y += bias" not in down.kernel_source
    assert emit.attach_kernel_sources(graph.gm) == 2

    # What inspect shows is what runs: the wrapper loads exactly this text, and it matches the spec.
    h = x
    for info in (up, down):
        packed, scale, zero, group_size, bias = _node_args(graph.gm, info)
        K, N = info.in_features, info.out_features
        spec = emit.make_spec("w4a16", K, N, h.dtype, bias is not None, group_size)
        with open(emit.load(spec).__file__, encoding="utf-8") as f:
            assert f.read() == info.kernel_source
        y = w4a16_linear_triton(h, packed, scale, zero, group_size, bias)
        cpu = [None if t is None else t.cpu() for t in (h, packed, scale, zero, bias)]
        ref = w4a16_linear_spec(*cpu[:4], group_size, cpu[4])
        assert _rel_err(y.cpu(), ref) <= WEIGHT_ONLY_TOL[torch.float32]
        h = torch.relu(y) if info is up else y
    assert _rel_err(h.cpu(), compiled_out.cpu()) <= WEIGHT_ONLY_TOL[torch.float32]


# --- split-K (codegen/triton/split_k.py) ---


def _launchers(K: int, N: int):
    """family -> (call(x, blocks, split), spec(x)) on fresh weights with a bias."""
    w, b = torch.randn(N, K), torch.randn(N)
    q8, s8 = quant.quantize_int8_per_channel(w)
    p4, s4, z4 = quant.quantize_int4_groupwise(w, 32, False)
    dev = [t.to(DEVICE) for t in (q8, s8, p4, s4, z4, b)]
    return {
        "w8a8": (lambda x, bl, sp: w8a8_linear_triton(x, dev[0], dev[1], dev[5], blocks=bl, split=sp),
                 lambda x: w8a8_linear_spec(x, q8, s8, b)),
        "w8a16": (lambda x, bl, sp: w8a16_linear_triton(x, dev[0], dev[1], dev[5], blocks=bl, split=sp),
                  lambda x: w8a16_linear_spec(x, q8, s8, b)),
        "w4a16": (lambda x, bl, sp: w4a16_linear_triton(x, *dev[2:5], 32, dev[5], blocks=bl, split=sp),
                  lambda x: w4a16_linear_spec(x, p4, s4, z4, 32, b)),
    }


@pytest.mark.parametrize("family", ["w8a8", "w8a16", "w4a16"])
@pytest.mark.parametrize("m, K, blocks, splits", [
    (3, 96, (16, 32), (3,)),  # three k-blocks: one per split
    (40, 256, (32, 32), (2, 4)),  # eight k-blocks in two or four splits, two M blocks
    (5, 160, (16, 32), (5,)),  # a K that is no power of two
])
def test_split_k_matches_the_unsplit_kernel_and_the_spec(family, m, K, blocks, splits):
    N, dtype = 48, torch.float16  # N: three BLOCK_N = 16 tiles, or a partial one at 32
    call, spec = _launchers(K, N)[family]
    x = torch.randn(m, K, dtype=dtype, device=DEVICE)
    whole = call(x, blocks, 1)
    for split in splits:
        y = call(x, blocks, split)
        if family == "w8a8":  # int32 partials: the exact sum, then the same epilogue
            assert torch.equal(y, whole), split
        assert _rel_err(y.cpu(), spec(x.cpu())) <= WEIGHT_ONLY_TOL[dtype], split


def test_split_k_must_divide_the_k_blocks():
    call, _ = _launchers(96, 32)["w8a16"]
    x = torch.randn(2, 96, dtype=torch.float16, device=DEVICE)
    with pytest.raises(KernelError, match=r"split_k=2 must divide the 3 k-blocks of K=96 .*valid: \[1, 3\]"):
        call(x, (16, 32), 2)
    with pytest.raises(KernelError, match="split_k=0"):
        call(x, (16, 32), 0)


# --- the specs' int8 GEMM and scale on CUDA (what the kernels are held to there) ---


@pytest.mark.parametrize("m, k, n", [(1, 64, 48), (6, 40, 24), (17, 64, 32)])
def test_int_mm_is_exact_on_any_shape(m, k, n):
    """CUDA's torch._int_mm needs M > 16 and K, N multiples of 8; quant.int_mm takes any shape."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    want = a.long() @ b.long().t()
    got = quant.int_mm(a.to(DEVICE), b.to(DEVICE).t())
    assert got.dtype == torch.int32 and torch.equal(got.cpu().long(), want)


def test_scales_divide_like_the_cpu_on_every_device():
    """On CUDA, tensor / python-scalar is a multiply by the reciprocal; div_scalar is IEEE there."""
    amax = torch.rand(4096) * 10
    for qmax in (7, 127, 255):
        want = amax / qmax  # the CPU's IEEE division
        assert torch.equal(quant.div_scalar(amax.to(DEVICE), qmax).cpu(), want), qmax


# --- the rendered kernels compile for real GPUs (no GPU needed: Triton compiles ahead of time) ---


def _signature(spec: emit.KernelSpec, quant_prologue: bool, split: int = 1, reduce: bool = False
               ) -> tuple[dict, dict]:
    x = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[spec.dtype]
    if quant_prologue or spec.family == "per_token_quant":
        strides = ["stride_xm", "stride_xk", "stride_qm", "stride_qk"]
        return {"x_ptr": x, "q_ptr": "*i8", "s_ptr": "*fp32", **dict.fromkeys(strides, "i32")}, {}
    partials = "*i32" if spec.family == "w8a8" else "*fp32"
    bias = x if spec.has_bias else "constexpr"
    if reduce:  # {name}_reduce: the partials, the scales its finish reads, bias, y
        scales = {"w8a8": {"xs_ptr": "*fp32", "ws_ptr": "*fp32"}, "w8a16": {"ws_ptr": "*fp32"}, "w4a16": {}}
        scale_strides = [] if spec.family == "w4a16" else ["stride_ws"]
        sig = {"p_ptr": partials, **scales[spec.family], "b_ptr": bias, "y_ptr": x, "M": "i32"}
        strides = ["stride_pk", "stride_pm", "stride_pn", *scale_strides, "stride_b", "stride_ym", "stride_yn"]
        sig.update({**dict.fromkeys(strides, "i32"), "BLOCK_M": "constexpr", "SPLIT_K": "constexpr"})
        constants = {"BLOCK_M": 16, "SPLIT_K": split, **({} if spec.has_bias else {"b_ptr": None})}
        return sig, {(list(sig).index(k),): v for k, v in constants.items()}
    ptrs = {
        "w8a8": {"xq_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32"},
        "w8a16": {"x_ptr": x, "w_ptr": "*i8", "ws_ptr": "*fp32"},
        "w4a16": {"x_ptr": x, "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8"},
    }[spec.family]
    groups = ["stride_ws"]
    if spec.family == "w4a16":
        groups = ["stride_sn", "stride_sg", "stride_zn", "stride_zg"]
    strides = ["stride_xm", "stride_xk", "stride_wn", "stride_wk", *groups, "stride_b"]
    strides += ["stride_ym", "stride_yn", "stride_pk", "stride_pm", "stride_pn"]
    sig = {**ptrs, "b_ptr": bias, "y_ptr": x, "p_ptr": partials, "M": "i32"}
    sig.update({**dict.fromkeys(strides, "i32"), "BLOCK_M": "constexpr", "SPLIT_K": "constexpr"})
    constants = {"BLOCK_M": 16, "SPLIT_K": split, **({} if spec.has_bias else {"b_ptr": None})}
    return sig, {(list(sig).index(k),): v for k, v in constants.items()}


AOT_SPECS = [
    # (family, K, N, dtype, bias, group_size, tile): every family (w8a8 embeds the per-token quant
    # kernel), every activation dtype, fp32's "ieee" dot, a K tail, with and without bias; and the
    # measured H100 tiles (emit.TILES) at a 4096^2 layer, where they are not clamped by K or N.
    ("w8a8", 96, 33, "bfloat16", True, 0, "wide"),
    ("w8a16", 40, 24, "float32", False, 0, "wide"),
    ("w4a16", 128, 64, "float16", True, 64, "wide"),
    ("w4a16", 64, 24, "bfloat16", False, 32, "wide"),
    ("w8a8", 4096, 4096, "bfloat16", True, 0, "decode"),
    ("w8a8", 4096, 4096, "float32", False, 0, "wide"),
    ("w8a16", 4096, 4096, "bfloat16", False, 0, "decode"),
    ("w8a16", 4096, 4096, "float16", True, 0, "wide"),
    ("w4a16", 4096, 4096, "bfloat16", False, 128, "decode"),
]
AOT_ARCHS = (80, 90)  # A100 (mma.sync) and H100 (wgmma) lower tl.dot differently


def _compile_for_gpus(specs: list) -> None:
    """Compile the GPU text (interpret=False) of each spec to sm_80/sm_90 cubins; needs no GPU.

    Runs in a fresh process without TRITON_INTERPRET: Triton's code generator misbehaves while
    its interpret knob is on, and @jit returns interpreter objects then.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for family, K, N, dtype, with_bias, group_size, tile in specs:
        spec = emit.make_spec(family, K, N, dtype, with_bias, group_size, tile=tile)
        assert spec.tile == tile, (family, dtype, tile)  # each listed tile has blocks of its own
        spec = dataclasses.replace(spec, interpret=False)
        module = emit.load(spec)
        launches = [(spec.name, 1)] + ([(f"{spec.name}_quant", 1)] if family == "w8a8" else [])
        if tile == "decode":  # split-K: both branches of the GEMM, and the reduce kernel
            launches += [(spec.name, 4), (f"{spec.name}_reduce", 4)]
        for name, split in launches:
            sig, constants = _signature(spec, name.endswith("_quant"), split, name.endswith("_reduce"))
            source = ASTSource(getattr(module, name), sig, constexprs=constants)
            for arch in AOT_ARCHS:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm["cubin"], (name, split, arch)


def test_rendered_kernels_compile_for_gpus():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as e:  # noqa: BLE001  (no NVIDIA backend or ptxas in this triton build)
        pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {e}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, __file__, "--compile-for-gpus"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-gpus"]:
    _compile_for_gpus(AOT_SPECS)
