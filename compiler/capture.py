"""Capture: the two doors into the same ATen FX graph, with weights bound to their real values.

* Dynamo door (torch.compile): Dynamo hands the backend a torch-level graph whose placeholders
  include every parameter, with the real tensors in `example_inputs`. AOTAutograd lowers it to
  ATen (a forward and, for training, a backward graph) and calls our compilers with *fake*
  tensors; its placeholders keep the order of Dynamo's, so `bind_dynamo_weights` pairs them.
* torch.export door (inspect, ONNX export): `torch.export.export`, then `ep.module()`, whose
  parameters are get_attr nodes with real values.

Both attach a `WeightRef` (WEIGHT_META) to each weight input, which is how passes find weights.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import fx

from qhl.errors import CaptureError
from qhl.graph import WEIGHT_META, WeightRef, attr_value, source_to_path

__all__ = ["bind_dynamo_weights", "weight_paths_from_dynamo", "capture_export", "no_kv_cache"]

log = logging.getLogger(__name__)


def weight_paths_from_dynamo(gm: fx.GraphModule, example_inputs: list[Any]) -> list[str | None]:
    """For each Dynamo placeholder, the parameter/buffer path it stands for (None for real inputs)."""
    paths: list[str | None] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else ""
        source = source() if callable(source) else str(source)
        is_weight = isinstance(value, torch.nn.Parameter) or "_parameters[" in source or "_buffers[" in source
        paths.append(source_to_path(source) or node.name if is_weight and isinstance(value, torch.Tensor) else None)
    return paths


def bind_dynamo_weights(
    aot_gm: fx.GraphModule, real_inputs: list[Any], paths: list[str | None]
) -> int:
    """Attach WeightRefs to the AOT graph's placeholders that are parameters/buffers.

    AOTAutograd's forward/inference graph takes the same flat inputs, in the same order, as the
    Dynamo graph. Returns how many weights were bound.
    """
    placeholders = [n for n in aot_gm.graph.nodes if n.op == "placeholder"]
    bound = 0
    for node, value, path in zip(placeholders, real_inputs, paths):
        if path is None or not isinstance(value, torch.Tensor):
            continue
        fake = node.meta.get("val")
        if fake is not None and tuple(fake.shape) != tuple(value.shape):
            log.warning("placeholder %s does not line up with %s; not treated as a weight", node.name, path)
            continue
        node.meta[WEIGHT_META] = WeightRef(path=path, value=value, trainable=bool(value.requires_grad))
        bound += 1
    return bound


def capture_export(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """torch.export the model and return the unlifted graph with weights bound (get_attr nodes)."""
    if type(model).__name__.startswith("PeftModel") and hasattr(model, "get_base_model"):
        # peft's wrapper forwards (*args, **kwargs), which default dynamic shapes cannot describe;
        # its adapters live in the base model, whose forward is the same computation.
        model = model.get_base_model()
    try:
        ep = torch.export.export(
            model, tuple(example_inputs), kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as e:  # torch.export raises many types; name the model and the fix
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {e}. "
            "Check that the example inputs match forward()'s signature, or use "
            "torch.compile(model, backend='qhl'), which tolerates graph breaks."
        ) from e
    gm = ep.module()
    params = dict(model.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = attr_value(gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 1:
            trainable = bool(getattr(params.get(node.target), "requires_grad", False))
            node.meta[WEIGHT_META] = WeightRef(path=node.target, value=value, trainable=trainable)
    return gm


@contextlib.contextmanager
def no_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """transformers causal LMs return a KV cache object by default, which torch.export cannot
    capture as an output; inspect and the ONNX export capture the full-sequence forward, so they
    turn the cache off meanwhile (use_cache=False, restored after). Every
    config among the model's modules is switched: an encoder-decoder (T5) gives its decoder stack
    its own copy of the config, and that copy decides whether a cache is built."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "use_cache", False) is True}
    if not configs:
        yield
        return
    log.info("capturing %s with use_cache=False (the KV cache is not part of the graph)", type(model).__name__)
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True
