"""Weight-only quantized linears as dequantizing GEMMs (kernel faces of qhl::w8a16_linear and
qhl::w4a16_linear). x [M, K] float, y [M, N] in x's dtype, fp32 accumulation.

    w8a16:  y = (x @ Wq.T) * s_w[None, :] (+ b)       Wq [N, K] int8, s_w [N] float32
    w4a16:  y = sum over k-blocks of (x_blk @ (C_blk - z).T) * s[:, g(blk)] (+ b)
            C [N, K] 4-bit codes packed two per byte along K (byte k // 2, low nibble = even k),
            s [N, K/G] float32, z [N, K/G] uint8, G the group size

Why the scales sit outside the dot: int8 codes and (code - zero) in [-15, 15] are exact in fp16,
bf16 and fp32, so the dot multiplies exact operands and only the fp32 sums round; the scale is
applied once per output (w8a16) or once per k-block (w4a16: BLOCK_K divides G, so a k-block
lies inside one group and shares one scale per column). That is the spec's math up to fp32
summation order. fp32 inputs dot with input_precision="ieee": TF32 would round x to 10 bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qhl.codegen.triton import emit, split_k
from qhl.errors import KernelError

__all__ = ["w8a16_linear_triton", "w4a16_linear_triton", "render"]

# The parts both templates share: tile indexing before the loop, the loop's x load after it.
_HEAD = '''

@triton.jit
def {name}(
{args}
{split_args}    M,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
{strides}
    stride_b,
    stride_ym, stride_yn,
{split_strides}    BLOCK_M: tl.constexpr,  # chosen at launch from M, the only size not known at codegen
{split_constexpr}):
''' + emit.GEMM_TILE_PROLOGUE + '''\
{loop_start}    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k[None, :]) * stride_xk
'''

W8A16_TEMPLATE = _HEAD + '''\
    # Wq is [N, K]: read it as its transpose [BLOCK_K, BLOCK_N], K contiguous, no copy.
    w_ptrs = w_ptr + (k_start + offs_k[:, None]) * stride_wk + offs_n[None, :] * stride_wn

    # --- main loop: int8 codes are exact in {dot_dtype}, so only the fp32 sums round ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_SPLIT, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None]{x_kmask}, other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[None, :]{w_kmask}, other=0)
        acc = tl.dot(x{x_cast}, w.to({dot_dtype}), acc{precision})
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

{finish}
'''

W4A16_TEMPLATE = _HEAD + '''\
    # Two codes per byte along K: code k is in byte k // 2, the low nibble when k is even.
    w_ptrs = w_ptr + ((k_start + offs_k[:, None]) // 2) * stride_wk + offs_n[None, :] * stride_wn
    shifts = (offs_k[:, None] % 2) * 4

    # --- main loop: one k-block lies in one group (BLOCK_K divides GROUP_SIZE, and K is a
    # multiple of GROUP_SIZE, so there is no K tail); (code - zero) is exact in {dot_dtype} ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_SPLIT, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        packed = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        codes = (packed.to(tl.int32) >> shifts) & 0xF
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
        zero = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0)
        w = (codes - zero.to(tl.int32)[None, :]).to({dot_dtype})
        acc += tl.dot(x{x_cast}, w{precision}) * scale[None, :]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk

{finish}
'''

# The end of each GEMM (here with SPLIT_K = 1, else in the _reduce kernel after the partials' sum):
# w8a16 applies the per-channel scale once per output; w4a16's scales were applied per k-block.
_W8A16_FINISH = '''\
    # --- epilogue: the per-channel scale, once per output ---
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)
    y = acc * ws[None, :]'''
_W4A16_FINISH = '''\
    # --- epilogue ---
    y = acc'''
_REDUCE_PARAMS = {
    "w8a16": ("    ws_ptr,  # *s_w [N] float32\n", "    stride_ws,\n", _W8A16_FINISH),
    "w4a16": ("", "", _W4A16_FINISH),
}

_W8A16_ARGS = dict(
    args="""\
    x_ptr,  # *x [M, K] float
    w_ptr,  # *Wq [N, K] int8
    ws_ptr,  # *s_w [N] float32
    b_ptr,  # *bias [N] (read only when the epilogue adds one)
    y_ptr,  # *y [M, N], x's dtype (out)""",
    strides="    stride_ws,",
    extra_constants="",
)
_W4A16_ARGS = dict(
    args="""\
    x_ptr,  # *x [M, K] float
    w_ptr,  # *packed [N, K // 2] uint8
    s_ptr,  # *scale [N, K // GROUP_SIZE] float32
    z_ptr,  # *zero [N, K // GROUP_SIZE] uint8
    b_ptr,  # *bias [N] (read only when the epilogue adds one)
    y_ptr,  # *y [M, N], x's dtype (out)""",
    strides="    stride_sn, stride_sg,\n    stride_zn, stride_zg,",
    extra_constants="    GROUP_SIZE: tl.constexpr = {group_size}\n",
)


def render(spec: emit.KernelSpec) -> str:
    """The w8a16 or w4a16 GEMM specialised for spec (K, N, group, blocks, epilogue, dtype)."""
    if spec.family == "w8a16":
        template, parts = W8A16_TEMPLATE, dict(_W8A16_ARGS)
    elif spec.family == "w4a16":
        template, parts = W4A16_TEMPLATE, dict(_W4A16_ARGS)
        parts["extra_constants"] = parts["extra_constants"].format(group_size=spec.group_size)
    else:
        raise KernelError(f"weight_only renders w8a16 and w4a16, not {spec.family!r}")
    return template.format(
        **emit.gemm_fields(spec),
        dot_dtype=spec.dot_dtype,
        # In the interpreter bf16 dots are wrong (triton#11584): dot bf16 x as fp32 there.
        x_cast=".to(tl.float32)" if spec.dot_dtype != spec.tl_dtype else "",
        precision=spec.dot_precision,
        split_args=split_k.MAIN_ARGS,
        split_strides=split_k.MAIN_STRIDES,
        split_constexpr=split_k.SPLIT_CONSTEXPR,
        loop_start=split_k.LOOP_START,
        finish=split_k.render_finish(spec, _REDUCE_PARAMS[spec.family][2]),
        **parts,
    ) + split_k.render_reduce(spec, "tl.float32", *_REDUCE_PARAMS[spec.family])


def _launch(
    spec: emit.KernelSpec, x: Tensor, weights: tuple, strides: tuple, bias: Optional[Tensor], split: int,
    reduce_scales: tuple = ((), ()),
) -> Tensor:
    """Allocate y and run the rendered kernel over a (M-blocks, N-blocks, split) grid; with
    split > 1, then its _reduce kernel, which reads reduce_scales = (tensors, their strides)."""
    K, N = spec.K, spec.N
    split = split_k.check(f"{spec.family}_linear", spec, split)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0:
        module = emit.load(spec)
        block_m = emit.block_m_for(M)
        grid = ((M + block_m - 1) // block_m, (N + spec.block_n - 1) // spec.block_n, split)
        w = weights[0]
        p, p_strides = split_k.workspace(split, M, N, torch.float32, y)
        getattr(module, spec.name)[grid](
            x2, *weights, bias, y, p,
            M,
            x2.stride(0), x2.stride(1),
            w.stride(0), w.stride(1),
            *strides,
            bias.stride(0) if bias is not None else 0,
            y.stride(0), y.stride(1),
            *p_strides,
            BLOCK_M=block_m, SPLIT_K=split,
        )
        split_k.launch_reduce(module, spec, p, *reduce_scales, bias, y, M, block_m, split)
    return y.reshape(*x.shape[:-1], N)


def w8a16_linear_triton(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
    blocks: Optional[tuple[int, int]] = None, split: int = 1,
) -> Tensor:
    """y [..., N] = (x @ Wq.T) * s_w (+ b) in x's dtype; see the module docstring.
    blocks=(BLOCK_N, BLOCK_K) overrides the default tile and split > 1 splits K over that many
    programs per tile (codegen/triton/split_k.py); both for tuning (benchmarks/gpu_speed.py)."""
    N, K = emit.check_int8_linear("w8a16_linear", x, w_int8, w_scale, bias)
    block_n, block_k = blocks or (None, None)
    spec = emit.make_spec("w8a16", K, N, x.dtype, has_bias=bias is not None, block_n=block_n, block_k=block_k,
                          tile=emit.tile_for(x.numel() // K))
    return _launch(spec, x, (w_int8, w_scale), (w_scale.stride(0),), bias, split,
                   reduce_scales=((w_scale,), (w_scale.stride(0),)))


def w4a16_linear_triton(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    group_size: int,
    bias: Optional[Tensor] = None,
    blocks: Optional[tuple[int, int]] = None, split: int = 1,
) -> Tensor:
    """y [..., N] = x @ ((C - z) * s).T (+ b) in x's dtype; see the module docstring.
    blocks=(BLOCK_N, BLOCK_K) overrides the default tile and split > 1 splits K over that many
    programs per tile (codegen/triton/split_k.py); both for tuning (benchmarks/gpu_speed.py)."""
    op = "w4a16_linear"
    emit.check_tensor(op, "packed", packed, (torch.uint8,))
    if packed.dim() != 2 or 0 in packed.shape:
        raise KernelError(
            f"{op}: packed must be a non-empty [N, K // 2] uint8 matrix, got {list(packed.shape)}"
        )
    N, K = packed.shape[0], packed.shape[1] * 2
    if group_size <= 0 or K % group_size:
        raise KernelError(
            f"{op}: group_size={group_size} must divide K={K} (packed is [N={N}, K/2={K // 2}])"
        )
    emit.check_x_and_bias(op, x, N, K, bias)
    groups = (N, K // group_size)
    emit.check_tensor(op, "scale", scale, (torch.float32,), groups)
    emit.check_tensor(op, "zero", zero, (torch.uint8,), groups)
    emit.check_device(op, x=x, packed=packed, scale=scale, zero=zero, bias=bias)
    block_n, block_k = blocks or (None, None)
    spec = emit.make_spec("w4a16", K, N, x.dtype, has_bias=bias is not None, group_size=group_size,
                          block_n=block_n, block_k=block_k, tile=emit.tile_for(x.numel() // K))
    strides = (scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1))
    return _launch(spec, x, (packed, scale, zero), strides, bias, split)
