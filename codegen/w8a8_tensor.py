"""qhl::w8a8_tensor_linear — int8 weights per output channel, dynamic per-tensor uint8 activations.

    q, s, z = D(x)                                   ONNX DynamicQuantizeLinear over the whole x
    acc[m, n] = sum_k (q[m, k] - z) * Wq[n, k]       exact in int32
    y[m, n]   = acc[m, n] * (s * s_w[n]) (+ b[n])    float32, stored in x's dtype

D is ONNX's DynamicQuantizeLinear, as ONNX Runtime computes it (its DynamicQuantizeMatMul kernel):

    lo = min(0, min(x)),  hi = max(0, max(x))
    s  = (hi - lo) / 255, or 1 where hi == lo (x all zero)
    z  = round_half_even(clamp(0 - lo / s, 0, 255))               uint8
    q  = clamp(round_half_even(x / s) + z, 0, 255)                uint8

One scale and zero point for the whole activation tensor (all tokens of the call), asymmetric:
the range [lo, hi] gets all 256 codes. This is ONNX Runtime's own dynamic quantization
(`quantize_dynamic`), so the ONNX face is the standard op pattern ORT fuses into one
`DynamicQuantizeMatMul` kernel: quantize and GEMM in one pass, which the per-token form (w8a8)
cannot get in ORT. The weights stay qhl's per-channel int8 (ORT's quantize_dynamic defaults to one
scale per weight tensor). The epilogue multiplies by the product s * s_w[n], the order ORT's fused
kernel uses. Per-tensor activations are coarser than per-token ones: the form suits encoders
without outlier channels; on LLM activations per-token (w8a8) is the accurate choice (the README
has both measured).

Faces:
  spec    this file: D in torch ops, the integer GEMM on the CPU as u8 x s8 (`torch._int_mm`,
          exact where the CPU has VNNI/AMX) minus z * sum_k Wq[n, k], else on the codes - 128 as
          int8 plus (128 - z) * sum_k Wq[n, k]; the column sums are cached once per weight. Where
          the CPU has no fast int8 GEMM (AVX2 alone) a float32 GEMM over the exact integer
          products (float32 sums), like w8a8's 'f32' plan; w8a8_tensor_linear_decomposed is the
          same math in aten ops, which Inductor's CPU codegen lowers 5+ tokens to (the column sums
          as an extra row of ones in the GEMM, since a graph holds no per-weight cache);
  fake    shape [..., N], dtype of x;
  kernel  codegen/triton/w8a8_tensor.py (CUDA);
  grad    straight-through for x: dx = dy @ (Wq * s_w); db = sum(dy). The weight is frozen;
  onnx    codegen/onnx/w8a8_tensor.py: DynamicQuantizeLinear + MatMulInteger + Cast + Mul + Add
          (ORT fuses it into DynamicQuantizeMatMul); target "onnxruntime" writes that op itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import cpu_onednn, quant
from qhl.codegen import w8a8
from qhl.codegen.w8a8 import float_codes
from qhl.runtime.packed import DerivedCache

__all__ = ["w8a8_tensor_linear", "w8a8_tensor_linear_spec", "w8a8_tensor_linear_decomposed",
           "quantize_per_tensor_u8", "int_gemm_zero_point", "fake_quant_w8a8_tensor_linear",
           "weight_column_sums"]

QMAX_U8 = 255
DECOMPOSE_MIN_TOKENS = 4  # fewer tokens: the op's CPU face (a GEMV; the extra row would double it)

# sum_k Wq[n, k] (int32 [N]) of each int8 weight: the zero-point correction of the integer GEMM.
weight_column_sums = DerivedCache(lambda w_int8: w_int8.sum(dim=1, dtype=torch.int32))


def quantize_per_tensor_u8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX DynamicQuantizeLinear of x (any shape, non-empty): (q uint8 like x, s float32 [],
    z float32 [] holding an integer in [0, 255]). The float operations are ORT's, in its order."""
    xf = x.float()
    lo, hi = torch.aminmax(xf)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    s = torch.where(hi == lo, torch.ones_like(hi), quant.div_scalar(hi - lo, QMAX_U8))
    z = torch.round((0.0 - lo / s).clamp(0.0, QMAX_U8))
    q = torch.round(xf / s).add_(z).clamp_(0, QMAX_U8).to(torch.uint8)
    return q, s, z


def int_gemm_zero_point(q: Tensor, z: Tensor, w_int8: Tensor) -> Tensor:
    """acc [M, N] = sum_k (q[m, k] - z) * Wq[n, k] for q uint8 [M, K], z a 0-d integer-valued
    tensor, Wq int8 [N, K] contiguous: int32 and exact on a CPU with a fast int8 GEMM, else
    float32 with exact products and float32 sums (a CPU with AVX2 alone). Any device: off the CPU
    the plain int32 form."""
    zi = z.to(torch.int32)
    if q.device.type == "cpu" and not cpu_onednn.int8_gemm_is_fast():
        # plan 'f32' (w8a8.py): |(q - z) * Wq| <= 255 * 127 is exact in float32
        return torch.mm(q.float() - z, float_codes(w_int8).t())
    col = weight_column_sums(w_int8)
    if q.device.type == "cpu" and cpu_onednn.u8s8_int_mm_exact():
        # u8 x s8: VNNI accumulates every product exactly (without it VPMADDUBSW saturates pairs)
        return torch._int_mm(q, w_int8.t()).sub_(col * zi)
    c = (q ^ 0x80).view(torch.int8)  # q - 128, in [-128, 127]
    return quant.int_mm(c, w_int8.t()).add_(col * (128 - zi))


def w8a8_tensor_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                            bias: Optional[Tensor]) -> Tensor:
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    if not w_int8.is_contiguous():
        w_int8 = w_int8.contiguous()
    q, s, z = quantize_per_tensor_u8(x2)
    acc = int_gemm_zero_point(q, z, w_int8)
    y = acc.float().mul_(s * w_scale.float())
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def fake_quant_w8a8_tensor_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """float64 dequant(D(x)) @ dequant(quant(w)).T (+ b): what w8a8-tensor must compute."""
    q, s, z = quantize_per_tensor_u8(x)
    wq, ws = quant.quantize_int8_per_channel(w)
    y = ((q.double() - z.double()) * s.double()) @ (wq.double() * ws.double()[:, None]).T
    return y if bias is None else y + bias.double()


@torch.library.custom_op("qhl::w8a8_tensor_linear", mutates_args=())
def w8a8_tensor_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor]) -> Tensor:
    """Spec face: see the module docstring."""
    return w8a8_tensor_linear_spec(x, w_int8, w_scale, bias)


@w8a8_tensor_linear.register_fake
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@w8a8_tensor_linear.register_kernel("cuda")
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from qhl.codegen.triton.w8a8_tensor import w8a8_tensor_linear_triton

    return w8a8_tensor_linear_triton(x, w_int8, w_scale, bias)


# The same straight-through gradient as w8a8's (dx = dy @ (Wq * s_w), db = sum(dy); Wq frozen).
w8a8_tensor_linear.register_autograd(w8a8.straight_through_backward, setup_context=w8a8.save_weight_for_backward)


def w8a8_tensor_linear_decomposed(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                                  bias: Optional[Tensor]):
    """The spec in aten ops, for Inductor's CPU codegen (runtime/inductor_cpu.py): D becomes a fused
    min/max reduction and quantize loop, the GEMM one extern s8 `_int_mm`, the epilogue a fused
    loop. The zero-point correction needs sum_k Wq[n, k], which the CPU face caches per weight;
    a graph cannot (its weights are inputs), so a row of ones rides along in the GEMM: row m of
    [q - 128; 1] @ Wq^T is the column sums, at the cost of one more row (free for a GEMV, which
    reads the weight once either way). Exact in int32. Returns NotImplemented (the op stays a call
    to its CPU face) off the CPU and where the CPU has no fast int8 GEMM."""
    if x.device.type != "cpu" or not cpu_onednn.int8_gemm_is_fast():
        return NotImplemented
    n, k = w_int8.shape
    m = x.reshape(-1, k).shape[0]
    if not isinstance(m, int) or m <= DECOMPOSE_MIN_TOKENS:
        return NotImplemented
    xf = x.reshape(-1, k).float()
    lo = xf.amin().clamp(max=0.0)
    hi = xf.amax().clamp(min=0.0)
    s = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / QMAX_U8)
    z = torch.round((0.0 - lo / s).clamp(0.0, QMAX_U8))
    q = (torch.round(xf / s) + z).clamp(0, QMAX_U8)
    if cpu_onednn.u8s8_int_mm_exact():  # u8 x s8, exact with VNNI: [q; 1] @ Wq^T, minus z * colsum
        a = torch.cat([q.to(torch.uint8), torch.ones(1, k, dtype=torch.uint8)])
        acc_all = torch.ops.aten._int_mm.default(a, w_int8.t())
        acc = acc_all[:-1] - z.to(torch.int32) * acc_all[-1:]
    else:  # s8: [q - 128; 1] @ Wq^T, plus (128 - z) * colsum
        a = torch.cat([(q - 128).to(torch.int8), torch.ones(1, k, dtype=torch.int8)])
        acc_all = torch.ops.aten._int_mm.default(a, w_int8.t())
        acc = acc_all[:-1] + (128 - z.to(torch.int32)) * acc_all[-1:]
    y = acc.float() * (s * w_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
