"""W8A8 linear as Triton kernels (the kernel face of qhl::w8a8_linear).

    xq, s_x = Q(x)                                x [M, K] float -> int8 [M, K], float32 [M]
    acc     = xq @ Wq.T                           int8 x int8 -> int32, exact
    y       = acc * s_x[:, None] * s_w[None, :] (+ b)   float32 epilogue, stored in x's dtype

Wq [N, K] int8 and s_w [N] float32 come from quant.quantize_int8_per_channel. Q is the per-token
quantizer (codegen/triton/per_token_quant.py), embedded in the same rendered module as a
prologue kernel: quantizing x once and reusing it for every N-block is cheaper than
re-quantizing x inside each GEMM program. int8 products summed in int32 are exact (|sum| <=
127 * 127 * K fits for K < 133,000), so the kernel matches the spec's torch._int_mm bit for bit
up to the float32 epilogue, where a GPU may fuse the bias add into an FMA (one rounding less).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen.triton import emit, per_token_quant, split_k

__all__ = ["w8a8_linear_triton", "render"]

TEMPLATE = '''

@triton.jit
def {name}(
    xq_ptr,  # *xq [M, K] int8: the per-token quantized activations
    xs_ptr,  # *s_x [M] float32: their scales
    w_ptr,  # *Wq [N, K] int8
    ws_ptr,  # *s_w [N] float32
    b_ptr,  # *bias [N] (read only when the epilogue adds one)
    y_ptr,  # *y [M, N], x's dtype (out)
{split_args}    M,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ws, stride_b,
    stride_ym, stride_yn,
{split_strides}    BLOCK_M: tl.constexpr,  # chosen at launch from M, the only size not known at codegen
{split_constexpr}):
''' + emit.GEMM_TILE_PROLOGUE + '''\
{loop_start}    # Wq is [N, K]: read it as its transpose [BLOCK_K, BLOCK_N], K contiguous, no copy.
    xq_ptrs = xq_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k[None, :]) * stride_xk
    w_ptrs = w_ptr + (k_start + offs_k[:, None]) * stride_wk + offs_n[None, :] * stride_wn

    # --- main loop: int8 x int8 -> int32, exact, so the order of the K steps does not matter ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_start + K_SPLIT, BLOCK_K):
        a = tl.load(xq_ptrs, mask=mask_m[:, None]{x_kmask}, other=0)
        b = tl.load(w_ptrs, mask=mask_n[None, :]{w_kmask}, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        xq_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

{finish}
'''

# Dequantize in the spec's order, (acc * s_x) * s_w, in float32: here with SPLIT_K = 1, else in the
# _reduce kernel after the exact int32 sum of the partials.
FINISH = '''\
    # --- epilogue: dequantize in the spec's order, (acc * s_x) * s_w, in float32 ---
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]'''


def render(spec: emit.KernelSpec) -> str:
    """Prologue (per-token quant for this K) + GEMM (this K, N, blocks, epilogue, dtype)."""
    quant_spec = emit.make_spec("per_token_quant", spec.K, dtype=spec.dtype)
    return per_token_quant.render_kernel(quant_spec, f"{spec.name}_quant") + TEMPLATE.format(
        **emit.gemm_fields(spec),
        extra_constants="",
        split_args=split_k.MAIN_ARGS,
        split_strides=split_k.MAIN_STRIDES,
        split_constexpr=split_k.SPLIT_CONSTEXPR,
        loop_start=split_k.LOOP_START,
        finish=split_k.render_finish(spec, FINISH),
    ) + split_k.render_reduce(
        spec, "tl.int32", "    xs_ptr,  # *s_x [M] float32\n    ws_ptr,  # *s_w [N] float32\n", "    stride_ws,\n", FINISH
    )


def w8a8_linear_triton(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
    blocks: Optional[tuple[int, int]] = None, split: int = 1,
) -> Tensor:
    """y [..., N] = dequant(Q(x) @ Wq.T) (+ b), in x's dtype; see the module docstring.
    blocks=(BLOCK_N, BLOCK_K) overrides the default tile and split > 1 splits K over that many
    programs per tile (codegen/triton/split_k.py; bit-identical); both for tuning
    (benchmarks/gpu_speed.py)."""
    N, K = emit.check_int8_linear("w8a8_linear", x, w_int8, w_scale, bias)
    block_n, block_k = blocks or (None, None)
    spec = emit.make_spec("w8a8", K, N, x.dtype, has_bias=bias is not None, block_n=block_n, block_k=block_k,
                          tile=emit.tile_for(x.numel() // K))
    split = split_k.check("w8a8_linear", spec, split)
    module = emit.load(spec)

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    xq, xs = per_token_quant.launch(getattr(module, f"{spec.name}_quant"), x2)

    block_m = emit.block_m_for(M)
    grid = ((M + block_m - 1) // block_m, (N + spec.block_n - 1) // spec.block_n, split)
    p, p_strides = split_k.workspace(split, M, N, torch.int32, y)
    getattr(module, spec.name)[grid](
        xq, xs, w_int8, w_scale, bias, y, p,
        M,
        xq.stride(0), xq.stride(1),
        w_int8.stride(0), w_int8.stride(1),
        w_scale.stride(0), bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        *p_strides,
        BLOCK_M=block_m, SPLIT_K=split,
    )
    split_k.launch_reduce(module, spec, p, (xs, w_scale), (w_scale.stride(0),), bias, y, M, block_m, split)
    return y.reshape(*x.shape[:-1], N)
