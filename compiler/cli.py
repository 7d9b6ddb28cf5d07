"""The qhl command line: `qhl inspect | export | demo | recipes`.

    qhl inspect mypkg.models:make --recipe w4a16 --knob group_size=64 --html report.html
    qhl export mypkg.models:make --recipe w4a16 -o model.onnx --check
    qhl demo --recipe w8a8
    qhl recipes

`inspect` and `export` take a `module:factory` whose factory returns (model, example_inputs).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import sys
from typing import Any

__all__ = ["main"]

log = logging.getLogger("qhl.cli")


def _setup_logging(verbose: bool) -> None:
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    except ImportError:  # rich is a dependency, but logging must never be what fails
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("torch", "transformers", "torchao", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse_knob(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--knob expects NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name, value


def _required_parameters(fn: Any) -> list[str]:
    """The parameters `fn` cannot be called without (none when its signature is unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.default is p.empty and p.kind in kinds]


def _load_factory(spec: str):
    from qhl.errors import UnsupportedError

    if ":" not in spec:
        raise UnsupportedError(f"expected MODULE:FACTORY (e.g. mypkg.models:make_model), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, "")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnsupportedError(f"cannot load {spec!r}: {e}") from e
    if not callable(factory):
        raise UnsupportedError(f"{spec} is a {type(factory).__name__}, not a factory function")
    required = _required_parameters(factory)
    if required:
        raise UnsupportedError(
            f"{spec} must be callable with no arguments and return (model, example_inputs); it requires "
            f"{', '.join(required)}. Wrap it in a function of your own (qhl.models:tiny_llama, tiny_bert "
            "and tiny_gpt2 are such factories)"
        )
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise UnsupportedError(f"{spec} must return (model, example_inputs); got {type(made).__name__}")
    model, example_inputs = made
    return model, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import qhl

    model, example_inputs = _load_factory(args.target)
    report = qhl.inspect(model, example_inputs, recipe=args.recipe, verify=args.verify or None, **dict(args.knob))
    print(report)
    if args.show_graphs:
        for p in report.passes:
            print(f"\n--- {p.name}: after ---\n{p.after}")
    if args.show_kernels:
        for path, src in report.kernel_sources().items():
            print(f"\n--- Triton source for {path} ---\n{src}")
    if args.html:
        report.to_html(args.html)
        log.info("wrote %s", args.html)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        log.info("wrote %s", args.json)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from qhl.onnx_export import export_onnx

    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model, example_inputs = _load_factory(args.target)
    result = export_onnx(model, example_inputs, args.output, recipe=args.recipe, target=args.onnx_target,
                         opset=args.opset, int8_operands=args.int8_operands,
                         w4a16_activations=args.w4a16_activations, **dict(args.knob))
    print(result)
    for row in result.report.layers:
        if row.form:
            print(f"  {row.path:<40} {row.form:<6} -> {' + '.join(row.onnx_ops)}")
    if not args.check:
        return 0
    import torch

    from qhl.runtime import ort as qort

    # spinning off: the two sessions alternate, and one's busy-waiting threads would slow the other
    sess = qort.session(result.path, threads=args.threads, spinning=False)
    with torch.no_grad():
        parity = qort.compare(result.path, result.report.graph_module, example_inputs, sess=sess)
        fidelity = qort.compare(result.path, model, example_inputs, sess=sess)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_onnx(model, example_inputs, f"{tmp}/float32.onnx", recipe="float", opset=args.opset, check=False)
        f32_sess = qort.session(f32.path, threads=args.threads, spinning=False)
        # round-robin so that a noisy neighbour slows both alike; one untimed run each first
        qort.time_session(f32_sess, example_inputs, runs=1, warmup=0)
        qort.time_session(sess, example_inputs, runs=1, warmup=0)
        t_q, t_f = [], []
        for _ in range(args.runs):
            t_f.append(qort.time_session(f32_sess, example_inputs, runs=1, warmup=0)["median_ms"])
            t_q.append(qort.time_session(sess, example_inputs, runs=1, warmup=0)["median_ms"])
        size_f32 = f32.size_bytes
    import statistics

    mq, mf = statistics.median(t_q), statistics.median(t_f)
    print(f"parity  ORT vs qhl torch:  cosine {parity['cosine']:.6f}  SQNR {parity['sqnr_db']:.1f} dB  "
          f"max|diff| {parity['max_abs']:.3g}")
    print(f"fidelity ORT vs float32 torch: cosine {fidelity['cosine']:.6f}  SQNR {fidelity['sqnr_db']:.1f} dB")
    print(f"speed   ORT {args.recipe}: {mq:.2f} ms  vs ORT float32: {mf:.2f} ms  ({mf / mq:.2f}x, "
          f"median of {args.runs}, intra-op spinning off, ORT's SkipLayerNorm fusion off, MatMulNBits accuracy "
          f"level {result.accuracy_level}"
          + (f", w4a16 activations {result.w4a16_activations}" if result.w4a16_activations != "float" else "") + ")")
    print(f"size    {result.size_bytes / 2**20:.2f} MiB vs float32 {size_f32 / 2**20:.2f} MiB "
          f"({result.size_bytes / size_f32:.2f}x)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qhl.demo import run_demo

    run_demo(recipe_name=args.recipe, seq_len=args.seq_len, runs=args.runs, html=args.html, **dict(args.knob))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    import qhl

    names = qhl.recipes()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {qhl.recipe(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qhl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="rewrite a model and print the layer report")
    p.add_argument("target", help="MODULE:FACTORY returning (model, example_inputs)")
    p.add_argument("--recipe", default="w8a8", help="preset name (see `qhl recipes`)")
    p.add_argument("--knob", action="append", type=_parse_knob, default=[], metavar="NAME=VALUE",
                   help="recipe knob, e.g. group_size=64 (repeatable; VALUE is JSON)")
    p.add_argument("--verify", action="store_true", help="check each pass numerically on the example inputs")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--show-graphs", action="store_true", help="print each pass's output graph")
    p.add_argument("--show-kernels", action="store_true", help="print the Triton source emitted per layer")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("export", help="rewrite a model and write it as ONNX (checked, optionally run in ORT)")
    p.add_argument("target", help="MODULE:FACTORY returning (model, example_inputs)")
    p.add_argument("--recipe", default="w8a8", help="preset name (see `qhl recipes`)")
    p.add_argument("--knob", action="append", type=_parse_knob, default=[], metavar="NAME=VALUE",
                   help="recipe knob, e.g. group_size=64 (repeatable; VALUE is JSON)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--target", dest="onnx_target", default="standard", choices=("standard", "onnxruntime"),
                   help="standard ONNX, or ONNX Runtime contrib ops where they are faster")
    p.add_argument("--opset", type=int, default=23,
                   help="default-domain opset (>= 21; 23 exports attention as one Attention node)")
    p.add_argument("--int8-operands", default="u8u8", choices=("u8u8", "u8s8"),
                   help="integer GEMMs' operand types: u8u8 is exact on every CPU; u8s8 is faster on CPUs with "
                        "VNNI or AMX and saturates (wrong results) in ONNX Runtime on x86 CPUs without them")
    p.add_argument("--w4a16-activations", default=None, choices=("auto", "float", "int8x2"),
                   help="--target onnxruntime only: how 4-bit MatMulNBits take float activations. auto (the "
                        "default there): as two int8 halves (about 16-bit fixed point per block, ORT's int8 "
                        "kernel) up to 32 rows, float above; float: ORT's float kernel; int8x2: halves always")
    p.add_argument("--check", action="store_true",
                   help="open the file in ONNX Runtime: parity vs qhl's torch output, speed vs the float32 export")
    p.add_argument("--runs", type=int, default=7, help="timed runs for --check (median is reported)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads for --check")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("demo", help="compile SmolLM2-135M and report fidelity and speed vs float32")
    p.add_argument("--recipe", default="w8a8")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--runs", type=int, default=5, help="timed runs (median is reported)")
    p.add_argument("--html", help="also write the layer report as HTML here")
    p.add_argument("--knob", action="append", type=_parse_knob, default=[], metavar="NAME=VALUE",
                   help="recipe knob, e.g. group_size=64 (repeatable; VALUE is JSON)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("recipes", help="list the preset recipes")
    p.set_defaults(fn=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from qhl.errors import QhlError

    try:
        return args.fn(args)
    except QhlError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
