"""Quantization math shared by every quantized form: the reference definitions.

Conventions (one set, used by the spec, the Triton kernels and the ONNX translations):

* int8, symmetric:  s = amax / 127,  q = clamp(round_half_even(v / s), -127, 127),  v ~ q * s.
  Activations: one scale per token (row of the flattened [T, K] input), computed at run time.
  Weights [N, K]: one scale per output channel (row).
* int4, group-wise along K (group g in {32, 64, 128}), stored as unsigned 4-bit codes c in [0, 15]:
  symmetric:  s = amax / 7,           c = clamp(round(w / s), -8, 7) + 8,  zero z = 8
  asymmetric: s = (max - min) / 15,   z = clamp(round(-min / s), 0, 15),
              c = clamp(round(w / s) + z, 0, 15)
  and w ~ (c - z) * s. Two codes per byte along K: byte[k // 2] = c[2j] | c[2j+1] << 4.
  This is ONNX's DequantizeLinear with a uint4 `block_size` layout, so the export is direct.

A zero amax gives scale 1 (not 0), so all-zero rows and groups dequantize to exactly 0.
"""
from __future__ import annotations

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
]

INT8_QMAX = 127


def _safe_scale(amax: Tensor, qmax: float) -> Tensor:
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale float32 [..., 1]); symmetric, one scale per row."""
    xf = x.float()
    scale = _safe_scale(xf.abs().amax(dim=-1, keepdim=True), INT8_QMAX)
    q = torch.round(xf / scale).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
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


def quantize_int4_groupwise(
    w: Tensor, group_size: int, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], scale float32 [N, K/g], zero uint8 [N, K/g]).

    K must be divisible by group_size (and even); callers check and decline otherwise.
    """
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = _safe_scale(groups.abs().amax(dim=-1), 7.0)
        zero = torch.full_like(scale, 8.0)
        codes = torch.round(groups / scale[..., None]).clamp_(-8, 7) + 8
    else:
        gmin = groups.amin(dim=-1).clamp(max=0.0)
        gmax = groups.amax(dim=-1).clamp(min=0.0)
        scale = _safe_scale(gmax - gmin, 15.0)
        zero = torch.round(-gmin / scale).clamp_(0, 15)
        codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp_(0, 15)
    packed = pack_int4(codes.reshape(n, k).to(torch.uint8))
    return packed, scale.contiguous(), zero.to(torch.uint8).contiguous()


def dequantize_int4_groupwise(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The float32 [N, K] weight that (packed, scale, zero) stand for."""
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    groups = codes.reshape(n, k // group_size, group_size)
    w = (groups - zero.float()[..., None]) * scale[..., None]
    return w.reshape(n, k)


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
    x: Tensor, w: Tensor, bias: Tensor | None, group_size: int, symmetric: bool = True
) -> Tensor:
    packed, scale, zero = quantize_int4_groupwise(w, group_size, symmetric)
    wd = dequantize_int4_groupwise(packed, scale, zero, group_size).double()
    y = x.double() @ wd.T
    return y if bias is None else y + bias.double()
