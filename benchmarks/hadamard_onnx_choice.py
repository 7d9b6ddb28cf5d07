"""Which ONNX formulation of qhl::hadamard ONNX Runtime runs faster on CPU: log2 butterfly stages
(Reshape/Split/Add/Sub/Concat + the K×K MatMul), two MatMuls by the Kronecker factors of the
power-of-two part (H_a ⊗ H_c, + the K×K MatMul), or one MatMul by the constant matrix.

    .venv/bin/python benchmarks/hadamard_onnx_choice.py [--reps 20] [--threads 1]

Exports a module calling torch.ops.qhl.hadamard with each formulation forced
(qhl.codegen.onnx.hadamard.FORMULATION), checks both against the spec, and times them round-robin
in one process at n = 576, 1536, 4096 with 1 and 64 rows. Writes
benchmarks/results/hadamard_onnx_choice.{json,md}.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import machine, round_robin_ms, write_results  # noqa: E402

import qhl.codegen  # noqa: E402,F401
from qhl.codegen.hadamard import hadamard_spec  # noqa: E402
from qhl.codegen.onnx import TRANSLATIONS  # noqa: E402
from qhl.codegen.onnx import hadamard as onnx_hadamard  # noqa: E402
from qhl.runtime import ort as qort  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SIZES = (576, 1536, 4096)
ROWS = (1, 64)


class Rotate(nn.Module):
    def forward(self, x):
        return torch.ops.qhl.hadamard(x, 0, False, True)


def export(n: int, formulation: str, path: pathlib.Path) -> pathlib.Path:
    default = onnx_hadamard.FORMULATION
    onnx_hadamard.FORMULATION = formulation
    try:
        program = torch.onnx.export(
            Rotate().eval(), (torch.randn(2, n),), dynamo=True, opset_version=21, verbose=False,
            custom_translation_table=TRANSLATIONS,
            dynamic_shapes=({0: torch.export.Dim.AUTO},),
        )
    finally:
        onnx_hadamard.FORMULATION = default
    program.save(str(path))
    return path


def run(reps: int, threads: int) -> dict[str, Any]:
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            sessions = {f: qort.session(export(n, f, pathlib.Path(tmp) / f"{f}_{n}.onnx"), threads=threads)
                        for f in ("butterfly", "kron", "matmul")}
            for r in ROWS:
                x = torch.randn(r, n)
                want = hadamard_spec(x).numpy()
                feeds = {name: {sess.get_inputs()[0].name: x.numpy()} for name, sess in sessions.items()}
                err = {}
                for name, sess in sessions.items():
                    err[name] = float(np.abs(sess.run(None, feeds[name])[0] - want).max())
                times = round_robin_ms({name: partial(sess.run, None, feeds[name]) for name, sess in sessions.items()},
                                       reps, warmup=3)
                entry = dict(n=n, rows=r, max_abs_err=err)
                for name, t in times.items():
                    entry[name] = dict(median_ms=statistics.median(t), min_ms=min(t))
                entry["matmul_over_butterfly_median"] = entry["matmul"]["median_ms"] / entry["butterfly"]["median_ms"]
                entry["kron_over_butterfly_median"] = entry["kron"]["median_ms"] / entry["butterfly"]["median_ms"]
                rows_out.append(entry)
                print(f"n={n:5d} rows={r:3d}  butterfly {entry['butterfly']['median_ms']:.3f} ms"
                      f"  kron {entry['kron']['median_ms']:.3f} ms  matmul {entry['matmul']['median_ms']:.3f} ms"
                      f"  max err {err}", flush=True)
    return dict(machine=machine("onnxruntime"), reps=reps, ort_threads=threads, results=rows_out)


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# qhl::hadamard in ONNX Runtime (CPU): butterfly stages, two Kronecker-factor MatMuls, or one MatMul by the constant",
        "",
        f"{m['cpu']}, {m['cores']} cores (load {m['load_avg_1m']}), ORT {m['onnxruntime']}, "
        f"{res['ort_threads']} intra-op thread(s), median of {res['reps']} runs, {m['date']}.",
        "",
        "| n | rows | butterfly ms | kron ms | matmul ms | kron / butterfly | matmul / butterfly |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in res["results"]:
        lines.append(f"| {e['n']} | {e['rows']} | {e['butterfly']['median_ms']:.3f} | {e['kron']['median_ms']:.3f} | "
                     f"{e['matmul']['median_ms']:.3f} | {e['kron_over_butterfly_median']:.2f} | "
                     f"{e['matmul_over_butterfly_median']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    write_results(RESULTS / "hadamard_onnx_choice", run(args.reps, args.threads), to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
