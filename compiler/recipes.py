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

from qhl.errors import RecipeError

__all__ = ["Recipe", "LayerOverride", "recipe", "recipes", "FORMS", "RECIPE_VERSION"]

RECIPE_VERSION = 1

# Quantized matmul forms this version knows, and what each stores.
FORMS: dict[str, str] = {
    "w8a8": "int8 per-channel weights, dynamic per-token int8 activations",
    "w8a16": "int8 per-channel weights, float activations (weight-only)",
    "w4a16": "int4 group-wise weights, float activations (weight-only)",
}

QUANTIZE_PASSES = ("canonicalize_matmuls", "select_layers", "quantize_linear")
# Default skip list: embeddings are gathers, not matmuls, and lm_head is the most
# quantization-sensitive layer of a causal LM (it is also tied to the embedding in SmolLM2).
DEFAULT_SKIP = ("*embed*", "lm_head", "*.lm_head")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class LayerOverride:
    """Knobs for the layers whose module path matches `glob` (first matching override wins).

    `form=None` with `keep_float=True` leaves the matching layers in float.
    """

    glob: str
    form: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    keep_float: bool = False

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.glob)


@dataclass(frozen=True)
class Recipe:
    """What to run, with which knobs, on which layers. Build one with `qhl.recipe(name, **knobs)`."""

    name: str
    passes: tuple[str, ...]
    form: str | None = None
    group_size: int = 128
    symmetric: bool = True
    # int4 scales: "none" = plain amax round-to-nearest; "mse" = per-group clip ratio with the
    # least squared weight error (helps w4a16 g64 on SmolLM2 a lot, hurts g128: see codegen/quant.py)
    weight_clip: str = "none"
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = DEFAULT_SKIP
    overrides: tuple[LayerOverride, ...] = ()
    verify: bool = False
    # verify mode: a lossy pass may lower the graph's output SQNR to this floor and no further.
    verify_min_sqnr_db: float = 0.0
    version: int = RECIPE_VERSION
    description: str = ""

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in FORMS:
            raise RecipeError(f"unknown form {self.form!r}; valid forms: {sorted(FORMS)}")
        if self.weight_clip not in ("mse", "none"):
            raise RecipeError(f"weight_clip={self.weight_clip!r}; valid: ['mse', 'none']")
        if self.form == "w4a16" and self.group_size not in GROUP_SIZES:
            raise RecipeError(
                f"group_size={self.group_size} is not supported; valid: {list(GROUP_SIZES)}"
            )
        for o in self.overrides:
            if o.form is not None and o.form not in FORMS:
                raise RecipeError(f"override {o.glob!r}: unknown form {o.form!r}; valid forms: {sorted(FORMS)}")
            if o.group_size is not None and o.group_size not in GROUP_SIZES:
                raise RecipeError(f"override {o.glob!r}: group_size={o.group_size}; valid: {list(GROUP_SIZES)}")
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
                    "form": o.form or self.form,
                    "group_size": o.group_size or self.group_size,
                    "symmetric": self.symmetric if o.symmetric is None else o.symmetric,
                    "weight_clip": self.weight_clip,
                }, None
        for pattern in self.skip:
            if fnmatch.fnmatchcase(path, pattern):
                return None, f"in the recipe's skip list ({pattern!r})"
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in self.include):
            return None, f"not matched by the recipe's include globs {list(self.include)}"
        if self.form is None:
            return None, "the recipe has no matmul form"
        return {
            "form": self.form,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "weight_clip": self.weight_clip,
        }, None

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


def _presets() -> dict[str, Recipe]:
    # Built lazily: Recipe validation imports qhl.passes, which imports this module's types.
    if not _PRESETS:
        _PRESETS.update(
            {
                "w8a8": _preset("w8a8", "w8a8", FORMS["w8a8"]),
                "w8a16": _preset("w8a16", "w8a16", FORMS["w8a16"]),
                "w4a16": _preset("w4a16", "w4a16", FORMS["w4a16"]),
                "float": Recipe(
                    name="float",
                    passes=("canonicalize_matmuls", "select_layers"),
                    form=None,
                    description="capture and canonicalize only; every layer stays float",
                ),
            }
        )
    return _PRESETS


DEFAULT_RECIPE = "w8a8"
# Knobs a user may set through qhl.recipe(name, **knobs). `form` and `passes` are set by the preset.
KNOBS = ("group_size", "symmetric", "weight_clip", "include", "skip", "overrides", "verify", "verify_min_sqnr_db")


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

