"""Low-rank compression (blocklr, lr-w4a16) against w4a16 at the same weight bytes, SmolLM2-135M.

All 210 linear layers of the decoder (lm_head and embeddings stay float, qhl's default skip
list) are rewritten by every scheme. The byte budget is w4a16's: symmetric int4, group size 64
(g128 would cover only the 30 down projections, because SmolLM2's hidden size 576 is not a
multiple of 128; g64 covers all 210), i.e. per layer N*K/2 bytes of codes + N*K/64 * (4 B
scale + 1 B zero) = 0.578 bytes per weight = a fraction 0.2890625 of the float16 bytes. The
other schemes get `budget=0.2890625`:

  blocklr k=1/2/4  truncated SVD of each block; ranks chosen greedily by sigma^2 over the layer's
                   blocks (k=1: one plain SVD of the layer)
  lr-w4a16 g192    int4 residual at group 192 (0.526 B/weight) + a float16 low-rank part taking
                   the rest of the budget (rank 7 for 576x576 ... 11 for 576x1536);
                   iters=0: SVD split, iters=3: LQ-LoRA alternation (stops when it stops helping)
  lr-w4a16 g64     g64 residual + rank 16: *more* bytes than w4a16 g64 (shown for what the
                   low-rank part buys at the same int4 grid), marked as over budget

Metrics: logits SQNR (dB) against eager float32 and perplexity, on n_seqs x seq_len tokens of
gensim's lee_background.cor (qhl.models.news_corpus_tokens), through
torch.compile(backend=qhl.backend(recipe)) under no_grad. Bytes are the compiled graph's own
(MatmulInfo.weight_bytes_after summed over the rewritten layers: what is stored).
Writes benchmarks/results/compression.{json,md}.

    .venv/bin/python benchmarks/compression.py [--n-seqs 4] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import machine
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("compression")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
W4A16_G64_BUDGET = (0.5 + 5 / 64) / 2  # w4a16 g64 bytes / float16 bytes, every layer (K % 64 == 0)

# label -> (form, knobs)
SCHEMES: dict[str, tuple[str, dict[str, Any]]] = {
    "w4a16 g64": ("w4a16", dict(group_size=64)),
    "blocklr k=1": ("blocklr", dict(lowrank_k=1, budget=W4A16_G64_BUDGET)),
    "blocklr k=2": ("blocklr", dict(lowrank_k=2, budget=W4A16_G64_BUDGET)),
    "blocklr k=4": ("blocklr", dict(lowrank_k=4, budget=W4A16_G64_BUDGET)),
    "lr-w4a16 g192": ("lr-w4a16", dict(group_size=192, budget=W4A16_G64_BUDGET)),
    "lr-w4a16 g192 iters=3": ("lr-w4a16", dict(group_size=192, budget=W4A16_G64_BUDGET, lowrank_iters=3)),
    "lr-w4a16 g64 r=16 (over budget)": ("lr-w4a16", dict(group_size=64, rank=16)),
}


def lm_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(tokens[i : i + 1]).logits.float() for i in range(len(tokens))])


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, args.n_seqs, args.seq_len)
    t0 = time.perf_counter()
    ref = lm_logits(model, tokens)
    rows = [dict(scheme="float32", form=None, knobs={}, sqnr_db=math.inf, ppl=perplexity(ref, tokens),
                 layers="", bytes_before=None, bytes_after=None, seconds=time.perf_counter() - t0)]
    log.info("float32: ppl %.3f", rows[0]["ppl"])
    for label, (form, knobs) in SCHEMES.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        be = qhl.backend(form, **knobs)
        logits = lm_logits(torch.compile(model, backend=be), tokens)
        layers = be.graphs[-1].layers if be.graphs else []
        done = [i for i in layers if i.form == form]
        row = dict(
            scheme=label, form=form, knobs=knobs, sqnr_db=sqnr_db(ref, logits), ppl=perplexity(logits, tokens),
            layers=f"{len(done)}/{len(layers)}",
            bytes_before=sum(i.weight_bytes_before for i in done), bytes_after=sum(i.weight_bytes_after for i in done),
            seconds=time.perf_counter() - t0,
        )
        if form == "lr-w4a16":
            ranks = sorted({int(getattr(g.gm, n.args[1].target).shape[1]) for g in be.graphs[-1:]
                            for n in g.gm.graph.nodes if "lr_w4a16" in str(n.target)})
            row["ranks"] = ranks
        log.info("%-32s SQNR %6.2f dB  ppl %8.3f  layers %s  bytes %d  (%.0fs)", label, row["sqnr_db"], row["ppl"],
                 row["layers"], row["bytes_after"], row["seconds"])
        rows.append(row)
        save(dict(machine=machine(), args=vars(args), budget_fraction_of_fp16=W4A16_G64_BUDGET, smollm2=rows))
    torch._dynamo.reset()
    return dict(machine=machine(), args=vars(args), budget_fraction_of_fp16=W4A16_G64_BUDGET, smollm2=rows)


def save(result: dict[str, Any]) -> None:
    """Write the results so far (after every scheme: a long run that is stopped keeps its rows)."""
    RESULTS.mkdir(exist_ok=True)
    safe = json.loads(json.dumps(result, default=str).replace("Infinity", '"inf"'))
    (RESULTS / "compression.json").write_text(json.dumps(safe, indent=2) + "\n")
    (RESULTS / "compression.md").write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    rows = result["smollm2"]
    ref_bytes = next(r["bytes_after"] for r in rows if r["scheme"] == "w4a16 g64")
    lines = [
        f"### Low-rank compression vs w4a16 at the same bytes - {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}; "
        f"qhl sources {m['qhl']['sha256']}.",
        "",
        f"**SmolLM2-135M-Instruct**, {a['n_seqs']}x{a['seq_len']} tokens of gensim `lee_background.cor`; logits "
        "SQNR vs eager float32 and perplexity. All 210 decoder linears rewritten; lm_head/embeddings float. "
        f"Budget: w4a16 g64's bytes = {result['budget_fraction_of_fp16']:.7f} of the float16 weight bytes "
        "(w4a16 g128 would cover only 30/210 layers: 576 % 128 != 0).",
        "",
        "| scheme | layers | weight bytes (MiB) | vs w4a16 g64 | logits SQNR (dB) | perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["bytes_after"]
        lines.append(
            f"| {r['scheme']} | {r['layers'] or '-'} | {'-' if b is None else f'{b / 2**20:.2f}'} | "
            f"{'-' if b is None else f'{b / ref_bytes:.3f}x'} | "
            f"{'inf' if math.isinf(r['sqnr_db']) else format(r['sqnr_db'], '.2f')} | {r['ppl']:.3f} |"
        )
    f32 = next(r for r in rows if r["scheme"] == "w4a16 g64")["bytes_before"]
    lr_ranks = {r["scheme"]: r.get("ranks") for r in rows if r.get("ranks")}
    lines += [
        "",
        f"float32 bytes of the 210 layers: {f32 / 2**20:.2f} MiB. lr-w4a16 ranks per layer shape: "
        + "; ".join(f"{k}: {v}" for k, v in lr_ranks.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    save(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
