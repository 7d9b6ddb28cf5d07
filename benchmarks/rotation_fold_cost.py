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
weight scales. This script measures all of it on real activations, per layer and form:

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
                    rows.append(dict(layer=i, name=name, role="reader", bits=bits, penalty_db=penalty,
                                     online=three_ways((xn * g) @ H, w @ H, ref, bits),
                                     offline=three_ways(xn @ Q, (w * g) @ Q, ref, bits)))
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
    lines += ["", f"Correlation, over the {sum(1 for r in result['rows'] if r['role'] == 'reader' and r['bits'] == 8)} "
              f"w8a8 readers, of the fold penalty with the measured online-minus-offline loss: "
              f"{result['penalty_correlation']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
