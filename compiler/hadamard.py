"""The Hadamard matrices qhl uses: one orthonormal matrix per size, the same everywhere.

    hadamard_matrix(n) = (H_K ⊗ H_{2^m}) / sqrt(n),   n = K · 2^m,   H Hᵀ = I

H_K is a ±1 Hadamard matrix of order K (K = 1, or a multiple of 4 that is not a power of two)
and H_{2^m} is Sylvester's. The K-chunk is the SLOWEST index: a row x of length n, reshaped to
[K, n/K], is transformed by a fast Walsh–Hadamard transform (FWHT) along its last dim and then
by H_Kᵀ across chunks (x @ H, row-vector convention). That is the structure of the Dao-AILab
`hadamard_transform_{12,20,28,40}N` kernels and of QuaRot's `matmul_hadU` (techniques.md §7), but
the K matrices are qhl's own, so an offline rotation must be undone with *this* module's matrix,
never with another library's (their 20/28/40 matrices differ from each other already).

The K matrices are built, not copied:

    Paley I     q a prime power, q ≡ 3 (mod 4): order q + 1     (12, 20, 28 = GF(27), 44, 60, 108, 140, ...)
    Paley II    q a prime power, q ≡ 1 (mod 4): order 2(q + 1)  (36, 52 = GF(25), 76, 100 = GF(49), ...)
    torchao     156 and 172 only (orders with no Paley construction): when torchao is importable,
                its verified matrices (torchao/prototype/spinquant) are loaded and checked here
                (H Hᵀ = K I, exactly, in integers) before use; without torchao these two orders are
                simply not buildable. 312 = 311 + 1 and 344 = 343 + 1 (= 7³ + 1) are Paley I, so
                every 156·2^m and 172·2^m with m >= 1 is buildable either way.

Paley needs arithmetic in GF(q) for prime powers (27 = 3³, 25 = 5², 343 = 7³): elements are
polynomials over GF(p) modulo an irreducible polynomial found by search, and the quadratic
character χ(a) is 1 for nonzero squares, -1 for non-squares, 0 at 0. For a size n the plan is the
smallest buildable K (more of the transform is the O(n log n) FWHT, less is the K×K matmul).

Every matrix is verified when it is built (an integer ±1 matrix with H Hᵀ = K I exactly) and cached
in float64: the K factors and powers of two without bound (they are small), the full n×n matrices
up to n = 4096 in a small LRU cache (one n = 16384 matrix would be 2 GiB in float64).
"""
from __future__ import annotations

import functools
import itertools
import logging
import math

import torch
from torch import Tensor

__all__ = [
    "hadamard_matrix",
    "hadamard_plan",
    "hadamard_factor",
    "can_build",
    "block_fallback",
    "random_signs",
    "supported_sizes",
    "BLOCK_FALLBACK_SIZES",
]

log = logging.getLogger(__name__)

# Block sizes for the block-diagonal fallback I ⊗ H_b, largest first.
BLOCK_FALLBACK_SIZES = (256, 128, 64, 32, 16)
_MAX_K = 1024  # largest K factor planned: its K×K stage is a dense matmul, and Paley builds are O(K²)


# --- GF(q) arithmetic, q = p^k ----------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mulmod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """a * b mod (monic `modulus`) over GF(p); polynomials as coefficient lists, low degree first."""
    k = len(modulus) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce x^d using the monic modulus
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * modulus[i]) % p
    return prod[:k]


def _digits(v: int, p: int, k: int) -> list[int]:
    return [(v // p**i) % p for i in range(k)]


def _number(digits: list[int], p: int) -> int:
    return sum(d * p**i for i, d in enumerate(digits))


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p), by brute force (the fields
    are tiny): f is irreducible iff no monic polynomial of degree 1..k/2 divides it."""
    def divides(g: list[int], f: list[int]) -> bool:
        r = list(f)
        dg = len(g) - 1
        for d in range(len(r) - 1, dg - 1, -1):
            c = r[d]
            if c:
                for i in range(dg + 1):
                    r[d - dg + i] = (r[d - dg + i] - c * g[i]) % p
        return not any(r[:dg])

    for tail in itertools.product(range(p), repeat=k):
        f = list(tail) + [1]
        if f[0] == 0:
            continue
        if not any(divides(list(g) + [1], f) for deg in range(1, k // 2 + 1)
                   for g in itertools.product(range(p), repeat=deg)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> Tensor:
    """Q[a, b] = χ(a - b) over GF(q), elements numbered 0..q-1 by their base-p digits."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = torch.tensor([_digits(v, p, k) for v in range(q)], dtype=torch.int64)  # [q, k]
    weights = torch.tensor([p**i for i in range(k)], dtype=torch.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights  # [q, q]: index of a - b
    if k == 1:
        squares = {(a * a) % p for a in range(1, q)}
    else:
        f = _irreducible(p, k)
        squares = {_number(_poly_mulmod(_digits(a, p, k), _digits(a, p, k), f, p), p)
                   for a in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    return chi[diff]


# --- K-matrix constructions (integer ±1, order K) -------------------------------------------------

def _paley1(q: int) -> Tensor:
    """Order q + 1, q ≡ 3 mod 4: H = I + S, S = [[0, 1ᵀ], [-1, Q]] (Q skew-symmetric)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.int64) + s


def _paley2(q: int) -> Tensor:
    """Order 2(q + 1), q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] (Q symmetric); each 0 of C becomes
    [[1, -1], [-1, -1]] and each ±1 becomes ±[[1, 1], [1, -1]]."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    sign_block = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, sign_block) + torch.kron((c == 0).to(torch.int64), zero_block)


def _torchao_k(k: int) -> Tensor | None:
    """torchao's verified matrix of order k (used only for 156 and 172), or None without torchao."""
    try:
        from torchao.prototype.spinquant import _hadamard_matrices as tao
    except Exception:  # torchao absent or broken: the order is just not buildable
        return None
    getter = getattr(tao, f"get_had{k}", None)
    return None if getter is None else getter().round().to(torch.int64)


_TORCHAO_ORDERS = (156, 172)


def _is_hadamard(h: Tensor) -> bool:
    k = h.shape[0]
    if h.shape != (k, k) or not bool((h.abs() == 1).all()):
        return False
    hf = h.to(torch.float32)  # sums of k products ±1 are exact in float32 while k < 2^24
    return torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float32))


@functools.lru_cache(maxsize=None)
def _construction(k: int) -> str | None:
    """How qhl builds a Hadamard matrix of order k (cheap: nothing is built), or None.

    Tried in this order: Sylvester (power of two), Paley I, Paley II, torchao (156, 172 only),
    Sylvester doubling [[H, H], [H, -H]] of order k/2.
    """
    if k < 1 or (k > 2 and k % 4):
        return None
    if k & (k - 1) == 0:
        return "sylvester"
    if _prime_power(k - 1) and (k - 1) % 4 == 3:
        return "paley1"
    if _prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "paley2"
    if k in _TORCHAO_ORDERS and _torchao_k(k) is not None:
        return "torchao"
    if k % 8 == 0 and _construction(k // 2) is not None:
        return "doubling"
    return None


@functools.lru_cache(maxsize=None)
def _k_matrix(k: int) -> Tensor | None:
    """An integer ±1 Hadamard matrix of order k, verified (H Hᵀ = k I exactly), or None."""
    how = _construction(k)
    if how is None:
        return None
    if how == "sylvester":
        h = torch.ones(1, 1, dtype=torch.int64)
        for _ in range(k.bit_length() - 1):
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    elif how == "paley1":
        h = _paley1(k - 1)
    elif how == "paley2":
        h = _paley2(k // 2 - 1)
    elif how == "torchao":
        h = _torchao_k(k)
    else:
        half = _k_matrix(k // 2)
        h = torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    # A construction bug must never give a non-orthogonal rotation. Sylvester's H_2^⊗m is exact by
    # construction; checking it above 1024 would cost k³ (4.4 TFLOP at 16384) for nothing.
    if (how != "sylvester" or k <= 1024) and not _is_hadamard(h):
        raise AssertionError(f"qhl built a non-Hadamard matrix of order {k} ({how})")
    log.debug("Hadamard order %d: %s", k, how)
    return h


# --- sizes -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _plan(n: int) -> tuple[int, int] | None:
    if n < 1:
        return None
    pow2 = n & -n
    odd = n // pow2
    if odd == 1:
        return (1, n)
    k = odd * 4
    while k <= min(n, _MAX_K):  # smallest buildable K = odd · 2^j, j >= 2
        if _construction(k) is not None:
            return (k, n // k)
        k *= 2
    return None


def hadamard_plan(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K · 2^m and H_n = (H_K ⊗ H_{2^m}) / sqrt(n); ValueError if not buildable."""
    plan = _plan(int(n))
    if plan is None:
        raise ValueError(_cannot_build_message(int(n)))
    return plan


def can_build(n: int) -> bool:
    """Whether qhl has a full orthonormal Hadamard matrix of size n."""
    return _plan(int(n)) is not None


def block_fallback(n: int) -> int | None:
    """The largest power of two b, 16 <= b <= 256, dividing n (for block-diagonal I ⊗ H_b), or None."""
    return next((b for b in BLOCK_FALLBACK_SIZES if n > 0 and n % b == 0), None)


@functools.lru_cache(maxsize=None)
def supported_sizes(limit: int = 16384) -> list[int]:
    """Every n in [1, limit] with a full Hadamard matrix, ascending (a fresh list per call)."""
    return [n for n in range(1, limit + 1) if can_build(n)]


def _cannot_build_message(n: int) -> str:
    if n < 1:
        return f"qhl cannot build a Hadamard matrix of size {n}: the size must be a positive integer."
    below = next((m for m in range(n - 1, 0, -1) if can_build(m)), None)
    above = next(m for m in itertools.count(n + 1) if can_build(m))
    fallback = block_fallback(n)
    hint = (f"; a block-diagonal rotation I ⊗ H_{fallback} fits n={n}" if fallback
            else "; no block-diagonal fallback either (n is not a multiple of 16)")
    return (
        f"qhl cannot build a Hadamard matrix of size {n}: it needs n = K·2^m with a known K "
        f"(1, or a multiple of 4 built by Sylvester/Paley). Nearest buildable sizes: "
        f"{below} below and {above} above{hint}."
    )


# --- matrices ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _factor64(k: int) -> Tensor:
    h = _k_matrix(k)
    if h is None:
        raise ValueError(_cannot_build_message(k))
    return h.to(torch.float64)


def hadamard_factor(k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The UNNORMALISED ±1 matrix H_k of one factor (a K of a plan, or a power of two).

    The fast transforms use it directly: y = (x reshaped [K, 2^m]) → FWHT → H_Kᵀ ·, then / sqrt(n).
    """
    return _factor64(int(k)).to(dtype)


_CACHE_MAX_N = 4096  # full matrices up to 4096 (128 MiB in float64) are cached, 8 at most


def _build64(n: int) -> Tensor:
    k, p = hadamard_plan(n)
    h = torch.kron(_factor64(k), _factor64(p)) if k > 1 else _factor64(p).clone()
    return h.div_(math.sqrt(n))


_cached64 = functools.lru_cache(maxsize=8)(_build64)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Hadamard matrix qhl uses for size n: (H_K ⊗ H_{2^m}) / sqrt(n), H Hᵀ = I.

    Raises ValueError, naming the nearest buildable sizes, when n has no construction.
    Returns a new tensor (the float64 build is cached up to n = 4096; callers may modify it).
    Above that the matrix is big (1 GiB in float32 at n = 16384): prefer qhl::hadamard, which
    never forms it.
    """
    n = int(n)
    if n > _CACHE_MAX_N:
        return _build64(n).to(dtype)
    h = _cached64(n)
    return h.clone() if dtype == torch.float64 else h.to(dtype)


def random_signs(n: int, seed: int) -> Tensor:
    """A seeded vector of n random ±1.0 (float32), for randomized rotations diag(s) · H."""
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (int(n),), generator=gen, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float32)
