"""Compiled (numba) ranking of scores: the order key of a float, a stable radix sort, the heap.

The full ranking of the Revisited protocol orders every item by decreasing score, ties by
ascending id: ``np.argsort(-s, kind="stable")``. Here that order comes without comparisons:

* :func:`order_key`: a float64's bits as an unsigned key whose ascending order is the
  descending order of the scores (``-0.0`` as ``0.0``; no NaN); :func:`key_bits` its inverse.
* :func:`sort_keys`: a stable LSD radix sort of such keys carrying their ids. Only the bits that
  differ between the keys matter: the highest differing bit ``hb`` is found, the keys are
  sorted on the 24 bits below it in two passes of 12 bits (4,096 counters, one histogram pass
  for both; 36 bits in three passes from 262,144 keys on), then the few runs still unordered
  below those bits (equal in the sorted bits) are put in order by the full key: insertion
  sort, or a stable merge sort on a run of over 32 (``benchmarks/ranking.py`` times it against
  numpy's stable argsort).
* :func:`rank_descending`: the full ranking of every row of a score matrix.
* :func:`better` and :func:`sift_down`: the bounded heap of the top-k.

:func:`retrieval.index._kernels.search_binary` ranks its candidates with these; the tests check
them against ``np.argsort(-s, kind="stable")``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "COUNTS_SHAPE",
    "better",
    "key_bits",
    "order_key",
    "rank_descending",
    "sift_down",
    "sort_keys",
]

_BITS = 12  # bits a pass
_MAIN_BITS = 24  # the main sort's bits below the highest differing bit (two passes) ...
_LARGE = 1 << 18  # ... and 36 (three passes) from this many keys on: short runs left
#: Shape of the counters :func:`sort_keys` takes (one row a pass).
COUNTS_SHAPE = (3, 1 << _BITS)


@njit(cache=True, nogil=True, inline="always")
def order_key(bits: Any) -> Any:  # pragma: no cover - compiled
    """The sort key of a float64 given as its uint64 bits: ascending keys are descending
    scores (``-0.0`` keyed as ``0.0``)."""
    top = np.uint64(1) << np.uint64(63)
    if bits == top:
        bits = np.uint64(0)
    a = ~bits if (bits & top) else (bits | top)  # ascending float order as unsigned order
    return ~a


@njit(cache=True, nogil=True, inline="always")
def key_bits(key: Any) -> Any:  # pragma: no cover - compiled
    """The float64 bits of a sort key of :func:`order_key` (its inverse; ``-0.0`` comes back
    as ``0.0``)."""
    top = np.uint64(1) << np.uint64(63)
    a = ~key
    return (a & ~top) if (a & top) else ~a


@njit(cache=True, nogil=True)
def _lsd(
    keys: np.ndarray,
    ids: np.ndarray,
    keys2: np.ndarray,
    ids2: np.ndarray,
    low: int,
    high: int,
    counts: Any,
) -> bool:  # pragma: no cover - compiled
    """Stable LSD radix sort of ``keys`` (carrying ``ids``) on bits ``[low, high)``, 12 a pass
    (at most 3 passes; a last pass also reads bits above ``high``, which the keys share).

    Returns:
        whether the result is in ``keys2``/``ids2`` (an odd number of passes moved it).
    """
    n = keys.shape[0]
    passes = (high - low + _BITS - 1) // _BITS
    ul = np.uint64(low)
    mask = np.uint64((1 << _BITS) - 1)
    counts[:passes, :] = 0
    for t in range(n):
        k = keys[t] >> ul
        for d in range(passes):
            counts[d, (k >> np.uint64(_BITS * d)) & mask] += 1
    swapped = False
    for d in range(passes):
        cnt = counts[d]
        if n == 0 or cnt.max() == n:  # one value of this digit: nothing moves
            continue
        total = 0
        for c in range(1 << _BITS):
            cc = cnt[c]
            cnt[c] = total
            total += cc
        sh = np.uint64(low + _BITS * d)
        for t in range(np.uint64(n)):
            kt = keys[t]
            c = (kt >> sh) & mask
            p = np.uint64(cnt[c])
            cnt[c] = p + np.uint64(1)
            keys2[p] = kt
            ids2[p] = ids[t]
        keys, keys2 = keys2, keys
        ids, ids2 = ids2, ids
        swapped = not swapped
    return swapped


@njit(cache=True, nogil=True)
def sort_keys(
    keys: np.ndarray, ids: np.ndarray, keys2: np.ndarray, ids2: np.ndarray, counts: np.ndarray
) -> bool:  # pragma: no cover - compiled
    """Stable ascending sort of ``keys`` carrying ``ids`` (see the module docstring).

    Args:
        keys, ids: uint64 and int64 (n,), sorted in place or moved to the other buffer.
        keys2, ids2: uint64 and int64 (n,), the other buffer (overwritten).
        counts: int64 :data:`COUNTS_SHAPE` scratch.

    Returns:
        whether the sorted keys and ids are in ``keys2``/``ids2`` (else in ``keys``/``ids``).
    """
    n = keys.shape[0]
    k_or = np.uint64(0)
    k_and = ~np.uint64(0)
    for t in range(n):
        k_or |= keys[t]
        k_and &= keys[t]
    diff = k_or ^ k_and  # the bits that differ somewhere; all keys agree above them
    hb = 0
    while hb < 64 and (diff >> np.uint64(hb)) != np.uint64(0):
        hb += 1
    low = max(0, hb - (_MAIN_BITS if n < _LARGE else _MAIN_BITS + _BITS))
    swapped = _lsd(keys, ids, keys2, ids2, low, hb, counts)
    if swapped:
        keys, keys2 = keys2, keys
        ids, ids2 = ids2, ids
    # Sorted on the bits from ``low`` up; order each run of equal bits there by the full key
    # where it is not yet (one scan; runs are short for real scores).
    ul = np.uint64(low)
    t = 1
    while t < n:
        if keys[t] >= keys[t - 1]:
            t += 1
            continue
        head = keys[t] >> ul
        r0 = t - 1
        while r0 > 0 and (keys[r0 - 1] >> ul) == head:
            r0 -= 1
        r1 = t + 1
        while r1 < n and (keys[r1] >> ul) == head:
            r1 += 1
        if r1 - r0 > 32:  # a stable merge sort of the run (no fixed cost per run)
            perm = np.argsort(keys[r0:r1], kind="mergesort")
            keys[r0:r1] = keys[r0:r1][perm]
            ids[r0:r1] = ids[r0:r1][perm]
        else:
            for x in range(r0 + 1, r1):  # stable: moves past strictly greater keys
                kx = keys[x]
                ix = ids[x]
                y = x - 1
                while y >= r0 and keys[y] > kx:
                    keys[y + 1] = keys[y]
                    ids[y + 1] = ids[y]
                    y -= 1
                keys[y + 1] = kx
                ids[y + 1] = ix
        t = r1
    return swapped


@njit(cache=True, nogil=True)
def rank_descending(bits: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Full ranking of every row by decreasing score, ties by ascending column
    (``np.argsort(-s, kind="stable")`` by :func:`sort_keys`).

    Args:
        bits: uint64 (n_rows, n) the float64 scores viewed as integers (no NaN).
        out: int64 (n_rows, n), the column order of each row (written).
    """
    n_rows, n = bits.shape
    keys = np.empty((2, n), np.uint64)
    idx = np.empty((2, n), np.int64)
    counts = np.empty(COUNTS_SHAPE, np.int64)
    for r in range(n_rows):
        for i in range(n):
            keys[0, i] = order_key(bits[r, i])
            idx[0, i] = i
        moved = sort_keys(keys[0], idx[0], keys[1], idx[1], counts)
        out[r] = idx[1] if moved else idx[0]


@njit(cache=True, nogil=True)
def better(s_a: float, i_a: int, s_b: float, i_b: int) -> bool:  # pragma: no cover - compiled
    """Whether (score a, id a) ranks before (score b, id b): higher score, then lower id."""
    return s_a > s_b or (s_a == s_b and i_a < i_b)


@njit(cache=True, nogil=True)
def sift_down(hs: np.ndarray, hi: np.ndarray, size: int, r: int) -> None:  # pragma: no cover
    """Restore the heap below ``r``: the root holds the entry that ranks last."""
    while True:
        c = 2 * r + 1
        if c >= size:
            return
        if c + 1 < size and better(hs[c], hi[c], hs[c + 1], hi[c + 1]):
            c += 1
        if better(hs[c], hi[c], hs[r], hi[r]):
            return
        hs[r], hs[c] = hs[c], hs[r]
        hi[r], hi[c] = hi[c], hi[r]
        r = c
