"""Split-K for the templated GEMMs (w8a8, w8a16, w4a16): SPLIT_K programs per output tile.

At decode (1-16 tokens) a [M, N] output has only N / BLOCK_N tiles: 64-256 programs for a 4096-wide
layer, about one per SM on an H100 (132 SMs), each streaming a whole [K, BLOCK_N] slice of the
weight. With SPLIT_K > 1, program (m, n, s) sums only k-blocks [s * KB / S, (s + 1) * KB / S) of the
KB = ceil(K / BLOCK_K) blocks and stores its partial sum; a second kernel, `{name}_reduce`, adds
the SPLIT_K partials of each tile in a fixed order and finishes it (scales, bias, store):

    partial[s, m, n] = sum over the k-blocks of split s of the main loop's product
    y[m, n]          = finish(sum over s = 0 .. SPLIT_K - 1 of partial[s, m, n])

`finish` is the family's own (w8a8: acc * s_x * s_w, w8a16: acc * s_w, w4a16: acc, its scales
being applied per k-block in the loop), then the shared bias + store epilogue. w8a8 keeps int32
partials, so its result is bit-identical to SPLIT_K = 1; the weight-only families add float32
partials, which changes only the order of the float32 sums.

SPLIT_K is a launch-time constexpr like BLOCK_M: the rendered text is the same for every SPLIT_K
(`qhl.inspect` shows both kernels), and SPLIT_K = 1 compiles the branch that finishes in place,
with no partials and no second launch. SPLIT_K must divide KB, so that every split gets whole
k-blocks (w4a16's k-blocks then still lie in one group each).
"""
from __future__ import annotations

import textwrap

import torch
from torch import Tensor

from qhl.codegen.triton import emit
from qhl.errors import KernelError

__all__ = ["MAIN_ARGS", "MAIN_STRIDES", "SPLIT_CONSTEXPR", "LOOP_START", "render_finish", "render_reduce", "check",
           "workspace", "launch_reduce"]

# The main kernels' extra parameters (after y_ptr / after the y strides) and the start of their
# K range, spliced into each family's template.
MAIN_ARGS = "    p_ptr,  # *partials [SPLIT_K, M, N] float32 / int32 (written only when SPLIT_K > 1)\n"
MAIN_STRIDES = "    stride_pk, stride_pm, stride_pn,\n"
SPLIT_CONSTEXPR = "    SPLIT_K: tl.constexpr,  # programs per output tile along K, chosen at launch\n"
LOOP_START = '''\
    # --- this program's share of K: whole k-blocks [k_start, k_start + K_SPLIT) ---
    pid_k = tl.program_id(2)
    K_SPLIT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K // SPLIT_K * BLOCK_K
    k_start = pid_k * K_SPLIT
'''

REDUCE_TEMPLATE = '''

@triton.jit
def {name}_reduce(
    p_ptr,  # *partials [SPLIT_K, M, N] {acc_name}: the main kernel's per-split sums
{args}    b_ptr,  # *bias [N] (read only when the epilogue adds one)
    y_ptr,  # *y [M, N], x's dtype (out)
    M,
    stride_pk, stride_pm, stride_pn,
{strides}    stride_b,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    N: tl.constexpr = {N}
    BLOCK_N: tl.constexpr = {block_n}
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn

    # --- the SPLIT_K partial sums, added in split order (the result does not depend on timing) ---
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_dtype})
    for s in range(SPLIT_K):
        acc += tl.load(p_ptrs + s * stride_pk, mask=mask_m[:, None] & mask_n[None, :], other=0)

{finish}
{epilogue}
'''


def render_finish(spec: emit.KernelSpec, finish: str) -> str:
    """The main kernel's end: with SPLIT_K > 1 store `acc` as this split's partial sum; else run
    `finish` (the family's dequantize lines, which set y from acc) and the epilogue in place."""
    in_place = finish + "\n" + emit.render_epilogue(spec)
    return (
        "    if SPLIT_K > 1:  # a partial sum: the _reduce kernel adds the SPLIT_K of them and finishes\n"
        "        p_ptrs = p_ptr + pid_k * stride_pk + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn\n"
        "        tl.store(p_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])\n"
        "    else:\n" + textwrap.indent(in_place, "    ")
    )


def render_reduce(spec: emit.KernelSpec, acc_dtype: str, args: str, strides: str, finish: str) -> str:
    """The `{name}_reduce` kernel of a family: `args` / `strides` are the parameters `finish` reads."""
    return REDUCE_TEMPLATE.format(
        name=spec.name, acc_name=acc_dtype.replace("tl.", ""), args=args, strides=strides, N=spec.N,
        block_n=spec.block_n, acc_dtype=acc_dtype, finish=finish, epilogue=emit.render_epilogue(spec),
    )


def check(op: str, spec: emit.KernelSpec, split_k: int) -> int:
    """split_k as an int, or KernelError unless it divides the number of k-blocks."""
    blocks = -(-spec.K // spec.block_k)
    if not isinstance(split_k, int) or split_k < 1 or blocks % split_k:
        valid = [s for s in range(1, blocks + 1) if blocks % s == 0]
        raise KernelError(
            f"{op}: split_k={split_k!r} must divide the {blocks} k-blocks of K={spec.K} "
            f"(BLOCK_K={spec.block_k}) so that every split gets whole blocks; valid: {valid}"
        )
    return split_k


def workspace(split_k: int, M: int, N: int, dtype: torch.dtype, y: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """The partials buffer and its strides; with split_k == 1, y stands in (never written)."""
    if split_k == 1:
        return y, (0, 0, 0)
    p = torch.empty((split_k, M, N), dtype=dtype, device=y.device)
    return p, (p.stride(0), p.stride(1), p.stride(2))


def launch_reduce(module, spec: emit.KernelSpec, p: Tensor, scales: tuple, scale_strides: tuple,
                  bias: Tensor | None, y: Tensor, M: int, block_m: int, split_k: int) -> None:
    """Run `{name}_reduce` over the (M-blocks, N-blocks) grid when the GEMM was split."""
    if split_k == 1:
        return
    grid = ((M + block_m - 1) // block_m, (spec.N + spec.block_n - 1) // spec.block_n)
    getattr(module, f"{spec.name}_reduce")[grid](
        p, *scales, bias, y,
        M,
        p.stride(0), p.stride(1), p.stride(2),
        *scale_strides,
        bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, SPLIT_K=split_k,
    )
