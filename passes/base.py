"""PassResult and the GraphPass type every pass satisfies."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import fx

__all__ = ["PassResult", "GraphPass", "copy_graph_module", "inline_graph"]


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
