"""Descriptor matching for spatial verification: 1-NN under an L2 threshold, ratio, mutual.

A row of ``d1`` matches its nearest row of ``d2`` when the L2 distance is below
``max_distance``, it passes Lowe's ratio test (``d1st < ratio * d2nd``; a single candidate
always passes) and, with ``mutual``, it is also the nearest row of ``d1`` for that row of
``d2``. The thresholds apply to exact float64 distances of the chosen neighbours.

Three implementations of the same rules:

* ``backend="numba"`` (default): one faiss ``pairwise_L2sqr`` (an SGEMM) per pair gives the
  (M, N) squared distances, and compiled loops (:mod:`retrieval.verification._kernels`) find
  the two nearest neighbours and check mutuality on that one matrix. A :class:`QueryMatcher`
  keeps one query's descriptors and one distance buffer for all its candidates;
* ``backend="numpy"``: ``faiss.knn`` (k = 2 for the ratio test) and, for ``mutual``, a second
  ``faiss.knn`` the other way (two matrix products), the rules in numpy;
* :func:`match_descriptors_naive`: scipy k-d trees (the authors' way), for tests.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from retrieval.verification.conf import check_backend

__all__ = ["QueryMatcher", "match_descriptors", "match_descriptors_naive"]


def _check_descriptors(d1: npt.ArrayLike, d2: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.ascontiguousarray(d1, dtype=np.float32)
    b = np.ascontiguousarray(d2, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"match_descriptors: expected (N, D) and (M, D), got {a.shape} and {b.shape}"
        )
    return a, b


def _select(
    i: np.ndarray,
    nn: np.ndarray,
    dist: np.ndarray,
    back: np.ndarray | None,
    *,
    max_distance: float | None,
    ratio: float | None,
) -> np.ndarray:
    """The rule of the numpy and naive matchers: ``dist`` (N, 2) L2 distances to the first and
    second neighbour (inf when absent), ``nn`` (N,) the first neighbour, ``back`` (M,) the
    nearest row of image 1 for every row of image 2 (mutual check) or None."""
    ok = np.isfinite(dist[:, 0])
    if max_distance is not None:
        ok &= dist[:, 0] < max_distance
    if ratio is not None:
        ok &= dist[:, 0] < ratio * dist[:, 1]
    if back is not None:
        ok &= back[np.where(ok, nn, 0)] == i
    k = np.nonzero(ok)[0]
    return np.stack([k, nn[k]], axis=1).astype(np.int64)


class QueryMatcher:
    """Compiled matching of one query against many images (the ``numba`` backend).

    Holds the query's descriptors (N, D) as contiguous float32 and one distance buffer, reused
    by every :meth:`match` (per candidate: one SGEMM into the buffer, no fresh allocation). Not
    thread-safe: one matcher per thread.

    Args:
        descriptors: (N, D) query descriptors.
        max_distance, ratio, mutual: the matching rules (see :func:`match_descriptors`).
        buffer: a float32 1-D array to reuse as the distance buffer (grown when too small; the
            one in use is :attr:`buffer`), e.g. one per thread across queries.
    """

    def __init__(
        self,
        descriptors: npt.ArrayLike,
        *,
        max_distance: float | None = 0.9,
        ratio: float | None = None,
        mutual: bool = False,
        buffer: np.ndarray | None = None,
    ) -> None:
        a = np.ascontiguousarray(descriptors, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"QueryMatcher: descriptors must be (N, D), got {a.shape}")
        self.descriptors = a
        self.max_distance = np.inf if max_distance is None else float(max_distance)
        self.ratio = 0.0 if ratio is None else float(ratio)
        self.mutual = bool(mutual)
        ok = buffer is not None and buffer.dtype == np.float32 and buffer.ndim == 1
        self.buffer = buffer if ok and buffer is not None else np.empty(0, np.float32)

    def match(self, d2: npt.ArrayLike) -> np.ndarray:
        """Matches (K, 2) int64 ``(i, j)`` of the query's rows ``i`` to rows ``j`` of ``d2``
        (M, D), sorted by ``i``."""
        import faiss

        from retrieval.verification import _kernels

        a, b = _check_descriptors(self.descriptors, d2)
        n, m = a.shape[0], b.shape[0]
        if n == 0 or m == 0:
            return np.zeros((0, 2), np.int64)
        if self.buffer.size < n * m:
            self.buffer = np.empty(n * m, np.float32)
        dist_t = self.buffer[: n * m].reshape(m, n)
        faiss.pairwise_L2sqr(
            a.shape[1], m, faiss.swig_ptr(b), n, faiss.swig_ptr(a), faiss.swig_ptr(dist_t)
        )
        nn1, nn2 = _kernels.nearest_two(dist_t, self.ratio > 0)
        out: np.ndarray = _kernels.select_matches(
            a, b, nn1, nn2, dist_t, self.max_distance, self.ratio, self.mutual
        )
        return out


def match_descriptors(
    d1: npt.ArrayLike,
    d2: npt.ArrayLike,
    *,
    max_distance: float | None = 0.9,
    ratio: float | None = None,
    mutual: bool = False,
    backend: str = "numba",
) -> np.ndarray:
    """Nearest-neighbour matches from ``d1`` to ``d2`` (exact search).

    A row of ``d1`` matches its nearest row of ``d2`` when the L2 distance is below
    ``max_distance``, it passes Lowe's ratio test (``d1st < ratio * d2nd``; a single
    candidate always passes) and, with ``mutual``, it is also the nearest row of ``d1`` for that
    row of ``d2``. Without ``mutual`` several rows may match the same row of ``d2`` (as the
    authors' k-d tree query).

    Args:
        d1: (N, D) descriptors of image 1 (the query).
        d2: (M, D) descriptors of image 2.
        max_distance: absolute L2 threshold on the nearest neighbour (None: off).
        ratio: ratio-test threshold in (0, 1] (None: off).
        mutual: keep mutual nearest neighbours only.
        backend: ``"numba"`` (one SGEMM, compiled rules) or ``"numpy"`` (``faiss.knn``).

    Returns:
        (K, 2) int64 ``(i, j)`` pairs, sorted by ``i``.
    """
    check_backend(backend)
    a, b = _check_descriptors(d1, d2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    if backend == "numba":
        return QueryMatcher(a, max_distance=max_distance, ratio=ratio, mutual=mutual).match(b)
    return _match_faiss_knn(a, b, max_distance=max_distance, ratio=ratio, mutual=mutual)


def _match_faiss_knn(
    a: np.ndarray, b: np.ndarray, *, max_distance: float | None, ratio: float | None, mutual: bool
) -> np.ndarray:
    """The numpy backend: ``faiss.knn`` both ways, exact distances of the chosen neighbours."""
    import faiss

    k = 2 if ratio is not None and b.shape[0] > 1 else 1
    _, nn = faiss.knn(a, b, k)
    nn = nn.astype(np.int64)
    # Exact distances of the chosen neighbours (float64), so the thresholds are not subject to
    # the float32 expansion error of the search.
    a64 = a.astype(np.float64)
    dist = np.full((a.shape[0], 2), np.inf)
    for c in range(k):
        dist[:, c] = np.sqrt(((a64 - b[nn[:, c]].astype(np.float64)) ** 2).sum(axis=1))
    if k == 2:  # faiss orders by its float32 distances: reorder by the exact ones
        swap = dist[:, 1] < dist[:, 0]
        dist[swap] = dist[swap][:, ::-1]
        nn[swap] = nn[swap][:, ::-1]
    back = faiss.knn(b, a, 1)[1][:, 0].astype(np.int64) if mutual else None
    i = np.arange(a.shape[0], dtype=np.int64)
    return _select(i, nn[:, 0], dist, back, max_distance=max_distance, ratio=ratio)


def match_descriptors_naive(
    d1: npt.ArrayLike,
    d2: npt.ArrayLike,
    *,
    max_distance: float | None = 0.9,
    ratio: float | None = None,
    mutual: bool = False,
) -> np.ndarray:
    """Reference matching with scipy k-d trees (the authors' way); same rules and output."""
    from scipy.spatial import cKDTree

    a, b = _check_descriptors(d1, d2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dist, j = cKDTree(b64).query(a64, k=2)
    dist = np.asarray(dist, np.float64).reshape(a.shape[0], 2)
    j = np.asarray(j, np.int64).reshape(a.shape[0], 2)
    back = np.asarray(cKDTree(a64).query(b64, k=1)[1], np.int64) if mutual else None
    i = np.arange(a.shape[0], dtype=np.int64)
    return _select(i, j[:, 0], dist, back, max_distance=max_distance, ratio=ratio)
