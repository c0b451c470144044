"""The numpy reference scoring of an inverted file: gathered postings, popcounts, ``np.bincount``.

:meth:`retrieval.index.inverted_file.InvertedFile.item_scores` calls :func:`gather_scores` for
float indexes and for ``backend="numpy"`` (the twin of the compiled
:func:`retrieval.index._kernels.score_binary`, bit for bit). The query words are taken in chunks
of about ``chunk`` postings; float words: dot products, then the selectivity; binary words: the
popcount of the XOR-ed lanes, then the selectivity by table look-up
(:func:`retrieval.index.search.selectivity_tables`). The large temporaries reuse per-thread
scratch buffers (:func:`_scratch`).
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from retrieval.index.aggregation import AggregatedBatch, pair_similarity, selectivity
from retrieval.index.postings import decode_posting_ids
from retrieval.index.search import selectivity_tables

if TYPE_CHECKING:
    from retrieval.index.inverted_file import InvertedFile

__all__ = ["gather_scores"]

# Per-thread scratch of the binary scoring (see _scratch).
_SCRATCH = threading.local()


def _scratch(keep: int, slot: str, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialised array in a per-thread buffer that is reused from call to call.

    Scoring one query makes a few arrays of several MB; fresh ones would come from the OS as
    new pages, zeroed at first touch, which costs about as much as the scoring. Each ``slot``
    must be used by one array at a time, and what it holds must not outlive the call. Arrays
    above ``keep`` bytes are allocated normally (memory held per thread stays bounded).
    """
    dt = np.dtype(dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if need > keep:
        return np.empty(shape, dt)
    buf: np.ndarray | None = getattr(_SCRATCH, slot, None)
    if buf is None or buf.nbytes < need:
        size = min(max(need, 2 * (0 if buf is None else buf.nbytes)), keep)
        buf = np.empty(size, np.uint8)
        setattr(_SCRATCH, slot, buf)
    return buf[:need].view(dt).reshape(shape)


def gather_scores(
    ivf: InvertedFile,
    q: AggregatedBatch,
    lanes: np.ndarray | None,
    qlanes: np.ndarray,
    *,
    chunk: int,
    scratch_keep: int,
) -> np.ndarray:
    """Summed (unnormalised) word similarities of every query to every item of ``ivf``.

    Args:
        ivf: the index.
        q: the queries, checked against the index.
        lanes, qlanes: :func:`retrieval.index.search.binary_lanes` of ``ivf`` and ``q``
            (``lanes`` None: float words).
        chunk: postings gathered per step (bounds the temporaries).
        scratch_keep: bytes of the largest per-thread scratch buffer kept between calls.

    Returns:
        float64 (n_queries, n_items).
    """
    nq, n = q.n_images, ivf.n_items
    flat = np.zeros(nq * n, np.float64)
    qitem = np.repeat(np.arange(nq, dtype=np.int64), np.diff(q.offsets))
    qw = q.words.astype(np.int64)
    starts = ivf.offsets[qw]
    lens = ivf.offsets[qw + 1] - starts
    # Split the query words into chunks of about chunk postings.
    cum = np.cumsum(lens)
    bounds = np.searchsorted(
        cum,
        np.arange(chunk, int(cum[-1]) if cum.size else 0, chunk),
        side="right",
    )
    edges = np.unique(np.r_[0, bounds, qw.size])
    if lanes is not None:
        table, pair_table = selectivity_tables(ivf.dim, ivf.alpha, ivf.tau)
    for a, b in itertools.pairwise(edges):
        ln = lens[a:b]
        tot = int(ln.sum())
        if tot == 0:
            continue
        # the item ids of these words' postings, in gathering order
        dec = decode_posting_ids(ivf.offsets, ivf.id_offsets, ivf.id_stream, qw[a:b])
        if lanes is not None:
            # The postings of these words, slice by slice (contiguous in the CSR layout),
            # XOR-ed with their query word; Hamming distances by popcount on the lanes, the
            # selectivity by table look-up. Big temporaries live in per-thread scratch.
            bounds_ab = zip(starts[a:b].tolist(), (starts[a:b] + ln).tolist(), strict=True)
            spans = [(lo, hi) for lo, hi in bounds_ab if hi > lo]
            x = _scratch(scratch_keep, "lanes", (tot, lanes.shape[1]), lanes.dtype)
            np.concatenate([lanes[lo:hi] for lo, hi in spans], out=x)
            key = _scratch(scratch_keep, "key", (tot,), np.intp)
            np.copyto(key, dec)
            np.bitwise_xor(x, np.repeat(qlanes[a:b], ln, axis=0), out=x)
            c = np.bitwise_count(x, out=_scratch(scratch_keep, "count", x.shape, np.uint8))
            s = _scratch(scratch_keep, "weights", (tot,), np.float64)
            if c.shape[1] == 2:  # D = 128 etc.: both counts at once, as one uint16 index
                np.take(pair_table, c.view(np.uint16).reshape(-1), out=s, mode="clip")
            else:
                h = _scratch(scratch_keep, "distance", (tot,), np.intp)
                np.copyto(h, c[:, 0])
                for j in range(1, c.shape[1]):
                    h += c[:, j]
                np.take(table, h, out=s, mode="clip")
            if nq > 1:
                key += np.repeat(qitem[a:b] * n, ln)
        else:
            excl = np.cumsum(ln) - ln
            idx = np.repeat(starts[a:b] - excl, ln)
            idx += np.arange(tot)
            rows = np.repeat(np.arange(a, b), ln)
            u = pair_similarity(q.data[rows], ivf.data[idx], ivf.dim)
            s = selectivity(u, ivf.alpha, ivf.tau)
            key = dec.astype(np.intp)
            if nq > 1:
                key += np.repeat(qitem[a:b] * n, ln)
        flat += np.bincount(key, weights=s, minlength=nq * n)
    return flat.reshape(nq, n)
