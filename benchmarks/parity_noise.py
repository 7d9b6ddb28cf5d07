"""Why ORT-vs-torch parity on deep real models stops at ~0.999 for forms that round activations.

Issue 4 asks for ORT output against qhl's torch output, same recipe, at cosine >= 0.9999 ("it
is the same math"). Single layers match to 1 ulp (tests/test_onnx.py), but through a deep model
the forms that round activations at run time (w8a8, w8a8-tensor) fall short. This measures why.
For MiniLM (6 layers, real weights, 8 sentences x 128 tokens) and each recipe it reports:

* ORT vs qhl torch: the exported file in ONNX Runtime against report.graph_module;
* torch vs torch + 1e-7: qhl torch against qhl torch of the *same* model after about one float32
  rounding step of noise in its LayerNorms. Every LayerNorm weight is multiplied by
  (1 + 1e-7 * n), n ~ N(0, 1), which is about what separates ORT's LayerNorm from torch's (ORT
  also differs in GELU, softmax and the order of its float sums). No ORT is involved.

If the control falls as far as ORT does, the shortfall is the discontinuity of rounding, not
a difference in the math. A value a hair from a .5 boundary flips one int8 code, and later
layers spread the flip. The weight-only forms (w8a16, w4a16) have no run-time rounding and stay
at 1 - 1e-9 or closer in both columns. Metric: the mean over sentences of the cosine of the
attention-masked mean-token embedding (what MiniLM is used for), and the cosine of the whole
last hidden state.

    .venv/bin/python benchmarks/parity_noise.py [--out benchmarks/results/parity_noise]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import pathlib
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import cosine, machine, write_results  # noqa: E402

from qhl.models import load_minilm, sentiment_sentences  # noqa: E402
from qhl.onnx_export import export_onnx  # noqa: E402
from qhl.report import inspect as qhl_inspect  # noqa: E402
from qhl.runtime import ort as qort  # noqa: E402

log = logging.getLogger("parity_noise")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RECIPES = ("float", "w8a16", "w4a16", "w8a8", "w8a8-tensor")
NOISE = 1e-7


def _hidden(out: Any) -> np.ndarray:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return leaves[0].detach().double().numpy()


def run(tmp: pathlib.Path) -> dict[str, Any]:
    enc, tok = load_minilm()
    batch = tok(sentiment_sentences(8), padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    example = (batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].numpy()[..., None].astype(np.float64)
    noisy = copy.deepcopy(enc)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ln in (m for m in noisy.modules() if isinstance(m, torch.nn.LayerNorm)):
            ln.weight.mul_(1 + NOISE * torch.randn(ln.weight.shape, generator=gen))

    def embedding_cosine(a: np.ndarray, b: np.ndarray) -> float:
        ea, eb = (a * mask).sum(1) / mask.sum(1), (b * mask).sum(1) / mask.sum(1)
        return float(np.mean([cosine(x, y) for x, y in zip(ea, eb)]))

    rows = []
    for recipe in RECIPES:
        res = export_onnx(enc, example, tmp / f"{recipe}.onnx", recipe=recipe)
        with torch.no_grad():
            torch_out = _hidden(res.report.graph_module(*example))
            noisy_out = _hidden(qhl_inspect(noisy, example, recipe=recipe).graph_module(*example))
        ort_out = qort.run(qort.session(res.path), example)[0].astype(np.float64)
        rows.append({
            "recipe": recipe,
            "ort_vs_torch_embedding": embedding_cosine(ort_out, torch_out),
            "noise_vs_torch_embedding": embedding_cosine(noisy_out, torch_out),
            "ort_vs_torch_hidden": cosine(ort_out, torch_out),
            "noise_vs_torch_hidden": cosine(noisy_out, torch_out),
        })
        log.info("%-12s ORT vs torch %.7f (hidden %.7f)   torch+1e-7 vs torch %.7f (hidden %.7f)", recipe,
                 rows[-1]["ort_vs_torch_embedding"], rows[-1]["ort_vs_torch_hidden"],
                 rows[-1]["noise_vs_torch_embedding"], rows[-1]["noise_vs_torch_hidden"])
    return {"rows": rows}


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = ["# ORT-vs-torch parity on MiniLM against a float-noise control", "",
           f"{m['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {res['onnxruntime']}. all-MiniLM-L6-v2, "
           "8 sentences x 128 tokens. Control: qhl torch of the same model with every LayerNorm "
           f"weight times (1 + {NOISE:g} n), against qhl torch of the model as it is (no ORT involved).", "",
           "| recipe | ORT vs qhl torch, embedding cosine | control: torch + 1e-7 vs torch | ORT vs torch, hidden-state cosine | control, hidden state |",
           "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['recipe']} | {r['ort_vs_torch_embedding']:.9f} | {r['noise_vs_torch_embedding']:.9f} | "
                   f"{r['ort_vs_torch_hidden']:.9f} | {r['noise_vs_torch_hidden']:.9f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "parity_noise"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "qhl", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    res: dict[str, Any] = {"machine": machine(), "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory() as d:
        res.update(run(pathlib.Path(d)))
    write_results(pathlib.Path(args.out), res, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
