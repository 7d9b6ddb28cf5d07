"""CPU speed of the qhl::hadamard op (its spec face: the Sylvester part as one or two GEMMs by
H_a ⊗ H_b, then the K×K stage) against a dense matmul by the same matrix, x @ qhl.hadamard_matrix(n),
in one run. The spec's transform is also A/B'd against the one it replaced before 2026-12-03
(butterfly stages; benchmarks/hadamard_previous.py, kept only as this baseline): the same inner
function of each (`_transform_rows`), so neither pays the op's dispatch (~35 µs, which the FWHT
column includes) or the spec's argument checks.

n = 576 (36·16), 1536 (12·128), 4096 (2^12); 1, 64 and 512 rows of float32; under no_grad.
All variants are timed round-robin (one call of each in turn, so a noisy neighbour slows both
alike) after warm-up; each timing is the median over `--reps` calls. The ratio is
dense / FWHT (> 1: the FWHT is faster), and previous / spec. Writes benchmarks/results/hadamard_cpu.{json,md}.

    .venv/bin/python benchmarks/hadamard_speed.py [--reps 15] [--threads 1,2]

Each thread count in --threads is measured in turn (default: 1, then torch's default). On a
loaded 2-core box the multi-threaded numbers mostly measure OpenMP stalls: every parallel torch
op (each butterfly stage above torch's grain size, each BLAS call) can wait milliseconds for a
descheduled worker; the previous butterflies made ~log2(n) such calls, the FWHT makes two or
three, the dense product one.
The single-thread numbers measure the work.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import machine, round_robin_ms, write_results  # noqa: E402

import qhl  # noqa: E402
import qhl.codegen  # noqa: E402,F401  (registers torch.ops.qhl.hadamard)
from hadamard_previous import previous  # noqa: E402
from qhl.codegen.hadamard import _transform_rows  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SIZES = (576, 1536, 4096)
ROWS = (1, 64, 512)


def bench(reps: int, threads: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    out = []
    for n in SIZES:
        h = qhl.hadamard_matrix(n)
        for r in ROWS:
            x = torch.randn(r, n)
            fns = {"fwht": lambda: torch.ops.qhl.hadamard(x), "dense": lambda: x @ h}
            ab = {"spec": lambda: _transform_rows(x, n, False), "previous": lambda: previous(x)}
            err = (fns["fwht"]() - fns["dense"]()).abs().max().item()
            err_prev = (ab["previous"]() - fns["dense"]()).abs().max().item()
            # the A/B pair in a round-robin of its own: the call right after the dense product's
            # large working set pays for the caches it evicted
            times = round_robin_ms(fns, reps, warmup=3) | round_robin_ms(ab, reps, warmup=3)
            med = {k: statistics.median(t) for k, t in times.items()}
            ratios = [d / f for d, f in zip(times["dense"], times["fwht"])]
            entry = dict(n=n, rows=r, fwht_ms=med["fwht"], dense_ms=med["dense"],
                         dense_over_fwht=med["dense"] / med["fwht"], spec_ms=med["spec"], previous_ms=med["previous"],
                         previous_over_spec=med["previous"] / med["spec"], previous_max_abs_diff=err_prev,
                         per_call_ratio_min=min(ratios), per_call_ratio_max=max(ratios), max_abs_diff=err)
            entry["threads"] = threads
            out.append(entry)
            print(f"threads={threads} n={n:5d} rows={r:4d}  fwht {med['fwht']:8.3f} ms  dense {med['dense']:8.3f} ms  "
                  f"dense/fwht {entry['dense_over_fwht']:6.1f}x  previous/spec {entry['previous_over_spec']:4.2f}x  "
                  f"(|diff| {err:.1e}, {err_prev:.1e})", flush=True)
    return out


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# qhl::hadamard (CPU spec) vs a dense matmul by the same matrix",
        "",
        f"{m['cpu']}, {m['cores']} cores (load {m['load_avg_1m']}), "
        f"torch {m['torch']}, median of {res['reps']} calls each, round-robin, {m['date']}.",
        "",
        "| torch threads | n | rows | FWHT ms | dense ms | dense / FWHT | spec ms | previous ms | previous / spec |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in res["results"]:
        lines.append(f"| {e['threads']} | {e['n']} | {e['rows']} | {e['fwht_ms']:.3f} | {e['dense_ms']:.3f} | "
                     f"{e['dense_over_fwht']:.1f}x | {e['spec_ms']:.3f} | {e['previous_ms']:.3f} | "
                     f"{e['previous_over_spec']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and torch's default)")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default_threads})
    results = []
    with torch.no_grad():
        for t in counts:
            results += bench(args.reps, t)
    torch.set_num_threads(default_threads)
    write_results(RESULTS / "hadamard_cpu", dict(machine=machine(), reps=args.reps, results=results), to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
