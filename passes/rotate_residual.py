"""rotate_residual: rotate a Llama-style residual stream offline, by computational invariance.

QuaRot's observation: with an orthogonal Q = D H (random signs D, Hadamard H, size = hidden),

    embedding  E       -> E Q                 the stream now carries h Q instead of h
    RMSNorm    h*r*g   -> (h Q)*r             rms(h Q) = rms(h): the norm commutes with Q once
                                              its scale g is folded into what it feeds
    consumer   W       -> W diag(g) Q         q/k/v, gate/up, lm_head read (h Q)*r
    producer   W, b    -> Q^T W, b Q          o_proj/down_proj write into the stream

so the graph computes the same numbers, while every consumer's activations are rotated for free
(no online op): the outlier channels of the residual stream are spread before quantization.

Before (one decoder layer, ATen):            After:
    h   = embedding(E, ids)                      h   = embedding(E_rot, ids)
    n   = mul(g, mul(h, rsqrt(...h...)))          n   = mul(h, rsqrt(...h...))
    q   = linear(n, Wq)                           q   = linear(n, Wq)   [owes Wq diag(g) Q]
    h2  = add(h, linear(a, Wo))                   h2  = add(h, linear(a, Wo))   [owes Q^T Wo]

The weight rewrites are recorded on each layer's MatmulInfo (`add_weight_transform`) and applied
by whoever materializes the weight: quantize_linear packs the rotated weight directly (no float
copy is kept); fold_weight_transforms writes the float ones. The embedding is rewritten here.

The pass proves invariance first: every use of every stream value must be a residual add of a
linear layer's output, an RMSNorm whose output feeds only linear layers, or another stream value.
Anything else (LayerNorm's mean subtraction, the stream as a graph output, a view, a training
graph) declines the whole rotation with the reason, on every layer it would have touched.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from qhl.graph import MATMUL_META, WEIGHT_META, MatmulInfo, aten, matmul_infos, val
from qhl.passes.base import PassResult
from qhl.passes.rotation_common import describe_block, resolve_block, rotate_rows, training_reason
from qhl.recipes import Recipe
from qhl.runtime.packed import PackedWeight, record_packed

__all__ = ["rotate_residual", "find_residual_stream", "StreamPlan"]

log = logging.getLogger(__name__)

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# dtype casts: AOTAutograd writes _to_copy, torch.export keeps aten.to
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
# torch.export's shape/dtype checks read a value without using it
_CHECKS = {aten._assert_tensor_metadata.default}


def _is_alias_cast(u: fx.Node, h: fx.Node) -> bool:
    """A cast of h to its own dtype (torch.export keeps `x.to(float32)` on a float32 x): the
    same values, so it is part of the stream, not a reader of it."""
    if u.target not in _CASTS or u.args[0] is not h:
        return False
    hv, uv = val(h), val(u)
    return hv is not None and uv is not None and hv.dtype == uv.dtype


def _uses(node: fx.Node) -> list[fx.Node]:
    """The users that consume node's value (not torch.export's metadata assertions)."""
    return [u for u in node.users if u.target not in _CHECKS]
DONE_META = "qhl_residual_rotated"  # gm.meta flag: this graph's stream is already rotated


@dataclass
class StreamPlan:
    """The residual stream found in a graph, and everything that reads or writes it."""

    embedding: fx.Node
    hidden: int
    stream: list[fx.Node] = field(default_factory=list)
    # (node that multiplies by g, or None; g's weight node or None; the normed node to use instead)
    norms: list[tuple[fx.Node | None, fx.Node | None, fx.Node]] = field(default_factory=list)
    consumers: list[tuple[fx.Node, fx.Node | None]] = field(default_factory=list)  # (linear, g node)
    producers: list[fx.Node] = field(default_factory=list)


def _info(node: fx.Node) -> MatmulInfo | None:
    info = node.meta.get(MATMUL_META)
    return info if info is not None and info.weight is not None else None


def _strip(node, ops) -> fx.Node:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops and len(_uses(node)) == 1:
        node = node.args[0]
    return node


def _is_rsqrt_of_mean_square(r: fx.Node, h: fx.Node) -> bool:
    """r = rsqrt(add(mean(pow(h, 2), [-1], keepdim=True), eps))."""
    if not (isinstance(r, fx.Node) and r.target == aten.rsqrt.default):
        return False
    a = r.args[0]
    if not (isinstance(a, fx.Node) and a.target == aten.add.Tensor and not isinstance(a.args[1], fx.Node)):
        return False
    m = a.args[0]
    if not (isinstance(m, fx.Node) and m.target == aten.mean.dim and list(m.args[1]) in ([-1],) and m.args[2:3] == (True,)):
        return False
    p = m.args[0]
    return isinstance(p, fx.Node) and p.target == aten.pow.Tensor_Scalar and p.args[1] == 2 and p.args[0] is h


def _match_rmsnorm(h: fx.Node, hidden: int) -> tuple[fx.Node, fx.Node | None, fx.Node | None] | str:
    """The RMSNorm reading stream value h: (normed node, g-mul node, g weight node) or a reason.

    h -> [_to_copy] -> pow/mean/add/rsqrt, mul(h, rsqrt) -> [_to_copy] -> [mul(g, .)]
    """
    src = h
    users = [u for u in _uses(h) if u.target != aten.add.Tensor and not _is_alias_cast(u, h)]
    if len(users) == 1 and users[0].target in _CASTS:
        src = users[0]
        users = _uses(src)
    pows = [u for u in users if u.target == aten.pow.Tensor_Scalar]
    muls = [u for u in users if u.target == aten.mul.Tensor]
    if len(pows) != 1 or len(muls) != 1 or len(users) != 2:
        return f"{h.name} feeds {[u.name for u in users]}, not one RMSNorm"
    normed = muls[0]
    r = normed.args[1] if normed.args[0] is src else normed.args[0]
    if not _is_rsqrt_of_mean_square(r, src):
        return f"{normed.name} is not x * rsqrt(mean(x^2) + eps) (not an RMSNorm)"
    out = normed
    if len(_uses(out)) == 1 and _uses(out)[0].target in _CASTS:
        out = _uses(out)[0]
    gmul, gnode = None, None
    if len(_uses(out)) == 1:
        u = _uses(out)[0]
        other = u.args[0] if u.args[1] is out else u.args[1] if u.target == aten.mul.Tensor else None
        if u.target == aten.mul.Tensor and isinstance(other, fx.Node) and WEIGHT_META in other.meta:
            gv = other.meta[WEIGHT_META].value
            if gv.ndim == 1 and gv.shape[0] == hidden:
                gmul, gnode = u, other
    return out, gmul, gnode


# Ops that move rows around but leave each row's hidden vector as it is: they commute with x -> x Q.
_ROW_PASSTHROUGH = {aten.alias.default, aten.detach.default, aten.clone.default, aten.slice.Tensor,
                    aten.select.int, aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _keeps_rows(node: fx.Node, hidden: int) -> bool:
    """True when node only selects/reshapes leading dims (the last dim stays the hidden vector)."""
    if node.target in (aten.slice.Tensor, aten.select.int):
        src, dim = val(node.args[0]), node.args[1] if len(node.args) > 1 else 0
        return src is not None and dim % src.ndim != src.ndim - 1
    out = val(node)
    return out is not None and out.ndim >= 1 and out.shape[-1] == hidden


def _linear_readers(final: fx.Node, hidden: int) -> list[fx.Node] | str:
    """The linear layers reading `final` (directly or through row-preserving views), or a reason."""
    readers, work = [], [final]
    while work:
        src = work.pop()
        for c in _uses(src):
            if c.target in _ROW_PASSTHROUGH and c.args[0] is src and _keeps_rows(c, hidden):
                work.append(c)
                continue
            info = _info(c) if c.target == aten.linear.default else None
            if info is None or c.args[0] is not src or info.in_features != hidden:
                return f"the RMSNorm output {final.name} feeds {c.name} ({c.target}), not only linear layers"
            readers.append(c)
    return readers


def find_residual_stream(gm: fx.GraphModule) -> StreamPlan | str:
    """Prove the graph's residual stream rotation-invariant and list its parts, or say why not."""
    embeds = [
        n for n in gm.graph.nodes
        if n.target == aten.embedding.default and isinstance(n.args[0], fx.Node) and WEIGHT_META in n.args[0].meta
    ]
    if len(embeds) != 1:
        return f"found {len(embeds)} token embeddings; the offline rotation needs exactly one stream source"
    emb = embeds[0]
    hidden = int(emb.args[0].meta[WEIGHT_META].value.shape[1])
    plan = StreamPlan(emb, hidden)
    work, seen = [emb], {emb}
    while work:
        h = work.pop()
        plan.stream.append(h)
        norm_done = False
        for u in _uses(h):
            if u.op == "output":
                return f"the residual stream value {h.name} is a graph output; rotating it would change it"
            if _is_alias_cast(u, h):
                if u not in seen:
                    seen.add(u)
                    work.append(u)
                continue
            if u.target == aten.add.Tensor and all(isinstance(a, fx.Node) for a in u.args[:2]):
                other = u.args[1] if u.args[0] is h else u.args[0]
                if other in seen:
                    continue
                lin = _strip(other, _VIEWS)
                info = _info(lin) if lin.target == aten.linear.default else None
                if info is None or info.out_features != hidden:
                    return f"the residual add {u.name} adds {other.name}, which is not a linear layer's output"
                if len(_uses(lin)) != 1:
                    return f"{info.path}'s output feeds more than the residual add {u.name}"
                bias = lin.args[2] if len(lin.args) > 2 else None
                if bias is not None and not (isinstance(bias, fx.Node) and WEIGHT_META in bias.meta):
                    return f"{info.path}'s bias is computed in the graph, not a parameter that can be rotated"
                plan.producers.append(lin)
                seen.add(u)
                work.append(u)
                continue
            if norm_done:
                continue
            match = _match_rmsnorm(h, hidden)
            if isinstance(match, str):
                return f"the residual stream value {h.name} is used by {u.name} ({u.target}): {match}"
            out, gmul, gnode = match
            norm_done = True
            final = gmul if gmul is not None else out
            readers = _linear_readers(final, hidden)
            if isinstance(readers, str):
                return readers
            plan.consumers += [(c, gnode) for c in readers]
            plan.norms.append((gmul, gnode, out))
    if not plan.consumers or not plan.producers:
        return "no RMSNorm -> linear consumers and linear -> residual-add producers were found"
    return plan


def _new_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    base = "qhl_rot_" + re.sub(r"[^0-9A-Za-z_]", "_", name)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = tensor
    return node


def _rotated_buffer(gm, user: fx.Node, arg_index: int, fn, path: str) -> None:
    """Replace user's weight operand by fn(weight) as a buffer that follows in-place updates."""
    src = user.args[arg_index]
    ref = src.meta[WEIGHT_META]
    node = _new_buffer(gm, path, fn(ref.value.detach().float()).to(ref.value.dtype), user)
    user.update_arg(arg_index, node)
    record_packed(gm, PackedWeight(path, ref.value, ref.value._version, lambda t: (fn(t),), (node.target,)))


def rotate_residual(gm: fx.GraphModule, recipe: Recipe) -> PassResult:
    stats = {"consumers": 0, "producers": 0, "norms_folded": 0}
    if recipe.rotation not in ("offline", "auto") or gm.meta.get(DONE_META):
        return PassResult(gm, False, stats)
    selected = [i for _, i in matmul_infos(gm) if i.selected]
    if not selected:
        return PassResult(gm, False, stats)
    reason = training_reason(gm)
    plan = find_residual_stream(gm) if reason is None else reason
    if isinstance(plan, StreamPlan):
        block, why = resolve_block(plan.hidden, recipe.hadamard_block)
        if block is None:
            plan = why
    if isinstance(plan, str):
        for info in selected:
            info.rotation_reason = f"offline residual rotation declined: {plan}"
        log.info("qhl: offline residual rotation declined: %s", plan)
        return PassResult(gm, False, stats)

    from qhl.hadamard import random_signs

    n = plan.hidden
    signs = random_signs(n, recipe.hadamard_seed) if recipe.hadamard_seed is not None else None
    what = f"offline Q=D*{describe_block(n, block)}" if signs is not None else f"offline {describe_block(n, block)}"

    # Embedding: E -> E Q (a new buffer; the model's parameter is untouched).
    emb_path = plan.embedding.args[0].meta[WEIGHT_META].path
    _rotated_buffer(gm, plan.embedding, 0, lambda e: rotate_rows(e, block, signs), emb_path + "_rotated")
    # Norms: drop the scale g; it moves into every consumer's weight.
    for gmul, _gnode, out in plan.norms:
        if gmul is not None:
            gmul.replace_all_uses_with(out)
            gm.graph.erase_node(gmul)
            stats["norms_folded"] += 1
    for lin, gnode in plan.consumers:
        info = lin.meta[MATMUL_META]
        g = gnode.meta[WEIGHT_META].value if gnode is not None else None
        fn = (lambda w, g=g: rotate_rows(w * g.detach().float(), block, signs)) if g is not None else (
            lambda w: rotate_rows(w, block, signs)
        )
        info.add_weight_transform(fn, what + " (input)")
        info.knobs["input_rotated"] = True
        stats["consumers"] += 1
    for lin in plan.producers:
        info = lin.meta[MATMUL_META]
        info.add_weight_transform(lambda w: rotate_rows(w.t(), block, signs).t().contiguous(), what + " (output)")
        if len(lin.args) > 2 and isinstance(lin.args[2], fx.Node) and WEIGHT_META in lin.args[2].meta:
            _rotated_buffer(gm, lin, 2, lambda b: rotate_rows(b, block, signs), info.path + ".bias_rotated")
        stats["producers"] += 1
    gm.meta[DONE_META] = True
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    log.info("qhl: offline residual rotation (%s): %d consumers, %d producers", what, stats["consumers"], stats["producers"])
    return PassResult(gm, True, stats)
