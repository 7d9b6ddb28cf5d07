"""Packed weights that stay true to their float source.

A quantize pass packs each weight once, at compile time, into buffers of the compiled graph and
records a PackedWeight here. Before each call, `refresh` compares every source weight's version
counter with the one it was packed from: an in-place update (an optimizer step,
`load_state_dict`, `with torch.no_grad(): w.mul_(...)`) re-packs that weight, once. Nothing is
re-quantized on a call whose weights did not change; a changed weight never runs stale.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PACKED_META", "PackedWeight", "record_packed", "refresh", "GuardedGraph", "on_repack", "DerivedCache",
           "pack_once", "replace_shared"]

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


class DerivedCache:
    """A tensor derived from a packed buffer (the CPU faces' unpacked int4 codes, int8 row sums),
    computed on first use and kept while that buffer lives (weakly keyed by identity).

    An entry is dropped when its buffer changes: its version counter moves (any in-place write to
    a normal tensor), or `refresh` re-packs it (the on_repack hook, which also covers inference
    tensors: they have no version counter). With in_place=True a re-pack instead derives the
    entry again into the same tensor, for derived tensors that compiled graphs hold as constants
    (passes/float_codes_gemm.py).
    """

    def __init__(self, derive: Callable[[torch.Tensor], torch.Tensor], in_place: bool = False):
        self._derive = derive
        self._in_place = in_place
        self._entries = WeakIdKeyDictionary()  # buffer -> (its version when derived, derived tensor)
        self._lock = threading.Lock()
        on_repack(self._repacked)

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        return None if t.is_inference() else t._version

    def get(self, buffer: torch.Tensor) -> torch.Tensor | None:
        """The cached tensor derived from `buffer` as it is now, or None."""
        hit = self._entries.get(buffer)
        return hit[1] if hit is not None and hit[0] == self._version(buffer) else None

    def __call__(self, buffer: torch.Tensor) -> torch.Tensor:
        """The tensor derived from `buffer`, computed now if not cached for its current contents."""
        hit = self.get(buffer)
        if hit is not None:
            return hit
        version = self._version(buffer)
        with torch.inference_mode(False):  # usable in and out of inference mode
            derived = self._derive(buffer)
        with self._lock:
            self._entries[buffer] = (version, derived)
        return derived

    def forget(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._entries.pop(buffer, None)

    def _repacked(self, buffer: torch.Tensor) -> None:
        hit = self._entries.get(buffer) if self._in_place else None
        if hit is None:
            self.forget(buffer)
            return
        with torch.inference_mode(False):
            hit[1].copy_(self._derive(buffer))
        with self._lock:
            self._entries[buffer] = (self._version(buffer), hit[1])


# Packed weights shared by the graphs one model compiles into (a prompt graph, a decode graph, one
# more when a shape turns dynamic): source weight -> {(form, knobs): (its version, packed tensors)}.
# Without it each graph packed and held its own copy of every weight. A stale entry (the source
# changed in place since) is packed again; the graphs already holding the old tensors re-pack them
# in place through their own records (refresh), so sharing never serves stale codes. The packed
# tensors are held weakly: they live while a compiled graph holds them, not as long as the model.
_SHARED = WeakIdKeyDictionary()
_shared_lock = threading.Lock()


def pack_once(source: torch.Tensor, key: tuple[Any, ...], pack: Callable[[], tuple[torch.Tensor, ...]]
              ) -> tuple[torch.Tensor, ...]:
    """The packed tensors for `source` under `key` (the form and its knobs), packed on first use."""
    with _shared_lock:
        hit = _SHARED.get(source, {}).get(key)
    if hit is not None and hit[0] == source._version:
        packed = tuple(ref() for ref in hit[1])
        if all(t is not None for t in packed):
            return packed
    packed = tuple(pack())
    with _shared_lock:
        _SHARED.setdefault(source, {})[key] = (source._version, tuple(weakref.ref(t) for t in packed))
    return packed


def replace_shared(old: torch.Tensor, new: torch.Tensor) -> None:
    """Serve `new` wherever the shared packs hold `old` (a fusion moved it into a larger buffer)."""
    with _shared_lock:
        for entries in _SHARED.values():
            for key, (version, refs) in list(entries.items()):
                if any(ref() is old for ref in refs):
                    entries[key] = (version, tuple(weakref.ref(new) if ref() is old else ref for ref in refs))


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
            # A buffer may be a row view of a fused one (passes/fuse_sibling_linears.py): caches
            # derived from that base are stale too.
            for changed in (buffer,) if buffer._base is None else (buffer, buffer._base):
                for hook in _REPACK_HOOKS:
                    hook(changed)
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
