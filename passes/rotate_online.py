"""rotate_online: rotate a selected matmul's activations at run time, `y = Q(x M) . Q(W M)^T`.

    linear(x, W, b)  ->  linear(qhl.hadamard(x, block), W, b)        [owes W -> W M]
    (w4a8 / w4a4 forms: no separate node; quantize_linear gives the op hadamard_block=block and
     its fused Hadamard + per-token-quantize prologue rotates x)

M is `qhl.hadamard_matrix(n)` (block 0) when qhl can build size n, else the block-diagonal
`I (x) H_b` with the largest power-of-two b in [16, 256] dividing n; `hadamard_block=b` in the
recipe forces b. No random signs online: they would cost a multiply per call (the offline residual
rotation, which is free at run time, uses them). Layers share one rotated input when they read the
same activation with the same block (q/k/v, gate/up).

Which layers: every selected layer under rotation="online"; under "auto", those whose input the
offline residual rotation did not already rotate (o_proj, down_proj, or all of them when it
declined); none under "offline". A size with no construction and no block leaves the layer
unrotated (still quantized), with the reason in the report; so does a layer the recipe's form
will leave float (quantize_linear's own check, e.g. K not divisible by the group size): rotating a
float matmul would only cost time.
"""
from __future__ import annotations

from torch import fx

from qhl.graph import matmul_infos
from qhl.passes.base import PassResult
from qhl.passes.quantize_linear import RULES
from qhl.passes.rotation_common import describe_block, insert_hadamard, resolve_block, rotate_rows, training_reason
from qhl.recipes import Recipe

__all__ = ["rotate_online", "FUSED_PROLOGUE_FORMS"]

# Forms whose op takes hadamard_block and rotates inside its quantize prologue.
FUSED_PROLOGUE_FORMS = ("w4a8", "w4a4")
DONE_KNOB = "online_rotated"


def rotate_online(gm: fx.GraphModule, recipe: Recipe) -> PassResult:
    stats = {"rotated": 0, "fused": 0, "unrotatable": 0, "stays_float": 0}
    if recipe.rotation not in ("online", "auto"):
        return PassResult(gm, False, stats)
    why_not = training_reason(gm)
    shared: dict[tuple[fx.Node, int], fx.Node] = {}
    changed = False
    for node, info in matmul_infos(gm):
        if not info.selected or info.knobs.get("input_rotated") or info.knobs.get(DONE_KNOB):
            continue
        form = info.knobs.get("form")
        rule = RULES.get(form) if form else None
        stays_float = rule.check(info, info.knobs) if rule is not None else None
        if stays_float:
            # quantize_linear will decline the layer: rotating a float matmul changes nothing but
            # costs a Hadamard per call
            info.rotation_reason = f"online rotation skipped: {form} leaves this layer float ({stays_float})"
            stats["stays_float"] += 1
            continue
        n = info.in_features
        block, reason = (None, why_not) if why_not else resolve_block(n, info.knobs.get("rotation_block"))
        if block is None:
            info.rotation_reason = f"online rotation: {reason}"
            stats["unrotatable"] += 1
            continue
        info.add_weight_transform(lambda w, b=block: rotate_rows(w, b), f"online {describe_block(n, block)}")
        info.knobs[DONE_KNOB] = True
        changed = True
        if info.knobs.get("form") in FUSED_PROLOGUE_FORMS:
            info.knobs["hadamard_block"] = block  # the op's fused prologue rotates x
            stats["fused"] += 1
            continue
        x = node.args[0]
        key = (x, block)
        if key not in shared:
            shared[key] = insert_hadamard(gm, node, x, block, fp32=info.knobs.get("hadamard_dtype") != "activation")
        node.update_arg(0, shared[key])
        stats["rotated"] += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed, stats)
