"""merge_adapters: fold each fused adapter into its base weight for deployment (W' = W + dW).

    qhl.gralora_linear(x, W, b, A, B, hA, hB, s, x_adapter)  ->  linear(x, W', b)
    W' = W + gralora_delta_weight(A, B, hA, hB, s)     (computed once, here, from real values)

dW is the k x k grid of rank-R/k blocks (plus the hybrid B_gen A_gen), so the merged layer is
one plain matmul: the ONNX graph is a MatMul, and any later pass (quantize_linear) sees a
canonical linear. Declines (the call stays fused) in a training graph, where merging would stop
the adapter's gradients, and when an adapter input is not a model parameter (or a transpose of
one). x_adapter (dropout) is dropped: a merged layer is an inference layer.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import fx

from qhl.graph import TRAINING_META, WEIGHT_META, WeightRef, aten
from qhl.passes.adapter_layers import MERGED_META, _layer_path
from qhl.passes.base import PassResult
from qhl.passes.lower_adapters import ADAPTER_META, AdapterInfo

__all__ = ["merge_adapters"]

log = logging.getLogger(__name__)
_GRALORA = torch.ops.qhl.gralora_linear.default
_VIEW_OPS = {aten.t.default, aten.unsqueeze.default, aten.transpose.int, aten.permute.default,
             aten.detach.default, aten.alias.default}


def _value(node: Any) -> torch.Tensor | None:
    """The real value of a parameter node, or of views of one; None otherwise."""
    if node is None or not isinstance(node, fx.Node):
        return None
    if WEIGHT_META in node.meta:
        return node.meta[WEIGHT_META].value.detach()
    if node.op == "call_function" and node.target in _VIEW_OPS:
        inner = _value(node.args[0])
        return None if inner is None else node.target(inner, *node.args[1:])
    return None


def merge_adapters(gm: fx.GraphModule) -> PassResult:
    from qhl.codegen.gralora import gralora_delta_weight

    stats = {"merged": 0, "declined": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != _GRALORA:
            continue
        x, w, bias, a, b, ha, hb, scaling = node.args[:8]
        info: AdapterInfo | None = node.meta.get(ADAPTER_META)
        if gm.meta.get(TRAINING_META):
            stats["declined"] += 1
            log.info("merge_adapters: %s stays fused: merging in a training graph would stop its gradients", node.name)
            continue
        values = {name: _value(n) for name, n in (("w", w), ("a", a), ("b", b), ("ha", ha), ("hb", hb))}
        needed = ["w", "a", "b"] + (["ha", "hb"] if ha is not None else [])
        if any(values[k] is None for k in needed):
            stats["declined"] += 1
            log.info("merge_adapters: %s stays fused: an adapter input is not a model parameter", node.name)
            continue
        w_val = values["w"]
        with torch.no_grad():
            dw = gralora_delta_weight(values["a"].float(), values["b"].float(),
                                      None if ha is None else values["ha"].float(),
                                      None if hb is None else values["hb"].float(), float(scaling))
            merged = (w_val.float() + dw).to(w_val.dtype)
        ref = w.meta[WEIGHT_META] if WEIGHT_META in w.meta else None
        path = _layer_path(node, ref)
        name = "qhl_" + re.sub(r"[^0-9A-Za-z_]", "_", path) + "_merged_weight"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, merged)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
            attr.meta["val"] = merged
            attr.meta[WEIGHT_META] = WeightRef(path=f"{path}.merged_weight", value=merged, trainable=False)
            args = (x, attr) if bias is None else (x, attr, bias)
            linear = gm.graph.call_function(aten.linear.default, args)
        linear.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        k = int(values["a"].shape[0])
        linear.meta[MERGED_META] = info or AdapterInfo(
            path, "lora" if k == 1 else "gralora", k, int(values["a"].shape[-1]), 0, float(scaling))
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        stats["merged"] += 1
    changed = stats["merged"] > 0
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
