"""qhl's rows of fidelity.py alone: SmolLM2-135M logits SQNR and perplexity on the issue's 4 x 512
news-corpus tokens, for the given recipes, compiled with torch.compile(backend=qhl.backend(r)).

For a machine where the peers cannot be run in reasonable time (torchao's int8 GEMM is ~20x
slower than float32 on a CPU with AVX2 alone). Writes results/fidelity_qhl<tag>.{json,md}.

    python benchmarks/fidelity_qhl_only.py --recipes w8a8 w8a16 --tag _avx2
    python benchmarks/fidelity_qhl_only.py --recipes w8a16 'w8a16:skip=["*embed*"]'   # lm_head too

A recipe may carry knobs as in decode.py (`name:knob=value,...`, values as JSON).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

import qhl
from bench_env import machine
from decode import parse_recipe
from fidelity import RESULTS, lm_logits
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("fidelity_qhl_only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w8a16"])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    host = machine()
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, 4, 512)
    ref = lm_logits(model, tokens, 1)
    rows = [dict(recipe="float32", sqnr_db=None, ppl=perplexity(ref, tokens), seconds=None)]
    for name in args.recipes:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        preset, knobs = parse_recipe(name)
        logits = lm_logits(torch.compile(model, backend=qhl.backend(preset, **knobs)), tokens, 1)
        rows.append(dict(recipe=name, sqnr_db=sqnr_db(ref, logits), ppl=perplexity(logits, tokens),
                         seconds=time.perf_counter() - t0))
        log.info("%s: SQNR %.2f dB, ppl %.3f", name, rows[-1]["sqnr_db"], rows[-1]["ppl"])
    f32 = rows[0]["ppl"]
    md = ["# qhl fidelity, SmolLM2-135M, 4 x 512 news tokens (qhl rows only)", "",
          f"{host.get('date', '')} {host.get('cpu', '')}", "",
          "| recipe | logits SQNR | perplexity | vs float32 |", "|---|---:|---:|---:|"]
    for r in rows:
        sq = "—" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f} dB"
        md.append(f"| {r['recipe']} | {sq} | {r['ppl']:.3f} | {100 * (r['ppl'] / f32 - 1):+.2f}% |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"fidelity_qhl{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(dict(machine=host, rows=rows), indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
