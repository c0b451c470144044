"""Top-k search of an inverted file: the compiled binary search, the dense path, their threads.

:meth:`retrieval.index.inverted_file.InvertedFile.search` calls :func:`search_index`. Binary,
non-regional indexes score only the items a query touches (a compiled pass,
:func:`retrieval.index._kernels.search_binary`) and rank them by a bounded heap (top-k) or a
radix sort (the full ranking) merged with the untouched items, which all score 0 (or -1 without
words): the ranking of :func:`top_k` on the full score matrix, id for id, without filling or
sorting it. Batches of queries run in chunks on a pool of threads (the compiled loops release
the GIL); every query is computed alone, so results do not depend on the thread count. Float
and regional indexes and ``backend="numpy"`` take the dense path
(:meth:`~retrieval.index.inverted_file.InvertedFile.scores` then :func:`top_k`) on the same
pool. Also here: the selectivity look-up tables and the packed-bit lanes of binary scoring.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from retrieval.index.aggregation import AggregatedBatch, selectivity

if TYPE_CHECKING:
    from retrieval.index.inverted_file import InvertedFile

__all__ = ["binary_lanes", "default_num_threads", "search_index", "selectivity_tables", "top_k"]

# Per-thread scratch of the compiled search (see _search_scratch).
_SCRATCH = threading.local()


def top_k(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Best ``k`` image ids per row, by decreasing score, ties broken by ascending image id.

    Args:
        scores: float (n_queries, n_images).
        k: how many to keep (``None`` or >= n_images: the full ranking).

    Returns:
        int64 (n_queries, k).
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n_queries, n_images), got shape {s.shape}")
    nq, n = s.shape
    if k is None or k >= n:
        if s.dtype != np.float64 or np.isnan(s).any():
            # A stable sort of -s keeps tied images in ascending id order (lexsort by (-s, id)).
            return np.argsort(-s, axis=-1, kind="stable").astype(np.int64)
        from retrieval.index._ranking import rank_descending

        # The same order by a stable radix sort of the float bits (5x faster at 5k images);
        # adding 0.0 turns -0.0 into 0.0, which the comparison sort treats as equal.
        full = np.empty((nq, n), np.int64)
        rank_descending(np.ascontiguousarray(s + 0.0).view(np.uint64), full)
        return full
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.empty((nq, k), np.int64)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(s, part, axis=1).min(axis=1)
    for q in range(nq):  # per query (not per image): candidates include every tie at the k-th
        cand = np.flatnonzero(s[q] >= kth[q])
        order = np.lexsort((cand, -s[q, cand]))[:k]
        out[q] = cand[order]
    return out


def default_num_threads() -> int:
    """The cores this process may run on (the default thread count of searches)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _search_scratch(n: int, longest: int) -> tuple[np.ndarray, ...]:
    """This thread's scratch of :func:`retrieval.index._kernels.search_binary` for ``n`` items:
    the zeroed score row and touched flags, the touched list (n + 1), the radix-sort buffers,
    and the decoded ids of one posting list (``longest`` postings).

    The compiled search leaves the row and the flags zero again after every query, so they are
    kept from call to call (no fresh pages) and re-made only when ``n`` changes.
    """
    buf: tuple[np.ndarray, ...] | None = getattr(_SCRATCH, "search", None)
    if buf is None or buf[0].shape[0] != n:
        buf = (
            np.zeros(n, np.float64),
            np.zeros(n, np.uint8),
            np.zeros(n + 1, np.int64),
            np.empty((2, n), np.uint64),
            np.empty((2, n), np.int64),
            np.empty(longest, np.int64),
        )
    elif buf[5].shape[0] < longest:
        buf = (*buf[:5], np.empty(longest, np.int64))
    _SCRATCH.search = buf
    return buf


@functools.lru_cache(maxsize=16)
def selectivity_tables(dim: int, alpha: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The selectivity of every Hamming distance of binary words, as look-up tables.

    Args:
        dim: the true descriptor dimension D (not the padded bit count ``8 ceil(D/8)``: the
            zero padding bits never differ, so ``h <= D``).

    Returns:
        ``table``: float64 (D + 1,), ``table[h] = selectivity(1 - 2 h / D)`` computed with the
        very expressions of :func:`retrieval.index.aggregation.pair_similarity` and ``selectivity``,
        element by element, so a look-up gives the numbers the direct computation gives, bit
        for bit. ``pair_table``: float64 (65536,), indexed by the two uint8 popcounts of a row
        of two lanes read as one uint16: ``table[low byte + high byte]`` (native byte order;
        sums above D never occur and are clamped).
    """
    h = np.arange(dim + 1, dtype=np.int64)
    u = 1.0 - 2.0 * h.astype(np.float64) / dim  # as pair_similarity computes it
    table = selectivity(u, alpha, tau)
    two = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2).astype(np.intp)
    pair_table = table[np.minimum(two[:, 0] + two[:, 1], dim)]
    table.flags.writeable = False
    pair_table.flags.writeable = False
    return table, pair_table


def binary_lanes(ivf: InvertedFile, q: AggregatedBatch) -> tuple[np.ndarray | None, np.ndarray]:
    """Binary index: the packed bits of index and queries viewed as the widest unsigned
    lanes (8 to 64 bits) that divide a row (no copy). Float index: ``(None, empty)``."""
    if not ivf.binary:
        return None, np.zeros(0)
    nbytes = int(ivf.data.shape[1])
    width = next(w for w in (8, 4, 2, 1) if nbytes % w == 0)
    dt = np.dtype(f"u{width}")
    data = np.ascontiguousarray(ivf.data)  # a plain view of a memmap (slices are faster)
    qdata = np.ascontiguousarray(q.data, dtype=np.uint8)
    lanes = data.reshape(data.shape[0], nbytes).view(dt)
    qlanes = qdata.reshape(qdata.shape[0], nbytes).view(dt)
    return lanes, qlanes


def search_index(
    ivf: InvertedFile,
    q: AggregatedBatch,
    k: int | None,
    *,
    batch_size: int,
    backend: str,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` images of every query of ``q`` (checked by ``InvertedFile.search``).

    Returns:
        ``(ids, scores)``: int64 (n_queries, k) and float64 (n_queries, k).
    """
    nq, n = q.n_images, ivf.n_images
    kk = n if k is None else min(k, n)
    ids = np.zeros((nq, kk), np.int64)
    scs = np.zeros((nq, kk), np.float64)
    if nq == 0 or kk == 0:
        return ids, scs
    chunk = max(1, min(batch_size, -(-nq // threads)))
    fast = ivf.binary and ivf.item_image is None and backend == "numba"
    if fast:
        from retrieval.index._kernels import search_binary

        lanes_or_none, qlanes = binary_lanes(ivf, q)
        lanes = qlanes if lanes_or_none is None else lanes_or_none  # binary: never None
        table, _ = selectivity_tables(ivf.dim, ivf.alpha, ivf.tau)
        offsets = np.asarray(ivf.offsets, np.int64)
        id_offsets = np.asarray(ivf.id_offsets, np.int64)
        id_stream = np.asarray(ivf.id_stream)
        item_words = np.asarray(ivf.words_per_image).astype(np.float64)
        q_offsets = np.asarray(q.offsets, np.int64)
        q_words = np.asarray(q.words)
        longest = int(np.diff(offsets).max()) if offsets.shape[0] > 1 else 0

    def run(a: int) -> None:
        b = min(nq, a + chunk)
        if fast:
            search_binary(
                offsets,
                id_offsets,
                id_stream,
                lanes,
                q_offsets[a : b + 1],
                q_words,
                qlanes,
                table,
                item_words,
                ivf.normalize,
                ids[a:b],
                scs[a:b],
                *_search_scratch(n, longest),
            )
            return
        sub = AggregatedBatch(
            offsets=q.offsets[a : b + 1] - q.offsets[a],
            words=q.words[q.offsets[a] : q.offsets[b]],
            data=q.data[q.offsets[a] : q.offsets[b]],
            dim=q.dim,
        )
        s = ivf.scores(sub, backend=backend)
        top = top_k(s, kk)
        ids[a:b] = top
        scs[a:b] = np.take_along_axis(s, top, axis=1)

    starts = list(range(0, nq, chunk))
    if threads == 1 or len(starts) == 1:
        for a in starts:
            run(a)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            list(pool.map(run, starts))
    return ids, scs
