"""qhl.export_onnx: nn.Module -> rewritten FX graph -> ONNX file, checked.

    path checked writable ─▶ torch.export capture + the recipe's passes (qhl.inspect's machinery)
      ─▶ pre-scan: every qhl:: op (and other custom op) has an ONNX translation, else
         UnsupportedError naming the node and its module path (nothing written)
      ─▶ torch.onnx.export(dynamo=True, custom_translation_table=qhl.codegen.onnx translations)
      ─▶ weight layouts folded (Transpose / int4 unpacking of initializers -> initializers);
         4-bit codes kept 4-bit (symmetric int4 without zero points, w4a8/w4a4 codes as uint4);
         int8 weights of integer GEMMs stored as uint8 (int8_operands="u8u8", below);
         onnxruntime target: large 4-bit MatMulNBits take few-row activations as two int8
         halves (w4a16_activations="auto", qhl/onnx_w4a16_halves.py)
      ─▶ written (external data past 2 GB) ─▶ onnx.checker + shape inference

    result = qhl.export_onnx(model, (ids,), "model.onnx", recipe="w4a16", group_size=64)
    result.size_bytes, result.ops            # file size; ONNX op histogram
    result.report                            # the qhl.inspect report, with each layer's onnx_ops

Batch and sequence axes (dims 0 and 1 of every tensor input) are dynamic unless the caller
passes `dynamic_shapes`. Sessions opened through qhl.runtime.ort use MatMulNBits accuracy level
0 (float activations, qhl's math); see docs/onnx.md.

int8_operands: every integer GEMM of a qhl file takes uint8 activations (the int8 codes + 128,
zero point 128). With int8 weights that is ONNX Runtime's u8 x s8 kernel, which on x86 CPUs
without VNNI (AVX2, or AVX-512 without VNNI) multiplies with VPMADDUBSW: each pair of products is
saturated to int16, and per-token int8 codes around 128 times weights up to 127 overflow it
(measured on an AVX2 AMD EPYC: 3-24 % relative error per row, silently). "u8u8" (the default)
stores such weights as uint8 (+128, zero point 128): the same integers, exact on every CPU,
0.5-0.85x the u8 x s8 kernel's speed on that AVX2 machine. "u8s8" keeps int8 weights: faster on
CPUs with VNNI or AMX, where it is exact; wrong on the others, and qhl.runtime.ort.session warns
when it opens such a file there. Weights whose codes fit in [-64, 64] (4-bit forms) stay int8
either way: two products of at most 255 * 64 cannot saturate.
"""
from __future__ import annotations

import inspect as _inspect
import logging
import math
import os
import pathlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qhl.capture import no_kv_cache
from qhl.errors import QhlError, UnsupportedError
from qhl.graph import MATMUL_META, module_path_of
from qhl.onnx_attention import fold_attention_head_transposes
from qhl.onnx_w4a16_halves import MODES as W4A16_ACTIVATIONS
from qhl.onnx_w4a16_halves import ops_after_split, split_w4a16_activations

__all__ = ["ExportResult", "export_onnx", "default_dynamic_shapes", "check_translations"]

log = logging.getLogger(__name__)

# protobuf cannot hold a file past 2 GiB; keep 64 MiB of it for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# Default-domain opset of exports. 23 rather than the translations' minimum 21: at 23 torch.onnx
# emits scaled_dot_product_attention as one standard Attention node, which ONNX Runtime runs as
# a fused kernel; at 21 it is MatMul/Softmax/IsNaN/Where, 1.3x slower for MiniLM in float32 and
# the larger share of a quantized file's time (benchmarks/onnx_speed.py measures both).
EXPORT_OPSET = 23
# Ops that only re-lay-out weights: folded into initializers after export (never Cast to float,
# which would store the weight in float32 again).
_LAYOUT_OPS = {"Transpose", "BitwiseAnd", "BitwiseOr", "BitShift", "Unsqueeze", "Squeeze", "Concat",
               "Reshape", "Slice", "Expand"}
_LOW_BIT_CASTS = {"UINT4", "INT4", "UINT8", "INT8"}
_FRAMEWORK_NAMESPACES = {"aten", "prims", "higher_order", "_operator", "onnx"}
INT8_OPERANDS = ("u8u8", "u8s8")
# |b| <= 64: a pair of u8 x s8 products (<= 2 * 255 * 64 = 32640) fits VPMADDUBSW's int16
_NO_SATURATION_MAX = 64


@dataclass
class ExportResult:
    """What export_onnx wrote."""

    path: pathlib.Path
    size_bytes: int
    report: Any
    ops: dict[str, int]
    target: str = "standard"
    opset: int = 21
    accuracy_level: int = 0
    int8_operands: str = "u8u8"
    w4a16_activations: str = "float"
    external_data: bool = False
    seconds: float = 0.0
    dynamic_shapes: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        top = ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])[:8])
        return (
            f"wrote {self.path} ({self.size_bytes / 2**20:.2f} MiB{', external data' if self.external_data else ''}), "
            f"target {self.target}, opset {self.opset}, MatMulNBits accuracy level {self.accuracy_level}, "
            f"int8 GEMMs {self.int8_operands}, w4a16 activations {self.w4a16_activations}, "
            f"{self.seconds:.1f}s; ops: {top}"
        )


def _w4a16_activations(mode: str | None, target: str) -> str:
    """The w4a16_activations setting for `target`: "auto" on onnxruntime, "float" on standard."""
    if mode is None:
        return "auto" if target == "onnxruntime" else "float"
    if mode not in W4A16_ACTIVATIONS:
        raise UnsupportedError(f"unknown w4a16_activations {mode!r}; valid: {list(W4A16_ACTIVATIONS)}")
    if mode != "float" and target != "onnxruntime":
        raise UnsupportedError(
            f"w4a16_activations={mode!r} needs target='onnxruntime': the int8 halves feed com.microsoft "
            "MatMulNBits nodes, and a standard file's DequantizeLinear + MatMul gets its accuracy level "
            "from the session; export with target='onnxruntime', or leave w4a16_activations unset"
        )
    return mode


def _check_writable(path: pathlib.Path) -> None:
    if path.is_dir():
        raise UnsupportedError(f"output path {str(path)!r} is a directory; give a file name such as model.onnx")
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise UnsupportedError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    # Try it: os.access says yes to root everywhere, and to anyone on pseudo file systems (/proc).
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UnsupportedError(f"cannot write {str(path)!r}: {e.strerror or e}; choose a writable path") from e
    if not existed:
        path.unlink(missing_ok=True)


def default_dynamic_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dims 0 (batch) and 1 (sequence) of every tensor input dynamic (Dim.AUTO: torch.export
    keeps a dim static when the model needs it, or when the example size is 0 or 1)."""
    auto = torch.export.Dim.AUTO
    shapes: list[Any] = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.ndim >= 1:
            shapes.append({d: auto for d in range(min(x.ndim, 2))})
        else:
            shapes.append(None)
    return tuple(shapes)


def _as_positional(model: torch.nn.Module, dynamic_shapes: Any, n: int) -> Any:
    """A dict keyed by forward()'s argument names -> a tuple in argument order."""
    if not isinstance(dynamic_shapes, dict):
        return dynamic_shapes
    names = list(_inspect.signature(model.forward).parameters)[:n]
    unknown = sorted(set(dynamic_shapes) - set(names))
    if unknown:
        raise UnsupportedError(f"dynamic_shapes names {unknown} are not among forward()'s first {n} arguments {names}")
    return tuple(dynamic_shapes.get(name) for name in names)


def _node_path(node: fx.Node) -> str:
    info = node.meta.get(MATMUL_META)
    return getattr(info, "path", None) or module_path_of(node) or "<top level>"


def _registry():
    try:  # private API: used only to name unsupported custom ops early; the exporter checks too
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        return ONNXRegistry.from_torchlib()
    except Exception:  # noqa: BLE001
        return None


def check_translations(gm: fx.GraphModule, table: dict[Any, Any]) -> None:
    """Raise UnsupportedError for the first custom op in gm with no ONNX translation."""
    registry = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        ns = node.target.namespace
        if ns in _FRAMEWORK_NAMESPACES or node.target in table:
            continue
        if ns != "qhl":
            registry = registry or _registry()
            if registry is None or registry.is_registered(node.target):
                continue
        raise UnsupportedError(
            f"node {node.name!r} ({node.target}) in module {_node_path(node)!r} has no ONNX translation; "
            f"qhl translates {sorted(str(k) for k in table)}. Keep this layer float "
            "(recipe skip=[...]) or add a translation under qhl/codegen/onnx/."
        )


def _is_const(v: Any) -> bool:
    return v is None or v.const_value is not None or (v.producer() is not None and v.producer().op_type == "Constant")


def _fold_weight_layouts(model: Any) -> bool:
    """Fold the nodes that only re-lay-out initializers (transposes, int4 unpacking) into
    initializers, whatever their size. Returns whether anything changed."""
    import onnx
    from onnxscript.optimizer import fold_constants

    def should_fold(node: Any) -> bool | None:
        if node.domain not in ("", "ai.onnx") or not all(_is_const(v) for v in node.inputs):
            return False
        if node.op_type == "Expand":  # the one layout op that can grow data: only small ones
            shape = node.outputs[0].shape
            return shape is not None and shape.is_static() and math.prod(shape.numpy()) <= 1 << 16
        if node.op_type in _LAYOUT_OPS:
            return True
        if node.op_type == "Cast":
            return node.attributes["to"].as_int() in {getattr(onnx.TensorProto, t) for t in _LOW_BIT_CASTS}
        return False

    result = fold_constants(model, input_size_limit=2**62, output_size_limit=2**62, should_fold=should_fold)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    return bool(result.modified)


def _drop_symmetric_int4_zero_points(model: Any) -> int:
    """Symmetric int4 (every zero point 8) -> signed int4 codes with no zero point input.

    (c - 8) * s == (c' - 0) * s with c' = c - 8 as int4: the same numbers, one tensor fewer, and
    ONNX Runtime fuses it into a MatMulNBits without zero points, its faster 4-bit path
    (MatMulNBits' default zero point is 8). Returns how many nodes changed."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    def const(v: Any) -> Any:
        return None if v is None or v.const_value is None else v.const_value.numpy()

    changed = 0
    for node in list(model.graph):
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and len(node.inputs) == 3:
            codes, zero = const(node.inputs[0]), const(node.inputs[2])
            if codes is None or zero is None or codes.dtype != ml_dtypes.uint4 or zero.dtype != ml_dtypes.uint4:
                continue
            if not np.all(zero.astype(np.int8) == 8):
                continue
            signed = (codes.astype(np.int8) - 8).astype(ml_dtypes.int4)
            value = ir.Value(name=f"{node.inputs[0].name}_int4", shape=node.inputs[0].shape,
                             type=ir.TensorType(ir.DataType.INT4), const_value=ir.Tensor(signed, name=f"{node.inputs[0].name}_int4"))
            model.graph.register_initializer(value)
            node.replace_input_with(0, value)
            node.resize_inputs(2)
            changed += 1
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.inputs) >= 4:
            zero = const(node.inputs[3])
            if zero is None or node.attributes["bits"].as_int() != 4 or not np.all(zero == 0x88):
                continue
            if len(node.inputs) == 4:
                node.resize_inputs(3)
            else:
                node.replace_input_with(3, None)
            changed += 1
    if changed:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
    return changed


def _store_int4_codes(model: Any) -> int:
    """MatMulInteger weights that are 4-bit codes (an int8 initializer of values 0..15 with the
    scalar zero point 8: w4a8/w4a4) -> a uint4 initializer + Cast(int8), half the bytes on disk.

    The exporter's folding turns the unpacking into one int8 initializer; this stores the same
    integers in 4 bits. ONNX Runtime folds the Cast into an int8 constant when it loads the file
    (constant folding), so no Cast runs per call. Returns how many weights changed."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    changed = 0
    for node in list(model.graph):
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 4:
            continue
        w, zp = node.inputs[1], node.inputs[3]
        if w is None or zp is None or w.const_value is None or zp.const_value is None or not w.is_initializer():
            continue
        codes, zero = w.const_value.numpy(), zp.const_value.numpy()
        if codes.dtype != np.int8 or zero.size != 1 or int(zero.reshape(())) != 8 or codes.min() < 0 or codes.max() > 15:
            continue
        if len(w.uses()) != 1:  # shared with another reader: leave it as it is
            continue
        name = f"{w.name}_uint4"
        packed = ir.Value(name=name, shape=w.shape, type=ir.TensorType(ir.DataType.UINT4),
                          const_value=ir.Tensor(codes.astype(ml_dtypes.uint4), name=name))
        model.graph.register_initializer(packed)
        cast = ir.Node("", "Cast", [packed], [ir.AttrInt64("to", ir.DataType.INT8)], name=f"{name}_to_int8")
        model.graph.insert_before(node, cast)
        node.replace_input_with(1, cast.outputs[0])
        model.graph.initializers.pop(w.name)
        changed += 1
    return changed


# (op type, domain) of integer GEMMs -> index of their b_zero_point input
_INT_GEMMS = {("MatMulInteger", ""): 3, ("MatMulInteger", "ai.onnx"): 3, ("MatMulIntegerToFloat", "com.microsoft"): 5,
              ("DynamicQuantizeMatMul", "com.microsoft"): 3}


def _unsigned_int8_weights(model: Any) -> int:
    """int8 weight initializers of integer GEMMs -> uint8 (+128) with b_zero_point 128, where a
    code exceeds [-64, 64] (see int8_operands in the module docstring). The same integers:
    (b + 128) - 128 = b. Returns how many weights changed."""
    import numpy as np
    import onnx_ir as ir

    changed = 0
    for node in list(model.graph):
        zp_index = _INT_GEMMS.get((node.op_type, node.domain))
        if zp_index is None or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        zp = node.inputs[zp_index] if len(node.inputs) > zp_index else None
        if w is None or w.const_value is None or not w.is_initializer() or zp is not None:
            continue
        codes = w.const_value.numpy()
        if codes.dtype != np.int8 or int(np.abs(codes.astype(np.int16)).max(initial=0)) <= _NO_SATURATION_MAX:
            continue
        if len(w.uses()) != 1:  # shared with another reader: leave it, and say so
            log.warning("int8 weight %s has %d readers; left as int8 (u8 x s8)", w.name, len(w.uses()))
            continue
        name = f"{w.name}_u8"
        unsigned = ir.Value(name=name, shape=w.shape, type=ir.TensorType(ir.DataType.UINT8),
                            const_value=ir.Tensor((codes.astype(np.int16) + 128).astype(np.uint8), name=name))
        zero = ir.Value(name=f"{name}_zero_point", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.UINT8),
                        const_value=ir.Tensor(np.array(128, np.uint8), name=f"{name}_zero_point"))
        model.graph.register_initializer(unsigned)
        model.graph.register_initializer(zero)
        if len(node.inputs) <= zp_index:
            node.resize_inputs(zp_index + 1)
        node.replace_input_with(1, unsigned)
        node.replace_input_with(zp_index, zero)
        model.graph.initializers.pop(w.name)
        changed += 1
    return changed


def _remove_unused_nodes(model: Any) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def _ops_histogram(model: Any) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[name] += 1
    return dict(counts)


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _check(path: pathlib.Path, target: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)  # by path: works past 2 GB
        # shapes need no weight bytes: infer on the graph without its external data
        proto = onnx.load(str(path), load_external_data=False)
        # strict mode needs every op's schema: contrib ops (com.microsoft) are unknown to onnx
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=target == "standard")
    except Exception as e:
        raise QhlError(f"the ONNX file {str(path)!r} failed onnx.checker/shape inference: {type(e).__name__}: {e}") from e


def _optimize(model_ir: Any) -> None:
    """Constant folding and dead-code removal (onnxscript's optimizer), without the opset-23 fusions
    that `torch.onnx.export(optimize=True)` adds: its RotaryEmbedding fusion of HF Llama's rotary
    code gives a node that ONNX Runtime 1.32 rejects at run time ("cos_cache and sin_cache are
    expected to have the same shape as input 'x'") whenever batch > 1."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model_ir)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    recipe: Any = "w8a8",
    dynamic_shapes: Any = None,
    target: str = "standard",
    opset: int = EXPORT_OPSET,
    check: bool = True,
    int8_operands: str = "u8u8",
    w4a16_activations: str | None = None,
    **knobs: Any,
) -> ExportResult:
    """Rewrite `model` with `recipe` and write it as ONNX to `path` (see the module docstring)."""
    from qhl.codegen import onnx as onnx_codegen

    t0 = time.perf_counter()
    w4a16_activations = _w4a16_activations(w4a16_activations, target)
    if int8_operands not in INT8_OPERANDS:
        raise UnsupportedError(
            f"unknown int8_operands {int8_operands!r}; valid: {list(INT8_OPERANDS)} (u8u8: exact on every CPU; "
            "u8s8: faster where the CPU has VNNI or AMX, saturating without)"
        )
    path = pathlib.Path(path)
    _check_writable(path)
    if opset < onnx_codegen.DEFAULT_OPSET:
        raise UnsupportedError(f"opset {opset} < 21: blocked QuantizeLinear/DequantizeLinear and uint4 need opset >= 21")
    table = dict(onnx_codegen.TRANSLATIONS) if target == "standard" else onnx_codegen.translation_table(target)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    dyn = default_dynamic_shapes(example_inputs) if dynamic_shapes is None else _as_positional(model, dynamic_shapes, len(example_inputs))

    from qhl.report import inspect as qhl_inspect

    with no_kv_cache(model):
        report = qhl_inspect(model, example_inputs, recipe=recipe, dynamic_shapes=dyn, **knobs)
    gm = report.graph_module
    check_translations(gm, table)
    for row in report.layers:
        weights = row.in_features * row.out_features if row.in_features and row.out_features else None
        row.onnx_ops = ops_after_split(onnx_codegen.ops_for_form(row.form, target, has_bias=row.has_bias), w4a16_activations, weights) if row.form else []

    onnx_codegen.set_opset(opset)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # ep.module() cannot be put in eval mode; the captured graph already is inference
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                gm, example_inputs, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                custom_translation_table=table, optimize=False, verbose=False, report=False,
            )
            _optimize(program.model)
    except Exception as e:  # the exporter raises many types; say which model and recipe
        raise UnsupportedError(
            f"torch.onnx.export failed for {type(model).__name__} under recipe {report.recipe.name!r}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    finally:
        onnx_codegen.set_opset(onnx_codegen.DEFAULT_OPSET)
    model_ir = program.model
    _fold_weight_layouts(model_ir)
    _drop_symmetric_int4_zero_points(model_ir)
    _store_int4_codes(model_ir)
    if int8_operands == "u8u8":
        _unsigned_int8_weights(model_ir)
    if fold_attention_head_transposes(model_ir):
        _remove_unused_nodes(model_ir)
    split_w4a16_activations(model_ir, w4a16_activations)
    model_ir.producer_name = "qhl"
    model_ir.metadata_props["qhl.recipe"] = report.recipe.to_json(indent=None)
    model_ir.metadata_props["qhl.target"] = target
    model_ir.metadata_props["qhl.int8_operands"] = int8_operands
    model_ir.metadata_props["qhl.matmulnbits_accuracy_level"] = str(onnx_codegen.ACCURACY_LEVEL)
    model_ir.metadata_props["qhl.w4a16_activations"] = w4a16_activations

    external = _initializer_bytes(model_ir) >= EXTERNAL_DATA_BYTES
    try:
        program.save(str(path), external_data=external)
    except OSError as e:  # checked writable at the start; the disk can still fill up
        raise UnsupportedError(f"writing {str(path)!r} failed: {e}") from e
    size = path.stat().st_size + sum(
        p.stat().st_size for p in path.parent.glob(path.name + "*.data") if p != path
    ) if external else path.stat().st_size
    if check:
        _check(path, target)
    result = ExportResult(
        path=path, size_bytes=size, report=report, ops=_ops_histogram(model_ir), target=target, opset=opset,
        accuracy_level=onnx_codegen.ACCURACY_LEVEL, int8_operands=int8_operands,
        w4a16_activations=w4a16_activations, external_data=external,
        seconds=time.perf_counter() - t0, dynamic_shapes=dyn,
    )
    log.info("%s", result)
    return result
