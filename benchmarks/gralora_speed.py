"""One GraLoRA training step (forward + backward) on CPU: qhl::gralora_linear against peft's eager
GraLoRA layers, on the same weights, in one run on one machine.

Model: DEPTH x nn.Linear(WIDTH, WIDTH) (each followed by a GELU), every Linear wrapped by
peft.get_peft_model(GraloraConfig(...)) / LoraConfig; the qhl variant is the same module tree
whose Linears call torch.ops.qhl.gralora_linear with peft's own parameters (base frozen, the
adapters trainable in both). A step is: forward, loss = mean(y^2), backward (adapter and input
gradients; no optimizer). Timings: median of --reps runs after 2 warmups, the variants timed
round-robin so a noisy neighbour slows all alike. Before timing, the two variants' losses and
adapter gradients are compared (relative error printed).
Writes benchmarks/results/gralora_cpu.{json,md}.

    .venv/bin/python benchmarks/gralora_speed.py [--reps 9] [--tokens 512] [--threads N]

On a shared, loaded box use --threads 1: with torch's default threads and a load average of ~10
on 2 cores, OpenMP barrier waits dominated (a rank-16 matmul took ~50 ms instead of ~1 ms) and the
ratio swung between 0.66 and 1.27 from run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_env import machine, round_robin  # noqa: E402

import qhl.codegen  # noqa: E402,F401  (registers the ops)

log = logging.getLogger("gralora_speed")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTH, DEPTH = 1024, 4
# (name, adapter kind, r, k, hybrid_r)
CONFIGS = [
    ("gralora r=16 k=2", "gralora", 16, 2, 0),
    ("gralora r=32 k=4 hybrid_r=8", "gralora", 32, 4, 8),
    ("lora r=16", "lora", 16, 1, 0),
]


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class QhlGraloraLinear(nn.Module):
    """The fused op over a peft-wrapped layer's tensors (shared, not copied)."""

    def __init__(self, peft_layer: nn.Module, kind: str):
        super().__init__()
        self.base = peft_layer.base_layer
        self.scaling = peft_layer.scaling["default"]
        if kind == "gralora":
            self.lora_a, self.lora_b = (
                peft_layer.gralora_A["default"],
                peft_layer.gralora_B["default"],
            )
            hr = peft_layer.hybrid_r["default"]
            self.hybrid_a = peft_layer.gralora_A_general["default"].weight if hr else None
            self.hybrid_b = peft_layer.gralora_B_general["default"].weight if hr else None
            self._lora = None
        else:
            # registered here too, so zero_grad reaches them
            self.lora_a_weight, self.lora_b_weight = (
                peft_layer.lora_A["default"].weight,
                peft_layer.lora_B["default"].weight,
            )
            self._lora = True
            self.hybrid_a = self.hybrid_b = None

    def forward(self, x):
        if self._lora is not None:  # k = 1: views of peft's LoRA weights (gradients flow back)
            a, b = self.lora_a_weight.t()[None], self.lora_b_weight.t()[None]
        else:
            a, b = self.lora_a, self.lora_b
        return torch.ops.qhl.gralora_linear(
            x, self.base.weight, self.base.bias, a, b, self.hybrid_a, self.hybrid_b, self.scaling
        )


def build(kind: str, r: int, k: int, hybrid_r: int) -> tuple[nn.Module, nn.Module]:
    import peft

    torch.manual_seed(0)
    if kind == "gralora":
        cfg = peft.GraloraConfig(
            r=r,
            alpha=2 * r,
            gralora_k=k,
            hybrid_r=hybrid_r,
            init_weights=False,
            target_modules=["fc"],
        )
    else:
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["fc"])
    peft_model = peft.get_peft_model(Stack(WIDTH, DEPTH), cfg)
    fused = Stack(WIDTH, DEPTH)
    for blk, pblk in zip(fused.blocks, peft_model.base_model.model.blocks, strict=True):
        blk.fc = QhlGraloraLinear(pblk.fc, kind)
    return peft_model, fused


def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


def _adapter_grads(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}


def check_same(peft_model, fused, x) -> dict[str, float]:
    lp = step(peft_model, x)
    gp, gxp = _adapter_grads(peft_model), x.grad.clone()
    peft_model.zero_grad(set_to_none=True)
    lf = step(fused, x)
    gf, gxf = _adapter_grads(peft_model), x.grad.clone()  # the fused model shares peft's parameters
    assert set(gf) == set(gp) and gp
    rel = max(((gf[n] - gp[n]).norm() / gp[n].norm()).item() for n in gp)
    return dict(
        loss_rel_err=abs((lf - lp) / lp).item(),
        max_adapter_grad_rel_err=rel,
        x_grad_rel_err=((gxf - gxp).norm() / gxp.norm()).item(),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, kind, r, k, hr in CONFIGS:
        peft_model, fused = build(kind, r, k, hr)
        x = torch.randn(4, args.tokens // 4, WIDTH, requires_grad=True)
        same = check_same(peft_model, fused, x)
        fns = {"peft": lambda m=peft_model, x=x: step(m, x), "qhl": lambda m=fused, x=x: step(m, x)}
        ms = {n: t["median_ms"] for n, t in round_robin(fns, args.reps, warmup=2).items()}
        row = dict(
            config=name,
            tokens=args.tokens,
            peft_ms=ms["peft"],
            qhl_ms=ms["qhl"],
            speedup=ms["peft"] / ms["qhl"],
            **same,
        )
        log.info(
            "%-30s peft %8.2f ms  qhl %8.2f ms  peft/qhl %.3f  (loss rel err %.1e, grad rel err %.1e)",
            name,
            ms["peft"],
            ms["qhl"],
            row["speedup"],
            same["loss_rel_err"],
            same["max_adapter_grad_rel_err"],
        )
        rows.append(row)
    res = dict(machine=machine("peft"), args=vars(args), width=WIDTH, depth=DEPTH, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gralora_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    md = [
        "# GraLoRA training step on CPU: qhl::gralora_linear vs peft eager",
        "",
        f"{DEPTH} x Linear({WIDTH}) + GELU, {args.tokens} tokens, forward + backward (loss = mean(y^2)), "
        f"median of {args.reps} runs, round-robin. Written by `benchmarks/gralora_speed.py`.",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, torch {m['torch']}, "
        f"peft {m['peft']}, load avg {m['load_avg_1m']}, {m['date']}.",
        "",
        "| adapter | peft eager (ms) | qhl op (ms) | peft / qhl | loss rel err | max grad rel err |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        md.append(
            f"| {row['config']} | {row['peft_ms']:.2f} | {row['qhl_ms']:.2f} | {row['speedup']:.3f} | "
            f"{row['loss_rel_err']:.1e} | {row['max_adapter_grad_rel_err']:.1e} |"
        )
    (RESULTS / "gralora_cpu.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
