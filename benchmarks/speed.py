"""CPU speed of qhl's compiled quantized matmuls against eager float32 and torchao, in one run.

(a) four nn.Linear(4096, 4096) in a row at 1/64/256/512 tokens: eager float32, qhl w8a8
    (`torch.compile(backend="qhl")`), torchao Int8DynamicActivationInt8WeightConfig + inductor, and
    qhl w8a8-tensor (one activation scale per call, the form ONNX Runtime fuses).
(b) qhl w8a16 and w4a16 (g128) on the same stack at 1 token, against eager float32; and the same
    with w8a8 at 4 tokens (a small decode batch), where the CPU faces still run one GEMV per token.
(c) wall-clock of SmolLM2-135M's first call under qhl w8a8 (capture + passes + packing).

Every timing is the whole compiled call (per-token quantization prologue, GEMM and dequantize
epilogue included), under no_grad, after warmup: the median of rounds x reps (>= 7) calls. Variants
are timed round-robin (one call of each in turn, the order rotating every repetition) so that a
noisy neighbour or a cache another variant evicted slows all of them alike, and the rounds are
spread over the run; the spread of the per-round ratios is reported too.
Writes benchmarks/results/speed_cpu.{json,md}.

    .venv/bin/python benchmarks/speed.py [--quick] [--reps 7] [--rounds 3] [--threads 1]
    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python benchmarks/speed.py     # huge pages for torch's buffers
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import qhl
from bench_env import json_safe, machine, rotated
from qhl.metrics import sqnr_db

log = logging.getLogger("speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTH, DEPTH = 4096, 4


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]).eval()


def compile_qhl(model: nn.Module, recipe: str, **knobs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    # dynamic=False: one specialised graph per token count, for qhl and inductor alike.
    return torch.compile(model, backend="qhl", options={"recipe": recipe, **knobs}, dynamic=False)


def compile_torchao(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(m, dynamic=False)


class Bench:
    """Variants timed round-robin, one call of each in turn; samples accumulate over rounds.

    The first call of each variant (compilation) is timed on its own, then `warmup` calls are
    discarded. A variant that fails is reported with its error, never dropped silently.
    """

    def __init__(self, fns: dict[str, Callable[[], Any]], warmup: int):
        self.out: dict[str, dict[str, Any]] = {}
        self.live: dict[str, Callable[[], Any]] = {}
        for name, fn in fns.items():
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fn()
                    self.out[name] = {"first_call_s": time.perf_counter() - t0}
                    for _ in range(warmup):
                        fn()
                self.live[name] = fn
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not hidden
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
                log.error("%s FAILED: %s", name, msg)
                self.out[name] = {"error": msg, "median_ms": math.nan}
        self.times: dict[str, list[float]] = {n: [] for n in self.live}
        self.rounds: dict[str, list[float]] = {n: [] for n in self.live}

    def sample(self, reps: int) -> None:
        batch: dict[str, list[float]] = {n: [] for n in self.live}
        with torch.no_grad():
            for rep in range(reps):
                for name in rotated(list(self.live), rep):
                    fn = self.live[name]
                    t0 = time.perf_counter()
                    fn()
                    batch[name].append((time.perf_counter() - t0) * 1e3)
        for name, ts in batch.items():
            self.times[name] += ts
            self.rounds[name].append(statistics.median(ts))

    def summary(self) -> dict[str, dict[str, Any]]:
        for name, ts in self.times.items():
            self.out[name].update(median_ms=statistics.median(ts), min_ms=min(ts), runs=len(ts),
                                  round_medians_ms=self.rounds[name])
        return self.out


def _ratio_range(num: dict[str, Any], den: dict[str, Any]) -> list[float]:
    """min and max over rounds of num/den round medians: how much the ratio moved with the noise."""
    pairs = [a / b for a, b in zip(num.get("round_medians_ms", []), den.get("round_medians_ms", []))]
    return [min(pairs), max(pairs)] if pairs else [math.nan, math.nan]


def part_a(tokens: list[int], warmup: int, reps: int, rounds: int) -> list[dict[str, Any]]:
    torch._dynamo.reset()
    model = stack()
    qhl_c = compile_qhl(model, "w8a8")
    qt_c = compile_qhl(model, "w8a8-tensor")  # one activation scale per call (ONNX Runtime's form)
    ao_c = compile_torchao(model)
    xs = {m: torch.randn(m, WIDTH) for m in tokens}
    benches = {}
    for m, x in xs.items():
        log.info("(a) %d tokens: compiling eager / qhl w8a8 / torchao int8dq", m)
        fns = {"eager": lambda x=x: model(x), "qhl": lambda x=x: qhl_c(x), "torchao": lambda x=x: ao_c(x),
               "qhl w8a8-tensor": lambda x=x: qt_c(x)}
        benches[m] = Bench(fns, warmup)
    # Rounds spread each token count's samples over the whole run, so a burst of load from a
    # neighbour lands on every token count rather than ruining one of them.
    for rnd in range(rounds):
        log.info("(a) timing round %d/%d", rnd + 1, rounds)
        for m in tokens:
            benches[m].sample(reps)
    rows = []
    for m, x in xs.items():
        r = benches[m].summary()
        with torch.no_grad():
            ref = model(x)
            for name, fn in (("qhl", qhl_c), ("torchao", ao_c), ("qhl w8a8-tensor", qt_c)):
                if "error" not in r[name]:
                    r[name]["sqnr_db"] = sqnr_db(ref, fn(x))
        e, q, t = (r[k]["median_ms"] for k in ("eager", "qhl", "torchao"))
        rows.append(dict(tokens=m, results=r, qhl_speedup_vs_eager=e / q, torchao_speedup_vs_eager=e / t,
                         qhl_vs_torchao=t / q, qhl_speedup_range=_ratio_range(r["eager"], r["qhl"]),
                         qhl_vs_torchao_range=_ratio_range(r["torchao"], r["qhl"]),
                         qhl_tensor_speedup_vs_eager=e / r["qhl w8a8-tensor"]["median_ms"]))
        log.info("(a) %4d tokens: eager %.2f ms | qhl %.2f ms (%.2fx) | torchao %.2f ms (%.2fx) | "
                 "qhl/torchao speed %.2fx", m, e, q, e / q, t, e / t, t / q)
    return rows


def part_b(warmup: int, reps: int, rounds: int, tokens: int = 1) -> dict[str, Any]:
    torch._dynamo.reset()
    model = stack()
    x = torch.randn(tokens, WIDTH)
    fns: dict[str, Callable[[], Any]] = {"eager": lambda: model(x)}
    compiled = {"w8a16": compile_qhl(model, "w8a16"), "w4a16": compile_qhl(model, "w4a16", group_size=128)}
    if tokens > 1:
        compiled["w8a8"] = compile_qhl(model, "w8a8")
    for name, c in compiled.items():
        fns[f"qhl {name}"] = lambda c=c: c(x)
    log.info("(b) %d token(s): compiling and timing eager / qhl %s", tokens, " / qhl ".join(compiled))
    bench = Bench(fns, warmup)
    for _ in range(rounds):
        bench.sample(reps)
    r = bench.summary()
    with torch.no_grad():
        ref = model(x)
        for name, c in compiled.items():
            if "error" not in r[f"qhl {name}"]:
                r[f"qhl {name}"]["sqnr_db"] = sqnr_db(ref, c(x))
    e = r["eager"]["median_ms"]
    for name in compiled:
        q = r[f"qhl {name}"]
        q["speedup_vs_eager"] = e / q["median_ms"]
        q["speedup_range"] = _ratio_range(r["eager"], q)
        log.info("(b) eager %.2f ms | qhl %s %.2f ms (%.2fx)", e, name, q["median_ms"], q["speedup_vs_eager"])
    return dict(tokens=tokens, results=r)


def part_c() -> dict[str, Any]:
    """First-call wall-clock of SmolLM2 under qhl w8a8 (Dynamo capture + AOT + passes + packing +
    Inductor), with Inductor's compiled-code caches empty (a fresh cache directory) and then warm
    (the same compile again after a Dynamo reset: what a second process finds on disk)."""
    from torch._inductor.utils import fresh_cache

    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    ids = news_corpus_tokens(tok, 1, 128)

    def first_call() -> tuple[Any, Any, float]:
        torch._dynamo.reset()
        be = qhl.backend("w8a8")
        compiled = torch.compile(model, backend=be)
        t0 = time.perf_counter()
        compiled(ids)
        return be, compiled, time.perf_counter() - t0

    with torch.no_grad(), fresh_cache():
        model(ids)  # the first eager call pays one-time costs (allocations, rotary caches)
        be, compiled, first_s = first_call()
        _, _, warm_cache_s = first_call()
    # Warm calls, round-robin like (a): median of 5 each.
    bench = Bench({"eager": lambda: model(ids), "qhl": lambda: compiled(ids)}, warmup=1)
    bench.sample(5)
    warm = bench.summary()
    eager_s, second_s = warm["eager"]["median_ms"] / 1e3, warm["qhl"]["median_ms"] / 1e3
    layers = be.graphs[-1].layers if be.graphs else []
    codegen_s = sum(g.codegen_seconds for g in be.graphs)
    out = dict(tokens=list(ids.shape), first_call_s=first_s, first_call_warm_cache_s=warm_cache_s,
               second_call_s=second_s, eager_call_s=eager_s,
               qhl_passes_s=sum(g.seconds for g in be.graphs) - codegen_s, inductor_s=codegen_s,
               codegen=[g.codegen for g in be.graphs], graphs=len(be.graphs),
               rewritten=f"{sum(1 for i in layers if i.form)}/{len(layers)}")
    log.info("(c) SmolLM2 qhl w8a8 first call %.1fs (qhl passes %.1fs, Inductor %.1fs), %.1fs with Inductor's "
             "cache warm; warm call %.3fs, eager warm %.3fs", first_s, out["qhl_passes_s"], codegen_s,
             warm_cache_s, second_s, eager_s)
    return out


def _ms(r: dict[str, Any]) -> str:
    return f"FAILED ({r['error']})".replace("|", "/") if "error" in r else f"{r['median_ms']:.2f}"


def _rng(r: list[float] | None) -> str:
    return f"[{r[0]:.2f}-{r[1]:.2f}]" if r and len(r) == 2 and r[0] != r[1] else ""


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"### CPU speed - {m['date']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), 1-min load average "
        f"{m['load_avg_1m']} at start (> 1 means other processes shared the cores); THP_MEM_ALLOC_ENABLE "
        f"{m.get('thp_mem_alloc_enable', 'unset')}; torch {m['torch']}, "
        f"torchao {m['torchao']}; qhl sources {m['qhl']['sha256']} ({m['qhl']['newest_file']}, "
        f"{m['qhl']['newest_mtime']}). Median of {res['args']['rounds']} rounds x {res['args']['reps']} calls "
        f"after {res['args']['warmup']} warmup calls, variants round-robin; whole compiled call timed (activation "
        "quantization and dequantization included). [a-b] = range of the ratio over the rounds.", "",
        f"**(a) {DEPTH} x nn.Linear({WIDTH}, {WIDTH}), w8a8**", "",
        "| tokens | eager fp32 (ms) | qhl w8a8 (ms) | torchao int8dq + inductor (ms) | qhl vs eager | "
        "torchao vs eager | qhl vs torchao | SQNR qhl / torchao (dB) | qhl w8a8-tensor vs eager (SQNR dB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["a"]:
        r = row["results"]
        lines.append(
            f"| {row['tokens']} | {_ms(r['eager'])} | {_ms(r['qhl'])} | {_ms(r['torchao'])} | "
            f"{row['qhl_speedup_vs_eager']:.2f}x {_rng(row['qhl_speedup_range'])} | "
            f"{row['torchao_speedup_vs_eager']:.2f}x | "
            f"{row['qhl_vs_torchao']:.2f}x {_rng(row['qhl_vs_torchao_range'])} | "
            f"{r['qhl'].get('sqnr_db', math.nan):.1f} / {r['torchao'].get('sqnr_db', math.nan):.1f} | "
            f"{row.get('qhl_tensor_speedup_vs_eager', math.nan):.2f}x "
            f"({r.get('qhl w8a8-tensor', {}).get('sqnr_db', math.nan):.1f}) |")
    lines += ["", "qhl vs torchao > 1 means qhl is faster.", "",
              "**(b) weight-only at 1 token, and at 4 tokens with w8a8**", "",
              "| tokens | variant | ms | vs eager fp32 | SQNR (dB) |", "|---:|---|---:|---:|---:|"]
    for part in (res["b"], res.get("b_few")):
        for name, r in (part or {}).get("results", {}).items():
            if name == "eager":
                lines.append(f"| {part['tokens']} | {name} | {_ms(r)} | 1.00x | reference |")
                continue
            sp = f"{r.get('speedup_vs_eager', math.nan):.2f}x {_rng(r.get('speedup_range'))}"
            lines.append(f"| {part['tokens']} | {name} | {_ms(r)} | {sp} | {r.get('sqnr_db', math.nan):.1f} |")
    c = res.get("c")
    lines += ["", "**(c) SmolLM2-135M compile under qhl w8a8**", ""]
    if c:
        lines.append(f"First call (1x128 tokens, capture + AOTAutograd + passes + weight packing + codegen + run): "
                     f"{c['first_call_s']:.1f} s with Inductor's caches empty, of which qhl passes "
                     f"{c['qhl_passes_s']:.1f} s and Inductor's CPU codegen {c.get('inductor_s', 0.0):.1f} s (graphs "
                     f"run on {c.get('codegen')}); {c.get('first_call_warm_cache_s', math.nan):.1f} s compiled again "
                     "with its caches warm (after a Dynamo reset, as a second process would). Warm calls (median of 5): "
                     f"qhl w8a8 {c['second_call_s'] * 1e3:.0f} ms, eager float32 {c['eager_call_s'] * 1e3:.0f} ms; "
                     f"{c['rewritten']} matmuls rewritten.")
    else:
        lines.append("skipped (--quick)")
    return "\n".join(lines) + "\n"




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 64 tokens, 7 runs, no SmolLM2 compile")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per variant per round (>= 7)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing rounds spread over the run (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tag", default="", help="appended to the result file names (e.g. the machine: _avx2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's). On a shared box, 1 avoids OpenMP barrier stalls")
    args = ap.parse_args()
    # qhl and inductor compile the same nn.Sequential.forward code object once per token count:
    # allow that many graphs, and fail loudly rather than silently fall back to eager past the limit
    # (a fallback would time eager code under the qhl/torchao label).
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.reps = max(7, args.reps)
    args.rounds = max(1, args.rounds or (1 if args.quick else 3))
    tokens = [1, 64] if args.quick else [1, 64, 256, 512]
    t0 = time.perf_counter()
    res: dict[str, Any] = dict(machine=machine("torchao"), args=vars(args))
    res["a"] = part_a(tokens, args.warmup, args.reps, args.rounds)
    res["b"] = part_b(args.warmup, args.reps, args.rounds)
    res["b_few"] = part_b(args.warmup, args.reps, args.rounds, tokens=4)
    res["c"] = None if args.quick else part_c()
    res["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    suffix = ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads else "")
    suffix += "_thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
    suffix += args.tag
    (RESULTS / f"speed_cpu{suffix}.json").write_text(json.dumps(json_safe(res), indent=2) + "\n")
    (RESULTS / f"speed_cpu{suffix}.md").write_text(md)
    print(md)
    log.info("wrote %s (%.0fs)", RESULTS / f"speed_cpu{suffix}.{{json,md}}", res["seconds"])


if __name__ == "__main__":
    main()
