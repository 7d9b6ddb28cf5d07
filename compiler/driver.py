"""The pass driver: runs a recipe's passes in order, records what each did, verifies on request.

verify mode (recipe.verify=True, or verify=True): runs the graph on the example inputs before
and after each pass and compares. Lossless passes must match to float32 noise; lossy passes must
keep the output SQNR at or above `min_sqnr_db`. A failure raises VerificationError naming the pass.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qhl.errors import VerificationError
from qhl.graph import matmul_infos
from qhl.metrics import sqnr_db
from qhl.passes import LOSSLESS, bind
from qhl.recipes import Recipe

__all__ = ["PassRecord", "run_passes"]

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """One pass's run: the graph before and after (as Python text), its stats and timing."""

    name: str
    changed: bool
    stats: dict[str, int]
    before: str
    after: str
    seconds: float
    verified_sqnr_db: float | None = None
    notes: list[str] = field(default_factory=list)


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _owes_weights(gm: fx.GraphModule) -> bool:
    return any(i.weight_transform is not None and i.form is None for _, i in matmul_infos(gm))


def _compare(name: str, ref: Any, out: Any, floor: float) -> float:
    refs, outs = _flat_tensors(ref), _flat_tensors(out)
    if len(refs) != len(outs):
        raise VerificationError(f"pass {name!r} changed the number of graph outputs ({len(refs)} -> {len(outs)})")
    worst = float("inf")
    for i, (r, o) in enumerate(zip(refs, outs)):
        if r.shape != o.shape:
            raise VerificationError(f"pass {name!r} changed output {i}'s shape {tuple(r.shape)} -> {tuple(o.shape)}")
        worst = min(worst, sqnr_db(r, o))
    if worst < floor:
        raise VerificationError(
            f"pass {name!r} moved the graph's outputs to {worst:.1f} dB SQNR against its input graph; "
            f"allowed >= {floor:.0f} dB. Run qhl.inspect(...) to see which layer, or skip it in the recipe."
        )
    return worst


def run_passes(
    gm: fx.GraphModule,
    recipe: Recipe,
    example_inputs: tuple[Any, ...] | None = None,
    verify: bool | None = None,
    min_sqnr_db: float | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `recipe.passes` in order on gm; returns the rewritten gm and one record per pass."""
    verify = recipe.verify if verify is None else verify
    min_sqnr_db = recipe.verify_min_sqnr_db if min_sqnr_db is None else min_sqnr_db
    if verify and example_inputs is None:
        log.warning("verify=True needs concrete example inputs; skipping numeric verification")
        verify = False
    records = []
    ref = gm(*example_inputs) if verify else None
    # A rotation pass leaves weights it owes a rewrite (MatmulInfo.weight_transform) to a later
    # pass; the graph in between is not meant to compute the same numbers, so verification of
    # such a group of passes happens once, after the pass that settles the last owed weight.
    deferred: list[str] = []
    for name in recipe.passes:
        before = gm.code
        t0 = time.perf_counter()
        result = bind(name, recipe)(gm)
        gm = result.gm
        record = PassRecord(name, result.changed, dict(result.stats), before, gm.code, time.perf_counter() - t0,
                            notes=list(result.notes))
        if verify and _owes_weights(gm):
            deferred.append(name)
            record.notes.append("verified together with the pass that settles its owed weight rewrites")
        elif verify:
            with torch.no_grad():
                out = gm(*example_inputs)
            group = deferred + [name]
            label = name if not deferred else "+".join(group)
            lossless = all(p in LOSSLESS for p in group)
            record.verified_sqnr_db = _compare(label, ref, out, 80.0 if lossless else min_sqnr_db)
            ref, deferred = out, []
        log.debug("pass %s: changed=%s stats=%s (%.3fs)", name, result.changed, record.stats, record.seconds)
        records.append(record)
    return gm, records
