"""Report -> one self-contained HTML page (inline CSS, no scripts, no external assets)."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qhl.report import Report

from qhl.report import format_db

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.float td{color:#777}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px;max-height:480px}
summary{cursor:pointer;font-weight:600;margin:4px 0}
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _html_db(x: float | None) -> str:
    return format_db(x, unit="")


def render_html(report: Report) -> str:
    before, after = report.weight_bytes
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>qhl report: {_e(report.model_name)} / {_e(report.recipe.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>qhl report: {_e(report.model_name)}, recipe <code>{_e(report.recipe.name)}</code></h1>",
        "<ul>",
        f"<li>matmuls found: {len(report.layers)}; rewritten: {len(report.rewritten)}</li>",
        f"<li>weight bytes of matmuls: {before:,} &rarr; {after:,}</li>",
        f"<li>model output SQNR vs float32: {_html_db(report.output_sqnr_db)} dB</li>",
        "</ul><h2>Layers</h2><table><tr>",
        "".join(f"<th>{h}</th>" for h in ("path", "op", "x shape", "K&rarr;N", "form", "SQNR dB", "bytes before", "bytes after", "reason")),
        "</tr>",
    ]
    for r in report.layers:
        parts.append(
            f"<tr class='{'q' if r.form else 'float'}'><td>{_e(r.path)}</td><td>{_e(r.op)}</td>"
            f"<td>{_e(list(r.x_shape))}</td><td>{_e(r.in_features)}&rarr;{_e(r.out_features)}</td>"
            f"<td>{_e(r.form_label)}</td><td>{_html_db(r.sqnr_db)}</td><td>{r.weight_bytes_before:,}</td>"
            f"<td>{r.weight_bytes_after:,}</td><td>{_e(r.reason or '')}</td></tr>"
        )
    parts.append("</table><h2>Passes</h2>")
    for p in report.passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items())
        parts.append(
            f"<details><summary>{_e(p.name)}: changed={p.changed}; {_e(stats)}; {p.seconds * 1e3:.0f} ms</summary>"
            + "".join(f"<p>{_e(note)}</p>" for note in p.notes) +
            f"<p>before</p><pre>{_e(p.before)}</pre><p>after</p><pre>{_e(p.after)}</pre></details>"
        )
    parts.append("<h2>Emitted Triton kernels</h2>")
    for path, src in report.kernel_sources().items():
        parts.append(f"<details><summary>{_e(path)}</summary><pre>{_e(src)}</pre></details>")
    parts.append("<h2>Recipe</h2><pre>" + _e(report.recipe.to_json()) + "</pre></body></html>")
    return "\n".join(parts)
