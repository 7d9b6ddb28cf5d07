"""select_layers: decide, per canonical matmul, which form the recipe gives it (or why none).

    linear(x, W, b) [MatmulInfo: form=None]  ->  same node [MatmulInfo: form="w8a8", knobs={...}]

Pure bookkeeping: the graph's numbers do not change. A layer is left float, with the reason in
its MatmulInfo, when it has no weight, computes in a dtype other than float32/float16/bfloat16
(float64, complex and integer matmuls are left alone), or the recipe's skip list / include globs /
overrides say so. Trainable weights are rewritten too: their packed copy is refreshed whenever
the weight changes in place (qhl.runtime.packed), and the backward stays float (straight-through).
"""
from __future__ import annotations

from torch import fx

from qhl.graph import FLOAT_DTYPES, matmul_infos
from qhl.passes.base import PassResult
from qhl.recipes import Recipe, resolve_group_size

__all__ = ["select_layers"]


def _reason_to_keep_float(info) -> str | None:
    if info.weight is None:
        return info.reason or "no weight operand"
    if info.dtype not in FLOAT_DTYPES:
        return f"{info.dtype} matmul: only float32/float16/bfloat16 matmuls are rewritten"
    if info.weight.value.dtype not in FLOAT_DTYPES:
        return f"weight dtype {info.weight.value.dtype}: only float weights are quantized"
    return None


def select_layers(gm: fx.GraphModule, recipe: Recipe) -> PassResult:
    stats = {"selected": 0, "kept_float": 0}
    changed = False
    for _node, info in matmul_infos(gm):
        if info.selected or info.form is not None or (info.reason and info.weight is not None):
            continue  # decided by an earlier run: idempotent
        reason = _reason_to_keep_float(info)
        knobs = None
        if reason is None:
            knobs, reason = recipe.layer_knobs(info.path)
        if reason is not None:
            if info.reason != reason:
                info.decline(reason)
                changed = True
            stats["kept_float"] += 1
            continue
        knobs = dict(knobs)
        if "group_size" in knobs:  # "auto" -> this layer's size (in_features known here, not in the recipe)
            knobs["group_size"] = resolve_group_size(info.in_features, knobs["group_size"])
        info.knobs, info.selected = knobs, True
        changed = True
        stats["selected"] += 1
    return PassResult(gm, changed, stats)
