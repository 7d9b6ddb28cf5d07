"""float_codes_gemm: the int8-GEMM forms at many tokens, on a CPU without a fast int8 GEMM, as aten
ops for Inductor.

    y = qhl.w8a8_linear(x, Wq, s_w, b)   ->   q, s_x = per-token codes of x (as float32)
                                              y = ((q @ Wf^T) * s_w) * s_x (+ b)      Wf = float32(Wq)

and the same for w4a8 / w4a4 (Wf the unpacked int4 codes; q 8- or 4-bit, after the layer's online
Hadamard rotation where it has one: the qhl::hadamard_quantize_per_token call, which Inductor
lowers to aten ops in turn at a static token count, runtime/inductor_cpu.py).

Where the CPU has AVX2 alone (codegen/cpu_onednn.int8_gemm_is_fast() is False), PyTorch's int8
GEMM is 3-25x slower than float32's, so these forms' CPU faces run "plan f32": a float32 GEMM over
the integer codes against the weight's codes kept as float32 once per weight (every product is
exact, |q * Wq| <= 127^2; the sums are float32's). At 1-4 static tokens Inductor lowers the ops to
their bit-mask GEMV decompositions; at more tokens, or a dynamic count, each stayed an opaque call
whose per-token prologue and dequantize epilogue ran as separately compiled helper calls (~50 us of
overhead each): on SmolLM2 at 128 tokens the compiled w8a8 prompt was slower than eager float32.

This pass writes that plan into the graph itself, in the spec's order of operations, with Wf a
constant of the graph (codegen/w8a8.float_codes, w4ax.float_codes: one float32 copy per weight,
shared by a model's graphs and, for w8a8, with its CPU face; re-derived in place when `refresh`
re-packs the weight). Inductor then fuses the prologue into the ops before it (RMSNorm, the
previous layer's epilogue) and the epilogue into the ops after it, around one extern float32 GEMM.

A codegen pass: the torch.compile door runs it only on graphs Inductor compiles (passes.CODEGEN,
INDUCTOR_ONLY; recipe knob float_gemm). The layer table keeps the forms: what runs is the same math.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, fx

from qhl.codegen import cpu_fused, cpu_onednn, w4ax, w8a8
from qhl.graph import attr_value
from qhl.passes.base import PassResult, inline_graph, lower_nodes

__all__ = ["float_codes_gemm", "FLOAT_GEMM_META"]

log = logging.getLogger(__name__)

FLOAT_GEMM_META = "qhl_float_gemm"  # the lowered result's meta: the layer path it computes


def _prologue(x: Tensor, bits: int, block: int) -> tuple[Tensor, Tensor]:
    # the per-token codes as float32 (rotated first where the layer owes a Hadamard: w4a8/w4a4)
    if block < 0:
        return w8a8.per_token_codes_decomposed(x, bits)
    q, xs = torch.ops.qhl.hadamard_quantize_per_token.default(x, block, bits)
    return q.float(), xs


_TEMPLATES: dict[tuple[bool, int, int], fx.GraphModule] = {}


def _template(bias: bool, bits: int, block: int) -> fx.GraphModule:
    """The 'f32' plan as a graph: (x, float32 codes [N, K], s_w[, b]) -> y, in the spec's order."""
    key = (bias, bits, block)
    if key not in _TEMPLATES:
        def with_bias(x: Tensor, w_codes: Tensor, w_scale: Tensor, b: Tensor) -> Tensor:
            codes, xs = _prologue(x, bits, block)
            return (((codes @ w_codes.t()) * w_scale.float()) * xs + b.float()).type_as(x)

        def without_bias(x: Tensor, w_codes: Tensor, w_scale: Tensor) -> Tensor:
            codes, xs = _prologue(x, bits, block)
            return (((codes @ w_codes.t()) * w_scale.float()) * xs).type_as(x)

        _TEMPLATES[key] = fx.symbolic_trace(with_bias if bias else without_bias)
    return _TEMPLATES[key]


def _forms() -> dict[Any, tuple[int, Callable[[Tensor], Tensor]]]:
    """op -> (activation bits, the float32 codes of its weight operand, cached per weight)."""
    ops = torch.ops.qhl
    return {ops.w8a8_linear.default: (8, w8a8.float_codes),
            ops.w4a8_linear.default: (8, w4ax.float_codes),
            ops.w4a4_linear.default: (4, w4ax.float_codes)}


def _decline(node: fx.Node) -> Optional[str]:
    """Why this w8a8 node keeps its op, or None if it lowers."""
    x, w = node.args[0], node.args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "its weight is not a constant of the graph"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return "its input has no shape recorded"
    if val.device.type != "cpu":
        return f"its input is on {val.device.type}"
    lead = val.shape[:-1]
    if all(isinstance(d, int) for d in lead) and 1 <= math.prod(lead) <= cpu_fused.BITS_GEMV_MAX_TOKENS:
        return f"{math.prod(lead)} token(s): the bit-mask GEMV decomposition reads the int8 codes"
    return None


def float_codes_gemm(gm: fx.GraphModule) -> PassResult:
    forms = _forms()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in forms]
    if not nodes or cpu_onednn.int8_gemm_is_fast():
        why = "this CPU has a fast int8 GEMM" if nodes else None
        return PassResult(gm, False, {"lowered": 0, "kept": len(nodes)}, (f"nothing lowered: {why}",) if why else ())
    buffers: dict[str, str] = {}

    def rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        bits, float_codes = forms[node.target]
        x, w, w_scale, bias = node.args[:4]
        block = node.args[4] if len(node.args) > 4 else node.kwargs.get("hadamard_block", -1)
        if w.target not in buffers:
            name = "qhl_f32codes_" + re.sub(r"[^0-9A-Za-z_]", "_", w.target)
            gm.register_buffer(name, float_codes(attr_value(gm, w.target)))
            buffers[w.target] = name
        codes = gm.graph.get_attr(buffers[w.target])
        args = [x, codes, w_scale] + ([bias] if bias is not None else [])
        return inline_graph(gm.graph, _template(bias is not None, bits, block), args)

    return lower_nodes(gm, nodes, [_decline(node) for node in nodes], rewrite, FLOAT_GEMM_META, log)
