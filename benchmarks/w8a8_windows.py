"""w8a8 fidelity on SmolLM2-135M over several 4 x 512-token windows: how much is noise.

fidelity.py measures one window, the issue's (the first 4 x 512 tokens of the news corpus). A
per-token int8 quantizer in each of 210 layers makes w8a8's logits SQNR chaotic: two computations
of the same scheme that differ only in float32 rounding (qhl compiled whole by Inductor, and the
same graph run op by op) land 0.2-0.35 dB apart on one window. This script measures the same four
implementations as fidelity.py's w8a8 rows on `--windows` consecutive windows and reports each
window, the mean and standard deviation, and the paired differences, so that "at least as good
as torchao / RTN" is judged against that spread.

    .venv/bin/python benchmarks/w8a8_windows.py [--windows 6]

Writes benchmarks/results/w8a8_windows.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from typing import Any

import torch

import fidelity
from bench_env import machine
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("w8a8_windows")
SEQS, SEQ_LEN = 4, 512
IMPLS = ("qhl", "qhl op-by-op", "torchao", "RTN")


def runners(model: torch.nn.Module) -> dict[str, Any]:
    """impl -> callable(tokens [n, L]) -> logits, each built once for all windows."""
    out = {}
    for impl, knobs in fidelity.qhl_variants("w8a8").items():
        out[impl] = torch.compile(model, backend=fidelity.qhl_backend("w8a8", **knobs))
    out["torchao"], _ = fidelity.torchao_model(model, "w8a8")
    out["RTN"] = fidelity.rtn_model(model, "w8a8")
    missing = [i for i in IMPLS if i not in out]
    if missing:
        raise RuntimeError(f"fidelity.py no longer defines {missing}; update IMPLS")
    return out


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def markdown(res: dict[str, Any]) -> str:
    rows = res["windows"]
    lines = [
        f"### w8a8 on SmolLM2-135M over {len(rows)} windows of {SEQS}x{SEQ_LEN} tokens - {res['machine']['date']}",
        "",
        f"Machine: {res['machine']['cpu']}; qhl sources {res['machine'].get('qhl', {}).get('sha256', '?')}. Window 0 is the "
        "issue's (fidelity.py's) tokens; window w is tokens [w*2048, (w+1)*2048) of lee_background.cor. "
        "Logits SQNR (dB) against eager float32, and perplexity.",
        "",
        "| window | float32 ppl | " + " | ".join(f"{i} SQNR / ppl" for i in IMPLS) + " |",
        "|---:|---:|" + "---:|" * len(IMPLS),
    ]
    for w, r in enumerate(rows):
        cells = [f"{r[i]['sqnr_db']:.2f} / {r[i]['ppl']:.3f}" for i in IMPLS]
        lines.append(f"| {w} | {r['float32_ppl']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(IMPLS) + " |", "|---|" + "---:|" * len(IMPLS)]
    lines.append("| SQNR mean ± sd (dB) | " + " | ".join(summary([r[i]["sqnr_db"] for r in rows]) for i in IMPLS) + " |")
    lines.append("| ppl rise mean ± sd (%) | " + " | ".join(
        summary([100 * (r[i]["ppl"] / r["float32_ppl"] - 1) for r in rows]) for i in IMPLS) + " |")
    lines += ["", "Paired differences over the windows (mean ± sd of the per-window difference, dB):", ""]
    for a, b in (("qhl", "torchao"), ("qhl", "RTN"), ("qhl op-by-op", "torchao"), ("qhl", "qhl op-by-op")):
        diffs = [r[a]["sqnr_db"] - r[b]["sqnr_db"] for r in rows]
        wins = sum(d >= 0 for d in diffs)
        lines.append(f"- {a} - {b}: {summary(diffs)} (qhl side ahead on {wins}/{len(diffs)} windows)")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    host = machine("torchao", "transformers")
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, SEQS * args.windows, SEQ_LEN)
    run = runners(model)
    rows = []
    for w in range(args.windows):
        window = tokens[w * SEQS : (w + 1) * SEQS]
        ref = fidelity.lm_logits(model, window, 1)
        row: dict[str, Any] = {"float32_ppl": perplexity(ref, window)}
        for impl in IMPLS:
            logits = fidelity.lm_logits(run[impl], window, 1)
            row[impl] = {"sqnr_db": sqnr_db(ref, logits), "ppl": perplexity(logits, window)}
        log.info("window %d: %s", w, {i: round(row[i]["sqnr_db"], 2) for i in IMPLS})
        rows.append(row)
    res = {"machine": host, "windows": rows, "seconds": time.perf_counter() - t0}
    fidelity.RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (fidelity.RESULTS / "w8a8_windows.json").write_text(json.dumps(res, indent=2) + "\n")
    (fidelity.RESULTS / "w8a8_windows.md").write_text(md)
    print(md)
    log.info("wrote %s (%.0fs)", fidelity.RESULTS / "w8a8_windows.{json,md}", res["seconds"])


if __name__ == "__main__":
    main()
