"""The torch.compile door: `torch.compile(model, backend="qhl", options={"recipe": "w4a16"})`.

Dynamo graph -> AOTAutograd (forward + backward for training, or one inference graph) -> our
passes on each ATen graph -> the compiled callable. A CPU inference graph gets the CODEGEN passes
(passes/fuse_sibling_linears.py, knob fuse_siblings) and is compiled whole by Inductor, each qhl
op lowered to its aten decomposition where it has one (runtime/inductor_cpu.py; recipe knob
cpu_codegen="inductor", the default). Otherwise the rewritten GraphModule runs as it
is: its qhl:: ops on their CPU faces, or on CUDA their Triton kernels.

`qhl.backend("w4a16", group_size=64)` returns the same backend as an object, which also keeps
what it compiled (`.graphs`, each with its pass records and layer table) for inspection.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from qhl.capture import bind_dynamo_weights, weight_paths_from_dynamo
from qhl.codegen.triton.emit import attach_kernel_sources
from qhl.driver import PassRecord, run_passes
from qhl.graph import TRAINING_META, MatmulInfo, float_reasons, matmul_infos
from qhl.passes import CODEGEN, INDUCTOR_ONLY, PRE_AOT, bind
from qhl.passes.lower_adapters import DECLINED_META, GRAPH_KIND_META
from qhl.recipes import DEFAULT_RECIPE, Recipe, recipe
from qhl.codegen import cpu_fused
from qhl.runtime import inductor_cpu
from qhl.runtime.packed import GuardedGraph

__all__ = ["QhlBackend", "CompiledGraph", "backend", "qhl_backend"]

log = logging.getLogger(__name__)

# The recipe knob that turns each codegen pass on.
_CODEGEN_KNOBS = {"fuse_sibling_linears": "fuse_siblings", "float_codes_gemm": "float_gemm",
                  "w4a16_codes_gemv": "codes_gemv"}


@dataclass
class CompiledGraph:
    """One ATen graph the backend compiled: 'forward', 'backward' or 'inference'."""

    kind: str
    gm: fx.GraphModule
    passes: list[PassRecord]
    layers: list[MatmulInfo] = field(default_factory=list)
    seconds: float = 0.0
    # What runs it: "inductor" (CPU inference graphs, runtime/inductor_cpu.py) or "graph" (the
    # GraphModule: each qhl op on its CPU face or its Triton kernel); why not inductor, if not.
    codegen: str = "graph"
    codegen_reason: str | None = None
    codegen_seconds: float = 0.0  # of `seconds`: the Inductor compile


def _concrete(inputs: list[Any]) -> tuple[Any, ...] | None:
    """Real example inputs with SymInts replaced by their hints, or None if impossible."""
    out = []
    for x in inputs:
        if isinstance(x, torch.SymInt):
            hint = x.node.hint
            if hint is None:
                return None
            out.append(int(hint))
        elif isinstance(x, torch.Tensor) and x.__class__.__name__ == "FakeTensor":
            return None
        else:
            out.append(x)
    return tuple(out)


class QhlBackend:
    """A torch.compile backend bound to one recipe."""

    def __init__(self, recipe_: Recipe):
        self.recipe = recipe_
        self.graphs: list[CompiledGraph] = []
        # Dynamo-level graphs after the PRE_AOT passes (adapter recipes), with their pass records.
        self.dynamo_graphs: list[CompiledGraph] = []

    def __repr__(self) -> str:
        return f"QhlBackend(recipe={self.recipe.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QhlBackend) and other.recipe == self.recipe

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_: Any):
        from torch._dynamo.backends.common import aot_autograd

        real_inputs = list(example_inputs)
        paths = weight_paths_from_dynamo(gm, real_inputs)
        adapter_declines = self._pre_aot(gm, real_inputs, paths)

        def compiler(kind: str):
            def compile_graph(aot_gm: fx.GraphModule, _fake_inputs: list[Any]):
                t0 = time.perf_counter()
                if kind != "backward":
                    bind_dynamo_weights(aot_gm, real_inputs, paths)
                aot_gm.meta[TRAINING_META] = kind == "forward"
                aot_gm.meta[GRAPH_KIND_META] = kind
                if adapter_declines:
                    aot_gm.meta[DECLINED_META] = dict(adapter_declines)
                inputs = _concrete(real_inputs) if self.recipe.verify and kind != "backward" else None
                # AOTAutograd calls us inside its FakeTensorMode; packing weights needs real math.
                with unset_fake_temporarily():
                    out, records = run_passes(aot_gm, self.recipe, inputs, verify=inputs is not None)
                    attach_kernel_sources(out)
                compiled = CompiledGraph(kind, out, records, [i for _, i in matmul_infos(out)])
                runner = self._codegen(kind, out, _fake_inputs, compiled)
                compiled.seconds = time.perf_counter() - t0
                self.graphs.append(compiled)
                _log_summary(kind, compiled)
                if kind == "forward":
                    _warn_training_graph_once(compiled)
                return runner

            return compile_graph

        return aot_autograd(
            fw_compiler=compiler("forward"),
            bw_compiler=compiler("backward"),
            inference_compiler=compiler("inference"),
        )(gm, example_inputs)

    def _codegen(self, kind: str, gm: fx.GraphModule, fake_inputs: list[Any], compiled: CompiledGraph):
        """The boxed callable for one rewritten graph: Inductor for CPU inference graphs when the
        recipe asks for it (the default) and it compiles, else the GraphModule itself."""
        from torch._functorch.aot_autograd import make_boxed_func

        reason = self._inductor_declines(kind, gm, fake_inputs)
        if reason is None:
            t0, n_records = time.perf_counter(), len(compiled.passes)
            try:
                lowered = self._codegen_passes(gm, compiled, inductor=True)
                runner = inductor_cpu.compile_inference_graph(lowered, fake_inputs)
                compiled.codegen = "inductor"
                compiled.codegen_seconds = time.perf_counter() - t0
                return runner
            except torch._dynamo.exc.RestartAnalysis:
                # Not a failure: Dynamo's request to trace the frame again (Inductor's pass that
                # turns symbolic Python floats into tensors asks for one, with dynamic=True, after
                # marking the floats to specialize). Swallowed, the graph ran op by op.
                raise
            except Exception as e:  # noqa: BLE001 - the GraphModule below is always a correct fallback
                reason = f"Inductor failed ({type(e).__name__}: {str(e).strip()[:300]})"
                log.warning("qhl: %s graph runs op by op: %s", kind, reason)
            # The GraphModule below is the graph before the codegen passes (the one that failed
            # may be the fused one); their records say so.
            for record in compiled.passes[n_records:]:
                record.notes.append("not used: Inductor failed and the graph before this pass runs op by op")
            compiled.codegen_reason = reason
            return make_boxed_func(GuardedGraph(gm))
        compiled.codegen_reason = reason
        # Op by op (CUDA's Triton kernels, or CPU faces), an inference graph still gets the codegen
        # passes: one op call (one kernel launch) for q/k/v instead of three. Training graphs keep
        # one op per layer (their backward saves each layer's own activations).
        run = self._codegen_passes(gm, compiled, inductor=False) if kind == "inference" else gm
        return make_boxed_func(GuardedGraph(run))

    def _codegen_passes(self, gm: fx.GraphModule, compiled: CompiledGraph, inductor: bool) -> fx.GraphModule:
        """The graph that runs (compiled by Inductor, or op by op): gm after the CODEGEN passes the
        recipe enables, each recorded in compiled.passes. gm itself (the layer table's graph, and
        the fallback should Inductor fail) keeps one node per layer."""
        names = [name for name in CODEGEN if getattr(self.recipe, _CODEGEN_KNOBS[name])
                 and (inductor or name not in INDUCTOR_ONLY)]
        for name in names:
            before, t0 = gm.code, time.perf_counter()
            try:
                with unset_fake_temporarily():  # AOTAutograd calls us in its FakeTensorMode
                    result = bind(name, self.recipe)(gm)
            except Exception as e:  # noqa: BLE001 - the graph before the pass is always correct
                log.warning("qhl: codegen pass %s failed, compiling without it: %s: %s", name, type(e).__name__, e)
                continue
            gm = result.gm
            compiled.passes.append(PassRecord(name, result.changed, dict(result.stats), before, gm.code,
                                              time.perf_counter() - t0, notes=list(result.notes)))
        return gm

    def _inductor_declines(self, kind: str, gm: fx.GraphModule, fake_inputs: list[Any]) -> str | None:
        if self.recipe.cpu_codegen != "inductor":
            return f"cpu_codegen={self.recipe.cpu_codegen!r}"
        if kind != "inference":
            return f"a {kind} graph (training runs the GraphModule)"
        if not inductor_cpu.is_cpu_graph(gm, fake_inputs):
            return "not a CPU graph (CUDA runs each op's Triton kernel)"
        if not cpu_fused.enabled():
            return f"Inductor cannot compile here: {cpu_fused.disable_reason()}"
        return None

    def _pre_aot(self, gm: fx.GraphModule, real_inputs: list[Any], paths: list[str | None]) -> dict[str, str]:
        """Run the recipe's PRE_AOT passes (lower_adapters) on Dynamo's torch-level graph, in place.

        AOTAutograd then traces the fused ops through their registered autograd, so training runs
        the fused backward rather than the derivative of the unfused einsum path. Returns the
        layers those passes declined (path -> reason) for the layer tables of the ATen graphs.
        """
        names = [n for n in self.recipe.passes if n in PRE_AOT]
        if not names:
            return {}
        bind_dynamo_weights(gm, real_inputs, paths)
        records = []
        with unset_fake_temporarily():
            for name in names:
                before, t0 = gm.code, time.perf_counter()
                result = bind(name, self.recipe)(gm)
                records.append(PassRecord(name, result.changed, dict(result.stats), before, result.gm.code,
                                          time.perf_counter() - t0))
        self.dynamo_graphs.append(CompiledGraph("dynamo", gm, records))
        return dict(gm.meta.get(DECLINED_META, {}))


_warned_training_graph = False


def _warn_training_graph_once(compiled: CompiledGraph) -> None:
    """One warning per process: a model called with grad mode on compiles as a training graph.

    An eval-mode model called without torch.no_grad() still gets AOTAutograd's forward + backward
    pair, which runs op by op (not compiled whole by Inductor on CPU): easy to miss, and several
    times slower for inference. Training users see it once."""
    global _warned_training_graph
    if _warned_training_graph or not any(i.form for i in compiled.layers):
        return
    _warned_training_graph = True
    log.warning(
        "qhl: grad mode is on, so this graph was compiled for training (forward + float backward, %s). "
        "For inference, call the model under torch.no_grad() or torch.inference_mode(): on CPU that "
        "graph is compiled whole by Inductor. (Logged once per process.)",
        "op by op" if compiled.codegen == "graph" else f"runs on {compiled.codegen}",
    )


def _log_summary(kind: str, compiled: CompiledGraph) -> None:
    rewritten = [i for i in compiled.layers if i.form]
    forms = sorted({i.form for i in rewritten})
    reasons = float_reasons(compiled.layers)
    most = f" (most: {reasons[0][0]} x {reasons[0][1]})" if reasons else ""
    log.info(
        "qhl: %s graph: %d matmuls, %d rewritten %s, %d left as they were%s; runs on %s (%.2fs)",
        kind, len(compiled.layers), len(rewritten), forms, len(compiled.layers) - len(rewritten), most,
        compiled.codegen, compiled.seconds,
    )


def backend(recipe_: str | Recipe = DEFAULT_RECIPE, **knobs: Any) -> QhlBackend:
    """A torch.compile backend object for a recipe: `torch.compile(m, backend=qhl.backend("w4a16"))`."""
    return QhlBackend(recipe(recipe_, **knobs))


def qhl_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, **_: Any):
    """The `torch_dynamo_backends` entry point behind `torch.compile(model, backend="qhl")`.

    options: {"recipe": name | Recipe | dict, **knobs}; the default recipe is w8a8.
    """
    options = dict(options or {})
    spec = options.pop("recipe", DEFAULT_RECIPE)
    if isinstance(spec, dict):
        spec = Recipe.from_dict(spec)
    return backend(spec, **options)(gm, example_inputs)
