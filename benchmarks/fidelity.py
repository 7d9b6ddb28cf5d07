"""Fidelity of qhl's quantized recipes on real models, against torchao and plain RTN, in one run.

SmolLM2-135M on 4 x 512 tokens of ABC news (gensim lee_background.cor): logits SQNR (dB) against
eager float32 and perplexity. MiniLM-L6 on 16 movie-review sentences (pang_lee_polarity.cor):
cosine of mean-pooled token embeddings against float32. For each scheme (w8a16, w8a8, w4a16
symmetric g128, and g64 on SmolLM2) three implementations are measured on the same weights/tokens:

  qhl      torch.compile(model, backend=qhl.backend(name)) under no_grad, recipe defaults
  torchao  quantize_(deepcopy(model), <equivalent config>) in eager
  RTN      each eligible nn.Linear replaced by qhl.codegen.quant's float64 fake-quant reference,
           plain round-to-nearest (int4: no clip-ratio search)

lm_head and embeddings stay float everywhere (qhl's default skip list; the same filter is given
to torchao and RTN). Writes benchmarks/results/fidelity.{json,md}.

    .venv/bin/python benchmarks/fidelity.py [--n-seqs 4] [--seq-len 512] [--batch 1] [--tag _avx2]
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import qhl
from bench_env import json_safe, machine
from qhl.codegen import quant
from qhl.metrics import perplexity, sqnr_db
from qhl.models import load_minilm, load_smollm2, news_corpus_tokens, sentiment_sentences

log = logging.getLogger("fidelity")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# name -> (qhl form, int4 group size). All w4a16 variants are symmetric. g64 is measured as well
# because SmolLM2's hidden size 576 is not a multiple of 128: at g128 only the down projections
# (K = 1536) can be quantized, at g64 every layer can.
SCHEMES: dict[str, tuple[str, int | None]] = {
    "w8a16": ("w8a16", None), "w8a8": ("w8a8", None), "w4a16": ("w4a16", 128), "w4a16-g64": ("w4a16", 64),
}
MINILM_SCHEMES = ("w8a16", "w8a8", "w4a16")
# Issue targets for SmolLM2 4x512: (logits SQNR dB, perplexity, allowed ppl rise over float32).
FLOAT_PPL_TARGET = 30.88
TARGETS = {"w8a16": (30.4, 30.80, 0.005), "w8a8": (20.1, 31.61, 0.03), "w4a16": (12.2, 34.5, 0.15)}
# "At least as good as" is judged with a noise margin: qhl and RTN compute the same scheme, and
# float32 vs float64 accumulation alone moves SQNR by a few hundredths of a dB.
SQNR_MARGIN_DB, PPL_MARGIN = 0.1, 0.001


# --- the three implementations of a scheme ---------------------------------------------------


def qhl_backend(scheme: str, **knobs: Any) -> Any:
    form, group = SCHEMES.get(scheme, (scheme, None))
    return qhl.backend(form, **({"group_size": group, "symmetric": True} if group else {}), **knobs)


def qhl_variants(scheme: str) -> dict[str, dict[str, Any]]:
    """impl label -> extra recipe knobs. "qhl" is the recipe's defaults (the row the issue's targets
    judge; every row is also compared with RTN and torchao).
    For int4, weight_clip="mse" and "grid_clip" are measured as well when they are not the default
    (extra rows, "qhl clip=mse", "qhl clip=grid_clip"), so the table shows what that knob does on
    real weights; plain rounding (weight_clip="none") is the RTN row."""
    out: dict[str, dict[str, Any]] = {"qhl": {}}
    default = getattr(qhl.recipe("w4a16"), "weight_clip", None)
    if SCHEMES.get(scheme, ("", None))[1] and default is not None:
        for other in ("mse", "grid_clip"):
            if other != default and other in quant.WEIGHT_CLIPS:
                out[f"qhl clip={other}"] = {"weight_clip": other}
    if scheme == "w8a8":
        # The same recipe run op by op instead of compiled whole by Inductor: the two differ only in
        # float32 rounding, which a deep per-token-quantized model turns into different code flips.
        out["qhl op-by-op"] = {"cpu_codegen": "spec"}
    return out


def quantizable(mod: nn.Module, fqn: str, scheme: str) -> bool:
    """The layers qhl's recipe rewrites, so torchao and RTN quantize exactly the same set:
    nn.Linear outside the default skip list ("*embed*", "lm_head") whose K divides by the group."""
    if not isinstance(mod, nn.Linear) or fqn == "lm_head" or fqn.endswith(".lm_head") or "embed" in fqn:
        return False
    group = SCHEMES[scheme][1]
    return group is None or mod.in_features % group == 0


def torchao_config(scheme: str) -> tuple[Any, str]:
    """torchao 0.18's config for a scheme on CPU, and a note saying what it is."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    form, group = SCHEMES[scheme]
    if form == "w8a16":
        return Int8WeightOnlyConfig(), "Int8WeightOnlyConfig()"
    if form == "w8a8":
        return Int8DynamicActivationInt8WeightConfig(), "Int8DynamicActivationInt8WeightConfig()"
    # Int4WeightOnlyConfig has no CPU path in 0.18 (plain/preshuffled need the `mslk` package,
    # tile_packed_to_4d needs CUDA, plain_int32 is XPU-only): probe it, then fall back to the
    # generic IntxWeightOnlyConfig, which is the same scheme (int4 symmetric, per group).
    probe = nn.Sequential(nn.Linear(group, 8))
    try:
        quantize_(probe, Int4WeightOnlyConfig(group_size=group))
        with torch.no_grad():
            probe(torch.randn(1, group))
        return Int4WeightOnlyConfig(group_size=group), f"Int4WeightOnlyConfig(group_size={group})"
    except Exception as e:  # noqa: BLE001 - any failure means "no CPU path"; we report which
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        log.warning("torchao Int4WeightOnlyConfig does not run on CPU (%s); using IntxWeightOnlyConfig", why)
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
        note = f"IntxWeightOnlyConfig(int4, PerGroup({group})); Int4WeightOnlyConfig does not run on CPU ({why})"
        return cfg, note


def torchao_model(model: nn.Module, scheme: str) -> tuple[nn.Module, str]:
    from torchao.quantization import quantize_

    cfg, note = torchao_config(scheme)
    m = copy.deepcopy(model)
    quantize_(m, cfg, filter_fn=lambda mod, fqn: quantizable(mod, fqn, scheme))
    return m.eval(), note


_HAS_CLIP = "clip" in inspect.signature(quant.fake_quant_w4a16_linear).parameters


class RTNLinear(nn.Module):
    """nn.Linear computed by qhl's float64 fake-quant reference (round-to-nearest, no calibration)."""

    def __init__(self, lin: nn.Linear, scheme: str):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.form, self.group = SCHEMES[scheme]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        if self.form == "w8a8":
            y = quant.fake_quant_w8a8_linear(x, w, b)
        elif self.form == "w8a16":
            y = quant.fake_quant_w8a16_linear(x, w, b)
        else:
            # Plain round-to-nearest of the full group range: qhl's default int4 scale choice may
            # search clip ratios (recipe knob weight_clip), which RTN by definition does not.
            clip = {"clip": "none"} if _HAS_CLIP else {}
            y = quant.fake_quant_w4a16_linear(x, w, b, self.group, symmetric=True, **clip)
        return y.to(x.dtype)


def rtn_model(model: nn.Module, scheme: str) -> nn.Module:
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            fqn = f"{name}.{child_name}" if name else child_name
            if quantizable(child, fqn, scheme):
                setattr(mod, child_name, RTNLinear(child, scheme))
    return m.eval()


# --- running models ----------------------------------------------------------------------------


def lm_logits(model: Callable[..., Any], tokens: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(tokens[i : i + batch]).logits.float() for i in range(0, len(tokens), batch)])


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL (flattened, float64): the terms whose mean is log(perplexity)."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1), reduction="none")
    return nll


def mean_pooled(model: Callable[..., Any], enc: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        h = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)  # mean over real tokens only, as sentence-transformers does


def rewritten(be: Any) -> str:
    layers = be.graphs[-1].layers if be.graphs else []
    return f"{sum(1 for i in layers if i.form)}/{len(layers)}"


def attempt(add: Callable[..., None], scheme: str, impl: str, run: Callable[[], torch.Tensor],
            layers: Callable[[], str] = lambda: "") -> None:
    """Run one implementation; a failure becomes a row that says so instead of ending the run."""
    try:
        out = run()
    except Exception as e:  # noqa: BLE001 - reported in the table, never hidden
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
        log.error("  %-7s %-8s FAILED: %s", scheme, impl, msg)
        add(scheme, impl, None, error=msg)
        return
    add(scheme, impl, out, layers())


def timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    log.info("%s: %.1fs", label, time.perf_counter() - t0)
    return out


def run_smollm2(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, str]]:
    model, tok = load_smollm2()
    tokens = news_corpus_tokens(tok, args.n_seqs, args.seq_len)
    ref = timed("SmolLM2 eager float32", lambda: lm_logits(model, tokens, args.batch))
    ref_ppl = perplexity(ref, tokens)
    rows = [dict(model="SmolLM2-135M", scheme="float32", impl="eager", sqnr_db=math.inf, ppl=ref_ppl,
                 layers="", _nll=token_nll(ref, tokens))]
    notes: dict[str, str] = {}

    def add(scheme: str, impl: str, logits: torch.Tensor | None, layers: str = "", error: str = "") -> None:
        if logits is None:
            rows.append(dict(model="SmolLM2-135M", scheme=scheme, impl=impl, sqnr_db=math.nan, ppl=math.nan,
                             layers=layers, error=error))
            return
        row = dict(model="SmolLM2-135M", scheme=scheme, impl=impl, sqnr_db=sqnr_db(ref, logits),
                   ppl=perplexity(logits, tokens), layers=layers, _nll=token_nll(logits, tokens))
        log.info("  %-7s %-8s SQNR %6.2f dB  ppl %.3f", scheme, impl, row["sqnr_db"], row["ppl"])
        rows.append(row)

    # qhl's "float" recipe captures and canonicalizes without quantizing: it must be lossless.
    for scheme in ("float", *SCHEMES):
        for impl, knobs in qhl_variants(scheme).items():
            torch._dynamo.reset()  # one backend per compile; no cache entries shared across recipes
            be = qhl_backend(scheme, **knobs)
            compiled = torch.compile(model, backend=be)
            label = f"SmolLM2 {impl} {scheme} (compile + run)"
            attempt(add, scheme, impl, lambda c=compiled: timed(label, lambda: lm_logits(c, tokens, args.batch)),
                    lambda: rewritten(be))
            del compiled
    torch._dynamo.reset()

    def peer(impl: str, scheme: str) -> torch.Tensor:
        # Built inside attempt(): a torchao config that fails to apply is a row, not a crash.
        if impl == "torchao":
            m, notes[scheme] = torchao_model(model, scheme)
        else:
            m = rtn_model(model, scheme)
        return timed(f"SmolLM2 {impl} {scheme}", lambda: lm_logits(m, tokens, args.batch))

    for scheme in SCHEMES:
        for impl in ("torchao", "RTN"):
            attempt(add, scheme, impl, lambda: peer(impl, scheme))
    return rows, notes


def run_minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tok = load_minilm()
    enc = dict(tok(sentiment_sentences(args.n_sentences), padding=True, return_tensors="pt"))
    ref = mean_pooled(model, enc)
    rows = []

    def add(scheme: str, impl: str, emb: torch.Tensor | None, layers: str = "", error: str = "") -> None:
        if emb is None:
            rows.append(dict(model="MiniLM-L6", scheme=scheme, impl=impl, cos_mean=math.nan, cos_min=math.nan,
                             sqnr_db=math.nan, layers=layers, error=error))
            return
        cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=-1)
        rows.append(dict(model="MiniLM-L6", scheme=scheme, impl=impl, cos_mean=cos.mean().item(),
                         cos_min=cos.min().item(), sqnr_db=sqnr_db(ref, emb), layers=layers))
        log.info("  %-7s %-8s cos mean %.5f min %.5f", scheme, impl, cos.mean().item(), cos.min().item())

    for scheme in MINILM_SCHEMES:
        for impl, knobs in qhl_variants(scheme).items():
            torch._dynamo.reset()
            be = qhl_backend(scheme, **knobs)
            compiled = torch.compile(model, backend=be)
            attempt(add, scheme, impl, lambda: timed(f"MiniLM {impl} {scheme}", lambda: mean_pooled(compiled, enc)),
                    lambda: rewritten(be))
        torch._dynamo.reset()
        attempt(add, scheme, "torchao", lambda: mean_pooled(torchao_model(model, scheme)[0], enc))
        attempt(add, scheme, "RTN", lambda: mean_pooled(rtn_model(model, scheme), enc))
    return rows


# --- judging and reporting ---------------------------------------------------------------------


def versus(q: dict[str, Any], p: dict[str, Any]) -> tuple[str, str]:
    """qhl row q against peer row p on the same tokens -> (status, measured text).

    "yes": SQNR and perplexity both at least as good (within the noise margins). "within noise":
    SQNR as good, perplexity worse but not significantly so in a paired per-token test (mean NLL
    difference within 2 standard errors of 0; tokens are treated as independent, which makes the
    band narrower than it really is, so this errs towards "NO"). "NO" otherwise.
    """
    sqnr_ok = q["sqnr_db"] >= p["sqnr_db"] - SQNR_MARGIN_DB
    ppl_ok = q["ppl"] <= p["ppl"] * (1 + PPL_MARGIN)
    d = q["_nll"] - p["_nll"]
    mean, se = d.mean().item(), d.std().item() / math.sqrt(d.numel())
    text = f"{q['sqnr_db']:.2f} dB / {q['ppl']:.3f} (ppl {math.expm1(mean):+.2%} +- {2 * se:.2%})"
    if sqnr_ok and ppl_ok:
        return "yes", text
    if sqnr_ok and mean - 2 * se <= 0:
        return "within noise", text
    return "NO", text


def _failed(what: str, row: dict[str, Any] | None) -> dict[str, Any]:
    return dict(what=what, measured=(row or {}).get("error", "missing"), wanted="a result", status="NO")


def checks(
    smol: list[dict[str, Any]], mini: list[dict[str, Any]], issue_tokens: bool
) -> list[dict[str, Any]]:
    """Each target as (what, measured, wanted, status); status is "yes", "within noise" or "NO".

    The issue's absolute targets hold for 4 x 512 tokens only (issue_tokens); the comparisons
    with RTN and torchao hold for any token count.
    """
    by = {(r["scheme"], r["impl"]): r for r in smol}
    f32 = by[("float32", "eager")]["ppl"]
    out = []
    if issue_tokens:
        out.append(dict(what="float32 ppl", measured=f"{f32:.3f}", wanted=f"~{FLOAT_PPL_TARGET}",
                        status="yes" if abs(f32 - FLOAT_PPL_TARGET) < 0.05 else "NO"))
    for scheme, (t_sqnr, t_ppl, rise) in TARGETS.items() if issue_tokens else ():
        q = by.get((scheme, "qhl"))
        if q is None or "_nll" not in q:
            out.append(_failed(f"{scheme} qhl", q))
            continue
        out.append(dict(what=f"{scheme} ppl rise over float32", measured=f"{q['ppl'] / f32 - 1:+.2%}",
                        wanted=f"<= {rise:.1%} (issue: ppl {t_ppl})",
                        status="yes" if q["ppl"] <= f32 * (1 + rise) else "NO"))
        out.append(dict(what=f"{scheme} logits SQNR", measured=f"{q['sqnr_db']:.2f} dB",
                        wanted=f">= {t_sqnr} dB (issue; {SQNR_MARGIN_DB} dB margin)",
                        status="yes" if q["sqnr_db"] >= t_sqnr - SQNR_MARGIN_DB else "NO"))
    for scheme in SCHEMES:
        for impl in qhl_variants(scheme):
            q = by.get((scheme, impl))
            for peer in ("RTN", "torchao"):
                p, what = by.get((scheme, peer)), f"SmolLM2 {scheme} {impl} vs {peer}"
                if q is None or p is None or "_nll" not in q or "_nll" not in p:
                    out.append(_failed(what, q if q and "_nll" not in q else p))
                    continue
                status, text = versus(q, p)
                out.append(dict(what=what, measured=text,
                                wanted=f">= {p['sqnr_db']:.2f} dB / <= {p['ppl']:.3f}", status=status))
    mby = {(r["scheme"], r["impl"]): r for r in mini}
    for scheme in MINILM_SCHEMES:
        for impl in qhl_variants(scheme):
            q = mby.get((scheme, impl))
            for peer in ("RTN", "torchao"):
                p, what = mby.get((scheme, peer)), f"MiniLM {scheme} {impl} vs {peer}"
                if q is None or p is None or math.isnan(q["cos_mean"]) or math.isnan(p["cos_mean"]):
                    out.append(_failed(what, q))
                    continue
                ok = q["cos_mean"] >= p["cos_mean"] - 1e-4 and q["cos_min"] >= p["cos_min"] - 1e-4
                out.append(dict(what=what, measured=f"cos {q['cos_mean']:.5f} / min {q['cos_min']:.5f}",
                                wanted=f">= {p['cos_mean']:.5f} / {p['cos_min']:.5f} (1e-4 margin)",
                                status="yes" if ok else "NO"))
    return out


def fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def _note(row: dict[str, Any]) -> str:
    return f"FAILED: {row['error']}".replace("|", "/") if row.get("error") else row["layers"]


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"### Fidelity (qhl vs torchao vs RTN) - {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}, "
        f"torchao {m['torchao']}, transformers {m['transformers']}; qhl sources {m['qhl']['sha256']} "
        f"(newest file {m['qhl']['newest_file']}, {m['qhl']['newest_mtime']}).",
        "",
        f"**SmolLM2-135M-Instruct**, {a['n_seqs']}x{a['seq_len']} tokens of gensim `lee_background.cor`; "
        "logits SQNR vs eager float32, perplexity. lm_head and embeddings stay float.",
        "",
        "| scheme | impl | logits SQNR (dB) | perplexity | ppl vs fp32 | qhl layers rewritten / error |",
        "|---|---|---:|---:|---:|---|",
    ]
    f32 = result["smollm2"][0]["ppl"]
    for r in result["smollm2"]:
        lines.append(f"| {r['scheme']} | {r['impl']} | {fmt(r['sqnr_db'])} | {r['ppl']:.3f} | "
                     f"{(r['ppl'] / f32 - 1):+.2%} | {_note(r)} |")
    lines += ["", f"**all-MiniLM-L6-v2**, {a['n_sentences']} sentences of `pang_lee_polarity.cor`; "
              "cosine of mean-pooled token embeddings vs float32.", "",
              "| scheme | impl | cosine mean | cosine min | embedding SQNR (dB) "
              "| qhl layers rewritten / error |",
              "|---|---|---:|---:|---:|---|"]
    for r in result["minilm"]:
        lines.append(f"| {r['scheme']} | {r['impl']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
                     f"{fmt(r['sqnr_db'])} | {_note(r)} |")
    w4 = next((r for r in result["smollm2"] if r["scheme"] == "w4a16" and r["impl"] == "qhl"), {})
    clip = result.get("qhl_int4_weight_clip")
    lines += ["", "Notes:", "",
              "- w4a16 = int4 symmetric, group 128; w4a16-g64 = group 64. At g128 qhl rewrites "
              f"{w4.get('layers', '?')} SmolLM2 matmuls: K = 576 is not a multiple of 128, so only the down "
              "projections (K = 1536) are int4 and the rest stay float (torchao and RTN are given the same "
              "layers). At g64 every layer is int4.",
              f"- qhl's int4 scales: recipe default weight_clip={clip!r} ('grid' = per group the closest of "
              "three grids that clip nothing, 'grid_clip' = those and torchao's amax/7.5, 'mse' = per-group clip "
              "ratio with least squared error, 'none' = plain amax). The `qhl clip=...` rows use other values of "
              "that knob; the `qhl` rows (recipe defaults) are the ones held to the issue's targets. RTN rows "
              "never clip." if clip else
              "- qhl's int4 scales: plain amax round-to-nearest (this qhl has no weight_clip knob).",
              "- w8a8 on SmolLM2 is chaotic (a few huge activations set the per-token scales): float32 vs "
              "float64 accumulation of the same RTN scheme moves perplexity by ~3 % on 128 tokens, so w8a8 rows "
              "differ "
              "within noise. The checks use a paired per-token NLL test (± is 2 standard errors).",
              "- torchao configs: " + "; ".join(f"{k}: `{v}`" for k, v in result["torchao_configs"].items()),
              "", "| check | measured | wanted | ok |", "|---|---|---|---|"]
    for c in result["checks"]:
        status = "**NO**" if c["status"] == "NO" else c["status"]
        lines.append(f"| {c['what']} | {c['measured']} | {c['wanted']} | {status} |".replace("+-", "±"))
    return "\n".join(lines) + "\n"




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="sequences per forward (memory vs speed)")
    ap.add_argument("--n-sentences", type=int, default=16)
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. _avx2), so one machine's run keeps another's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # A smaller smoke run writes fidelity_smoke.* so that it never overwrites the real results,
    # and is not held to the issue's 4x512 targets.
    default = {**vars(args), "tag": ""} == vars(ap.parse_args([]))
    stem = ("fidelity" if default else "fidelity_smoke") + args.tag
    t0 = time.perf_counter()
    host = machine("torchao", "transformers")  # at the start: the qhl sources are fingerprinted as imported, not as they end up
    smol, notes = run_smollm2(args)
    mini = run_minilm(args)
    clip = getattr(qhl.recipe("w4a16"), "weight_clip", None)
    result = dict(machine=host, args=vars(args), qhl_int4_weight_clip=clip, smollm2=smol, minilm=mini,
                  torchao_configs=notes,
                  checks=checks(smol, mini, default), seconds=time.perf_counter() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (RESULTS / f"{stem}.json").write_text(json.dumps(json_safe(result, drop_private=True), indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    failed = [c["what"] for c in result["checks"] if c["status"] == "NO"]
    if failed:
        log.warning("targets missed: %s", failed)
    log.info("wrote %s.{json,md} (%.0fs)", RESULTS / stem, result["seconds"])


if __name__ == "__main__":
    main()
