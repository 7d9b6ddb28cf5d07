"""ONNX Runtime (CPU) speed and accuracy of qhl's ONNX exports, against ORT float32 and ORT's own
quantizer, in one run on one machine.

(a) four nn.Linear(4096, 4096) in a row at 1/8/64/256/512 tokens: ORT float32 export, qhl w8a8
    export, qhl w8a8-tensor (per-tensor activations: ORT's DynamicQuantizeMatMul),
    `onnxruntime.quantization.quantize_dynamic` on the float32 export (its defaults, and with
    per_channel=True: the same math as w8a8-tensor), qhl w4a16 (g128; standard, and
    target="onnxruntime" with its default w4a16_activations="auto" and with "float") and w8a16.
    Accuracy: cosine / SQNR vs the float32 output.
(b) all-MiniLM-L6-v2 (real weights) at batch 8 x 128 tokens: float32 (opset 23, qhl's default, and
    opset 21), qhl w8a8 (both targets), quantize_dynamic (on both float32 files), qhl w8a16, qhl
    w4a16, w8a8-tensor, and per-layer mixes of w8a8 and w8a8-tensor (overrides, and
    qhl.mixed_w8a8_recipe). Speed ratios are to the opset-23 float32 file. Accuracy: mean-token (attention-masked)
    embedding cosine vs float32 torch.
(c) the formulations that were measured to choose the w8a8 and w8a16 translations, on one
    Linear(4096, 4096) (hand-built ONNX graphs of the same math).
Plus file sizes. Every ORT session is qhl.runtime.ort.session (MatMulNBits accuracy level 0,
ORT_ENABLE_ALL, ORT's SkipLayerNormFusion off, default threads, intra-op spinning off unless
--spinning: see _session); three MiniLM rows keep the SkipLayerNorm fusion on, ORT's default.
Timings: median of >= 7 runs after warmup, variants timed
round-robin so that a noisy neighbour slows all of them alike.
Writes benchmarks/results/onnx_cpu.{json,md}.

    .venv/bin/python benchmarks/onnx_speed.py [--reps 9] [--skip-minilm] [--skip-formulations]
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import cosine, round_robin, sqnr, write_results  # noqa: E402

import qhl  # noqa: E402
import qhl.codegen.onnx.per_token_quant as ptq  # noqa: E402
from qhl.onnx_export import export_onnx  # noqa: E402
from qhl.runtime import ort as qort  # noqa: E402

log = logging.getLogger("onnx_speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTH, DEPTH = 4096, 4
LEVEL4 = "qhl w4a16 file, session accuracy level 4 (int8 activations: not W4A16)"
ROUND = "qhl w8a8, Round/Clip/Cast quantizer"
U8S8 = "qhl w8a8, int8_operands=u8s8"  # int8 weights: exact only on CPUs with VNNI/AMX
F32_OPSET21 = "float32, opset 21 (attention as MatMul/Softmax/NaN guard)"
QD_DEFAULT = "ORT quantize_dynamic, defaults (also quantizes Attention)"
QD_OPSET21 = "ORT quantize_dynamic on the opset-21 float32 file"
QD_PC = "ORT quantize_dynamic, per_channel=True"  # the same math as qhl w8a8-tensor
WT = "qhl w8a8-tensor"  # per-tensor uint8 activations (DynamicQuantizeLinear), default u8u8
WT_U8S8 = "qhl w8a8-tensor, int8_operands=u8s8"
WT_ORT = "qhl w8a8-tensor, u8s8, ort target"
SLN_ON = "ORT's SkipLayerNorm fusion on"
# Per-layer mixes (recipe overrides): per-tensor activations where a layer loses little (q/k/v read
# LayerNorm outputs), per-token where it loses most (attention output, FFN down)
QKV_TENSOR = {"glob": "*.attention.self.*", "form": "w8a8-tensor"}
UP_TENSOR = {"glob": "*.intermediate.dense", "form": "w8a8-tensor"}
MIX_QKV = "qhl w8a8, w8a8-tensor on q/k/v, u8s8"
MIX_QKV_UP = "qhl w8a8, w8a8-tensor on q/k/v and FFN up, u8s8"
MIXED_4DB = "qhl.mixed_w8a8_recipe(max_loss_db=4), u8s8"  # the per-layer choice, measured
TOKENS = (1, 8, 64, 256, 512)
# the onnxruntime target's default: activations as two int8 halves (ORT's int8 kernel) up to 32
# rows, float above (qhl/onnx_w4a16_halves.py); and the same file with float activations throughout
W4_ORT = "qhl w4a16 (ort target: int8x2 digits <= 32 rows)"
W4_ORT_FLOAT = "qhl w4a16 (ort target, float activations)"


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]).eval()


def quantize_dynamic_file(f32_path: pathlib.Path, out: pathlib.Path, **kw: Any) -> pathlib.Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(f32_path), str(out), weight_type=QuantType.QInt8, **kw)
    return out


SPINNING = False  # --spinning sets ORT's default (on)


def _session(path: Any, **kw: Any) -> Any:
    """qhl.runtime.ort.session with intra-op spinning off (unless --spinning): the variants run
    round-robin, and an idle session whose threads still spin would steal the 2 cores from the
    next one (with spinning on, float32 at 1 token measured 10 ms alone and 58 ms median here)."""
    return qort.session(path, spinning=SPINNING, **kw)


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# --- (a) the 4096 stack ---------------------------------------------------------------------------


def bench_stack(tmp: pathlib.Path, reps: int) -> dict[str, Any]:
    model = stack()
    example = (torch.randn(1, 64, WIDTH),)
    files: dict[str, pathlib.Path] = {}
    export_s: dict[str, float] = {}
    for name, recipe, kw in [
        ("float32", "float", {}),
        ("qhl w8a8", "w8a8", {}),
        ("qhl w8a8 (ort target)", "w8a8", {"target": "onnxruntime"}),
        (U8S8, "w8a8", {"int8_operands": "u8s8"}),
        (WT, "w8a8-tensor", {}),
        (WT_U8S8, "w8a8-tensor", {"int8_operands": "u8s8"}),
        (WT_ORT, "w8a8-tensor", {"int8_operands": "u8s8", "target": "onnxruntime"}),
        ("qhl w8a16", "w8a16", {}),
        ("qhl w4a16", "w4a16", {"group_size": 128}),
        (W4_ORT, "w4a16", {"group_size": 128, "target": "onnxruntime"}),
        (W4_ORT_FLOAT, "w4a16", {"group_size": 128, "target": "onnxruntime", "w4a16_activations": "float"}),
    ]:
        tag = "_".join(str(v) for v in kw.values()) or "std"
        res = export_onnx(model, example, tmp / f"stack_{recipe}_{tag}.onnx", recipe=recipe, **kw)
        files[name], export_s[name] = res.path, res.seconds
        log.info("exported %s in %.1fs: %s", name, res.seconds, res.ops)
    # the same w8a8 export with the Div/Round/Clip/Cast quantizer instead of QuantizeLinear (A/B)
    ptq.QUANTIZER = "round"
    try:
        res = export_onnx(model, example, tmp / "stack_w8a8_round.onnx", recipe="w8a8")
    finally:
        ptq.QUANTIZER = "quantize_linear"
    files[ROUND], export_s[ROUND] = res.path, res.seconds
    t0 = time.perf_counter()
    files["ORT quantize_dynamic"] = quantize_dynamic_file(files["float32"], tmp / "stack_qdyn.onnx")
    export_s["ORT quantize_dynamic"] = time.perf_counter() - t0
    files[QD_PC] = quantize_dynamic_file(files["float32"], tmp / "stack_qdyn_pc.onnx", per_channel=True)
    sessions = {n: _session(p) for n, p in files.items()}
    # not qhl's math: ORT's default accuracy level 4 quantizes the activations (per k-block int8)
    sessions[LEVEL4] = _session(files["qhl w4a16"], accuracy_level=4)
    rows = []
    for t in TOKENS:
        x = torch.randn(1, t, WIDTH, generator=torch.Generator().manual_seed(t))
        outs = {n: qort.run(s, (x,))[0] for n, s in sessions.items()}
        names = list(sessions) if t == 1 else ["float32", "qhl w8a8", ROUND, "qhl w8a8 (ort target)", U8S8,
                                                   WT, WT_U8S8, WT_ORT, "ORT quantize_dynamic", QD_PC,
                                                   "qhl w4a16", W4_ORT, W4_ORT_FLOAT, LEVEL4]
        timing = round_robin({n: (lambda s=sessions[n], f={sessions[n].get_inputs()[0].name: x.numpy()}: s.run(None, f))
                              for n in names}, reps)
        base, best = timing["float32"]["median_ms"], timing["float32"]["min_ms"]
        for n in names:
            rows.append({
                "tokens": t, "variant": n, **timing[n], "speedup_vs_f32": base / timing[n]["median_ms"],
                "best_run_speedup_vs_f32": best / timing[n]["min_ms"],
                "cosine_vs_f32": cosine(outs[n], outs["float32"]), "sqnr_db_vs_f32": sqnr(outs["float32"], outs[n]),
            })
            log.info("stack T=%d %-24s %8.2f ms  x%.2f  cos %.6f", t, n, timing[n]["median_ms"],
                     base / timing[n]["median_ms"], rows[-1]["cosine_vs_f32"])
    sizes = {n: _size(p) for n, p in files.items()}
    return {"rows": rows, "sizes": sizes, "export_s": export_s}


# --- (b) MiniLM -------------------------------------------------------------------------------------


def bench_minilm(tmp: pathlib.Path, reps: int) -> dict[str, Any]:
    from qhl.models import load_minilm, sentiment_sentences

    enc, tok = load_minilm()
    batch = tok(sentiment_sentences(8), padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    example = (batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].numpy()[..., None].astype(np.float64)

    def embed(hidden: np.ndarray) -> np.ndarray:
        return (hidden * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        ref = embed(enc(*example)[0].numpy())
    files, export_s, torch_cos, notes = {}, {}, {}, []
    for name, recipe, kw in [("float32", "float", {}), (F32_OPSET21, "float", {"opset": 21}),
                             ("qhl w8a8", "w8a8", {}), ("qhl w8a8 (ort target)", "w8a8", {"target": "onnxruntime"}),
                             (U8S8, "w8a8", {"int8_operands": "u8s8"}), (WT, "w8a8-tensor", {}),
                             (WT_U8S8, "w8a8-tensor", {"int8_operands": "u8s8"}),
                             (WT_ORT, "w8a8-tensor", {"int8_operands": "u8s8", "target": "onnxruntime"}),
                             (MIX_QKV, "w8a8", {"int8_operands": "u8s8", "overrides": [QKV_TENSOR]}),
                             (MIX_QKV_UP, "w8a8", {"int8_operands": "u8s8", "overrides": [QKV_TENSOR, UP_TENSOR]}),
                             (MIXED_4DB, qhl.mixed_w8a8_recipe(enc, example, max_loss_db=4.0), {"int8_operands": "u8s8"}),
                             ("qhl w8a16", "w8a16", {}), ("qhl w4a16", "w4a16", {})]:
        tag = f"{len(files)}_" + "_".join(str(v) for v in kw.values() if isinstance(v, str))
        res = export_onnx(enc, example, tmp / f"minilm_{tag}.onnx", recipe=recipe, **kw)
        files[name], export_s[name] = res.path, res.seconds
        with torch.no_grad():
            torch_cos[name] = float(np.mean([cosine(a, b) for a, b in zip(embed(res.report.graph_module(*example)[0].numpy()), ref)]))
    # ORT's quantizer on the same float32 file (opset 23). With its defaults it also rewrites the
    # Attention node into a com.microsoft QAttention that ORT 1.32 then rejects (it copies the
    # is_causal attribute); quantizing only the MatMuls is its fair equivalent of qhl's w8a8 (both
    # leave attention float). Also on the opset-21 float file, where its defaults work.
    for name, src, kw in [(QD_DEFAULT, "float32", {}), ("ORT quantize_dynamic", "float32", {"op_types_to_quantize": ["MatMul"]}),
                          (QD_PC, "float32", {"op_types_to_quantize": ["MatMul"], "per_channel": True}),
                          (QD_OPSET21, F32_OPSET21, {})]:
        t0 = time.perf_counter()
        path = quantize_dynamic_file(files[src], tmp / f"minilm_qdyn_{len(files)}.onnx", **kw)
        try:
            probe = qort.session(path)
            probe.run(None, qort._feeds(probe, example))
        except Exception as e:  # noqa: BLE001 - report ORT's refusal, do not time it
            msg = " ".join(str(e).split("Status Message:")[-1].split())[-240:]
            log.warning("%s fails in ORT: %s", name, msg)
            notes.append(f"{name}: the file fails in ONNX Runtime {ort_version()}: {msg}")
            continue
        files[name], export_s[name] = path, time.perf_counter() - t0
    sessions = {n: _session(p) for n, p in files.items()}
    # qhl's sessions turn off ORT's SkipLayerNormFusion (slower on CPU, runtime/ort.py); these
    # rows keep it on, ORT's default, for the comparison
    for n in ("float32", WT_U8S8, "ORT quantize_dynamic"):
        files[f"{n}, {SLN_ON}"] = files[n]
        sessions[f"{n}, {SLN_ON}"] = _session(files[n], skip_layernorm_fusion=True)
    feeds = {n: qort._feeds(s, example) for n, s in sessions.items()}
    timing = round_robin({n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}, reps)
    base, best = timing["float32"]["median_ms"], timing["float32"]["min_ms"]
    rows = []
    for n, s in sessions.items():
        emb = embed(s.run(None, feeds[n])[0])
        cos = [cosine(a, b) for a, b in zip(emb, ref)]
        rows.append({"variant": n, **timing[n], "speedup_vs_f32": base / timing[n]["median_ms"],
                     "best_run_speedup_vs_f32": best / timing[n]["min_ms"],
                     "embedding_cosine_vs_f32": float(np.mean(cos)), "embedding_cosine_min": float(np.min(cos)),
                     "torch_embedding_cosine_vs_f32": torch_cos.get(n), "size_bytes": _size(files[n])})
        log.info("MiniLM %-22s %8.2f ms  x%.2f  emb cos %.5f", n, timing[n]["median_ms"], rows[-1]["speedup_vs_f32"], rows[-1]["embedding_cosine_vs_f32"])
    return {"rows": rows, "export_s": export_s, "batch": list(example[0].shape), "notes": notes}


# --- (c) formulations on one Linear(4096, 4096) -----------------------------------------------------


def _formulation_models() -> dict[str, Any]:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from qhl.codegen import quant

    torch.manual_seed(0)
    w = torch.randn(WIDTH, WIDTH) * 0.02
    wq, ws = (t.numpy() for t in quant.quantize_int8_per_channel(w))
    k = WIDTH

    def c(name, a):
        return nh.from_array(np.asarray(a), name)

    prologue = [
        h.make_node("Abs", ["x"], ["ax"]), h.make_node("ReduceMax", ["ax", "m1"], ["amax"], keepdims=1),
        h.make_node("Div", ["amax", "c127"], ["s0"]), h.make_node("Greater", ["s0", "zero"], ["gt"]),
        h.make_node("Where", ["gt", "s0", "one"], ["sx"]),
    ]
    pro_init = [c("m1", np.array([-1], np.int64)), c("c127", np.float32(127)), c("zero", np.float32(0)),
                c("one", np.float32(1)), c("wqT", wq.T.copy()), c("ws", ws)]
    epilogue = [h.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT), h.make_node("Mul", ["accf", "sx"], ["m"]),
                h.make_node("Mul", ["m", "ws"], ["y"])]
    variants = {
        "w8a8 s8s8: Round/Clip/Cast int8 + MatMulInteger": (
            [h.make_node("Div", ["x", "sx"], ["xs"]), h.make_node("Round", ["xs"], ["xr"]),
             h.make_node("Clip", ["xr", "lo", "hi"], ["xc"]), h.make_node("Cast", ["xc"], ["xq"], to=T.INT8),
             h.make_node("MatMulInteger", ["xq", "wqT"], ["acc"])],
            [c("lo", np.float32(-127)), c("hi", np.float32(127))]),
        "w8a8 u8 zp128: Round/Add/Clip/Cast + MatMulInteger": (
            [h.make_node("Div", ["x", "sx"], ["xs"]), h.make_node("Round", ["xs"], ["xr"]),
             h.make_node("Add", ["xr", "c128"], ["xa"]), h.make_node("Clip", ["xa", "lo", "hi"], ["xc"]),
             h.make_node("Cast", ["xc"], ["xq"], to=T.UINT8), h.make_node("MatMulInteger", ["xq", "wqT", "azp"], ["acc"])],
            [c("lo", np.float32(1)), c("hi", np.float32(255)), c("c128", np.float32(128)), c("azp", np.uint8(128))]),
        "w8a8 u8 zp128 x s8: blocked QuantizeLinear + MatMulInteger (qhl, int8_operands=u8s8)": (
            [h.make_node("Shape", ["sx"], ["shp"]), h.make_node("Expand", ["azp", "shp"], ["zpe"]),
             h.make_node("QuantizeLinear", ["x", "sx", "zpe"], ["xq"], axis=-1, block_size=k),
             h.make_node("MatMulInteger", ["xq", "wqT", "azp"], ["acc"])],
            [c("azp", np.uint8(128))]),
        "w8a8 u8 zp128 x u8 zp128: blocked QuantizeLinear + MatMulInteger (qhl default, u8u8)": (
            [h.make_node("Shape", ["sx"], ["shp"]), h.make_node("Expand", ["azp", "shp"], ["zpe"]),
             h.make_node("QuantizeLinear", ["x", "sx", "zpe"], ["xq"], axis=-1, block_size=k),
             h.make_node("MatMulInteger", ["xq", "wqTu", "azp", "azp"], ["acc"])],
            [c("azp", np.uint8(128)), c("wqTu", (wq.T.astype(np.int16) + 128).astype(np.uint8))]),
        "w8a8 QDQ: Q -> DQ (per token) + DQ(W) + MatMul": (
            [h.make_node("Shape", ["sx"], ["shp"]), h.make_node("Expand", ["azp", "shp"], ["zpe"]),
             h.make_node("QuantizeLinear", ["x", "sx", "zpe"], ["xq"], axis=-1, block_size=k),
             h.make_node("DequantizeLinear", ["xq", "sx", "zpe"], ["xd"], axis=-1, block_size=k),
             h.make_node("DequantizeLinear", ["wqT", "ws"], ["wd"], axis=1), h.make_node("MatMul", ["xd", "wd"], ["y"])],
            [c("azp", np.uint8(128))]),
    }
    models = {}
    for name, (body, init) in variants.items():
        nodes = prologue + body + ([] if "QDQ" in name else epilogue)
        models[name] = (nodes, pro_init + init)
    # weight-only int8: no activation prologue
    models["w8a16 Cast(W) + MatMul + Mul (qhl)"] = (
        [h.make_node("Cast", ["wqT"], ["wf"], to=T.FLOAT), h.make_node("MatMul", ["x", "wf"], ["mm"]),
         h.make_node("Mul", ["mm", "ws"], ["y"])], [c("wqT", wq.T.copy()), c("ws", ws)])
    models["w8a16 DequantizeLinear + MatMul (-> 8-bit MatMulNBits)"] = (
        [h.make_node("DequantizeLinear", ["wqT", "ws"], ["wd"], axis=1), h.make_node("MatMul", ["x", "wd"], ["y"])],
        [c("wqT", wq.T.copy()), c("ws", ws)])
    models["float32 MatMul"] = ([h.make_node("MatMul", ["x", "w"], ["y"])], [c("w", w.numpy().T.copy())])
    out = {}
    for name, (nodes, init) in models.items():
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["M", k])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["M", k])], init)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
        m.ir_version = 10
        onnx.checker.check_model(m)
        out[name] = m.SerializeToString()
    return out


def bench_formulations(reps: int) -> list[dict[str, Any]]:
    sessions, rows = {}, []
    probe = np.ones((4, WIDTH), np.float32)
    for n, b in _formulation_models().items():
        try:  # a formulation ORT mis-fuses fails at run time: report it, do not time it
            s = _session(b)
            s.run(None, {"x": probe})
            sessions[n] = s
        except Exception as e:  # noqa: BLE001
            msg = " ".join(str(e).split("Status Message:")[-1].split())[:300]
            log.warning("formulation %s fails in ORT: %s", n, msg)
            rows.append({"tokens": None, "formulation": n, "error": msg})
    for t in (1, 64, 256):
        x = np.random.default_rng(t).standard_normal((t, WIDTH)).astype(np.float32)
        timing = round_robin({n: (lambda s=s: s.run(None, {"x": x})) for n, s in sessions.items()}, reps)
        ref = sessions["float32 MatMul"].run(None, {"x": x})[0]
        base = timing["float32 MatMul"]["median_ms"]
        for n, s in sessions.items():
            y = s.run(None, {"x": x})[0]
            rows.append({"tokens": t, "formulation": n, **timing[n], "speedup_vs_f32": base / timing[n]["median_ms"],
                         "cosine_vs_f32": cosine(y, ref)})
            log.info("formulation T=%d %-60s %8.2f ms x%.2f", t, n, timing[n]["median_ms"], base / timing[n]["median_ms"])
    return rows


# --- report -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or "?"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "u8s8_exact": qort.u8s8_is_exact(),
    }


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = ["# qhl ONNX export on ONNX Runtime (CPU)", "",
           f"{m['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, torch {m['torch']}; "
           f"load average at start {', '.join(f'{v:.1f}' for v in m['load_avg_at_start'])} (shared machine: medians of "
           f"{res['reps']} round-robin runs). Sessions: ORT_ENABLE_ALL, SkipLayerNormFusion off unless marked, "
           f"MatMulNBits accuracy level 0, intra-op "
           f"spinning {'on (ORT default)' if res.get('spinning') else 'off'}. ORT's u8 x s8 GEMM exact on this CPU "
           f"(VNNI or AMX): {m.get('u8s8_exact', '?')}; qhl's default int8_operands is u8u8 (exact everywhere).", ""]
    if "stack" in res:
        s = res["stack"]
        out += ["## 4 x Linear(4096, 4096)", "",
                "| tokens | variant | median ms | vs ORT float32 (median) | (best run) | cosine vs f32 | SQNR dB |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            out.append(f"| {r['tokens']} | {r['variant']} | {r['median_ms']:.2f} | {r['speedup_vs_f32']:.2f}x | "
                       f"{r['best_run_speedup_vs_f32']:.2f}x | {r['cosine_vs_f32']:.6f} | {r['sqnr_db_vs_f32']:.1f} |")
        f32 = s["sizes"]["float32"]
        out += ["", "| file | MiB | vs float32 |", "|---|---:|---:|"]
        out += [f"| {n} | {b / 2**20:.1f} | {b / f32:.3f}x |" for n, b in s["sizes"].items()]
    if "minilm" in res:
        mm = res["minilm"]
        out += ["", f"## all-MiniLM-L6-v2, batch {mm['batch'][0]} x {mm['batch'][1]} tokens", "",
                "| variant | median ms | vs ORT float32 (median) | (best run) | embedding cosine vs f32 (mean / min) "
                "| same recipe in torch | MiB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in mm["rows"]:
            tc = r["torch_embedding_cosine_vs_f32"]
            out.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['speedup_vs_f32']:.2f}x | "
                       f"{r['best_run_speedup_vs_f32']:.2f}x | "
                       f"{r['embedding_cosine_vs_f32']:.5f} / {r['embedding_cosine_min']:.5f} | "
                       f"{'-' if tc is None else f'{tc:.5f}'} | {r['size_bytes'] / 2**20:.1f} |")
        out += [""] + [f"* {n}" for n in mm.get("notes", [])]
    if "formulations" in res:
        out += ["", "## Formulations measured (one Linear(4096, 4096))", "",
                "| tokens | formulation | median ms | vs float32 MatMul | cosine vs f32 |", "|---:|---|---:|---:|---:|"]
        for r in res["formulations"]:
            if "error" in r:
                out.append(f"| all | {r['formulation']} | fails in ORT: {r['error'].split(') const ')[-1][:200]} | | |")
                continue
            out.append(f"| {r['tokens']} | {r['formulation']} | {r['median_ms']:.2f} | {r['speedup_vs_f32']:.2f}x | "
                       f"{r['cosine_vs_f32']:.6f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--skip-stack", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-formulations", action="store_true")
    p.add_argument("--spinning", action="store_true", help="keep ORT's spinning intra-op threads (its default)")
    p.add_argument("--out", default=str(RESULTS / "onnx_cpu"))
    args = p.parse_args(argv)
    global SPINNING
    SPINNING = args.spinning
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "qhl", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    res: dict[str, Any] = {"machine": machine(), "reps": max(7, args.reps), "spinning": SPINNING}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        if not args.skip_formulations:
            res["formulations"] = bench_formulations(res["reps"])
        if not args.skip_stack:
            res["stack"] = bench_stack(tmp, res["reps"])
        if not args.skip_minilm:
            res["minilm"] = bench_minilm(tmp, res["reps"])
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    write_results(pathlib.Path(args.out), res, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
