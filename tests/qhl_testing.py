"""Shared test helpers: capture ATen graphs the way qhl's doors do, render graphs for golden
comparisons, small models, and model factories for the CLI (`tests.qhl_testing:mlp_factory`).

Kept import-light (torch only at module level) so the CLI subprocess can import it fast.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx

__all__ = [
    "make_graph",
    "graph_inputs",
    "run_graph",
    "graph_expr",
    "expected_expr",
    "call_targets",
    "MLP",
    "Conv1D",
    "mlp_factory",
    "fake_quant_module",
]

_INPUTS_META = "qhl_test_inputs"


# --- capture ------------------------------------------------------------------------------------


def make_graph(fn_or_module: Any, *example_inputs: Any, door: str = "aot", training: bool = False) -> fx.GraphModule:
    """The ATen graph qhl's passes see for `fn_or_module(*example_inputs)`.

    door="aot": what the torch.compile door hands the passes: Dynamo -> AOTAutograd (the inference
    graph, or the forward graph of a training step when training=True) with parameters bound to
    their real values (WEIGHT_META) by qhl.capture, and TRAINING_META set like the backend does.
    door="export": qhl.capture.capture_export (torch.export, get_attr weights).
    The real flat inputs of the graph are kept in gm.meta (see graph_inputs / run_graph).
    """
    from qhl.capture import bind_dynamo_weights, capture_export, weight_paths_from_dynamo
    from qhl.graph import TRAINING_META

    if door == "export":
        gm = capture_export(fn_or_module, tuple(example_inputs))
        gm.meta[_INPUTS_META] = tuple(example_inputs)
        return gm
    if door != "aot":
        raise ValueError(f"door must be 'aot' or 'export', got {door!r}")

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    captured: dict[str, Any] = {}

    def capture_backend(gm: fx.GraphModule, inputs: list[Any]):
        real = list(inputs)
        paths = weight_paths_from_dynamo(gm, real)

        def compile_graph(kind: str):
            def compiler(aot_gm: fx.GraphModule, _fake: list[Any]):
                if kind != "backward":
                    bind_dynamo_weights(aot_gm, real, paths)
                    aot_gm.meta[TRAINING_META] = kind == "forward"
                    aot_gm.meta[_INPUTS_META] = tuple(real)
                    captured.setdefault("gm", aot_gm)
                return make_boxed_func(aot_gm)

            return compiler

        return aot_autograd(
            fw_compiler=compile_graph("forward"),
            bw_compiler=compile_graph("backward"),
            inference_compiler=compile_graph("inference"),
        )(gm, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn_or_module, backend=capture_backend, fullgraph=True, dynamic=False)
    if training:
        compiled(*example_inputs)
    else:
        with torch.no_grad():
            compiled(*example_inputs)
    torch._dynamo.reset()
    return captured["gm"]


def graph_inputs(gm: fx.GraphModule) -> tuple[Any, ...]:
    return gm.meta[_INPUTS_META]


@torch.no_grad()
def run_graph(gm: fx.GraphModule, inputs: tuple[Any, ...] | None = None) -> list[torch.Tensor]:
    """Run a captured graph on its real inputs; the flat list of its tensor outputs."""
    out = gm(*(graph_inputs(gm) if inputs is None else inputs))
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def compile_run(model: Any, inputs: tuple[Any, ...], recipe: Any, **knobs: Any) -> tuple[Any, Any]:
    """torch.compile(model, backend=qhl.backend(recipe, **knobs)) on fresh Dynamo state, run once
    under no_grad; returns (output, the backend object with its compiled graphs)."""
    import qhl

    torch._dynamo.reset()
    be = qhl.backend(recipe, **knobs)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*inputs)
    torch._dynamo.reset()
    return out, be


# --- golden rendering -----------------------------------------------------------------------------


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _get_attr_value(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_expr(gm: fx.GraphModule) -> str:
    """The graph's outputs as one nested expression: placeholders are `in<i>` (by position),
    get_attr tensors `attr<dtype[shape]>`, call_function nodes `ns.op.overload(args)`.

    Two graphs that compute the same expression render the same text, whatever their node
    names, so a golden test compares `graph_expr(result) == graph_expr(expected)`.
    """
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}

    def render(a: Any) -> str:
        if isinstance(a, fx.Node):
            if a.op == "placeholder":
                return f"in{placeholders[a]}"
            if a.op == "get_attr":
                v = _get_attr_value(gm, a.target)
                if isinstance(v, torch.Tensor):
                    dtype = str(v.dtype).replace("torch.", "")
                    return f"attr<{dtype}{list(v.shape)}>"
                return f"attr<{a.target}>"
            if a.op == "call_function":
                args = [render(x) for x in a.args]
                args += [f"{k}={render(v)}" for k, v in a.kwargs.items()]
                return f"{_target_name(a.target)}({', '.join(args)})"
            return f"{a.op}:{a.target}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(render(x) for x in a)
            return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else (
                f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
            )
        return repr(a)

    out = next(n for n in gm.graph.nodes if n.op == "output")
    return render(out.args[0])


def expected_expr(fn: Any) -> str:
    """graph_expr of an `expected` function written with torch.ops calls (traced by fx).

    Tensors the function closes over become get_attr constants and render as attr<dtype[shape]>.
    """
    return graph_expr(fx.symbolic_trace(fn))


def call_targets(gm: fx.GraphModule) -> list[str]:
    """The call_function targets of a graph, in order (for 'op X is (not) there' checks)."""
    return [_target_name(n.target) for n in gm.graph.nodes if n.op == "call_function"]


# --- models ---------------------------------------------------------------------------------------


class MLP(torch.nn.Module):
    """fc1 -> relu -> fc2 (-> lm_head when head=True), named like a tiny language model."""

    def __init__(self, d: int = 64, h: int = 128, o: int = 32, head: bool = False, dtype=torch.float32):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h, dtype=dtype)
        self.fc2 = torch.nn.Linear(h, o, dtype=dtype)
        self.lm_head = torch.nn.Linear(o, 16, bias=False, dtype=dtype) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        return self.lm_head(y) if self.lm_head is not None else y


class Conv1D(torch.nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D): weight stored [K, N], y = addmm(b, x, W)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def mlp_factory() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """CLI factory: `qhl inspect tests.qhl_testing:mlp_factory`."""
    torch.manual_seed(0)
    return MLP(head=True).eval(), (torch.randn(2, 8, 64),)


# --- fake-quant eager reference -------------------------------------------------------------------


def fake_quant_module(model: torch.nn.Module, form: str, group_size: int = 128, symmetric: bool = True,
                      skip: tuple[str, ...] = ("lm_head", "*.lm_head"), weight_clip: str | None = None) -> torch.nn.Module:
    """A deep copy of `model` whose nn.Linear / GPT-2 Conv1D layers compute the float64 fake-quant
    reference of `form` (qhl.codegen.quant), cast back to the input dtype: the eager spec of what
    each rewritten layer must compute. weight_clip None: the preset's (w4a16: "grid")."""
    import fnmatch

    import qhl
    from qhl.codegen import quant

    clip = weight_clip or qhl.recipe(form).weight_clip
    ref = copy.deepcopy(model)

    def linear_fn(w_nk: torch.Tensor, b: torch.Tensor | None):
        def f(x: torch.Tensor) -> torch.Tensor:
            if form == "w8a8":
                y = quant.fake_quant_w8a8_linear(x, w_nk, b)
            elif form == "w8a16":
                y = quant.fake_quant_w8a16_linear(x, w_nk, b)
            else:
                y = quant.fake_quant_w4a16_linear(x, w_nk, b, group_size, symmetric, clip)
            return y.to(x.dtype)

        return f

    for name, mod in ref.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        if isinstance(mod, torch.nn.Linear):
            mod.forward = linear_fn(mod.weight.detach(), None if mod.bias is None else mod.bias.detach())
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
            mod.forward = linear_fn(mod.weight.detach().t().contiguous(), mod.bias.detach())
    return ref
