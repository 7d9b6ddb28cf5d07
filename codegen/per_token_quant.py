"""qhl::quantize_per_token — dynamic symmetric int8 quantization, one scale per token.

    x [..., K] float  ->  (q int8 [..., K], scale float32 [..., 1])
    scale = amax(|x_row|) / 127 ;  q = clamp(round(x / scale), -127, 127)

Faces: spec (below, CPU), fake, kernel (codegen/triton/per_token_quant.py, CUDA).
It is the prologue of W8A8 matmuls; it is also an op on its own so that graphs and tests can
name it. Quantization is not differentiable: no grad face (the W8A8 op's grad is straight-through).
"""
from __future__ import annotations

import torch
from torch import Tensor

from qhl.codegen import quant

__all__ = ["quantize_per_token"]


@torch.library.custom_op("qhl::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Spec face: see the module docstring."""
    return quant.quantize_per_token(x)


@quantize_per_token.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


@quantize_per_token.register_kernel("cuda")
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    from qhl.codegen.triton.per_token_quant import per_token_quant

    return per_token_quant(x)
