"""Verification of image pairs: match descriptors, fit the affine RANSAC, count inliers.

:func:`verify_pair` handles one pair; :func:`verify_query` one query against many database
images, batched (one :class:`~retrieval.verification.matching.QueryMatcher` and one distance
buffer for all of them); :func:`verify_many` spreads the pairs of many queries over a thread
pool, a task being a run of one query's candidates (faiss, numba and numpy release the GIL).
The RANSAC threshold of a pair is ``conf.threshold`` times the database image's ``scale``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from retrieval.verification.conf import (
    LocalFeatures,
    PairResult,
    VerificationConf,
    as_conf,
    check_backend,
)
from retrieval.verification.matching import (
    QueryMatcher,
    match_descriptors,
    match_descriptors_naive,
)
from retrieval.verification.ransac import estimate_affine_ransac, estimate_affine_ransac_naive

__all__ = ["verify_many", "verify_pair", "verify_pair_naive", "verify_query"]


def verify_pair(
    f1: LocalFeatures,
    f2: LocalFeatures,
    conf: VerificationConf | None = None,
    *,
    backend: str = "numba",
    **overrides: Any,
) -> PairResult:
    """Match two images' descriptors and fit an affine RANSAC on the matches.

    Args:
        f1, f2: features with ``keypoints`` (N, 2) / (M, 2) and ``descriptors`` (N, D) / (M, D).
        conf: settings (defaults: the paper's); keyword overrides, e.g. ``threshold=5.0``.
        backend: ``"numba"`` or ``"numpy"`` (same results).

    Returns:
        :class:`PairResult`: matches (K, 2) and the affine fit mapping image 1 to image 2.
    """
    check_backend(backend)
    c = as_conf(conf, overrides)

    def match(d1: Any, d2: Any, **kw: Any) -> np.ndarray:
        return match_descriptors(d1, d2, backend=backend, **kw)

    def ransac(p1: Any, p2: Any, **kw: Any) -> Any:
        return estimate_affine_ransac(p1, p2, backend=backend, **kw)

    return _verify(f1, f2, c, match, ransac)


def verify_pair_naive(
    f1: LocalFeatures, f2: LocalFeatures, conf: VerificationConf | None = None, **overrides: Any
) -> PairResult:
    """:func:`verify_pair` with the reference k-d tree matching and plain-loop RANSAC."""
    c = as_conf(conf, overrides)
    return _verify(f1, f2, c, match_descriptors_naive, estimate_affine_ransac_naive)


def _verify(
    f1: LocalFeatures,
    f2: LocalFeatures,
    c: VerificationConf,
    match: Callable[..., np.ndarray],
    ransac: Callable[..., Any],
) -> PairResult:
    """Match with ``match``, then fit with ``ransac`` (fast or reference implementations)."""
    m = match(
        f1.descriptors, f2.descriptors, max_distance=c.max_distance, ratio=c.ratio, mutual=c.mutual
    )
    return PairResult(m, _ransac(f1, f2, m, c, ransac))


def _ransac(
    f1: LocalFeatures,
    f2: LocalFeatures,
    m: np.ndarray,
    c: VerificationConf,
    ransac: Callable[..., Any],
) -> Any:
    kp1 = np.asarray(f1.keypoints, dtype=np.float64)
    kp2 = np.asarray(f2.keypoints, dtype=np.float64)
    return ransac(
        kp1[m[:, 0]],
        kp2[m[:, 1]],
        threshold=c.threshold * float(getattr(f2, "scale", 1.0)),
        trials=c.trials,
        seed=c.seed,
        min_matches=c.min_matches,
        max_scale=c.max_scale,
    )


def verify_query(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures],
    conf: VerificationConf | None = None,
    *,
    backend: str = "numba",
    buffer: np.ndarray | None = None,
) -> list[PairResult]:
    """Verify one query against many images, batched: one matcher (the query's contiguous
    descriptors and one distance buffer) serves every candidate (``numba``); ``numpy`` runs
    :func:`verify_pair` per candidate.

    Args:
        query: features of image 1 (N keypoints).
        candidates: features of the images to verify it against.
        conf: settings (defaults: the paper's).
        backend: ``"numba"`` or ``"numpy"`` (same results).
        buffer: float32 distance buffer to reuse (see
            :class:`~retrieval.verification.matching.QueryMatcher`).

    Returns:
        one :class:`PairResult` per candidate, in order.
    """
    check_backend(backend)
    c = conf or VerificationConf()
    if backend == "numpy":
        return [verify_pair(query, d, c, backend="numpy") for d in candidates]
    matcher = QueryMatcher(
        query.descriptors,
        max_distance=c.max_distance,
        ratio=c.ratio,
        mutual=c.mutual,
        buffer=buffer,
    )
    out = []
    for d in candidates:
        m = matcher.match(d.descriptors)
        out.append(PairResult(m, _ransac(query, d, m, c, estimate_affine_ransac)))
    return out


# Distance buffer of a pool thread, reused by every task it runs (freed with the pool).
_local = threading.local()


def _counts(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures],
    c: VerificationConf,
    backend: str,
    pooled: bool = False,
) -> list[int]:
    """Inlier counts, 0 below ``c.min_inliers`` (unverified); ``pooled``: in a pool thread,
    reusing its buffer."""
    buf = None
    if pooled and backend == "numba" and candidates:
        need = len(query.descriptors) * max(len(d.descriptors) for d in candidates)
        buf = getattr(_local, "buffer", None)
        if buf is None or buf.size < need:
            buf = _local.buffer = np.empty(need, np.float32)
    res = verify_query(query, candidates, c, backend=backend, buffer=buf)
    return [r.num_inliers if r.num_inliers >= c.min_inliers else 0 for r in res]


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _one_omp_thread() -> None:
    """Pool threads run faiss (and its BLAS) single-threaded: the pool already parallelises
    over pairs, and nested OpenMP threads spin and oversubscribe (measured 3x more CPU a search
    on 2 cores). OpenMP's thread count is per calling thread, so the caller's is unchanged."""
    import faiss

    faiss.omp_set_num_threads(1)


def verify_many(
    pairs: Sequence[tuple[LocalFeatures, LocalFeatures]],
    conf: VerificationConf,
    num_workers: int | None = None,
    *,
    backend: str = "numba",
) -> list[int]:
    """Inlier counts (0 when below ``conf.min_inliers``) of ``(query, database)`` pairs.

    Consecutive pairs with the same query object are verified as one batch
    (:func:`verify_query`); with ``num_workers`` > 1 the batches are cut into runs so every
    thread gets work, and run in a thread pool; every thread (the caller's too when
    ``num_workers`` is 1) holds faiss to one OpenMP thread. Counts do not depend on the thread
    count.

    Args:
        pairs: ``(query features, database features)``, grouped by query for batching.
        conf: settings.
        num_workers: threads (default: CPU count, at most 8).
        backend: ``"numba"`` or ``"numpy"``.

    Returns:
        (len(pairs),) inlier counts, in order.
    """
    check_backend(backend)
    workers = num_workers or _default_workers()
    runs: list[tuple[LocalFeatures, list[LocalFeatures]]] = []
    for q, d in pairs:
        if runs and runs[-1][0] is q:
            runs[-1][1].append(d)
        else:
            runs.append((q, [d]))
    if workers <= 1 or len(pairs) <= 1:
        import faiss

        # one thread means one: OpenMP threads inside each small SGEMM spin and, on a busy
        # machine, measured 4x slower than one (the caller's setting is restored)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return [n for q, ds in runs for n in _counts(q, ds, conf, backend)]
        finally:
            faiss.omp_set_num_threads(before)
    # cut the runs into ~8 tasks a thread: on a busy machine a thread that falls behind then
    # holds up a few pairs, not a quarter of the query (measured: 4 tasks a query left ours at
    # 1.0x the CPU time of the peer but 0.6x its wall time at 2 threads, load 13)
    size = max(1, -(-len(pairs) // (8 * workers)))
    tasks = [(q, ds[s : s + size]) for q, ds in runs for s in range(0, len(ds), size)]
    with ThreadPoolExecutor(max_workers=workers, initializer=_one_omp_thread) as pool:
        parts = list(pool.map(lambda t: _counts(t[0], t[1], conf, backend, True), tasks))
    return [n for p in parts for n in p]
