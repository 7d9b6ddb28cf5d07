"""What Hadamard rotation buys on SmolLM2-135M: perplexity and logits SQNR, in one run.

For each recipe, the model is compiled with torch.compile(backend=qhl.backend(recipe)) and run on
the offline news corpus (4 x 512 tokens by default). Rows:

    float32 (eager), w8a8, w4a8, w4a4, w4a16 g64       no rotation (the baselines)
    hadamard-<form>            the preset: rotation="online" (a Hadamard before every quantized
                               layer), weight_clip="mse" for int4 weights
    hadamard-<form> auto       rotation="auto": offline residual rotation (QuaRot) + online only
                               before o_proj / down_proj
    hadamard (offline|online)  rotation only           must not change the logits (rel. error)

Prints a markdown table and writes results/hadamard_fidelity.{md,json}.

    python benchmarks/hadamard_fidelity.py [--n-seqs 4] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import machine, write_results
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("hadamard_fidelity")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (row label, recipe name, knobs)
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("w8a8", "w8a8", {}),
    ("hadamard-w8a8", "hadamard-w8a8", {}),
    ("hadamard-w8a8 auto", "hadamard-w8a8", {"rotation": "auto"}),
    ("w4a8", "w4a8", {}),
    ("w4a8 clip=mse", "w4a8", {"weight_clip": "mse"}),
    ("hadamard-w4a8", "hadamard-w4a8", {}),
    ("hadamard-w4a8 auto", "hadamard-w4a8", {"rotation": "auto"}),
    ("w4a4", "w4a4", {}),
    ("hadamard-w4a4", "hadamard-w4a4", {}),
    ("hadamard-w4a4 auto", "hadamard-w4a4", {"rotation": "auto"}),
    ("w4a16 g64", "w4a16", {"group_size": 64}),
    ("hadamard-w4a16 g64", "hadamard-w4a16", {"group_size": 64}),
    ("hadamard-w4a16", "hadamard-w4a16", {}),
]
INVARIANCE = [("hadamard offline", {"rotation": "offline"}), ("hadamard online", {"rotation": "online"}),
              ("hadamard auto", {"rotation": "auto"})]


def logits_of(model: Any, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(tokens[i : i + batch]).logits.float() for i in range(0, len(tokens), batch)])


def compiled_logits(model: Any, recipe: str, knobs: dict[str, Any], tokens: torch.Tensor, batch: int):
    torch._dynamo.reset()
    be = qhl.backend(recipe, **knobs)
    t0 = time.perf_counter()
    out = logits_of(torch.compile(model, backend=be), tokens, batch)
    layers = be.graphs[-1].layers if be.graphs else []
    rotated = sum(1 for i in layers if i.rotation)
    summary = f"{sum(1 for i in layers if i.form)}/{len(layers)} quantized, {rotated} rotated"
    return out, summary, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, args.n_seqs, args.seq_len)
    ref = logits_of(model, tokens, args.batch)
    rows: list[dict[str, Any]] = [dict(recipe="float32 (eager)", sqnr_db=math.inf, ppl=perplexity(ref, tokens), layers="")]
    log.info("float32: ppl %.3f", rows[0]["ppl"])
    for label, name, knobs in ROWS:
        out, layers, secs = compiled_logits(model, name, knobs, tokens, args.batch)
        rows.append(dict(recipe=label, sqnr_db=sqnr_db(ref, out), ppl=perplexity(out, tokens), layers=layers))
        log.info("%-22s SQNR %6.2f dB  ppl %10.3f  (%s, %.0fs)", label, rows[-1]["sqnr_db"], rows[-1]["ppl"], layers, secs)
    invariance = []
    for label, knobs in INVARIANCE:
        out, layers, _ = compiled_logits(model, "hadamard", knobs, tokens[:1], 1)
        rel = ((out.double() - ref[:1].double()).norm() / ref[:1].double().norm()).item()
        invariance.append(dict(recipe=label, rel_err=rel, layers=layers))
        log.info("%-22s logits rel. error %.2e (%s)", label, rel, layers)
    result = dict(machine=machine(), n_seqs=args.n_seqs, seq_len=args.seq_len, rows=rows, invariance=invariance)
    write_results(RESULTS / "hadamard_fidelity", result, markdown)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Hadamard rotation on SmolLM2-135M ({result['n_seqs']} x {result['seq_len']} tokens, offline news corpus)",
        "",
        f"Machine: {result['machine']}",
        "",
        "| recipe | logits SQNR (dB) | perplexity | layers |",
        "|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        s = "inf" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.2f}"
        lines.append(f"| {r['recipe']} | {s} | {r['ppl']:.3f} | {r['layers']} |")
    lines += ["", "Rotation only (`hadamard` recipe), logits relative error against float32 (bar: <= 1e-4):", "",
              "| mode | rel. error | layers |", "|---|---:|---|"]
    for r in result["invariance"]:
        lines.append(f"| {r['recipe']} | {r['rel_err']:.2e} | {r['layers']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
