"""Fidelity of one scheme on SmolLM2-135M over several 4 x 512-token windows: how much is noise.

fidelity.py measures one window, the issue's (the first 4 x 512 tokens of the news corpus). One
window is a thin basis for "at least as good as torchao": a per-token int8 quantizer in each of
210 layers makes w8a8's logits SQNR chaotic (two computations of the same scheme that differ only
in float32 rounding, qhl compiled whole by Inductor and the same graph run op by op, land 0.2-0.35
dB apart on one window), and an int4 scheme's logits SQNR moves by tenths of a dB from window to
window. This script measures fidelity.py's implementations of `--scheme` (qhl's rows, torchao,
RTN) on `--windows` consecutive windows and reports each window, the mean and standard deviation,
and the paired differences, so that "at least as good as torchao / RTN" is judged against that
spread.

    .venv/bin/python benchmarks/fidelity_windows.py [--scheme w8a8] [--windows 6]

Schemes are fidelity.py's (w8a16, w8a8, w4a16 = g128, w4a16-g64). Writes
benchmarks/results/<scheme>_windows.{json,md}.
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

log = logging.getLogger("fidelity_windows")
SEQS, SEQ_LEN = 4, 512


def runners(model: torch.nn.Module, scheme: str) -> dict[str, Any]:
    """impl -> callable(tokens [n, L]) -> logits, each built once for all windows. The first is
    qhl with the recipe's defaults; the peers come last."""
    out = {}
    for impl, knobs in fidelity.qhl_variants(scheme).items():
        torch._dynamo.reset()
        out[impl] = torch.compile(model, backend=fidelity.qhl_backend(scheme, **knobs))
    out["torchao"], _ = fidelity.torchao_model(model, scheme)
    out["RTN"] = fidelity.rtn_model(model, scheme)
    return out


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def markdown(res: dict[str, Any]) -> str:
    rows, scheme, impls = res["windows"], res["scheme"], res["impls"]
    lines = [
        f"### {scheme} on SmolLM2-135M over {len(rows)} windows of {SEQS}x{SEQ_LEN} tokens - {res['machine']['date']}",
        "",
        f"Machine: {res['machine']['cpu']}; qhl sources {res['machine'].get('qhl', {}).get('sha256', '?')}. Window 0 is the "
        "issue's (fidelity.py's) tokens; window w is tokens [w*2048, (w+1)*2048) of lee_background.cor. "
        "Logits SQNR (dB) against eager float32, and perplexity.",
        "",
        "| window | float32 ppl | " + " | ".join(f"{i} SQNR / ppl" for i in impls) + " |",
        "|---:|---:|" + "---:|" * len(impls),
    ]
    for w, r in enumerate(rows):
        cells = [f"{r[i]['sqnr_db']:.2f} / {r[i]['ppl']:.3f}" for i in impls]
        lines.append(f"| {w} | {r['float32_ppl']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    lines.append("| SQNR mean ± sd (dB) | " + " | ".join(summary([r[i]["sqnr_db"] for r in rows]) for i in impls) + " |")
    lines.append("| ppl rise mean ± sd (%) | " + " | ".join(
        summary([100 * (r[i]["ppl"] / r["float32_ppl"] - 1) for r in rows]) for i in impls) + " |")
    lines += ["", "Paired differences over the windows (mean ± sd of the per-window difference; "
              "ahead = higher SQNR, or lower perplexity):", ""]
    qhl_rows = [i for i in impls if i.startswith("qhl")]
    pairs = [(a, b) for a in qhl_rows for b in ("torchao", "RTN")] + [("qhl", b) for b in qhl_rows[1:]]
    for a, b in pairs:
        diffs = [r[a]["sqnr_db"] - r[b]["sqnr_db"] for r in rows]
        ppl = [100 * (r[a]["ppl"] / r[b]["ppl"] - 1) for r in rows]
        lines.append(f"- {a} - {b}: SQNR {summary(diffs)} dB (ahead on {sum(d >= 0 for d in diffs)}/{len(rows)}), "
                     f"perplexity {summary(ppl)}% (ahead on {sum(p <= 0 for p in ppl)}/{len(rows)})")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="w8a8", choices=list(fidelity.SCHEMES))
    ap.add_argument("--windows", type=int, default=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    host = machine("torchao", "transformers")
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, SEQS * args.windows, SEQ_LEN)
    run = runners(model, args.scheme)
    impls = list(run)
    rows = []
    for w in range(args.windows):
        window = tokens[w * SEQS : (w + 1) * SEQS]
        ref = fidelity.lm_logits(model, window, 1)
        row: dict[str, Any] = {"float32_ppl": perplexity(ref, window)}
        for impl in impls:
            logits = fidelity.lm_logits(run[impl], window, 1)
            row[impl] = {"sqnr_db": sqnr_db(ref, logits), "ppl": perplexity(logits, window)}
        log.info("window %d: %s", w, {i: (round(row[i]["sqnr_db"], 2), round(row[i]["ppl"], 2)) for i in impls})
        rows.append(row)
    res = {"machine": host, "scheme": args.scheme, "impls": impls, "windows": rows, "seconds": time.perf_counter() - t0}
    fidelity.RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    stem = fidelity.RESULTS / f"{args.scheme}_windows"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    log.info("wrote %s.{json,md} (%.0fs)", stem, res["seconds"])


if __name__ == "__main__":
    main()
