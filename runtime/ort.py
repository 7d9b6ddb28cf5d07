"""qhl.runtime.ort: open qhl's ONNX files in ONNX Runtime, compare them with torch, time them.

    sess = session("model.onnx")                       # accuracy level 0: float activations
    outs = run(sess, (ids,))                           # torch tensors in, numpy arrays out
    compare("model.onnx", report.graph_module, (ids,)) # {"cosine", "sqnr_db", "max_abs"}
    timeit(lambda: run(sess, (ids,)), runs=7)          # {"median_ms", "min_ms", "runs"}

Accuracy level: ORT fuses DequantizeLinear -> MatMul into com.microsoft::MatMulNBits, and with
default session options gives the fused node accuracy_level 4, which quantizes the *activations*
to int8 (W4A8 math, not qhl's W4A16). Sessions made here set
`session.qdq_matmulnbits_accuracy_level` to "0" (activations stay float) unless told otherwise.

Skip-LayerNorm fusion: sessions made here turn off ORT's `SkipLayerNormFusion` (Add + LayerNorm ->
com.microsoft SkipLayerNormalization; Add + RMSNorm -> SkipSimplifiedLayerNormalization). In ONNX
Runtime 1.32 on CPU the fused kernel is slower than the two ops it replaces: MiniLM at 8 x 128
tokens spent 11.0 ms in 12 SkipLayerNormalization nodes against 2.6 ms of LayerNormalization
+ 1.1 ms of Add without the fusion (ORT profile, AMD EPYC Zen 5, 2026-12-05). Whole-model, in one
round-robin run: MiniLM float32 1.12x faster, its w8a8/w8a8-tensor/quantize_dynamic files
1.22-1.36x; SmolLM2 at 128 tokens float32 1.06x, w8a8 1.22x. The outputs are the same math
(float32 MiniLM within 7e-6, SmolLM2 identical). `skip_layernorm_fusion=True` keeps ORT's default;
in your own session: `InferenceSession(..., disabled_optimizers=["SkipLayerNormFusion"])`.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qhl.errors import UnsupportedError

__all__ = ["session", "run", "compare", "timeit", "time_session", "OPTIMIZATION_LEVELS",
           "DISABLED_OPTIMIZERS", "u8s8_is_exact"]

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disable")
# ORT graph optimizers qhl's sessions turn off (measured slower than what they replace; see above)
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session(
    path: str | os.PathLike | bytes,
    accuracy_level: int = 0,
    optimization: str = "all",
    threads: int | None = None,
    providers: list[str] | None = None,
    spinning: bool | None = None,
    skip_layernorm_fusion: bool = False,
    save_optimized: str | os.PathLike | None = None,
) -> Any:
    """An onnxruntime.InferenceSession with qhl's settings (see the module docstring).

    `spinning=False` stops ORT's intra-op threads from busy-waiting between nodes
    (`session.intra_op.allow_spinning = 0`); None keeps ORT's default (on). On a small machine
    shared with other work, off was faster for every model measured (docs/onnx.md).
    `skip_layernorm_fusion=False` (the default) turns off ORT's SkipLayerNormFusion, which is
    slower than the ops it fuses on CPU (the module docstring has the measurement).
    `save_optimized`: also write the graph ORT will run (after its fusions) to this path."""
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise UnsupportedError(f"unknown optimization {optimization!r}; valid: {list(OPTIMIZATION_LEVELS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UnsupportedError(f"MatMulNBits accuracy_level must be 0-4, got {accuracy_level}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer it removes
    src = path if isinstance(path, bytes) else str(path)
    if save_optimized is not None:
        so.optimized_model_filepath = str(save_optimized)
    disabled = [] if skip_layernorm_fusion else list(DISABLED_OPTIMIZERS)
    sess = ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    _warn_if_inexact(sess, src)
    return sess


def u8s8_is_exact() -> bool:
    """Whether ONNX Runtime's CPU u8 x s8 integer GEMM is exact here: on x86 only with VNNI
    (AVX-512 VNNI or AVX-VNNI) or AMX; without them it saturates pairs of products to int16
    (see int8_operands in qhl.onnx_export). Other architectures are not flagged."""
    from qhl.codegen.cpu_onednn import is_x86_cpu, x86_has_int8_vnni

    return not is_x86_cpu() or x86_has_int8_vnni()


def _warn_if_inexact(sess: Any, src: Any) -> None:
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("qhl.int8_operands") == "u8s8" and not u8s8_is_exact():
        log.warning(
            "%s was exported with int8_operands='u8s8', and this CPU has no VNNI or AMX: ONNX Runtime's "
            "u8 x s8 GEMM saturates here and its results will be wrong; re-export with int8_operands='u8u8'",
            "the model" if isinstance(src, bytes) else src,
        )


def _feeds(sess: Any, example_inputs: Any) -> dict[str, np.ndarray]:
    leaves, _ = torch.utils._pytree.tree_flatten(example_inputs)
    # An input left as None (an optional argument, e.g. (input_ids, None, decoder_input_ids)) is
    # not an input of the exported graph.
    arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in leaves if x is not None]
    names = [i.name for i in sess.get_inputs()]
    if len(arrays) < len(names):
        raise UnsupportedError(f"the ONNX model takes {len(names)} inputs {names}; got {len(arrays)}")
    # torch.onnx drops inputs the graph does not use (and constants); match the rest in order
    return dict(zip(names, arrays[: len(names)]))


def run(sess: Any, example_inputs: Any) -> list[np.ndarray]:
    """Run a session on torch (or numpy) inputs, flattened in order."""
    return sess.run(None, _feeds(sess, example_inputs))


def _float_leaves(out: Any) -> list[np.ndarray]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    arrays = [x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in leaves]
    return [np.asarray(a, dtype=np.float64) for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating)]


def _metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r, o = ref.reshape(-1), out.reshape(-1)
    denom = float(np.linalg.norm(r) * np.linalg.norm(o))
    err = float(np.sum((r - o) ** 2))
    return {
        "cosine": float(r @ o / denom) if denom > 0 else (1.0 if err == 0 else 0.0),
        "sqnr_db": math.inf if err == 0 else 10 * math.log10(max(float(np.sum(r**2)), 1e-300) / err),
        "max_abs": float(np.max(np.abs(r - o))) if r.size else 0.0,
    }


@torch.no_grad()
def compare(
    onnx_path: str | os.PathLike,
    torch_fn: Callable[..., Any],
    example_inputs: Any,
    sess: Any = None,
    **session_kw: Any,
) -> dict[str, Any]:
    """ORT output vs torch_fn(*example_inputs): worst cosine / SQNR (dB) / max |diff| over the
    float outputs they share, in order, plus "outputs" (how many were compared)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    sess = sess or session(onnx_path, **session_kw)
    got = [np.asarray(a, dtype=np.float64) for a in run(sess, example_inputs) if np.issubdtype(a.dtype, np.floating)]
    want = _float_leaves(torch_fn(*example_inputs))
    pairs = [(w, g) for w, g in zip(want, got) if w.shape == g.shape]
    if not pairs:
        raise UnsupportedError(
            f"no output of {onnx_path} lines up with the torch output "
            f"(onnx shapes {[g.shape for g in got]}, torch shapes {[w.shape for w in want]})"
        )
    each = [_metrics(w, g) for w, g in pairs]
    return {
        "cosine": min(m["cosine"] for m in each),
        "sqnr_db": min(m["sqnr_db"] for m in each),
        "max_abs": max(m["max_abs"] for m in each),
        "outputs": len(each),
    }


def timeit(fn: Callable[[], Any], runs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """Median and min wall time of fn() in ms over `runs` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def time_session(sess: Any, example_inputs: Any, runs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """timeit() of one ORT session on fixed inputs (the feeds are converted once)."""
    feeds = _feeds(sess, example_inputs)
    return timeit(lambda: sess.run(None, feeds), runs=runs, warmup=warmup)
