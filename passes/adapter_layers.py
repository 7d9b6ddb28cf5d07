"""adapter_layers: the layer table for adapter recipes, and the int4 base of gralora-w4a16.

    qhl.gralora_linear(x, W, b, A, B, ..)  [no MatmulInfo]  ->  same call [MatmulInfo form "gralora"/"lora"]
    qhl.gralora_linear(x, W, b, A, B, ..)  (recipe form w4a16)
        ->  qhl.gralora_w4a16_linear(x, packed, s, z, g, b, A, B, ..)     W packed once, here
    linear(x, W, b) selected by an adapter recipe but with no adapter
        ->  unchanged, declined with the reason (divisibility rule, lower_adapters' reason, or
            "no adapter attached")
    linear(x, W + dW, b) from merge_adapters                ->  form "<kind>-merged"

The base weight of gralora-w4a16 is packed from its real value like quantize_linear packs it
(int4 group-wise) and re-packed if it changes in place; the backward graph (already built by
AOTAutograd) still reads the float weight for dx, which is what a frozen QLoRA base needs.
"""
from __future__ import annotations

import torch
from torch import fx

import qhl.codegen  # noqa: F401  (registers the qhl:: ops)
from qhl.codegen import quant
from qhl.graph import MATMUL_META, MatmulInfo, WeightRef, matmul_infos, module_path_of, val, weight_source
from qhl.passes.base import PassResult
from qhl.passes.lower_adapters import ADAPTER_META, DECLINED_META, FUSED_OPS, GRAPH_KIND_META
from qhl.recipes import Recipe, group_size_advice, resolve_group_size
from qhl.runtime.packed import PackedWeight, record_packed

__all__ = ["adapter_layers", "MERGED_META"]

MERGED_META = "qhl_adapter_merged"  # on a linear that merge_adapters built: AdapterInfo

_GRALORA = torch.ops.qhl.gralora_linear.default
_GRALORA_W4 = torch.ops.qhl.gralora_w4a16_linear.default


def _layer_path(node: fx.Node, ref: WeightRef | None) -> str:
    info = node.meta.get(ADAPTER_META)
    if info is not None:
        return info.path
    if ref is not None:
        for suffix in (".base_layer.weight", ".weight"):
            if ref.path.endswith(suffix):
                return ref.path[: -len(suffix)]
    return module_path_of(node) or node.name


def _annotate(node: fx.Node) -> MatmulInfo:
    is_w4 = node.target == _GRALORA_W4
    lora_a = val(node.args[6] if is_w4 else node.args[3])
    src = None if is_w4 else weight_source(node.args[1])
    ref = src[1] if src is not None else None
    adapter = node.meta.get(ADAPTER_META)
    if adapter is not None:
        kind = adapter.kind
    else:  # a call written by qhl.prepare's forward: LoRA is the k = 1 case
        kind = "lora" if lora_a is not None and lora_a.shape[0] == 1 else "gralora"
    w = ref.value if ref is not None else None
    xv = val(node.args[0])
    info = MatmulInfo(
        path=_layer_path(node, ref),
        op="linear",
        in_features=int(w.shape[1]) if w is not None else None,
        out_features=int(w.shape[0]) if w is not None else None,
        weight=ref,
        has_bias=(node.args[5] if is_w4 else node.args[2]) is not None,
        dtype=xv.dtype if xv is not None else None,
        x_shape=tuple(xv.shape) if xv is not None else (),
        form=kind + ("-w4a16" if is_w4 else ""),
        selected=True,
        node_name=node.name,
    )
    info.knobs = {"adapter": kind}
    if adapter is not None:
        info.knobs.update(k=adapter.k, r=adapter.r, hybrid_r=adapter.hybrid_r, scaling=adapter.scaling)
    if w is not None:
        info.weight_bytes_before = info.weight_bytes_after = w.numel() * w.element_size()
    node.meta[MATMUL_META] = info
    return info


def _pack_base(gm: fx.GraphModule, node: fx.Node, info: MatmulInfo, recipe: Recipe) -> str | None:
    """gralora_linear -> gralora_w4a16_linear with W packed; returns a reason when it declines."""
    from qhl.passes.quantize_linear import _buffer_name

    if info.weight is None:
        return "the base weight is not a model parameter; it stays float"
    g = resolve_group_size(info.in_features, recipe.group_size)
    if info.in_features % g:
        return f"base kept float: {group_size_advice(info.in_features, g)}"
    knobs = {"group_size": g, "symmetric": recipe.symmetric, "weight_clip": recipe.weight_clip}
    source = info.weight.value

    def pack(t):
        return quant.quantize_int4_groupwise(t.float(), g, knobs["symmetric"], knobs["weight_clip"])

    packed = pack(source.detach())
    x, _w, bias, a, b, ha, hb, scaling, *rest = node.args
    names = []
    with gm.graph.inserting_before(node):
        attrs = []
        for tensor, suffix in zip(packed, ("w_packed", "w_scale", "w_zero")):
            name = _buffer_name(gm, info.path, suffix)
            gm.register_buffer(name, tensor.to(source.device))
            attr = gm.graph.get_attr(name)
            attr.meta["val"] = tensor
            attrs.append(attr)
            names.append(name)
        new = gm.graph.call_function(_GRALORA_W4, (x, *attrs, g, bias, a, b, ha, hb, scaling, *rest))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    record_packed(gm, PackedWeight(info.path, source, source._version, pack, tuple(names)))
    info.form = info.form + "-w4a16"
    info.knobs["group_size"] = g  # the rendered w4a16 base kernel is specialised on it
    info.node_name = new.name
    info.weight_bytes_after = sum(t.numel() * t.element_size() for t in packed)
    return None


def _decline_unadapted(gm: fx.GraphModule, info: MatmulInfo) -> None:
    from qhl.adapters import adapter_rule_reason

    declined = gm.meta.get(DECLINED_META, {})
    layer = info.path[: -len(".base_layer")] if info.path.endswith(".base_layer") else info.path
    reason = declined.get(layer)
    if reason is None and info.in_features and info.out_features:
        reason = adapter_rule_reason(info.in_features, info.out_features, info.knobs)
    if reason is None:
        reason = "no adapter attached to this layer: run qhl.prepare(model, recipe) or wrap the model with peft"
    info.decline(reason)


def adapter_layers(gm: fx.GraphModule, recipe: Recipe) -> PassResult:
    stats = {"fused": 0, "quantized_base": 0, "merged": 0, "declined": 0}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FUSED_OPS or MATMUL_META in node.meta:
            continue
        info = _annotate(node)
        changed = True
        stats["fused"] += 1
        if recipe.form == "w4a16" and node.target == _GRALORA:
            reason = _pack_base(gm, node, info, recipe)
            if reason is None:
                stats["quantized_base"] += 1
            else:
                info.reason = reason
    for node, info in matmul_infos(gm):
        merged = node.meta.get(MERGED_META)
        if merged is not None and info.form is None and node.target not in FUSED_OPS:
            info.form, info.reason, info.selected = f"{merged.kind}-merged", None, True
            info.path = merged.path
            stats["merged"] += 1
            changed = True
        elif (info.selected and info.form is None and info.knobs.get("adapter") and node.target not in FUSED_OPS
              and gm.meta.get(GRAPH_KIND_META) != "backward"):
            _decline_unadapted(gm, info)
            stats["declined"] += 1
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
