"""canonicalize_matmuls: every matmul form with a weight -> one `aten.linear(x, W[N,K], b)`.

    view(x,[M,K]) -> addmm(b, ., t(W)) -> view(.,[*,N])      ->  linear(x, W, b)
    view(x,[M,K]) -> mm(., t(W))       -> view(.,[*,N])      ->  linear(x, W)
    mm(x, W_kn)   (weight stored [K,N], e.g. GPT-2 Conv1D)    ->  linear(x, t(W_kn))
    matmul(x, t(W)) / linear(x, W, b)                         ->  linear(x, W, b)

Each canonical node carries a MatmulInfo (module path, shapes, the [N,K] weight value). Matmuls
with no weight operand (attention's q@k, p@v) are recorded with the reason they stay as they are.
Lossless: the output graph computes the same numbers as the input graph.
"""
from __future__ import annotations

from torch import fx

from qhl.graph import MATMUL_META, MatmulInfo, WeightRef, aten, module_path_of, same_shape, val, weight_source
from qhl.passes.base import PassResult

__all__ = ["canonicalize_matmuls"]

_MATMULS = {
    aten.mm.default: "mm",
    aten.addmm.default: "addmm",
    aten.linear.default: "linear",
    aten.bmm.default: "bmm",
    aten.matmul.default: "matmul",
}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _unflattened(x2d: fx.Node) -> fx.Node:
    """If x2d is view(x, [M, K]) flattening x's leading dims, return x; else x2d itself."""
    if isinstance(x2d, fx.Node) and x2d.target in _VIEWS:
        x = x2d.args[0]
        xv, x2v = val(x), val(x2d)
        if xv is not None and x2v is not None and xv.ndim >= 2 and same_shape(xv.shape[-1:], x2v.shape[-1:]):
            return x
    return x2d


def _output_view(mm: fx.Node, x: fx.Node) -> fx.Node | None:
    """The single view that restores x's leading dims on the matmul output, if there is one."""
    users = list(mm.users)
    if len(users) != 1 or users[0].target not in _VIEWS:
        return None
    out, xv = users[0], val(x)
    ov = val(out)
    if ov is None or xv is None or not same_shape(ov.shape[:-1], xv.shape[:-1]):
        return None
    return out


def _match(node: fx.Node):
    """-> (x2d, weight operand [K,N] or [N,K], weight_is_kn, bias) or a reason string."""
    op = _MATMULS[node.target]
    if op == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return x, w, False, b
    if op == "addmm":
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha/beta != 1 is left as it is"
        b, x, w = node.args[:3]
        bv = val(b)
        if bv is None or bv.ndim != 1:
            return "addmm with a bias that is not 1-D is left as it is"
        return x, w, True, b
    if op in ("mm", "matmul"):
        x, w = node.args[:2]
        wv = val(w)
        if op == "matmul" and (wv is None or wv.ndim != 2):
            return "matmul with a batched right operand (activation x activation)"
        return x, w, True, None
    return "bmm: batched matmul of two activations (no weight operand)"


def _emit_linear(gm, replaced, x, base, base_is_nk, bias) -> fx.Node:
    with gm.graph.inserting_before(replaced):
        w_node = base if base_is_nk else gm.graph.call_function(aten.t.default, (base,))
        if w_node is not base and val(base) is not None:
            w_node.meta["val"] = val(base).t()
        args = (x, w_node) if bias is None else (x, w_node, bias)
        linear = gm.graph.call_function(aten.linear.default, args)
    linear.meta.update(replaced.meta)
    replaced.replace_all_uses_with(linear)
    return linear


def _canonicalize(gm: fx.GraphModule, node: fx.Node) -> MatmulInfo:
    op = _MATMULS[node.target]
    path = module_path_of(node) or node.name
    matched = _match(node)
    if isinstance(matched, str):
        return MatmulInfo(path=path, op=op, reason=matched)
    x2d, w_operand, is_kn, bias = matched
    src = weight_source(w_operand)
    if src is None:
        if weight_source(x2d) is not None:
            return MatmulInfo(path=path, op=op, reason="the weight is the left operand (W @ x); not a linear layer")
        return MatmulInfo(path=path, op=op, reason="no weight operand: both operands are activations")
    base, ref, transposed = src
    # The operand is base (transposed if `transposed`); canonical linear wants W as [N, K].
    base_is_nk = (not is_kn) != transposed
    w_value = ref.value if base_is_nk else ref.value.t()
    weight = WeightRef(path=ref.path, value=w_value, trainable=ref.trainable)
    # The module the matmul ran in names the layer (a tied lm_head reads the embedding's
    # weight but is still lm_head); the weight's own path is the fallback.
    layer_path = module_path_of(node) or (ref.path.rsplit(".", 1)[0] if "." in ref.path else "")
    layer_path = layer_path or "(root)"  # a bare nn.Linear compiled on its own

    x = _unflattened(x2d) if op in ("mm", "addmm") else x2d
    out_view = _output_view(node, x) if x is not x2d else None
    if x is not x2d and out_view is None:
        x = x2d  # leading dims are not restored by a single view: keep the 2-D form
    replaced = out_view or node
    if op == "linear" and w_operand is base and base_is_nk:
        linear = node  # already canonical: annotate in place
    else:
        linear = _emit_linear(gm, replaced, x, base, base_is_nk, bias)
    xv = val(x)
    info = MatmulInfo(
        path=layer_path,
        op=op,
        in_features=int(w_value.shape[1]),
        out_features=int(w_value.shape[0]),
        weight=weight,
        has_bias=bias is not None,
        dtype=xv.dtype if xv is not None else None,
        x_shape=tuple(xv.shape) if xv is not None else (),
        weight_bytes_before=w_value.numel() * w_value.element_size(),
    )
    info.weight_bytes_after = info.weight_bytes_before
    linear.meta[MATMUL_META] = info
    return info


def canonicalize_matmuls(gm: fx.GraphModule) -> PassResult:
    stats = {"canonicalized": 0, "left_as_is": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or MATMUL_META in node.meta:
            continue
        info = _canonicalize(gm, node)
        if info.reason is None:
            stats["canonicalized"] += 1
        else:
            node.meta[MATMUL_META] = info
            stats["left_as_is"] += 1
    changed = stats["canonicalized"] + stats["left_as_is"] > 0
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
