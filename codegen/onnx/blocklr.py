"""ONNX face of qhl::blocklr_linear: a k x k grid of low-rank blocks, standard ONNX (opset >= 21).

With R_n = the ranks of column block n's blocks and R_j those of row block j (codegen/lowrank.py's
flat layout, block b = j*k + n owning rows offs[b]:offs[b+1] of u [R, N/k] and v [R, K/k]):

    x ─ Slice(n-th K/k columns) ─ MatMul(Vn^T [K/k, R_n]) ─ T_n            (k MatMuls)
    T_n ─ Slice(the r_jn columns of block (j, n)) ─ Concat over n ─ MatMul(U_j [R_j, N/k]) ─ y_j
    Concat(y_0 .. y_{k-1}) ─ Add(b)                                        (k MatMuls)

Vn^T = Transpose(Concat_j(Slice(v, rows of (j, n)))) and U_j = Slice(u, offs[j*k]:offs[j*k+k])
depend only on initializers and are folded by qhl.onnx_export into float16 initializers (the
stored bytes stay the factors'); a Cast to float32 follows each, so the math is float32 like
the spec. 2k MatMuls instead of a batched MatMul: the blocks' ranks differ, and padding them
to one rank would store the zeros. A row block whose ranks are all 0 is a ConstantOfShape 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qhl.codegen.onnx.per_token_quant import const, opset
from qhl.codegen.onnx.w8a16 import as_float32, finish

__all__ = ["OPS", "translate"]

OPS: dict[str, list[str]] = {"standard": ["Slice", "MatMul", "Concat", "Add"]}


def _slice(t: Any, start: int, end: int, axis: int) -> Any:
    return opset().Slice(t, const([start], np.int64), const([end], np.int64), const([axis], np.int64))


def _float(t: Any) -> Any:
    from onnxscript import ir

    return opset().Cast(t, to=ir.DataType.FLOAT)


def translate(x: Any, u: Any, v: Any, ranks: Any, bias: Any = None) -> Any:
    """qhl::blocklr_linear -> Slice / MatMul / Concat (+ Add)."""
    from onnxscript import ir

    from qhl.codegen.blocklr import blocklr_grid

    op = opset()
    ranks = [int(r) for r in ranks]
    k = blocklr_grid(ranks)
    nb = int(getattr(u.shape[1], "value", u.shape[1]))
    kb = int(getattr(v.shape[1], "value", v.shape[1]))
    offs = np.concatenate([[0], np.cumsum(ranks)]).astype(int).tolist()
    xf, x_dtype = as_float32(x)
    # stage 1: T_n = x_n @ V_n^T, one MatMul per column block n
    t_n: list[Any] = []
    for n in range(k):
        rows = [(offs[j * k + n], offs[j * k + n + 1]) for j in range(k) if ranks[j * k + n]]
        if not rows:
            t_n.append(None)
            continue
        parts = [_slice(v, a, b, 0) for a, b in rows]
        vn = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)
        t_n.append(op.MatMul(_slice(xf, n * kb, (n + 1) * kb, -1), _float(op.Transpose(vn, perm=[1, 0]))))
    # stage 2: y_j = [T_n's block-(j, n) columns over n] @ U_j, one MatMul per row block j
    ys = []
    for j in range(k):
        cols = []
        for n in range(k):
            r = ranks[j * k + n]
            if r:
                first = sum(ranks[jj * k + n] for jj in range(j))  # T_n's columns are ordered by j
                cols.append(_slice(t_n[n], first, first + r, -1))
        if not cols:
            shape = op.Concat(
                op.Slice(op.Shape(xf), const([0], np.int64), const([-1], np.int64)), const([nb], np.int64), axis=0
            )
            ys.append(op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, np.float32))))
            continue
        tj = cols[0] if len(cols) == 1 else op.Concat(*cols, axis=-1)
        ys.append(op.MatMul(tj, _float(_slice(u, offs[j * k], offs[(j + 1) * k], 0))))
    y = ys[0] if k == 1 else op.Concat(*ys, axis=-1)
    return finish(y, bias, x_dtype)
