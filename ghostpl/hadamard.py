"""Hadamard matrices of the orders that Sylvester's and Paley's constructions reach.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``Hᵀ H = n I``. Orders handled here are
``n = 2^k · m`` with

* ``m = 1`` (Sylvester: ``H_2n = [[H, H], [H, -H]]``),
* ``m = q + 1`` for a prime ``q ≡ 3 (mod 4)`` (Paley construction I),
* ``m = 2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (Paley construction II),

the ``2^k`` factor coming from a Kronecker product with a Sylvester matrix. Hidden sizes this covers
include 576 = 16 · 36 (36 = 2(17 + 1)), 640 = 32 · 20 (20 = 19 + 1), 896, 960, 1536, 3584 and every
power of two. Reference: J. Seberry and M. Yamada, *Hadamard Matrices: Constructions using Number
Theory and Linear Algebra*, Wiley, 2020, chapter 1 (Sylvester and Paley constructions).
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    if value % 2 == 0:
        return value == 2
    for divisor in range(3, math.isqrt(value) + 1, 2):
        if value % divisor == 0:
            return False
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Build the ``q × q`` Jacobsthal matrix ``Q[i, j] = χ(j - i)``, with ``χ`` the quadratic character mod ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    character = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return character[(index[None, :] - index[:, None]) % q]


def _paley_one(q: int) -> torch.Tensor:
    """Order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: ``I + S``, with ``S`` the skew conference matrix."""
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + skew


def _paley_two(q: int) -> torch.Tensor:
    """Order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``, from the symmetric conference matrix ``C``.

    Each zero of ``C`` (its diagonal) becomes ``[[1, -1], [-1, -1]]`` and each ±1 becomes
    ``±[[1, 1], [1, -1]]``.
    """
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = 1.0
    conference[1:, 0] = 1.0
    conference[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _core_construction(order: int) -> str | None:
    """Name the construction that gives a Hadamard matrix of ``order`` without Sylvester doubling."""
    if order == 1:
        return "sylvester"
    if order % 4 == 0 and _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "paley_one"
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "paley_two"
    return None


def hadamard_factorization(n: int) -> tuple[int, int, str] | None:
    """Return ``(2^k, m, construction)`` with ``n = 2^k · m``, or ``None`` when no construction applies.

    The largest power of two is tried first, so ``m`` is the smallest core order that works.
    """
    if n < 1:
        return None
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    while power >= 1:
        core = n // power
        construction = _core_construction(core)
        if construction is not None:
            return power, core, construction
        power //= 2
    return None


def is_supported_size(n: int) -> bool:
    return hadamard_factorization(n) is not None


def nearest_supported_sizes(n: int) -> tuple[int | None, int]:
    """Find the largest supported size below ``n`` (``None`` if there is none) and the smallest above it."""
    below = next((size for size in range(n - 1, 0, -1) if is_supported_size(size)), None)
    above = next(size for size in range(max(n + 1, 1), 4 * max(n, 1) + 2) if is_supported_size(size))
    return below, above


@functools.lru_cache(maxsize=8)
def _unnormalized(n: int) -> torch.Tensor:
    factorization = hadamard_factorization(n)
    if factorization is None:
        below, above = nearest_supported_sizes(n) if n >= 1 else (None, 1)
        nearby = f"sizes are {below} and {above}" if below is not None else f"size is {above}"
        raise ValueError(
            f"No Hadamard construction for size {n}: supported sizes are n = 2^k · m with m = 1, "
            "m = q + 1 for a prime q ≡ 3 (mod 4), or m = 2(q + 1) for a prime q ≡ 1 (mod 4), "
            f"such as 576 = 16 · 36 and 640 = 32 · 20. The nearest supported {nearby}."
        )
    power, core, construction = factorization
    if construction == "sylvester":
        matrix = torch.ones(1, 1, dtype=torch.float64)
    elif construction == "paley_one":
        matrix = _paley_one(core - 1)
    else:
        matrix = _paley_two(core // 2 - 1)
    doubling = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.kron(doubling, matrix)
    return matrix


def hadamard_matrix(n: int, normalized: bool = True) -> torch.Tensor:
    """Return a float64 ``(n, n)`` Hadamard matrix, scaled by ``1/√n`` when ``normalized``.

    Unnormalised entries are ±1 with ``Hᵀ H = n I``. The normalised matrix is orthogonal,
    ``Hᵀ H = I``. Raises ``ValueError`` for a size with no construction here, naming the
    supported sizes nearest to it.
    """
    matrix = _unnormalized(n).clone()
    if normalized:
        matrix /= math.sqrt(n)
    return matrix
