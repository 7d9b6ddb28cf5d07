"""A w8a8 recipe with one activation scale per call (w8a8-tensor) where a layer loses little by it.

    r = qhl.mixed_w8a8_recipe(model, example_inputs, max_loss_db=4.0)
    qhl.export_onnx(model, example_inputs, "model.onnx", recipe=r, int8_operands="u8s8")

Per-tensor activations run as ONNX Runtime's fused DynamicQuantizeMatMul; per-token ones (w8a8)
are more accurate but cost ORT separate nodes around each GEMM. How much a layer loses with one
scale depends on what feeds it: on MiniLM the q/k/v projections (reading a LayerNorm output) lose
0.5-4 dB of their own output SQNR, the attention-output and FFN layers 5-11 dB. This measures
both forms on the example inputs with `qhl.inspect` (each layer's output against float32 on its
own input) and returns the w8a8 recipe with an override to w8a8-tensor for every layer whose SQNR
drops by at most `max_loss_db`. The choice is only as representative as the example inputs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from qhl.recipes import LayerOverride, Recipe, recipe

__all__ = ["mixed_w8a8_recipe"]

log = logging.getLogger(__name__)


def _literal_glob(path: str) -> str:
    """A glob that matches exactly this module path (fnmatch's only specials are * ? [)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def mixed_w8a8_recipe(model: Any, example_inputs: tuple[Any, ...], max_loss_db: float = 4.0,
                      **knobs: Any) -> Recipe:
    """The w8a8 recipe (with `knobs`) whose layers take w8a8-tensor where per-tensor activations
    cost at most `max_loss_db` of the layer's output SQNR on the example inputs."""
    from qhl.report import inspect

    base = recipe("w8a8", **knobs)
    per_token = inspect(model, example_inputs, recipe=base)
    per_tensor = inspect(model, example_inputs,
                         recipe=dataclasses.replace(base, form="w8a8-tensor"))
    token_db = {r.path: r.sqnr_db for r in per_token.rewritten if r.form == "w8a8"}
    chosen = []
    for row in per_tensor.rewritten:
        before = token_db.get(row.path)
        if row.form != "w8a8-tensor" or before is None or row.sqnr_db is None:
            continue
        loss = before - row.sqnr_db if math.isfinite(before) else math.inf
        if loss <= max_loss_db:
            chosen.append(row.path)
        log.info("%s: per-tensor activations lose %.1f dB (%s)", row.path, loss,
                 "w8a8-tensor" if loss <= max_loss_db else "w8a8")
    overrides = tuple(LayerOverride(glob=_literal_glob(p), form="w8a8-tensor") for p in chosen)
    return dataclasses.replace(
        base, name="w8a8-mixed", overrides=overrides + base.overrides,
        description=(f"w8a8, with w8a8-tensor on the {len(chosen)} of {len(token_db)} layers whose "
                     f"output SQNR dropped by <= {max_loss_db} dB with per-tensor activations on the "
                     "example inputs"),
    )
