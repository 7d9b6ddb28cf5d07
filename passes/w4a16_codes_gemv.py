"""w4a16_codes_gemv: w4a16 at a few tokens as a GEMV over its unpacked codes, inside Inductor's graph.

    y = qhl.w4a16_linear(x, packed, s, z, g, b)
      ->  c = the codes of `packed`, uint8 [N, K] (a constant of the graph)
          y = sum_G s[:, G] * sum_j x[:, G, j] * (c[:, G, j] - z[:, G]) (+ b)

On a CPU with a fast int8 GEMM, w4a16's CPU face runs 1-8 tokens (a decode step) as a GEMV over the
codes unpacked once per weight (codegen/w4a16.py, cpu_fused.int4_gemv). Where Inductor's own w4a16
decomposition declines (groups under 128, where its bit-mask GEMV over the packed bytes lost; 5-8
tokens; AMX), the layer stayed a call of the op: its dispatch, the face's checks and the compiled
helper's own call cost more than the GEMV on SmolLM2's small layers. This pass writes that GEMV into
the graph instead, in the face's own formulation (cpu_fused._int4_gemv), with the unpacked codes a
constant of the graph: w4a16._unpacked, the face's cache, re-derived in place when `refresh`
re-packs the weight, so the face and the graph share one copy (1 byte per weight beside the packed
0.5, as the face held before).

Measured against the op call (Zen 5 EPYC, 2 threads, one ad hoc run, bit-identical outputs): 4 x
4096^2 layers with g64, 1.96 against 2.55 ms at 1 token, 7.44 against 8.63 at 4 and 18.3 against
19.1 at 8; with g128 at 5 and 8 tokens, 8.27 and 10.7 against 9.80 and 12.5. On SmolLM2's small
layers the op call's overhead dominates: two 576 x 576 layers at 1 token, 0.051 against 0.158 ms.

A codegen pass: the torch.compile door runs it only on graphs Inductor compiles (passes.CODEGEN,
INDUCTOR_ONLY; recipe knob codes_gemv). The layer table keeps the form: what runs is the same math.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Optional

import torch
from torch import Tensor, fx

from qhl.codegen import cpu_fused, w4a16
from qhl.graph import attr_value
from qhl.passes.base import PassResult, inline_graph, lower_nodes

__all__ = ["w4a16_codes_gemv", "CODES_GEMV_META"]

log = logging.getLogger(__name__)

CODES_GEMV_META = "qhl_codes_gemv"  # the lowered result's meta: the layer path it computes


def _decline(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Why this w4a16 node keeps its op (the face or Inductor's own decomposition serve it), or None."""
    x, packed, scale, zero, g = node.args[:5]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (packed, scale, zero)):
        return "its weight, scales or zero points are not constants of the graph"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, Tensor) or val.device.type != "cpu":
        return "its input is not a CPU tensor with a recorded shape"
    lead = val.shape[:-1]
    if not all(isinstance(d, int) for d in lead):
        return "its token count is dynamic"
    m = math.prod(lead)
    if m < 1 or not w4a16.cached_code_gemv_serves(m):
        return f"{m} tokens: the face's tiled dequantize-then-GEMM serves more than {w4a16.GEMV_MAX_TOKENS}"
    if w4a16.bits_gemv_in_graph(m, g):
        return "Inductor's w4a16 decomposition takes it (the bit-mask GEMV over the packed bytes)"
    w = attr_value(gm, packed.target)
    n, k = w.shape[0], w.shape[1] * 2
    if w.dtype != torch.uint8 or attr_value(gm, zero.target).dtype != torch.uint8 or k % g:
        return "its packed layout is not the face's (uint8 codes and zero points, groups tiling K)"
    if tuple(attr_value(gm, scale.target).shape) != (n, k // g):
        return "its scales are not one per group"
    return None


_TEMPLATES: dict[tuple[Any, ...], fx.GraphModule] = {}


def _template(n: int, k: int, g: int, lead: tuple[int, ...], dtype: torch.dtype, bias: bool) -> fx.GraphModule:
    """The face's GEMV (cpu_fused._int4_gemv) and epilogue as a graph: (x, codes, s, z[, b]) -> y."""
    key = (n, k, g, lead, dtype, bias)
    if key not in _TEMPLATES:
        def gemv(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
            # x realized as a buffer of its own: inlined, the previous layer's epilogue would be
            # recomputed once per output row (4 x 4096^2 layers, g64: 4 tokens 12.1 ms inlined,
            # against 8.8 for the face)
            x2 = cpu_fused.realized(x.reshape(-1, k).float(), [k, 1])
            return cpu_fused._int4_gemv(x2, codes.view(n, k), scale.float(), zero, g)

        def with_bias(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, b: Tensor) -> Tensor:
            return (gemv(x, codes, scale, zero) + b.float()).to(dtype).reshape(*lead, n)

        def without_bias(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
            return gemv(x, codes, scale, zero).to(dtype).reshape(*lead, n)

        _TEMPLATES[key] = fx.symbolic_trace(with_bias if bias else without_bias)
    return _TEMPLATES[key]


def w4a16_codes_gemv(gm: fx.GraphModule) -> PassResult:
    op = torch.ops.qhl.w4a16_linear.default
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]
    if not nodes:
        return PassResult(gm, False, {"lowered": 0, "kept": 0})
    if not w4a16.cached_code_gemv_serves(1):
        why = "the face's cached-code GEMV does not run here (no fast int8 GEMM, or the fused path or cache is off)"
        return PassResult(gm, False, {"lowered": 0, "kept": len(nodes)}, (f"nothing lowered: {why}",))
    buffers: dict[str, str] = {}

    def rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        x, packed, scale, zero, g = node.args[:5]
        bias = node.args[5] if len(node.args) > 5 else None
        if packed.target not in buffers:
            name = "qhl_codes_" + re.sub(r"[^0-9A-Za-z_]", "_", packed.target)
            gm.register_buffer(name, w4a16._unpacked(attr_value(gm, packed.target)))
            buffers[packed.target] = name
        val = x.meta["val"]
        n, k = attr_value(gm, packed.target).shape[0], val.shape[-1]
        template = _template(n, k, g, tuple(val.shape[:-1]), val.dtype, bias is not None)
        codes = gm.graph.get_attr(buffers[packed.target])
        return inline_graph(gm.graph, template, [x, codes, scale, zero] + ([bias] if bias is not None else []))

    return lower_nodes(gm, nodes, [_decline(gm, node) for node in nodes], rewrite, CODES_GEMV_META, log)
