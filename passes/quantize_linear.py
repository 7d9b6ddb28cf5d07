"""quantize_linear: selected canonical matmuls -> qhl:: quantized ops, weights packed once.

    linear(x, W, b)  ->  qhl.w8a8_linear(x, Wq, s_w, b)                       form "w8a8"
    linear(x, W, b)  ->  qhl.w8a8_tensor_linear(x, Wq, s_w, b)                form "w8a8-tensor"
    linear(x, W, b)  ->  qhl.w8a16_linear(x, Wq, s_w, b)                      form "w8a16"
    linear(x, W, b)  ->  qhl.w4a16_linear(x, packed, s, z, group_size, b)     form "w4a16"
    linear(x, W, b)  ->  qhl.w4a8_linear(x, packed, s_w, b[, hadamard_block])  form "w4a8" (and "w4a4")
    linear(x, W, b)  ->  qhl.blocklr_linear(x, u, v, ranks, b)                form "blocklr"
    linear(x, W, b)  ->  qhl.lr_w4a16_linear(x, l1, l2, packed, s, z, g, b)   form "lr-w4a16"

The weight is quantized here, at compile time, from its real value, and the packed tensors are
stored on the GraphModule as buffers (get_attr nodes): nothing is re-quantized per call.
Rewrite rules are data: RULES maps a form to (check, pack, op). A check that declines returns
the reason, and the layer stays float with that reason in the report.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import qhl.codegen  # noqa: F401  (registers the qhl:: ops this pass inserts)
from qhl.codegen import quant
from qhl.graph import MatmulInfo, matmul_infos
from qhl.passes import lowrank_rules
from qhl.passes.base import PassResult
from qhl.recipes import group_size_advice
from qhl.runtime.packed import PackedWeight, pack_once, record_packed

__all__ = ["quantize_linear", "RULES", "Rule"]


@dataclass(frozen=True)
class Rule:
    """How one form rewrites a canonical linear: check -> reason|None, pack -> buffers, op."""

    form: str
    check: Callable[[MatmulInfo, dict[str, Any]], str | None]
    pack: Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, ...]]
    op: Any
    static_args: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda knobs: ()
    # keyword arguments after the bias (ops whose static arguments follow it, e.g. hadamard_block)
    static_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = lambda knobs: {}


def _check_any(info: MatmulInfo, knobs: dict[str, Any]) -> str | None:
    return None if info.in_features and info.out_features else "empty weight"


def _check_int4(info: MatmulInfo, knobs: dict[str, Any]) -> str | None:
    g = knobs["group_size"]
    if not info.in_features:
        return _check_any(info, knobs)
    if info.in_features % g:
        return group_size_advice(info.in_features, g)
    return _check_any(info, knobs)


def _check_int4_per_channel(info: MatmulInfo, knobs: dict[str, Any]) -> str | None:
    if info.in_features and info.in_features % 2:
        return (
            f"in_features K={info.in_features} is odd; int4 weights are packed two per byte "
            "along K, so K must be even"
        )
    return _check_any(info, knobs)


def _hadamard_block(knobs: dict[str, Any]) -> int:
    """The online rotation of w4a8/w4a4 (set by the rotation pass): -1 = none."""
    block = knobs.get("hadamard_block", -1)
    return -1 if block is None else int(block)


def _w4ax_rule(form: str) -> Rule:
    return Rule(
        form,
        _check_int4_per_channel,
        lambda w, knobs: quant.quantize_int4_per_channel(w, knobs.get("weight_clip", "none")),
        getattr(torch.ops.qhl, f"{form}_linear").default,
        # hadamard_block follows the bias in the op's schema; omitted when -1 (its default)
        static_kwargs=lambda knobs: {"hadamard_block": b} if (b := _hadamard_block(knobs)) >= 0 else {},
    )


RULES: dict[str, Rule] = {
    "w8a8": Rule(
        "w8a8",
        _check_any,
        lambda w, knobs: quant.quantize_int8_per_channel(w),
        torch.ops.qhl.w8a8_linear.default,
    ),
    "w8a8-tensor": Rule(
        "w8a8-tensor",
        _check_any,
        lambda w, knobs: quant.quantize_int8_per_channel(w),
        torch.ops.qhl.w8a8_tensor_linear.default,
    ),
    "w8a16": Rule(
        "w8a16",
        _check_any,
        lambda w, knobs: quant.quantize_int8_per_channel(w),
        torch.ops.qhl.w8a16_linear.default,
    ),
    "w4a16": Rule(
        "w4a16",
        _check_int4,
        lambda w, knobs: quant.quantize_int4_groupwise(
            w, knobs["group_size"], knobs["symmetric"], knobs.get("weight_clip", "none")
        ),
        torch.ops.qhl.w4a16_linear.default,
        lambda knobs: (knobs["group_size"],),
    ),
    "w4a8": _w4ax_rule("w4a8"),
    "w4a4": _w4ax_rule("w4a4"),
    # low-rank compression (issue 6): checks and packing in passes/lowrank_rules.py
    "blocklr": Rule(
        "blocklr", lowrank_rules.check_blocklr, lowrank_rules.pack_blocklr,
        torch.ops.qhl.blocklr_linear.default, lowrank_rules.blocklr_static_args,
    ),
    "lr-w4a16": Rule(
        "lr-w4a16", lowrank_rules.check_lr_w4a16, lowrank_rules.pack_lr_w4a16,
        torch.ops.qhl.lr_w4a16_linear.default, lambda knobs: (knobs["group_size"],),
    ),
}
_PACKED_NAMES = {"w8a8": ("wq", "w_scale"), "w8a8-tensor": ("wq", "w_scale"), "w8a16": ("wq", "w_scale"), "w4a16": ("w_packed", "w_scale", "w_zero"),
                 "w4a8": ("w_packed", "w_scale"), "w4a4": ("w_packed", "w_scale")}
_PACKED_NAMES.update({"blocklr": ("lr_u", "lr_v"), "lr-w4a16": ("lr_l1", "lr_l2", "w_packed", "w_scale", "w_zero")})


def _buffer_name(gm: fx.GraphModule, path: str, suffix: str) -> str:
    base = "qhl_" + re.sub(r"[^0-9A-Za-z_]", "_", path) + "_" + suffix
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _rewrite(gm: fx.GraphModule, node: fx.Node, info: MatmulInfo, rule: Rule) -> None:
    w = info.weight.value.detach()
    knobs = dict(info.knobs)
    transform = info.transformed  # an offline rotation owed to this weight (identity if none)
    if info.weight_transform is None:  # shared with the model's other compiled graphs
        key = (rule.form, repr(sorted(knobs.items())), str(w.device))
        packed = pack_once(info.weight.value, key, lambda: [t.to(w.device) for t in rule.pack(w.to(torch.float32), knobs)])
    else:
        packed = rule.pack(transform(w.to(torch.float32)), knobs)
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    with gm.graph.inserting_before(node):
        attrs, names = [], []
        for tensor, suffix in zip(packed, _PACKED_NAMES[rule.form]):
            name = _buffer_name(gm, info.path, suffix)
            names.append(name)
            gm.register_buffer(name, tensor.to(w.device))
            attr = gm.graph.get_attr(name)
            attr.meta["val"] = tensor
            attrs.append(attr)
        new = gm.graph.call_function(
            rule.op, (x, *attrs, *rule.static_args(knobs), bias), rule.static_kwargs(info.knobs)
        )
    new.meta.update(node.meta)
    # Remember how to re-pack, so a weight updated in place later never runs stale.
    record_packed(
        gm,
        PackedWeight(
            info.path, info.weight.value, info.weight.value._version, lambda t: rule.pack(transform(t), knobs), tuple(names)
        ),
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    info.form, info.reason = rule.form, None
    info.weight_bytes_after = sum(t.numel() * t.element_size() for t in packed)
    info.node_name = new.name


def quantize_linear(gm: fx.GraphModule) -> PassResult:
    stats = {"rewritten": 0, "declined": 0}
    for node, info in matmul_infos(gm):
        if not info.selected or info.form is not None:
            continue
        rule = RULES.get(info.knobs.get("form"))
        if rule is None:
            info.decline(f"form {info.knobs.get('form')!r} has no rewrite rule in this pass")
            stats["declined"] += 1
            continue
        reason = rule.check(info, info.knobs)
        if reason is not None:
            info.decline(reason)
            stats["declined"] += 1
            continue
        _rewrite(gm, node, info, rule)
        stats["rewritten"] += 1
    changed = stats["rewritten"] > 0 or stats["declined"] > 0
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
