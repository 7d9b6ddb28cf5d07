"""CPU speed of the int4-weight forms with integer activations (w4a8, w4a4, and their Hadamard
presets) against eager float32 and qhl w8a8, in one run.

Four nn.Linear(4096, 4096) in a row at 1, 64 and 256 tokens, each variant compiled with
`torch.compile(backend="qhl")`. The whole compiled call is timed (per-token quantization prologue,
online Hadamard where the recipe has one, GEMM, dequantize epilogue), under no_grad, round-robin
(one call of each variant in turn), median of --reps calls. `w4a8, unpack per call` turns off the
CPU face's cache of unpacked int8 codes (qhl.codegen.w4ax.CPU_UNPACKED_CACHE) to show what it buys.
Writes benchmarks/results/w4ax_speed_cpu.{json,md}.

    .venv/bin/python benchmarks/w4ax_speed.py [--reps 15]
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench_env import machine, round_robin, write_results
from qhl.codegen import w4ax
from speed import compile_qhl, stack

log = logging.getLogger("w4ax_speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TOKENS = (1, 64, 256)
RECIPES = ("w8a8", "w4a8", "hadamard-w4a8", "w4a4", "hadamard-w4a4")


def unpack_per_call(fn: Any) -> Any:
    def call(x: torch.Tensor) -> torch.Tensor:
        w4ax.CPU_UNPACKED_CACHE = False
        try:
            return fn(x)
        finally:
            w4ax.CPU_UNPACKED_CACHE = True

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tag", default="", help="appended to the result file name (e.g. the machine: _avx2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for tokens in TOKENS:
        model = stack()
        fns = {"eager float32": model}
        for recipe in RECIPES:
            fns[recipe] = compile_qhl(model, recipe)
        fns["w4a8, unpack per call"] = unpack_per_call(fns["w4a8"])
        x = torch.randn(tokens, 4096)
        with torch.no_grad():
            timing = round_robin({n: (lambda f=f: f(x)) for n, f in fns.items()}, args.reps)
        base = timing["eager float32"]["median_ms"]
        w8 = timing["w8a8"]["median_ms"]
        for name, t in timing.items():
            rows.append(dict(tokens=tokens, variant=name, **t, vs_eager=base / t["median_ms"], vs_w8a8=w8 / t["median_ms"]))
            log.info("%4d tokens  %-24s %8.2f ms  x%.2f eager  x%.2f w8a8", tokens, name, t["median_ms"],
                     rows[-1]["vs_eager"], rows[-1]["vs_w8a8"])
    write_results(RESULTS / f"w4ax_speed_cpu{args.tag}", dict(machine=machine(), reps=args.reps, rows=rows), markdown)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# int4-weight, integer-activation forms on CPU: 4 x Linear(4096, 4096)",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Medians of {res['reps']} round-robin calls per variant; ratios against eager float32 and "
        "qhl w8a8 from the same run.",
        "",
        "| tokens | variant | median ms | vs eager float32 | vs qhl w8a8 |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['median_ms']:.2f} | {r['vs_eager']:.2f}x | {r['vs_w8a8']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
