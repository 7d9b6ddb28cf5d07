"""Prompt (prefill) speed of SmolLM2-135M on CPU: eager float32 against `torch.compile(backend="qhl")`.

One forward over a batch-1 prompt of the offline news corpus (no KV cache), at each --tokens length;
eager and every recipe timed round-robin, the order rotating every round, medians over --rounds.
This is where a prompt's time goes: every Linear runs at many tokens (decode.py measures the
single-token steps). Also reports each recipe's first call (capture, passes and Inductor's compile,
with Inductor's caches as they are: the result records TORCHINDUCTOR_CACHE_DIR; set it to a fresh
directory for cold-cache numbers) and the logits' SQNR against eager.
Writes benchmarks/results/prefill_cpu{--tag}.{json,md}.

    .venv/bin/python benchmarks/prefill.py [--recipes w8a8 w8a16] [--tokens 128 512] [--rounds 7]
        [--tag _avx2]

A recipe is a preset name, optionally with knobs (`name:knob=value,knob=value`, values as JSON),
as in decode.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import machine, write_results
from decode import parse_recipe

log = logging.getLogger("prefill")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run(recipes: list[str], tokens: list[int], rounds: int) -> list[dict[str, Any]]:
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    rows = []
    for n in tokens:
        ids = news_corpus_tokens(tok, 1, n)
        fns: dict[str, Any] = {"eager": lambda: model(ids, use_cache=False).logits}
        with torch.no_grad():
            ref = fns["eager"]()
            first: dict[str, float] = {}
            sqnr: dict[str, float] = {}
            for recipe in recipes:
                torch._dynamo.reset()
                name, knobs = parse_recipe(recipe)
                compiled = torch.compile(model, backend=qhl.backend(name, **knobs))
                fn = (lambda c: lambda: c(ids, use_cache=False).logits)(compiled)
                t0 = time.perf_counter()
                out = fn()
                first[recipe] = time.perf_counter() - t0
                sqnr[recipe] = qhl.sqnr_db(ref, out)
                fns[recipe] = fn
                log.info("%d tokens, %s: first call %.1f s, logits SQNR %.1f dB", n, recipe, first[recipe],
                         sqnr[recipe])
            times: dict[str, list[float]] = {k: [] for k in fns}
            names = list(fns)
            for r in range(rounds):
                for k in names[r % len(names):] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
        eager_ms = statistics.median(times["eager"]) * 1e3
        for recipe in recipes:
            ms = statistics.median(times[recipe]) * 1e3
            rows.append(dict(tokens=n, recipe=recipe, qhl_ms=ms, eager_ms=eager_ms, speedup=eager_ms / ms,
                             first_call_s=first[recipe], logits_sqnr_db=sqnr[recipe]))
            log.info("%d tokens, %s: %.1f ms vs eager %.1f ms (%.2fx)", n, recipe, ms, eager_ms, eager_ms / ms)
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = ["# SmolLM2-135M prompt (prefill) on CPU, batch 1", "", f"Machine: {res['machine']}", "",
             f"One forward, no KV cache; eager and qhl round-robin, medians of {res['rounds']} rounds. "
             f"Inductor cache directory: {res.get('inductor_cache_dir', 'default')}.", "",
             "| tokens | recipe | qhl ms | eager fp32 ms | qhl vs eager | first call (s) | logits SQNR |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['tokens']} | {r['recipe']} | {r['qhl_ms']:.1f} | {r['eager_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['first_call_s']:.0f} | {r['logits_sqnr_db']:.1f} dB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w8a16"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tag", default="", help="appended to the result file name (e.g. the machine: _avx2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = dict(machine=machine(), rounds=args.rounds,
               inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
               rows=run(args.recipes, args.tokens, args.rounds))
    write_results(RESULTS / f"prefill_cpu{args.tag}", res, markdown)


if __name__ == "__main__":
    main()
