"""The quantize_linear rules of the low-rank compression forms (issue 6): checks, packing, knobs.

    linear(x, W, b) -> qhl.blocklr_linear(x, u, v, ranks, b)                             "blocklr"
    linear(x, W, b) -> qhl.lr_w4a16_linear(x, l1, l2, packed, s, z, group_size, b)       "lr-w4a16"

The math (SVD truncation, greedy rank choice under a byte budget, LQ-LoRA alternation) is in
codegen/lowrank.py. Knobs (Recipe fields, per layer):

    lowrank_k      blocklr grid size k (W split into k x k blocks); default 2
    budget         bytes, as a fraction of the layer's float16 weight bytes (2 * N * K)
    rank           blocklr: the rank of every block; lr-w4a16: the rank of L1 L2
                   (neither set: blocklr budget=0.25, lr-w4a16 rank=16; both set: RecipeError)
    lowrank_iters  lr-w4a16: LQ-LoRA alternations after the SVD split (0 = SVDQuant's split)
    group_size, symmetric, weight_clip   lr-w4a16's int4 residual, as for w4a16

A layer the rule cannot compress stays float with the reason (divisibility, a budget too
small). blocklr's per-block ranks are decided when the weight is packed and kept in that
layer's knobs ("blocklr_ranks"), so a re-pack after an in-place weight update keeps the graph's
static shapes.
"""
from __future__ import annotations

from typing import Any

import torch

from qhl.codegen import lowrank
from qhl.recipes import group_size_advice

__all__ = [
    "LOWRANK_FORMS",
    "LOWRANK_GROUP_SIZES",
    "DEFAULT_BLOCKLR_BUDGET",
    "DEFAULT_LR_RANK",
    "check_blocklr",
    "pack_blocklr",
    "blocklr_static_args",
    "check_lr_w4a16",
    "pack_lr_w4a16",
    "validate_recipe",
]

LOWRANK_FORMS = ("blocklr", "lr-w4a16")
# lr-w4a16's residual group sizes: w4a16's plus 96/192/256, which divide SmolLM2's 576 and 1536
# and leave bytes for the low-rank part at w4a16-g64's size.
LOWRANK_GROUP_SIZES = (32, 64, 96, 128, 192, 256)
DEFAULT_BLOCKLR_BUDGET = 0.25
DEFAULT_LR_RANK = 16


def _budget_and_rank(knobs: dict[str, Any], default_budget: float | None, default_rank: int | None):
    budget, rank = knobs.get("budget"), knobs.get("rank")
    if budget is None and rank is None:
        return default_budget, default_rank
    return budget, rank


# --- blocklr ---------------------------------------------------------------------------------


def check_blocklr(info: Any, knobs: dict[str, Any]) -> str | None:
    n_out, n_in, k = info.out_features, info.in_features, int(knobs.get("lowrank_k", 2))
    if not n_in or not n_out:
        return "empty weight"
    if n_in % k or n_out % k:
        return (
            f"blocklr needs in_features and out_features divisible by lowrank_k={k}; "
            f"got K={n_in}, N={n_out}"
        )
    budget, rank = _budget_and_rank(knobs, DEFAULT_BLOCKLR_BUDGET, None)
    if budget is not None:
        cost = 2 * (n_out // k + n_in // k)
        if int(budget * 2 * n_out * n_in) < cost:
            return (
                f"budget={budget} of the float16 weight ({2 * n_out * n_in} B) is smaller than one "
                f"rank-1 block term ({cost} B)"
            )
    return None


def pack_blocklr(w: torch.Tensor, knobs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(knobs.get("lowrank_k", 2))
    ranks = knobs.get("blocklr_ranks")
    if ranks is not None:  # a re-pack keeps the first pack's ranks (the graph's shapes depend on them)
        return lowrank.blocklr_factorize(w, k, ranks)
    budget, rank = _budget_and_rank(knobs, DEFAULT_BLOCKLR_BUDGET, None)
    u, v, knobs["blocklr_ranks"] = lowrank.blocklr_compress(w, k, rank=rank, budget=None if rank is not None else budget)
    return u, v


def blocklr_static_args(knobs: dict[str, Any]) -> tuple[Any, ...]:
    return (list(knobs["blocklr_ranks"]),)


# --- lr-w4a16 --------------------------------------------------------------------------------


def _lr_rank(n_out: int, n_in: int, knobs: dict[str, Any]) -> int:
    budget, rank = _budget_and_rank(knobs, None, DEFAULT_LR_RANK)
    if rank is None:
        rank = lowrank.lr_w4a16_rank_for_budget(n_out, n_in, knobs["group_size"], budget)
    return min(int(rank), n_out, n_in)


def check_lr_w4a16(info: Any, knobs: dict[str, Any]) -> str | None:
    n_out, n_in, g = info.out_features, info.in_features, knobs["group_size"]
    if not n_in or not n_out:
        return "empty weight"
    if n_in % g or g % 2:
        return group_size_advice(n_in, g, LOWRANK_GROUP_SIZES, auto=False)
    if _lr_rank(n_out, n_in, knobs) < 0:
        return (
            f"budget={knobs['budget']} of the float16 weight ({2 * n_out * n_in} B) is smaller than the "
            f"int4 residual alone ({lowrank.int4_bytes(n_out, n_in, g)} B at group_size={g})"
        )
    return None


def pack_lr_w4a16(w: torch.Tensor, knobs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    n_out, n_in = w.shape
    return lowrank.lr_w4a16_factorize(
        w, _lr_rank(n_out, n_in, knobs), knobs["group_size"], knobs.get("symmetric", True),
        knobs.get("weight_clip", "none"), int(knobs.get("lowrank_iters", 0)),
    )


# --- recipe validation -----------------------------------------------------------------------


def validate_recipe(recipe: Any) -> None:
    """RecipeError for bad low-rank knobs (called from Recipe.__post_init__)."""
    from qhl.errors import RecipeError

    if recipe.budget is not None and recipe.rank is not None:
        raise RecipeError(f"set one of budget={recipe.budget} or rank={recipe.rank}, not both")
    if recipe.budget is not None and not 0 < recipe.budget:
        raise RecipeError(f"budget={recipe.budget}: a fraction of the float16 weight bytes, > 0 (e.g. 0.25)")
    if recipe.rank is not None and recipe.rank < 0:
        raise RecipeError(f"rank={recipe.rank}: must be >= 0")
    if recipe.lowrank_k < 1:
        raise RecipeError(f"lowrank_k={recipe.lowrank_k}: must be >= 1")
    if recipe.lowrank_iters < 0:
        raise RecipeError(f"lowrank_iters={recipe.lowrank_iters}: must be >= 0")
    if recipe.form == "lr-w4a16" and recipe.group_size not in LOWRANK_GROUP_SIZES:
        raise RecipeError(
            f"group_size={recipe.group_size} is not supported by lr-w4a16; valid: {list(LOWRANK_GROUP_SIZES)}"
        )
