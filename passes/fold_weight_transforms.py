"""fold_weight_transforms: write out the float weight rewrites that no quantizer consumed.

    linear(x, W, b)  [MatmulInfo owes W -> f(W)]  ->  linear(x, W_f, b)   W_f = f(W), a buffer

Runs after quantize_linear. A rotation pass records the weight rewrite a layer owes
(`MatmulInfo.weight_transform`); quantize_linear packs f(W) for the layers it rewrites. Every
other layer that owes one (the `hadamard` recipe's float layers, lm_head in the skip list, a layer
quantize_linear declined) gets f(W) here as a float buffer that is re-derived if W changes in
place. A layer that was promised a fused-prologue rotation (w4a8/w4a4) but was declined by
quantize_linear gets a standalone qhl.hadamard node instead, so x and W stay rotated together.
"""
from __future__ import annotations

import re

import torch
from torch import fx

from qhl.graph import matmul_infos
from qhl.passes.base import PassResult
from qhl.passes.rotation_common import insert_hadamard
from qhl.runtime.packed import PackedWeight, record_packed

__all__ = ["fold_weight_transforms"]


def fold_weight_transforms(gm: fx.GraphModule) -> PassResult:
    stats = {"folded": 0}
    for node, info in matmul_infos(gm):
        if info.weight_transform is None or info.form is not None or node.target != torch.ops.aten.linear.default:
            continue
        block = info.knobs.pop("hadamard_block", -1)
        if block is not None and block >= 0:
            node.update_arg(0, insert_hadamard(gm, node, node.args[0], block, fp32=True))
        ref, fn = info.weight, info.weight_transform
        base = "qhl_rot_" + re.sub(r"[^0-9A-Za-z_]", "_", info.path) + "_weight"
        name, i = base, 1
        while hasattr(gm, name):
            name, i = f"{base}_{i}", i + 1
        w = ref.value.detach()
        gm.register_buffer(name, fn(w.float()).to(w.dtype))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta["val"] = getattr(gm, name)
        node.update_arg(1, attr)
        record_packed(gm, PackedWeight(info.path, ref.value, ref.value._version, lambda t, f=fn: (f(t),), (name,)))
        info.weight_transform = None  # owed no more: idempotent
        stats["folded"] += 1
    if stats["folded"]:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(stats["folded"]), stats)
