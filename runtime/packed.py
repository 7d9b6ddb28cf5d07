"""Packed weights that stay true to their float source.

A quantize pass packs each weight once, at compile time, into buffers of the compiled graph and
records a PackedWeight here. Before each call, `refresh` compares every source weight's version
counter with the one it was packed from: an in-place update (an optimizer step,
`load_state_dict`, `with torch.no_grad(): w.mul_(...)`) re-packs that weight, once. Nothing is
re-quantized on a call whose weights did not change; a changed weight never runs stale.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = ["PACKED_META", "PackedWeight", "record_packed", "refresh", "GuardedGraph", "on_repack"]

log = logging.getLogger(__name__)
PACKED_META = "qhl_packed"  # gm.meta key: list[PackedWeight]


@dataclass
class PackedWeight:
    path: str
    source: torch.Tensor  # the float weight (a view of the parameter, as [N, K])
    version: int
    pack: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    buffers: tuple[str, ...]


# Called with each buffer `refresh` rewrites in place, so that caches derived from a packed buffer
# (the CPU face's unpacked int4 codes, codegen/w4ax.py) drop it: an inference tensor has no
# version counter to tell them.
_REPACK_HOOKS: list[Callable[[torch.Tensor], None]] = []


def on_repack(hook: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """Register `hook(buffer)`, called after `refresh` rewrites that buffer in place."""
    _REPACK_HOOKS.append(hook)
    return hook


def record_packed(gm: fx.GraphModule, packed: PackedWeight) -> None:
    gm.meta.setdefault(PACKED_META, []).append(packed)


@torch.no_grad()
def refresh(gm: torch.nn.Module, records: list[PackedWeight]) -> int:
    """Re-pack the weights whose source changed since they were packed; returns how many."""
    stale = [p for p in records if p.source._version != p.version]
    for p in stale:
        for name, tensor in zip(p.buffers, p.pack(p.source.detach().float())):
            buffer = getattr(gm, name)
            buffer.copy_(tensor)
            for hook in _REPACK_HOOKS:
                hook(buffer)
        p.version = p.source._version
    if stale:
        log.debug("re-packed %d weight(s) that changed in place: %s", len(stale), [p.path for p in stale][:5])
    return len(stale)


class GuardedGraph:
    """A compiled graph that re-packs changed weights before it runs (boxed-call friendly)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.records: list[PackedWeight] = list(gm.meta.get(PACKED_META, []))

    def __call__(self, *args: Any) -> Any:
        if self.records:
            refresh(self.gm, self.records)
        return self.gm(*args)
