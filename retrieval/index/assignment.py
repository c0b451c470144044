"""Visual-word assignment: exact nearest centroids (blocked GEMM) or approximate (faiss HNSW).

* ``"exact"`` (the default everywhere): ``argmin_k ||x - c_k||^2`` by GEMM blocks
  (:func:`assign`); the result of the paper.
* ``"hnsw"``: a faiss HNSW graph over the K centroids (:class:`WordIndex`), searched with
  ``ef_search`` candidates. At K=65,536 it replaces the (N, K) GEMM by ~``ef_search`` log K
  distance evaluations per descriptor; a small share of descriptors then get a near (not the
  nearest) word. At K=1,024 the GEMM is cheaper than the graph walk: keep ``"exact"``.

The graph is built once per codebook, single-threaded (so the same codebook always gives the
same graph, whatever the machine's thread count), and cached beside ``codebook.npy`` by
:func:`retrieval.features.codebook.load_word_index` (``faiss.write_index`` + a tagged JSON
header); :func:`word_index` builds it in memory (memoised per codebook content) when only the
array is at hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = [
    "ASSIGNMENTS",
    "HNSW_DEFAULTS",
    "WordIndex",
    "assign",
    "check_codebook",
    "codebook_fingerprint",
    "n_threads",
    "nearest_word",
    "resolve_assignment",
    "word_index",
]

logger = logging.getLogger("retrieval.index.assignment")

#: The assignment methods (the ``assignment=`` keyword of aggregation).
ASSIGNMENTS: tuple[str, ...] = ("exact", "hnsw")

#: HNSW parameters: graph degree ``m``, build beam ``ef_construction``, search beam
#: ``ef_search``. Measured by ``benchmarks/assignment.py`` at K=65,536 on held-out RootSIFT
#: (mini_rparis6k): ``ef_search`` 16 / 32 / 64 give the exact word to 96.3 / 99.0 / 99.8% of
#: descriptors at 4.8 / 2.7 / 1.4x the exact GEMM's speed (1 thread, CPU time); the graph
#: takes ~15 CPU-s to build. At K=1,024, 97.9% exact words (``ef_search=8``) left the real
#: set's mAP unchanged (within +-0.5), 92% cost ~2 points.
HNSW_DEFAULTS: dict[str, int] = {"m": 32, "ef_construction": 128, "ef_search": 32}


def check_codebook(codebook: np.ndarray) -> np.ndarray:
    """The codebook as contiguous float32 (K, D); ValueError unless it is 2-D and non-empty."""
    cb = np.asarray(codebook)
    if cb.ndim != 2 or cb.shape[0] < 1 or cb.shape[1] < 1:
        raise ValueError(f"codebook must be (K, D) with K >= 1 and D >= 1, got shape {cb.shape}")
    return np.ascontiguousarray(cb, dtype=np.float32)


def codebook_fingerprint(codebook: np.ndarray) -> str:
    """SHA-1 of the float32 (K, D) codebook's shape and bytes (ties a cached graph to it)."""
    cb = check_codebook(codebook)
    h = hashlib.sha1(f"{cb.shape[0]}x{cb.shape[1]}:".encode())
    h.update(cb.data)
    return h.hexdigest()


class WordIndex:
    """Approximate nearest visual words: a faiss HNSW graph over a codebook's centroids.

    Args:
        index: a faiss ``IndexHNSWFlat`` holding the K centroids (ids = word ids).
        fingerprint: :func:`codebook_fingerprint` of the codebook it was built on.
        m, ef_construction: the graph's parameters (recorded).
        ef_search: candidates kept while searching (more: slower, closer to exact).

    Use :meth:`build` (or :func:`retrieval.features.codebook.load_word_index`, which caches it
    on disk) rather than the constructor.
    """

    method = "hnsw"

    def __init__(
        self, index: Any, *, fingerprint: str, m: int, ef_construction: int, ef_search: int
    ) -> None:
        if int(index.ntotal) < 1:
            raise ValueError("WordIndex: the faiss index holds no centroids")
        if not 1 <= int(ef_search) <= 4096:
            raise ValueError(f"WordIndex: ef_search must be in [1, 4096], got {ef_search!r}")
        self.index = index
        self.fingerprint = str(fingerprint)
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)

    @property
    def codebook_size(self) -> int:
        """K, the number of visual words."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """D, the descriptor dimension."""
        return int(self.index.d)

    def __repr__(self) -> str:
        return (
            f"WordIndex(hnsw, K={self.codebook_size}, D={self.dim}, m={self.m}, "
            f"ef_construction={self.ef_construction}, ef_search={self.ef_search})"
        )

    @classmethod
    def build(
        cls,
        codebook: np.ndarray,
        *,
        m: int = HNSW_DEFAULTS["m"],
        ef_construction: int = HNSW_DEFAULTS["ef_construction"],
        ef_search: int = HNSW_DEFAULTS["ef_search"],
    ) -> WordIndex:
        """Build the HNSW graph over float32 (K, D) centroids, single-threaded (deterministic)."""
        import faiss

        cb = check_codebook(codebook)
        if not 2 <= int(m) <= 256 or int(ef_construction) < 1:
            raise ValueError(
                f"HNSW needs 2 <= m <= 256 and ef_construction >= 1, got {m}, {ef_construction}"
            )
        index = faiss.IndexHNSWFlat(cb.shape[1], int(m))
        index.hnsw.efConstruction = int(ef_construction)
        # faiss inserts in parallel batches whose outcome depends on the thread schedule; one
        # thread gives the same graph on every machine (the cached file makes this a one-off).
        with _omp_threads(1):
            index.add(cb)
        return cls(
            index,
            fingerprint=codebook_fingerprint(cb),
            m=m,
            ef_construction=ef_construction,
            ef_search=ef_search,
        )

    def search(self, descriptors: np.ndarray, num_assignments: int = 1) -> np.ndarray:
        """The (approximately) nearest words of float32 (N, D) descriptors.

        Returns:
            int64 (N, num_assignments) word ids, nearest found first. A descriptor for which
            the graph walk finds fewer than ``num_assignments`` words (possible only when
            ``ef_search < num_assignments``) gets its exact words.
        """
        import faiss

        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors must be (N, {self.dim}), got shape {x.shape}")
        if not 1 <= num_assignments <= self.codebook_size:
            raise ValueError(
                f"num_assignments must be in [1, {self.codebook_size}], got {num_assignments}"
            )
        if x.shape[0] == 0:
            return np.zeros((0, num_assignments), np.int64)
        ef = max(self.ef_search, num_assignments)
        params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
        _, ids = self.index.search(x, num_assignments, params=params)
        ids = ids.astype(np.int64, copy=False)
        bad = np.flatnonzero((ids < 0).any(axis=1))
        if bad.size:  # pragma: no cover - faiss fills k <= efSearch results
            cb = self.index.reconstruct_n(0, self.codebook_size)
            ids[bad] = assign(x[bad], cb, num_assignments)
        return ids


def n_threads(threads: int | None) -> int:
    """A thread count: ``threads``, or every core this process may use (``None``)."""
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    return int(threads)


class _omp_threads:
    """Set faiss's OpenMP thread count for the calling thread within a ``with`` block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.saved = 0

    def __enter__(self) -> None:
        import faiss

        self.saved = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import faiss

        faiss.omp_set_num_threads(self.saved)


_MEMO: OrderedDict[tuple[str, int, int, int], WordIndex] = OrderedDict()
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 4


def word_index(codebook: np.ndarray, **params: int) -> WordIndex:
    """The HNSW :class:`WordIndex` of a codebook array, built once per process and codebook.

    Args:
        codebook: float32 (K, D).
        params: ``m``, ``ef_construction``, ``ef_search`` (default :data:`HNSW_DEFAULTS`).

    Prefer :func:`retrieval.features.codebook.load_word_index` when the codebook is a file: it
    caches the graph beside ``codebook.npy`` across processes.
    """
    unknown = set(params) - set(HNSW_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown HNSW parameters {sorted(unknown)}; expected {HNSW_DEFAULTS}")
    p = {**HNSW_DEFAULTS, **params}
    key = (codebook_fingerprint(codebook), p["m"], p["ef_construction"], p["ef_search"])
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    built = WordIndex.build(codebook, **p)
    with _MEMO_LOCK:
        _MEMO[key] = built
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return built


def assign(
    descriptors: np.ndarray,
    codebook: np.ndarray,
    num_assignments: int = 1,
    *,
    assignment: str | WordIndex = "exact",
) -> np.ndarray:
    """Nearest visual words: exact L2 (brute force, BLAS-blocked; faiss for several words) or
    approximate (``assignment="hnsw"`` or a :class:`WordIndex` of this codebook).

    Args:
        descriptors: float32 (N, D).
        codebook: float32 (K, D).
        num_assignments: words per descriptor (1 = hard assignment).
        assignment: one of :data:`ASSIGNMENTS`, or a :class:`WordIndex` built on ``codebook``.

    Returns:
        int64 (N, num_assignments) word ids, nearest first.
    """
    import faiss

    cb = check_codebook(codebook)
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != cb.shape[1]:
        raise ValueError(f"descriptors must be (N, {cb.shape[1]}), got shape {x.shape}")
    if not 1 <= num_assignments <= cb.shape[0]:
        raise ValueError(f"num_assignments must be in [1, {cb.shape[0]}], got {num_assignments}")
    approx = resolve_assignment(assignment, cb)
    if x.shape[0] == 0:
        return np.zeros((0, num_assignments), np.int64)
    if approx is not None:
        return approx.search(x, num_assignments)
    if num_assignments > 1:
        _, ids = faiss.knn(x, cb, num_assignments)
        return ids.astype(np.int64, copy=False)
    return nearest_word(x, cb)[:, None]


def resolve_assignment(assignment: str | WordIndex, codebook: np.ndarray) -> WordIndex | None:
    """``None`` for exact assignment, else the :class:`WordIndex` to search (checked against
    the codebook's shape; a string ``"hnsw"`` builds or reuses the in-process one)."""
    if isinstance(assignment, WordIndex):
        k, d = codebook.shape
        if (assignment.codebook_size, assignment.dim) != (k, d):
            raise ValueError(
                f"assignment: the WordIndex holds K={assignment.codebook_size}, "
                f"D={assignment.dim} words, the codebook is ({k}, {d})"
            )
        return assignment
    if assignment == "exact":
        return None
    if assignment == "hnsw":
        return word_index(codebook)
    raise ValueError(
        f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS} or a WordIndex"
    )


def nearest_word(x: np.ndarray, cb: np.ndarray, block: int = 2048) -> np.ndarray:
    """argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), by GEMM blocks of 2048 x 2048.

    The GEMM computes ``[x, 1] . [-2 c, ||c||^2]`` (D + 1 columns: the norms ride along for
    0.8% more work instead of a pass over the block), then ``argmin`` per row and, across blocks
    of codewords, a running minimum (the first minimum wins ties). The distance matrix is never
    materialised, so memory stays at ~16 MB whatever N and K; blocks of 2048 give the same
    words as 4096 and run faster (the argmin reads a 16 MB block, not 64 MB: the exact
    assignment row of ``benchmarks/asmk_peer.py``, 5k images, K=4,096, went from 15.4 s to
    12.1 s, against 12.9 s for faiss ``IndexFlatL2``).

    Args:
        x: (N, D) float32 descriptors.
        cb: (K, D) float32 codebook.
        block: rows of ``x`` and codewords per GEMM block.

    Returns:
        (N,) int64 index of each descriptor's nearest codeword.
    """
    n, (k, dim) = x.shape[0], cb.shape
    aug = np.empty((k, dim + 1), np.float32)  # [-2 c, ||c||^2], row by row (no transpose)
    np.multiply(cb, -2.0, out=aug[:, :dim])
    aug[:, dim] = np.einsum("ij,ij->i", cb, cb)
    out = np.empty(n, np.int64)
    rows = min(block, n)
    xa = np.empty((rows, dim + 1), np.float32)
    xa[:, dim] = 1.0
    buf = np.empty((rows, min(block, k)), np.float32)
    for r in range(0, n, block):
        m = min(block, n - r)
        xa[:m, :dim] = x[r : r + m]
        best = np.full(m, np.inf, np.float32)
        arg = np.zeros(m, np.int64)
        for c in range(0, k, block):
            cs = slice(c, min(k, c + block))
            d = buf[:m, : cs.stop - c]
            np.matmul(xa[:m], aug[cs].T, out=d)
            j = d.argmin(axis=1)
            if c == 0 and cs.stop == k:  # one block of codewords: no running minimum
                out[r : r + m] = j
                break
            v = d[np.arange(m), j]
            better = v < best
            best[better] = v[better]
            arg[better] = j[better] + c
        else:
            out[r : r + m] = arg
    return out
