"""PassResult and the GraphPass type every pass satisfies."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import fx

__all__ = ["PassResult", "GraphPass", "copy_graph_module"]


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
