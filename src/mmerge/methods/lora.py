"""LoRA math on the array API: deltas from factors, DoRA's rescaling, exact recompression of
stacked factors (thin QR plus the SVD of a small core), randomized SVD (Halko, Martinsson and
Tropp 2011) over a matrix seen only through products, and the rank rules (spec/lora.md).

A low-rank delta is kept as `left @ right` (left: m x k, right: k x n) in the orientation the
checkpoint stores the weight; adapters' scales and weights are folded into `left`. SVDs are taken
only of small square cores, which every backend has (MLX only on its CPU stream, without
`full_matrices`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmerge.errors import InvalidInput

Array = Any
RANK_RULES = ("fixed", "epsilon", "energy")


@dataclass(frozen=True)
class LowRank:
    """A rank-k matrix `left @ right` and every singular value that was computed (descending,
    on the backend): the k kept and those truncated after them."""

    left: Array
    right: Array
    singular_values: Array

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


def delta_rows(xp, left_rows: Array, right: Array) -> Array:
    """The rows of `left @ right` that `left_rows` selects: a row block of a LoRA delta."""
    return xp.matmul(left_rows, right)


def dora_rescale(xp, adapted: Array, magnitude: Array, norms: Array, axis: int) -> Array:
    """DoRA's weight: `adapted` (W + delta) times magnitude / norm of each output unit, where
    `norms` are the L2 norms of `adapted` over the input dimension (rows: axis=1 of a block;
    columns: axis=0, norms summed over every row beforehand)."""
    factor = magnitude / norms
    return adapted * (factor[:, None] if axis == 1 else factor[None, :])


def row_norms(xp, block: Array) -> Array:
    """L2 norm of each row of `block`."""
    return xp.sqrt(xp.sum(block * block, axis=1))


def column_sumsq(xp, block: Array) -> Array:
    """Sum of squares of each column of `block` (added over row blocks for column norms)."""
    return xp.sum(block * block, axis=0)


WIDE_LIBRARIES = ("numpy", "torch", "cupy", "array_api_strict")  # float64 on their devices
CHOLESKY_PASSES = 3  # at most; one suffices up to a condition number ~1e4, two up to ~1e7


def thin_qr(xp, y: Array) -> tuple[Array, Array]:
    """(q, r) with y = q r, q orthonormal and r upper triangular, for a tall y (m x l, m >= l):
    CholeskyQR in float64 where the backend has float64, Householder QR (xp.linalg.qr) where it
    has not or where CholeskyQR does not reach an orthonormal q (exactly rank-deficient y).

    CholeskyQR costs two products with y per pass (its Gram matrix, and y times the inverse
    Cholesky factor, both level-3 BLAS), against a Householder QR's level-2 panels: about a
    quarter of the time of numpy's QR on the sketches of `randomized_svd` (spec/lora.md).
    """
    wide = _float64(xp, y)
    if wide is not None:
        factors = _cholesky_qr(
            xp,
            xp.astype(y, wide),
            max(float(xp.finfo(y.dtype).eps), 64 * float(xp.finfo(wide).eps)),
        )
        if factors is not None:
            q, r = factors
            return xp.astype(q, y.dtype), xp.astype(r, y.dtype)
    return xp.linalg.qr(y)


def orthonormal(xp, y: Array) -> Array:
    """An orthonormal basis of the columns of `y` (m x l, m >= l): the q of `thin_qr`."""
    return thin_qr(xp, y)[0]


def _float64(xp, y: Array):
    """xp.float64 when y's library computes in float64 on y's device, else None (MLX has it
    only when its default device is the CPU, jax only with x64 enabled, torch not on Apple GPUs
    (mps), whatever their dtype listings say: these keep Householder QR in float32)."""
    from mmerge.backend import device_of, library_name

    device, name = device_of(y), library_name(y)
    if name == "mlx":
        import mlx.core as mx

        if mx.default_device() != mx.cpu:
            return None
    elif name not in WIDE_LIBRARIES or str(device).startswith("mps"):
        return None
    return xp.float64 if "float64" in xp.__array_namespace_info__().dtypes(device=device) else None


def _cholesky_qr(xp, y: Array, tol: float) -> tuple[Array, Array] | None:
    """(q, r) of a float64 y by repeated CholeskyQR (CholeskyQR2 when one pass is not enough):
    while the Gram matrix q^T q differs from the identity by more than `tol` in an entry, factor
    it as c c^T on the host and replace q by q c^-T (r by c^T r). None when a Gram matrix is not
    numerically positive definite (y rank-deficient in float64, which float32 sketches are only
    when exactly so) or not finite, or when the passes do not get there."""
    import numpy as np

    from mmerge.backend import device_of, to_host

    eye = np.eye(y.shape[1])
    q, r = y, eye
    for done in range(CHOLESKY_PASSES + 1):
        gram = np.asarray(to_host(xp.matmul(xp.matrix_transpose(q), q)), np.float64)
        if not np.all(np.isfinite(gram)):
            return None
        if np.max(np.abs(gram - eye)) <= tol:
            return q, xp.asarray(np.ascontiguousarray(r), dtype=y.dtype, device=device_of(y))
        if done == CHOLESKY_PASSES:
            return None
        try:
            c = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            return None
        inverse = np.ascontiguousarray(np.linalg.inv(c).T)
        q = xp.matmul(q, xp.asarray(inverse, dtype=y.dtype, device=device_of(y)))
        r = c.T @ r
    return None


def thin_svd(xp, core: Array) -> tuple[Array, Array, Array]:
    """(u, s, vt) of a small matrix by an SVD of a square matrix only: a non-square core is
    first reduced by one thin QR (core = q r, svd of r), as MLX has no reduced SVD."""
    a, b = core.shape
    if a == b:
        u, s, vt = xp.linalg.svd(core)
        return u, s, vt
    if a > b:
        q, r = xp.linalg.qr(core)
        u, s, vt = xp.linalg.svd(r)
        return xp.matmul(q, u), s, vt
    q, r = xp.linalg.qr(xp.matrix_transpose(core))
    u, s, vt = xp.linalg.svd(xp.matrix_transpose(r))
    return u, s, xp.matmul(vt, xp.matrix_transpose(q))


def _split(xp, left_basis: Array, s: Array, right_basis: Array, rank: int) -> LowRank:
    """The leading `rank` singular triplets as balanced factors (sqrt(s) on each side), each
    component's sign fixed so the largest-magnitude entry of its left factor is positive (so
    every backend gives the same factors, not just the same product)."""
    root = xp.sqrt(s[:rank])
    left = left_basis[:, :rank] * root[None, :]
    right = right_basis[:rank, :] * root[:, None]
    if rank == 0:
        return LowRank(left, right, s)
    hi, lo = xp.max(left, axis=0), xp.min(left, axis=0)
    one = xp.ones_like(hi)
    sign = xp.where(hi >= -lo, one, -one)
    return LowRank(left * sign[None, :], right * sign[:, None], s)


def recompress(xp, left: Array, right: Array, rank: int) -> LowRank:
    """The best rank-`rank` approximation of `left @ right` without forming it: thin QR of
    both stacked factors, SVD of the small core r_left @ r_right^T, truncation. In float64
    where the backend has it (numpy's linear algebra widens float32 so): stacked factors that
    cancel lose digits to float32 QR in proportion to their conditioning."""
    if rank < 1:
        raise InvalidInput(f"rank must be at least 1, got {rank}")
    wide = _float64(xp, left)
    if wide is not None and left.dtype != wide:
        low = recompress(xp, xp.astype(left, wide), xp.astype(right, wide), rank)
        return LowRank(
            *(xp.astype(a, left.dtype) for a in (low.left, low.right, low.singular_values))
        )
    q_left, r_left = xp.linalg.qr(left)
    q_right, r_right = xp.linalg.qr(xp.matrix_transpose(right))
    u, s, vt = thin_svd(xp, xp.matmul(r_left, xp.matrix_transpose(r_right)))
    rank = min(rank, int(s.shape[0]))
    return _split(xp, xp.matmul(q_left, u), s, xp.matmul(vt, xp.matrix_transpose(q_right)), rank)


def randomized_svd(
    xp,
    matmul: Callable[[Array], Array],
    rmatmul: Callable[[Array], Array],
    test_matrix: Array,
    rank: int,
    *,
    power_iters: int = 1,
) -> LowRank:
    """A rank-`rank` approximation of a matrix M seen only through `matmul(x) = M @ x` and
    `rmatmul(y) = M^T @ y`: range of M @ test_matrix (n x l, l >= rank, l <= min(m, n)),
    refined by `power_iters` power iterations with re-orthonormalisation after every product,
    then B = Q^T M factored through a square core (B^T = q2 r2, svd of r2^T)."""
    if power_iters < 0:
        raise InvalidInput(f"power iterations must be >= 0, got {power_iters}")
    q = orthonormal(xp, matmul(test_matrix))
    for _ in range(power_iters):
        z = orthonormal(xp, rmatmul(q))
        q = orthonormal(xp, matmul(z))
    q2, r2 = thin_qr(xp, rmatmul(q))
    u, s, vt = xp.linalg.svd(xp.matrix_transpose(r2))
    rank = min(rank, int(s.shape[0]))
    return _split(xp, xp.matmul(q, u), s, xp.matmul(vt, xp.matrix_transpose(q2)), rank)


def sketch_width(rank: int, oversample: int, shape: tuple[int, int]) -> int:
    """Columns of the randomized SVD's test matrix: rank + oversampling, at most min(m, n)."""
    return max(1, min(rank + oversample, shape[0], shape[1]))


def choose_rank(
    singular_values: list[float],
    total_energy: float,
    rule: str,
    rank: int,
    *,
    epsilon: float = 0.01,
    energy: float = 0.99,
) -> int:
    """The rank kept for one matrix, at most `rank`:

    - fixed: `rank` (or fewer when the matrix is smaller);
    - epsilon: the singular values at least `epsilon` times the largest;
    - energy: the fewest leading components whose squared singular values reach `energy` of
      the squared Frobenius norm `total_energy` (all `rank` when they never do).

    At least one component is kept.
    """
    s = list(singular_values)[:rank]
    if not s:
        return 0
    if rule == "fixed":
        return len(s)
    if rule == "epsilon":
        cut = epsilon * s[0]
        return max(1, sum(1 for v in s if v >= cut and v > 0))
    if rule == "energy":
        goal = energy * total_energy
        running = 0.0
        for k, v in enumerate(s, 1):
            running += v * v
            if running >= goal:
                return k
        return len(s)
    raise InvalidInput(f"rank rule must be one of {', '.join(RANK_RULES)}, got {rule!r}")


def energy_kept(singular_values: list[float], k: int, total_energy: float) -> float:
    """Share of the squared Frobenius norm the leading k components hold (1.0 for a zero
    matrix)."""
    if total_energy <= 0:
        return 1.0
    kept = math.fsum(v * v for v in list(singular_values)[:k])
    return min(1.0, kept / total_energy)
