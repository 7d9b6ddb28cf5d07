"""SmolLM2-135M (real weights) under w4a16 (group size 64) in ONNX Runtime at few tokens: float32
export, qhl's standard file (float activations), and the onnxruntime target with
w4a16_activations "float" and "auto" (int8 halves up to 32 rows on layers of 2^22+ weights,
qhl/onnx_w4a16_halves.py: none of SmolLM2's, so "auto" is the "float" file here).

One forward of a T-token prompt of the offline news corpus, T = 1 / 8 / 64, batch 1, no KV cache
(qhl exports capture without it), so every Linear runs at T rows. Reports per T: median ms
(round-robin, spinning off), speed vs ORT float32, logits cosine and SQNR against qhl's torch graph
for the same recipe (parity) and against float32 torch (fidelity). The embedding and the tied
lm_head stay float in every file (qhl rewrites Linear layers only; the lm_head shares the embedding's
weight): at 49152 x 576, about a fifth of the weights read per token.

    .venv/bin/python benchmarks/onnx_w4a16_llm.py [--reps 21] [--out benchmarks/results/onnx_w4a16_smollm2]
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import cosine, machine, round_robin, sqnr, write_results  # noqa: E402

from qhl.models import load_smollm2, news_corpus_tokens  # noqa: E402
from qhl.onnx_export import export_onnx  # noqa: E402
from qhl.runtime import ort as qort  # noqa: E402

log = logging.getLogger("onnx_w4a16_llm")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TOKENS = (1, 8, 64)
# group size 64: SmolLM2's hidden size 576 is not a multiple of the preset's 128, which would
# leave 180 of its 210 Linears float (qhl.inspect says so per layer)
G64 = dict(recipe="w4a16", group_size=64)
VARIANTS = {
    "float32": dict(recipe="float"),
    "qhl w4a16 g64 (standard)": G64,
    "qhl w4a16 g64 (ort target, float activations)": dict(G64, target="onnxruntime", w4a16_activations="float"),
    "qhl w4a16 g64 (ort target, auto: int8x2 digits <= 32 rows)": dict(G64, target="onnxruntime"),
}


def _logits(out: Any) -> Any:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return leaves[0].detach().float().numpy()


def run(reps: int, tmp: pathlib.Path) -> dict[str, Any]:
    model, tok = load_smollm2()
    ids = news_corpus_tokens(tok, n_seqs=1, seq_len=max(TOKENS))
    files, graphs = {}, {}
    for name, kw in VARIANTS.items():
        res = export_onnx(model, (ids[:, :8],), tmp / f"{len(files)}.onnx", **kw)
        files[name], graphs[name] = res.path, res.report.graph_module
        log.info("%s; %d of %d matmuls rewritten", res, len(res.report.rewritten), len(res.report.layers))
    sessions = {n: qort.session(p, spinning=False) for n, p in files.items()}
    rows = []
    for t in TOKENS:
        x = ids[:, :t]
        with torch.no_grad():
            ref = _logits(model(x))
            torch_q = {n: _logits(g(x)) for n, g in graphs.items()}
        feeds = {n: qort._feeds(s, (x,)) for n, s in sessions.items()}
        outs = {n: s.run(None, feeds[n])[0] for n, s in sessions.items()}
        timing = round_robin({n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}, reps)
        base = timing["float32"]["median_ms"]
        for n in sessions:
            rows.append({"tokens": t, "variant": n, **timing[n], "speedup_vs_f32": base / timing[n]["median_ms"],
                         "cosine_vs_torch_same_recipe": cosine(outs[n], torch_q[n]),
                         "sqnr_db_vs_torch_same_recipe": sqnr(torch_q[n], outs[n]),
                         "sqnr_db_vs_f32": sqnr(ref, outs[n])})
            log.info("T=%d %-58s %8.2f ms x%.2f  parity cos %.7f", t, n, timing[n]["median_ms"],
                     rows[-1]["speedup_vs_f32"], rows[-1]["cosine_vs_torch_same_recipe"])
    return {"rows": rows}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = ["# SmolLM2-135M w4a16 in ONNX Runtime at few tokens", "",
           f"{m['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {res['onnxruntime']}; load {m['load_avg_1m']}. "
           f"One forward of a T-token prompt, batch 1, no KV cache; medians of {res['reps']} round-robin runs, "
           "spinning off. Parity: logits against qhl's torch graph for the same recipe; fidelity: against "
           "float32 torch.", "",
           "| tokens | variant | median ms | vs ORT float32 | parity cosine | parity SQNR dB | SQNR dB vs float32 |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['tokens']} | {r['variant']} | {r['median_ms']:.2f} | {r['speedup_vs_f32']:.2f}x | "
                   f"{r['cosine_vs_torch_same_recipe']:.7f} | {r['sqnr_db_vs_torch_same_recipe']:.1f} | "
                   f"{r['sqnr_db_vs_f32']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out", default=str(RESULTS / "onnx_w4a16_smollm2"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "qhl", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    res: dict[str, Any] = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "reps": args.reps}
    with tempfile.TemporaryDirectory() as d:
        res.update(run(args.reps, pathlib.Path(d)))
    write_results(pathlib.Path(args.out), res, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
