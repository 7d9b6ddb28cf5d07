"""GPU speed of qhl's compiled quantized linears against cuBLAS bf16 and Inductor bf16, in one run.

Needs CUDA (run it on a machine with an NVIDIA GPU; CI has none). Three parts:

(0) the card's two ceilings, measured here: a device-to-device copy (GB/s, bytes read + written)
    and an 8192^3 bf16 matmul through cuBLAS (TFLOP/s).
(a) DEPTH x nn.Linear(WIDTH, WIDTH) in bf16 at several token counts: eager bf16 (cuBLAS),
    torch.compile bf16 (Inductor), and `torch.compile(backend=qhl.backend(form))` for each form.
    Each qhl variant is checked before it is timed: every linear must have been rewritten into
    the form (the backend's report), otherwise the row says so and is not timed. Two timings per
    variant: "launch" is the call as a user makes it (Python dispatch included), "graph" is a
    CUDA-graph replay of the same call, i.e. the kernels alone. Every timing is
    triton.testing.do_bench's median (L2 flushed before each call), taken ROUNDS times round-robin
    over the variants; the median of those is reported, with the spread of the rounds. SQNR of
    each output against the float32 model on the same input (TF32 off).
(b) the w8a16 / w4a16 (g128) / w8a8 kernels' tiles on one WIDTH^2 layer at several token counts:
    the BLOCK_N x BLOCK_K grid qhl could choose from, against the default it does choose.
(c) split-K at 1 and 16 tokens (codegen/triton/split_k.py): each family on its decode tile with
    SPLIT_K programs per output tile, against SPLIT_K = 1 (the default until this is measured).

    python benchmarks/gpu_speed.py --out benchmarks/results/speed_gpu_h100
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import qhl
from bench_env import json_safe, machine, write_results
from qhl.metrics import sqnr_db

log = logging.getLogger("gpu_speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FORMS = ("w8a16", "w4a16", "w8a8", "w8a8-tensor", "w4a8")
KNOBS: dict[str, dict[str, Any]] = {"w4a16": {"group_size": 128}}
# Nominal weight bytes per weight element (scales and zero points included), for the bandwidth column.
WEIGHT_BYTES = {"bf16": 2.0, "w8a16": 1.0, "w8a8": 1.0, "w8a8-tensor": 1.0, "w4a16": 0.5 + 5 / 128,
                "w4a8": 0.5}


def stack(width: int, depth: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device, dtype).eval()


def bench_ms(fn: Callable[[], Any], device: str) -> float:
    """Median ms of one call: do_bench on CUDA (events, L2 flushed per call), a host clock elsewhere."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """fn captured into a CUDA graph (after 3 warm-up calls on a side stream); its replay."""
    if device != "cuda":
        raise RuntimeError("CUDA graphs need CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def ceilings(device: str) -> dict[str, float]:
    if device != "cuda":
        return {}
    a = torch.randn(2**29 // 2, device=device, dtype=torch.float16)  # 512 MiB
    b = torch.empty_like(a)
    copy_ms = bench_ms(lambda: b.copy_(a), device)
    n = 8192
    x, y = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench_ms(lambda: x @ y, device)
    return dict(copy_gb_s=2 * 2**29 / copy_ms / 1e6, bf16_matmul_tflop_s=2 * n**3 / mm_ms / 1e9)


def rewritten(backend: qhl.QhlBackend, form: str, depth: int) -> str | None:
    """None when the last compiled graph holds `depth` linears in `form`; else why not."""
    if not backend.graphs:
        return "the backend compiled no graph"
    graph = backend.graphs[-1]
    got = [i for i in graph.layers if i.form == form]
    if len(got) != depth:
        reasons = sorted({str(getattr(i, "reason", None)) for i in graph.layers if i.form != form})
        return f"{len(got)}/{depth} linears became {form}; others: {reasons}"
    return None


def part_a(args: argparse.Namespace, device: str, dtype: torch.dtype, out: pathlib.Path,
           res: dict[str, Any]) -> None:
    model = stack(args.width, args.depth, dtype, device)
    ref_model = stack(args.width, args.depth, torch.float32, device)
    torch._dynamo.reset()
    variants: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], qhl.QhlBackend | None, str]] = {
        "bf16 eager (cuBLAS)": (model, None, "bf16"),
        "bf16 inductor": (torch.compile(model, dynamic=False), None, "bf16"),
    }
    for form in args.forms:
        backend = qhl.backend(form, **KNOBS.get(form, {}))
        variants[f"qhl {form}"] = (torch.compile(model, backend=backend, dynamic=False), backend, form)
    res["a"] = rows = []
    for m in args.tokens:
        torch.manual_seed(m)
        x = torch.randn(m, args.width, device=device, dtype=dtype)
        with torch.no_grad():
            ref = ref_model(x.float())
        fns: dict[str, dict[str, Callable[[], Any]]] = {}
        row: dict[str, Any] = dict(tokens=m, results={})
        for name, (fn, backend, form) in variants.items():
            r: dict[str, Any] = dict(form=form)
            row["results"][name] = r
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    y = fn(x)
                    torch.cuda.synchronize() if device == "cuda" else None
                r["first_call_s"] = time.perf_counter() - t0
                why = rewritten(backend, form, args.depth) if backend is not None else None
                if why:
                    r["error"] = f"not rewritten: {why}"
                    log.warning("%d tokens, %s: %s", m, name, r["error"])
                    continue
                if backend is not None:
                    g = backend.graphs[-1]
                    r["codegen"] = g.codegen
                    r["kernels"] = sorted({str(i.kernel_name) for i in g.layers})
                r["sqnr_db"] = sqnr_db(ref, y.float())
                fns[name] = {"launch": lambda fn=fn: fn(x)}
                try:
                    with torch.no_grad():
                        fns[name]["graph"] = graphed(lambda fn=fn: fn(x), device)
                except Exception as e:  # noqa: BLE001 - recorded in the row, the launch timing stands
                    r["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                    log.warning("%d tokens, %s: no CUDA graph: %s", m, name, r["graph_error"])
            except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
                r["error"] = f"{type(e).__name__}: {e}"[:500]
                log.error("%d tokens, %s failed:\n%s", m, name, traceback.format_exc())
        samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in f} for n, f in fns.items()}
        with torch.no_grad():
            for rnd in range(args.rounds):
                order = list(fns)[rnd % len(fns):] + list(fns)[:rnd % len(fns)]
                for name in order:
                    for mode, f in fns[name].items():
                        samples[name][mode].append(bench_ms(f, device))
        base = samples.get("bf16 eager (cuBLAS)", {})
        for name, s in samples.items():
            r = row["results"][name]
            for mode, ts in s.items():
                r[f"{mode}_ms"] = statistics.median(ts)
                r[f"{mode}_ms_rounds"] = ts
                if base.get(mode):
                    ratios = [b / t for b, t in zip(base[mode], ts)]
                    r[f"{mode}_speedup_vs_bf16"] = statistics.median(base[mode]) / statistics.median(ts)
                    r[f"{mode}_speedup_range"] = [min(ratios), max(ratios)]
            if "graph_ms" in r:
                wbytes = WEIGHT_BYTES[r["form"]] * args.width**2 * args.depth
                r["weight_gb_s"] = wbytes / r["graph_ms"] / 1e6
        rows.append(row)
        log.info("%d tokens: %s", m, ", ".join(
            f"{n} {r.get('graph_ms', float('nan')):.4f} ms" for n, r in row["results"].items()))
        out.with_suffix(".json").write_text(json.dumps(json_safe(res), indent=2))  # partial results


def _launchers(device: str, K: int, N: int) -> dict[str, Callable[..., Any]]:
    """family -> fn(x, blocks, split=1) on one random [N, K] weight (w4a16: g128)."""
    from qhl.codegen import quant
    from qhl.codegen.triton.w8a8 import w8a8_linear_triton
    from qhl.codegen.triton.weight_only import w4a16_linear_triton, w8a16_linear_triton

    w = torch.randn(N, K)
    q8, s8 = (t.to(device) for t in quant.quantize_int8_per_channel(w))
    p4, s4, z4 = (t.to(device) for t in quant.quantize_int4_groupwise(w, 128, False))
    return {
        "w8a16": lambda x, blocks, split=1: w8a16_linear_triton(x, q8, s8, None, blocks=blocks, split=split),
        "w4a16": lambda x, blocks, split=1: w4a16_linear_triton(x, p4, s4, z4, 128, None, blocks=blocks, split=split),
        "w8a8": lambda x, blocks, split=1: w8a8_linear_triton(x, q8, s8, None, blocks=blocks, split=split),
    }


def part_b(args: argparse.Namespace, device: str, dtype: torch.dtype, res: dict[str, Any]) -> None:
    from qhl.codegen.triton import emit

    K = N = args.width
    launch = _launchers(device, K, N)
    res["b"] = rows = []
    for m in args.block_tokens:
        x = torch.randn(m, K, device=device, dtype=dtype)
        for family, fn in launch.items():
            default = emit.make_spec(family, K, N, dtype, group_size=128 if family == "w4a16" else 0,
                                     tile=emit.tile_for(m))
            ref = fn(x, None).float()
            for bn in (16, 32, 64, 128):
                for bk in (64, 128, 256):
                    row = dict(tokens=m, family=family, block_n=bn, block_k=bk,
                               default=(bn, bk) == (default.block_n, default.block_k))
                    try:
                        y = fn(x, (bn, bk)).float()
                        row["rel_err_vs_default"] = float((y - ref).norm() / ref.norm())
                        row["ms"] = bench_ms(lambda bn=bn, bk=bk: fn(x, (bn, bk)), device)
                    except Exception as e:  # noqa: BLE001 - a block shape the checks or the GPU reject
                        row["error"] = f"{type(e).__name__}: {e}"[:200]
                    rows.append(row)
        log.info("(b) %d tokens: %d block shapes so far", m, len(rows))




def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def part_c(args: argparse.Namespace, device: str, dtype: torch.dtype, res: dict[str, Any]) -> None:
    """Split-K at decode: each family on its decode tile, SPLIT_K programs per output tile."""
    from qhl.codegen.triton import emit

    K = N = args.width
    launch = _launchers(device, K, N)
    res["c"] = rows = []
    for m in (1, 16):
        x = torch.randn(m, K, device=device, dtype=dtype)
        for family, fn in launch.items():
            spec = emit.make_spec(family, K, N, dtype, group_size=128 if family == "w4a16" else 0,
                                  tile=emit.tile_for(m))
            ref = fn(x, None).float()
            for split in args.splits:
                row = dict(tokens=m, family=family, block_n=spec.block_n, block_k=spec.block_k, split=split)
                try:
                    y = fn(x, None, split).float()
                    row["rel_err_vs_unsplit"] = float((y - ref).norm() / ref.norm())
                    row["ms"] = bench_ms(lambda split=split: fn(x, None, split), device)
                except Exception as e:  # noqa: BLE001 - a split that does not divide the k-blocks
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
        log.info("(c) %d tokens: %d splits so far", m, len(rows))


def _ms_and_err(row: dict[str, Any], err_key: str) -> str:
    """A sweep row's last two cells: its time, or why it did not run, and its error."""
    ms = row["error"][:60] if "error" in row else _f(row.get("ms"), "{:.4f}")
    return f"{ms} | {_f(row.get(err_key), '{:.1e}')} |"


def markdown(res: dict[str, Any]) -> str:
    m, a = res["machine"], res["args"]
    lines = [f"# qhl on a GPU: {m.get('gpu', 'no GPU')}", "",
             f"{m['date']}; torch {m['torch']}, triton {m.get('triton')}, CUDA {m.get('cuda')}; "
             f"qhl sources {m['qhl']['sha256']}. {a['depth']} x Linear({a['width']}, {a['width']}) in "
             f"{a['dtype']}; medians of {a['rounds']} do_bench medians (L2 flushed per call).", ""]
    c = res.get("ceilings") or {}
    if c:
        lines += [f"Ceilings measured here: copy {c['copy_gb_s']:.0f} GB/s (read + write), "
                  f"bf16 matmul {c['bf16_matmul_tflop_s']:.0f} TFLOP/s.", ""]
    lines += ["## (a) the stack: graph replay (kernels) and launch (as called), ratio to eager bf16", "",
              "| tokens | variant | graph ms | × bf16 (range) | launch ms | × bf16 | weight GB/s | SQNR dB |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in res.get("a", []):
        for name, r in row["results"].items():
            if "error" in r:
                lines.append(f"| {row['tokens']} | {name} | {r['error'][:90]} | | | | | |")
                continue
            rng = r.get("graph_speedup_range")
            rng_s = f" ({rng[0]:.2f}–{rng[1]:.2f})" if rng else ""
            lines.append(
                f"| {row['tokens']} | {name} | {_f(r.get('graph_ms'), '{:.4f}')} | "
                f"{_f(r.get('graph_speedup_vs_bf16'), '{:.2f}')}{rng_s} | {_f(r.get('launch_ms'), '{:.4f}')} | "
                f"{_f(r.get('launch_speedup_vs_bf16'), '{:.2f}')} | {_f(r.get('weight_gb_s'), '{:.0f}')} | "
                f"{_f(r.get('sqnr_db'), '{:.1f}')} |")
    if res.get("b"):
        lines += ["", "## (b) weight-only kernel block sizes, one layer (ms; * = qhl's default)", "",
                  "| tokens | family | BLOCK_N | BLOCK_K | ms | rel. err vs default |", "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['tokens']} | {r['family']} | {r['block_n']} | {r['block_k']}{' *' if r['default'] else ''} | "
                  + _ms_and_err(r, "rel_err_vs_default") for r in res["b"]]
    if res.get("c"):
        lines += ["", "## (c) split-K at decode, one layer, each family on its decode tile (ms)", "",
                  "| tokens | family | tile | SPLIT_K | ms | rel. err vs SPLIT_K = 1 |", "|---:|---|---|---:|---:|---:|"]
        lines += [f"| {r['tokens']} | {r['family']} | {r['block_n']} x {r['block_k']} | {r['split']} | "
                  + _ms_and_err(r, "rel_err_vs_unsplit") for r in res["c"]]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,16,256,2048", help="comma-separated token counts")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=8, help="linears in the stack (8 x 4096^2 int4 > an H100's L2)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-blocks", action="store_true", help="skip part (b)")
    ap.add_argument("--skip-stack", action="store_true", help="skip part (a)")
    ap.add_argument("--block-tokens", default="1,16,256,2048", help="token counts of part (b)")
    ap.add_argument("--splits", default="1,2,4,8,16", help="SPLIT_K values of part (c)")
    ap.add_argument("--skip-splits", action="store_true", help="skip part (c)")
    ap.add_argument("--out", default=str(RESULTS / "speed_gpu"))
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: a tiny stack on the CPU (checks this script, measures nothing)")
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.forms = [f for f in args.forms.split(",") if f]
    args.block_tokens = [int(t) for t in args.block_tokens.split(",")]
    args.splits = [int(t) for t in args.splits.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        sys.exit("gpu_speed.py needs CUDA; --smoke runs a tiny CPU version of the script")
    if args.smoke:
        args.width, args.depth, args.tokens, args.rounds, args.block_tokens = 256, 2, [1, 4], 1, [1, 20]
        args.splits = [1, 2]
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    info = machine()
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    sms=torch.cuda.get_device_properties(0).multi_processor_count)
    info["triton"] = triton.__version__
    res: dict[str, Any] = dict(machine=info, args=dict(vars(args), dtype=args.dtype))
    t0 = time.perf_counter()
    res["ceilings"] = ceilings(device)
    log.info("ceilings: %s", res["ceilings"])
    if not args.skip_stack:
        part_a(args, device, dtype, out, res)
    if not args.skip_blocks and (device == "cuda" or args.smoke):
        part_b(args, device, dtype, res)
    if not args.skip_splits and (device == "cuda" or args.smoke):
        part_c(args, device, dtype, res)
    res["seconds"] = time.perf_counter() - t0
    write_results(out, json_safe(res), markdown)


if __name__ == "__main__":
    main()
