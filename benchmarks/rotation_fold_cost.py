"""Why the offline residual rotation loses to the online one on SmolLM2-135M, layer by layer.

The offline (QuaRot) rotation of a residual stream must fold each RMSNorm's scale g into the
layers that read the norm: a reader then quantizes the activation x_n Q and the weight
W diag(g) Q, where the online rotation quantizes (x_n * g) H and W H. Both compute x_n diag(g) W^T
exactly in float. With round-to-nearest, per-token activations and per-channel weights, the
quantization noise of a rotated vector is spread evenly, so its power follows the vector's norm,
and the output noise power of the pair goes as (sum over tokens of ||a_t||^2) * ||B||_F^2 for
both the activation and the weight term. The predicted offline-minus-online noise ratio is

    fold penalty = 10 log10( sum_t ||x_n,t||^2 * ||W diag(g)||_F^2 / (sum_t ||x_n,t * g||^2 * ||W||_F^2) ) dB

and it does not depend on which orthogonal Q the offline rotation uses. A positive penalty means
the fold costs accuracy whatever the rotation; GPTQ-style weight rounding can only shrink the
weight term, not the activation term. The writers of the stream (o_proj, down_proj) gain from
the offline rotation instead: their output channels are mixed by Q^T, which evens the per-channel
weight scales. A second table compares both rotations with GPTQ weights on both sides (held out:
calibrated on the first half of the sequences). This script measures all of it on real
activations, per layer and form:

    reader (q/k/v, gate/up)   online:  Q(x_n g H) Q(W H)^T       offline: Q(x_n Q) Q(W diag(g) Q)^T
    writer (o_proj, down)     online:  Q(x H) Q(W H)^T           offline: Q(x H) Q(Q^T W H)^T

with Q = diag(signs) H, the same matrices and quantizers as the compiled recipes (w8a8: int8
activations and per-channel int8 weights; w4a4: 4-bit activations, per-channel int4 weights with
the presets' MSE clip). SQNR is the layer output against float32 on the same inputs.

    python benchmarks/rotation_fold_cost.py [--n-seqs 2] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import statistics
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import qhl
from bench_env import machine, write_results
from qhl.codegen import quant
from qhl.hadamard import random_signs
from qhl.models import load_smollm2, news_corpus_tokens

log = logging.getLogger("rotation_fold_cost")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
READERS = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
WRITERS = {"attn": "o_proj", "mlp": "down_proj"}


def fake_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    q, s = quant.quantize_per_token_bits(x, bits)
    return q.double() * s.double()


def fake_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        q, s = quant.quantize_int8_per_channel(w)
        return q.double() * s.double()[:, None]
    packed, s = quant.quantize_int4_per_channel(w, clip="mse")
    return quant.dequantize_int4_per_channel(packed, s).double()


def weight_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """The per-channel scale [N] and qmax the recipes use (int8 amax/127; int4 with the MSE clip)."""
    if bits == 8:
        return quant.quantize_int8_per_channel(w.float())[1].double(), 127
    return quant.quantize_int4_per_channel(w.float(), clip="mse")[1].double(), 7


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) on the recipes' grid: the same per-channel scales as
    round-to-nearest, but each column is rounded in turn and its error spread over the columns
    not yet rounded, through the inverse Hessian (2 X^T X of the calibration inputs). float64."""
    scale, qmax = weight_grid(w, bits)
    w = w.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.round(col / scale).clamp(-qmax, qmax) * scale
            out[:, i1 + i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out


def gptq_ways(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, bits: int, calib: int) -> dict[str, float]:
    """Held-out SQNR with GPTQ weights: the Hessian from the first `calib` rows of a, the SQNR on
    the rest, for RTN weights and GPTQ weights (activations quantized in both)."""
    qb = gptq(b, 2 * a[:calib].T @ a[:calib], bits)
    qa = fake_act(a[calib:].float(), bits)
    return {"rtn_both": sqnr(ref[calib:], qa @ fake_weight(b.float(), bits).T), "gptq_both": sqnr(ref[calib:], qa @ qb.T)}


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / max((out - ref).pow(2).sum().item(), 1e-300))


def three_ways(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, bits: int) -> dict[str, float]:
    """SQNR of a b^T against ref with only the activation, only the weight, or both quantized."""
    qa, qb = fake_act(a.float(), bits), fake_weight(b.float(), bits)
    return {"act": sqnr(ref, qa @ b.T), "weight": sqnr(ref, a @ qb.T), "both": sqnr(ref, qa @ qb.T)}


def capture(model: Any, tokens: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of every norm (the stream) and of every writer, float64 [T, K]."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, mod in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm),
                         ("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
            def hook(_m, args, key=(i, key)):
                seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="the recipes' hadamard_seed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok = load_smollm2()
    acts = capture(model, news_corpus_tokens(tok, args.n_seqs, args.seq_len))
    n = model.config.hidden_size
    calib = args.seq_len * (args.n_seqs // 2)  # GPTQ: calibrate on the first half of the sequences
    H = qhl.hadamard_matrix(n, torch.float64)
    Q = random_signs(n, args.seed).double()[:, None] * H
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(model.model.layers):
        for kind, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
            x = acts[(i, kind)]
            xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            g = norm.weight.detach().double()
            block = layer.self_attn if kind == "attn" else layer.mlp
            for name in READERS[kind]:
                w = getattr(block, name).weight.detach().double()
                ref = (xn * g) @ w.T
                penalty = 10 * math.log10(
                    xn.pow(2).sum().item() * (w * g).pow(2).sum().item()
                    / ((xn * g).pow(2).sum().item() * w.pow(2).sum().item())
                )
                for bits in (8, 4):
                    online_a, online_w, offline_a, offline_w = (xn * g) @ H, w @ H, xn @ Q, (w * g) @ Q
                    rows.append(dict(layer=i, name=name, role="reader", bits=bits, penalty_db=penalty,
                                     online=three_ways(online_a, online_w, ref, bits),
                                     offline=three_ways(offline_a, offline_w, ref, bits),
                                     online_gptq=gptq_ways(online_a, online_w, ref, bits, calib),
                                     offline_gptq=gptq_ways(offline_a, offline_w, ref, bits, calib)))
            name = WRITERS[kind]
            x = acts[(i, name)]
            w = getattr(block, name).weight.detach().double()
            k = w.shape[1]
            Hk = qhl.hadamard_matrix(k, torch.float64)  # the online rotation both modes keep here
            ref = x @ w.T
            for bits in (8, 4):
                rows.append(dict(layer=i, name=name, role="writer", bits=bits, penalty_db=None,
                                 online=three_ways(x @ Hk, w @ Hk, ref, bits),
                                 # offline: output channels mixed by Q^T; measured back in the
                                 # unrotated basis (Q is orthogonal, so the SQNR is the same)
                                 offline=three_ways(x @ Hk, Q.T @ w @ Hk, ref @ Q, bits)))
        log.info("layer %d done", i)
    readers = [r for r in rows if r["role"] == "reader" and r["bits"] == 8]
    fit = torch.corrcoef(torch.tensor([[r["penalty_db"] for r in readers],
                                       [r["online"]["both"] - r["offline"]["both"] for r in readers]]))[0, 1].item()
    result = dict(machine=machine(), n_seqs=args.n_seqs, seq_len=args.seq_len, seed=args.seed, rows=rows,
                  summary=summarize(rows), penalty_correlation=fit)
    write_results(RESULTS / "rotation_fold_cost", result, markdown)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["role"], r["bits"], r["name"]), []).append(r)
        groups.setdefault((r["role"], r["bits"], "all"), []).append(r)
    for (role, bits, name), rs in groups.items():
        gap = {m: [r["offline"][m] - r["online"][m] for r in rs] for m in ("act", "weight", "both")}
        penalties = [r["penalty_db"] for r in rs if r["penalty_db"] is not None]
        out.append(dict(
            role=role, bits=bits, name=name, count=len(rs),
            online_both=statistics.median(r["online"]["both"] for r in rs),
            offline_both=statistics.median(r["offline"]["both"] for r in rs),
            gap_act=statistics.median(gap["act"]), gap_weight=statistics.median(gap["weight"]),
            gap_both=statistics.median(gap["both"]),
            offline_better=sum(1 for v in gap["both"] if v > 0),
            penalty=statistics.median(penalties) if penalties else None,
        ))
        if role == "reader":
            out[-1].update({
                f"{mode}_{w}": statistics.median(r[f"{mode}_gptq"][f"{w}_both"] for r in rs)
                for mode in ("online", "offline") for w in ("rtn", "gptq")
            })
            gptq_gap = [r["offline_gptq"]["gptq_both"] - r["online_gptq"]["gptq_both"] for r in rs]
            out[-1].update(gap_gptq=statistics.median(gptq_gap), offline_better_gptq=sum(1 for v in gptq_gap if v > 0))
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# The RMSNorm fold: offline vs online rotation, per layer (SmolLM2-135M, {result['n_seqs']} x "
        f"{result['seq_len']} tokens)",
        "",
        f"Machine: {result['machine']}",
        "",
        "Layer-output SQNR against float32, medians over the 30 decoder layers. `gap` = offline minus",
        "online (dB; negative: the offline rotation is worse). `fold penalty` is the predicted loss of",
        "the RMSNorm fold for both the activation and the weight term (see the script's docstring).",
        "",
        "| role | form | layer | n | online SQNR | offline SQNR | gap act-only | gap weight-only | gap both | offline better | fold penalty |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(result["summary"], key=lambda s: (s["role"] != "reader", -s["bits"], s["name"] != "all", s["name"])):
        pen = "" if s["penalty"] is None else f"+{s['penalty']:.2f}" if s["penalty"] >= 0 else f"{s['penalty']:.2f}"
        form = "w8a8" if s["bits"] == 8 else "w4a4"
        lines.append(
            f"| {s['role']} | {form} | {s['name']} | {s['count']} | {s['online_both']:.2f} | {s['offline_both']:.2f} | "
            f"{s['gap_act']:+.2f} | {s['gap_weight']:+.2f} | {s['gap_both']:+.2f} | {s['offline_better']}/{s['count']} | {pen} |"
        )
    lines += [
        "",
        "With GPTQ weights (the same per-channel grids, columns rounded in turn with the error spread",
        "through the inverse Hessian; calibrated on the first half of the sequences, SQNR on the other",
        "half, activations quantized in both; medians):",
        "",
        "| form | layer | online RTN | online GPTQ | offline RTN | offline GPTQ | gap (GPTQ both sides) | offline better |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(result["summary"], key=lambda s: (-s["bits"], s["name"] != "all", s["name"])):
        if s["role"] != "reader":
            continue
        lines.append(
            f"| {'w8a8' if s['bits'] == 8 else 'w4a4'} | {s['name']} | {s['online_rtn']:.2f} | {s['online_gptq']:.2f} | "
            f"{s['offline_rtn']:.2f} | {s['offline_gptq']:.2f} | {s['gap_gptq']:+.2f} | {s['offline_better_gptq']}/{s['count']} |"
        )
    lines += ["", f"Correlation, over the {sum(1 for r in result['rows'] if r['role'] == 'reader' and r['bits'] == 8)} "
              f"w8a8 readers, of the fold penalty with the measured online-minus-offline loss: "
              f"{result['penalty_correlation']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
