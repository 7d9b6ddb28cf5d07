"""What the rotation passes share: which Hadamard a size gets, and rotating weights offline.

Convention (qhl.hadamard): `M` is orthonormal, `x @ M` is what `qhl::hadamard(x, block)` computes,
with block 0 the full size-n matrix `qhl.hadamard_matrix(n)` and block b the block-diagonal
`I (x) H_b`. A rotated matmul computes `(x M)(W M)^T = x W^T`, so an online rotation owes its
weight the offline rewrite `W -> W M`.
"""
from __future__ import annotations

import torch
from torch import fx

from qhl.graph import TRAINING_META, val

__all__ = ["resolve_block", "rotate_rows", "insert_hadamard", "training_reason", "describe_block"]


def resolve_block(n: int, requested: int | None) -> tuple[int | None, str | None]:
    """(block, None) for the rotation of size n (0 = full size), or (None, why not)."""
    from qhl import hadamard

    if requested is not None:
        if n % requested:
            return None, f"hadamard_block={requested} does not divide the size {n}"
        if not hadamard.can_build(requested):
            return None, f"no Hadamard construction for the block size {requested}"
        return (0 if requested == n else requested), None
    if hadamard.can_build(n):
        return 0, None
    b = hadamard.block_fallback(n)
    if b is not None:
        return b, None
    return None, (
        f"no Hadamard construction for size {n} (K * 2^m with a buildable K) and no power-of-two "
        "block in [16, 256] divides it; the layer stays unrotated"
    )


def describe_block(n: int, block: int) -> str:
    return f"H{n}" if block in (0, n) else f"I(x)H{block}"


def rotate_rows(w: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """`(w * signs) @ M` row by row, computed in float64 (exact enough to fold offline)."""
    x = w.double()
    if signs is not None:
        x = x * signs.double()
    return torch.ops.qhl.hadamard(x, block, False, False).to(w.dtype)


def insert_hadamard(gm: fx.GraphModule, before: fx.Node, x: fx.Node, block: int, fp32: bool) -> fx.Node:
    """Insert `qhl.hadamard(x, block)` before `before`; returns the new node (shape/dtype of x)."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(torch.ops.qhl.hadamard.default, (x, block, False, fp32))
    xv = val(x)
    if xv is not None:
        node.meta["val"] = xv
    return node


def training_reason(gm: fx.GraphModule) -> str | None:
    if gm.meta.get(TRAINING_META):
        return (
            "rotations fold weights offline and are for inference; a training graph keeps its "
            "layers unrotated (compile the model in eval mode under torch.no_grad())"
        )
    return None
