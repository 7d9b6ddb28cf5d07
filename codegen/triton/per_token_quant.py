"""Per-token int8 quantization as a Triton kernel (the kernel face of qhl::quantize_per_token).

    x [..., K] float  ->  q int8 [..., K],  scale float32 [..., 1]
    scale = amax(|x_row|) / QMAX   (1 when the row is all zeros)
    q     = clamp(round_half_even(x / scale), -QMAX, QMAX)

QMAX is 127 (qhl::quantize_per_token, the w8a8 and w4a8 prologues) or 7 (4-bit codes, w4a4),
baked in by codegen (KernelSpec.qmax).

Bit-exact with qhl.codegen.quant.quantize_per_token: the same float32 operations in the same
order. Two details make that true on a GPU too: the divisions use `tl.math.div_rn` (a plain
`/` on float32 compiles to an approximate division), and rounding adds and subtracts 1.5 * 2**23,
which makes the FPU's own round-to-nearest-even do the rounding, exactly like torch.round (there
is no rint in tl.math, and libdevice calls do not run in the interpreter).

One program quantizes one row (token); it reads the row twice: pass 1 finds amax, pass 2 scales,
rounds and stores. The template is specialised for K by codegen (qhl.codegen.triton.emit); the
W8A8 kernel module embeds the same kernel as its prologue.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.errors import KernelError

__all__ = ["per_token_quant", "per_token_quant_bits", "render", "render_kernel", "launch"]

TEMPLATE = '''

@triton.jit
def {name}(
    x_ptr,  # *x [M, K] float32 / float16 / bfloat16
    q_ptr,  # *q [M, K] int8 (out)
    s_ptr,  # *scale [M] float32 (out), one per row
    stride_xm, stride_xk,
    stride_qm, stride_qk,
):
    # --- specialisation (baked in by qhl codegen) ---
    K: tl.constexpr = {K}
    BLOCK_K: tl.constexpr = {block_k}
    QMAX: tl.constexpr = {qmax}.0
    # Adding 1.5 * 2**23 leaves no fraction bits in a float32, so the add itself rounds half to
    # even; subtracting it back is exact. Valid for |v| < 2**22, and here |v| <= 127.
    RNE_MAGIC: tl.constexpr = 12582912.0

    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on large inputs
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs_k = tl.arange(0, BLOCK_K)

    # --- pass 1: amax of the row (a max is exact, so the reduction order does not matter) ---
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + (k0 + offs_k) * stride_xk, mask=offs_k < K - k0, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    row_amax = tl.max(amax, axis=0)

    # --- the scale, as the spec computes it: IEEE amax / QMAX, and 1 for an all-zero row ---
    scale = tl.math.div_rn(row_amax, tl.full((), QMAX, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)

    # --- pass 2: q = clamp(round_half_even(x / scale)); x / scale, not x * (1 / scale) ---
    for k0 in range(0, K, BLOCK_K):
        mask = offs_k < K - k0
        x = tl.load(x_row + (k0 + offs_k) * stride_xk, mask=mask, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale)
        v = (v + RNE_MAGIC) - RNE_MAGIC
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_row + (k0 + offs_k) * stride_qk, v.to(tl.int8), mask=mask)
'''


def render_kernel(spec: emit.KernelSpec, name: str) -> str:
    """The kernel text alone (the W8A8 module embeds it under its own name)."""
    return TEMPLATE.format(name=name, K=spec.K, block_k=spec.block_k, qmax=spec.qmax)


def render(spec: emit.KernelSpec) -> str:
    return render_kernel(spec, spec.name)


def launch(kernel, x2: Tensor) -> tuple[Tensor, Tensor]:
    """Run a rendered per-token kernel on a 2-D x: q int8 [M, K], scale float32 [M, 1]."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x2.device)
    if M > 0:
        # One program per row: a row is read twice, both times from L2 for K up to a few 1000s.
        kernel[(M,)](x2, q, scale, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1))
    return q, scale


def per_token_quant_bits(x2: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """x2 [M, K] float -> (q int8 [M, K], scale float32 [M, 1]) with qmax = 2^(bits-1) - 1: the
    w4a8 / w4a4 prologue, bit-exact with qhl.codegen.quant.quantize_per_token_bits."""
    if not 2 <= bits <= 8:
        raise KernelError(f"per_token_quant_bits: bits={bits}, need 2 <= bits <= 8")
    spec = emit.make_spec("per_token_quant", x2.shape[1], dtype=x2.dtype, qmax=(1 << (bits - 1)) - 1)
    return launch(getattr(emit.load(spec), spec.name), x2)


def per_token_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale float32 [..., 1]); see the module docstring."""
    op = "per_token_quant"
    emit.check_tensor(op, "x", x, tuple(emit.DTYPES))
    emit.check_device(op, x=x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise KernelError(f"{op}: x must be [..., K] with K > 0, got shape {list(x.shape)}")
    K = x.shape[-1]
    spec = emit.make_spec(op, K, dtype=x.dtype)
    kernel = getattr(emit.load(spec), spec.name)
    q, scale = launch(kernel, x.reshape(-1, K))
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)
