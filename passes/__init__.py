"""qhl.passes: one pass per file, each `GraphModule -> PassResult(gm, changed, stats)`.

PASSES is the one ordered registry: a recipe names passes from it, and they always run in the
order the recipe lists them. A pass that needs the recipe's knobs takes it as a second argument;
`bind(name, recipe)` returns the plain GraphPass.
"""
from __future__ import annotations

from functools import partial

from qhl.passes.base import GraphPass, PassResult
from qhl.passes.canonicalize_matmuls import canonicalize_matmuls
from qhl.passes.quantize_linear import quantize_linear
from qhl.passes.select_layers import select_layers

__all__ = ["PASSES", "PassResult", "GraphPass", "bind", "LOSSLESS"]

PASSES = {
    "canonicalize_matmuls": canonicalize_matmuls,  # first: later passes assume canonical matmuls
    "select_layers": select_layers,  # needs the recipe: which layers get which form
    "quantize_linear": quantize_linear,  # canonical linear -> qhl:: quantized ops
}
_NEEDS_RECIPE = {"select_layers"}
# Passes that must not change the graph's numbers (verify mode checks them with a tight tolerance).
LOSSLESS = {"canonicalize_matmuls", "select_layers"}


def bind(name: str, recipe) -> GraphPass:
    fn = PASSES[name]
    return partial(fn, recipe=recipe) if name in _NEEDS_RECIPE else fn
