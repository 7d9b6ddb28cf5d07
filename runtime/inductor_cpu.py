"""CPU codegen for the torch.compile door: the rewritten graph, compiled whole by Inductor.

After the passes, an inference graph on CPU is handed to Inductor (`compile_fx`) with one extra
decomposition per qhl:: op that has one (the op's spec written in aten ops, beside the op in
codegen/<form>.py). Inductor then emits fused C++ loops for each quantized layer's prologue and
epilogue around one extern int8 GEMM (oneDNN's, on a weight prepacked once where the CPU has AMX:
codegen/cpu_onednn.py; else `_int_mm`), fused with the float ops before and after them (a
layer's dequantize epilogue with the next layer's per-token quantize, RMSNorm, residual adds,
SiLU), which the per-op CPU faces cannot do. Where the CPU has AVX2 alone (no fast int8 GEMM),
the weight-only and integer-activation forms lower a static 1-4 tokens to the bit-mask GEMV in
aten ops instead (codegen/cpu_fused.py), so a decode step has no op call left per layer. Ops
without a decomposition, or for which it declines (a token count whose best formulation needs a
cached per-weight tensor, or a layout the GEMV can't take), stay opaque calls to their CPU faces
inside the compiled code.

The graph it receives has been through the CODEGEN passes (compile_backend: fuse_sibling_linears,
so q/k/v and gate/up are one op each). The packed weights are buffers of the rewritten graph;
they are lifted to graph inputs and passed by reference on every call, so runtime/packed.py's refresh (an in-place re-pack when a source
weight changed) is seen by the compiled code. Training graphs are not compiled here: their
forward/backward split and the straight-through gradients stay with the GraphModule.

The compiled code lands in Inductor's FX graph cache (in memory and on disk), so compiling the
same graph again, in this process or a later one, skips the C++ codegen: `DecompositionTable` is
what makes qhl's graphs keyable there. AOTAutograd's cache stays off for these graphs: its key
leaves out the decomposition table, so it could serve a graph decomposed by other qhl code.

`compile_inference_graph` raises on any failure; the backend logs the reason and runs the
GraphModule (each op's CPU face) instead.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from qhl.graph import attr_value
from qhl.runtime.packed import PACKED_META, refresh

__all__ = ["cpu_decompositions", "is_cpu_graph", "lift_constants", "compile_inference_graph",
           "DecompositionTable"]

log = logging.getLogger(__name__)


def cpu_decompositions() -> dict[Any, Callable[..., Any]]:
    """qhl op overload -> its aten decomposition for Inductor's CPU codegen."""
    from qhl.codegen.hadamard import hadamard_decomposed, hadamard_quantize_per_token_decomposed
    from qhl.codegen.w4a16 import w4a16_linear_decomposed
    from qhl.codegen.w4ax import w4a4_linear_decomposed, w4a8_linear_decomposed
    from qhl.codegen.w8a8 import w8a8_linear_decomposed
    from qhl.codegen.w8a8_tensor import w8a8_tensor_linear_decomposed
    from qhl.codegen.w8a16 import w8a16_linear_decomposed

    return {
        torch.ops.qhl.w8a8_linear.default: w8a8_linear_decomposed,
        torch.ops.qhl.w8a8_tensor_linear.default: w8a8_tensor_linear_decomposed,
        torch.ops.qhl.w8a16_linear.default: w8a16_linear_decomposed,
        torch.ops.qhl.w4a16_linear.default: w4a16_linear_decomposed,
        torch.ops.qhl.w4a8_linear.default: w4a8_linear_decomposed,
        torch.ops.qhl.w4a4_linear.default: w4a4_linear_decomposed,
        torch.ops.qhl.hadamard.default: hadamard_decomposed,
        torch.ops.qhl.hadamard_quantize_per_token.default: hadamard_quantize_per_token_decomposed,
    }


# The sources whose code decides what a decomposition emits (the ops, their CPU plans, the prepacked
# GEMM): part of the compiled-code cache key, so that a changed qhl never reuses stale code.
_DECOMPOSITION_SOURCES = ("codegen/w8a8.py", "codegen/w8a8_tensor.py", "codegen/w8a16.py", "codegen/cpu_onednn.py",
                          "codegen/quant.py", "codegen/cpu_fused.py", "codegen/w4a16.py", "codegen/w4ax.py",
                          "codegen/hadamard.py", "compiler/hadamard.py", "runtime/inductor_cpu.py")


@functools.cache
def _source_digest() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in _DECOMPOSITION_SOURCES:
        path = root / rel
        digest.update(path.read_bytes() if path.is_file() else rel.encode())
    return digest.hexdigest()


def _decomposition_fingerprint() -> str:
    from qhl.codegen import cpu_onednn

    # The CPU plans depend on the machine, QHL_CPU_PREPACK and QHL_CPU_INT8_GEMM, not only on the code.
    plan = f"amx={cpu_onednn.cpu_has_amx()} prepack={cpu_onednn.available()} int8={cpu_onednn.int8_gemm_is_fast()}"
    return hashlib.sha256(f"{_source_digest()} {plan}".encode()).hexdigest()[:16]


class DecompositionTable(dict):
    """Inductor's decomposition table plus the qhl ops lowered in one graph.

    Inductor keys its FX graph cache (in memory and on disk) on a pickle of the table it was
    given; the default table holds functions that cannot be pickled, and a copy of it turns the
    cache off (a SmolLM2 compile then costs ~35 s in every process). This table pickles as what makes it differ from the default: the names of the qhl
    ops it lowers and a fingerprint of the code behind them. The graph being compiled is keyed
    separately by Inductor; the packed weights are graph inputs, so no weight value is keyed.
    """

    def __init__(self, lowered: tuple[str, ...]):
        from torch._inductor.decomposition import select_decomp_table

        super().__init__(select_decomp_table())
        mine = {str(op): (op, fn) for op, fn in cpu_decompositions().items()}
        unknown = [name for name in lowered if name not in mine]
        if unknown:
            raise ValueError(f"no CPU decomposition for {unknown}; known: {sorted(mine)}")
        self.lowered = tuple(sorted(lowered))
        self.update(mine[name] for name in self.lowered)

    def __reduce__(self):
        return (_rebuild_table, (self.lowered, _decomposition_fingerprint()))


def _rebuild_table(lowered: tuple[str, ...], fingerprint: str) -> DecompositionTable:
    # Unpickled with a cached FX graph. Inductor keys that cache on the graph after decomposition
    # and on this table's pickle (the fingerprint), and the compiled code depends only on the
    # former; so an entry is rebuilt with this code's table rather than refused (refusing made
    # Inductor log a traceback and recompile on every lookup of it).
    del fingerprint
    return DecompositionTable(lowered)


def _tensors_of(gm: fx.GraphModule, inputs: list[Any]) -> list[torch.Tensor]:
    consts = [attr_value(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    return [t for t in (*inputs, *consts) if isinstance(t, torch.Tensor)]


def is_cpu_graph(gm: fx.GraphModule, inputs: list[Any]) -> bool:
    """True when every tensor the graph reads (inputs and constants) lives on the CPU."""
    tensors = _tensors_of(gm, inputs)
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def lift_constants(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of gm whose tensor constants (get_attr: the packed weights) are leading placeholders,
    and those tensors, in order. The copy owns no state, so Inductor sees every tensor as an input
    and the caller passes the live buffers on each call."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    consts: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(attr_value(gm, node.target), torch.Tensor):
            env[node] = graph.placeholder("qhl_const_" + node.target.replace(".", "_"))
            env[node].meta = dict(node.meta)
            consts.append(attr_value(gm, node.target))
    for node in gm.graph.nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    return fx.GraphModule(gm, graph), consts


def _accepts(decomposition: Callable[..., Any], node: fx.Node, values: dict[fx.Node, Any], fake_mode: Any) -> bool:
    """Whether `decomposition` lowers this node (it returns NotImplemented to decline, e.g. for a
    token count whose best formulation needs a per-weight cache). Inductor takes a decomposition
    for every node of an op or for none, so one decline keeps the op opaque in the whole graph."""
    def value(a: Any) -> Any:
        return values[a] if a in values else a.meta["val"]

    args, kwargs = torch.utils._pytree.tree_map_only(fx.Node, value, (node.args, node.kwargs))
    with fake_mode:
        return decomposition(*args, **kwargs) is not NotImplemented


def compile_inference_graph(gm: fx.GraphModule, fake_inputs: list[Any]) -> Callable[[list[Any]], Any]:
    """A boxed callable running gm compiled by Inductor with qhl's CPU decompositions."""
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx

    t0 = time.perf_counter()
    lifted, consts = lift_constants(gm)
    fake_mode = detect_fake_mode(fake_inputs)
    if fake_mode is None:
        raise RuntimeError("no fake mode on the example inputs (expected AOTAutograd's)")
    # Constants have fixed shapes: static, so they add no symbols (and no guards) to the shape env.
    fake_consts = [fake_mode.from_tensor(c, static_shapes=True) for c in consts]
    values = dict(zip([n for n in lifted.graph.nodes if n.op == "placeholder"], [*fake_consts, *fake_inputs]))
    lowered = []
    for op, decomposition in cpu_decompositions().items():
        nodes = [n for n in lifted.graph.nodes if n.target is op]
        if nodes and all(_accepts(decomposition, n, values, fake_mode) for n in nodes):
            lowered.append(str(op))
        elif nodes:
            log.info("qhl: %s stays a call to its CPU face in this graph (its decomposition declines a node)", op)
    # AOTAutograd's cache keys a graph before decomposition and leaves the decomposition table out
    # of its key, so it would serve a graph decomposed by other qhl code (or another CPU plan);
    # Inductor's FX graph cache keys the decomposed graph itself, so it alone is kept on.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = compile_fx(lifted, [*fake_consts, *fake_inputs], decompositions=DecompositionTable(tuple(lowered)))
    records = list(gm.meta.get(PACKED_META, []))
    log.info("qhl: Inductor compiled the CPU graph (%d constants) in %.1fs", len(consts), time.perf_counter() - t0)

    def run(args: list[Any]) -> Any:
        if records:
            refresh(gm, records)
        return compiled(*consts, *args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
