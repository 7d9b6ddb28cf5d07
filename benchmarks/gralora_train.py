"""GraLoRA fine-tuning through qhl against peft eager: loss curves and step times (CPU).

    python benchmarks/gralora_train.py                      # MiniLM sentiment + SmolLM2 corpus
    python benchmarks/gralora_train.py --models minilm --minutes 1

For each model, two runs start from the same weights, adapters included (peft's initial A is
copied into the qhl-prepared model, so the runs differ only in how they compute):
  * peft:  peft.get_peft_model(GraloraConfig) trained eagerly;
  * qhl:   qhl.prepare(model, "gralora") trained under torch.compile(backend="qhl")
           (the fused qhl::gralora_linear forward and backward).
Same seed, same batches, same optimizer (AdamW). The two runs alternate step by step (so the load
of a shared machine falls on both alike) for `--minutes` of wall time in all. Step time is the
median over steps after the first (which includes compilation); the first step is reported apart.

Tasks:
  * MiniLM (all-MiniLM-L6-v2): mean-pooled embedding -> a trainable linear head, cross-entropy
    on pang_lee_polarity (200 labeled movie-review sentences), batch 8, 32 tokens.
  * SmolLM2-135M: causal LM loss on consecutive windows of lee_background.cor, batch 4, 64 tokens.
Writes benchmarks/results/gralora_train.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import qhl  # noqa: E402
from bench_env import machine, qhl_sources  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
R, K, ALPHA = 8, 2, 16.0


# --- tasks ------------------------------------------------------------------------------------------


class MiniLMClassifier(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(384, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm_task(seed: int):
    from qhl.models import gensim_test_data, load_minilm

    encoder, tok = load_minilm()
    pairs = []
    for line in gensim_test_data("pang_lee_polarity.cor").splitlines():
        label, _, sentence = line.strip().partition(" ")
        if sentence:
            pairs.append((sentence.strip(), 1 if label == "__label__pos" else 0))
    enc = tok([s for s, _ in pairs], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([y for _, y in pairs])
    torch.manual_seed(seed)
    model = MiniLMClassifier(encoder)

    def batches(n_steps: int, batch: int = 8):  # the same batches on every call
        gen = torch.Generator().manual_seed(seed)
        epochs = n_steps * batch // len(labels) + 1
        order = torch.cat([torch.randperm(len(labels), generator=gen) for _ in range(epochs)])
        for i in range(n_steps):
            idx = order[i * batch:(i + 1) * batch]
            yield (enc["input_ids"][idx], enc["attention_mask"][idx]), labels[idx]

    def loss_fn(model, inputs, target):
        return nn.functional.cross_entropy(model(*inputs), target)

    return model, ["query", "value"], batches, loss_fn, {"lr": 1e-3}


def smollm2_task(seed: int, seq: int = 64, batch: int = 4):
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    model.config.use_cache = False
    ids = news_corpus_tokens(tok, n_seqs=75_000 // seq, seq_len=seq)

    def batches(n_steps: int):  # the same batches on every call
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
        for i in range(n_steps):
            idx = order[(i * batch) % len(order):][:batch]
            yield (ids[idx],), None

    def loss_fn(model, inputs, _target):
        (x,) = inputs
        return model(input_ids=x, labels=x).loss

    return model, ["q_proj", "v_proj"], batches, loss_fn, {"lr": 5e-4}


# --- runs -------------------------------------------------------------------------------------------


def _lockstep(runs, batches, loss_fn, lr: float, n_steps: int | None, seconds: float | None):
    """Train several (model, callable) pairs on the same batches, one step each in turn, so that
    the shared machine's load falls on all of them alike. Returns [(losses, step times)] per run."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m, _ in runs]
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in runs]
    t_start = time.perf_counter()
    for step, (inputs, target) in enumerate(batches(n_steps or 100_000)):
        order = range(len(runs)) if step % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            _, fn = runs[i]
            t0 = time.perf_counter()
            loss = loss_fn(fn, inputs, target)
            loss.backward()
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)
            out[i][1].append(time.perf_counter() - t0)
            out[i][0].append(float(loss.detach()))
        if n_steps is None and time.perf_counter() - t_start > seconds:
            break
    return out


def run_model(name: str, minutes: float, seed: int, max_steps: int | None) -> dict[str, Any]:
    from peft import GraloraConfig, get_peft_model

    task = minilm_task if name == "minilm" else smollm2_task
    base, targets, batches_fn, loss_fn, opt_kw = task(seed)
    # MiniLM's own dropout (0.1) is off (eval mode) so the two runs see the same network; the
    # adapters train either way. SmolLM2 has no dropout.
    base.train(name != "minilm")
    # minilm: the trainable classifier head sits outside the encoder's adapters
    peft_target = base.encoder if name == "minilm" else base
    qhl_model = copy.deepcopy(base)
    cfg = GraloraConfig(r=R, alpha=ALPHA, gralora_k=K, hybrid_r=0, gralora_dropout=0.0, target_modules=targets)
    torch.manual_seed(seed)
    peft_model = get_peft_model(peft_target, cfg)
    if name == "minilm":
        base.encoder = peft_model
        for p in base.head.parameters():
            p.requires_grad_(True)
        peft_full = base
    else:
        peft_full = peft_model
    include = tuple(f"*{t}" if name != "minilm" else f"*.{t}" for t in targets)
    qhl_inner = qhl_model.encoder if name == "minilm" else qhl_model
    qhl.prepare(qhl_inner, "gralora", r=R, k=K, alpha=ALPHA, include=include)
    if name == "minilm":
        for p in qhl_model.head.parameters():
            p.requires_grad_(True)
    # same starting adapters: peft's initial A (and zero B) copied into the prepared model
    prefix = "base_model.model."
    peft_params = {n[len(prefix):] if n.startswith(prefix) else n: p for n, p in peft_model.named_parameters()}
    with torch.no_grad():
        copied = 0
        for n, p in qhl_inner.named_parameters():
            if p.requires_grad:
                p.copy_(peft_params[n])
                copied += 1
    n_trainable = sum(p.numel() for p in qhl_model.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in peft_full.parameters() if p.requires_grad)

    torch._dynamo.reset()
    be = qhl.backend("gralora", include=include)
    compiled = torch.compile(qhl_model, backend=be)
    print(f"[{name}] peft eager and qhl compiled in lockstep for {minutes} min (or {max_steps} steps)", flush=True)
    (peft_losses, peft_times), (qhl_losses, qhl_times) = _lockstep(
        [(peft_full, peft_full), (qhl_model, compiled)], batches_fn, loss_fn, opt_kw["lr"], max_steps, minutes * 60)
    steps = len(peft_losses)
    fused = sum(str(n.target) == "qhl.gralora_linear.default" for g in be.graphs if g.kind == "forward"
                for n in g.gm.graph.nodes)
    diff = [abs(a - b) for a, b in zip(peft_losses, qhl_losses)]
    med_peft, med_qhl = statistics.median(peft_times[1:]), statistics.median(qhl_times[1:])
    return {
        "model": name, "steps": steps, "trainable_params": n_trainable, "adapters_copied": copied,
        "fused_calls_in_forward_graph": fused,
        "peft_loss": peft_losses, "qhl_loss": qhl_losses,
        "max_abs_loss_diff": max(diff), "final_loss_peft": peft_losses[-1], "final_loss_qhl": qhl_losses[-1],
        "median_step_s_peft": med_peft, "median_step_s_qhl": med_qhl,
        "step_time_ratio_qhl_over_peft": med_qhl / med_peft,
        "first_step_s_qhl": qhl_times[0], "first_step_s_peft": peft_times[0],
    }


def _markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        "# GraLoRA fine-tuning: qhl (torch.compile, fused op) vs peft eager, CPU",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cores']} cores (shared), torch {env['machine']['torch']}, "
        f"{env['machine']['date']}. GraLoRA r={R}, k={K}, alpha={ALPHA:g} on the attention query/value projections; "
        "both runs start from the same adapter weights and see the same batches. Command: "
        f"`{env['command']}`.",
        "",
        "| model | steps | trainable params | final loss peft | final loss qhl | max abs loss diff | "
        "median step peft (s) | median step qhl (s) | qhl / peft |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['trainable_params']} | {r['final_loss_peft']:.4f} | "
            f"{r['final_loss_qhl']:.4f} | {r['max_abs_loss_diff']:.2e} | {r['median_step_s_peft']:.3f} | "
            f"{r['median_step_s_qhl']:.3f} | {r['step_time_ratio_qhl_over_peft']:.2f} |"
        )
    for r in results:
        n = r["steps"]
        every = max(1, n // 20)
        lines += ["", f"## {r['model']}: loss curves (every {every} steps)", "",
                  "| step | peft | qhl |", "|---|---|---|"]
        for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
            lines.append(f"| {i} | {r['peft_loss'][i]:.4f} | {r['qhl_loss'][i]:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--minutes", type=float, default=5.0, help="peft eager training time per model")
    ap.add_argument("--max-steps", type=int, default=None, help="a fixed step count instead of --minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the 2-core machine is shared, and 2 threads thrash under load)")
    ap.add_argument("--out", default=str(RESULTS / "gralora_train"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        r = run_model(name.strip(), args.minutes, args.seed, args.max_steps)
        print(f"[{name}] steps={r['steps']} max|dloss|={r['max_abs_loss_diff']:.2e} "
              f"step peft={r['median_step_s_peft']:.3f}s qhl={r['median_step_s_qhl']:.3f}s "
              f"ratio={r['step_time_ratio_qhl_over_peft']:.2f}", flush=True)
        results.append(r)
    env = {"machine": machine("peft", "transformers"), "qhl_sources": qhl_sources(),
           "command": "python benchmarks/gralora_train.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    out.with_suffix(".md").write_text(_markdown(results, env))
    print(_markdown(results, env))


if __name__ == "__main__":
    main()
