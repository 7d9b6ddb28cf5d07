"""FX graph helpers and the metadata that passes share.

Two metadata records travel on nodes:

* ``node.meta[WEIGHT_META]`` on a placeholder or get_attr: a `WeightRef`, set by capture, that
  says "this input is the parameter `path`, whose real value is `value`".
* ``node.meta[MATMUL_META]`` on a canonical matmul: a `MatmulInfo` (provenance, shapes, the
  weight, and what later passes decided: form or the reason a layer stayed float).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = [
    "attr_value",
    "layer_path",
    "WEIGHT_META",
    "MATMUL_META",
    "TRAINING_META",
    "WeightRef",
    "MatmulInfo",
    "aten",
    "val",
    "weight_source",
    "matmul_infos",
    "float_reasons",
    "module_path_of",
    "source_to_path",
    "same_shape",
]

aten = torch.ops.aten
WEIGHT_META = "qhl_weight"
MATMUL_META = "qhl_matmul"
TRAINING_META = "qhl_training"  # gm.meta flag: this graph is the forward of a training step

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class WeightRef:
    """A graph input that is a model parameter or buffer, with its real value."""

    path: str
    value: torch.Tensor
    trainable: bool = False


GROUPED_FORMS = ("w4a16", "lr-w4a16", "gralora-w4a16", "lora-w4a16")  # forms whose int4 weight is group-wise


def form_label(form: str | None, group_size: int | None = None) -> str:
    """A form as reports show it: "float", "w8a8", or with its int4 groups "w4a16 g64"."""
    if not form:
        return "float"
    return f"{form} g{group_size}" if group_size and form in GROUPED_FORMS else form


@dataclass
class MatmulInfo:
    """One matmul found in the graph, and what the passes did with it."""

    path: str
    op: str  # the ATen op it was found as: mm, addmm, linear, bmm, matmul
    in_features: int | None = None
    out_features: int | None = None
    weight: WeightRef | None = None  # canonical [N, K] weight value, if the matmul has one
    has_bias: bool = False
    dtype: torch.dtype | None = None
    x_shape: tuple[Any, ...] = ()
    form: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    selected: bool = False
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    sqnr_db: float | None = None
    node_name: str | None = None
    kernel_source: str | None = None
    kernel_name: str | None = None
    # Rotation passes: what they did to this layer (report text), or why they left it unrotated,
    # and the offline weight rewrite they owe it (float32 [N, K] -> float32 [N, K]), applied by
    # whichever pass materializes the weight (quantize_linear packs transform(W)).
    rotation: str | None = None
    rotation_reason: str | None = None
    weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def add_weight_transform(self, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> None:
        """Compose `fn` after any transform already owed, and note it for the report."""
        prev = self.weight_transform
        self.weight_transform = fn if prev is None else (lambda w, f=fn, p=prev: f(p(w)))
        self.rotation = what if not self.rotation else f"{self.rotation} + {what}"

    def transformed(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_transform is None else self.weight_transform(w)

    def decline(self, reason: str) -> None:
        self.form, self.reason, self.selected = None, reason, False

    def __repr__(self) -> str:
        # One line (the dataclass repr would print the weight tensor and the kernel source).
        shape = f"{self.in_features}->{self.out_features}" if self.in_features is not None else "-"
        parts = [self.path or "<root>", self.op, shape, form_label(self.form, self.knobs.get("group_size"))]
        if self.sqnr_db is not None:
            parts.append(f"{self.sqnr_db:.1f} dB")
        if self.weight_bytes_before:
            parts.append(f"{self.weight_bytes_before}->{self.weight_bytes_after} bytes")
        if self.rotation:
            parts.append(f"rotation: {self.rotation}")
        if self.reason:
            parts.append(f"reason: {self.reason}")
        return f"MatmulInfo({', '.join(parts)})"


def val(node: Any) -> Any:
    """The FakeTensor / SymInt / value that tracing recorded for a node (or the constant itself)."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_ALIASES = {aten.detach.default, aten.alias.default, aten.clone.default, aten.contiguous.default}


def _is_swap(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target == aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    if node.target == aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return False


def _is_dtype_cast(node: fx.Node) -> bool:
    """A _to_copy that changes only the dtype (same device, no layout change)."""
    extra = set(node.kwargs) - {"dtype"}
    src, dst = val(node.args[0]), val(node)
    same_device = src is None or dst is None or src.device == dst.device
    return not extra - {"layout", "device"} and same_device and "memory_format" not in node.kwargs


def weight_source(node: Any) -> tuple[fx.Node, WeightRef, bool] | None:
    """Follow transposes/aliases of a 2-D operand back to a weight input.

    Returns (base node, its WeightRef, transposed?) where `transposed` says whether the operand
    is the base weight transposed an odd number of times, or None if the operand is not a weight.
    """
    transposed = False
    while isinstance(node, fx.Node):
        if WEIGHT_META in node.meta:
            return node, node.meta[WEIGHT_META], transposed
        if node.op != "call_function":
            return None
        if node.target in _TRANSPOSES and _is_swap(node):
            transposed = not transposed
        elif node.target == aten._to_copy.default and _is_dtype_cast(node):
            pass  # autocast's weight cast: quantize from the float32 source, not the cast copy
        elif node.target not in _ALIASES:
            return None
        node = node.args[0]
    return None


def matmul_infos(gm: fx.GraphModule) -> list[tuple[fx.Node, MatmulInfo]]:
    return [(n, n.meta[MATMUL_META]) for n in gm.graph.nodes if MATMUL_META in n.meta]


def float_reasons(layers: Any) -> list[tuple[int, str]]:
    """(count, reason) for the layers left float (anything with .form and .reason: MatmulInfo,
    report rows), most frequent first: 180 of SmolLM2's layers share one reason under the w4a16
    preset, which a per-layer table buries."""
    counts: dict[str, int] = {}
    for layer in layers:
        if not layer.form and layer.reason:
            counts[layer.reason] = counts.get(layer.reason, 0) + 1
    return sorted(((n, r) for r, n in counts.items()), key=lambda item: -item[0])


def source_to_path(source_name: str) -> str:
    """Dynamo source text -> module path.

    "L['self']._modules['layers']._modules['0']._parameters['weight']" -> "layers.0.weight"
    """
    import re

    parts = re.findall(r"\['([^']+)'\]|\[(\d+)\]|\.([A-Za-z0-9_]+)", source_name)
    names = [a or b or c for a, b, c in parts]
    if source_name.startswith("L[") and names:
        # Drop the root local (the compiled module, or the function argument holding it);
        # a forward wrapped as f(*args) reaches the module as L['args'][0].
        names = names[2:] if names[0] == "args" and len(names) > 1 and names[1].isdigit() else names[1:]
    # "__dict__": Dynamo reaches some submodules (peft's PeftModel) through the instance dict.
    drop = {"_modules", "_parameters", "_buffers", "_orig_mod", "__dict__"}
    return ".".join(n for n in names if n not in drop)


def module_path_of(node: fx.Node) -> str | None:
    """The module path a node was traced in (from its nn_module_stack), or None."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = list(stack.values())[-1]
        return source_to_path(path) if "[" in path else path
    return None


def same_shape(a: Any, b: Any) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if len(a) != len(b):
        return False
    return all(
        x == y if isinstance(x, int) and isinstance(y, int) else statically_known_true(x == y)
        for x, y in zip(a, b)
    )


def attr_value(gm: torch.nn.Module, target: str) -> Any:
    """What a get_attr node's (dotted) target names on gm."""
    return operator.attrgetter(target)(gm)


def layer_path(node: fx.Node) -> str:
    """The module path of the layer a qhl op node computes (its MatmulInfo), else the node's name."""
    info = node.meta.get(MATMUL_META)
    return info.path if info is not None and info.path else node.name
