"""Fidelity of the unrotated int4-weight, quantized-activation recipes (w4a8, w4a4) on SmolLM2-135M.

The baselines that Hadamard rotation (issue 5) must improve: logits SQNR (dB) against eager
float32 and perplexity on 4 x 512 tokens of the offline news corpus (as benchmarks/fidelity.py),
for weight_clip "none" (amax / 7 per output channel) and "mse" (per-row clip-ratio search).
lm_head and embeddings stay float (the default skip list). w8a8 is measured in the same run as a
reference point.

    .venv/bin/python benchmarks/w4ax_fidelity.py [--n-seqs 4] [--seq-len 512] [--batch 1]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("w4ax_fidelity")


def lm_logits(model, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(tokens[i : i + batch]).logits.float() for i in range(0, len(tokens), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--schemes", default="w8a8,w4a8,w4a4")
    ap.add_argument("--clips", default="none,mse", help="weight_clip values for the int4 schemes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, args.n_seqs, args.seq_len)
    ref = lm_logits(model, tokens, args.batch)
    print("| recipe | weight_clip | logits SQNR (dB) | perplexity | layers | seconds |\n|---|---|---|---|---|---|")
    print(f"| float32 | - | inf | {perplexity(ref, tokens):.3f} | - | - |", flush=True)
    for scheme in args.schemes.split(","):
        clips = ("none",) if scheme == "w8a8" else tuple(args.clips.split(","))
        for clip in clips:
            torch._dynamo.reset()
            be = qhl.backend(scheme, **({"weight_clip": clip} if scheme != "w8a8" else {}))
            t0 = time.perf_counter()
            out = lm_logits(torch.compile(model, backend=be), tokens, args.batch)
            layers = be.graphs[-1].layers if be.graphs else []
            done = f"{sum(1 for i in layers if i.form)}/{len(layers)}"
            print(f"| {scheme} | {clip} | {sqnr_db(ref, out):.2f} | {perplexity(out, tokens):.3f} | {done} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    torch._dynamo.reset()
    assert math.isfinite(perplexity(ref, tokens))


if __name__ == "__main__":
    main()
