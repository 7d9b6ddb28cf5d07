"""Recipes: frozen, versioned descriptions of what qhl does to a model.

A recipe names the ordered passes that run, their knobs, and which layers they touch
(module-path globs, a skip list, per-layer overrides). Presets are recipes, not special cases:

    qhl.recipe("w4a16", group_size=64)          # a preset with one knob changed
    Recipe.from_json(r.to_json()) == r          # round-trips

An unknown name or knob raises RecipeError (a ValueError) that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from qhl.codegen.quant import GROUPWISE_CLIPS, WEIGHT_CLIPS
from qhl.errors import RecipeError

__all__ = ["Recipe", "LayerOverride", "recipe", "recipes", "FORMS", "RECIPE_VERSION", "GROUP_SIZE_AUTO"]

RECIPE_VERSION = 1

# Quantized matmul forms this version knows, and what each stores.
FORMS: dict[str, str] = {
    "w8a8": "int8 per-channel weights, dynamic per-token int8 activations",
    "w8a8-tensor": "int8 per-channel weights, dynamic per-tensor uint8 activations (ONNX DynamicQuantizeLinear)",
    "w8a16": "int8 per-channel weights, float activations (weight-only)",
    "w4a16": "int4 group-wise weights, float activations (weight-only)",
    "w4a8": "int4 per-channel weights, dynamic per-token int8 activations",
    "w4a4": "int4 per-channel weights, dynamic per-token 4-bit activations",
    "blocklr": "k x k blocks of float16 truncated-SVD factors, ranks by budget or rank (frozen)",
    "lr-w4a16": "float16 low-rank part + int4 group-wise residual, float activations (frozen)",
}

QUANTIZE_PASSES = ("canonicalize_matmuls", "select_layers", "quantize_linear")
# Default skip list: embeddings are gathers, not matmuls, and lm_head is the most
# quantization-sensitive layer of a causal LM (it is also tied to the embedding in SmolLM2).
DEFAULT_SKIP = ("*embed*", "lm_head", "*.lm_head")
GROUP_SIZES = (32, 64, 128)
# group_size="auto": per layer, the largest of GROUP_SIZES that divides its in_features
GROUP_SIZE_AUTO = "auto"


def resolve_group_size(k: int | None, group_size: int | str, sizes: tuple[int, ...] = GROUP_SIZES) -> int | str:
    """A layer's group size: `group_size` itself, or for "auto" the largest of `sizes` that divides
    k (its in_features). Where none does, the largest size, which the layer's check then declines
    with group_size_advice."""
    if group_size != GROUP_SIZE_AUTO:
        return group_size
    return next((g for g in sorted(sizes, reverse=True) if k and k % g == 0), max(sizes))


def group_size_advice(k: int, group_size: int, sizes: tuple[int, ...] = GROUP_SIZES, auto: bool = True) -> str:
    """Why a layer with in_features k can't take int4 groups of `group_size`, and what would: the
    supported sizes that divide k (SmolLM2's 576 takes 64, not the preset's 128), and "auto"
    where the form takes it."""
    fits = [g for g in sorted(sizes, reverse=True) if k % g == 0 and g % 2 == 0]
    if not fits:  # (whatever was asked for, "auto" included)
        listed = ", ".join(map(str, sizes))
        return f"in_features K={k} is not divisible by any supported group size ({listed}), so it stays float"
    head = f"in_features K={k} is not divisible by group_size={group_size}; "
    others = f" (or {', '.join(map(str, fits[1:]))})" if len(fits) > 1 else ""
    hint = "set it for the recipe or in overrides"
    if auto:
        hint += f", or group_size={GROUP_SIZE_AUTO!r}: per layer, the largest that divides K"
    return head + f"group_size={fits[0]}{others} divides K ({hint})"


ROTATIONS = (None, "online", "offline", "auto")
ADAPTERS = (None, "gralora", "lora")
# Adapter recipes: lower_adapters also runs on the Dynamo graph, before AOTAutograd (so the
# fused op's own backward is what trains); adapter_layers annotates/quantizes the fused calls.
ADAPTER_PASSES = ("lower_adapters", "canonicalize_matmuls", "select_layers", "adapter_layers")
# peft's default GraLoRA/LoRA targets: the attention query and value projections.
ADAPTER_TARGETS = ("*q_proj", "*v_proj", "*.query", "*.value")


@dataclass(frozen=True)
class LayerOverride:
    """Knobs for the layers whose module path matches `glob` (first matching override wins).

    `form=None` with `keep_float=True` leaves the matching layers in float.
    """

    glob: str
    form: str | None = None
    group_size: int | str | None = None
    symmetric: bool | None = None
    keep_float: bool = False

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.glob)


CPU_CODEGENS = ("inductor", "spec")


@dataclass(frozen=True)
class Recipe:
    """What to run, with which knobs, on which layers. Build one with `qhl.recipe(name, **knobs)`."""

    name: str
    passes: tuple[str, ...]
    form: str | None = None
    group_size: int | str = 128  # or "auto" (GROUP_SIZE_AUTO)
    symmetric: bool = True
    # int4 scales: "none" = plain amax round-to-nearest; "mse" = per-group clip ratio with the
    # least squared weight error (helps w4a16 g64 on SmolLM2 a lot, hurts g128); "grid" = per
    # group the closest of three symmetric grids that clip nothing (amax/7 on [-7, 7]; the finest
    # unclipped grid on [-8, 7] and its mirror, a negative scale): the w4a16 preset's default,
    # measured better than plain rounding and torchao's grid on SmolLM2 and MiniLM; "grid_clip" =
    # "grid" plus torchao's amax/7.5, better at g64 and worse at g128 (codegen/quant.py)
    weight_clip: str = "none"
    # Hadamard rotation (issue 5). None: no rotation. "online": y = Q(x H) . Q(W H)^T at every
    # rotated layer; "offline": rotate the residual stream by computational invariance (QuaRot)
    # where the graph is proven invariant, nothing else; "auto": offline where proven, online
    # elsewhere.
    rotation: str | None = None
    # None: the full-size H (K * 2^m) where qhl can build one, else block-diagonal I (x) H_b with
    # the largest power-of-two b in [16, 256] dividing the size; an int b forces I (x) H_b.
    hadamard_block: int | None = None
    # Random +-1 sign flips D (H' = D H), seeded; None: plain H.
    hadamard_seed: int | None = 0
    # "float32": online rotations compute in float32; "activation": in the activation dtype.
    hadamard_dtype: str = "float32"
    # Adapters (issue 6; qhl.prepare, compiler/adapters.py). adapter: None | "gralora" | "lora".
    # r: GraLoRA rank R (peft's r; hybrid adds hybrid_r), k: blocks per side (gralora only),
    # scaling = alpha / (r + hybrid_r), dropout on the adapter's input while training.
    adapter: str | None = None
    r: int = 8
    k: int = 2
    hybrid_r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = DEFAULT_SKIP
    overrides: tuple[LayerOverride, ...] = ()
    verify: bool = False
    # verify mode: a lossy pass may lower the graph's output SQNR to this floor and no further.
    verify_min_sqnr_db: float = 0.0
    # Low-rank compression (forms blocklr, lr-w4a16; passes/lowrank_rules.py): budget = bytes as a
    # fraction of the layer's float16 weight bytes, or an explicit rank (one of the two; neither:
    # blocklr budget 0.25, lr-w4a16 rank 16); lowrank_k = blocklr's k x k grid; lowrank_iters =
    # lr-w4a16's LQ-LoRA alternations (0: the plain SVD split).
    budget: float | None = None
    rank: int | None = None
    lowrank_k: int = 2
    lowrank_iters: int = 0
    # How the torch.compile door runs an inference graph on CPU: "inductor" compiles the rewritten
    # graph whole (fused quantize/dequantize around the int8 GEMMs; runtime/inductor_cpu.py),
    # "spec" runs the GraphModule, each qhl op on its CPU face (no C++ compile; faster to compile).
    cpu_codegen: str = "inductor"
    # In torch.compile's inference graphs: quantized linears that read the same x (q/k/v, gate/up)
    # run as one, their weights concatenated (passes/fuse_sibling_linears.py; exact).
    fuse_siblings: bool = True
    # On a CPU without a fast int8 GEMM (AVX2 alone): w8a8/w4a8/w4a4 at 5+ tokens written into Inductor's
    # graph as a float32 GEMM over the codes, fused with its neighbours (passes/float_codes_gemm.py):
    # faster calls, a longer first compile.
    float_gemm: bool = True
    # On a CPU with a fast int8 GEMM: w4a16 at 1-8 tokens written into Inductor's graph as the face's
    # GEMV over its unpacked codes where Inductor's own decomposition declines (passes/w4a16_codes_gemv.py).
    codes_gemv: bool = True
    version: int = RECIPE_VERSION
    description: str = ""

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in FORMS:
            raise RecipeError(f"unknown form {self.form!r}; valid forms: {sorted(FORMS)}")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise RecipeError(f"weight_clip={self.weight_clip!r}; valid: {list(WEIGHT_CLIPS)}")
        if self.weight_clip in GROUPWISE_CLIPS and self.form in ("w4a8", "w4a4"):
            raise RecipeError(
                f"weight_clip={self.weight_clip!r} is for group-wise int4 (w4a16 and its relatives); {self.form}'s per-channel "
                "int4 takes 'mse' or 'none'"
            )
        if self.rotation not in ROTATIONS:
            raise RecipeError(f"rotation={self.rotation!r}; valid: {list(ROTATIONS)}")
        if self.cpu_codegen not in CPU_CODEGENS:
            raise RecipeError(f"cpu_codegen={self.cpu_codegen!r}; valid: {list(CPU_CODEGENS)}")
        if self.hadamard_dtype not in ("float32", "activation"):
            raise RecipeError(f"hadamard_dtype={self.hadamard_dtype!r}; valid: ['float32', 'activation']")
        self._check_adapter_knobs()
        if self.hadamard_block is not None and (
            self.hadamard_block < 2 or self.hadamard_block & (self.hadamard_block - 1)
        ):
            raise RecipeError(
                f"hadamard_block={self.hadamard_block}: a block-diagonal rotation needs a power of two "
                ">= 2 (e.g. 16, 64, 256), or None for the full size"
            )
        from qhl.passes.lowrank_rules import validate_recipe as _validate_lowrank

        _validate_lowrank(self)
        valid_groups = (*GROUP_SIZES, GROUP_SIZE_AUTO)
        if self.form == "w4a16" and self.group_size not in valid_groups:
            raise RecipeError(
                f"group_size={self.group_size!r} is not supported; valid: {list(valid_groups)} "
                "('auto': per layer, the largest that divides its in_features)"
            )
        for o in self.overrides:
            if o.form is not None and o.form not in FORMS:
                raise RecipeError(f"override {o.glob!r}: unknown form {o.form!r}; valid forms: {sorted(FORMS)}")
            if o.group_size is not None and o.group_size not in valid_groups:
                raise RecipeError(f"override {o.glob!r}: group_size={o.group_size!r}; valid: {list(valid_groups)}")
        from qhl.passes import PASSES  # the one ordered registry of pass names

        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise RecipeError(f"unknown pass(es) {unknown}; valid passes: {list(PASSES)}")

    # --- layer selection --------------------------------------------------------------------
    def layer_knobs(self, path: str) -> tuple[dict[str, Any] | None, str | None]:
        """The knobs for one module path, or (None, reason) when the recipe leaves it float."""
        for o in self.overrides:
            if o.matches(path):
                if o.keep_float:
                    return None, f"override {o.glob!r} keeps this layer float"
                return {
                    **self._base_knobs(),
                    "form": o.form or self.form,
                    "group_size": o.group_size or self.group_size,
                    "symmetric": self.symmetric if o.symmetric is None else o.symmetric,
                }, None
        for pattern in self.skip:
            if fnmatch.fnmatchcase(path, pattern):
                return None, f"in the recipe's skip list ({pattern!r})"
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in self.include):
            return None, f"not matched by the recipe's include globs {list(self.include)}"
        if self.form is None and self.rotation is None and self.adapter is None:
            return None, "the recipe has no matmul form"
        return self._base_knobs(), None

    def _check_adapter_knobs(self) -> None:
        # r % k, in % k and out % k are per-layer rules: a layer that breaks them is declined
        # with the reason (compiler/adapters.py), so they are not errors here.
        if self.adapter not in ADAPTERS:
            raise RecipeError(f"adapter={self.adapter!r}; valid: {list(ADAPTERS)}")
        for name, low in (("r", 1), ("k", 1), ("hybrid_r", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecipeError(f"{name}={value!r}; valid: an integer >= {low}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise RecipeError(f"dropout={self.dropout!r}; valid: a probability in [0, 1)")
        if not float(self.alpha) > 0.0:
            raise RecipeError(f"alpha={self.alpha!r}; valid: a number > 0")

    def _base_knobs(self) -> dict[str, Any]:
        """The per-layer knobs every selected layer starts from (overrides change some)."""
        knobs = {
            "form": self.form,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "weight_clip": self.weight_clip,
        }
        if self.rotation is not None:
            knobs.update(
                rotation=self.rotation,
                rotation_block=self.hadamard_block,
                hadamard_seed=self.hadamard_seed,
                hadamard_dtype=self.hadamard_dtype,
            )
        if self.adapter is not None:
            knobs.update(
                adapter=self.adapter, r=self.r, k=self.k, hybrid_r=self.hybrid_r,
                alpha=self.alpha, dropout=self.dropout,
            )
        if self.form in ("blocklr", "lr-w4a16") or any(o.form in ("blocklr", "lr-w4a16") for o in self.overrides):
            knobs.update(budget=self.budget, rank=self.rank, lowrank_k=self.lowrank_k, lowrank_iters=self.lowrank_iters)
        return knobs

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"] = list(self.passes)
        d["include"] = list(self.include)
        d["skip"] = list(self.skip)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {unknown}; valid fields: {sorted(known)}")
        if d.get("version", RECIPE_VERSION) != RECIPE_VERSION:
            raise RecipeError(f"recipe version {d['version']} is not supported (this qhl reads {RECIPE_VERSION})")
        d = dict(d)
        for key in ("passes", "include", "skip"):
            if key in d:
                d[key] = tuple(d[key])
        if "overrides" in d:
            d["overrides"] = tuple(LayerOverride(**o) for o in d["overrides"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))


def _preset(name: str, form: str | None, description: str, **kw: Any) -> Recipe:
    return Recipe(name=name, passes=QUANTIZE_PASSES, form=form, description=description, **kw)


_PRESETS: dict[str, Recipe] = {}


ROTATE_PASSES = (
    "canonicalize_matmuls", "select_layers", "rotate_residual", "rotate_online", "quantize_linear",
    "fold_weight_transforms",
)


def _rotation_presets() -> dict[str, Recipe]:
    """hadamard (rotation only, outputs unchanged) and the rotated quantized forms."""
    out = {
        "hadamard": Recipe(
            name="hadamard",
            passes=tuple(p for p in ROTATE_PASSES if p != "quantize_linear"),
            rotation="auto",
            description="Hadamard rotation only (offline residual where proven, online elsewhere); "
            "outputs unchanged",
        )
    }
    # Defaults measured on SmolLM2-135M (benchmarks/results/hadamard_fidelity.md):
    # * rotation="online" beat "auto" (offline residual + online) on every form: folding the
    #   RMSNorm scales into the readers costs more than the offline rotation saves, in the
    #   activation term as much as the weight term, and with GPTQ weights too
    #   (benchmarks/results/rotation_fold_cost.md, docs/hadamard.md). "auto" and "offline" stay
    #   available as knobs.
    # * int4 weights get weight_clip="mse": rotated rows are near-Gaussian, where a clipped scale
    #   wins (hadamard-w4a8 ppl 87 -> 60), while on unrotated rows (sparse outliers) it loses.
    for form in ("w8a8", "w4a8", "w4a4", "w4a16"):
        name = f"hadamard-{form}"
        out[name] = Recipe(
            name=name, passes=ROTATE_PASSES, form=form, rotation="online",
            weight_clip="mse" if form != "w8a8" else "none",
            description=f"Hadamard-rotated {form}: {FORMS[form]}",
        )
    return out


def _presets() -> dict[str, Recipe]:
    # Built lazily: Recipe validation imports qhl.passes, which imports this module's types.
    if not _PRESETS:
        _PRESETS.update(
            {
                "w8a8": _preset("w8a8", "w8a8", FORMS["w8a8"]),
                # ORT's fused DynamicQuantizeMatMul path; per-tensor activations suit encoders, not LLMs
                "w8a8-tensor": _preset("w8a8-tensor", "w8a8-tensor", FORMS["w8a8-tensor"]),
                "w8a16": _preset("w8a16", "w8a16", FORMS["w8a16"]),
                # weight_clip="grid": measured better than plain rounding and than torchao's int4
                # grid on SmolLM2 (g64 and g128, six windows each) and MiniLM (codegen/quant.py).
                "w4a16": _preset("w4a16", "w4a16", FORMS["w4a16"], weight_clip="grid"),
                "w4a8": _preset("w4a8", "w4a8", FORMS["w4a8"]),
                "w4a4": _preset("w4a4", "w4a4", FORMS["w4a4"]),
                "blocklr": _preset("blocklr", "blocklr", FORMS["blocklr"]),
                "lr-w4a16": _preset("lr-w4a16", "lr-w4a16", FORMS["lr-w4a16"], group_size=64),
                "float": Recipe(
                    name="float",
                    passes=("canonicalize_matmuls", "select_layers"),
                    form=None,
                    description="capture and canonicalize only; every layer stays float",
                ),
            }
        )
        _PRESETS.update(_adapter_presets())
        _PRESETS.update(_rotation_presets())
    return _PRESETS


def _adapter_presets() -> dict[str, Recipe]:
    """gralora / lora / gralora-w4a16 / gralora-merged (issue 6; compiler/adapters.py)."""
    merged = ("lower_adapters", "merge_adapters", "canonicalize_matmuls", "select_layers", "adapter_layers")
    kw: dict[str, Any] = {"include": ADAPTER_TARGETS}
    return {
        "gralora": Recipe(name="gralora", passes=ADAPTER_PASSES, adapter="gralora", **kw,
                          description="GraLoRA adapters (k x k sub-block low rank) fused with a float base matmul"),
        "lora": Recipe(name="lora", passes=ADAPTER_PASSES, adapter="lora", **kw,
                       description="LoRA adapters fused with a float base matmul"),
        "gralora-w4a16": Recipe(name="gralora-w4a16", passes=ADAPTER_PASSES, adapter="gralora", form="w4a16",
                                group_size=64, **kw,
                                description="GraLoRA adapters on a frozen int4 group-wise base (QLoRA style)"),
        "gralora-merged": Recipe(name="gralora-merged", passes=merged, adapter="gralora", **kw,
                                 description="GraLoRA/LoRA adapters folded into float weights (W + dW) for deployment"),
    }


DEFAULT_RECIPE = "w8a8"
# Knobs a user may set through qhl.recipe(name, **knobs). `form` and `passes` are set by the preset.
KNOBS = (
    "group_size", "symmetric", "weight_clip", "include", "skip", "overrides", "verify", "verify_min_sqnr_db",
    "rotation", "hadamard_block", "hadamard_seed", "hadamard_dtype",
    "adapter", "r", "k", "hybrid_r", "alpha", "dropout",
    "budget", "rank", "lowrank_k", "lowrank_iters", "cpu_codegen",
    "fuse_siblings", "float_gemm", "codes_gemv",
)


def recipes() -> list[str]:
    """The names of the preset recipes."""
    return sorted(_presets())


def recipe(name: str | Recipe = DEFAULT_RECIPE, **knobs: Any) -> Recipe:
    """A preset recipe by name, with knobs changed. Raises RecipeError listing valid names/knobs."""
    if isinstance(name, Recipe):
        base = name
    else:
        presets = _presets()
        if name not in presets:
            raise RecipeError(f"unknown recipe {name!r}; valid recipes: {sorted(presets)}")
        base = presets[name]
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise RecipeError(f"unknown knob(s) {unknown} for recipe {base.name!r}; valid knobs: {list(KNOBS)}")
    if "overrides" in knobs:
        knobs["overrides"] = tuple(
            o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in knobs["overrides"]
        )
    for key in ("include", "skip"):
        if key in knobs and isinstance(knobs[key], str):
            knobs[key] = (knobs[key],)
        elif key in knobs:
            knobs[key] = tuple(knobs[key])
    return dataclasses.replace(base, **knobs)

