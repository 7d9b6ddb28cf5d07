"""PassResult and the GraphPass type every pass satisfies."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import fx

__all__ = ["PassResult", "GraphPass", "copy_graph_module", "inline_graph", "lower_nodes"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly rewritten) graph, whether it changed, counts, and notes:
    one line for each thing it declined that the layer table does not show, saying why."""

    gm: fx.GraphModule
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


GraphPass = Callable[[fx.GraphModule], PassResult]


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new GraphModule over a copy of gm's graph (attributes shared, meta copied), and the map
    from gm's nodes to the copy's: for passes that must leave their input graph as it was."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    return copy, env


def inline_graph(graph: fx.Graph, template: fx.GraphModule, args: list) -> fx.Node:
    """Copy `template`'s nodes into `graph` at its insertion point, its placeholders bound to `args`
    in order; returns the node its output names (the rewrite of one node into several)."""
    env: dict[fx.Node, object] = {}
    placeholders = iter(args)
    out = None
    for t in template.graph.nodes:
        if t.op == "placeholder":
            env[t] = next(placeholders)
        elif t.op == "output":
            out = env[t.args[0]]
        else:
            env[t] = graph.node_copy(t, lambda n: env[n])
    assert out is not None
    return out


def lower_nodes(gm: fx.GraphModule, nodes: list[fx.Node], declines: list, rewrite: Callable,
                meta_key: str, logger) -> PassResult:
    """The loop of the codegen passes that lower op nodes to aten ops (float_codes_gemm,
    w4a16_codes_gemv). Each node whose decline reason is None becomes what `rewrite(gm, node)`
    inserts before it (it returns the output node, which keeps the node's val and stack meta and
    gets meta_key = the layer path); the others stay, with "<path> keeps its op: <reason>" notes.
    The work is done on a copy: the input graph (the layer table's, and the fallback) keeps its ops."""
    from qhl.graph import layer_path

    if any(why is None for why in declines):
        gm, env = copy_graph_module(gm)
        nodes = [env[n] for n in nodes]
    lowered, notes = 0, []
    for node, why in zip(nodes, declines):
        if why is not None:
            notes.append(f"{layer_path(node)} keeps its op: {why}")
            continue
        with gm.graph.inserting_before(node):
            out = rewrite(gm, node)
        out.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
        out.meta[meta_key] = layer_path(node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        lowered += 1
    for note in notes:
        logger.debug("%s", note)
    if lowered:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, lowered > 0, {"lowered": lowered, "kept": len(nodes) - lowered}, tuple(notes))
