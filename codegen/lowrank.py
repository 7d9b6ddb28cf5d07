"""Low-rank weight compression math: the reference definitions behind blocklr and lr-w4a16.

Both forms compress a frozen float weight W [N, K] (N = out_features, K = in_features) at
compile time. Float factors are stored in float16 (FACTOR_DTYPE); every byte count below is
what the rewritten graph really stores.

blocklr (block low-rank), k x k grid, block (j, n) = W[j*N/k:(j+1)*N/k, n*K/k:(n+1)*K/k]:

    W_jn ~ U_jn V_jn        U_jn [N/k, r_jn] = P_jn[:, :r] * sigma[:r],  V_jn [r_jn, K/k] = Q_jn[:r]
    (P_jn, sigma, Q_jn = the SVD of W_jn; truncation at r_jn is the best rank-r_jn
    approximation in Frobenius norm, Eckart-Young. Computed from the float64 eigendecomposition
    of the block's smaller Gram matrix, several times faster than an SVD on CPU; which factor
    carries sigma depends on the block's shape, the product is the same.)

  Stored layout ("flat, rank-major"): u [R, N/k] (= the U_jn^T stacked), v [R, K/k] (the V_jn
  stacked), R = sum of all r_jn, blocks in row-major order b = j*k + n, block b owning rows
  offsets[b]:offsets[b+1] (offsets = cumulative sum of `ranks`). `ranks` (k*k ints) travels
  as a static int[] argument of the op, so shapes are static for the kernels and ONNX. Nothing
  is zero-padded: a rank-0 block costs nothing.

  Rank choice:
    rank=r       every block gets min(r, N/k, K/k);
    budget=f     a byte budget B = floor(f * 2*N*K) (a fraction of the layer's float16 weight
                 bytes). A rank-1 term costs c = 2*(N/k + K/k) bytes in every block (blocks are
                 the same size), so the greedy choice by singular-value energy is: sort the
                 sigma^2 of all blocks together, keep the floor(B / c) largest. With equal costs
                 this greedy is optimal for the total squared error sum_jn ||W_jn - U_jn V_jn||^2.

lr-w4a16 (a float low-rank part plus an int4 residual; SVDQuant / LQ-LoRA style):

    W ~ L1 L2 + deq(Q4(W - L1 L2))     L1 [N, r] float16, L2 [r, K] float16,
                                       Q4 = quant.quantize_int4_groupwise (qhl's w4a16 packing)

  iters=0: L1 L2 = the rank-r truncated SVD of W, the residual quantized once (SVDQuant's
  split, without its smoothing). iters=t > 0 adds up to t LQ-LoRA alternations:
  L1 L2 <- SVD_r(W - deq(Q)), Q <- Q4(W - L1 L2), keeping the best (L, Q) seen and stopping at
  the first step whose ||W - L1 L2 - deq(Q)||_F does not improve.
  Rank by budget: r = floor((B - bytes of the int4 residual) / (2*(N + K))); a budget below
  the residual's own bytes is declined by the pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qhl.codegen import quant

__all__ = [
    "FACTOR_DTYPE",
    "truncated_svd",
    "blocklr_ranks",
    "blocklr_factorize",
    "blocklr_compress",
    "blocklr_dense",
    "blocklr_bytes",
    "int4_bytes",
    "lr_w4a16_rank_for_budget",
    "lr_w4a16_factorize",
    "lr_w4a16_dense",
]

FACTOR_DTYPE = torch.float16  # storage of the float factors (2 bytes per element)
_FACTOR_BYTES = 2


def _spectrum(w: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(sigma^2 descending, the matching singular vectors of the smaller side, which side).

    Computed as the eigendecomposition of the smaller Gram matrix in float64 (W^T W when N >= K,
    else W W^T): several times faster than an SVD on CPU, and exact enough for weights stored
    in float32 (the eigenvalues carry float64 rounding of sigma_max^2; truncation keeps the
    large ones). Returns (s2, vecs, right) with vecs [min(N, K), min(N, K)] columns.
    """
    w64 = w.double()
    right = w64.shape[0] >= w64.shape[1]
    gram = w64.t() @ w64 if right else w64 @ w64.t()
    s2, vecs = torch.linalg.eigh(gram)  # ascending
    return s2.flip(0).clamp_(min=0.0), vecs.flip(1), right


def _truncate(w: Tensor, vecs: Tensor, right: bool, rank: int) -> tuple[Tensor, Tensor]:
    """A [N, r], B [r, K] with A @ B = the rank-r truncation of w, from _spectrum's vectors."""
    q = vecs[:, :rank]
    w64 = w.double()
    if right:  # W ~ (W Q) Q^T: A = P sigma, B = Q^T (orthonormal rows)
        return (w64 @ q).to(w.dtype), q.t().contiguous().to(w.dtype)
    return q.contiguous().to(w.dtype), (q.t() @ w64).to(w.dtype)  # W ~ P (P^T W): A = P, B = sigma Q^T


def truncated_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (A [N, r], B [r, K]) with A @ B the best rank-r approximation (Eckart-Young).

    The singular values go into the factor on the larger side (A when N >= K). At full rank
    A @ B reproduces w up to float64 rounding (W Q Q^T with Q orthogonal).
    """
    _, vecs, right = _spectrum(w)
    return _truncate(w, vecs, right, min(rank, vecs.shape[1]))


def _blocks(w: Tensor, k: int) -> Tensor:
    """w [N, K] -> [k, k, N/k, K/k], block (j, n) = the j-th row block, n-th column block."""
    n_out, n_in = w.shape
    return w.reshape(k, n_out // k, k, n_in // k).permute(0, 2, 1, 3)


def _ranks_from_spectra(s2: Tensor, n_out: int, n_in: int, k: int, rank: int | None, budget: float | None) -> list[int]:
    """s2 [k*k, min(N/k, K/k)] (descending per block) -> per-block ranks."""
    full = s2.shape[1]
    if (rank is None) == (budget is None):
        raise ValueError("blocklr: give exactly one of rank or budget")
    if rank is not None:
        return [min(int(rank), full)] * (k * k)
    cost = _FACTOR_BYTES * (n_out // k + n_in // k)
    terms = int(budget * _FACTOR_BYTES * n_out * n_in) // cost
    order = torch.argsort(s2.reshape(-1), descending=True, stable=True)[: min(terms, s2.numel())]
    # Taking the largest sigma^2 overall keeps each block's selection a prefix of its own sigmas.
    return torch.bincount(order // full, minlength=k * k).tolist()


def blocklr_ranks(w: Tensor, k: int, rank: int | None = None, budget: float | None = None) -> list[int]:
    """Per-block ranks (row-major, k*k ints) for a rank or a byte budget (see the module doc)."""
    n_out, n_in = w.shape
    blocks = _blocks(w.double(), k)
    full = min(n_out // k, n_in // k)
    if budget is None:  # a fixed rank needs no spectrum
        return _ranks_from_spectra(torch.zeros(k * k, full), n_out, n_in, k, rank, budget)
    s2 = torch.stack([_spectrum(blocks[b // k, b % k])[0] for b in range(k * k)])
    return _ranks_from_spectra(s2, n_out, n_in, k, rank, budget)


def blocklr_factorize(
    w: Tensor, k: int, ranks: list[int], dtype: torch.dtype = FACTOR_DTYPE
) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (u [R, N/k], v [R, K/k]) in the flat rank-major layout, stored as `dtype`."""
    blocks = _blocks(w.float(), k)
    return _stack(w, k, [truncated_svd(blocks[b // k, b % k], r) for b, r in enumerate(ranks)], dtype)


def blocklr_compress(
    w: Tensor, k: int, rank: int | None = None, budget: float | None = None, dtype: torch.dtype = FACTOR_DTYPE
) -> tuple[Tensor, Tensor, list[int]]:
    """blocklr_ranks + blocklr_factorize with one eigendecomposition per block: (u, v, ranks)."""
    n_out, n_in = w.shape
    blocks = _blocks(w.float(), k)
    spectra = [_spectrum(blocks[b // k, b % k]) for b in range(k * k)]
    ranks = _ranks_from_spectra(torch.stack([s[0] for s in spectra]), n_out, n_in, k, rank, budget)
    parts = [_truncate(blocks[b // k, b % k], spectra[b][1], spectra[b][2], r) for b, r in enumerate(ranks)]
    u, v = _stack(w, k, parts, dtype)
    return u, v, ranks


def _stack(w: Tensor, k: int, parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n_out, n_in = w.shape
    u = torch.cat([a.t() for a, _ in parts]).to(dtype).contiguous()
    v = torch.cat([b for _, b in parts]).to(dtype).contiguous()
    return u.reshape(-1, n_out // k), v.reshape(-1, n_in // k)


def blocklr_dense(u: Tensor, v: Tensor, ranks: list[int]) -> Tensor:
    """The float32 [N, K] weight that (u, v, ranks) stand for: W_jn = u_b^T v_b."""
    k = int(round(len(ranks) ** 0.5))
    nb, kb = u.shape[1], v.shape[1]
    w = torch.zeros(k * nb, k * kb)
    o = 0
    for b, r in enumerate(ranks):
        j, n = divmod(b, k)
        w[j * nb : (j + 1) * nb, n * kb : (n + 1) * kb] = u[o : o + r].float().t() @ v[o : o + r].float()
        o += r
    return w


def blocklr_bytes(n_out: int, n_in: int, k: int, ranks: list[int]) -> int:
    return _FACTOR_BYTES * sum(ranks) * (n_out // k + n_in // k)


def int4_bytes(n_out: int, n_in: int, group_size: int) -> int:
    """Bytes of quant.quantize_int4_groupwise's output: packed codes + float32 scale + uint8 zero."""
    return n_out * n_in // 2 + n_out * (n_in // group_size) * (4 + 1)


def lr_w4a16_rank_for_budget(n_out: int, n_in: int, group_size: int, budget: float) -> int:
    """The largest rank whose total bytes fit the budget; negative when the residual alone doesn't."""
    spare = int(budget * _FACTOR_BYTES * n_out * n_in) - int4_bytes(n_out, n_in, group_size)
    return spare // (_FACTOR_BYTES * (n_out + n_in)) if spare >= 0 else -1


def lr_w4a16_factorize(
    w: Tensor,
    rank: int,
    group_size: int,
    symmetric: bool = True,
    clip: str = "none",
    iters: int = 0,
    dtype: torch.dtype = FACTOR_DTYPE,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """w [N, K] -> (l1 [N, r], l2 [r, K], packed, scale, zero); see the module docstring.

    The residual is quantized against the low-rank part as stored (rounded to `dtype`), so the
    int4 codes correct the factors' rounding too.
    """
    wf = w.float()

    def quantized_residual(l1: Tensor, l2: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], float]:
        low = l1.float() @ l2.float()
        q = quant.quantize_int4_groupwise(wf - low, group_size, symmetric, clip)
        err = (wf - low - quant.dequantize_int4_groupwise(*q, group_size)).pow(2).sum().item()
        return q, err

    a, b = truncated_svd(wf, rank)
    l1, l2 = a.to(dtype), b.to(dtype)
    q, err = quantized_residual(l1, l2)
    for _ in range(iters):
        a, b = truncated_svd(wf - quant.dequantize_int4_groupwise(*q, group_size), rank)
        c1, c2 = a.to(dtype), b.to(dtype)
        cq, cerr = quantized_residual(c1, c2)
        if not cerr < err:  # LQ-LoRA's stopping rule: the error stopped decreasing
            break
        l1, l2, q, err = c1, c2, cq, cerr
    return (l1.contiguous(), l2.contiguous(), *q)


def lr_w4a16_dense(l1: Tensor, l2: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The float32 [N, K] weight that an lr-w4a16 layer stands for."""
    return l1.float() @ l2.float() + quant.dequantize_int4_groupwise(packed, scale, zero, group_size)
