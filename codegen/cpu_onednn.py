"""qhl::int8_mm_scaled — the int8 GEMM of the w8a8-family CPU faces on oneDNN's prepacked weights.

    y[m, n] = float32(sum_k q[m, k] * Wq[n, k]) * s_w[n]      q [M, K] int8, Wq [N, K] int8, s_w [N] f32

The int32 sums are exact and the product with s_w is one float32 rounding: the same value as
`torch._int_mm(q, Wq.T).float() * s_w` bit for bit (tests/test_cpu_fused.py), so the w8a8 spec's
epilogue `(acc * s_w) * s_x (+ b)` goes on from y unchanged.

Why it exists (benchmarks/cpu_spec_notes.md, the AMX section): on a CPU with AMX, `_int_mm` has
to re-lay out one operand into AMX's blocked format on every call. oneDNN's `qlinear_pointwise` on
a weight prepacked once (`onednn.qlinear_prepack`) skips that: on one 4096 x 4096 layer, 2 threads,
0.63 / 2.0 / 3.9 ms at 64 / 256 / 512 tokens against 0.92 / 2.4 / 4.5 for the fastest `_int_mm`
formulation (the transposed GEMM Wq @ q^T), and its result comes out row-major [M, N], which the
fused epilogue and the next layer's quantize read along rows instead of across them.

The prepacked weight is an opaque oneDNN tensor (no strides), which Inductor cannot take as a
graph input; so it lives in a DerivedCache keyed by the packed int8 buffer (made on first use,
dropped when the buffer is re-packed) and this op takes the int8 buffer. Inductor calls the op as
one extern kernel between its fused loops. It holds a second copy of each int8 weight while the
buffer lives.

Only on CPUs with AMX (`available()`): there its u8 x s8 products accumulate in int32 exactly; and
only for the shapes where it was measured faster (`worthwhile`: large weights, or many tokens).
Elsewhere, and for inputs off the CPU, the op computes the same value with `_int_mm`, so a graph
compiled with a dynamic token count gets the right GEMM for each call.
QHL_CPU_PREPACK=0 (read once, at first use) turns it off, for the memory: the w8a8-family faces
then use `_int_mm`'s transposed GEMM instead.

Not a form: the op appears only inside the CPU faces and the graphs Inductor compiles from them,
never in a graph that is inspected, exported or trained, so its faces are spec (this file) and
fake; it has no Triton, ONNX or grad face.
"""
from __future__ import annotations

import functools
import logging
import os
import platform

import torch
from torch import Tensor

from qhl.runtime.packed import DerivedCache

__all__ = ["cpu_has_amx", "available", "worthwhile", "int8_mm_scaled", "int8_gemm_is_fast", "is_x86_cpu",
           "x86_has_int8_vnni", "ENV_FLAG", "INT8_GEMM_FLAG"]

ENV_FLAG = "QHL_CPU_PREPACK"


@functools.cache
def cpu_has_amx() -> bool:
    """True on a CPU with AMX tiles (oneDNN then runs int8 GEMMs on them; the w8a8 CPU plans
    differ, codegen/w8a8.py)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def is_x86_cpu() -> bool:
    """True on an x86 CPU, the only one whose int8 instruction sets (AVX2 / AVX-512 / VNNI / AMX)
    qhl's CPU plans and ORT checks (runtime/ort.py u8s8_is_exact) tell apart."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.cache
def x86_has_int8_vnni() -> bool:
    """True on an x86 CPU with VNNI (AVX-512 VNNI or AVX-VNNI) or AMX: there u8 x s8 integer GEMMs
    (oneDNN's, and ONNX Runtime's) accumulate every product in int32 exactly. Without them they
    multiply with VPMADDUBSW, which saturates each pair of products to int16."""
    if not is_x86_cpu():
        return False
    if torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx_vnni" in line for line in f)
    except OSError:
        return False


@functools.cache
def u8_int_mm_supported() -> bool:
    """Whether this torch's CPU `torch._int_mm` takes a uint8 left operand (u8 x s8). torch 2.13
    does; torch 2.11 raises "Expected self dtype to be of type int8" (seen on a GPU machine's own
    torch), and there the int8 formulations run instead."""
    try:
        torch._int_mm(torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.int8))
    except RuntimeError:
        return False
    return True


def u8s8_int_mm_exact() -> bool:
    """u8 x s8 `torch._int_mm` on this CPU is available and exact (VNNI or AMX)."""
    return x86_has_int8_vnni() and u8_int_mm_supported()


INT8_GEMM_FLAG = "QHL_CPU_INT8_GEMM"  # "int8" / "float": force the CPU's integer-GEMM choice


@functools.cache
def int8_gemm_is_fast() -> bool:
    """Whether PyTorch's int8 GEMM (`torch._int_mm`, oneDNN) is worth running on this CPU.

    On x86 it has fast kernels with AVX-512 or VNNI (or AMX); on a CPU with AVX2 alone (measured on
    a 2-core AMD EPYC, torch 2.13) it is 3x slower than a float32 matmul at 1 token and ~20x at
    64-256 tokens on a 4096 x 4096 weight: there the int8 forms run their GEMM in float32 over the
    integer codes instead (codegen/w8a8.py, plan "f32"). QHL_CPU_INT8_GEMM=int8|float overrides."""
    forced = os.environ.get(INT8_GEMM_FLAG, "").strip().lower()
    if forced in ("int8", "float"):
        return forced == "int8"
    if not is_x86_cpu():
        return True
    cpu = torch.cpu
    fast = any(getattr(cpu, probe, lambda: False)() for probe in
               ("_is_avx512_supported", "_is_vnni_supported", "_is_amx_tile_supported"))
    if not fast:
        logging.getLogger(__name__).info(
            "qhl: this CPU has no AVX-512, VNNI or AMX, where PyTorch's int8 GEMM is slower than float32: "
            "the int8 forms run their GEMMs in float32 over the integer codes (exact products)"
        )
    return fast


@functools.cache
def available() -> bool:
    """True on a CPU with AMX tiles whose PyTorch build has oneDNN's quantized linear ops, unless
    QHL_CPU_PREPACK=0."""
    if os.environ.get(ENV_FLAG, "1") == "0":
        return False
    onednn = torch.ops.onednn
    return cpu_has_amx() and hasattr(onednn, "qlinear_prepack") and hasattr(onednn, "qlinear_pointwise")


# Where the prepacked GEMM is worth it (measured on the AMX Xeon, benchmarks/cpu_spec_notes.md): it
# costs ~25-30 us per call whatever the size, so it wins on weights of 2^20+ values at 2+ tokens
# (1.15-1.6x `_int_mm` at 4096 x 4096), or with enough work per call; and at 1 token some small
# shapes take 1-3 ms in it (192 x 576 and 256 x 256 did), so there only weights of 2^22+ values.
_MIN_WEIGHT = 1 << 20
_MIN_WEIGHT_ONE_TOKEN = 1 << 22
_MIN_WORK = 1 << 26  # M * N * K


def worthwhile(m: int, n: int, k: int) -> bool:
    """Whether the prepacked GEMM is the faster one for M tokens on a [N, K] weight here."""
    if not available() or m < 1:
        return False
    if m == 1:
        return n * k >= _MIN_WEIGHT_ONE_TOKEN
    return n * k >= _MIN_WEIGHT or m * n * k >= _MIN_WORK


_prepacked = DerivedCache(lambda w_int8: torch.ops.onednn.qlinear_prepack(w_int8, None))


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int64)


def _fits(codes: Tensor, w_int8: Tensor, w_scale: Tensor) -> bool:
    return (codes.device.type == "cpu" and codes.dim() == 2 and codes.shape[1] == w_int8.shape[1]
            and codes.dtype == w_int8.dtype == torch.int8 and w_scale.dtype == torch.float32
            and codes.is_contiguous() and w_int8.is_contiguous() and w_scale.is_contiguous()
            and worthwhile(codes.shape[0], w_int8.shape[0], w_int8.shape[1]))


def int8_mm_scaled_cpu(codes: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """The op's value as a fresh contiguous float32 [M, N] (called directly by the eager CPU faces)."""
    if not _fits(codes, w_int8, w_scale):
        return torch._int_mm(codes, w_int8.t()).float() * w_scale.float()
    # x_scale 1 and zero point 0: qlinear_pointwise's float32 output is then acc * s_w[n], once rounded.
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, _prepacked(w_int8), w_scale, _zero_points(w_int8.shape[0]), None,
        1.0, 0, torch.float32, "none", [], "")


@torch.library.custom_op("qhl::int8_mm_scaled", mutates_args=())
def int8_mm_scaled(codes: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """Spec face: see the module docstring."""
    return int8_mm_scaled_cpu(codes, w_int8, w_scale)


@int8_mm_scaled.register_fake
def _(codes: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    return codes.new_empty((codes.shape[0], w_int8.shape[0]), dtype=torch.float32)
