"""Greedy decoding speed of SmolLM2-135M on CPU: eager float32 against `torch.compile(backend="qhl")`.

Prefill 32 tokens of the offline news corpus into a transformers DynamicCache, then time single-token
decode steps (the model called with one new token and the cache), eager and compiled alternately
step by step (round-robin, each on its own cache), median over --steps after --warmup steps.
This is where a decoder spends its time at batch 1: every Linear runs at one token. It also
reports the first-call compile time (prefill and the first decode steps each compile: a new cache
length is a new shape until Dynamo marks it dynamic) and how many greedy tokens match eager's.
Writes benchmarks/results/decode_cpu{--tag}.{json,md}.

    .venv/bin/python benchmarks/decode.py [--recipes w8a8 w8a16 w4a16:group_size=64] [--steps 24]
        [--dynamic] [--cache static] [--tag _avx2]

A recipe is a preset name, optionally with knobs (`name:knob=value,knob=value`, values as JSON).
--dynamic compiles with `torch.compile(dynamic=True)`: the prompt graph is then dynamic from the
start and the first decode step's graph already has a dynamic cache length, so one graph fewer
compiles (the token count of a decode step, 1, is specialized either way).
"""
from __future__ import annotations

import argparse
import json
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

log = logging.getLogger("decode")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PREFILL = 32
STATIC_CACHE_LEN = 128  # prompt + warmup + timed steps must fit


class Decoder:
    """One greedy decode stream: call step() for the next token's logits and its time.

    cache "dynamic": transformers' DynamicCache, which grows a step at a time (Dynamo compiles the
    first decode step for its cache length, then again with that length dynamic); "static": a
    StaticCache of STATIC_CACHE_LEN positions, the same shapes every step (one decode graph).
    """

    def __init__(self, fn: Any, ids: torch.Tensor, cache: str = "dynamic", config: Any = None):
        from transformers import DynamicCache, StaticCache

        self.fn, self.static = fn, cache == "static"
        self.pos = ids.shape[1]
        kv = StaticCache(config=config, max_cache_len=STATIC_CACHE_LEN) if self.static else DynamicCache()
        out = fn(input_ids=ids, past_key_values=kv, use_cache=True, **self._position(0, self.pos))
        self.cache = kv if self.static else out.past_key_values
        self.next = out.logits[:, -1:].argmax(-1)
        self.tokens: list[int] = []

    def _position(self, start: int, length: int) -> dict[str, Any]:
        return {"cache_position": torch.arange(start, start + length)} if self.static else {}

    def step(self) -> float:
        t0 = time.perf_counter()
        out = self.fn(input_ids=self.next, past_key_values=self.cache, use_cache=True, **self._position(self.pos, 1))
        dt = time.perf_counter() - t0
        self.pos += 1
        if not self.static:
            self.cache = out.past_key_values
        self.next = out.logits[:, -1:].argmax(-1)
        self.tokens.append(int(self.next))
        return dt


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """A recipe argument as (preset, knobs):
    "w4a16:group_size=64,symmetric=false" -> ("w4a16", {"group_size": 64, "symmetric": False})."""
    name, _, rest = text.partition(":")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"recipe knob {item!r} in {text!r}: expected NAME=VALUE")
        knobs[key] = json.loads(value)
    return name, knobs


def run_recipe(model: Any, ids: torch.Tensor, recipe: str, steps: int, warmup: int,
               dynamic: bool = False, cache: str = "dynamic") -> dict[str, Any]:
    torch._dynamo.reset()
    name, knobs = parse_recipe(recipe)
    be = qhl.backend(name, **knobs)
    compiled = torch.compile(model, backend=be, dynamic=True if dynamic else None)
    t0 = time.perf_counter()
    qhl_dec = Decoder(compiled, ids, cache, model.config)
    for _ in range(warmup):
        qhl_dec.step()
    compile_s = time.perf_counter() - t0
    log.info("%s: prefill + %d warmup steps (compiles included) %.0f s", recipe, warmup, compile_s)
    eager_dec = Decoder(model, ids, cache, model.config)
    for _ in range(warmup):
        eager_dec.step()
    times: dict[str, list[float]] = {"eager": [], "qhl": []}
    for i in range(steps):
        order = (("eager", eager_dec), ("qhl", qhl_dec)) if i % 2 == 0 else (("qhl", qhl_dec), ("eager", eager_dec))
        for name, dec in order:
            times[name].append(dec.step())
    eager_ms = statistics.median(times["eager"]) * 1e3
    qhl_ms = statistics.median(times["qhl"]) * 1e3
    same = sum(a == b for a, b in zip(eager_dec.tokens, qhl_dec.tokens))
    first_diff = next((i for i, (a, b) in enumerate(zip(eager_dec.tokens, qhl_dec.tokens)) if a != b), None)
    log.info("%s: decode step %.1f ms vs eager %.1f ms (%.2fx); greedy tokens equal %d/%d", recipe, qhl_ms,
             eager_ms, eager_ms / qhl_ms, same, len(eager_dec.tokens))
    return dict(recipe=recipe, eager_ms=eager_ms, qhl_ms=qhl_ms, speedup=eager_ms / qhl_ms, compile_s=compile_s,
                tokens_equal=same, tokens=len(eager_dec.tokens), first_difference=first_diff,
                graphs=len(be.graphs), codegen=sorted({g.codegen for g in be.graphs}))


def markdown(res: dict[str, Any]) -> str:
    lines = ["# SmolLM2-135M greedy decode on CPU, batch 1", "", f"Machine: {res['machine']}", "",
             f"Prefill {PREFILL} tokens, then {res['steps']} timed decode steps after {res['warmup']} warmup steps, "
             "eager and qhl alternating step by step; medians. "
             f"torch.compile(dynamic={True if res.get('dynamic') else None}); KV cache: {res.get('cache', 'dynamic')}; "
             "Inductor cache directory: "
             f"{res.get('inductor_cache_dir', 'default')}.", "",
             "| recipe | qhl ms / step | eager fp32 ms / step | qhl vs eager | first call + warmup (s) | "
             "greedy tokens equal to eager | graphs (codegen) |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['recipe']} | {r['qhl_ms']:.1f} | {r['eager_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['compile_s']:.0f} | {r['tokens_equal']}/{r['tokens']} (first difference at "
                     f"{r['first_difference']}) | {r['graphs']} ({', '.join(r['codegen'])}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w8a16"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True): one graph fewer")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="transformers' DynamicCache, or a StaticCache: fixed shapes, one decode graph")
    ap.add_argument("--tag", default="", help="appended to the result file name (e.g. the machine: _avx2)")
    args = ap.parse_args()
    if PREFILL + args.warmup + args.steps > STATIC_CACHE_LEN and args.cache == "static":
        raise SystemExit(f"--cache static holds {STATIC_CACHE_LEN} positions: prefill {PREFILL} + warmup + steps must fit")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    ids = news_corpus_tokens(tok, 1, PREFILL)
    rows = []
    with torch.no_grad():
        for recipe in args.recipes:
            rows.append(run_recipe(model, ids, recipe, args.steps, args.warmup, args.dynamic, args.cache))
    res = dict(machine=machine("transformers"), steps=args.steps, warmup=args.warmup, dynamic=args.dynamic,
               cache=args.cache,
               inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"), rows=rows)
    write_results(RESULTS / f"decode_cpu{args.tag}", res, markdown)


if __name__ == "__main__":
    main()
