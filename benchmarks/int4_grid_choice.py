"""How to choose a symmetric int4 group's scale without data: candidate grids, measured on real weights.

weight_clip="grid" (the w4a16 preset) and "grid_clip" take, per group, the candidate scale whose
dequantized group has the least squared error. This script measures which candidate sets make a good
model, all on the same stored format (codes q + 8, zero 8, w = q * s):

  plain       amax / 7 on q in [-7, 7] (round-to-nearest, qhl's weight_clip="none", the RTN row)
  amax/7.5    amax / 7.5 on [-8, 7], torchao's int4 scale formula. torchao's own quantizer scores
              differently on the same weights (fidelity.py's torchao rows; g64 6.37 dB there), so
              wins here are against the formula, and fidelity.py is the comparison with torchao
  two grids   the better of plain and amax/7.5 per group (the preset from 2026-12-03 to 12-04)
  grid_clip   two grids + max(max/7, -min/8) + its mirror -max(max/8, -min/7) (a negative scale):
              qhl's weight_clip="grid_clip" (the preset on 2026-12-04)
  grid        plain + max(max/7, -min/8) + -max(max/8, -min/7): the finest grids that clip nothing,
              without amax/7.5, whose largest weight always lands half a step off: qhl's
              weight_clip="grid", the w4a16 preset
The grid and grid_clip rows are checked to equal qhl's quantize_int4_groupwise before measuring.

Three measurements, each on the same weights:
  * SmolLM2-135M, `--windows` consecutive 4 x 512-token windows of the news corpus (window 0 is the
    issue's): logits SQNR and perplexity against float32. Weight-only, so the model is run eagerly
    in float32 with each quantized layer's weight replaced by its dequantized value (what qhl's
    compiled w4a16 computes; fidelity.py measures the compiled model itself).
  * SmolLM2, per layer, on the inputs each quantized layer sees on window 0: output SQNR summed over
    the layers, weight SQNR, and in how many layers the output error is at most amax/7.5's.
  * MiniLM-L6: mean-token embedding cosine to float32 on 16 sentences (mean / min).
At group 128 only SmolLM2's 30 down projections are int4 (K = 576 is not a multiple of 128).

    .venv/bin/python benchmarks/int4_grid_choice.py [--windows 6]

Writes benchmarks/results/int4_grid_choice.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fidelity
import qhl
from bench_env import machine
from qhl.codegen import quant
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_minilm, load_smollm2, news_corpus_tokens, sentiment_sentences

log = logging.getLogger("int4_grid_choice")
SEQS, SEQ_LEN = 4, 512
GROUPS = {64: "w4a16-g64", 128: "w4a16"}  # fidelity.py's scheme names (which layers are quantized)


def _plain(g: torch.Tensor) -> torch.Tensor:
    return g.abs().amax(-1) / 7


def _amax_7_5(g: torch.Tensor) -> torch.Tensor:
    return g.abs().amax(-1) / 7.5


def _fine(g: torch.Tensor) -> torch.Tensor:
    return torch.maximum(g.amax(-1).clamp(min=0) / 7, g.amin(-1).neg().clamp(min=0) / 8)


def _mirror(g: torch.Tensor) -> torch.Tensor:
    return -torch.maximum(g.amax(-1).clamp(min=0) / 8, g.amin(-1).neg().clamp(min=0) / 7)


# name -> candidate scales, tried in order (ties keep the earlier). plain's codes stay in [-7, 7].
CANDIDATES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "plain": (_plain,),
    "amax/7.5": (_amax_7_5,),
    "two grids": (_plain, _amax_7_5),
    "grid_clip": (_plain, _amax_7_5, _fine, _mirror),
    "grid": (_plain, _fine, _mirror),
}


def dequantized(w: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """w [N, K] -> the float32 weight that candidate set `name` stores (least squared error per group)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    best_err = best = None
    for scale_of in CANDIDATES[name]:
        s = scale_of(groups)
        s = torch.where(s != 0, s, torch.ones_like(s))[..., None]
        lo = -7 if scale_of is _plain else -8
        d = torch.round(groups / s).clamp(lo, 7) * s
        err = (d - groups).pow(2).sum(-1)
        if best is None:
            best_err, best = err, d
            continue
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better[..., None], d, best)
    return best.reshape(n, k)


def check_sets_are_qhls(model: nn.Module, scheme: str, group: int) -> None:
    """The "grid" and "grid_clip" rows must be what qhl's quantizer stores, or this script measures
    something else; and "grid" must be the w4a16 preset's choice."""
    assert qhl.recipe("w4a16").weight_clip == "grid", "the w4a16 preset no longer uses weight_clip='grid'"
    for name, mod in model.named_modules():
        if fidelity.quantizable(mod, name, scheme):
            w = mod.weight.detach()
            for clip in ("grid", "grid_clip"):
                ours = quant.dequantize_int4_groupwise(*quant.quantize_int4_groupwise(w, group, True, clip), group)
                torch.testing.assert_close(ours, dequantized(w, group, clip), rtol=0, atol=1e-6)
            return


def with_weights(model: nn.Module, scheme: str, group: int, name: str) -> nn.Module:
    m = copy.deepcopy(model)
    for path, mod in m.named_modules():
        if fidelity.quantizable(mod, path, scheme):
            mod.weight.data = dequantized(mod.weight.data, group, name).to(mod.weight.dtype)
    return m.eval()


def smollm2_windows(model: nn.Module, tokens: torch.Tensor, windows: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    refs = [fidelity.lm_logits(model, tokens[w * SEQS:(w + 1) * SEQS], 1) for w in range(windows)]
    for group, scheme in GROUPS.items():
        check_sets_are_qhls(model, scheme, group)
        for name in CANDIDATES:
            m = with_weights(model, scheme, group, name)
            rows = []
            for w, ref in enumerate(refs):
                win = tokens[w * SEQS:(w + 1) * SEQS]
                logits = fidelity.lm_logits(m, win, 1)
                rows.append({"sqnr_db": sqnr_db(ref, logits),
                             "ppl_rise_pct": 100 * (perplexity(logits, win) / perplexity(ref, win) - 1)})
            out.setdefault(str(group), {})[name] = rows
            log.info("SmolLM2 g%d %-10s SQNR %s", group, name, [round(r["sqnr_db"], 2) for r in rows])
    return out


def smollm2_layers(model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group, scheme in GROUPS.items():
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = [mod.register_forward_hook(lambda _m, inp, _o, path=path: seen.setdefault(path, []).append(
                     inp[0].detach().reshape(-1, inp[0].shape[-1])))
                 for path, mod in model.named_modules() if fidelity.quantizable(mod, path, scheme)]
        try:
            fidelity.lm_logits(model, tokens[:SEQS], 1)
        finally:
            for h in hooks:
                h.remove()
        mods = dict(model.named_modules())
        acc = {name: [0.0, 0.0, 0] for name in CANDIDATES}  # output error, weight error, layers <= amax/7.5
        y_sig = w_sig = 0.0
        for path, chunks in seen.items():
            x, w = torch.cat(chunks), mods[path].weight.detach().float()
            y = x @ w.T
            deq = {name: dequantized(w, group, name) for name in CANDIDATES}
            err = {name: (x @ d.T - y).pow(2).sum().item() for name, d in deq.items()}
            for name, d in deq.items():
                acc[name][0] += err[name]
                acc[name][1] += (d - w).pow(2).sum().item()
                acc[name][2] += err[name] <= err["amax/7.5"]
            y_sig += y.pow(2).sum().item()
            w_sig += w.pow(2).sum().item()
        out[str(group)] = {"layers": len(seen), **{name: {
            "output_sqnr_db": 10 * math.log10(y_sig / a[0]), "weight_sqnr_db": 10 * math.log10(w_sig / a[1]),
            "layers_at_most_amax_7_5_error": a[2]} for name, a in acc.items()}}
    return out


def minilm_cosines() -> dict[str, Any]:
    model, tok = load_minilm()
    enc = dict(tok(sentiment_sentences(16), padding=True, return_tensors="pt"))
    ref = fidelity.mean_pooled(model, enc)
    out: dict[str, Any] = {}
    for group, scheme in GROUPS.items():
        for name in CANDIDATES:
            cos = torch.nn.functional.cosine_similarity(
                ref, fidelity.mean_pooled(with_weights(model, scheme, group, name), enc), dim=-1)
            out.setdefault(str(group), {})[name] = {"mean": cos.mean().item(), "min": cos.min().item()}
    return out


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"### int4 grid choice (w4a16 scales) on real weights - {m['date']}", "",
             f"Machine: {m['cpu']}; qhl sources {m.get('qhl', {}).get('sha256', '?')}. "
             "Candidate sets are described in benchmarks/int4_grid_choice.py; 'grid' is the w4a16 preset's "
             "weight_clip, 'grid_clip' the other grid knob (both checked equal to qhl's quantizer). amax/7.5 is "
             "torchao's scale formula, not torchao's quantizer: fidelity.py compares with torchao itself.", "",
             f"SmolLM2-135M, {res['windows']} windows of {SEQS}x{SEQ_LEN} tokens (window 0 = the issue's): "
             "logits SQNR (dB) and perplexity rise over float32 (%), mean ± sd over windows; wins = windows where "
             "the set beats amax/7.5 on SQNR / on perplexity.", "",
             "| group | scales | SQNR window 0 | ppl rise window 0 | SQNR mean ± sd | ppl rise mean ± sd | wins vs amax/7.5 |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for group, sets in res["smollm2_windows"].items():
        ao = sets["amax/7.5"]
        for name, rows in sets.items():
            s_wins = sum(r["sqnr_db"] > a["sqnr_db"] for r, a in zip(rows, ao))
            p_wins = sum(r["ppl_rise_pct"] < a["ppl_rise_pct"] for r, a in zip(rows, ao))
            lines.append(f"| {group} | {name} | {rows[0]['sqnr_db']:.2f} | {rows[0]['ppl_rise_pct']:+.2f} | "
                         f"{_ms([r['sqnr_db'] for r in rows])} | {_ms([r['ppl_rise_pct'] for r in rows])} | "
                         + ("—" if name == "amax/7.5" else f"{s_wins} / {p_wins} of {len(rows)}") + " |")
    lines += ["", "SmolLM2 per layer, inputs of window 0: output SQNR = sum |x W^T|^2 / sum |x (W_q - W)^T|^2 over "
              "the quantized layers.", "",
              "| group | layers | scales | output SQNR (dB) | weight SQNR (dB) | layers with error <= amax/7.5's |",
              "|---:|---:|---|---:|---:|---:|"]
    for group, r in res["smollm2_layers"].items():
        for name in CANDIDATES:
            v = r[name]
            lines.append(f"| {group} | {r['layers']} | {name} | {v['output_sqnr_db']:.2f} | {v['weight_sqnr_db']:.2f} | "
                         f"{v['layers_at_most_amax_7_5_error']}/{r['layers']} |")
    lines += ["", "MiniLM-L6 (all 37 layers int4 at both group sizes), mean-token embedding cosine to float32:", "",
              "| group | scales | cosine mean | cosine min |", "|---:|---|---:|---:|"]
    for group, sets in res["minilm"].items():
        for name, v in sets.items():
            lines.append(f"| {group} | {name} | {v['mean']:.5f} | {v['min']:.5f} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    host = machine("transformers")
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, SEQS * args.windows, SEQ_LEN)
    with torch.no_grad():
        res = {"machine": host, "windows": args.windows,
               "smollm2_windows": smollm2_windows(model, tokens, args.windows),
               "smollm2_layers": smollm2_layers(model, tokens),
               "minilm": minilm_cosines()}
    res["seconds"] = time.perf_counter() - t0
    fidelity.RESULTS.mkdir(parents=True, exist_ok=True)
    (fidelity.RESULTS / "int4_grid_choice.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (fidelity.RESULTS / "int4_grid_choice.md").write_text(md)
    print(md)
    log.info("wrote %s.{json,md} (%.0fs)", fidelity.RESULTS / "int4_grid_choice", res["seconds"])


if __name__ == "__main__":
    main()
