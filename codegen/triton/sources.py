"""The Triton source `qhl.inspect` shows for forms whose kernels are written once, not templated.

w8a8, w8a16 and w4a16 kernels are rendered per node (codegen/triton/emit.py), so their source is
the specialised text. The kernels of the later forms take K and N at launch and are shared by all
layers: for those, the source a layer shows is the text of the `@triton.jit` functions it launches,
read from their module file with `ast` (no triton import, so inspect works on a machine without
it), under a header naming the layer's specialisation (the launch-time arguments).

    form                    kernels, in launch order
    w4a8, w4a4              the rendered per-token quantize kernel (qmax 127 or 7), or the fused
                            Hadamard prologue; then the int4 GEMM
    gralora, lora           adapter down-projection, base GEMM + block low-rank epilogue
    gralora-w4a16, ...      the rendered w4a16 kernel, then the adapter kernels above
    blocklr                 the block low-rank kernel
    lr-w4a16                the rendered w4a16 kernel, then the low-rank kernel (rank-r update)

A layer rotated online (a separate qhl::hadamard node before it) also shows the FWHT kernel.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Callable

from qhl.errors import KernelError
from qhl.graph import MatmulInfo

__all__ = ["FIXED_KERNELS", "fixed_kernel_source", "rotation_source", "jit_source"]

_W4AX = "qhl.codegen.triton.w4ax"
_GRALORA = "qhl.codegen.triton.gralora"
_LOWRANK = "qhl.codegen.triton.lowrank"
_HADAMARD = "qhl.codegen.triton.hadamard"

# form -> (module, kernel functions in launch order; helpers they call come first)
FIXED_KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "w4a8": (_W4AX, ("w4ax_gemm_kernel",)),
    "w4a4": (_W4AX, ("w4ax_gemm_kernel",)),
    "gralora": (_GRALORA, ("_dot_k_loop", "block_project_regroup_kernel", "gemm_lowrank_kernel")),
    "lora": (_GRALORA, ("_dot_k_loop", "block_project_regroup_kernel", "gemm_lowrank_kernel")),
    "blocklr": (_LOWRANK, ("blocklr_kernel",)),
}
# Forms whose base GEMM is the rendered w4a16 kernel, followed by the kernels of another form.
W4A16_BASE = {"gralora-w4a16": "gralora", "lora-w4a16": "lora", "lr-w4a16": "blocklr"}
# Forms whose prologue is the rendered per-token quantize kernel (qmax by activation bits),
# unless a fused Hadamard prologue replaces it.
PER_TOKEN_PROLOGUE = {"w4a8": 127, "w4a4": 7}
HADAMARD_KERNELS = (_HADAMARD, ("_fwht_tile", "hadamard_kernel"))


@functools.lru_cache(maxsize=None)
def _module_functions(module: str) -> dict[str, str]:
    """name -> source text (decorators included) of every top-level function of `module`."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise KernelError(f"cannot find the kernel module {module}")
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "".join(lines[first - 1 : node.end_lineno])
    return out


def jit_source(module: str, names: tuple[str, ...]) -> str:
    """The text of the named functions of `module`, each checked to be a `@triton.jit` kernel."""
    functions = _module_functions(module)
    parts = []
    for name in names:
        src = functions.get(name)
        if src is None or "@triton.jit" not in src:
            raise KernelError(f"{module} has no @triton.jit function {name!r}")
        parts.append(src)
    return f"# from {module}\n" + "\n\n".join(parts)


def rotation_source(info: MatmulInfo) -> str | None:
    """The FWHT kernel's text when the layer reads a separate online qhl::hadamard node."""
    fused = int(info.knobs.get("hadamard_block", -1)) >= 0
    if info.rotation and "online" in info.rotation and not fused:
        return f"# online rotation before {info.path}: qhl::hadamard\n" + jit_source(*HADAMARD_KERNELS)
    return None


def _launch_args(info: MatmulInfo) -> str:
    keys = ("hadamard_block", "k", "r", "hybrid_r", "scaling")
    if info.form in W4A16_BASE:
        keys = ("group_size",) + keys
    knobs = {k: info.knobs[k] for k in keys if k in info.knobs}
    fields = {"K": info.in_features, "N": info.out_features, "bias": bool(info.has_bias),
              "dtype": str(info.dtype).replace("torch.", ""), **knobs}
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def fixed_kernel_source(info: MatmulInfo, render: Callable[..., str]) -> tuple[str, str] | None:
    """(kernel name, source) for a layer of a fixed-kernel form, or None for another form.

    `render(family, **spec_fields)` renders a templated kernel for this node (the w4a16 base of
    the forms that launch one first, the per-token prologue of w4a8/w4a4).
    """
    form = info.form
    base = W4A16_BASE.get(form or "")
    kernels = FIXED_KERNELS.get(base or form or "")
    if kernels is None:
        return None
    module, names = kernels
    sections = [jit_source(module, names)]
    if form in PER_TOKEN_PROLOGUE:
        if int(info.knobs.get("hadamard_block", -1)) >= 0:
            # the fused prologue qhl::hadamard_quantize_per_token runs the Hadamard kernel
            sections.insert(0, jit_source(*HADAMARD_KERNELS))
        else:
            sections.insert(0, render("per_token_quant", qmax=PER_TOKEN_PROLOGUE[form]))
    if base is not None:
        sections.insert(0, render("w4a16", group_size=int(info.knobs.get("group_size", 0))))
    name = names[-1]
    header = (
        f'"""Triton kernels of layer {info.path} ({form}): written once in {module}, shared by every\n'
        f"layer of this form; this layer launches them with {_launch_args(info)}.\n"
        '"""\nimport triton\nimport triton.language as tl\n\n'
    )
    return name, header + "\n\n".join(sections)
