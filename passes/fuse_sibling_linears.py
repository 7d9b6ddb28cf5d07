"""fuse_sibling_linears: one quantized matmul for the layers that read the same input.

    y1 = qhl.w8a16_linear(x, W1, s1, b1)         y = qhl.w8a16_linear(x, cat(W1, W2), cat(s1, s2), cat(b1, b2))
    y2 = qhl.w8a16_linear(x, W2, s2, b2)   ->    y1 = y[..., :N1];  y2 = y[..., N1:]

An attention block's q/k/v projections and an MLP's gate/up projections read the same activation:
fused, a decode step runs one GEMV (and one per-token quantize of x) where it ran three, and
Inductor compiles one kernel where it compiled three. On SmolLM2 that is 4 GEMVs a layer instead
of 7, and Inductor's codegen time grows with the number of kernels (~0.25 s each on 2 cores).

Exact, not approximate: each output channel keeps its own rows of the weight, scale, zero point
and bias, and x's quantization (per token, per tensor for w8a8-tensor, or a per-token Hadamard
rotation) depends on x alone, which the siblings share; so every output element is the spec's,
computed as before.

A codegen pass: the torch.compile door runs it on each inference graph just before Inductor
compiles it or before it runs op by op (CUDA's Triton kernels, CPU faces); recipe knob
`fuse_siblings`, on by default. Training graphs are not fused. Recipes, `qhl.inspect` and ONNX export keep one node
per layer, so the layer table and the exported file still name every layer. It returns a new
GraphModule; the input graph's packed buffers become row views of the concatenated ones, so the
two graphs share memory and `refresh`'s in-place re-pack of a changed weight reaches both.

Siblings fuse when they call the same op on the same x node with equal non-tensor arguments, and
every tensor operand has a row per output channel, with equal trailing shapes and dtypes; the
weight must be a constant (get_attr). A bias the door passes as a graph input is concatenated in
the graph (N floats a call), so a change to it is seen. A group that can't fuse is left as it was; `sibling_groups` says why.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

import torch
from torch import fx

from qhl.graph import attr_value, layer_path
from qhl.passes.base import PassResult, copy_graph_module
from qhl.runtime.packed import replace_shared

__all__ = ["fuse_sibling_linears", "sibling_groups", "FUSABLE_OPS", "FUSED_FROM_META"]

log = logging.getLogger(__name__)

FUSED_FROM_META = "qhl_fused_from"  # the fused node's meta: the module paths of the layers it holds


def _fusable_ops() -> tuple[Any, ...]:
    import qhl.codegen  # noqa: F401 - registers the qhl:: ops

    ops = torch.ops.qhl
    return (ops.w8a8_linear.default, ops.w8a8_tensor_linear.default, ops.w8a16_linear.default,
            ops.w4a16_linear.default, ops.w4a8_linear.default, ops.w4a4_linear.default)


FUSABLE_OPS = _fusable_ops()


def _set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *parents, leaf = target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part)
    if isinstance(getattr(owner, leaf, None), torch.nn.Parameter):
        # torch.export's graph modules (qhl.inspect's) hold biases as parameters, and a module
        # refuses a plain tensor in a parameter's place; the view stays one (same storage)
        value = torch.nn.Parameter(value, requires_grad=False)
    setattr(owner, leaf, value)


def _signature(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | str:
    """What siblings must share to fuse (the op, x, the non-tensor arguments, and per weight
    operand its dtype and trailing shape), or why this node can't fuse at all."""
    if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return "a tensor operand is passed by keyword"
    args = list(node.args)
    key: list[Any] = [node.target, args[0], repr(sorted(node.kwargs.items()))]
    rows = None
    for i, arg in enumerate(args[1:], start=1):
        if not isinstance(arg, fx.Node):
            key.append(("value", i, repr(arg)))
            continue
        # A constant (the packed weight, its scales) is concatenated once, here; a graph input
        # (a bias the door lifted to a placeholder) is concatenated in the graph, on every call.
        kind = "constant" if arg.op == "get_attr" else "input"
        tensor = attr_value(gm, arg.target) if kind == "constant" else arg.meta.get("val")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            return f"operand {i} ({arg.name}) is not a tensor with a row per output channel"
        if i == 1 and kind != "constant":
            return f"its weight ({arg.name}) is not a constant of the graph"
        rows = tensor.shape[0] if rows is None else rows
        if tensor.shape[0] != rows:
            return f"operand {i} ({arg.name}) has {tensor.shape[0]} rows, the weight {rows}"
        key.append((kind, i, tensor.dtype, tuple(tensor.shape[1:]), tensor.device))
    return tuple(key)


def sibling_groups(gm: fx.GraphModule) -> tuple[list[list[fx.Node]], list[tuple[fx.Node, str]]]:
    """The groups of sibling qhl linears that fuse (each >= 2 nodes, in graph order), and the
    nodes that share x with a fusable sibling but can't join it, each with the reason."""
    by_key: dict[Any, list[fx.Node]] = defaultdict(list)
    by_x: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    declined: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in FUSABLE_OPS or not isinstance(node.args[0], fx.Node):
            continue
        by_x[node.args[0]].append(node)
        sig = _signature(gm, node)
        if isinstance(sig, str):
            declined.append((node, sig))
        else:
            by_key[sig].append(node)
    groups = []
    for nodes in (g for g in by_key.values() if len(g) > 1):
        consts = [a.target for n in nodes for a in n.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(set(consts)) < len(consts):
            # One buffer in two places of the concatenation: a re-pack could reach only one.
            declined.extend((n, "it shares a packed buffer with a sibling") for n in nodes)
        else:
            groups.append(nodes)
    fused = {n for g in groups for n in g}
    for x, nodes in by_x.items():
        if len(nodes) < 2:
            continue
        for node in nodes:
            if node not in fused and all(node is not d for d, _ in declined):
                declined.append((node, f"its op or arguments differ from every other linear reading {x.name}"))
    declined = [(n, r) for n, r in declined if len(by_x[n.args[0]]) > 1]
    return groups, declined


def _buffer_name(gm: fx.GraphModule, first: str) -> str:
    base = "qhl_fused_" + re.sub(r"[^0-9A-Za-z_]", "_", first)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _already_fused(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The buffer `parts` are consecutive row views of, covering all of it, if they are (a
    fusion of the same weights in another graph of the model made it); else None."""
    base = parts[0]._base
    if base is None or not base.is_contiguous():
        return None
    offset = 0
    for part in parts:
        if part._base is not base or part.storage_offset() != base.storage_offset() + offset * base.stride(0) \
                or part.shape[1:] != base.shape[1:]:
            return None
        offset += part.shape[0]
    return base if offset == base.shape[0] else None


def _set_val(node: fx.Node, make) -> None:
    # The fake value later code reads from node.meta["val"] (the Inductor door's decomposition
    # check), derived from the fake values of the nodes replaced; skipped where they have none.
    try:
        node.meta["val"] = make()
    except (KeyError, RuntimeError, TypeError):
        pass


def _fuse(source: fx.GraphModule, gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    graph = gm.graph
    first = nodes[0]
    n_rows = [attr_value(gm, n.args[1].target).shape[0] for n in nodes]
    args = list(first.args)
    with graph.inserting_before(first):
        for i, arg in enumerate(first.args[1:], start=1):
            if not isinstance(arg, fx.Node):
                continue
            if arg.op != "get_attr":
                parts = [n.args[i] for n in nodes]
                args[i] = graph.call_function(torch.ops.aten.cat.default, (parts,))
                _set_val(args[i], lambda: torch.cat([p.meta["val"] for p in parts]))
                continue
            targets = [n.args[i].target for n in nodes]
            parts = [attr_value(gm, t) for t in targets]
            whole = _already_fused(parts)
            reused = whole is not None
            if not reused:
                whole = torch.cat([t.detach() for t in parts])
            name = _buffer_name(gm, targets[0])
            gm.register_buffer(name, whole)
            # The input graph's buffers (and this copy's names for them, which refresh re-packs
            # in place) become row views of the concatenation: no second copy of the weights.
            # The model's other graphs, which share the packed weights (packed.pack_once), get
            # the views too, and their own fusion then finds the concatenation already made.
            offset = 0
            for t, part, rows in zip(targets, parts, n_rows):
                if not reused:  # (reused: the parts already are these views)
                    view = whole[offset:offset + rows]
                    _set_attr(gm, t, view)
                    _set_attr(source, t, view)
                    replace_shared(part, view)
                offset += rows
            args[i] = graph.get_attr(name)
            args[i].meta["val"] = whole
        fused = graph.call_function(first.target, tuple(args), dict(first.kwargs))
        fused.meta[FUSED_FROM_META] = [layer_path(n) for n in nodes]
        _set_val(fused, lambda: torch.cat([n.meta["val"] for n in nodes], -1))
        start = 0
        for node, rows in zip(nodes, n_rows):
            part = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, start + rows))
            _set_val(part, lambda a=start, b=start + rows: fused.meta["val"][..., a:b])
            start += rows
            node.replace_all_uses_with(part)
    for node in nodes:
        graph.erase_node(node)


def fuse_sibling_linears(gm: fx.GraphModule) -> PassResult:
    groups, declined = sibling_groups(gm)
    stats = {"groups": len(groups), "fused_linears": sum(len(g) for g in groups), "declined": len(declined)}
    notes = tuple(f"{layer_path(node)} stays unfused: {reason}" for node, reason in declined)
    for note in notes:
        log.debug("fuse_sibling_linears: %s", note)
    if not groups:
        return PassResult(gm, False, stats, notes)
    out, env = copy_graph_module(gm)
    for nodes in groups:
        _fuse(gm, out, [env[n] for n in nodes])
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    return PassResult(out, True, stats, notes)
