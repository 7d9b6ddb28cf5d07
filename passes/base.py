"""PassResult and the GraphPass type every pass satisfies."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import fx

__all__ = ["PassResult", "GraphPass"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly rewritten) graph, whether it changed, and counts."""

    gm: fx.GraphModule
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)


GraphPass = Callable[[fx.GraphModule], PassResult]
