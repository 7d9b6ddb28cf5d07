"""Packed-weight memory of a SmolLM2-135M decode loop under torch.compile(backend="qhl").

A DynamicCache decode compiles three graphs (the prompt, the first decode step, the first dynamic
cache length). This counts the packed bytes the graphs reference (what they held when each graph
packed its own copy) against the distinct storage behind them (what is held now that a model's
graphs share one packed copy: runtime/packed.pack_once, and fuse_sibling_linears' row views).
Writes benchmarks/results/packed_memory{--tag}.{json,md}.

    .venv/bin/python benchmarks/packed_memory.py [--recipes w8a16 w4a16] [--tag _avx2]
"""
from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import machine, write_results

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def measure(model: Any, ids: torch.Tensor, recipe: str) -> dict[str, Any]:
    from transformers import DynamicCache

    torch._dynamo.reset()
    be = qhl.backend(recipe)
    fn = torch.compile(model, backend=be)
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        for _ in range(3):
            out = fn(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    referenced, storages = 0, {}
    for graph in be.graphs:
        for node in graph.gm.graph.nodes:
            if node.op == "get_attr":
                t = getattr(graph.gm, node.target)
                referenced += t.numel() * t.element_size()
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    fp32 = sum(p.numel() * 4 for name, p in model.named_parameters() if "embed" not in name)
    return dict(recipe=recipe, graphs=len(be.graphs), referenced_mib=referenced / 2**20,
                distinct_mib=sum(storages.values()) / 2**20, float32_mib=fp32 / 2**20)


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Packed weights held by SmolLM2-135M's compiled decode graphs", "", f"Machine: {res['machine']}", "",
             "| recipe | graphs | packed MiB the graphs reference (one copy each) | distinct packed MiB held | "
             "float32 weights without embeddings, MiB |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['recipe']} | {r['graphs']} | {r['referenced_mib']:.1f} | {r['distinct_mib']:.1f} | "
                     f"{r['float32_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["w8a16"])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    ids = news_corpus_tokens(tok, 1, 32)
    rows = [measure(model, ids, r) for r in args.recipes]
    write_results(RESULTS / f"packed_memory{args.tag}", dict(machine=machine("transformers"), rows=rows), markdown)


if __name__ == "__main__":
    main()
