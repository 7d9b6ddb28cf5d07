"""qhl.inspect and the Report it returns: what was rewritten, how, and what it cost in fidelity.

    report = qhl.inspect(model, (x,), recipe="w8a8")
    print(report)                  # a readable table, one row per matmul found
    report.layers[0].sqnr_db       # that layer's output against float32 on the example inputs
    report.passes[0].after         # each pass's graph, before and after, as Python text
    report.to_html("report.html")  # one self-contained page;  report.to_json() for machines
    report.graph_module(x)         # the rewritten model, runnable
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qhl.capture import capture_export, no_kv_cache
from qhl.codegen.triton.emit import attach_kernel_sources
from qhl.driver import PassRecord, run_passes
from qhl.graph import GROUPED_FORMS, MATMUL_META, MatmulInfo, float_reasons, form_label, matmul_infos
from qhl.metrics import sqnr_db
from qhl.recipes import DEFAULT_RECIPE, Recipe
from qhl.recipes import recipe as make_recipe

__all__ = ["Report", "LayerRow", "inspect", "layer_rows"]

log = logging.getLogger(__name__)


@dataclass
class LayerRow:
    """One matmul found in the graph."""

    path: str
    op: str
    form: str | None
    reason: str | None
    sqnr_db: float | None
    in_features: int | None
    out_features: int | None
    x_shape: tuple[Any, ...]
    weight_bytes_before: int
    weight_bytes_after: int
    kernel_name: str | None = None
    kernel_source: str | None = None
    onnx_ops: list[str] = field(default_factory=list)
    rotation: str | None = None  # what the rotation passes did to this layer
    rotation_reason: str | None = None  # why they left it unrotated
    group_size: int | None = None  # int4 groups along K (group-wise forms only)
    has_bias: bool = False

    @classmethod
    def from_info(cls, info: MatmulInfo) -> LayerRow:
        return cls(
            path=info.path,
            op=info.op,
            form=info.form,
            reason=info.reason,
            sqnr_db=info.sqnr_db,
            in_features=info.in_features,
            out_features=info.out_features,
            x_shape=tuple(str(s) if not isinstance(s, int) else s for s in info.x_shape),
            weight_bytes_before=info.weight_bytes_before,
            weight_bytes_after=info.weight_bytes_after,
            kernel_name=info.kernel_name,
            kernel_source=info.kernel_source,
            onnx_ops=_onnx_ops(info.form, info.has_bias),
            rotation=info.rotation,
            rotation_reason=info.rotation_reason,
            group_size=info.knobs.get("group_size") if info.form in GROUPED_FORMS else None,
            has_bias=info.has_bias,
        )

    @property
    def form_label(self) -> str:
        """The form as the report shows it: "float", "w8a8", or with its int4 groups "w4a16 g64"."""
        return form_label(self.form, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["x_shape"] = list(self.x_shape)
        d["sqnr_db"] = _json_float(d["sqnr_db"])
        return d


def _onnx_ops(form: str | None, has_bias: bool) -> list[str]:
    """The ONNX op types a form becomes in qhl.export_onnx (standard target); [] for float layers."""
    if not form:
        return []
    from qhl.codegen.onnx import ops_for_form  # cheap: does not import onnxscript

    return ops_for_form(form, has_bias=has_bias)


def layer_rows(gm: fx.GraphModule) -> list[LayerRow]:
    return [LayerRow.from_info(info) for _, info in matmul_infos(gm)]


@dataclass
class Report:
    """What qhl did to one model under one recipe."""

    recipe: Recipe
    model_name: str
    passes: list[PassRecord]
    layers: list[LayerRow]
    output_sqnr_db: float | None
    graph_module: fx.GraphModule | None = None

    # --- summaries ----------------------------------------------------------------------------
    @property
    def rewritten(self) -> list[LayerRow]:
        return [row for row in self.layers if row.form]

    @property
    def weight_bytes(self) -> tuple[int, int]:
        rows = [r for r in self.layers if r.weight_bytes_before]
        return sum(r.weight_bytes_before for r in rows), sum(r.weight_bytes_after for r in rows)

    def kernel_sources(self) -> dict[str, str]:
        return {r.path: r.kernel_source for r in self.layers if r.kernel_source}

    # --- renderings ---------------------------------------------------------------------------
    def __str__(self) -> str:
        before, after = self.weight_bytes
        lines = [
            f"qhl report: {self.model_name}, recipe {self.recipe.name!r}",
            f"  matmuls found: {len(self.layers)}, rewritten: {len(self.rewritten)}, "
            f"left as they were: {len(self.layers) - len(self.rewritten)}",
            f"  weight bytes of matmuls: {_mb(before)} -> {_mb(after)}"
            + (f" ({after / before:.2f}x)" if before else ""),
            f"  model output SQNR vs float32: {_db(self.output_sqnr_db)}",
        ]
        if not self.layers:
            lines.append("  (qhl rewrites matrix products: linear, mm, addmm, bmm and matmul; this graph has "
                         "none, so it runs as it was. Convolutions and embeddings are not rewritten.)")
        reasons = float_reasons(self.layers)
        if reasons:
            lines.append("  left float, by reason:")
            lines += [f"    {n:>4} x {reason}" for n, reason in reasons]
        lines += ["", "  passes:"]
        for p in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items())
            lines.append(f"    {p.name:<22} changed={str(p.changed):<5} {stats}  ({p.seconds * 1e3:.0f} ms)")
            lines += [f"      - {note}" for note in p.notes]
        lines += ["", _table(self.layers)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        before, after = self.weight_bytes
        return {
            "model": self.model_name,
            "recipe": self.recipe.to_dict(),
            "output_sqnr_db": _json_float(self.output_sqnr_db),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "passes": [
                {
                    "name": p.name,
                    "changed": p.changed,
                    "stats": p.stats,
                    "seconds": p.seconds,
                    "verified_sqnr_db": _json_float(p.verified_sqnr_db),
                    "notes": list(p.notes),
                    "before": p.before,
                    "after": p.after,
                }
                for p in self.passes
            ],
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_html(self, path: str | None = None) -> str:
        from qhl.report_html import render_html

        page = render_html(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_db(x: float | None, unit: str = " dB") -> str:
    """An SQNR for people: "-" when not measured, "exact" for +inf, one decimal otherwise."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "exact" if x > 0 else f"-inf{unit}"
    return f"{x:.1f}{unit}"


_db = format_db


def _json_float(x: float | None) -> Any:
    if x is not None and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _table(rows: list[LayerRow]) -> str:
    rotated = any(r.rotation or r.rotation_reason for r in rows)
    header = ("path", "op", "K->N", "form", "SQNR", "bytes before->after") + (("rotation",) if rotated else ()) + ("reason",)
    body = [
        (
            r.path,
            r.op,
            f"{r.in_features}->{r.out_features}" if r.in_features else "-",
            r.form_label,
            _db(r.sqnr_db),
            f"{r.weight_bytes_before}->{r.weight_bytes_after}" if r.weight_bytes_before else "-",
            *((r.rotation or "-",) if rotated else ()),
            "; ".join(t for t in (r.reason, r.rotation_reason) if t),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the reason column is free text: do not pad it
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*b) for b in body]
    return "\n".join(out)


# --- inspect ----------------------------------------------------------------------------------


class _LayerSqnr(torch.fx.Interpreter):
    """Runs the rewritten graph; at each rewritten matmul, compares its output with float32
    F.linear on the same input (so each layer's error is measured on its own)."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        info = n.meta.get(MATMUL_META)
        # adapter layers (issue 6) add a trained update on purpose: no float reference to compare with
        if info is not None and info.form is not None and info.weight is not None and not info.knobs.get("adapter"):
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            bias = n.args[-1]
            b = self.env[bias] if isinstance(bias, fx.Node) else None
            block = info.knobs.get("hadamard_block", -1)
            if block is not None and block >= 0:  # the op rotates x in its fused prologue
                x = torch.ops.qhl.hadamard(x.float(), block, False, True)
            # The float layer on the same input: a rotated layer's weight is the rotated one.
            w = info.transformed(info.weight.value.detach().float())
            ref = torch.nn.functional.linear(x.float(), w, None if b is None else b.float())
            info.sqnr_db = sqnr_db(ref, out)
        return out


def _first_float(out: Any) -> torch.Tensor | None:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


@torch.no_grad()
def inspect(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    recipe: str | Recipe = DEFAULT_RECIPE,
    *,
    dynamic_shapes: Any = None,
    verify: bool | None = None,
    **knobs: Any,
) -> Report:
    """Capture `model` with torch.export, run the recipe's passes, and measure what they did."""
    rec = make_recipe(recipe, **knobs)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    with no_kv_cache(model):
        ref = _first_float(model(*example_inputs))
        gm = capture_export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    gm, records = run_passes(gm, rec, example_inputs, verify=verify)
    attach_kernel_sources(gm)
    flat, _ = torch.utils._pytree.tree_flatten((example_inputs, {}))
    out = _first_float(_LayerSqnr(gm).run(*flat))
    output_sqnr = sqnr_db(ref, out) if ref is not None and out is not None else None
    report = Report(rec, type(model).__name__, records, layer_rows(gm), output_sqnr, gm)
    log.info("qhl.inspect: %d matmuls, %d rewritten, output SQNR %s", len(report.layers), len(report.rewritten), _db(output_sqnr))
    return report

