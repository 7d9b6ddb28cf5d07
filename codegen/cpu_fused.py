"""Fused CPU prologue and epilogues of the int8 GEMM forms (w8a8, w4a8, w4a4), and w4a16's 1-token
GEMV (`int4_gemv`, see codegen/w4a16.py), compiled by Inductor.

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

__all__ = ["enabled", "disable_reason", "per_token_codes", "epilogue_rows", "epilogue_scaled", "epilogue_cols",
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
    # y[m, n] = sum_G s[n, G] * sum_j x[m, G, j] * (c[n, G, j] - z[n, G]): per-group partial sums,
    # then the scales; the codes are read once, as uint8, inside the reduction.
    n, k = codes.shape
    groups = k // group_size
    centered = codes.view(n, groups, group_size).float() - zero.float()[..., None]
    part = (x.float().view(-1, 1, groups, group_size) * centered[None]).sum(-1)
    return (part * scale[None]).sum(-1)


# Compiled per shape: the 1-token GEMV vectorizes its group reduction only with a static group
# size (0.69 against 0.92 ms on a 4096 x 4096 layer); a model has few distinct layer shapes.
_STATIC = ("int4_gemv",)
_FUNCTIONS = {"prologue": _prologue, "rows": _epilogue_rows, "scaled": _epilogue_scaled, "cols": _epilogue_cols,
              "int4_gemv": _int4_gemv}


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


def _call(name: str, *args):
    """The compiled function, or on any failure to compile it the same math eagerly (and the
    fused path off from then on, with the reason logged once)."""
    if _disabled is None:
        try:
            return _compiled(name)(*args)
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


def int4_gemv(x2: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """y [M, N] float32 = x2 @ ((codes - zero) * scale)^T per group, from unpacked uint8 codes [N, K]
    (w4a16 at one token: codegen/w4a16.py)."""
    return _call("int4_gemv", x2, codes, scale, zero, group_size)
