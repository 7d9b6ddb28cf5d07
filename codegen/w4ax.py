"""qhl::w4a8_linear and qhl::w4a4_linear — int4 per-channel weights, dynamic per-token activations.

    y[..., N] = (Q_b(x R) @ Wq.T) * s_w * s_x (+ b)     x [..., K] float, Wq [N, K] int4, s_w [N]

QuaRot's quantized matmul: weights symmetric int4, one scale per output channel (codes in
[-7, 7], stored as q + 8, two per byte along K: quant.quantize_int4_per_channel); activations
symmetric per token, b = 8 bits (w4a8, codes in [-127, 127]) or b = 4 bits (w4a4, codes in
[-7, 7]), in int8 storage (quant.quantize_per_token_bits). The int8 x int8 products accumulate
exactly in int32 (|sum| <= 127 * 8 * K), then y = (acc * s_w) * s_x (+ b) in float32 (w8a8's
order, whose CPU GEMM formulations this face shares), returned in
x's dtype.

R is the online rotation, chosen by the static argument hadamard_block:
  -1   no rotation (R = I): the unrotated baselines;
  >= 0 R = qhl.hadamard_matrix(K) (0 = full size) or I (x) H_b (b = hadamard_block). The pass
       has stored the rotated weight W R, so y ~ (x R)(W R)^T = x W^T. The prologue is then
       qhl::hadamard_quantize_per_token (codegen/hadamard.py).

Faces:
  spec    this file: torch._int_mm on the unpacked codes; on CPU, w8a8's GEMM formulations on
          codes unpacked once per weight (see CPU_UNPACKED_CACHE below); with AVX2 alone,
          under torch.compile, the decompositions below put the bit-mask GEMV over the packed
          codes in Inductor's graph at 1-4 tokens;
  fake    shape [..., N], dtype of x;
  kernel  codegen/triton/w4ax.py (CUDA): per-token quant prologue + int4 unpack + int8 tl.dot +
          dequant epilogue;
  grad    straight-through for x: dx = (dy @ (Wq * s_w)) R^T; db = sum(dy); the weight is frozen;
  onnx    codegen/onnx/w4ax.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import cpu_fused, cpu_onednn, quant
from qhl.codegen.w8a8 import epilogue_decomposed, int8_linear_cpu, per_token_codes_decomposed
from qhl.runtime.packed import DerivedCache

__all__ = ["w4a8_linear", "w4a4_linear", "w4ax_linear_spec", "ACT_BITS", "quantize_activations", "unpacked_codes",
           "CPU_UNPACKED_CACHE", "w4a8_linear_decomposed", "w4a4_linear_decomposed"]

# The activation bits of each form.
ACT_BITS = {"w4a8": 8, "w4a4": 4}


def quantize_activations(x2: Tensor, hadamard_block: int, bits: int) -> tuple[Tensor, Tensor]:
    """The prologue: (q int8 [M, K], s_x float32 [M, 1]) of x2 [M, K], rotated first when
    hadamard_block >= 0 (by the fused qhl::hadamard_quantize_per_token op)."""
    if hadamard_block < 0:
        return quant.quantize_per_token_bits(x2, bits)
    if x2.device.type == "cpu":
        # the fused op's CPU face, called without a second dispatch (it has no grad face)
        from qhl.codegen.hadamard import hadamard_quantize_per_token_cpu

        return hadamard_quantize_per_token_cpu(x2, hadamard_block, bits)
    op = getattr(torch.ops.qhl, "hadamard_quantize_per_token", None)
    if op is None:
        from qhl.errors import UnsupportedError

        raise UnsupportedError(
            f"hadamard_block={hadamard_block} needs qhl::hadamard_quantize_per_token "
            "(codegen/hadamard.py), which is not registered"
        )
    return op(x2, hadamard_block, bits)


# CPU: there is no int4 x int8 GEMM, and unpacking a 4096 x 4096 weight costs more than the GEMM
# itself at few tokens (measured: 0.56x eager float32 at 1 token). So the CPU face unpacks each
# packed weight once, on its first call, and keeps the int8 codes beside it while the packed tensor
# lives (weakly keyed by identity). The codes are dropped when the packed tensor changes: its
# version counter moves (any in-place write to a normal tensor), or qhl re-packs it (runtime/
# packed.py's refresh, which also covers inference tensors, which have no version counter). At run
# time a w4a8 layer then holds 1.5 bytes per weight on CPU; the compiled artifact and the ONNX
# file stay 4-bit. Set CPU_UNPACKED_CACHE = False to unpack on every call (0.5 bytes, slower).
CPU_UNPACKED_CACHE = True
_unpacked = DerivedCache(lambda packed: quant.unpack_int4_signed(packed).contiguous())


# The codes as float32, for the compiled graphs that run plan 'f32' in aten ops on a CPU without a
# fast int8 GEMM (passes/float_codes_gemm.py); re-derived in place when the packed weight is re-packed.
float_codes = DerivedCache(lambda packed: quant.unpack_int4_signed(packed).float(), in_place=True)


def unpacked_codes(w_packed: Tensor) -> Tensor:
    """int8 [N, K] codes of a packed weight, cached per packed tensor when CPU_UNPACKED_CACHE."""
    return _unpacked(w_packed) if CPU_UNPACKED_CACHE else quant.unpack_int4_signed(w_packed)


def w4ax_linear_spec(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int, bits: int
) -> Tensor:
    """The definition (any device, plain ops): see the module docstring. On plain CPU tensors
    it runs w8a8's GEMM formulations (codegen/w8a8.py) on the cached int8 codes."""
    n, half_k = w_packed.shape
    k = 2 * half_k
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    if quant._cpu_fast_path_ok(x, w_packed, w_scale, bias):
        ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
        # Unrotated: int8_linear_cpu quantizes (fused where it can); rotated: the Hadamard op does.
        xq, xs = quantize_activations(x2, hadamard_block, bits) if hadamard_block >= 0 else (None, None)
        y = int8_linear_cpu(x2, unpacked_codes(w_packed), ws, bias, x.dtype, bits, xq, xs)
        return y.reshape(*x.shape[:-1], n)
    xq, xs = quantize_activations(x2, hadamard_block, bits)
    wq = quant.unpack_int4_signed(w_packed)  # int8 [N, K], per call
    # [N, K] contiguous: the transposed view is the layout _int_mm is fast on (as in w8a8).
    acc = quant.int_mm(xq, wq.t())
    y = acc.to(torch.float32).mul_(w_scale.float()).mul_(xs)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _decomposed(bits: int):
    """The spec in aten ops for Inductor's whole-graph CPU codegen (runtime/inductor_cpu.py), on
    a CPU without AMX at a static 1-4 tokens: the per-token prologue in aten ops (rotated first,
    by the rotation's own GEMMs and sums: hadamard.rotate_rows_decomposed, the spec's floats),
    then the bit-mask GEMV straight over the packed int4 codes (cpu_fused.int4_bits_dot_graph,
    one group of K, zero point 8: the CPU face's exact products and float32 sums, without its
    cached int8 codes) and the epilogue (acc * s_w) * s_x (+ b). Everything else declines with
    NotImplemented and keeps the CPU face (with AMX: its int8 GEMM on cached codes, the one
    measured there).

    With AVX-512 VNNI too (Zen 5 EPYC, 2 threads), against the face's int8 GEMV on cached codes,
    bit-identical: 4 x 4096^2 layers 1.24 against 2.92 ms at 1 token, 3.67 against 5.63 at 4 (w4a8;
    w4a4 alike); one layer at 1 token 0.05-0.11 against 0.11-0.17 ms from 576 x 576 to 2048^2, and
    0.15-0.21 against 0.18-0.23 ms rotated (hadamard-w4a8, when the rotation was an op call; in
    the graph: benchmarks/results/w4ax_speed_cpu_zen5_hadamard_in_graph.md)."""

    def decomposed(
        x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int = -1
    ):
        half_k = w_packed.shape[1]
        k = 2 * half_k
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if x.device.type != "cpu" or cpu_onednn.cpu_has_amx() or not isinstance(m, int):
            return NotImplemented
        if not 1 <= m <= cpu_fused.BITS_GEMV_MAX_TOKENS or w_packed.dtype != torch.uint8:
            return NotImplemented
        if hadamard_block < 0:
            codes, xs = per_token_codes_decomposed(x2, bits)
        else:
            from qhl.codegen.hadamard import rotate_rows_decomposed

            codes, xs = per_token_codes_decomposed(rotate_rows_decomposed(x2, hadamard_block), bits)
        acc = cpu_fused.int4_bits_dot_graph(codes, w_packed, None, None, k)
        return NotImplemented if acc is None else epilogue_decomposed(acc, w_scale, xs, bias, x)

    return decomposed


w4a8_linear_decomposed = _decomposed(8)
w4a4_linear_decomposed = _decomposed(4)


def _fake(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int = -1
) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def _cuda(bits: int):
    def kernel(
        x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int = -1
    ) -> Tensor:
        from qhl.codegen.triton.w4ax import w4ax_linear_triton

        return w4ax_linear_triton(x, w_packed, w_scale, bias, hadamard_block, bits)

    return kernel


def _setup_context(ctx, inputs, output) -> None:
    x, w_packed, w_scale, bias = inputs[:4]
    hadamard_block = inputs[4] if len(inputs) > 4 else -1
    ctx.save_for_backward(w_packed, w_scale)
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype
    ctx.hadamard_block = hadamard_block


def _backward(ctx, grad: Tensor):
    w_packed, w_scale = ctx.saved_tensors
    w = quant.dequantize_int4_per_channel(w_packed, w_scale)
    grad_x = grad.float() @ w  # d/d(x R): the rotated input's gradient
    if ctx.hadamard_block >= 0:
        # x R -> x: multiply by R^T (R orthonormal), the other helper's transposed FWHT.
        k = grad_x.shape[-1]
        grad_x = torch.ops.qhl.hadamard(grad_x.reshape(-1, k), ctx.hadamard_block, transpose=True)
        grad_x = grad_x.reshape(*grad.shape[:-1], k)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x.to(ctx.x_dtype), None, None, grad_b, None


@torch.library.custom_op("qhl::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int = -1
) -> Tensor:
    """Spec face of w4a8 (8-bit per-token activations): see the module docstring."""
    return w4ax_linear_spec(x, w_packed, w_scale, bias, hadamard_block, 8)


@torch.library.custom_op("qhl::w4a4_linear", mutates_args=())
def w4a4_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], hadamard_block: int = -1
) -> Tensor:
    """Spec face of w4a4 (4-bit per-token activations, codes in [-7, 7]): see the module docstring."""
    return w4ax_linear_spec(x, w_packed, w_scale, bias, hadamard_block, 4)


for _op, _bits in ((w4a8_linear, 8), (w4a4_linear, 4)):
    _op.register_fake(_fake)
    _op.register_kernel("cuda")(_cuda(_bits))
    _op.register_autograd(_backward, setup_context=_setup_context)
