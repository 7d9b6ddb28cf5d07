"""qhl::w8a8_linear — int8 weights (per output channel), dynamic per-token int8 activations.

    y[..., N] = (Q(x) @ Wq.T) * s_x * s_w (+ b)        x [..., K] float, Wq [N, K] int8, s_w [N]

Q(x) is qhl::quantize_per_token. The int8 x int8 products accumulate exactly in int32; the
dequantize (+ bias) is the epilogue. Faces:
  spec    this file (CPU): an exact int8 GEMM, torch._int_mm or, on AMX, oneDNN's on a weight
          prepacked once (codegen/cpu_onednn.py); the formulation is chosen by the shape and the
          CPU, see below and benchmarks/cpu_spec_notes.md,
          between a prologue and epilogue fused by Inductor (codegen/cpu_fused.py);
          w8a8_linear_decomposed is the same math in aten ops, which Inductor's whole-graph CPU
          codegen lowers the op to (runtime/inductor_cpu.py);
  fake    shape [..., N], dtype of x;
  kernel  codegen/triton/w8a8.py (CUDA): per-token quant prologue + int8 GEMM + dequant epilogue;
  grad    straight-through for x: dx = dy @ (Wq * s_w); db = sum(dy). The weight is frozen;
  onnx    codegen/onnx/w8a8.py: per-token QuantizeLinear + MatMulInteger + scale multiply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen import cpu_fused, cpu_onednn, quant
from qhl.runtime.packed import DerivedCache

__all__ = ["w8a8_linear", "w8a8_linear_spec", "w8a8_linear_decomposed", "int8_linear_cpu", "int8_gemm_cpu",
           "dequant_epilogue"]


# CPU: which GEMM formulation, by the number of tokens M and the CPU (measured in
# benchmarks/cpu_spec_notes.md). oneDNN runs `_int_mm` on AMX tiles where the CPU has them, and
# the best formulation differs:
#   with AMX    M = 1: u8 x s8 (q + 128 as uint8; the compensation 128 * sum_k Wq[n, k] is
#               computed once per weight and subtracted exactly in int32), 2x the s8 GEMV;
#               M >= 2: oneDNN's GEMM on the weight prepacked once ('onednn',
#               codegen/cpu_onednn.py), 1.15-1.5x the transposed GEMM acc^T = Wq @ q^T at 2-512
#               tokens on large weights, which is itself 1.2-1.4x q @ Wq^T; 'cols' for small
#               weights and few tokens (cpu_onednn.worthwhile) or where PyTorch lacks the ops.
#   without     M <= 4: one GEMV per token, oneDNN's fastest shape per token: u8 x s8 where the
#               CPU has VNNI ('u8_rows', with the cached compensation; exact there, and 17-21%
#               faster than s8 at 1-4 tokens on 4 x 4096^2 weights, AMD EPYC Zen 5, 2026-12-05),
#               else s8 ('rows': without VNNI a u8 x s8 product pair saturates to int16);
#               5 <= M <= 256: the transposed GEMM; M > 256: u8 x s8 (VNNI-native).
#   no fast int8 GEMM at all (x86 with AVX2 alone, cpu_onednn.int8_gemm_is_fast): 'f32', a float32
#               GEMM over the integer codes, against the weight's codes kept as float32 once per
#               weight (+4 bytes a weight while the model runs). Every product q * Wq is exact in
#               float32 (|q * Wq| <= 127 * 127); the sums are float32's, so the result is the
#               spec's to float32 accumulation-order rounding instead of bit for bit. There
#               `_int_mm` measured 3x slower than a float32 matmul at 1 token and ~20x at 64-256.
#               Up to 4 tokens on weights of 2^20+ values (cpu_fused.int8_bits_gemv_worthwhile)
#               the f32 plan runs cpu_fused.int8_gemv_bits instead, a GEMV per token that reads
#               Wq's int8 bytes as int32 lanes (the same exact products and float32 sums; no
#               float32 copy of the codes is made for a weight that only ever sees few tokens).
#               Under torch.compile the decomposition puts that GEMV into Inductor's graph at a
#               static 1-4 tokens, for weights of any size (no per-call overhead to amortize).
# The transposed result is read back inside the fused epilogue (codegen/cpu_fused.py); the eager
# fallback pays one transpose-copy instead.
_ROWWISE_MAX_M = 4
_TRANSPOSED_MAX_M = 256
_U8_PLANS = ("u8", "u8_rows")  # the plans whose GEMM takes the codes + 128 as uint8


def _cpu_plan(m: int, n: int, k: int) -> str:
    """'u8', 'onednn' (prepacked weight), 'cols' (the transposed GEMM), 'rows' / 'u8_rows' (one
    s8 / u8 GEMV per token) or 'f32' (no fast int8 GEMM) for M tokens on an [N, K] weight here.
    int8_linear_cpu also takes 's8' (q @ Wq^T), the decomposition's formulation for many tokens
    without AMX, and for one token without AMX."""
    if not cpu_onednn.int8_gemm_is_fast():
        return "f32"
    u8 = cpu_onednn.u8_int_mm_supported()  # False on an older torch: its _int_mm takes int8 only
    if cpu_onednn.cpu_has_amx():
        return "u8" if m == 1 and u8 else ("onednn" if cpu_onednn.worthwhile(m, n, k) else "cols")
    if m <= _ROWWISE_MAX_M:
        return "u8_rows" if cpu_onednn.u8s8_int_mm_exact() else "rows"
    return "cols" if m <= _TRANSPOSED_MAX_M or not u8 else "u8"


# 128 * sum_k Wq[n, k] (int32 [N]) of each int8 weight, for the u8 formulation: exact in int32
# for K < 2^31 / (127 * 128) ~ 132000.
_u8_compensation = DerivedCache(lambda w_int8: w_int8.sum(dim=1, dtype=torch.int32).mul_(128))
# The weight's codes as float32 [N, K] for plan 'f32' (no fast int8 GEMM on this CPU), shared with
# the compiled graphs that hold them as constants (passes/float_codes_gemm.py), so a re-pack
# re-derives them in place.
float_codes = DerivedCache(lambda w_int8: w_int8.float(), in_place=True)


def int8_linear_cpu(
    x2: Tensor, w_int8: Tensor, ws: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype, bits: int = 8,
    codes: Optional[Tensor] = None, xs: Optional[Tensor] = None,
) -> Tensor:
    """y [M, N] = (Q(x2) @ w_int8^T) * ws * s_x (+ b) in out_dtype, on plain CPU tensors.

    Q is the per-token quantizer with `bits`-bit codes (quant.quantize_per_token_bits), or
    the given (codes int8 [M, K], xs float32 [M, 1]) when the caller quantized already (the fused
    Hadamard prologue). w_int8 [N, K] contiguous int8, ws float32 [N]. The int32 sums are exact;
    the prologue and epilogue are fused (codegen/cpu_fused.py) where Inductor can compile.
    """
    if not cpu_fused.enabled():
        if codes is None:
            codes, xs = _eager_codes(x2, bits)
        return dequant_epilogue(int8_gemm_cpu(codes, w_int8, ws), xs, bias, out_dtype)
    plan = _cpu_plan(x2.shape[0], *w_int8.shape)
    if codes is None:
        qmax = (1 << (bits - 1)) - 1
        codes, xs = cpu_fused.per_token_codes(x2, qmax, 128 if plan in _U8_PLANS else 0)
    elif plan in _U8_PLANS:
        codes = codes.view(torch.uint8) ^ 0x80  # q + 128 for q in [-127, 127]
    if plan == "f32":  # exact products, float32 sums
        if cpu_fused.int8_bits_gemv_worthwhile(codes.shape[0], *w_int8.shape):  # the GEMV reads Wq as int8
            y = cpu_fused.int8_gemv_bits(codes.float(), w_int8, ws)
            if y is not None:
                return cpu_fused.epilogue_scaled(y, xs, bias, out_dtype)
        acc = torch.mm(codes.float(), float_codes(w_int8).t())
        return cpu_fused.epilogue_rows(acc, None, ws, xs, bias, out_dtype)
    if plan == "onednn":
        return cpu_fused.epilogue_scaled(cpu_onednn.int8_mm_scaled_cpu(codes, w_int8, ws), xs, bias, out_dtype)
    if plan == "cols":
        return cpu_fused.epilogue_cols(torch._int_mm(w_int8, codes.t()), ws, xs, bias, out_dtype)
    if plan in ("u8", "s8"):
        acc = torch._int_mm(codes, w_int8.t())
    else:  # 'rows' / 'u8_rows'
        acc = torch.empty(codes.shape[0], w_int8.shape[0], dtype=torch.int32)
        for i in range(codes.shape[0]):
            torch._int_mm(codes[i : i + 1], w_int8.t(), out=acc[i : i + 1])
    comp = _u8_compensation(w_int8) if plan in _U8_PLANS else None
    return cpu_fused.epilogue_rows(acc, comp, ws, xs, bias, out_dtype)


def _eager_codes(x2: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The eager prologue: quant.quantize_per_token_bits bit for bit. Above a few tokens (8-bit)
    the codes stay float (the rounded, clamped quotients, in a reused buffer), and the GEMM
    converts them straight into the layout it reads."""
    m, k = x2.shape
    if bits != 8 or m <= _ROWWISE_MAX_M:
        return quant.quantize_per_token_bits(x2, bits)
    xf = x2.float()
    xs = quant._per_token_scale(xf)
    codes = torch.div(xf, xs, out=quant._scratch("w8a8.v", (m, k), torch.float32))
    return codes.round_().clamp_(-quant.INT8_QMAX, quant.INT8_QMAX), xs


def int8_gemm_cpu(codes: Tensor, w_int8: Tensor, ws: Tensor) -> Tensor:
    """(codes @ w_int8.T) * ws as a fresh float32 [M, N], the int32 sums exact, on the eager
    formulation chosen by M (the measured table for a CPU without AMX, above). `codes` [M, K]
    holds integers in [-127, 127], as int8 or as float32 (converted here straight into the layout
    the GEMM reads); w_int8 [N, K] contiguous int8; ws float32 [N]. Scratch buffers are reused per
    thread."""
    m, k = codes.shape
    n = w_int8.shape[0]
    if not cpu_onednn.int8_gemm_is_fast():  # plan 'f32': exact products, float32 sums
        return torch.mm(codes.float(), float_codes(w_int8).t()).mul_(ws)
    if m <= _ROWWISE_MAX_M:
        xq = codes if codes.dtype == torch.int8 else codes.to(torch.int8)
        if m == 1:
            acc = torch._int_mm(xq, w_int8.t())
        else:
            acc = torch.empty(m, n, dtype=torch.int32)
            for i in range(m):
                torch._int_mm(xq[i : i + 1], w_int8.t(), out=acc[i : i + 1])
        return torch.mul(acc, ws)
    if m <= _TRANSPOSED_MAX_M:
        xq = codes if codes.dtype == torch.int8 else quant._scratch("w8a8.q", (m, k), torch.int8).copy_(codes)
        acc_t = quant._scratch("w8a8.acc", (n, m), torch.int32)
        torch._int_mm(w_int8, xq.t(), out=acc_t)
        y_t = quant._scratch("w8a8.yt", (n, m), torch.float32).copy_(acc_t)
        y_t.mul_(ws[:, None])
        return torch.empty(m, n).copy_(y_t.t())
    xu = quant._scratch("w8a8.u", (m + 1, k), torch.uint8)
    xu[:m].view(torch.int8).copy_(codes)
    xu[:m].bitwise_xor_(0x80)  # q + 128 in [1, 255]
    xu[m].fill_(128)
    acc = quant._scratch("w8a8.acc", (m + 1, n), torch.int32)
    torch._int_mm(xu, w_int8.t(), out=acc)
    acc[:m].sub_(acc[m])  # exact: sum (q + 128) w - sum 128 w
    y = acc[:m].to(torch.float32)
    return y.mul_(ws)


def dequant_epilogue(y: Tensor, xs: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """y = acc * s_w (fresh float32 [M, N]) -> y * s_x (+ b), in out_dtype."""
    if bias is not None:
        y = torch.addcmul(bias.float(), y, xs, out=y)
    else:
        y.mul_(xs)
    return y.to(out_dtype)


def w8a8_linear_spec(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    n, k = w_int8.shape
    if not (quant._cpu_fast_path_ok(x, w_int8, w_scale, bias) and w_int8.is_contiguous()):
        return _w8a8_linear_generic(x, w_int8, w_scale, bias)
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    return int8_linear_cpu(x2, w_int8, ws, bias, x.dtype).reshape(*x.shape[:-1], n)


def w8a8_linear_decomposed(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
    """The spec in aten ops, for Inductor's CPU codegen (runtime/inductor_cpu.py): the per-token
    prologue and the dequantize epilogue become fused C++ loops around one extern int8 GEMM, and
    Inductor fuses them with the ops before and after (the previous layer's epilogue, a norm, a
    residual add). The GEMM formulation is _cpu_plan's for a known token count; with a dynamic
    token count, an extern qhl::int8_mm_scaled call where the CPU has AMX and the weight is large
    (codegen/cpu_onednn.py; it picks its GEMM per call by the actual token count), else the
    transposed GEMM. Where the CPU has no fast int8 GEMM (AVX2 alone), a static 1-4 tokens
    become the bit-mask GEMV (_decomposed_bits). Returns NotImplemented (the op stays an opaque
    call to its CPU face) off the CPU, and for the token counts whose best formulation needs a
    per-weight cache (the u8 compensation, or the float32 codes where the CPU has no fast int8
    GEMM) or a per-token loop."""
    if x.device.type != "cpu":
        return NotImplemented
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not cpu_onednn.int8_gemm_is_fast():
        return _decomposed_bits(x, x2, w_int8, w_scale, bias)
    if isinstance(m, int):
        plan = _cpu_plan(m, n, k)
    else:  # a dynamic token count: the op chooses per call
        plan = "onednn" if cpu_onednn.worthwhile(2, n, k) else "cols"
    if plan == "u8" and not cpu_onednn.cpu_has_amx():
        plan = "s8"  # many tokens without AMX: u8 needs the cached compensation; s8's GEMM is ~4% slower
    elif plan in ("rows", "u8_rows") and m == 1:
        # One token without AMX: the per-token GEMV is one s8 GEMM call, which Inductor makes an
        # extern kernel between its fused loops. The u8 GEMV (~20% faster alone) would need the
        # cached compensation, and as an opaque call to the CPU face each layer pays its dispatch
        # (SmolLM2's w8a8 decode step on an AMD EPYC Zen 5: 14.5 ms against 25.0 ms as op calls).
        plan = "s8"
    if plan not in ("onednn", "cols", "s8"):
        return NotImplemented  # 1 token with AMX (u8), or 2-4 without (one GEMV per token)
    codes, xs = per_token_codes_decomposed(x2)
    q = codes.to(torch.int8)
    if plan == "onednn":
        y = torch.ops.qhl.int8_mm_scaled.default(q, w_int8, w_scale.float()) * xs  # acc * s_w, row-major
    else:
        if plan == "cols":
            acc = torch.ops.aten._int_mm.default(w_int8, q.t()).t()
        else:
            acc = torch.ops.aten._int_mm.default(q, w_int8.t())
        y = (acc.float() * w_scale) * xs
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous().reshape(*x.shape[:-1], n)


def per_token_codes_decomposed(x2: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """quant.quantize_per_token_bits in aten ops, for decompositions: (the codes as float32
    [M, K], the scales [M, 1])."""
    qmax = (1 << (bits - 1)) - 1
    xf = x2.float()
    xs = xf.abs().amax(dim=-1, keepdim=True) / qmax
    xs = torch.where(xs > 0, xs, torch.ones_like(xs))
    return torch.round(xf / xs).clamp(-qmax, qmax), xs


def epilogue_decomposed(acc: Tensor, w_scale: Tensor, xs: Tensor, bias: Optional[Tensor],
                        x: Tensor) -> Tensor:
    """y = (acc * s_w) * s_x (+ b) in x's dtype and leading shape, from acc float32 [M, N]."""
    y = (acc * w_scale.float()) * xs
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], acc.shape[-1])


def _decomposed_bits(x: Tensor, x2: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
    """The 'f32' plan at a static 1-4 tokens in aten ops (a CPU with AVX2 alone): the per-token
    prologue, the bit-mask GEMV over the codes (cpu_fused.int8_bits_dot_graph: exact products,
    float32 sums, as the CPU face's) and the epilogue in one Inductor graph. Other token counts
    decline: their 'f32' plan reads the weight's float32 codes, cached per weight by the CPU face."""
    m = x2.shape[0]
    if not isinstance(m, int) or not 1 <= m <= cpu_fused.BITS_GEMV_MAX_TOKENS:
        return NotImplemented
    codes, xs = per_token_codes_decomposed(x2)
    acc = cpu_fused.int8_bits_dot_graph(codes, w_int8)
    return NotImplemented if acc is None else epilogue_decomposed(acc, w_scale, xs, bias, x)


def _w8a8_linear_generic(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """The definition in plain ops (any device, autograd-visible): used off the CPU fast path."""
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)
    xq, xs = quant.quantize_per_token(x2)
    # w_int8 is stored [N, K] contiguous: the transposed view is the layout _int_mm is fast on.
    acc = quant.int_mm(xq, w_int8.t())
    y = acc.to(torch.float32).mul_(xs).mul_(w_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qhl::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Spec face: see the module docstring."""
    return w8a8_linear_spec(x, w_int8, w_scale, bias)


@w8a8_linear.register_fake
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@w8a8_linear.register_kernel("cuda")
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from qhl.codegen.triton.w8a8 import w8a8_linear_triton

    return w8a8_linear_triton(x, w_int8, w_scale, bias)


def save_weight_for_backward(ctx, inputs, output) -> None:
    """setup_context of the int8 per-channel linears (w8a8 and w8a8-tensor): keep Wq and s_w."""
    x, w_int8, w_scale, bias = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype


def straight_through_backward(ctx, grad: Tensor):
    """Straight-through for x: dx = dy @ (Wq * s_w); db = sum(dy). The weight is frozen."""
    w_int8, w_scale = ctx.saved_tensors
    w = w_int8.to(torch.float32) * w_scale[:, None]
    grad_x = (grad.float() @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_b


w8a8_linear.register_autograd(straight_through_backward, setup_context=save_weight_for_backward)
