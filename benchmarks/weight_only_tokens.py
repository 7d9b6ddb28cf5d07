"""CPU speed of qhl's weight-only forms (w8a16, w4a16 g128 and g64) across token counts, against eager float32.

4 x nn.Linear(4096, 4096) compiled with `torch.compile(backend=qhl.backend(form), dynamic=False)`
(one graph per token count) at 1 to 256 tokens: decode (1), small decode batches and speculative
verification (2-16), prefill chunks (32-256). Which path runs depends on the token count and the CPU
(codegen/w8a16.py, codegen/w4a16.py): an Inductor GEMV at few tokens, a tiled dequantize-then-GEMM
above. Timed round-robin with eager float32 (bench_env.round_robin_ms), the median of rounds x reps
calls; the ratio's range over the rounds is reported too.

    .venv/bin/python benchmarks/weight_only_tokens.py [--tokens 1,4,16,64,256] [--rounds 3] [--tag _zen5]
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import qhl
from bench_env import machine, round_robin_ms, write_results
from qhl.metrics import sqnr_db

log = logging.getLogger("weight_only_tokens")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# label -> (recipe, knobs); g64 is SmolLM2's group size (its width, 576, is no multiple of 128)
FORMS = {"w8a16": ("w8a16", {}), "w4a16": ("w4a16", {"group_size": 128}), "w4a16 g64": ("w4a16", {"group_size": 64})}


def measure(tokens: list[int], rounds: int, reps: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)]).eval()
    compiled = {f: torch.compile(model, backend=qhl.backend(r, **k), dynamic=False) for f, (r, k) in FORMS.items()}
    rows = []
    with torch.no_grad():
        for m in tokens:
            x = torch.randn(m, 4096)
            fns = {"eager": lambda x=x: model(x), **{f: (lambda x=x, c=c: c(x)) for f, c in compiled.items()}}
            ref = model(x)
            sqnr = {f: sqnr_db(ref, c(x)) for f, c in compiled.items()}  # compiles this token count
            times: dict[str, list[float]] = {n: [] for n in fns}
            ratios: dict[str, list[float]] = {f: [] for f in FORMS}
            for _ in range(rounds):
                t = round_robin_ms(fns, reps, warmup=2)
                for n, v in t.items():
                    times[n] += v
                for f in FORMS:
                    ratios[f].append(statistics.median(t["eager"]) / statistics.median(t[f]))
            med = {n: statistics.median(v) for n, v in times.items()}
            row = dict(tokens=m, eager_ms=med["eager"])
            for f in FORMS:
                row[f] = dict(ms=med[f], speedup=med["eager"] / med[f], range=[min(ratios[f]), max(ratios[f])],
                              sqnr_db=sqnr[f])
            log.info("%4d tokens: eager %.2f ms | %s", m, med["eager"],
                     " | ".join(f"{f} {row[f]['ms']:.2f} ms ({row[f]['speedup']:.2f}x)" for f in FORMS))
            rows.append(row)
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# Weight-only forms across token counts (CPU): {m['cpu']}, {m['cores']} cores", "",
             f"{m['date']}; torch {m['torch']}; qhl sources {m['qhl']['sha256']}; load average {m['load_avg_1m']} at "
             f"start. 4 x Linear(4096, 4096), `torch.compile(backend=qhl.backend(form), dynamic=False)`; median of "
             f"{res['args']['rounds']} rounds x {res['args']['reps']} round-robin calls; [a-b] = the ratio's range "
             "over the rounds.", "",
             "| tokens | eager fp32 ms | " + " | ".join(f"{f} ms | {f} vs eager" for f in FORMS)
             + " | SQNR " + " / ".join(FORMS) + " dB |",
             "|---:|---:|" + "---:|---:|" * len(FORMS) + "---:|"]
    for r in res["rows"]:
        forms = [f for f in FORMS if f in r]
        cells = " | ".join(f"{r[f]['ms']:.2f} | {r[f]['speedup']:.2f}x [{r[f]['range'][0]:.2f}-{r[f]['range'][1]:.2f}]"
                           for f in forms)
        lines.append(f"| {r['tokens']} | {r['eager_ms']:.2f} | {cells} | "
                     + " / ".join(f"{r[f]['sqnr_db']:.1f}" for f in forms) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch._dynamo.config.recompile_limit = 64  # one graph per token count, per form
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    tokens = [int(t) for t in args.tokens.split(",")]
    res = dict(machine=machine(), args=vars(args), rows=measure(tokens, args.rounds, args.reps))
    write_results(RESULTS / f"weight_only_tokens_cpu{args.tag}", res, markdown)


if __name__ == "__main__":
    main()
