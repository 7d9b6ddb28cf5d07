"""w4a16 on ONNX Runtime at few tokens: float activations as two int8 halves, so that ORT's int8
MatMulNBits kernel computes them to about 16 bits instead of 8.

    x [..., K] ─ Size(x) <= max_rows * K ?
        then: per block of g along K (g = the weights' block size):
                  s = max|x| / 127,  d = round(x / s) * s               (x to int8, kept as float)
              MatMulNBits([d; x - d], accuracy_level=4) ─ [2, rows, N] ─ sum of the halves (+ bias)
        else: MatMulNBits(x, accuracy_level=0)            (the node as the exporter wrote it)

Why: ORT's MatMulNBits with float activations (accuracy level 0) is its float kernel; at 1 token
on the 4 x 4096^2 stack it reaches 3.4-3.9x ORT float32 here, with every block size and level 0-3
(benchmarks/results/matmulnbits_sweep_zen5.md). Level 4 is its int8 kernel (6.3x), but it
rounds the activations to int8 per k-block: W4A8 math. The rows above make that rounding
(nearly) lossless:
* d is an int8 multiple of one scale per block with a code of +-127 in every nonzero block, so
  when level 4 rounds it by the same per-block rule (max / 127) it gets d's codes back exactly;
* x - d is at most s / 2 per element; level 4 rounds it to int8 of its own block maximum, which
  leaves at most max|x - d| / 254 <= max|x| / (2 * 127 * 254) = max|x| / 64516 of the block,
  about 2^-16 of the block's largest value: a 16-bit fixed-point activation per block, finer
  than float16's 2^-11 relative step for every element above 1/32 of its block's maximum.
Measured: 77-107 dB against the float-activation product on square layers of 512-4096
(int8 activations alone: 40 dB); 4.95-5.10x ORT float32 on the stack at 1 token, against
3.2-3.5x for the float kernel (benchmarks/results/onnx_cpu_zen5_final.md, matmulnbits_sweep_zen5.md).

Two conditions, both measured (2026-12-05, AMD EPYC Zen 5, 2 cores, onnxruntime 1.32):
* rows: the halves double the rows, so past a few dozen rows the float kernel is faster again (on
  the stack at 16 / 32 / 48 / 64 rows: 1.78x / 1.31x / 1.17x / 1.06x ORT float32, level 0
  1.26x / 1.16x / 1.18x / 1.10x, one round-robin run of 15).
  Hence the If on the row count, max_rows = 32.
* size: the ~15 extra nodes cost a few microseconds a layer; at 1 token a 512^2 layer took 14.5
  against 11.8 us, 1536^2 59 against 60, 2048^2 92 against 110, 4096^2 250 against 430. Hence
  min_weights = 2^22 (K * N): SmolLM2-135M's layers (at most 576 x 1536) stay as they are.
ORT prepacks the weights once for each kernel: a second copy of those int4 weights in memory (the
file size is unchanged).

Only the onnxruntime target has explicit MatMulNBits nodes; the standard file keeps
DequantizeLinear + MatMul, whose fused accuracy level is the session's choice.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["split_w4a16_activations", "ops_after_split", "MAX_ROWS", "MIN_WEIGHTS", "MODES", "decline_reason"]

log = logging.getLogger(__name__)
MAX_ROWS = 32  # measured crossover, module docstring
MIN_WEIGHTS = 2**22  # K * N below which the extra nodes cost more than the int8 kernel saves
# auto: int8 halves up to MAX_ROWS rows on layers of MIN_WEIGHTS or more, float otherwise;
# int8x2: int8 halves on every 4-bit level-0 MatMulNBits at every row count; float: never
MODES = ("auto", "float", "int8x2")
_INT8_MAX = 127.0
# the ops the rewrite adds (Shape/Concat/Reshape compute the output shape)
_HALVES_OPS = ["Shape", "Reshape", "Abs", "ReduceMax", "Div", "Max", "Round", "Mul", "Sub", "Concat", "ReduceSum"]


def ops_after_split(ops: list[str], mode: str, weights: int | None = None) -> list[str]:
    """A layer's ONNX op list (codegen.onnx.ops_for_form) once its MatMulNBits is rewritten;
    `weights` = K * N of the layer (None: unknown, taken as large enough)."""
    if mode == "float" or "MatMulNBits" not in ops:
        return list(ops)
    if mode == "auto" and weights is not None and weights < MIN_WEIGHTS:
        return list(ops)
    extra = ["Size", "LessOrEqual", "If"] if mode == "auto" else []
    return list(dict.fromkeys([*extra, *ops, *_HALVES_OPS]))


def _attr(node: Any, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def decline_reason(node: Any, min_weights: int = 0) -> str | None:
    """Why this node is not rewritten (None: it is)."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return "not a com.microsoft MatMulNBits"
    if _attr(node, "bits", 4) != 4:
        return f"bits={_attr(node, 'bits', 4)}: the int8 kernel path is measured for 4-bit weights only"
    if _attr(node, "accuracy_level", 0) != 0:
        return f"accuracy_level={_attr(node, 'accuracy_level', 0)}: only float activations (level 0) are split"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return "has g_idx (act-order): level 4 does not take it"
    k, n, block = _attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "block_size", 0)
    if block < 16 or block & (block - 1) or k % block:
        return f"block_size={block} with K={k}: needs a power of two >= 16 dividing K"
    if k * n < min_weights:
        return (f"K x N = {k} x {n} < {min_weights}: the extra nodes cost more than the int8 kernel saves "
                "on a layer this small (measured: qhl/onnx_w4a16_halves.py)")
    return None


class _Builder:
    """Nodes appended to one graph (or If branch), constants shared through the main graph."""

    def __init__(self, main: Any, tag: str) -> None:
        self.main, self.tag, self.nodes = main, tag, []

    def const(self, name: str, value: Any) -> Any:
        import onnx_ir as ir

        name = f"qhl_halves_{name}"
        if name in self.main.initializers:
            return self.main.initializers[name]
        arr = np.asarray(value)
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.Tensor(arr, name=name))
        self.main.register_initializer(v)
        return v

    def op(self, op_type: str, *inputs: Any, domain: str = "", **attrs: Any) -> Any:
        import onnx_ir as ir

        node = ir.Node(domain, op_type, list(inputs), [_to_attr(k, v) for k, v in attrs.items()],
                       name=f"{self.tag}/{op_type}_{len(self.nodes)}")
        node.outputs[0].name = f"{self.tag}/{op_type}_{len(self.nodes)}_out"
        self.nodes.append(node)
        return node.outputs[0]


def _to_attr(name: str, v: Any) -> Any:
    import onnx_ir as ir

    if isinstance(v, ir.Attr):
        return v
    if isinstance(v, (list, tuple)):
        return ir.AttrInt64s(name, [int(x) for x in v])
    if isinstance(v, float):
        return ir.AttrFloat32(name, v)
    return ir.AttrInt64(name, int(v))


def _halves_branch(b: _Builder, node: Any, out_shape: Any) -> Any:
    """The 'then' graph's output: [d, x - d] (d: x rounded to int8 per block) through one level-4
    MatMulNBits, the two halves summed."""
    k, n, g = _attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "block_size", 0)
    x, bias = node.inputs[0], node.inputs[5] if len(node.inputs) > 5 else None
    xb = b.op("Reshape", x, b.const(f"blocks_{k}_{g}", np.array([-1, k // g, g], np.int64)))
    amax = b.op("ReduceMax", b.op("Abs", xb), b.const("last_axis", np.array([-1], np.int64)), keepdims=1)
    # an all-zero block: the smallest normal scale gives codes 0 (level 4 also maps it to 0)
    scale = b.op("Max", b.op("Div", amax, b.const("qmax", np.float32(_INT8_MAX))),
                 b.const("tiny", np.float32(np.finfo(np.float32).tiny)))
    d = b.op("Mul", b.op("Round", b.op("Div", xb, scale)), scale)
    rows = b.op("Concat", d, b.op("Sub", xb, d), axis=0)
    rows = b.op("Reshape", rows, b.const(f"rows_{k}", np.array([-1, k], np.int64)))
    attrs = {a.name: a for a in node.attributes.values() if a.name != "accuracy_level"}
    y = b.op("MatMulNBits", rows, *node.inputs[1:4], domain="com.microsoft", accuracy_level=4, **attrs)
    y = b.op("ReduceSum", b.op("Reshape", y, b.const(f"halves_{n}", np.array([2, -1, n], np.int64))),
             b.const("axis0", np.array([0], np.int64)), keepdims=0)
    if bias is not None:
        y = b.op("Add", y, bias)
    return b.op("Reshape", y, out_shape)


def _float_branch(b: _Builder, node: Any) -> Any:
    attrs = list(node.attributes.values())
    return b.op("MatMulNBits", *node.inputs, domain="com.microsoft", **{a.name: a for a in attrs})


def _graph(b: _Builder, out: Any) -> Any:
    import onnx_ir as ir

    return ir.Graph([], [out], nodes=b.nodes, name=b.tag)


def split_w4a16_activations(model: Any, mode: str = "auto", max_rows: int = MAX_ROWS,
                            min_weights: int | None = None) -> int:
    """Rewrite the 4-bit, level-0 MatMulNBits of `model` (onnx_ir) per `mode` (module docstring).
    Returns how many nodes changed; declined nodes are logged with the reason."""
    import onnx_ir as ir

    if mode not in MODES:
        from qhl.errors import UnsupportedError

        raise UnsupportedError(f"unknown w4a16_activations {mode!r}; valid: {list(MODES)}")
    if mode == "float":
        return 0
    min_weights = MIN_WEIGHTS if min_weights is None else min_weights
    graph, changed = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMulNBits":
            continue
        why = decline_reason(node, min_weights if mode == "auto" else 0)
        if why is not None:
            log.info("qhl: MatMulNBits %s keeps float activations: %s", node.name, why)
            continue
        tag = f"{node.name or f'MatMulNBits_{changed}'}_int8x2"  # unique even for unnamed nodes
        outer = _Builder(graph, tag)
        x, n, k = node.inputs[0], _attr(node, "N", 0), _attr(node, "K", 0)
        out_shape = outer.op("Concat", outer.op("Shape", x, end=-1),
                             outer.const(f"n_{n}", np.array([n], np.int64)), axis=0)
        then_b = _Builder(graph, f"{tag}/then")
        then_out = _halves_branch(then_b, node, out_shape)
        y_old = node.outputs[0]
        if mode == "int8x2":
            new_nodes, y_new = outer.nodes + then_b.nodes, then_out
        else:
            size_limit = outer.const(f"max_size_{max_rows}_{k}", np.int64(max_rows * k))
            small = outer.op("LessOrEqual", outer.op("Size", x), size_limit)
            else_b = _Builder(graph, f"{tag}/else")
            else_out = _float_branch(else_b, node)
            y_new = outer.op("If", small, then_branch=ir.AttrGraph("then_branch", _graph(then_b, then_out)),
                             else_branch=ir.AttrGraph("else_branch", _graph(else_b, else_out)))
            new_nodes = outer.nodes
        y_new.shape, y_new.type = y_old.shape, y_old.type
        graph.insert_before(node, new_nodes)
        name, was_output = y_old.name, y_old.is_graph_output()
        y_old.replace_all_uses_with(y_new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if was_output:  # a graph output keeps its name
            y_old.name, y_new.name = f"{name}_replaced", name
        changed += 1
    if changed:
        log.info("qhl: %d MatMulNBits take their activations as two int8 halves (%s)", changed,
                 f"up to {max_rows} rows, float above" if mode == "auto" else "at every row count")
    return changed
