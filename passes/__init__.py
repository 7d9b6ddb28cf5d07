"""qhl.passes: one pass per file, each `GraphModule -> PassResult(gm, changed, stats)`.

PASSES is the one ordered registry: a recipe names passes from it, and they always run in the
order the recipe lists them. A pass that needs the recipe's knobs takes it as a second argument;
`bind(name, recipe)` returns the plain GraphPass.
"""
from __future__ import annotations

from functools import partial

from qhl.passes.adapter_layers import adapter_layers
from qhl.passes.base import GraphPass, PassResult
from qhl.passes.canonicalize_matmuls import canonicalize_matmuls
from qhl.passes.float_codes_gemm import float_codes_gemm
from qhl.passes.fold_weight_transforms import fold_weight_transforms
from qhl.passes.fuse_sibling_linears import fuse_sibling_linears
from qhl.passes.lower_adapters import lower_adapters
from qhl.passes.merge_adapters import merge_adapters
from qhl.passes.quantize_linear import quantize_linear
from qhl.passes.rotate_online import rotate_online
from qhl.passes.rotate_residual import rotate_residual
from qhl.passes.select_layers import select_layers
from qhl.passes.w4a16_codes_gemv import w4a16_codes_gemv

__all__ = ["PASSES", "PassResult", "GraphPass", "bind", "LOSSLESS", "PRE_AOT", "CODEGEN", "INDUCTOR_ONLY"]

PASSES = {
    "lower_adapters": lower_adapters,  # base matmul + GraLoRA/LoRA adapter -> qhl.gralora_linear
    "merge_adapters": merge_adapters,  # qhl.gralora_linear -> linear(x, W + dW, b) for deployment
    "canonicalize_matmuls": canonicalize_matmuls,  # first: later passes assume canonical matmuls
    "select_layers": select_layers,  # needs the recipe: which layers get which form
    "rotate_residual": rotate_residual,  # offline QuaRot rotation of a proven-invariant residual stream
    "rotate_online": rotate_online,  # qhl.hadamard before the selected layers the offline one missed
    "quantize_linear": quantize_linear,  # canonical linear -> qhl:: quantized ops
    "fold_weight_transforms": fold_weight_transforms,  # float weights still owed a rotation
    "adapter_layers": adapter_layers,  # fused adapters in the layer table; int4 base of gralora-w4a16
    # Codegen only (CODEGEN): the torch.compile door runs them on inference graphs; recipes don't list them.
    "fuse_sibling_linears": fuse_sibling_linears,  # q/k/v (gate/up) reading one x -> one qhl linear + slices
    "float_codes_gemm": float_codes_gemm,  # int8-GEMM forms at many tokens, no fast int8 GEMM -> aten ops
    "w4a16_codes_gemv": w4a16_codes_gemv,  # w4a16 at 1-8 tokens, fast int8 GEMM -> GEMV over its codes, aten ops
}
_NEEDS_RECIPE = {"select_layers", "rotate_residual", "rotate_online", "adapter_layers"}
# Passes the torch.compile door also runs on Dynamo's torch-level graph, before AOTAutograd
# splits forward and backward (so a fused op's own autograd is what trains).
PRE_AOT = ("lower_adapters",)
# Passes the torch.compile door runs on an inference graph after the layer table is taken, just
# before Inductor compiles it or it runs op by op: they change how, not what, it computes. Those in
# INDUCTOR_ONLY write aten ops that only pay off compiled. Recipe knobs fuse_siblings, float_gemm and
# codes_gemv.
CODEGEN = ("fuse_sibling_linears", "float_codes_gemm", "w4a16_codes_gemv")
INDUCTOR_ONLY = frozenset({"float_codes_gemm", "w4a16_codes_gemv"})
# Passes that must not change the graph's numbers (verify mode checks them with a tight tolerance).
# 80 dB: float32 accumulation-order noise. Rotations are exact in real arithmetic and only move
# float32 rounding: they are held to the same floor.
LOSSLESS = {"canonicalize_matmuls", "select_layers", "rotate_residual", "rotate_online", "fold_weight_transforms"}
LOSSLESS |= {"lower_adapters", "merge_adapters", "fuse_sibling_linears"}  # same math, another summation order


def bind(name: str, recipe) -> GraphPass:
    fn = PASSES[name]
    return partial(fn, recipe=recipe) if name in _NEEDS_RECIPE else fn
