"""The cost of online rotation after ONNX export: SmolLM2-135M in ONNX Runtime (CPU), one run.

Exports SmolLM2 with `w8a8` (no rotation), `hadamard-w8a8` online (the preset: a Hadamard before
every quantized layer, shared by layers reading the same input) and `hadamard-w8a8` auto (offline
residual rotation, online Hadamards only before o_proj and down_proj), plus float32, and times them round-robin in ORT at 1, 64
and 256 tokens (medians of --reps runs). Also reports each export's logits against qhl's own torch
output for the same recipe (cosine) and against float32 (SQNR), so speed and accuracy sit side
by side. Writes results/hadamard_onnx_cpu.{md,json}.

    python benchmarks/hadamard_onnx_speed.py [--reps 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
import tempfile
from functools import partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import cosine, machine, round_robin_ms, sqnr, write_results
from qhl.runtime import ort as qort

log = logging.getLogger("hadamard_onnx_speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TOKENS = (1, 64, 256)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("float32", "float", {}),
    ("w8a8", "w8a8", {}),
    ("hadamard-w8a8 (online)", "hadamard-w8a8", {"rotation": "online"}),
    ("hadamard-w8a8 (auto)", "hadamard-w8a8", {"rotation": "auto"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    model.config.use_cache = False
    ids = news_corpus_tokens(tok, 1, max(TOKENS))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qhl_had_onnx_"))
    sessions, exports, parity = {}, {}, {}
    for label, recipe, knobs in VARIANTS:
        res = qhl.export_onnx(model, (ids[:, :64],), tmp / f"{label.split()[0]}_{len(exports)}.onnx", recipe=recipe, **knobs)
        # spinning off: round-robin sessions with spinning threads slow each other (onnx_speed.py)
        sessions[label] = qort.session(res.path, threads=args.threads, spinning=False)
        exports[label] = dict(seconds=res.seconds, size_bytes=res.size_bytes, ops=res.ops)
        log.info("exported %s in %.0fs (%d bytes)", label, res.seconds, res.size_bytes)
        # parity: ORT against qhl's torch graph for the same recipe, on 64 tokens
        with torch.no_grad():
            torch_out = res.report.graph_module(ids[:, :64])
        torch_logits = torch.utils._pytree.tree_leaves(torch_out)[0].float().numpy()
        parity[label] = cosine(qort.run(sessions[label], (ids[:, :64],))[0], torch_logits)
    rows = []
    for t in TOKENS:
        x = ids[:, :t]
        outs = {n: qort.run(s, (x,))[0] for n, s in sessions.items()}
        feeds = {n: {s.get_inputs()[0].name: x.numpy()} for n, s in sessions.items()}
        times = round_robin_ms({n: partial(s.run, None, feeds[n]) for n, s in sessions.items()}, args.reps, warmup=1)
        base = statistics.median(times["w8a8"])
        for n in sessions:
            med = statistics.median(times[n])
            rows.append(dict(tokens=t, variant=n, median_ms=med, vs_w8a8=med / base,
                             sqnr_db_vs_f32=sqnr(outs["float32"], outs[n])))
            log.info("T=%-4d %-24s %8.2f ms  x%.3f of w8a8  SQNR %.2f dB", t, n, med, med / base, rows[-1]["sqnr_db_vs_f32"])
    result = dict(machine=machine("onnxruntime"), reps=args.reps, rows=rows, exports=exports, parity=parity)
    write_results(RESULTS / "hadamard_onnx_cpu", result, markdown)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Online rotation overhead in ONNX Runtime (SmolLM2-135M, CPU)",
        "",
        f"Machine: {result['machine']}; medians of {result['reps']} runs, round-robin.",
        "",
        "| tokens | export | median ms | time / w8a8 | logits SQNR vs float32 (dB) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['median_ms']:.2f} | {r['vs_w8a8']:.3f} | {r['sqnr_db_vs_f32']:.2f} |")
    lines += ["", "ORT against qhl's torch output for the same recipe (cosine, 64 tokens):", ""]
    lines += [f"- {n}: {c:.6f}" for n, c in result["parity"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
