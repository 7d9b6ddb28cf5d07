"""Adapters a user trains: qhl.prepare, qhl.merge, qhl.load_adapter (issue 6, techniques.md section 3).

    model = qhl.prepare(model, "gralora", r=8, k=2)      # adapters on q/v projections, base frozen
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    step = torch.compile(model, backend="qhl", options={"recipe": "gralora"})
    print(model.qhl_adapters)                            # which layers got adapters, which did not and why
    qhl.merge(model)                                     # W <- W + dW, plain nn.Linear again (deployment)
    qhl.load_adapter(model, "adapter_dir")               # a peft save_pretrained directory

Layout is peft's, so state dicts and adapter directories carry over: a prepared layer keeps its
frozen nn.Linear as `base_layer` and holds `gralora_A.default` [k, in/k, R] (each block Kaiming-
uniform, a = sqrt(5)), `gralora_B.default` [k, R, out/k] (zeros), optionally the hybrid branch
`gralora_A_general.default.weight` [hr, in] / `gralora_B_general.default.weight` [out, hr], or, for
LoRA, `lora_A.default.weight` [r, in] / `lora_B.default.weight` [out, r]. Scaling is peft's:
alpha / (r + hybrid_r) for GraLoRA, alpha / r for LoRA. Trainable parameters per layer:
r (in + out) (+ hybrid_r (in + out)), the same as LoRA of rank r.

The eager forward calls the fused op (qhl::gralora_linear) directly, so a prepared model runs
and trains with or without torch.compile. A layer that breaks GraLoRA's divisibility rules
(in % k, out % k, r % k) stays as it was; the reason is in `model.qhl_adapters.declined` and in
qhl.inspect's layer table.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qhl.errors import AdapterError, RecipeError, UnsupportedError
from qhl.recipes import Recipe
from qhl.recipes import recipe as make_recipe

__all__ = [
    "AdapterLinear",
    "PrepareReport",
    "prepare",
    "merge",
    "load_adapter",
    "adapter_rule_reason",
    "adapter_delta_weight",
    "ADAPTER_PARAM_MARKERS",
]

log = logging.getLogger(__name__)

# Substrings that mark a parameter as an adapter's (peft's and ours: the same names).
ADAPTER_PARAM_MARKERS = (".gralora_A", ".gralora_B", ".lora_A", ".lora_B")
PREPARE_ATTR = "qhl_adapters"


def adapter_rule_reason(in_features: int, out_features: int, knobs: dict[str, Any]) -> str | None:
    """Why a [out, in] layer cannot take the recipe's adapter (None when it can)."""
    if knobs.get("adapter") != "gralora":
        return None
    r, k = int(knobs["r"]), int(knobs["k"])
    sizes = (("in", in_features), ("out", out_features), ("r", r))
    broken = [f"{name}={v} % k={k} = {v % k}" for name, v in sizes if v % k]
    if broken:
        return "GraLoRA needs in, out and r divisible by k: " + ", ".join(broken)
    return None


def _scaling(kind: str, r: int, hybrid_r: int, alpha: float) -> float:
    return float(alpha) / (r + hybrid_r) if kind == "gralora" else float(alpha) / r


class AdapterLinear(nn.Module):
    """A frozen nn.Linear plus a trainable GraLoRA (or LoRA) adapter, forward through the fused op."""

    def __init__(self, base: nn.Linear, kind: str, r: int, k: int = 2, hybrid_r: int = 0,
                 alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if kind not in ("gralora", "lora"):
            raise RecipeError(f"adapter={kind!r}; valid: ['gralora', 'lora']")
        reason = adapter_rule_reason(base.in_features, base.out_features, {"adapter": kind, "r": r, "k": k})
        if reason is not None:
            raise UnsupportedError(reason)
        self.base_layer = base
        self.kind, self.r, self.k = kind, r, (k if kind == "gralora" else 1)
        self.hybrid_r = hybrid_r if kind == "gralora" else 0
        self.alpha, self.dropout_p = float(alpha), float(dropout)
        self.scaling = _scaling(kind, r, self.hybrid_r, alpha)
        in_f, out_f = base.in_features, base.out_features
        w = base.weight
        dd = {"device": w.device, "dtype": w.dtype}
        if kind == "gralora":
            a = torch.empty(self.k, in_f // self.k, r, **dd)
            for n in range(self.k):  # A_n in R^{R x in/k}, Kaiming-uniform(a=sqrt(5)), stored transposed
                block = torch.empty(r, in_f // self.k, **dd)
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                a[n] = block.t()
            self.gralora_A = nn.ParameterDict({"default": nn.Parameter(a)})
            self.gralora_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(self.k, r, out_f // self.k, **dd))})
            if self.hybrid_r:
                self.gralora_A_general = nn.ModuleDict({"default": nn.Linear(in_f, self.hybrid_r, bias=False, **dd)})
                self.gralora_B_general = nn.ModuleDict({"default": nn.Linear(self.hybrid_r, out_f, bias=False, **dd)})
                nn.init.zeros_(self.gralora_B_general["default"].weight)
        else:
            self.lora_A = nn.ModuleDict({"default": nn.Linear(in_f, r, bias=False, **dd)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_f, bias=False, **dd)})
            nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B["default"].weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(lora_a [k, in/k, R], lora_b [k, R, out/k], hybrid_a, hybrid_b) in the fused op's layout."""
        if self.kind == "lora":
            return self.lora_A["default"].weight.t()[None], self.lora_B["default"].weight.t()[None], None, None
        ha = hb = None
        if self.hybrid_r:
            ha, hb = self.gralora_A_general["default"].weight, self.gralora_B_general["default"].weight
        return self.gralora_A["default"], self.gralora_B["default"], ha, hb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import qhl.codegen  # noqa: F401  (registers qhl::gralora_linear)

        x_adapter = F.dropout(x, self.dropout_p, training=True) if self.training and self.dropout_p > 0 else None
        a, b, ha, hb = self.adapter_tensors()
        return torch.ops.qhl.gralora_linear(
            x, self.base_layer.weight, self.base_layer.bias, a, b, ha, hb, self.scaling, x_adapter
        )

    def delta_weight(self) -> torch.Tensor:
        a, b, ha, hb = self.adapter_tensors()
        return adapter_delta_weight(a, b, ha, hb, self.scaling)

    def extra_repr(self) -> str:
        extra = f", hybrid_r={self.hybrid_r}" if self.hybrid_r else ""
        return f"{self.kind}: r={self.r}, k={self.k}{extra}, scaling={self.scaling:.4g}, dropout={self.dropout_p}"


def adapter_delta_weight(lora_a, lora_b, hybrid_a, hybrid_b, scaling: float) -> torch.Tensor:
    """dW [out, in] of an adapter in the fused op's layout (qhl.codegen.gralora.gralora_delta_weight)."""
    from qhl.codegen.gralora import gralora_delta_weight

    return gralora_delta_weight(lora_a, lora_b, hybrid_a, hybrid_b, scaling)


@dataclass
class PrepareReport:
    """What qhl.prepare did: `model.qhl_adapters`."""

    recipe: Recipe
    adapted: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (in, out)
    declined: dict[str, str] = field(default_factory=dict)  # path -> reason
    trainable_params: int = 0
    note: str = ""

    def __str__(self) -> str:
        lines = [
            f"qhl.prepare: recipe {self.recipe.name!r} ({self.recipe.adapter}, r={self.recipe.r}, k={self.recipe.k}, "
            f"hybrid_r={self.recipe.hybrid_r}): {len(self.adapted)} layers adapted, {len(self.declined)} declined, "
            f"{self.trainable_params} trainable parameters" + (f"; {self.note}" if self.note else "")
        ]
        lines += [f"  {p}: declined: {why}" for p, why in self.declined.items()]
        return "\n".join(lines)


def _has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterLinear) for m in model.modules()) or any(
        _is_adapter_param(n) for n, _ in model.named_parameters()
    )


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _is_adapter_param(name: str) -> bool:
    return any(mark in "." + name for mark in ADAPTER_PARAM_MARKERS)


def prepare(model: nn.Module, recipe: str | Recipe = "gralora", **knobs: Any) -> nn.Module:
    """Attach the recipe's adapters to the selected nn.Linear layers, freeze everything else.

    Layers are chosen by the recipe's include/skip globs (default: q/v projections). Returns the
    same model object, modified in place, with `model.qhl_adapters` (a PrepareReport). A model that
    already carries adapters (qhl's or peft's) gets nothing new attached. Raises AdapterError
    when no layer would get an adapter (none matched, or every match declined), as peft does.
    """
    rec = make_recipe(recipe, **knobs)
    if rec.adapter is None:
        raise RecipeError(f"recipe {rec.name!r} has no adapter; adapter recipes: ['gralora', 'lora', 'gralora-w4a16']")
    report = PrepareReport(rec)
    if _has_adapters(model):
        report.note = "the model already has adapters; nothing new attached"
        log.info("qhl.prepare: %s", report.note)
    else:
        targets = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p]
        for path, module in targets:
            layer, reason = rec.layer_knobs(path)
            if layer is None:
                if reason.startswith("not matched by"):
                    continue  # layers the recipe never meant to touch are not listed
                report.declined[path] = reason
                continue
            reason = adapter_rule_reason(module.in_features, module.out_features, layer)
            if reason is not None:
                report.declined[path] = reason
                log.info("qhl.prepare: %s stays as it was: %s", path, reason)
                continue
            _set_submodule(model, path, AdapterLinear(
                module, rec.adapter, rec.r, rec.k, rec.hybrid_r, rec.alpha, rec.dropout))
            report.adapted[path] = (module.in_features, module.out_features)
        if not report.adapted:
            raise AdapterError(_nothing_adapted(rec, targets, report.declined))
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    setattr(model, PREPARE_ATTR, report)
    log.info("%s", report)
    return model


def _nothing_adapted(rec: Recipe, targets: list[tuple[str, nn.Module]], declined: dict[str, str]) -> str:
    """Why prepare() attached no adapter (raised, as peft does: an optimizer over no parameters
    would otherwise train nothing, silently)."""
    if not targets:
        return (f"qhl.prepare({rec.name!r}): the model has no nn.Linear submodule, so no adapter was "
                "attached; adapters wrap nn.Linear layers")
    if declined:
        path, reason = next(iter(declined.items()))
        return (f"qhl.prepare({rec.name!r}): every layer the recipe selected declined its adapter "
                f"({len(declined)}; e.g. {path}: {reason}); change r/k/hybrid_r, or include other layers")
    sample = ", ".join(p for p, _ in targets[:4]) + (", ..." if len(targets) > 4 else "")
    return (f"qhl.prepare({rec.name!r}): no nn.Linear path matches include={list(rec.include)} "
            f"(the model's linears: {sample}); pass include=[...] globs that match the layers to adapt")


# --- merge -------------------------------------------------------------------------------------------


def _peft_adapter_tensors(module: nn.Module):
    """(lora_a, lora_b, hybrid_a, hybrid_b, scaling) of a peft GraLoRA/LoRA layer, fused-op layout."""
    names = list(getattr(module, "active_adapters", None) or ["default"])
    if len(names) != 1:
        raise UnsupportedError(f"{type(module).__name__} has {len(names)} active adapters; qhl merges exactly one")
    name = names[0]
    scaling = float(module.scaling[name])
    if hasattr(module, "gralora_A"):
        ha = hb = None
        if getattr(module, "hybrid_r", {}).get(name, 0):
            ha, hb = module.gralora_A_general[name].weight, module.gralora_B_general[name].weight
        return module.gralora_A[name], module.gralora_B[name], ha, hb, scaling
    return module.lora_A[name].weight.t()[None], module.lora_B[name].weight.t()[None], None, None, scaling


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter (qhl.prepare's or peft's GraLoRA/LoRA) into its base weight, W + dW, and
    put the plain base nn.Linear back in its place. Returns the same model object."""
    merged = 0
    for path, module in list(model.named_modules()):
        if isinstance(module, AdapterLinear):
            a, b, ha, hb = module.adapter_tensors()
            scaling, base, fan_in_fan_out = module.scaling, module.base_layer, False
        elif hasattr(module, "base_layer") and (hasattr(module, "gralora_A") or hasattr(module, "lora_A")):
            if getattr(module, "merged", False):
                continue
            a, b, ha, hb, scaling = _peft_adapter_tensors(module)
            base, fan_in_fan_out = module.base_layer, bool(getattr(module, "fan_in_fan_out", False))
        else:
            continue
        dw = adapter_delta_weight(a.float(), b.float(), None if ha is None else ha.float(),
                                  None if hb is None else hb.float(), scaling)
        w = base.weight
        w.copy_((w.float() + (dw.t() if fan_in_fan_out else dw)).to(w.dtype))
        _set_submodule(model, path, base)
        merged += 1
    log.info("qhl.merge: %d adapter(s) folded into their base weights", merged)
    if hasattr(model, PREPARE_ATTR):
        getattr(model, PREPARE_ATTR).note = f"merged ({merged} layers)"
    return model


# --- loading a peft adapter directory ----------------------------------------------------------------


def _read_adapter_dir(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{str(path)!r} is not a peft adapter directory: no adapter_config.json")
    config = json.loads(cfg_file.read_text())
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(st))
    elif binf.is_file():
        tensors = torch.load(str(binf), map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{str(path)!r} has no adapter_model.safetensors or adapter_model.bin")
    return config, tensors


def recipe_from_peft_config(config: dict[str, Any]) -> Recipe:
    """The qhl recipe that attaches the same adapter as a peft GraloraConfig/LoraConfig (as a dict)."""
    kind = str(config.get("peft_type", "")).upper()
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise AdapterError(f"target_modules={targets!r} (a regex) is not supported; give a list of module names")
    include = tuple(f"*{t}" if "." not in t else t for t in targets) or None
    extra = {"include": include} if include else {}
    if kind == "GRALORA":
        return make_recipe("gralora", r=int(config["r"]), k=int(config.get("gralora_k", 2)),
                           hybrid_r=int(config.get("hybrid_r", 0)), alpha=float(config["alpha"]),
                           dropout=float(config.get("gralora_dropout", 0.0)), **extra)
    if kind == "LORA":
        if config.get("use_rslora") or config.get("use_dora"):
            raise AdapterError("LoRA with use_rslora/use_dora is not supported by qhl.load_adapter")
        return make_recipe("lora", r=int(config["r"]), alpha=float(config["lora_alpha"]),
                           dropout=float(config.get("lora_dropout", 0.0)), **extra)
    raise AdapterError(f"peft_type {kind!r} is not supported; qhl loads GRALORA and LORA adapters")


def _model_key(saved_key: str) -> str:
    """peft's saved key (adapter name removed) -> the parameter name under adapter "default"."""
    for attr in ("gralora_A_general", "gralora_B_general", "lora_A", "lora_B"):
        marker = f".{attr}."
        if marker in saved_key:
            return saved_key.replace(marker, f".{attr}.default.", 1)
    for attr in ("gralora_A", "gralora_B"):
        if saved_key.endswith("." + attr):
            return saved_key + ".default"
    return saved_key


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | pathlib.Path, recipe: str | Recipe | None = None) -> nn.Module:
    """Load a peft adapter directory (save_pretrained output) into `model`.

    A model without adapters is first prepared with `recipe`, or, when recipe is None, with the
    recipe built from the directory's adapter_config.json. Every saved tensor must find a model
    adapter parameter of the same shape, and every model adapter parameter must be in the file;
    otherwise AdapterError names the first mismatched key (in sorted order) and nothing is copied.
    """
    path = pathlib.Path(path)
    config, tensors = _read_adapter_dir(path)
    if not _has_adapters(model):
        prepare(model, recipe if recipe is not None else recipe_from_peft_config(config))
    params = {n: p for n, p in model.named_parameters() if _is_adapter_param(n)}
    prefixes = ("", "base_model.model.")
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    used = set()
    for key in sorted(tensors):
        name = _model_key(key)
        target = next((name[len(p):] for p in prefixes if name.startswith(p) and name[len(p):] in params), None)
        if target is None and name in params:
            target = name
        if target is None:
            raise AdapterError(
                f"adapter key {key!r} in {str(path)!r} matches no adapter parameter of the model "
                f"(looked for {name!r}); the adapter was saved from a different model or target_modules"
            )
        if tuple(tensors[key].shape) != tuple(params[target].shape):
            raise AdapterError(
                f"adapter key {key!r} has shape {tuple(tensors[key].shape)}, but the model's {target!r} is "
                f"{tuple(params[target].shape)} (different r, k, hybrid_r or layer sizes)"
            )
        plan.append((params[target], tensors[key]))
        used.add(target)
    missing = sorted(set(params) - used)
    if missing:
        raise AdapterError(f"model adapter parameter {missing[0]!r} is not in {str(path)!r} ({len(missing)} missing)")
    for p, t in plan:
        p.copy_(t.to(p.dtype))
    log.info("qhl.load_adapter: %d tensors from %s", len(plan), path)
    return model
