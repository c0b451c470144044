"""Compiled (numba) inner loops of the inverted file and of aggregation.

Each function here is the fast twin of a vectorised numpy computation that stays in the calling
module as the reference (``backend="numpy"``); the tests check both give the same numbers, bit
for bit. The loops add in the order the numpy code and
:func:`retrieval.index.aggregation.similarity`
add, so float rounding is the same (the numpy scoring path adds a batch's postings in chunks
of ~1M, and only beyond one chunk may differ from both in the last bit):

* :func:`score_binary`: for every query, its words in ascending order, every posting of the
  word; the Hamming distance by hardware popcount of XOR-ed 64-bit lanes, its selectivity by
  table look-up, added to the posting's item score (float64). One pass over the postings, no
  temporaries: what the numpy path does in five passes over gathered copies. Any D >= 1: rows
  of ``ceil(D/8)`` bytes read as the widest lanes dividing them, the padding bits after bit D
  zero on both sides (so ``h <= D``), the table indexed by ``h`` built with the true D.
* :func:`segment_residual_sums`: per (item, word) segment of sorted descriptors, the float32 sum
  of ``x - c_word`` in order (what the sparse 0/1 matrix product computes), without
  materialising the (N, D) residuals.
* :func:`rank_descending`: the full ranking by decreasing score, ties by ascending id, as a
  stable LSD radix sort on the float bits (``np.argsort(-s, kind="stable")``, 3x faster).

Functions are compiled on first use and cached on disk next to this file (``cache=True``); the
first call in a fresh environment costs a few seconds of compilation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["rank_descending", "score_binary", "segment_residual_sums"]


@intrinsic
def _ctpop(typingctx: Any, x: Any) -> Any:
    """LLVM's ``ctpop`` on an unsigned 64-bit integer (the ``popcnt`` instruction on x86)."""
    if not isinstance(x, types.Integer) or getattr(x, "bitwidth", 0) != 64:
        return None
    sig = types.uint64(x)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [args[0]])

    return sig, codegen


# Called from compiled code only (typed Any: mypy does not know numba's intrinsic call protocol).
_popcount: Any = _ctpop


@njit(cache=True, nogil=True)
def score_binary(  # pragma: no cover - compiled
    offsets: np.ndarray,
    image_ids: np.ndarray,
    lanes: np.ndarray,
    q_offsets: np.ndarray,
    q_words: np.ndarray,
    q_lanes: np.ndarray,
    table: np.ndarray,
    out: np.ndarray,
) -> None:
    """Add the selectivity of every (query word, posting) pair to ``out``.

    Args:
        offsets: int64 (K + 1,) CSR offsets of the inverted file.
        image_ids: uint32 (N,) item id of each posting.
        lanes: unsigned (N, L) packed sign bits of each posting: the ``ceil(D/8)`` bytes of a
            row viewed as L lanes of 8, 16, 32 or 64 bits (L = 2 of uint64 at D = 128); the
            padding bits after bit D are zero.
        q_offsets: int64 (n_queries + 1,); query ``i`` owns word rows ``q_offsets[i]:[i+1]``.
        q_words: uint32 (M,) query words, ascending within a query.
        q_lanes: (M, L) packed sign bits of the query words, same lanes as ``lanes``.
        table: float64 (D + 1,) selectivity of each Hamming distance, for the true D (zero
            padding bits agree, so ``h <= D`` and never indexes past the table).
        out: float64 (n_queries, n_items), accumulated in place.
    """
    n_lanes = lanes.shape[1]
    for qi in range(q_offsets.shape[0] - 1):
        row = out[qi]
        for j in range(q_offsets[qi], q_offsets[qi + 1]):
            w = q_words[j]
            lo = offsets[w]
            hi = offsets[w + 1]
            if n_lanes == 2:  # D = 128: lanes held in registers, 2x the generic loop's speed
                a0 = np.uint64(q_lanes[j, 0])
                a1 = np.uint64(q_lanes[j, 1])
                for p in range(lo, hi):
                    h = _popcount(np.uint64(lanes[p, 0]) ^ a0) + _popcount(
                        np.uint64(lanes[p, 1]) ^ a1
                    )
                    row[image_ids[p]] += table[h]
            else:
                for p in range(lo, hi):
                    h = np.uint64(0)
                    for t in range(n_lanes):
                        h += _popcount(np.uint64(lanes[p, t]) ^ np.uint64(q_lanes[j, t]))
                    row[image_ids[p]] += table[h]


@njit(cache=True, nogil=True)
def segment_residual_sums(  # pragma: no cover - compiled
    x: np.ndarray,
    rows: np.ndarray,
    words: np.ndarray,
    order: np.ndarray,
    first: np.ndarray,
    cb: np.ndarray,
) -> np.ndarray:
    """Per segment, the float32 sum of residuals in segment order.

    Args:
        x: float32 (N, D) descriptors.
        rows: int64 (P,) descriptor row of each (descriptor, assignment) pair.
        words: int64 (P,) word of each pair.
        order: int64 (P,) pairs sorted by (item, word); segment ``s`` holds the pairs
            ``order[first[s]:first[s + 1]]`` (one item and word).
        first: int64 (S,) segment starts in ``order``.
        cb: float32 (K, D) codebook.

    Returns:
        float32 (S, D): ``sum(x[rows[o]] - cb[words[o]])`` over the segment, added in order.
    """
    n_seg = first.shape[0]
    dim = x.shape[1]
    out = np.zeros((n_seg, dim), np.float32)
    for s in range(n_seg):
        stop = first[s + 1] if s + 1 < n_seg else order.shape[0]
        acc = out[s]
        for i in range(first[s], stop):
            o = order[i]
            r = rows[o]
            w = words[o]
            for d in range(dim):
                acc[d] += x[r, d] - cb[w, d]
    return out


@njit(cache=True, nogil=True)
def rank_descending(bits: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Full ranking of every row by decreasing score, ties by ascending column (a stable LSD
    radix sort on the float bits: ``np.argsort(-s, kind="stable")`` without comparisons).

    Args:
        bits: uint64 (n_rows, n) the float64 scores viewed as integers (``-0.0`` already
            folded into ``0.0``; no NaN).
        out: int64 (n_rows, n), the column order of each row (written).
    """
    n_rows, n = bits.shape
    top = np.uint64(1) << np.uint64(63)
    keys = np.empty(n, np.uint64)
    keys2 = np.empty(n, np.uint64)
    idx = np.empty(n, np.int64)
    idx2 = np.empty(n, np.int64)
    counts = np.empty(256, np.int64)
    for r in range(n_rows):
        for i in range(n):
            b = bits[r, i]
            # ascending float order as unsigned order, then reversed for descending scores
            a = ~b if (b & top) else (b | top)
            keys[i] = ~a
            idx[i] = i
        for shift in range(0, 64, 8):
            sh = np.uint64(shift)
            counts[:] = 0
            for i in range(n):
                counts[(keys[i] >> sh) & np.uint64(255)] += 1
            if counts.max() == n:  # every key has the same byte here: nothing to reorder
                continue
            total = 0
            for c in range(256):
                t = counts[c]
                counts[c] = total
                total += t
            for i in range(n):
                c = (keys[i] >> sh) & np.uint64(255)
                p = counts[c]
                counts[c] = p + 1
                keys2[p] = keys[i]
                idx2[p] = idx[i]
            keys, keys2 = keys2, keys
            idx, idx2 = idx2, idx
        out[r] = idx
