"""Seeded affine RANSAC on correspondences: 3-point samples, residual threshold in pixels.

The trial with most inliers (residual ``||A p1 + t - p2|| < threshold``; the first such trial
on ties) wins; the model is then refitted by least squares on its inliers and the refit kept
when it has at least as many inliers. Samples come from :func:`ransac_samples` (seeded, the
same for every pair with as many correspondences), so a result depends on its inputs and seed
only, never on order or threads.

One guard is added to the paper's RANSAC (``max_scale``, 10 by default): models that scale
areas by more than ``max_scale**2`` or less than its inverse are refused (1-NN matching is
many-to-one, and a model collapsing many points onto one counts those duplicates as inliers).

Three implementations of the same search over the same samples:

* ``backend="numba"`` (default): one compiled loop fits every sample in closed form and counts
  its inliers (vectorised) (:func:`retrieval.verification._kernels.ransac_best`);
* ``backend="numpy"``: all fits with ``np.linalg.solve`` at once, residuals per chunk of trials;
* :func:`estimate_affine_ransac_naive`: a plain loop over trials, one solve per trial (the
  reference of the tests).

They give the same inliers up to float rounding at the threshold (a residual within ~1e-12 px
of it; never seen in the tests).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

from retrieval.verification.conf import AffineResult, check_backend

__all__ = ["estimate_affine_ransac", "estimate_affine_ransac_naive", "ransac_samples"]

# (trial, match) residuals evaluated per chunk by the numpy backend: 16k float64 temporaries
# stay in the CPU cache, which measured 2-3x faster than one big (trials, K) pass.
_CHUNK_ELEMENTS = 1 << 14
# A 3-point sample whose |det [x y 1]| (twice the triangle area, px^2) is below this is skipped.
_MIN_DET = 1e-6


def ransac_samples(k: int, trials: int, seed: int) -> np.ndarray:
    """Seeded 3-point samples without repetition inside a sample.

    Args:
        k: number of correspondences (>= 3).
        trials: number of samples.

    Returns:
        (trials, 3) int64 indices in [0, k), three distinct indices per row.
    """
    if k < 3:
        raise ValueError(f"ransac_samples: need at least 3 correspondences, got {k}")
    rng = np.random.default_rng(seed)
    i0 = rng.integers(0, k, trials)
    i1 = rng.integers(0, k - 1, trials)
    i1 = i1 + (i1 >= i0)
    lo, hi = np.minimum(i0, i1), np.maximum(i0, i1)
    i2 = rng.integers(0, k - 2, trials)
    i2 = i2 + (i2 >= lo)
    i2 = i2 + (i2 >= hi)
    return np.stack([i0, i1, i2], axis=1).astype(np.int64)


@lru_cache(maxsize=512)
def _cached_samples(k: int, trials: int, seed: int) -> np.ndarray:
    """:func:`ransac_samples`, read-only and shared by every pair with ``k`` correspondences."""
    s = ransac_samples(k, trials, seed)
    s.flags.writeable = False
    return s


def _failed(k: int) -> AffineResult:
    return AffineResult(np.full((2, 3), np.nan), np.zeros(k, dtype=bool))


def _check_points(p1: npt.ArrayLike, p2: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.ascontiguousarray(p1, dtype=np.float64)
    b = np.ascontiguousarray(p2, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or b.shape != a.shape:
        raise ValueError(f"RANSAC: p1 and p2 must both be (K, 2), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("RANSAC: correspondences hold non-finite coordinates")
    return a, b


def _scale_ok(models: np.ndarray, max_scale: float | None) -> np.ndarray:
    """Whether the area scaling ``|det A|`` of (T, 3, 2) models is within max_scale**±2."""
    if max_scale is None:
        return np.ones(models.shape[:-2], dtype=bool)
    det = np.abs(models[..., 0, 0] * models[..., 1, 1] - models[..., 0, 1] * models[..., 1, 0])
    lim = float(max_scale) ** 2
    return (det >= 1.0 / lim) & (det <= lim)


def _fit_triplets(
    p1: np.ndarray, p2: np.ndarray, samples: np.ndarray, max_scale: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form affine fits of 3-point samples.

    Returns:
        models (T, 3, 2) with ``[x y 1] @ model = [x' y']`` and a (T,) bool validity mask
        (non-collinear sample in image 1, area scaling allowed by ``max_scale``).
    """
    x = np.concatenate([p1[samples], np.ones((*samples.shape, 1))], axis=2)  # (T, 3, 3)
    y = p2[samples]  # (T, 3, 2)
    det = np.linalg.det(x)
    valid = np.abs(det) > _MIN_DET
    x[~valid] = np.eye(3)
    models = np.linalg.solve(x, y)
    valid &= _scale_ok(models, max_scale)
    return models, valid


def _least_squares(p1: np.ndarray, p2: np.ndarray) -> np.ndarray | None:
    """Affine (3, 2) model fitting ``p1 -> p2`` in least squares, or None when degenerate."""
    x = np.concatenate([p1, np.ones((len(p1), 1))], axis=1)
    model, _, rank, _ = np.linalg.lstsq(x, p2, rcond=None)
    return model if rank == 3 else None


def _inliers(p1: np.ndarray, p2: np.ndarray, model: np.ndarray, threshold: float) -> np.ndarray:
    pred = p1 @ model[:2] + model[2]
    return ((pred - p2) ** 2).sum(axis=1) < threshold * threshold


def _finish(
    p1: np.ndarray, p2: np.ndarray, best: np.ndarray, threshold: float, max_scale: float | None
) -> AffineResult:
    """Refit on the best sample's inliers; keep the refit when valid and losing no inlier."""
    inl = _inliers(p1, p2, best, threshold)
    model = best
    refit = _least_squares(p1[inl], p2[inl]) if inl.sum() >= 3 else None
    if refit is not None and _scale_ok(refit, max_scale):
        inl2 = _inliers(p1, p2, refit, threshold)
        if inl2.sum() >= inl.sum():
            model, inl = refit, inl2
    return AffineResult(np.ascontiguousarray(model.T), inl)


def _solve_sample(p1: np.ndarray, p2: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The (3, 2) model of one sample, solved as the reference solves it."""
    return np.linalg.solve(np.column_stack([p1[idx], np.ones(3)]), p2[idx])


def estimate_affine_ransac(
    p1: npt.ArrayLike,
    p2: npt.ArrayLike,
    *,
    threshold: float = 10.0,
    trials: int = 1000,
    seed: int = 0,
    min_matches: int = 4,
    max_scale: float | None = 10.0,
    backend: str = "numba",
) -> AffineResult:
    """Affine RANSAC over all trials: 3-point samples, residual threshold in pixels.

    The trial with most inliers (residual ``||A p1 + t - p2|| < threshold``; the first such trial
    on ties) wins; the model is then refitted by least squares on its inliers and the refit kept
    when it has at least as many inliers. Same inputs and seed, same result.

    Args:
        p1: (K, 2) points in image 1.
        p2: (K, 2) corresponding points in image 2.
        threshold: inlier residual threshold in pixels.
        trials: number of 3-point samples.
        seed: seed of the samples (:func:`ransac_samples`).
        min_matches: below this many correspondences (and always below 3) no model is fitted.
        max_scale: reject models scaling areas by more than ``max_scale**2`` or less than its
            inverse; None accepts any non-degenerate sample.
        backend: ``"numba"`` (compiled loop) or ``"numpy"`` (vectorised over trials).

    Returns:
        :class:`AffineResult` with the (2, 3) matrix and the (K,) inlier mask.
    """
    check_backend(backend)
    a, b = _check_points(p1, p2)
    k = a.shape[0]
    if trials < 1:
        raise ValueError(f"RANSAC: trials must be >= 1, got {trials}")
    if k < max(min_matches, 3):
        return _failed(k)
    samples = _cached_samples(k, trials, seed)
    if backend == "numba":
        from retrieval.verification._kernels import ransac_best

        lim = np.inf if max_scale is None else float(max_scale) ** 2
        t, _ = ransac_best(a, b, samples, threshold * threshold, _MIN_DET, 1.0 / lim, lim)
        if t < 0:
            return _failed(k)
        return _finish(a, b, _solve_sample(a, b, samples[t]), threshold, max_scale)
    models, valid = _fit_triplets(a, b, samples, max_scale)
    thr2 = threshold * threshold
    counts = np.empty(trials, dtype=np.int64)
    x, y = a[None, :, 0], a[None, :, 1]  # (1, K)
    step = max(1, _CHUNK_ELEMENTS // k)
    for s in range(0, trials, step):
        m = models[s : s + step, :, :, None]  # (t, 3, 2, 1)
        dx = m[:, 0, 0] * x + m[:, 1, 0] * y + (m[:, 2, 0] - b[None, :, 0])  # (t, K)
        dy = m[:, 0, 1] * x + m[:, 1, 1] * y + (m[:, 2, 1] - b[None, :, 1])
        dx *= dx
        dy *= dy
        dx += dy
        counts[s : s + step] = np.count_nonzero(dx < thr2, axis=1)
    counts[~valid] = -1
    best = int(np.argmax(counts))
    if counts[best] < 0:
        return _failed(k)
    return _finish(a, b, models[best], threshold, max_scale)


def estimate_affine_ransac_naive(
    p1: npt.ArrayLike,
    p2: npt.ArrayLike,
    *,
    threshold: float = 10.0,
    trials: int = 1000,
    seed: int = 0,
    min_matches: int = 4,
    max_scale: float | None = 10.0,
) -> AffineResult:
    """Reference RANSAC: a plain loop over the same samples, one ``np.linalg.solve`` per trial.

    Gives the same result as :func:`estimate_affine_ransac` (up to float rounding at the
    threshold); it is the per-pair baseline of ``benchmarks/verification_speed.py``.
    """
    a, b = _check_points(p1, p2)
    k = a.shape[0]
    if k < max(min_matches, 3):
        return _failed(k)
    samples = ransac_samples(k, trials, seed)
    best_count, best_model = -1, None
    for t in range(trials):
        idx = samples[t]
        x = np.column_stack([a[idx], np.ones(3)])
        if abs(np.linalg.det(x)) <= _MIN_DET:
            continue
        model = np.linalg.solve(x, b[idx])
        if not _scale_ok(model, max_scale):
            continue
        count = int(_inliers(a, b, model, threshold).sum())
        if count > best_count:
            best_count, best_model = count, model
    if best_model is None:
        return _failed(k)
    return _finish(a, b, best_model, threshold, max_scale)
