"""Triton codegen: render a kernel specialised for one matmul, load it, and keep its source.

    MatmulInfo (form, K, N, group size, bias?, dtype)  ->  KernelSpec  ->  source text  ->  module

Each kernel family owns a template (a string holding the kernel body) in its own file:

    per_token_quant   codegen/triton/per_token_quant.py   x [T, K] -> (q int8, scale), qmax 127 or 7
    w8a8              codegen/triton/w8a8.py              per-token quant + int8 GEMM + dequant
    w8a8-tensor       codegen/triton/w8a8_tensor.py       per-tensor uint8 quant + zero-point GEMM
    w8a16, w4a16      codegen/triton/weight_only.py       dequantizing GEMM, fp32 accumulation

The forms whose kernels are written once (w4a8/w4a4 GEMM, GraLoRA, block low-rank, FWHT) show
those kernels' text in `qhl.inspect` through codegen/triton/sources.py.

Rendering bakes K, N, GROUP_SIZE, QMAX, BLOCK_N and BLOCK_K in as constexprs and picks the epilogue
(bias or not) and the output dtype in code, so the text is exactly what runs. BLOCK_M stays a
launch-time constexpr: the token count M is only known when the kernel is called; so does SPLIT_K
(codegen/triton/split_k.py). A layer has a second spec for <= DECODE_MAX_M tokens where TILES
measured better blocks for it (tile="decode", its own kernel, chosen at launch from M).

Rendering is pure string work and imports no triton, so `qhl.inspect` can show kernels on a
machine without it. `load(spec)` writes the text to the cache dir (Triton's @jit reads a
kernel's source with inspect, so it needs a real file) and imports it once per spec.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import operator
import os
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx

from qhl.errors import KernelError
from qhl.graph import MATMUL_META, MatmulInfo

__all__ = [
    "KernelSpec",
    "make_spec",
    "check_blocks",
    "render",
    "load",
    "cache_dir",
    "interpret_mode",
    "attach_kernel_sources",
    "spec_for",
    "k_mask",
    "render_epilogue",
    "block_m_for",
    "tile_for",
    "TILES",
    "DECODE_MAX_M",
    "check_device",
    "check_tensor",
    "check_x_and_bias",
    "check_int8_linear",
]

log = logging.getLogger(__name__)

# Bump when a template changes in a way the spec does not capture: it is part of the file name.
TEMPLATE_VERSION = 1

# The family of each quantized form, and the module that holds its template and wrapper.
FAMILIES: dict[str, str] = {
    "per_token_quant": "qhl.codegen.triton.per_token_quant",
    "w8a8": "qhl.codegen.triton.w8a8",
    "w8a8-tensor": "qhl.codegen.triton.w8a8_tensor",
    "w8a16": "qhl.codegen.triton.weight_only",
    "w4a16": "qhl.codegen.triton.weight_only",
}

DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}

# Smallest BLOCK_K the NVIDIA backend compiles a tl.dot for, by operand type
# (`min_dot_size` in triton/backends/nvidia/compiler.py). The interpreter accepts any size, so
# without this check a kernel could pass every CPU test and then fail to compile on a GPU.
MIN_BLOCK_K = {"int8": 32, "float16": 16, "bfloat16": 16, "float32": 8}
MIN_BLOCK_MN = 16
MAX_BLOCK = 64  # default ceiling for BLOCK_N / BLOCK_K: keeps the register tile modest on a GPU
MAX_QUANT_BLOCK_K = 1024
# Families whose tl.dot operands are int8 whatever x's dtype (their prologue quantizes x).
INT8_DOT_FAMILIES = ("w8a8", "w8a8-tensor")

# Tiles (BLOCK_N, BLOCK_K) measured on an NVIDIA H100 (benchmarks/gpu_speed.py part (b), one
# 4096^2 layer in bf16, results/speed_gpu_h100_tiles.md) that beat the generic 64 x 64 default: "decode"
# runs at <= DECODE_MAX_M tokens (BLOCK_M = 16), where few, long programs starve the SMs and a
# deep BLOCK_K halves the loop; "wide" above. Keyed by (family, tile, x's dtype class): "16" for
# float16/bfloat16, "any" where the dot operands are int8 whatever x is. Pairs not listed keep the
# generic default, so fp32 activations (a larger shared-memory footprint) are unchanged.
DECODE_MAX_M = 16
TILES: dict[tuple[str, str, str], tuple[int, int]] = {
    ("w8a16", "decode", "16"): (32, 256),  # 16.5 us vs 33.9 at 1 token
    ("w8a16", "wide", "16"): (128, 128),  # 41.3 vs 41.5 us at 256 tokens, 196 vs 227 at 2048
    ("w4a16", "decode", "16"): (16, 128),  # 41.1 vs 81.8 us at 1 token (BLOCK_K <= the group)
    ("w8a8", "decode", "any"): (32, 256),  # 19.9 vs 36.8 us at 1 token
    ("w8a8", "wide", "any"): (128, 128),  # 30.0 vs 40.8 us at 256 tokens, 93.9 vs 155 at 2048
}
TILE_NAMES = ("wide", "decode")


# The opening of every GEMM template's kernel body after its signature (w8a8, w8a8-tensor, w8a16,
# w4a16): the sizes baked in at codegen, then the [BLOCK_M, BLOCK_N] tile of y a program computes
# and its offsets and masks. `extra_constants`: further constexpr lines ("" for none).
GEMM_TILE_PROLOGUE = '''    # --- specialisation (baked in by qhl codegen) ---
    K: tl.constexpr = {K}
    N: tl.constexpr = {N}
{extra_constants}    BLOCK_N: tl.constexpr = {block_n}
    BLOCK_K: tl.constexpr = {block_k}

    # --- the [BLOCK_M, BLOCK_N] tile of y this program computes ---
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
'''


def gemm_fields(spec: KernelSpec) -> dict[str, Any]:
    """The format fields every GEMM template takes from its spec (GEMM_TILE_PROLOGUE's and the
    K masks of its x and W loads); each family adds its own."""
    return dict(name=spec.name, K=spec.K, N=spec.N, block_n=spec.block_n, block_k=spec.block_k,
                x_kmask=k_mask(spec, "offs_k[None, :]"), w_kmask=k_mask(spec, "offs_k[:, None]"))


def tile_for(m: int) -> str:
    """The tile class of a launch over m tokens (rows of x)."""
    return "decode" if m <= DECODE_MAX_M else "wide"


def _tile_blocks(family: str, tile: str, dtype: str) -> tuple[int, int] | None:
    if family in INT8_DOT_FAMILIES:
        return TILES.get((family, tile, "any"))
    return TILES.get((family, tile, "16")) if dtype in ("float16", "bfloat16") else None


def interpret_mode() -> bool:
    """Whether Triton runs kernels on its CPU interpreter: TRITON_INTERPRET, read as triton does."""
    value = os.environ.get("TRITON_INTERPRET", "0").strip().lower()
    return value in ("1", "true", "yes", "on", "y")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class KernelSpec:
    """Everything a rendered kernel is specialised on: two equal specs render the same text."""

    family: str  # a key of FAMILIES
    K: int
    N: int  # 0 for per_token_quant
    dtype: str  # x's dtype, which is also the output dtype: "float32" | "float16" | "bfloat16"
    has_bias: bool = False
    group_size: int = 0  # w4a16 only
    block_n: int = 0  # 0 for per_token_quant (one program per row, no N)
    block_k: int = 0
    interpret: bool = False  # render the interpreter workarounds (bf16 dot operands as fp32)
    qmax: int = 127  # per_token_quant only: codes in [-qmax, qmax] (127: 8-bit, 7: 4-bit codes)
    tile: str = "wide"  # "decode": the blocks for <= DECODE_MAX_M tokens (TILES), its own kernel

    @property
    def name(self) -> str:
        """The kernel's function name: readable in profiles and in `qhl inspect`."""
        parts = [f"qhl_{self.family.replace('-', '_')}", f"k{self.K}"]  # an identifier
        if self.family != "per_token_quant":
            parts.append(f"n{self.N}")
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.qmax != 127:
            parts.append(f"q{self.qmax}")
        if self.family != "per_token_quant":
            parts.append("bias" if self.has_bias else "nobias")
        parts.append({"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.dtype])
        if self.tile != "wide":
            parts.append(self.tile)
        return "_".join(parts)

    @property
    def tl_dtype(self) -> str:
        return TL_DTYPES[self.dtype]

    @property
    def dot_dtype(self) -> str:
        """The tl.dot operand type of the weight-only families (INT8_DOT_FAMILIES dot int8)."""
        if self.dtype == "bfloat16" and self.interpret:
            # The interpreter's bf16 dot multiplies bit patterns (triton-lang/triton#11584).
            return "tl.float32"
        return self.tl_dtype

    @property
    def dot_precision(self) -> str:
        """fp32 dots default to TF32 on a GPU (10-bit mantissa); the spec is full fp32."""
        return ', input_precision="ieee"' if self.dot_dtype == "tl.float32" else ""


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    else:
        name = DTYPES.get(dtype, str(dtype))
    if name not in TL_DTYPES:
        raise KernelError(
            f"Triton kernels take float32, float16 or bfloat16 activations; got {dtype}"
        )
    return name


def check_blocks(
    family: str,
    dtype: str,
    block_m: int | None,
    block_n: int,
    block_k: int,
    group_size: int = 0,
) -> None:
    """Raise KernelError unless the block sizes compile on a GPU (not just in the interpreter)."""
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n or None, "BLOCK_K": block_k}
    for label, b in blocks.items():
        if b is not None and (b <= 0 or b & (b - 1)):
            raise KernelError(f"{family}: {label}={b} must be a positive power of two (tl.arange)")
    if family == "per_token_quant":
        return
    operand = "int8" if family in INT8_DOT_FAMILIES else dtype
    if block_k < MIN_BLOCK_K[operand]:
        raise KernelError(
            f"{family}: BLOCK_K={block_k} is below the GPU minimum for {operand} tl.dot "
            f"(BLOCK_K >= {MIN_BLOCK_K[operand]}); the interpreter would accept it but "
            "the NVIDIA backend will not compile it. Use a larger BLOCK_K."
        )
    for label in ("BLOCK_M", "BLOCK_N"):
        b = blocks[label]
        if b is not None and b < MIN_BLOCK_MN:
            raise KernelError(
                f"{family}: {label}={b} is below the minimum of {MIN_BLOCK_MN} for a tl.dot tile"
            )
    if family == "w4a16" and group_size % block_k:
        raise KernelError(
            f"w4a16: BLOCK_K={block_k} must divide group_size={group_size} so that every k-block "
            "shares one (scale, zero) per output channel"
        )


def make_spec(
    family: str,
    K: int,
    N: int = 0,
    dtype: torch.dtype | str = torch.float32,
    has_bias: bool = False,
    group_size: int = 0,
    block_n: int | None = None,
    block_k: int | None = None,
    qmax: int = 127,
    tile: str = "wide",
) -> KernelSpec:
    """A validated KernelSpec with default block sizes for what is not given: the measured TILES
    entry for (family, tile, dtype) where there is one, else the generic default. A tile with no
    entry of its own is the "wide" spec (same name, same kernel)."""
    if family not in FAMILIES:
        raise KernelError(f"unknown kernel family {family!r}; known: {sorted(FAMILIES)}")
    if tile not in TILE_NAMES:
        raise KernelError(f"{family}: tile={tile!r}; known: {TILE_NAMES}")
    name = _dtype_name(dtype)
    K, N, group_size = int(K), int(N), int(group_size)
    if K <= 0 or (family != "per_token_quant" and N <= 0):
        raise KernelError(f"{family}: K and N must be positive, got K={K}, N={N}")
    if family == "w4a16":
        if group_size <= 0 or K % group_size or group_size % 2:
            raise KernelError(
                f"w4a16: K={K} must be a multiple of an even group_size, got {group_size}"
            )
    else:
        group_size = 0
    qmax = int(qmax)
    if qmax != 127 and (family != "per_token_quant" or not 1 <= qmax < 127):
        raise KernelError(f"{family}: qmax={qmax}; only per_token_quant takes a qmax other than 127, in [1, 127)")
    tiled = None
    if family == "per_token_quant":
        block_n = 0
        block_k = block_k or min(_next_pow2(K), MAX_QUANT_BLOCK_K)
    else:
        operand = "int8" if family in INT8_DOT_FAMILIES else name
        tiled = None if block_n or block_k else _tile_blocks(family, tile, name)
        max_n, max_k = tiled or (MAX_BLOCK, MAX_BLOCK)
        block_n = block_n or min(max(_next_pow2(N), MIN_BLOCK_MN), max_n)
        if block_k is None:
            block_k = min(max(_next_pow2(K), MIN_BLOCK_K[operand], 32), max_k)
            if family == "w4a16":  # the largest power of two that divides the group size
                block_k = min(block_k, group_size & -group_size)
    if tile != "wide" and (family == "per_token_quant" or tiled is None):
        tile = "wide"  # no blocks of its own: the wide kernel serves every token count
    check_blocks(family, name, None, block_n, block_k, group_size)
    has_bias = bool(has_bias) and family != "per_token_quant"
    return KernelSpec(family, K, N, name, has_bias, group_size, block_n, block_k, interpret_mode(), qmax, tile)


def _family_module(family: str) -> ModuleType:
    return importlib.import_module(FAMILIES[family])


def render(spec: KernelSpec) -> str:
    """The full text of the Python module that holds the kernel(s) for `spec`."""
    fields = "".join(f"\n    {k} = {v!r}" for k, v in asdict(spec).items())
    header = (
        f'"""qhl-generated Triton kernel `{spec.name}` (template version {TEMPLATE_VERSION}).\n\n'
        f"Rendered by qhl.codegen.triton.emit from the {spec.family} template in\n"
        f"{FAMILIES[spec.family]}. Specialisation:{fields}\n\n"
        'Regenerated from the template on demand: edit the template, not this file.\n"""\n'
        "import triton\nimport triton.language as tl\n"
    )
    return header + _family_module(spec.family).render(spec)


def cache_dir() -> Path:
    """Where rendered kernels are written: $QHL_CACHE_DIR, ~/.cache/qhl/triton, or a tempdir."""
    candidates = [os.environ.get("QHL_CACHE_DIR")]
    try:
        candidates.append(str(Path.home() / ".cache" / "qhl" / "triton"))
    except RuntimeError:  # no home directory (some CI sandboxes)
        pass
    for candidate in filter(None, candidates):
        path = Path(candidate)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    path = Path(tempfile.gettempdir()) / "qhl-triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict[KernelSpec, ModuleType] = {}


def load(spec: KernelSpec) -> ModuleType:
    """Import the rendered module for `spec` (once per spec per process); needs triton."""
    module = _LOADED.get(spec)
    if module is not None:
        return module
    text = render(spec)
    sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / f"{spec.name}_{sha}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        # Write then rename, so a concurrent process never imports a half-written file.
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    mod_name = f"qhl_kernels.{spec.name}_{sha}"
    import_spec = importlib.util.spec_from_file_location(mod_name, path)
    if import_spec is None or import_spec.loader is None:
        raise KernelError(f"cannot import the rendered kernel at {path}")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[mod_name] = module
    import_spec.loader.exec_module(module)
    log.debug("loaded Triton kernel %s from %s", spec.name, path)
    _LOADED[spec] = module
    return module


def _node_has_bias(node: fx.Node, info: MatmulInfo) -> bool:
    # The rewritten op's last argument is the bias (None when absent): trust the graph first.
    if node.op == "call_function" and node.args:
        return node.args[-1] is not None
    return bool(info.has_bias)


def _node_dtype(node: fx.Node, info: MatmulInfo) -> Any:
    if info.dtype is not None:
        return info.dtype
    x = node.args[0] if node.args else None
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    return getattr(xv, "dtype", torch.float32)


def spec_for(node: fx.Node, info: MatmulInfo, tile: str = "wide") -> KernelSpec:
    """The KernelSpec of a rewritten matmul node (its kernel for `tile`'s token counts)."""
    try:
        K, N = operator.index(info.in_features), operator.index(info.out_features)
    except TypeError:
        raise KernelError(
            f"{info.path}: K and N must be known ints to specialise a kernel, got "
            f"in_features={info.in_features!r}, out_features={info.out_features!r}"
        ) from None
    return make_spec(
        info.form,
        K=K,
        N=N,
        dtype=_node_dtype(node, info),
        has_bias=_node_has_bias(node, info),
        group_size=int(info.knobs.get("group_size", 0)) if info.form == "w4a16" else 0,
        tile=tile,
    )


def _render_for(node: fx.Node, info: MatmulInfo):
    """render(family, **fields): a templated kernel specialised on this node's K, N and dtype, for
    the forms that launch one beside their fixed kernels (codegen/triton/sources.py)."""

    def render_family(family: str, **fields: Any) -> str:
        n = 0 if family == "per_token_quant" else info.out_features
        has_bias = bool(info.has_bias) and family != "per_token_quant"
        return render(make_spec(family, K=info.in_features, N=n, dtype=_node_dtype(node, info), has_bias=has_bias, **fields))

    return render_family


def attach_kernel_sources(gm: fx.GraphModule) -> int:
    """Render the Triton kernel of every rewritten matmul; set info.kernel_name/kernel_source.

    Templated families (FAMILIES) render their specialised text; the other forms show the
    kernels they launch (codegen/triton/sources.py), and an online-rotated layer also shows the
    FWHT kernel. Returns how many nodes got a source. Only reads and renders text (no triton
    import, no files). A node that cannot be rendered (e.g. an unsupported dtype) is logged and
    left without one.
    """
    from qhl.codegen.triton import sources

    count = 0
    for node in gm.graph.nodes:
        info = node.meta.get(MATMUL_META)
        if not isinstance(info, MatmulInfo) or not info.form:
            continue
        try:
            if info.form in FAMILIES:
                spec = spec_for(node, info)
                name, text = spec.name, render(spec)
                decode = spec_for(node, info, tile="decode")
                if decode != spec:  # the kernel that runs at <= DECODE_MAX_M tokens, shown too
                    text += "\n\n" + render(decode)
            else:
                found = sources.fixed_kernel_source(info, _render_for(node, info))
                if found is None:
                    continue
                name, text = found
            rotation = sources.rotation_source(info)
            info.kernel_name = name
            info.kernel_source = text if rotation is None else rotation + "\n\n" + text
        except Exception as e:  # noqa: BLE001 -- the source is informational; never fail a CPU compile on it
            log.warning("qhl: no Triton kernel source for %s (%s): %s: %s", info.path, info.form, type(e).__name__, e)
            continue
        count += 1
    return count


# --- pieces shared by the GEMM templates and wrappers ---


def k_mask(spec: KernelSpec, offs: str) -> str:
    """The K-tail mask term of a load, or nothing when BLOCK_K divides K (decided at codegen)."""
    return "" if spec.K % spec.block_k == 0 else f" & ({offs} < K - k0)"


def render_epilogue(spec: KernelSpec) -> str:
    """Bias add (only when the node has one) and the store in the output dtype."""
    lines = []
    if spec.has_bias:
        lines += [
            "    bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)",
            "    y += bias.to(tl.float32)[None, :]",
        ]
    if spec.dtype == "bfloat16" and spec.interpret:
        lines += [
            "    # The interpreter truncates fp32 -> bf16; round to nearest even, as a GPU does.",
            "    bits = y.to(tl.uint32, bitcast=True)",
            "    bits += 0x7FFF + ((bits >> 16) & 1)",
            "    y_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)",
        ]
    else:
        lines.append(f"    y_out = y.to({spec.tl_dtype})")
    lines += [
        "    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn",
        "    tl.store(y_ptrs, y_out, mask=mask_m[:, None] & mask_n[None, :])",
    ]
    return "\n".join(lines)


def block_m_for(M: int) -> int:
    """BLOCK_M for a launch: a power of two in [16, 64] that fits M (fewer idle rows for decode)."""
    return min(max(_next_pow2(M), MIN_BLOCK_MN), MAX_BLOCK)


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and that device one Triton can run on here."""
    given = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) != 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in given.items())
        raise KernelError(f"{op}: all tensors must be on one device; got {where}")
    device = devices.pop()
    if device.type != "cuda" and not interpret_mode():
        raise KernelError(
            f"{op}: Triton kernels need CUDA tensors (got {device}); on CPU, set "
            "TRITON_INTERPRET=1 before importing the kernels, or use the op's CPU spec face"
        )
    return device


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor | None,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int, ...] | None = None,
) -> None:
    """KernelError naming the argument unless t has one of `dtypes` and (if given) `shape`."""
    if t is None:
        raise KernelError(f"{op}: {name} is required")
    if t.dtype not in dtypes:
        raise KernelError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise KernelError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def check_x_and_bias(op: str, x: torch.Tensor, N: int, K: int, bias: torch.Tensor | None) -> None:
    """x is float [..., K] for a weight [N, K]; bias, if any, is float [N]."""
    check_tensor(op, "x", x, tuple(DTYPES))
    if x.dim() == 0 or x.shape[-1] != K:
        raise KernelError(
            f"{op}: x must be [..., K={K}] to match the weight [N={N}, K={K}], got {list(x.shape)}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, tuple(DTYPES), (N,))


def check_int8_linear(
    op: str, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int]:
    """The arguments of w8a8 / w8a16: int8 [N, K] weight, float32 [N] scale. Returns (N, K)."""
    check_tensor(op, "w_int8", w_int8, (torch.int8,))
    if w_int8.dim() != 2 or 0 in w_int8.shape:
        raise KernelError(
            f"{op}: w_int8 must be a non-empty [N, K] matrix, got shape {list(w_int8.shape)}"
        )
    N, K = w_int8.shape
    check_x_and_bias(op, x, N, K, bias)
    check_tensor(op, "w_scale", w_scale, (torch.float32,), (N,))
    check_device(op, x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    return N, K
