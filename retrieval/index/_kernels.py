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
* :func:`encode_ids` / :func:`decode_ids`: the posting ids of each word as its first id and
  the gaps between consecutive ids, in the narrowest of 1, 2 or 4 little-endian bytes that holds
  the word's largest gap (the scoring loops decode them on the fly).
* :func:`search_binary`: :func:`score_binary` into a scratch row reset after each query, the
  items touched listed as they come (or, when the query's postings outnumber half the items,
  found by one pass over the row), then the top-k by a bounded heap or the full ranking by the
  radix sort of :mod:`retrieval.index._ranking` of the items with a nonzero score, merged with
  the others (all scoring exactly 0, or -1 without words) in id order: the order of ``top_k``
  on the full score matrix.

The scoring loops index with unsigned integers: numba wraps negative indices around, and that
test on every posting cost a quarter of the loop's time.

Functions are compiled on first use and cached on disk next to this file (``cache=True``); the
first call in a fresh environment costs a few seconds of compilation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from retrieval.index._ranking import COUNTS_SHAPE, better, key_bits, order_key, sift_down
from retrieval.index._ranking import sort_keys as _sort

__all__ = [
    "decode_ids",
    "encode_ids",
    "score_binary",
    "search_binary",
    "segment_residual_sums",
]


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
    id_offsets: np.ndarray,
    id_stream: np.ndarray,
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
        id_offsets, id_stream: int64 (K + 1,) and uint8 the delta-encoded item id of each
            posting (:func:`encode_ids`).
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
    ids = np.empty(_longest_list(offsets, q_words), np.int64)
    unused = np.zeros(0, np.int64)
    for qi in range(q_offsets.shape[0] - 1):
        row = out[qi]
        for j in range(q_offsets[qi], q_offsets[qi + 1]):
            w = q_words[j]
            _add_word(
                row,
                lanes,
                offsets,
                id_offsets,
                id_stream,
                w,
                q_lanes[j],
                table,
                ids,
                unused,
                unused.view(np.uint8),
                0,
            )


@njit(cache=True, nogil=True)
def _add_word(  # pragma: no cover - compiled
    acc: np.ndarray,
    lanes: np.ndarray,
    offsets: np.ndarray,
    id_offsets: np.ndarray,
    stream: np.ndarray,
    w: Any,
    q_row: np.ndarray,
    table: np.ndarray,
    ids: np.ndarray,
    touched: np.ndarray,
    flag: np.ndarray,
    m: int,
) -> Any:
    """Add the selectivity of one query word against each of its postings to ``acc[item]``.

    The postings of word ``w`` in list order; ids of one byte a gap are decoded in the loop,
    wider ones into ``ids`` first. Indices are unsigned (no negative-index wrap-around in the
    loop: a quarter of its time). With ``touched`` non-empty, every item not yet flagged in
    ``flag`` is appended to ``touched`` at ``m`` (branch-free) and flagged.

    Args:
        acc: float64 (n_items,) accumulated in place.
        lanes, offsets, id_offsets, stream, table: as :func:`score_binary`.
        q_row: (L,) the query word's lanes.
        ids: int64 scratch of at least the word's postings.
        touched, flag, m: int64 (n_items + 1,), uint8 (n_items,) and the touched count
            (``touched`` empty: no tracking).

    Returns:
        the new touched count.
    """
    lo = offsets[w]
    cnt = offsets[w + 1] - lo
    if cnt == 0:
        return m
    width = (id_offsets[w + 1] - id_offsets[w]) // cnt
    if width != 1:
        _decode_word(stream, id_offsets[w], width, cnt, ids)
    track = touched.shape[0] > 0
    ulo = np.uint64(lo)
    upos = np.uint64(id_offsets[w])
    um = np.uint64(m)
    one = np.uint64(1)
    v = np.uint64(0)
    n_lanes = lanes.shape[1]
    if n_lanes == 2:  # D = 128: lanes held in registers, 2x the generic loop's speed
        # one loop per (width 1?, tracking?): a test inside the loop costs 12%
        a0 = np.uint64(q_row[0])
        a1 = np.uint64(q_row[1])
        if width == 1 and not track:
            for t in range(np.uint64(cnt)):
                v += np.uint64(stream[upos + t])
                p = ulo + t
                acc[v] += table[
                    _popcount(np.uint64(lanes[p, 0]) ^ a0) + _popcount(np.uint64(lanes[p, 1]) ^ a1)
                ]
        elif not track:
            for t in range(np.uint64(cnt)):
                v = np.uint64(ids[t])
                p = ulo + t
                acc[v] += table[
                    _popcount(np.uint64(lanes[p, 0]) ^ a0) + _popcount(np.uint64(lanes[p, 1]) ^ a1)
                ]
        elif width == 1:
            for t in range(np.uint64(cnt)):
                v += np.uint64(stream[upos + t])
                p = ulo + t
                touched[um] = v  # kept only when new
                um += one - np.uint64(flag[v])
                flag[v] = 1
                acc[v] += table[
                    _popcount(np.uint64(lanes[p, 0]) ^ a0) + _popcount(np.uint64(lanes[p, 1]) ^ a1)
                ]
        else:
            for t in range(np.uint64(cnt)):
                v = np.uint64(ids[t])
                p = ulo + t
                touched[um] = v
                um += one - np.uint64(flag[v])
                flag[v] = 1
                acc[v] += table[
                    _popcount(np.uint64(lanes[p, 0]) ^ a0) + _popcount(np.uint64(lanes[p, 1]) ^ a1)
                ]
    else:
        for t in range(np.uint64(cnt)):
            if width == 1:
                v += np.uint64(stream[upos + t])
            else:
                v = np.uint64(ids[t])
            p = ulo + t
            h = np.uint64(0)
            for b in range(n_lanes):
                h += _popcount(np.uint64(lanes[p, b]) ^ np.uint64(q_row[b]))
            if track:
                touched[um] = v
                um += one - np.uint64(flag[v])
                flag[v] = 1
            acc[v] += table[h]
    return np.int64(um)


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
def _read_delta(stream: np.ndarray, pos: int, width: int) -> Any:  # pragma: no cover - compiled
    """The little-endian unsigned integer of ``width`` (1, 2 or 4) bytes at ``stream[pos]``."""
    if width == 1:
        return np.int64(stream[pos])
    if width == 2:
        return np.int64(stream[pos]) | (np.int64(stream[pos + 1]) << 8)
    return (
        np.int64(stream[pos])
        | (np.int64(stream[pos + 1]) << 8)
        | (np.int64(stream[pos + 2]) << 16)
        | (np.int64(stream[pos + 3]) << 24)
    )


@njit(cache=True, nogil=True)
def _decode_word(  # pragma: no cover - compiled
    stream: np.ndarray, pos: int, width: int, cnt: int, buf: np.ndarray
) -> None:
    """The ``cnt`` absolute ids of one word (``width`` bytes a gap from ``stream[pos]``) into
    ``buf[:cnt]``: one tight loop per width, so the scoring loop reads plain ids."""
    v = np.int64(0)
    if width == 1:
        for t in range(cnt):
            v += np.int64(stream[pos + t])
            buf[t] = v
    elif width == 2:
        for t in range(cnt):
            q = pos + 2 * t
            v += np.int64(stream[q]) | (np.int64(stream[q + 1]) << 8)
            buf[t] = v
    else:
        for t in range(cnt):
            q = pos + 4 * t
            v += (
                np.int64(stream[q])
                | (np.int64(stream[q + 1]) << 8)
                | (np.int64(stream[q + 2]) << 16)
                | (np.int64(stream[q + 3]) << 24)
            )
            buf[t] = v


@njit(cache=True, nogil=True)
def _longest_list(offsets: np.ndarray, q_words: np.ndarray) -> int:  # pragma: no cover
    """The most postings of any word in ``q_words``."""
    best = 0
    for j in range(q_words.shape[0]):
        w = q_words[j]
        c = offsets[w + 1] - offsets[w]
        if c > best:
            best = c
    return best


@njit(cache=True, nogil=True)
def encode_ids(  # pragma: no cover - compiled
    offsets: np.ndarray, ids: np.ndarray, id_offsets: np.ndarray
) -> np.ndarray:
    """Delta-encode the posting ids of every word in the narrowest width that holds its gaps.

    Args:
        offsets: int64 (K + 1,) CSR offsets.
        ids: unsigned (N,) absolute item ids, non-decreasing within each word.
        id_offsets: int64 (K + 1,) written: word ``w`` owns bytes ``id_offsets[w]:[w + 1]`` of
            the stream, ``width = bytes / postings`` (1, 2 or 4) bytes a gap.

    Returns:
        uint8 (id_offsets[K],) the stream: per word, its first id then the gaps to the previous
        id, little-endian. Empty (0 bytes) with ``id_offsets[0] = -1`` when ids decrease inside
        a word (the caller raises).
    """
    n_words = offsets.shape[0] - 1
    id_offsets[0] = 0
    for w in range(n_words):
        prev = np.int64(0)
        big = np.int64(0)
        for p in range(offsets[w], offsets[w + 1]):
            v = np.int64(ids[p])
            d = v - prev
            if d < 0:
                id_offsets[0] = -1
                return np.empty(0, np.uint8)
            if d > big:
                big = d
            prev = v
        width = 1 if big < 256 else 2 if big < 65536 else 4
        id_offsets[w + 1] = id_offsets[w] + width * (offsets[w + 1] - offsets[w])
    stream = np.empty(id_offsets[n_words], np.uint8)
    for w in range(n_words):
        cnt = offsets[w + 1] - offsets[w]
        if cnt == 0:
            continue
        width = (id_offsets[w + 1] - id_offsets[w]) // cnt
        pos = id_offsets[w]
        prev = np.int64(0)
        for p in range(offsets[w], offsets[w + 1]):
            v = np.int64(ids[p])
            d = v - prev
            prev = v
            for b in range(width):
                stream[pos + b] = np.uint8((d >> (8 * b)) & 255)
            pos += width
    return stream


@njit(cache=True, nogil=True)
def decode_ids(  # pragma: no cover - compiled
    offsets: np.ndarray, id_offsets: np.ndarray, stream: np.ndarray, out: np.ndarray
) -> None:
    """Inverse of :func:`encode_ids`: the absolute ids of every posting into ``out`` (N,)."""
    for w in range(offsets.shape[0] - 1):
        lo = offsets[w]
        cnt = offsets[w + 1] - lo
        if cnt == 0:
            continue
        width = (id_offsets[w + 1] - id_offsets[w]) // cnt
        pos = id_offsets[w]
        v = np.int64(0)
        for p in range(lo, lo + cnt):
            v += _read_delta(stream, pos, width)
            pos += width
            out[p] = v


@njit(cache=True, nogil=True)
def search_binary(  # pragma: no cover - compiled
    offsets: np.ndarray,
    id_offsets: np.ndarray,
    id_stream: np.ndarray,
    lanes: np.ndarray,
    q_offsets: np.ndarray,
    q_words: np.ndarray,
    q_lanes: np.ndarray,
    table: np.ndarray,
    item_words: np.ndarray,
    normalize: bool,
    out_ids: np.ndarray,
    out_scores: np.ndarray,
    acc: np.ndarray,
    flag: np.ndarray,
    touched: np.ndarray,
    sort_keys: np.ndarray,
    sort_ids: np.ndarray,
    ids: np.ndarray,
) -> None:
    """Top-k (or the full ranking) of a batch of queries, scoring only the items they touch.

    Per query: the selectivity of every (query word, posting) pair is added to ``acc`` in the
    order of :func:`score_binary` (query words ascending, postings in list order); the sums of
    the touched items are normalised as ``InvertedFile._normalise`` does
    (``s / sqrt(|W_q| |W_item|)``, -1 for items without words). Every other item scores
    exactly 0 (-1 without words), so the ranking by decreasing score, ties by ascending id, is
    the merge of the order of the items with a nonzero score with the rest in id order. Those
    are ranked by a bounded heap (top-k) or by a stable radix sort (the full ranking: LSD on
    the upper 32 bits of the order key, then runs of equal upper bits by the whole key), never
    by sorting all n scores. A query without words scores -1 everywhere (ids in order).

    Args:
        offsets, id_offsets, id_stream: the CSR offsets and the delta-encoded posting ids
            (:func:`encode_ids`).
        lanes, q_offsets, q_words, q_lanes, table: as :func:`score_binary`.
        item_words: float64 (n_items,) ``|W_item|``.
        normalize: divide by ``sqrt(|W_q| |W_item|)``.
        out_ids: int64 (n_queries, kk) written, kk <= n_items (kk = n_items: full ranking).
        out_scores: float64 (n_queries, kk) written.
        acc, flag: float64 and uint8 (n_items,) scratch, all zero on entry and on return.
        touched: int64 (n_items + 1,) scratch (one spare slot: written before it is kept).
        sort_keys, sort_ids: uint64 and int64 (2, n_items) scratch of the radix sort (kept by
            the caller: fresh pages for every query would cost as much as the sort).
        ids: int64 scratch holding the decoded ids of the longest posting list of the queries.
    """
    n = item_words.shape[0]
    kk = out_ids.shape[1]
    acc_bits = acc.view(np.uint64)
    counts = np.empty(COUNTS_SHAPE, np.int64)
    for qi in range(q_offsets.shape[0] - 1):
        qn = q_offsets[qi + 1] - q_offsets[qi]
        if qn == 0:
            for r in range(kk):
                out_ids[qi, r] = r
                out_scores[qi, r] = -1.0
            continue
        # dense mode (the query's postings outnumber half the items: most are touched): no
        # touched list, the candidates are found by one pass over the row afterwards
        n_post = 0
        for j in range(q_offsets[qi], q_offsets[qi + 1]):
            n_post += offsets[q_words[j] + 1] - offsets[q_words[j]]
        dense = 2 * n_post >= n
        m = 0
        track = touched[:0] if dense else touched  # empty: _add_word lists nothing
        for j in range(q_offsets[qi], q_offsets[qi + 1]):
            m = _add_word(
                acc,
                lanes,
                offsets,
                id_offsets,
                id_stream,
                q_words[j],
                q_lanes[j],
                table,
                ids,
                track,
                flag,
                m,
            )
        # Normalise; the candidates are the items with a nonzero score (a touched item whose
        # sum is exactly 0 scores 0 like an untouched one and ranks with them by id). Items
        # without words score -1 whether touched or not (never touched in a consistent index).
        qf = np.float64(qn)
        if dense:  # one pass: normalise and list the candidates (no flags were set)
            keys = sort_keys[0]
            for i in range(n):
                s = acc[i]
                if s == 0.0:
                    continue
                dn = item_words[i]
                if dn == 0.0:
                    s = 0.0
                elif normalize:
                    s = s / np.sqrt(qf * dn)
                acc[i] = s
                if s != 0.0:
                    if kk == n:  # the sort's input, in id order
                        keys[m] = order_key(acc_bits[i])
                        sort_ids[0, m] = i
                    else:
                        touched[m] = i
                    m += 1
        else:
            for t in range(m):
                u = np.uint64(touched[t])
                flag[u] = 0
                dn = item_words[u]
                if dn == 0.0:
                    acc[u] = 0.0
                elif normalize:
                    acc[u] = acc[u] / np.sqrt(qf * dn)
        # the candidates in ranking order: ti, length nt
        if kk == n:
            # full ranking: the candidates in ascending id, sorted stably by their order keys
            # (the order of np.argsort(-s, kind="stable"))
            keys = sort_keys[0]
            ti = sort_ids[0]
            nt = m  # dense: listed above
            if not dense:
                nt = 0
                for i in range(n):  # touched (now zero-flagged) items in id order
                    if acc[i] != 0.0:
                        keys[nt] = order_key(acc_bits[i])
                        ti[nt] = i
                        nt += 1
            moved = _sort(
                sort_keys[0, :nt], sort_ids[0, :nt], sort_keys[1, :nt], sort_ids[1, :nt], counts
            )
            ti = sort_ids[1 if moved else 0, :nt]
            # the candidates' scores in ranking order, decoded from their sorted keys into the
            # free key buffer (the merge then reads them in order, not acc at random)
            sk = sort_keys[1 if moved else 0, :nt]
            cs_bits = sort_keys[0 if moved else 1, :nt]
            for t in range(nt):
                cs_bits[t] = key_bits(sk[t])
            cs = cs_bits.view(np.float64)
        else:
            # top-k: a bounded heap whose root is the entry ranked last
            size = 0
            hs = np.empty(kk, np.float64)
            hi = np.empty(kk, np.int64)
            for t in range(m):
                i = touched[t]
                s = acc[i]
                if s == 0.0:
                    continue
                if size < kk:
                    c = size  # sift up
                    hs[c] = s
                    hi[c] = i
                    size += 1
                    while c > 0:
                        par = (c - 1) // 2
                        if better(hs[c], hi[c], hs[par], hi[par]):
                            break
                        hs[c], hs[par] = hs[par], hs[c]
                        hi[c], hi[par] = hi[par], hi[c]
                        c = par
                elif better(s, i, hs[0], hi[0]):
                    hs[0] = s
                    hi[0] = i
                    sift_down(hs, hi, size, 0)
            nt = size
            ti = sort_ids[0, :nt]
            cs = sort_keys[1, :nt].view(np.float64)  # their scores
            for r in range(nt - 1, -1, -1):  # pop the last-ranked entry each time
                ti[r] = hi[0]
                cs[r] = hs[0]
                size -= 1
                hs[0] = hs[size]
                hi[0] = hi[size]
                sift_down(hs, hi, size, 0)
        # merge with the items scoring exactly 0 (with words) and then -1 (without), by id;
        # looked up only when the next candidate does not score above 0
        t = 0
        zs = 0  # next item scoring 0 (n: none left)
        es = 0  # next item without words
        z_ok = False
        e_ok = False
        for r in range(kk):
            if t < nt and cs[t] > 0.0:
                out_ids[qi, r] = ti[t]
                out_scores[qi, r] = cs[t]
                t += 1
                continue
            if not z_ok:
                while zs < n and (acc[zs] != 0.0 or item_words[zs] == 0.0):
                    zs += 1
                z_ok = True
            if zs < n:
                rs = 0.0
                ri = zs
            else:
                if not e_ok:
                    while es < n and item_words[es] != 0.0:
                        es += 1
                    e_ok = True
                rs = -1.0
                ri = es
            if t < nt and (ri >= n or better(cs[t], ti[t], rs, ri)):
                out_ids[qi, r] = ti[t]
                out_scores[qi, r] = cs[t]
                t += 1
            else:
                out_ids[qi, r] = ri
                out_scores[qi, r] = rs
                if zs < n:
                    zs += 1
                    z_ok = False
                else:
                    es += 1
                    e_ok = False
        if dense:
            acc[:] = 0.0
        else:
            for t in range(m):
                acc[touched[t]] = 0.0
