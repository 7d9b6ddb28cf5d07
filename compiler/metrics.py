"""Numbers we judge by: SQNR in dB against float32, cosine similarity, perplexity."""
from __future__ import annotations

import math

import torch

__all__ = ["sqnr_db", "cosine", "perplexity"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2), in float64. inf when out == ref exactly."""
    r, o = ref.detach().double(), out.detach().double()
    noise = (r - o).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.detach().double().flatten(), b.detach().double().flatten(), dim=0).item()


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits [B, T, V] against tokens [B, T]."""
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )
    return math.exp(lp.item())
