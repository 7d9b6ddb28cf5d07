"""Fused CPU prologue and epilogues of the int8 GEMM forms (w8a8, w4a8, w4a4), and the 1-token
GEMVs of the weight-only forms (`int4_gemv`, `int8_gemv_bits`, `int4_gemv_bits`; codegen/w8a16.py,
codegen/w4a16.py), compiled by Inductor.

The CPU faces of these ops are one exact int8 GEMM (`torch._int_mm`, oneDNN) between an
elementwise prologue and epilogue:

    prologue   s[m] = amax_k |x[m, k]| / qmax  (1 where not > 0)
               q[m, k] = clamp(round_half_even(x[m, k] / s[m]), -qmax, qmax) + offset
    GEMM       acc = q @ Wq^T  (int32, exact), or acc^T = Wq @ q^T, or acc * s_w from oneDNN
    epilogue   y[m, n] = ((acc[m, n] - comp[n]) * s_w[n]) * s[m] (+ b[n])

Run as eager ops, the prologue and epilogue are 8-10 passes over memory, each a separate
multi-threaded op: at 64 tokens on a 4096-wide layer they cost more than the GEMM itself on a CPU
with AMX (benchmarks/cpu_spec_notes.md). Here each is written once, as the plain PyTorch math
above, and Inductor fuses it into one C++ loop (one graph per function; the token count is a
dynamic dimension, so a new M does not recompile). The math is quant.quantize_per_token's bit for
bit (tests/test_cpu_fused.py checks the codes and scales equal, ties included); the epilogue is
the spec's float32 order.

Where Inductor cannot compile (no C++ compiler, or a compile fails), or with QHL_CPU_FUSED=0,
`enabled()` is False and the faces run their eager formulations instead, with the reason logged
once. The same check decides whether the torch.compile door may hand CPU graphs to Inductor.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["enabled", "disable_reason", "realized", "per_token_codes", "epilogue_rows", "epilogue_scaled", "epilogue_cols",
           "bits_gemv_decline", "int8_gemv_bits", "int4_gemv_bits", "BITS_GEMV_MAX_TOKENS",
           "int8_bits_gemv_worthwhile", "int8_bits_dot_graph", "int4_bits_dot_graph",
           "int4_gemv"]

log = logging.getLogger(__name__)

ENV_FLAG = "QHL_CPU_FUSED"
_state_lock = threading.Lock()
_disabled: Optional[str] = None  # why the fused path is off, once it is known to be


def _prologue(x: Tensor, qmax: int, offset: int, as_uint8: bool) -> tuple[Tensor, Tensor]:
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp(-qmax, qmax) + offset
    return q.to(torch.uint8 if as_uint8 else torch.int8), scale


def _epilogue_rows(acc: Tensor, comp: Optional[Tensor], w_scale: Tensor, x_scale: Tensor,
                   bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    if comp is not None:
        acc = acc - comp
    y = (acc.float() * w_scale) * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _epilogue_scaled(y: Tensor, x_scale: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    # y = acc * s_w already (the prepacked oneDNN GEMM, codegen/cpu_onednn.py).
    y = y * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _epilogue_cols(acc_t: Tensor, w_scale: Tensor, x_scale: Tensor, bias: Optional[Tensor],
                   out_dtype: torch.dtype) -> Tensor:
    # acc_t [N, M]: the transposed GEMM's result; the transpose back is read inside the fused loop,
    # and the output is written row-major (the op's fake face promises a contiguous result).
    y = (acc_t.t().float() * w_scale) * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).contiguous()


def _int4_gemv(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    # y[m, n] = sum_{G, j} x[m, G, j] * (c[n, G, j] - z[n, G]) * s[n, G]: each weight dequantized
    # inside one reduction over K; the codes are read once, as uint8. Not per-group partial sums
    # scaled afterwards: Inductor materialized those as an [m, N, K/g] float buffer (8 MiB a
    # 4096-wide layer at 8 tokens, g64), allocated afresh each call (8,160 page faults a call on
    # 4 x 4096^2 layers, 2x the time, once the heap was trimmed between calls).
    n, k = codes.shape
    groups = k // group_size
    w = (codes.view(n, groups, group_size).float() - zero.float()[..., None]) * scale[..., None]
    return (x.float().view(-1, 1, groups, group_size) * w[None]).sum((-1, -2))


# The bit-mask GEMVs (CPUs with AVX2 alone). Inductor's CPU codegen loads an int8 or int32 vector
# through a stack copy (at::vec's loadu(ptr, count) has no fast path for integer types in torch
# 2.13), a store-forwarding stall on every load: its GEMV over int8 codes ran at 11.9 ms a
# 4096 x 4096 layer against float32's 3.1. A float32 vector load has the fast path, so these
# functions take the weight's bytes viewed as float32 and reinterpret them as int32 inside the
# loop (a register bitcast). Each int32 lane holds 4 int8 codes (or 8 int4 codes).
# int8: code j is shifted to the top byte and the rest masked off, (w << (24 - 8j)) & 0xFF000000,
# which is q * 2^24 exactly, sign included (two's complement puts the code's sign in bit 31); its
# float32 conversion is exact (at most 8 significant bits), and it meets x[k] * 2^-24 (scaled once
# per call, exact unless |x| < 2^-102), so every product q * x rounds as the spec's does. (Shifting
# rather than masking in place and sign-extending with ((w & m) ^ s) - s is the same speed and
# fewer ops, which Inductor compiles faster in a whole-model graph.)
# int4: codes are unsigned, code j is masked in place, w & (0xF << 4j), and
# (c - z) * 2^(4j) = float(w & m) - z * 2^(4j) exactly, meeting x[k] * 2^(-4j). The top nibble is
# shifted down first ((w >> 4) & 0x0F000000), so that no mask reaches the int32 sign bit.


def _int8_bits_dot(xs: Tensor, w_bits: Tensor) -> Tensor:
    # xs [..., 4, K/4]: xs[..., j, l] = x[..., 4l + j] * 2^-24; w_bits [N, K/4]: the int8
    # weight's bytes as float32. Returns [..., N] = sum_k x[..., k] * q[n, k].
    w = w_bits.view(torch.int32)
    acc = None
    for j in range(4):
        top = w if j == 3 else w << (24 - 8 * j)
        q = top & -(1 << 24)
        term = q.float() * xs[..., j, None, :]
        acc = term if acc is None else acc + term
    return acc.sum(-1)


def _int8_gemv_bits(xs: Tensor, w_bits: Tensor, w_scale: Tensor) -> Tensor:
    # xs [4, K/4] (one token); y[0, n] = s_w[n] * sum_k x[k] * q[n, k].
    return (_int8_bits_dot(xs, w_bits) * w_scale)[None]


def _int4_bits_dot(xs: Tensor, w_bits: Tensor, scale: Optional[Tensor], zero: Optional[Tensor]) -> Tensor:
    # xs [..., 8, G, g/8]: xs[..., j, G, l] = x[..., G*g + 8l + j] * 2^(-4j) (2^-24 for j = 7);
    # w_bits [N, G, g/8]: the packed uint8 weight (two codes a byte, low nibble first) as float32;
    # scale [N, G, 1] float32 (None: all 1), zero [N, G, 1] uint8, or None when every zero point is 8
    # (symmetric: subtracting the constant 8 * 2^(4j) instead of reading z is ~10% faster; as an
    # int32 subtraction, Inductor split the loop in two and it ran 2x slower).
    # Returns [..., N] = sum_G s[n, G] * sum_{k in G} x[..., k] * (c[n, k] - z[n, G]).
    w = w_bits.view(torch.int32)
    z = None if zero is None else zero.float()
    acc = None
    for j in range(8):
        shift = 24 if j == 7 else 4 * j
        c = ((w >> 4) & 0x0F000000) if j == 7 else (w & (0xF << shift))
        if z is None:
            centered = c.float() - float(8 << shift)
        else:
            centered = c.float() - z * float(1 << shift)
        term = centered * xs[..., j, None, :, :]
        acc = term if acc is None else acc + term
    part = acc.sum(-1, keepdim=True)
    return (part if scale is None else part * scale).sum(-1).sum(-1)


def _int4_gemv_bits(xs: Tensor, w_bits: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
    # xs [8, G, g/8] (one token)
    return _int4_bits_dot(xs, w_bits, scale, zero)[None]


# Compiled per shape: the 1-token GEMVs vectorize their reductions only with a static inner length
# (the group, or K): 0.69 against 0.92 ms on a 4096 x 4096 layer. Their output rows (and the
# bit-mask GEMVs' group counts) are marked dynamic (`_mark_outer_dynamic`), so that the layer
# shapes of a model share one compiled graph per group size and K and stay under Dynamo's
# recompile limit (8 graphs a function; past it, a new shape would run eagerly).
_STATIC = ("int4_gemv", "int8_gemv_bits", "int4_gemv_bits")
_FUNCTIONS = {"prologue": _prologue, "rows": _epilogue_rows, "scaled": _epilogue_scaled, "cols": _epilogue_cols,
              "int4_gemv": _int4_gemv, "int8_gemv_bits": _int8_gemv_bits, "int4_gemv_bits": _int4_gemv_bits}


@functools.cache
def _compiled(name: str):
    return torch.compile(_FUNCTIONS[name], dynamic=name not in _STATIC, fullgraph=True)


def disable_reason() -> Optional[str]:
    """Why the fused path is off, or None while it is on."""
    if os.environ.get(ENV_FLAG, "1") == "0":
        return f"{ENV_FLAG}=0"
    if _disabled is None and _cxx() is None:
        _off(f"no C++ compiler for Inductor ({torch._inductor.config.cpp.cxx!r} not found)")
    return _disabled


def enabled() -> bool:
    """True when the fused prologue and epilogues can run here."""
    return disable_reason() is None


@functools.cache
def _cxx() -> Optional[str]:
    import torch._inductor.config as inductor_config

    names = [c for c in inductor_config.cpp.cxx if c] or ["g++"]
    return next((shutil.which(c) for c in names if shutil.which(c)), None)


def _off(reason: str) -> None:
    global _disabled
    with _state_lock:
        if _disabled is None:
            _disabled = reason
            log.warning("qhl: fused CPU prologue/epilogue off, eager ops instead: %s", reason)


_at_recompile_limit: set[str] = set()  # functions that reached Dynamo's recompile limit


def _call(name: str, *args):
    """The compiled function, or on any failure to compile it the same math eagerly (and the
    fused path off from then on, with the reason logged once).

    Dynamo's recompile limit (8 graphs a function) is not such a failure: a long-lived process
    that runs many layer shapes, dtypes, or inference-mode and ordinary tensors alike reaches
    it. From then on that function runs under the "eager_on_recompile" stance: the graphs it
    has keep serving (~5 us more a call), and a call that would need a new one runs eagerly at
    once, instead of Dynamo trying and failing to compile it on every call (~1 ms each,
    measured). The fused path stays on, and with it the torch.compile door's whole-graph Inductor
    path, which checks `enabled()`."""
    if _disabled is None:
        try:
            if name in _at_recompile_limit:
                with torch.compiler.set_stance("eager_on_recompile"):
                    return _compiled(name)(*args)
            return _compiled(name)(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if name not in _at_recompile_limit:
                _at_recompile_limit.add(name)
                log.warning("qhl: fused CPU %s reached Dynamo's recompile limit; a call needing a new graph "
                            "runs as eager ops from now on (the same math, slower)", name)
        except Exception as e:  # noqa: BLE001 - a broken toolchain must not break the op
            _off(f"Inductor could not compile the fused CPU {name} ({type(e).__name__}: {str(e)[:200]})")
    return _FUNCTIONS[name](*args)


def per_token_codes(x2: Tensor, qmax: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """(codes [M, K], scale float32 [M, 1]) of x2 [M, K]: int8 q, or uint8 q + 128 (offset=128)."""
    return _call("prologue", x2, qmax, offset, offset != 0)


def epilogue_rows(acc: Tensor, comp: Optional[Tensor], w_scale: Tensor, x_scale: Tensor,
                  bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """y [M, N] = ((acc - comp) * s_w) * s_x (+ b) from acc int32 [M, N]; comp int32 [N] or None."""
    return _call("rows", acc, comp, w_scale, x_scale, bias, out_dtype)


def epilogue_scaled(y: Tensor, x_scale: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """y [M, N] * s_x (+ b) from y = acc * s_w float32 [M, N] (the prepacked oneDNN GEMM's result)."""
    return _call("scaled", y, x_scale, bias, out_dtype)


def epilogue_cols(acc_t: Tensor, w_scale: Tensor, x_scale: Tensor, bias: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    """y [M, N] = (acc_t^T * s_w) * s_x (+ b) from the transposed GEMM's acc_t int32 [N, M]."""
    return _call("cols", acc_t, w_scale, x_scale, bias, out_dtype)


def _mark_outer_dynamic(*marks: tuple[Tensor, tuple[int, ...]]) -> None:
    for t, dims in marks:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def _bits_view(w: Tensor, lanes_shape: tuple[int, ...]) -> Optional[Tensor]:
    """w's bytes as float32 of shape lanes_shape, or None where they can't be viewed so."""
    if not _viewable(w):
        return None
    return w.view(torch.float32).view(lanes_shape)


# x's scale per code position in a lane, as [codes per lane, 1] float32 (made once, not per call)
_INT8_SHIFT_VALUES = (2.0**-24,) * 4
_INT4_SHIFT_VALUES = tuple(2.0 ** (-4 * j) for j in range(7)) + (2.0**-24,)
_INT8_SHIFTS = torch.tensor(_INT8_SHIFT_VALUES)[:, None]
_INT4_SHIFTS = torch.tensor(_INT4_SHIFT_VALUES)[:, None]


def _spread(x: Tensor, per_lane: int, shifts: Tensor) -> Tensor:
    """xs [per_lane, K / per_lane] with xs[j, l] = x[per_lane * l + j] * shifts[j] (exact: powers of 2)."""
    k = x.shape[-1]
    xs = torch.empty(per_lane, k // per_lane)
    torch.mul(x.reshape(k // per_lane, per_lane).t(), shifts, out=xs)
    return xs


def bits_gemv_decline(k: int, group_size: Optional[int] = None) -> Optional[str]:
    """Why the bit-mask GEMVs can't take a [N, K] weight (None when they can): the int32 lanes
    must tile K, and a group must fill an AVX2 vector of 8 lanes (64 int4 codes)."""
    if group_size is None:
        return None if k % 4 == 0 else f"K={k} is not a multiple of 4 (int8 codes per int32 lane)"
    if group_size % 64 or k % group_size:
        return f"group size {group_size} is not a multiple of 64 (one 8-lane vector of int4 codes)"
    return None


# Up to this many tokens the bit-mask GEMVs run once per token: measured on the AVX2 EPYC (2
# threads, 4 x Linear(4096, 4096)), float32 takes 14, 31, 50 and 55 ms at 1, 2, 3 and 4 tokens and
# ~55 ms at 8, while the int8 GEMV takes ~4.3 ms a token.
BITS_GEMV_MAX_TOKENS = 4
# The int8 GEMV only from this many weights up: a call costs ~110-150 us of Dynamo and OpenMP
# overhead, and below it the float32 paths win (576 x 576 at 1 token: w8a16 263 against 152 us,
# w8a8 489 against 286; 1536 x 576 about even; 2048 x 2048 404 against 691). w4a16's other path
# is slower at every size measured, so its GEMV has no floor.
INT8_BITS_GEMV_MIN_WEIGHTS = 1 << 20


def int8_bits_gemv_worthwhile(m: int, n: int, k: int) -> bool:
    """Whether w8a16 / w8a8 should take int8_gemv_bits for M tokens on an [N, K] weight."""
    return m <= BITS_GEMV_MAX_TOKENS and n * k >= INT8_BITS_GEMV_MIN_WEIGHTS


def _per_token(x2: Tensor, n: int, gemv) -> Tensor:
    """y [M, N]: gemv(x2[i : i + 1]) for each of the M tokens."""
    if x2.shape[0] == 1:
        return gemv(x2)
    y = torch.empty(x2.shape[0], n)
    for i in range(x2.shape[0]):
        y[i : i + 1] = gemv(x2[i : i + 1])
    return y


def int8_gemv_bits(x2: Tensor, w_int8: Tensor, w_scale: Tensor) -> Optional[Tensor]:
    """y [M, N] float32 = (x2 @ Wq^T) * s_w from x2 [M, K] float32 (M <= BITS_GEMV_MAX_TOKENS), Wq
    int8 [N, K], s_w float32 [N] (w8a16, and w8a8's codes, at few tokens on a CPU with AVX2
    alone), or None where Wq's bytes can't be viewed as int32 lanes (the caller keeps its other
    path)."""
    n, k = w_int8.shape
    bits = _bits_view(w_int8, (n, k // 4)) if bits_gemv_decline(k) is None else None
    if bits is None:
        return None
    _mark_outer_dynamic((bits, (0,)), (w_scale, (0,)))
    return _per_token(x2, n, lambda row: _call("int8_gemv_bits", _spread(row, 4, _INT8_SHIFTS), bits, w_scale))


def int4_gemv_bits(x2: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                   symmetric: bool = False) -> Optional[Tensor]:
    """y [M, N] float32 = x2 @ ((c - z) * s)^T per group, straight from the packed int4 weight
    (uint8 [N, K/2], low nibble first), scale float32 [N, K/g], zero uint8 [N, K/g] (w4a16 at few
    tokens, M <= BITS_GEMV_MAX_TOKENS, on a CPU with AVX2 alone); symmetric=True promises every
    zero point is 8. None where the layout doesn't fit (bits_gemv_decline)."""
    n, kh = packed.shape
    k, g = kh * 2, group_size
    groups = k // g
    bits = _bits_view(packed, (n, groups, g // 8)) if bits_gemv_decline(k, g) is None else None
    if bits is None:
        return None
    s3, z3 = scale.view(n, groups, 1), (None if symmetric else zero.view(n, groups, 1))
    _mark_outer_dynamic((bits, (0, 1)), (s3, (0, 1)), *(() if z3 is None else ((z3, (0, 1)),)))

    def gemv(row: Tensor) -> Tensor:
        xs = _spread(row, 8, _INT4_SHIFTS).view(8, groups, g // 8)
        _mark_outer_dynamic((xs, (1,)))
        return _call("int4_gemv_bits", xs, bits, s3, z3)

    return _per_token(x2, n, gemv)


# The same bit-mask GEMVs inside Inductor's whole-graph CPU codegen (runtime/inductor_cpu.py: the
# w8a16, w8a8, w4a16, w4a8 and w4a4 decompositions, at a static 1-4 tokens where the CPU has AVX2
# alone). There no compiled-helper call costs ~110-150 us of Dynamo and OpenMP overhead, which is
# what made a small layer's decode step slower than float32. x's spread lanes are forced into a contiguous
# buffer: left inline, the reduction reads them with stride 4 (or 8), and Inductor then vectorizes
# over the output rows with 8 x 8 transposes of the weight instead (2.5-4x slower, measured).
def realized(x: Tensor, strides: Optional[list[int]] = None) -> Tensor:
    """x in Inductor's graph as a buffer of its own, with these (default: contiguous) strides.
    Inductor otherwise inlines a pointwise producer into each consumer's loop: a GEMV over x would
    recompute the previous layer's epilogue (acc * s + b, three loads) once per output row. w8a16
    on 4 x 4096^2 layers at 1 token: 3.11 ms inlined, 1.37 ms realized (Zen 5 EPYC, 2 threads)."""
    import torch._inductor.inductor_prims  # noqa: F401 - registers prims.inductor_force_stride_order

    if strides is None:
        strides = [1]
        for size in reversed(x.shape[1:]):
            strides.insert(0, strides[0] * size)
    return torch.ops.prims.inductor_force_stride_order(x, strides)


def _spread_graph(x2: Tensor, per_lane: int, lead: tuple[int, ...]) -> Tensor:
    """xs [M, per_lane, *lead, L] (M, K = x2.shape; L = K / per_lane / prod(lead)) with
    xs[m, j, ..., l] = x2[m, per_lane * (flat lead, l) + j] * shift_j, realized contiguous; shift_j
    is 2^-24 for int8 codes and 2^(-4j) for int4 (2^-24 for j = 7), as in the dot products above."""
    m, k = x2.shape
    x3 = x2.reshape(m, *lead, -1, per_lane)
    if per_lane == 4:
        xs = x3.movedim(-1, 1) * _INT8_SHIFT_VALUES[0]
    else:
        xs = torch.stack([x3[..., j] * _INT4_SHIFT_VALUES[j] for j in range(per_lane)], dim=1)
    return realized(xs)


def int8_bits_dot_graph(x2: Tensor, w_int8: Tensor) -> Optional[Tensor]:
    """[M, N] float32 = x2 @ Wq^T in aten ops for Inductor's graph (x2 [M, K] float32, M a small
    static count; Wq int8 [N, K]); None where Wq's bytes can't be viewed as int32 lanes."""
    n, k = w_int8.shape
    if bits_gemv_decline(k) is not None or not _viewable(w_int8):
        return None
    return _int8_bits_dot(_spread_graph(x2, 4, ()), w_int8.view(torch.float32))


def int4_bits_dot_graph(x2: Tensor, packed: Tensor, scale: Optional[Tensor], zero: Optional[Tensor],
                        group_size: int) -> Optional[Tensor]:
    """[M, N] float32 = x2 @ ((c - z) * s)^T per group, in aten ops for Inductor's graph (the
    arguments as int4_gemv_bits's; zero None when every zero point is 8, scale None when every
    scale is 1: w4a8/w4a4's codes, scaled per channel after); None where the layout doesn't fit
    (bits_gemv_decline)."""
    n, kh = packed.shape
    k, g = kh * 2, group_size
    if bits_gemv_decline(k, g) is not None or not _viewable(packed):
        return None
    groups = k // g
    xs = _spread_graph(x2, 8, (groups,))
    w_bits = packed.view(torch.float32).view(n, groups, g // 8)
    z3 = None if zero is None else zero.view(n, groups, 1)
    s3 = None if scale is None else scale.view(n, groups, 1)
    return _int4_bits_dot(xs, w_bits, s3, z3)


def _viewable(w: Tensor) -> bool:
    return w.is_contiguous() and w.storage_offset() % 4 == 0 and (w.shape[-1] * w.element_size()) % 4 == 0


def int4_gemv(x2: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """y [M, N] float32 = x2 @ ((codes - zero) * scale)^T per group, from unpacked uint8 codes [N, K]
    (w4a16 at 1-8 tokens: codegen/w4a16.py). The token count is dynamic too (above 1: a size-1 dim
    is specialised), so 2-8 tokens share one graph per K and group."""
    _mark_outer_dynamic((x2, (0,)), (codes, (0,)), (scale, (0,)), (zero, (0,)))
    return _call("int4_gemv", x2, codes, scale, zero, group_size)
