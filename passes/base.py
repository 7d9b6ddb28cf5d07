"""PassResult and the GraphPass type every pass satisfies."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import fx

__all__ = ["PassResult", "GraphPass"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly rewritten) graph, whether it changed, counts, and notes:
    one line for each thing it declined that the layer table does not show, saying why."""

    gm: fx.GraphModule
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


GraphPass = Callable[[fx.GraphModule], PassResult]
