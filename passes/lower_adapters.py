"""lower_adapters: a layer's base matmul + its GraLoRA/LoRA adapter -> one qhl.gralora_linear call.

    result = linear(x, W, b)                                  (the adapted layer's frozen base)
    result += s * einsum(.. einsum(.. dropout(x) ..) ..)      (peft GraLoRA: + s * hybrid path)
    result  = result + lora_B(lora_A(dropout(x))) * s         (peft LoRA)
        ->  qhl.gralora_linear(x, W, b, A, B, hA, hB, s, x_adapter)
            (LoRA: A = lora_A.T[None], B = lora_B.T[None]; x_adapter = dropout(x) when dropout is live)

Adapters are found by their parameters' paths (peft's and qhl.prepare's names are the same):
`<layer>.base_layer.weight` with `<layer>.gralora_A.<name>` / `<layer>.gralora_B.<name>` (and
`<layer>.gralora_{A,B}_general.<name>.weight`), or `<layer>.lora_{A,B}.<name>.weight`. Nothing
about the adapter's internal graph (einsum strings, views, casts) is assumed. The match is:
  1. the base linear that reads `base_layer.weight`, then the chain of adds on its output (the
     layer's result); every other input of that chain is the adapter's computation;
  2. that computation may read only x (directly, through casts, or through dropout of x), the
     adapter's parameters and shape symbols;
  3. it is checked numerically, on random adapter values (so B = 0 at init proves nothing is
     skipped): with zero adapters the chain must equal x W^T + b, and with random ones the change
     must be a multiple s of qhl's adapter (the op's spec) to 1e-4; s is the graph's own scaling
     constant when one matches.
A layer that fails any step stays exactly as it was; the reason is logged, counted, and kept in
`gm.meta["qhl_adapter_declined"]` (path -> reason) for the layer table.

Runs on the Dynamo (torch-level) graph before AOTAutograd, so the fused op's backward is what a
training step runs, and on torch.export's ATen graph (inspect, ONNX). Idempotent: a fused call
is left alone. Live dropout (training) stays in the graph and feeds x_adapter; peft's hybrid
branch draws its own dropout mask, the fused op uses the GraLoRA branch's for both (logged).
"""
from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

import qhl.codegen  # noqa: F401  (registers qhl::gralora_linear)
from qhl.graph import WEIGHT_META, aten, val
from qhl.passes.base import PassResult

__all__ = ["lower_adapters", "AdapterInfo", "ADAPTER_META", "DECLINED_META", "GRAPH_KIND_META", "FUSED_OPS"]

log = logging.getLogger(__name__)

ADAPTER_META = "qhl_adapter"  # on a fused call: AdapterInfo
DECLINED_META = "qhl_adapter_declined"  # gm.meta: {layer path: reason}
# gm.meta: "forward" | "backward" | "inference" (set by the torch.compile door). A backward graph
# holds no layer forward to lower (its adapter parameters feed gradient formulas).
GRAPH_KIND_META = "qhl_graph_kind"
FUSED_OPS = (torch.ops.qhl.gralora_linear.default, torch.ops.qhl.gralora_w4a16_linear.default)
_LINEARS = {torch._C._nn.linear, F.linear, aten.linear.default}
_ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_DROPOUTS = {F.dropout, torch.dropout, aten.dropout.default}
_CAST_METHODS = {"to", "type_as", "float", "contiguous"}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.contiguous.default, aten.clone.default}
# Nodes that only check metadata (torch.export inserts them after casts): ignored as users.
_CHECKS = {aten._assert_tensor_metadata.default}
_REL_TOL = 1e-4  # float32 noise of two summation orders of the same adapter, with margin


@dataclass
class AdapterInfo:
    """What lower_adapters fused at one layer."""

    path: str
    kind: str  # "gralora" | "lora"
    k: int
    r: int
    hybrid_r: int
    scaling: float
    dropout: bool = False


def _is(node: Any, targets: set, methods: set = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _CHECKS)]


def _live_dropout(node: fx.Node) -> bool:
    """A dropout node that is random at run time (training and p > 0)."""
    if not _is(node, _DROPOUTS):
        return False
    args = list(node.args) + [None] * 3
    p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
    train = node.kwargs.get("train", node.kwargs.get("training", args[2] if args[2] is not None else True))
    return bool(train) and float(p) > 0


def _cast_of(node: Any, x: fx.Node, chain: set[fx.Node]) -> bool:
    """node is x, or x through casts only (the casts are added to `chain`)."""
    while isinstance(node, fx.Node):
        if node is x:
            return True
        if not (_is(node, _CASTS, _CAST_METHODS)):
            return False
        chain.add(node)
        node = node.args[0]
    return False


def _aliases(x: fx.Node) -> set[fx.Node]:
    """Nodes holding x's values in x's dtype: x, what x is a cast of, and casts of those.

    torch.export records a no-op `x.to(float32)` as a node, and peft reads the layer input both
    through it and not, so the base matmul and the adapter may see different nodes of one value."""
    dtype = getattr(val(x), "dtype", None)
    root = x
    while _is(root, _CASTS, _CAST_METHODS) and isinstance(root.args[0], fx.Node) \
            and getattr(val(root.args[0]), "dtype", None) == dtype:
        root = root.args[0]
    out, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo.extend(u for u in n.users if _is(u, _CASTS, _CAST_METHODS) and getattr(val(u), "dtype", None) == dtype)
    return out


def _adapter_groups(weights: dict[str, fx.Node]) -> dict[str, dict[str, Any]]:
    """layer path -> {kind, names: {role: node}} for every adapter whose parameters are in the graph."""
    groups: dict[str, dict[str, Any]] = {}
    for path in weights:
        m = re.match(r"^(?P<mod>.+)\.gralora_A\.(?P<name>[^.]+)$", path)
        if m:
            mod, name = m["mod"], m["name"]
            groups.setdefault(mod, {"kind": "gralora", "adapters": set()})["adapters"].add(name)
            continue
        m = re.match(r"^(?P<mod>.+)\.lora_A\.(?P<name>[^.]+)\.weight$", path)
        if m:
            groups.setdefault(m["mod"], {"kind": "lora", "adapters": set()})["adapters"].add(m["name"])
    for mod, g in groups.items():
        name = sorted(g["adapters"])[0]
        g["name"] = name
        if g["kind"] == "gralora":
            roles = {"a": f"{mod}.gralora_A.{name}", "b": f"{mod}.gralora_B.{name}",
                     "ha": f"{mod}.gralora_A_general.{name}.weight", "hb": f"{mod}.gralora_B_general.{name}.weight"}
        else:
            roles = {"a": f"{mod}.lora_A.{name}.weight", "b": f"{mod}.lora_B.{name}.weight"}
        roles.update(w=f"{mod}.base_layer.weight", bias=f"{mod}.base_layer.bias")
        g["nodes"] = {role: weights.get(p) for role, p in roles.items()}
    return groups


def _already_fused(node: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in FUSED_OPS:
                return True
            if u not in seen and len(seen) < 8:
                seen.add(u)
                todo.append(u)
    return False


def _concrete(shape) -> list[int]:
    out = []
    for d in shape:
        out.append(int(d) if isinstance(d, int) else int(d.node.hint))
    return out


def _subgraph(gm: fx.GraphModule, final: fx.Node, leaves: list[fx.Node], stop: set[fx.Node]):
    """Nodes computing `final` from `leaves` (stopping there), or a reason."""
    body: set[fx.Node] = set()
    extra: list[fx.Node] = []
    todo = [final]
    while todo:
        n = todo.pop()
        if n in body or n in stop:
            continue
        if n.op in ("placeholder", "get_attr"):
            v = val(n)
            if isinstance(v, torch.Tensor) or WEIGHT_META in n.meta:
                return None, None, f"the adapter reads another tensor ({n.name})"
            extra.append(n)
            stop.add(n)
            continue
        body.add(n)
        todo.extend(n.all_input_nodes)
    return body, extra, None


def _build(gm: fx.GraphModule, final: fx.Node, inputs: list[fx.Node], body: set[fx.Node]) -> fx.GraphModule:
    g = fx.Graph()
    env = {n: g.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for n in gm.graph.nodes:
        if n in body:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[final])
    return fx.GraphModule(gm, g)


def _input_value(node: fx.Node, example: dict[fx.Node, Any]) -> Any:
    if node in example:
        return example[node]
    v = val(node)
    if isinstance(v, torch.SymInt):
        return int(v.node.hint)
    return v


def _reference(kind: str, x, a, b, ha, hb):
    from qhl.codegen.gralora import gralora_adapter_spec

    if kind == "lora":
        a, b = a.t()[None], b.t()[None]
    return gralora_adapter_spec(x, a, b, ha, hb, 1.0)


def _scaling_constant(body: set[fx.Node], fitted: float) -> float:
    """The graph's own scaling constant (exact), when one matches the fitted value."""
    for n in body:
        if n.op not in ("call_function", "call_method"):
            continue
        for a in n.args:
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                for c in (float(a), 1.0 / float(a) if a else None):
                    if c is not None and abs(c - fitted) <= 1e-3 * abs(fitted):
                        return c
    return fitted


@torch.no_grad()
def _check(gm, g, final, x, leaves, body, extra, dropouts) -> tuple[float | None, str | None]:
    """Run the layer's subgraph on random inputs; -> (scaling, None) or (None, reason)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    nodes = g["nodes"]
    xv = val(x)
    if not isinstance(xv, torch.Tensor):
        return None, "x has no recorded shape"
    with unset_fake_temporarily():
        gen = torch.Generator().manual_seed(0)
        xr = torch.randn(_concrete(xv.shape), generator=gen).to(xv.dtype)
        roles = [r for r in ("a", "b", "ha", "hb") if nodes.get(r) is not None]
        rand = {r: (torch.randn(nodes[r].meta[WEIGHT_META].value.shape, generator=gen) * 0.5) for r in roles}
        w = nodes["w"].meta[WEIGHT_META].value.detach()
        bias = nodes["bias"].meta[WEIGHT_META].value.detach() if nodes.get("bias") is not None else None
        aliases = [n for n in leaves if n is not x and n not in nodes.values()]
        inputs = [x, nodes["w"]] + ([nodes["bias"]] if bias is not None else []) + [nodes[r] for r in roles]
        inputs += dropouts + aliases + extra
        sub = _build(gm, final, inputs, body)

        def run(adapter: dict[str, torch.Tensor]) -> torch.Tensor:
            vals = [xr, w] + ([bias] if bias is not None else [])
            vals += [adapter[r].to(nodes[r].meta[WEIGHT_META].value.dtype) for r in roles]
            vals += [xr.to(val(d).dtype) for d in dropouts] + [xr for _ in aliases]
            vals += [_input_value(e, {}) for e in extra]
            return sub(*vals).float()

        try:
            y0 = run({r: torch.zeros_like(t) for r, t in rand.items()})
            y1 = run(rand)
        except Exception as e:  # noqa: BLE001  (any failure means: not the pattern we know)
            return None, f"the adapter subgraph did not run on test inputs ({type(e).__name__}: {e})"
        base = F.linear(xr.float(), w.float(), None if bias is None else bias.float())
        if y0.shape != base.shape or (y0 - base).norm() > _REL_TOL * base.norm().clamp_min(1e-12):
            return None, "with zero adapters the layer's output is not x W^T + b"
        ref = _reference(g["kind"], xr.float(), rand["a"], rand["b"], rand.get("ha"), rand.get("hb")).float()
        d = y1 - y0
        denom = (ref * ref).sum()
        if d.norm() == 0 or denom == 0:
            return None, "the layer's output does not depend on its adapter"
        s = float((d * ref).sum() / denom)
        err = float((d - s * ref).norm() / d.norm())
        if err > _REL_TOL:
            return None, (
                f"the adapter's output is not a multiple of qhl's {g['kind']} adapter "
                f"(relative residual {err:.1e} > {_REL_TOL:.0e}): unknown adapter variant"
            )
    return _scaling_constant(body, s), None


def _lora_layout(graph: fx.Graph, w: fx.Node) -> fx.Node:
    """lora_A.weight [r, in] -> [1, in, r] (and lora_B [out, r] -> [1, r, out]): LoRA is k = 1."""
    t = graph.call_function(aten.t.default, (w,))
    out = graph.call_function(aten.unsqueeze.default, (t, 0))
    v = val(w)
    if isinstance(v, torch.Tensor):
        try:
            t.meta["val"] = v.t()
            out.meta["val"] = v.t().unsqueeze(0)
        except Exception:  # noqa: BLE001  (meta is a convenience; the graph is right without it)
            pass
    return out


def _emit(gm: fx.GraphModule, final: fx.Node, g: dict[str, Any], x, x_adapter, scaling) -> fx.Node:
    nodes = g["nodes"]
    graph = gm.graph
    with graph.inserting_before(final):
        a, b = nodes["a"], nodes["b"]
        if g["kind"] == "lora":
            a, b = _lora_layout(graph, a), _lora_layout(graph, b)
        fused = graph.call_function(
            torch.ops.qhl.gralora_linear.default,
            (x, nodes["w"], nodes.get("bias"), a, b, nodes.get("ha"), nodes.get("hb"), float(scaling), x_adapter),
        )
    keep = ("nn_module_stack", "stack_trace", "val", "example_value", "source_fn_stack")
    fused.meta.update({k: v for k, v in final.meta.items() if k in keep})
    return fused


def _erase(gm: fx.GraphModule, candidates: set[fx.Node]) -> None:
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n not in candidates or n.op in ("placeholder", "get_attr", "output"):
                continue
            for u in list(n.users):
                if u.op == "call_function" and u.target in _CHECKS and not u.users:
                    gm.graph.erase_node(u)
            if not n.users:
                gm.graph.erase_node(n)
                candidates.discard(n)
                changed = True


def _lower_one(gm: fx.GraphModule, mod: str, g: dict[str, Any]) -> tuple[AdapterInfo | None, str | None]:
    nodes = g["nodes"]
    if len(g["adapters"]) > 1:
        return None, f"{len(g['adapters'])} adapters on one layer ({sorted(g['adapters'])}); qhl fuses one"
    missing = [r for r in ("a", "b", "w") if nodes.get(r) is None]
    if missing:
        return None, f"adapter parameters {missing} of this layer are not graph inputs"
    if (nodes.get("ha") is None) != (nodes.get("hb") is None):
        return None, "only half of the hybrid branch is present"
    if _already_fused(nodes["a"]):
        return None, None
    w = nodes["w"]
    bases = [u for u in w.users if _is(u, _LINEARS) and len(u.args) > 1 and u.args[1] is w]
    if len(bases) != 1:
        return None, f"found {len(bases)} base matmuls reading {mod}.base_layer.weight (expected 1)"
    base = bases[0]
    x = base.args[0]
    bias = base.args[2] if len(base.args) > 2 else base.kwargs.get("bias")
    if bias is not None and bias is not nodes.get("bias"):
        return None, "the base matmul's bias is not the layer's base_layer.bias"
    if bias is None:
        nodes["bias"] = None
    # the chain of adds on the base output: the layer's result
    final, adds = base, 0
    while True:
        users = _real_users(final)
        if len(users) != 1 or not _is(users[0], _ADDS, _ADD_METHODS):
            break
        u = users[0]
        if len(u.args) != 2 or u.kwargs.get("alpha", 1) != 1 or final not in u.args:
            break
        final, adds = u, adds + 1
    if adds == 0:
        return None, "no add of an adapter output onto the base matmul's output"
    # leaves: x (and the nodes that alias it), parameters, live dropouts of x
    aliases = _aliases(x)
    params = (nodes["w"], nodes.get("bias"), nodes["a"], nodes["b"], nodes.get("ha"), nodes.get("hb"))
    leaves = [n for n in (x, *params) if n is not None]
    leaves += [n for n in aliases if n is not x]
    stop = set(leaves)
    body, extra, reason = _subgraph(gm, final, leaves, stop)
    if reason is None:
        dropouts = sorted((n for n in body if _live_dropout(n)), key=lambda n: list(gm.graph.nodes).index(n))
        if dropouts:
            # dropout nodes become inputs of the check; recompute the body with them as leaves
            stop = set(leaves) | set(dropouts)
            body, extra, reason = _subgraph(gm, final, leaves, stop)
    if reason is not None:
        return None, reason
    chain: set[fx.Node] = set()
    for d in dropouts:
        if not any(_cast_of(d.args[0], alias, chain) for alias in aliases):
            return None, f"dropout {d.name} is not applied to the layer's input"
    if any(_live_dropout(n) for n in body):
        return None, "live dropout inside the adapter computation"
    scaling, reason = _check(gm, g, final, x, leaves, body, extra, dropouts)
    if reason is not None:
        return None, reason
    x_adapter = dropouts[0] if dropouts else None
    if len(dropouts) > 1:
        log.info("lower_adapters: %s: the hybrid branch's own dropout mask is replaced by the GraLoRA branch's", mod)
    fused = _emit(gm, final, g, x, x_adapter, scaling)
    final.replace_all_uses_with(fused)
    _erase(gm, body | set(dropouts[1:]) | chain | (aliases - {x}))
    a_val = nodes["a"].meta[WEIGHT_META].value
    if g["kind"] == "gralora":
        k, r = int(a_val.shape[0]), int(a_val.shape[2])
    else:
        k, r = 1, int(a_val.shape[0])
    hr = int(nodes["ha"].meta[WEIGHT_META].value.shape[0]) if nodes.get("ha") is not None else 0
    info = AdapterInfo(mod, g["kind"], k, r, hr, float(scaling), dropout=x_adapter is not None)
    fused.meta[ADAPTER_META] = info
    return info, None


def lower_adapters(gm: fx.GraphModule) -> PassResult:
    stats = {"lowered": 0, "declined": 0}
    if gm.meta.get(GRAPH_KIND_META) == "backward":
        return PassResult(gm, False, stats)
    weights = {n.meta[WEIGHT_META].path: n for n in gm.graph.nodes if WEIGHT_META in n.meta}
    declined = gm.meta.setdefault(DECLINED_META, {})
    for mod, group in _adapter_groups(weights).items():
        info, reason = _lower_one(gm, mod, group)
        if info is not None:
            stats["lowered"] += 1
            declined.pop(mod, None)
        elif reason is not None:
            stats["declined"] += 1
            declined[mod] = reason
            log.warning("lower_adapters: %s stays as eager computes it: %s", mod, reason)
    changed = stats["lowered"] > 0
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
