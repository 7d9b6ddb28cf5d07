"""Every ONNX Runtime MatMulNBits setting for int4 weights at 1 token, against ORT float32.

Why: issue 4 asks for w4a16 at 1 token >= 4x ORT float32 on the 4 x Linear(4096, 4096) stack. qhl's
w4a16 file becomes MatMulNBits (bits 4, block 128, no zero points, accuracy level 0). This sweeps
what else ORT offers for the same weights, so that the number is the best ORT can do here and not
one choice among many:

* block_size 16 / 32 / 64 / 128 / 256;
* with and without a zero-point input (without: ORT's implied zero point 8, qhl's symmetric int4);
* accuracy_level 0 / 1 / 2 / 3 (float activations; on x86 levels 2 and 3 fall back to float32);
* accuracy_level 4 (int8 activations per k-block: W4A8 math, not W4A16; shown for scale only);
* one intra-op thread instead of ORT's default;
* and what qhl's onnxruntime target writes at few rows (`w4a16_activations="auto"`): each level-0
  node fed [d, x - d] through level 4, d = x rounded to int8 per block (qhl/onnx_w4a16_halves.py).

Hand-built graphs of four chained MatMulNBits (random codes and scales: speed does not depend on
the values). Two timings, both medians:
* round-robin (as benchmarks/onnx_speed.py): one call of each variant in turn, so each call finds
  its 34 MiB of weights evicted by the others: what a decode step through a model larger than the
  cache sees;
* alone: all calls of one variant back to back (weights partly cache-resident).

    .venv/bin/python benchmarks/matmulnbits_sweep.py [--reps 31] [--out benchmarks/results/matmulnbits_sweep]
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import machine, round_robin, write_results  # noqa: E402

from qhl.runtime import ort as qort  # noqa: E402

log = logging.getLogger("matmulnbits_sweep")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTH, DEPTH = 4096, 4
BLOCKS = (16, 32, 64, 128, 256)
QHL_ROW = "block 128, no zero points, level 0"  # what qhl's w4a16 file becomes
HALVES_ROW = "block 128, qhl int8 halves [d, x - d] through level 4 (onnxruntime target, w4a16_activations=auto)"


def stack_model(block: int | None, zero_points: bool = False, level: int = 0) -> bytes:
    """DEPTH chained [1, WIDTH] x [WIDTH, WIDTH] products: MatMulNBits (block given) or float32 MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(DEPTH):
        y = f"y{i}"
        if block is None:
            inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH), np.float32) * 0.02, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        else:
            blocks = WIDTH // block
            inits += [numpy_helper.from_array(rng.integers(0, 256, (WIDTH, blocks, block // 2), np.uint8), f"b{i}"),
                      numpy_helper.from_array((rng.random(WIDTH * blocks, np.float32) * 0.01), f"s{i}")]
            inputs = [x, f"b{i}", f"s{i}"]
            if zero_points:
                inits.append(numpy_helper.from_array(rng.integers(0, 256, WIDTH * ((blocks + 1) // 2), np.uint8), f"z{i}"))
                inputs.append(f"z{i}")
            nodes.append(helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=WIDTH, N=WIDTH,
                                          bits=4, block_size=block, accuracy_level=level))
        x = y
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def variants() -> dict[str, tuple[bytes, dict[str, Any]]]:
    out: dict[str, tuple[bytes, dict[str, Any]]] = {"float32 MatMul": (stack_model(None), {})}
    for block in BLOCKS:
        for zp in (False, True):
            out[f"block {block}, {'zero points' if zp else 'no zero points'}, level 0"] = (stack_model(block, zp), {})
    for level in (1, 2, 3):
        out[f"block 128, no zero points, level {level}"] = (stack_model(128, level=level), {})
    out["block 128, no zero points, level 0, 1 thread"] = (stack_model(128), {"threads": 1})
    out["block 128, no zero points, level 4 (int8 activations: W4A8, not W4A16)"] = (stack_model(128, level=4), {})
    out[HALVES_ROW] = (int8_halves(stack_model(128)), {})
    return out


def int8_halves(model: bytes) -> bytes:
    """The same file after qhl's w4a16_activations="auto" rewrite."""
    import onnx
    import onnx_ir as ir

    from qhl.onnx_w4a16_halves import split_w4a16_activations

    m = ir.from_proto(onnx.load_from_string(model))
    assert split_w4a16_activations(m, "auto") == DEPTH
    return ir.to_proto(m).SerializeToString()


def alone_ms(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(reps: int) -> dict[str, Any]:
    x = np.random.default_rng(1).standard_normal((1, WIDTH), np.float32)
    sessions = {}
    for name, (model, kw) in variants().items():
        # spinning off: the sessions run in turn, and a spinning idle one would steal the cores
        sessions[name] = qort.session(model, spinning=False, **kw)
        log.info("built %s", name)
    fns = {n: (lambda s=s: s.run(None, {"x": x})) for n, s in sessions.items()}
    rr = round_robin(fns, reps)
    alone = {n: alone_ms(fn, reps) for n, fn in fns.items()}
    base_rr, base_alone = rr["float32 MatMul"]["median_ms"], alone["float32 MatMul"]
    rows = []
    for n in fns:
        rows.append({"variant": n, "round_robin_ms": rr[n]["median_ms"], "round_robin_vs_f32": base_rr / rr[n]["median_ms"],
                     "alone_ms": alone[n], "alone_vs_f32": base_alone / alone[n]})
        log.info("%-72s rr %6.3f ms %5.2fx   alone %6.3f ms %5.2fx", n, rr[n]["median_ms"], rows[-1]["round_robin_vs_f32"],
                 alone[n], rows[-1]["alone_vs_f32"])
    return {"rows": rows}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = ["# ONNX Runtime MatMulNBits (int4) at 1 token: every setting against float32", "",
           f"{m['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {res['onnxruntime']}; load {m['load_avg_1m']}. "
           f"4 chained [1, {WIDTH}] x [{WIDTH}, {WIDTH}] products; medians of {res['reps']} runs; spinning off. "
           f"qhl's w4a16 file is the row `{QHL_ROW}`, and on the onnxruntime target at few rows `{HALVES_ROW}`.", "",
           "| MatMulNBits setting | round-robin ms | vs float32 | alone ms | vs float32 |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['variant']} | {r['round_robin_ms']:.3f} | {r['round_robin_vs_f32']:.2f}x | "
                   f"{r['alone_ms']:.3f} | {r['alone_vs_f32']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--out", default=str(RESULTS / "matmulnbits_sweep"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "reps": args.reps, **run(args.reps)}
    write_results(pathlib.Path(args.out), res, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
