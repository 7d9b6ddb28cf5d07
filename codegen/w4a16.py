"""qhl::w4a16_linear — int4 group-wise weight-only (symmetric or asymmetric).

    W[n, k] = (c[n, k] - z[n, k // g]) * s[n, k // g]     c: 4-bit codes, two per byte along K
    y[..., N] = x @ W.T (+ b)

x [..., K] float; packed uint8 [N, K/2]; scale float32 [N, K/g]; zero uint8 [N, K/g] (8 when
symmetric). Faces: spec (CPU, here: dequantized one cache-sized tile of rows at a time, or at few
tokens an Inductor GEMV, over cached unpacked codes (1-8 tokens) or, with AVX2 alone, over the
packed codes (1-4); see below and benchmarks/cpu_spec_notes.md. Under torch.compile,
w4a16_linear_decomposed puts the packed-code GEMV in Inductor's whole graph at 1-4 tokens on a
CPU without AMX: with AVX2 alone for groups of 64 or more, with a fast int8 GEMM for 128 or more),
fake, kernel (codegen/triton/weight_only.py, CUDA: a dequantizing GEMM), grad (dx through the
dequantized weight; weight frozen), onnx (codegen/onnx/w4a16.py: blocked uint4
DequantizeLinear + MatMul).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import cpu_fused, cpu_onednn, quant
from qhl.runtime.packed import DerivedCache

__all__ = ["w4a16_linear", "w4a16_linear_spec", "w4a16_linear_decomposed"]


# CPU: dequantize a tile of weight rows at a time into a reused float32 buffer that stays in cache
# for the GEMM. The tile holds each row's low nibbles (even k) then its high nibbles (odd k), so
# unpacking needs no interleave; x is permuted once to match ([x_even | x_odd]).
# Tile size by tokens M (measured, 4096 x 4096): 8 MiB (fewer chunks, still L3-resident) for decode,
# 4 MiB for medium M where the GEMM re-reads the tile, 8 MiB again for many tokens, where the
# GEMM dominates and fewer tiles mean fewer re-packs of x.
_TILE_BYTES = 4 << 20
_TILE_BYTES_FEW_TOKENS = 8 << 20
_TILE_BYTES_MANY_TOKENS = 8 << 20
_FEW_TOKENS = 16
_MANY_TOKENS = 256


def _tile_rows(m: int, n: int, k: int) -> int:
    if m < _FEW_TOKENS:
        tile_bytes = _TILE_BYTES_FEW_TOKENS
    elif m >= _MANY_TOKENS:
        tile_bytes = _TILE_BYTES_MANY_TOKENS
    else:
        tile_bytes = _TILE_BYTES
    return min(n, max(16, (tile_bytes // (4 * k)) // 16 * 16))


# 1-8 tokens on CPU (decode): a GEMV over the unpacked codes, compiled by Inductor
# (codegen/cpu_fused.py), with (c - z) * s formed inside the reduction. The codes are unpacked
# once per packed weight and kept beside it (runtime/packed.py DerivedCache: dropped when the
# packed tensor changes), so a w4a16 layer holds 1.5 bytes per weight at run time on CPU; the
# compiled artifact and the ONNX file stay 4-bit. Measured on one 4096 x 4096 layer (AMX Xeon,
# 2 threads, weights in cache): 0.69 ms against 5.83 for the tiled path below and 1.19 for
# float32. Inductor's GEMV straight on the packed nibbles measured 4.2-5.6 ms (the unpack does not
# vectorize). Set CPU_GEMV_CACHE = False for the tiled path (0.5 bytes per weight).
# On a CPU with AVX2 alone (cpu_onednn.int8_gemm_is_fast() False) Inductor's 8-lane loads of
# uint8 codes are slow (that GEMV measured 14.3 ms against the tiled path's 7.6 and float32's 3.9,
# AMD EPYC, 2 threads): there the GEMV is cpu_fused.int4_gemv_bits, which reads the packed weight
# itself as int32 lanes of 8 codes and caches nothing; a group size under 64 keeps the tiled path.
# The same GEMV serves up to 8 tokens (a small decode batch; it was 1 token only before): 4 x 4096^2
# layers, g128, Zen 5 EPYC with AVX-512 VNNI, 2 threads, medians of 15 round-robin calls: 3.9 / 6.4
# / 11.7 ms at 2 / 4 / 8 tokens against the tiled path's 16 / 33 / 19 ms (the 8-token figure with
# the tiled path's row-major output, below) and eager float32's 19-23 ms; at 16 the two tie (22 ms).
CPU_GEMV_CACHE = True
GEMV_MAX_TOKENS = 8
# in_place: compiled graphs hold it as a constant too (passes/w4a16_codes_gemv.py); a re-pack derives
# it again into the same tensor
_unpacked = DerivedCache(lambda packed: quant.unpack_int4(packed).contiguous(), in_place=True)
# whether every zero point is 8 (symmetric weights), once per zero-point buffer
_all_eight = DerivedCache(lambda zero: bool((zero == 8).all()))


def cached_code_gemv_serves(m: int) -> bool:
    """Whether the CPU face runs m tokens as its GEMV over the cached unpacked codes (a CPU with a
    fast int8 GEMM; passes/w4a16_codes_gemv.py writes the same GEMV into Inductor's graph)."""
    return cpu_fused.enabled() and cpu_onednn.int8_gemm_is_fast() and CPU_GEMV_CACHE and m <= GEMV_MAX_TOKENS


def _float32(scale: Tensor) -> Tensor:
    return scale if scale.dtype == torch.float32 else scale.float()


def w4a16_linear_spec(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    n, kh = packed.shape
    k = kh * 2
    g = group_size
    if not (
        quant._cpu_fast_path_ok(x, packed, scale, zero, bias)
        and packed.dtype == torch.uint8
        and zero.dtype == torch.uint8
        and g % 2 == 0
        and k % g == 0
        and scale.shape == (n, k // g)
        and zero.shape == (n, k // g)
    ):
        return _w4a16_linear_generic(x, packed, scale, zero, group_size, bias)
    ng, gh = k // g, g // 2
    x2 = x.reshape(-1, k).float()
    m = x2.shape[0]
    y = None
    if cached_code_gemv_serves(m):
        y = cpu_fused.int4_gemv(x2, _unpacked(packed), _float32(scale), zero, g)
    elif cpu_fused.enabled() and not cpu_onednn.int8_gemm_is_fast() and m <= cpu_fused.BITS_GEMV_MAX_TOKENS:
        # AVX2 alone: from the packed codes (None: group < 64)
        y = cpu_fused.int4_gemv_bits(x2, packed, _float32(scale), zero, g, _all_eight(zero))
    if y is not None:
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    xp = x2.reshape(m, kh, 2).transpose(1, 2).reshape(m, k)  # [x_even | x_odd]
    sf = _float32(scale)
    # c - z is exact in int8 or float32. Symmetric weights (every zero point 8) subtract an int8
    # scalar (checked once per zero-point buffer); otherwise subtract per group, in
    # int8 when a half-group fills a 64-byte vector (g >= 128), else in float32 after the convert.
    symmetric = _all_eight(zero)
    zero_i8 = zero.view(torch.int8) if (not symmetric and gh >= 64) else None
    zf = zero.float() if (not symmetric and zero_i8 is None) else None
    rows = _tile_rows(m, n, k)
    codes = quant._scratch("w4a16.c", (rows, 2, kh), torch.uint8)
    tile = quant._scratch("w4a16.w", (rows, 2, ng, gh), torch.float32)

    def weight_tile(n0: int, r: int) -> Tensor:
        p = packed[n0 : n0 + r]
        c = codes[:r]
        torch.bitwise_and(p, 0x0F, out=c[:, 0])  # c[n, 2j]
        torch.bitwise_right_shift(p, 4, out=c[:, 1])  # c[n, 2j + 1]
        t = tile[:r]
        if symmetric:
            t.copy_(c.view(torch.int8).sub_(8).view(r, 2, ng, gh))
        elif zero_i8 is not None:
            d = c.view(torch.int8).view(r, 2, ng, gh)
            t.copy_(d.sub_(zero_i8[n0 : n0 + r].view(r, 1, ng, 1)))
        else:
            t.copy_(c.view(r, 2, ng, gh)).sub_(zf[n0 : n0 + r].view(r, 1, ng, 1))
        return t.mul_(sf[n0 : n0 + r].view(r, 1, ng, 1)).view(r, k)  # (c - z) * s: the spec's weight

    y = quant.tiled_mm(xp, n, rows, weight_tile)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# The smallest group the in-graph bit-mask GEMV takes where the CPU has a fast int8 GEMM (with
# AVX2 alone it takes 64: cpu_fused.bits_gemv_decline): see w4a16_linear_decomposed.
FAST_INT8_BITS_MIN_GROUP = 128


def bits_gemv_in_graph(m: int, group_size: int) -> bool:
    """Whether, on this CPU, w4a16_linear_decomposed lowers m tokens with groups of group_size to
    the bit-mask GEMV (it also checks the operands' layout)."""
    if cpu_onednn.cpu_has_amx() or not 1 <= m <= cpu_fused.BITS_GEMV_MAX_TOKENS:
        return False
    return not (cpu_onednn.int8_gemm_is_fast() and group_size < FAST_INT8_BITS_MIN_GROUP)


def w4a16_linear_decomposed(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
):
    """The spec in aten ops for Inductor's whole-graph CPU codegen (runtime/inductor_cpu.py), at a
    static 1-4 tokens on a CPU without AMX: the bit-mask GEMV over the packed codes
    (cpu_fused.int4_bits_dot_graph; the CPU face's GEMV on AVX2, less its per-call overhead). It
    reads the zero points even for symmetric weights: the values are not known while the graph is
    traced. Everything else declines with NotImplemented and keeps the CPU face: other token
    counts, group sizes under 64 (under FAST_INT8_BITS_MIN_GROUP where the CPU has a fast int8
    GEMM), and CPUs with AMX (there the face's GEMV over codes cached per weight was measured;
    this one was not).

    With AVX-512 VNNI too (Zen 5 EPYC, 2 threads), against the face's cached-code GEMV in one run:
    with g128 it wins at every shape measured. On 4 x 4096^2 layers it took 1.62 against 2.25 ms
    at 1 token, 3.29 against 4.56 at 2 and 5.81 against 7.31 at 4. On one layer at 1 token it took
    0.06 against 0.11 ms at 1536 x 576, 0.12 against 0.17 at 2048^2 and 0.37 against 0.46 at
    4096^2. It also keeps no unpacked copy of the codes (0.5 bytes per weight instead of 1.5).
    With g64 its 8-lane groups lose: 3.2 against 0.57 ms at 4096^2, 0.20 against 0.12 at
    576 x 1536 (SmolLM2's decode step went from 23.4 to 36.2 ms)."""
    n, kh = packed.shape
    k = kh * 2
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x.device.type != "cpu" or not isinstance(m, int) or not bits_gemv_in_graph(m, group_size):
        return NotImplemented
    if packed.dtype != torch.uint8 or zero.dtype != torch.uint8:
        return NotImplemented
    if k % group_size or scale.shape != (n, k // group_size) or zero.shape != (n, k // group_size):
        return NotImplemented
    y = cpu_fused.int4_bits_dot_graph(x2.float(), packed, scale.float().contiguous(), zero.contiguous(), group_size)
    if y is None:
        return NotImplemented
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _w4a16_linear_generic(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """The definition in plain ops (any device, autograd-visible): used off the CPU fast path."""
    n = packed.shape[0]
    k = packed.shape[1] * 2
    w = quant.dequantize_int4_groupwise(packed, scale, zero, group_size)
    y = x.reshape(-1, k).float() @ w.t()
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """Spec face: see the module docstring."""
    return w4a16_linear_spec(x, packed, scale, zero, group_size, bias)


@w4a16_linear.register_fake
def _(x, packed, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@w4a16_linear.register_kernel("cuda")
def _(x, packed, scale, zero, group_size, bias):
    from qhl.codegen.triton.weight_only import w4a16_linear_triton

    return w4a16_linear_triton(x, packed, scale, zero, group_size, bias)


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scale, zero, group_size, bias = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def _backward(ctx, grad: Tensor):
    packed, scale, zero = ctx.saved_tensors
    w = quant.dequantize_int4_groupwise(packed, scale, zero, ctx.group_size)
    grad_x = (grad.float() @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_b


w4a16_linear.register_autograd(_backward, setup_context=_setup_context)
