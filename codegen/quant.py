"""Quantization math shared by every quantized form: the reference definitions.

Conventions (one set, used by the spec, the Triton kernels and the ONNX translations):

* int8, symmetric:  s = amax / 127,  q = clamp(round_half_even(v / s), -127, 127),  v ~ q * s.
  Activations: one scale per token (row of the flattened [T, K] input), computed at run time.
  Weights [N, K]: one scale per output channel (row).
* int4, group-wise along K (group g in {32, 64, 128}), stored as unsigned 4-bit codes c in [0, 15]:
  symmetric:  s = r * amax / 7,       c = clamp(round(w / s) + 8, 0, 15),  zero z = 8
              (or, weight_clip="grid", per group the closest of that, s = max(max / 7, -min / 8) and
              s = -max(max / 8, -min / 7), the last two with q in [-8, 7] and nothing clipped;
              the last scale is negative, which (c - z) * s dequantizes as any other;
              "grid_clip" adds s = amax / 7.5 on [-8, 7], which clips a positive peak)
  asymmetric: s = r * (max - min) / 15,  z = clamp(round(-r * min / s), 0, 15),
              c = clamp(round(w / s) + z, 0, 15)
  with clip ratio r = 1 (plain round-to-nearest) or chosen per group by least squared error.
  and w ~ (c - z) * s. Two codes per byte along K: byte[k // 2] = c[2j] | c[2j+1] << 4.
  This is ONNX's DequantizeLinear with a uint4 `block_size` layout, so the export is direct.
* int4, symmetric per output channel (w4a8 / w4a4, QuaRot's weights): s = r * amax(|row|) / 7,
  q = clamp(round(w / s), -7, 7), stored as c = q + 8 with the same two-per-byte packing.
  Activations of those forms: per token with qmax = 2^(bits-1) - 1 (127 or 7), in int8 storage.

A zero amax gives scale 1 (not 0), so all-zero rows and groups dequantize to exactly 0.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "INT8_QMAX",
    "quantize_per_token",
    "dequantize_per_token",
    "quantize_int8_per_channel",
    "quantize_int4_groupwise",
    "pack_int4",
    "unpack_int4",
    "dequantize_int4_groupwise",
    "fake_quant_w8a8_linear",
    "fake_quant_w8a16_linear",
    "fake_quant_w4a16_linear",
    "quantize_per_token_bits",
    "quantize_int4_per_channel",
    "unpack_int4_signed",
    "dequantize_int4_per_channel",
    "fake_quant_w4a8_linear",
    "fake_quant_w4a4_linear",
]

INT8_QMAX = 127


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N], exact, on any device and shape.

    torch._int_mm on CUDA needs M > 16 and K, N multiples of 8 (it raises otherwise: decode-sized
    inputs hit this). There the product is taken in float64 instead, which is exact: every
    partial sum is an integer of magnitude <= 128 * 128 * K < 2^53."""
    if a.is_cuda and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        return (a.double() @ b.double()).to(torch.int32)
    return torch._int_mm(a, b)


def div_scalar(t: Tensor, c: float) -> Tensor:
    """t / c with IEEE division on every device. On CUDA, PyTorch divides by a Python scalar as a
    multiply by its reciprocal (1 ulp off for some t, so a scale would differ from the Triton
    kernels' tl.math.div_rn and the CPU's); dividing by a 0-d tensor on t's device is IEEE."""
    return t / (t.new_full((), float(c)) if t.is_cuda else c)


def _safe_scale(amax: Tensor, qmax: float) -> Tensor:
    scale = div_scalar(amax, qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale float32 [..., 1]); symmetric, one scale per row."""
    xf = x.float()
    scale = _safe_scale(xf.abs().amax(dim=-1, keepdim=True), INT8_QMAX)
    q = torch.round(xf / scale).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def quantize_per_token_bits(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """quantize_per_token with `bits`-bit codes in int8 storage: qmax = 2^(bits-1) - 1,
    s = amax / qmax, q = clamp(round(x / s), -qmax, qmax). bits=8 is quantize_per_token exactly;
    bits=4 gives codes in [-7, 7] (QuaRot's symmetric 4-bit activations)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: per-token activation codes need 2 <= bits <= 8 (int8 storage)")
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    scale = _safe_scale(xf.abs().amax(dim=-1, keepdim=True), qmax)
    q = torch.round(xf / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_per_token(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale


def quantize_int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (q int8 [N, K] contiguous, scale float32 [N])."""
    q, scale = quantize_per_token(w)
    return q.contiguous(), scale.squeeze(-1).contiguous()


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] in [0, 15] (K even) -> uint8 [N, K // 2], low nibble = even k."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [N, K // 2] -> uint8 codes [N, K]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


# Clip ratios tried by the MSE scale search for int4 (1.0 = plain round-to-nearest of amax).
# Measured with qhl's compiled SmolLM2-135M, 4x512 tokens (logits SQNR dB / perplexity, float32
# 30.885; benchmarks/results/fidelity_avx2.md), and MiniLM-L6 g128 (embedding cosine mean / min):
#                  plain           mse             torchao          "grid"           "grid_clip"
#   SmolLM2 g64    2.75 / 47.81    7.28 / 41.39    6.37 / 42.45     7.98 / 39.08     9.12 / 38.52
#   SmolLM2 g128   12.16 / 34.50   11.26 / 34.78   12.08 / 34.38    12.66 / 33.51    12.03 / 33.75
#   MiniLM g128    .9228 / .8869   .9510 / .9295   .9328 / .9152    .9377 / .9162    .9390 / .9165
# (g128 rewrites only SmolLM2's 30 down projections.) Least weight error over many clip ratios
# is not least output error everywhere (mse loses at g128). Adding torchao's clipped amax / 7.5
# to the grids ("grid_clip") helps at g64 and costs 0.6 dB at g128, where it falls under plain
# rounding; "grid" clips nothing and beats plain rounding and torchao in every row, so the w4a16
# preset uses it (six windows each: benchmarks/results/int4_grid_choice.md).
INT4_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 ... 0.6
GROUPWISE_CLIPS = ("grid", "grid_clip")  # scale choices that exist only for group-wise int4
WEIGHT_CLIPS = (*GROUPWISE_CLIPS, "mse", "none")


def _int4_params(groups: Tensor, symmetric: bool, ratio: float) -> tuple[Tensor, Tensor]:
    """(scale, zero) of each group for one clip ratio."""
    if symmetric:
        scale = _safe_scale(groups.abs().amax(dim=-1) * ratio, 7.0)
        return scale, torch.full_like(scale, 8.0)
    gmin = groups.amin(dim=-1).clamp(max=0.0) * ratio
    gmax = groups.amax(dim=-1).clamp(min=0.0) * ratio
    scale = _safe_scale(gmax - gmin, 15.0)
    return scale, torch.round(-gmin / scale).clamp_(0, 15)


def _int4_codes(groups: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (torch.round(groups / scale[..., None]) + zero[..., None]).clamp_(0, 15)


def _int4_error(groups: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Squared error of each group dequantized with (scale, zero)."""
    return ((_int4_codes(groups, scale, zero) - zero[..., None]) * scale[..., None] - groups).pow_(2).sum(-1)


def _int4_grid_scales(groups: Tensor, with_clip: bool) -> tuple[Tensor, ...]:
    """The grids that weight_clip="grid" tries besides amax / 7 on q in [-7, 7], both on [-8, 7]:

    * max(max / 7, -min / 8): the finest scale that clips nothing. A group whose negative side is
      the larger puts its peak on q = -8 exactly, with a step down to 7/8 of amax / 7's;
    * -max(max / 8, -min / 7): the same grid mirrored. A negative scale flips [-8, 7] to cover
      [-7s', 8s'] in weight units (s' = |s|), so a positive peak lands on q = -8 exactly.
    The codes [-8, 7] are asymmetric; the two signs of the scale let either side of a group use
    the 16th level. Every face dequantizes (c - 8) * s, which holds for either sign.
    with_clip ("grid_clip") first adds amax / 7.5 (torchao's int4 grid): all 16 levels, a positive
    peak saturates at 7s = 0.93 amax.
    """
    peak_pos = groups.amax(dim=-1).clamp(min=0.0)
    peak_neg = groups.amin(dim=-1).neg().clamp(min=0.0)
    unclipped = (
        _safe_scale(torch.maximum(peak_pos / 7, peak_neg / 8), 1.0),
        _safe_scale(torch.maximum(peak_pos / 8, peak_neg / 7), 1.0).neg_(),
    )
    return ((_safe_scale(groups.abs().amax(dim=-1), 7.5),) if with_clip else ()) + unclipped


def quantize_int4_groupwise(
    w: Tensor, group_size: int, symmetric: bool = True, clip: str = "none"
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], scale float32 [N, K/g], zero uint8 [N, K/g]).
    (clip="grid" may give a group a negative scale; w ~ (c - z) * s either way.)

    clip="none": the scale spans each group's full range (round-to-nearest).
    clip="mse": per group, the clip ratio in INT4_CLIP_RATIOS whose dequantized group is closest
    to the float group (least squared error).
    clip="grid" (symmetric only; asymmetric groups get "none"): per group, whichever of three
    symmetric grids that clip nothing is closest to the float group (least squared error; ties
    keep the earlier): s = amax / 7 with q in [-7, 7] (plain rounding, amax exact), and with q in
    [-8, 7] s = max(max / 7, -min / 8) (the finest grid that clips nothing) or
    s = -max(max / 8, -min / 7) (that grid mirrored: a negative scale, so a positive peak takes
    q = -8). clip="grid_clip": the same with s = amax / 7.5 on [-8, 7] (torchao's int4 grid; +amax
    saturates at 7s = 0.93 amax) tried second. See _int4_grid_scales.
    A compile-time choice of scale only: the stored format (codes q + 8, zero 8) and the
    dequantization are the same for every choice.
    K must be divisible by group_size (and even); callers check and decline otherwise.
    """
    if clip not in WEIGHT_CLIPS:
        raise ValueError(f"clip={clip!r}; valid: {WEIGHT_CLIPS}")
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    scale, zero = _int4_params(groups, symmetric, 1.0)
    if clip == "mse":
        best_err = None
        for ratio in INT4_CLIP_RATIOS:
            s, z = _int4_params(groups, symmetric, ratio)
            err = _int4_error(groups, s, z)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
            best_err = torch.minimum(err, best_err)
    elif clip in GROUPWISE_CLIPS and symmetric:
        best_err = _int4_error(groups, scale, zero)
        for s in _int4_grid_scales(groups, with_clip=clip == "grid_clip"):
            err = _int4_error(groups, s, zero)
            better = err < best_err
            scale, best_err = torch.where(better, s, scale), torch.minimum(err, best_err)
    codes = _int4_codes(groups, scale, zero)
    packed = pack_int4(codes.reshape(n, k).to(torch.uint8))
    return packed, scale.contiguous(), zero.to(torch.uint8).contiguous()


def dequantize_int4_groupwise(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The float32 [N, K] weight that (packed, scale, zero) stand for."""
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    groups = codes.reshape(n, k // group_size, group_size)
    w = (groups - zero.float()[..., None]) * scale[..., None]
    return w.reshape(n, k)


def quantize_int4_per_channel(w: Tensor, clip: str = "none") -> tuple[Tensor, Tensor]:
    """w [N, K] (K even) -> (packed uint8 [N, K/2], scale float32 [N]): symmetric int4, one scale
    per output channel (QuaRot's weights). Codes q = clamp(round(w / s), -7, 7) are stored as
    q + 8 in [1, 15] with pack_int4's layout (the w4a16 symmetric convention, zero point 8).

    clip="none": s = amax(|row|) / 7. clip="mse": per row, the ratio r in INT4_CLIP_RATIOS with
    the least squared weight error, s = r * amax / 7 (the same search as the group-wise case,
    with the whole row as the group).
    """
    if clip not in ("mse", "none"):
        raise ValueError(
            f"clip={clip!r}; per-channel int4 takes 'mse' or 'none' ('grid' and 'grid_clip' are group-wise only)"
        )
    n, k = w.shape
    if k % 2:
        raise ValueError(f"int4 packing needs an even K, got K={k}")
    wf = w.float()
    amax = wf.abs().amax(dim=-1, keepdim=True)

    def codes_for(scale: Tensor) -> Tensor:  # q in [-7, 7]: a clipped scale saturates at +-7, not -8
        return torch.round(wf / scale).clamp_(-7, 7)

    scale = _safe_scale(amax, 7.0)
    if clip == "mse":
        best_err = None
        buf = torch.empty_like(wf)  # one temporary for all ratios: the search is memory-bound
        for ratio in INT4_CLIP_RATIOS:
            s = _safe_scale(amax * ratio, 7.0)
            torch.div(wf, s, out=buf).round_().clamp_(-7, 7).mul_(s).sub_(wf).pow_(2)
            err = buf.sum(-1, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            scale = torch.where(err < best_err, s, scale)
            best_err = torch.minimum(err, best_err)
    codes = codes_for(scale) + 8  # in [1, 15]
    return pack_int4(codes.to(torch.uint8)), scale.reshape(n).contiguous()


def unpack_int4_signed(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] (codes q + 8) -> int8 q [N, K] (in [-7, 7] for quantize_int4_per_channel)."""
    return unpack_int4(packed).view(torch.int8).sub_(8)


def dequantize_int4_per_channel(packed: Tensor, scale: Tensor) -> Tensor:
    """The float32 [N, K] weight that (packed, scale) stand for."""
    return unpack_int4_signed(packed).float() * scale[:, None]


# --- fake-quant references: the slow, obvious definitions the fast faces are tested against ---


def fake_quant_w8a8_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """float64 dequant(quant(x)) @ dequant(quant(w)).T (+ b): what w8a8 must compute."""
    xq, xs = quantize_per_token(x)
    wq, ws = quantize_int8_per_channel(w)
    y = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).T
    return y if bias is None else y + bias.double()


def fake_quant_w8a16_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    wq, ws = quantize_int8_per_channel(w)
    y = x.double() @ (wq.double() * ws.double()[:, None]).T
    return y if bias is None else y + bias.double()


def fake_quant_w4a16_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, group_size: int, symmetric: bool = True, clip: str = "none"
) -> Tensor:
    packed, scale, zero = quantize_int4_groupwise(w, group_size, symmetric, clip)
    wd = dequantize_int4_groupwise(packed, scale, zero, group_size).double()
    y = x.double() @ wd.T
    return y if bias is None else y + bias.double()


def _fake_quant_w4ax_linear(x: Tensor, w: Tensor, bias: Tensor | None, bits: int, clip: str) -> Tensor:
    xq, xs = quantize_per_token_bits(x, bits)
    packed, ws = quantize_int4_per_channel(w, clip)
    y = (xq.double() * xs.double()) @ dequantize_int4_per_channel(packed, ws).double().T
    return y if bias is None else y + bias.double()


def fake_quant_w4a8_linear(x: Tensor, w: Tensor, bias: Tensor | None, clip: str = "none") -> Tensor:
    """float64 Q8(x) @ Q4(W).T (+ b): per-token 8-bit activations, per-channel int4 weights."""
    return _fake_quant_w4ax_linear(x, w, bias, 8, clip)


def fake_quant_w4a4_linear(x: Tensor, w: Tensor, bias: Tensor | None, clip: str = "none") -> Tensor:
    """float64 Q4(x) @ Q4(W).T (+ b): per-token 4-bit activations ([-7, 7]), int4 weights."""
    return _fake_quant_w4ax_linear(x, w, bias, 4, clip)


# --- CPU helpers for the spec faces (private) ---------------------------------------------------
#
# The spec faces are also the CPU implementation of the ops. These helpers let them compute exactly
# the definitions above with fewer passes over memory and fewer fresh large allocations (a fresh
# multi-MB CPU tensor pays a page fault per 4 KiB page on first touch, often more than the
# arithmetic that fills it).

_scratch_tls = threading.local()
_SCRATCH_MIN_BYTES = 1 << 18  # below this a fresh allocation is cheaper than the bookkeeping
_SCRATCH_MAX_BYTES = 32 << 20  # above this, do not keep the memory around between calls


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of `shape`, with undefined contents, reused across calls on this thread.

    Only for intermediates that never leave the calling function: the next call with the same
    `name` on this thread overwrites it.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _SCRATCH_MIN_BYTES or nbytes > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    bufs = _scratch_tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < nbytes:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buf = torch.empty(nbytes, dtype=torch.uint8)
        bufs[name] = buf
    return buf[:nbytes].view(dtype).view(shape)


def _cpu_fast_path_ok(*tensors: Tensor | None) -> bool:
    """True when the spec faces may use their CPU implementations: plain (or Parameter) CPU
    tensors, and no autograd graph to record (out= and in-place ops are used on fresh tensors)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
        if t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


def _per_token_scale(xf: Tensor) -> Tensor:
    """quantize_per_token's scale of float32 [M, K] rows, bit for bit: amax(|x|) / 127 (1 where
    that is not > 0). max(amax(x), -amin(x)) reads x twice but writes no |x| temporary."""
    if xf.numel() * 4 >= _SCRATCH_MIN_BYTES:
        amax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    return _safe_scale(amax, INT8_QMAX)


# Up to this many tokens tiled_mm fills whole rows of y^T [N, M] (torch.mm(tile, x^T)); above, column
# slices of y [M, N] (torch.mm(x, tile^T, out=y[:, n0:n0 + r])). Zen 5 EPYC, 2 threads, w8a16's
# face, column slices against rows: 4 x 4096^2 layers at 17 / 32 / 48 tokens 45 / 57 / 71 against
# 23 / 26 / 36 ms (eager float32 30 / 41 / 53), erratic from run to run; at 256 a tie (161 / 158).
# SmolLM2's 576 x 49152 LM head at 512 tokens: 184 against 281 ms (transposing a 100 MB y^T back
# costs more than the slices); its 576-wide layers at 128-512 tokens: rows 3-16% slower.
ROW_TILES_MAX_TOKENS = 64


def tiled_mm(x2: Tensor, n: int, rows: int, weight_tile: Callable[[int, int], Tensor]) -> Tensor:
    """x2 [M, K] float32 @ W^T as a contiguous float32 [M, N], W [N, K] dequantized `rows` rows at
    a time by weight_tile(n0, r) -> float32 [r, K] (a reused buffer that stays in cache for the
    GEMM): the weight-only CPU faces' path above their GEMVs' token counts. The sums are the same
    for either output layout (ROW_TILES_MAX_TOKENS)."""
    m = x2.shape[0]
    if m > ROW_TILES_MAX_TOKENS:
        y = torch.empty(m, n)
        for n0 in range(0, n, rows):
            r = min(rows, n - n0)
            torch.mm(x2, weight_tile(n0, r).t(), out=y[:, n0 : n0 + r])
        return y
    yt = torch.empty(n, m)
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        torch.mm(weight_tile(n0, r), x2.t(), out=yt[n0 : n0 + r])
    return yt.t().contiguous()
