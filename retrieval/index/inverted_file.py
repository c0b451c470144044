"""Inverted file for ASMK-family kernels: CSR posting lists, vectorised scoring, top-k, npy files.

Layout (``K`` visual words, ``N`` postings, ``n`` images)::

    offsets          int64  (K + 1,)     word w owns postings offsets[w]:offsets[w+1]
    image_ids        uint32 (N,)         ascending within each word
    data             float32 (N, D)      residuals (asmk, vlad, r_asmk, r_vlad), or
                     uint8 (N, ceil(D/8)) packed sign bits (asmk_star, r_asmk_star, ...), MSB
                                         first, the last byte zero-padded when 8 does not
                                         divide D
    words_per_image  uint32 (n,)         |W_x|, for the ASMK normalisation
    item_image       uint32 (n,)         regional search only: the database image of each item

Regional search (D2R, Teichmann et al. CVPR 2019, eqs. 3 and 4): every region of a database
image is its own item (entry) with its own words; ``item_image`` maps items (sorted by image,
every image at least one item) back to images, and the item scores are pooled per image by
``max`` or ``avg`` (the mean over the image's items that have words; an image none of whose
items has words scores -1). Without ``item_image`` items are images (the classic index).

The ASMK normalisation ``1 / sqrt(|W_q| |W_item|)`` favours items with few words: a region with
a handful of words that happens to share one or two of them with the query gets a normalised
score like a whole image matching tens of words, so many generic proposals (a grid, selective
search) outvote the whole image by chance. Regional indexes therefore floor the item side of the
normalisation at a fraction ``rho`` (``region_norm_floor``) of the words of the item's whole
image (its first item, region 0)::

    score(q, item) = sum_c sigma(u_c) / sqrt(|W_q| max(|W_item|, rho |W_image|))

A region may still beat its whole image by matching more cleanly (less clutter in its words'
aggregated residuals) and by up to ``1 / sqrt(rho)`` for its size, but a region holding fewer
than ``rho`` of the image's words is scored as if it held that many. ``rho = 0`` is plain ASMK
(indexes written before this option: header ``format_version`` 2, loaded with ``rho = 0``);
the whole image itself is never affected (``|W_image| >= rho |W_image|``). The default
``rho = 0.1`` (:data:`REGION_NORM_FLOOR`) binds only on regions holding under a tenth of their
image's words (specks, slivers, empty sky): the oracle boxes of the synthetic world, small
landmarks, keep their full gain, which a floor of 0.25 or more already takes away.

Scoring a batch of queries gathers the postings of all query words at once, computes word
similarities and their selectivity, and accumulates per (query, image) with one
``np.bincount``. Float words: dot products, then the selectivity. Binary words: the popcount of
the XOR-ed bits (``np.bitwise_count`` on the widest lanes dividing a row, 64 bits at D = 128),
then the selectivity of each Hamming distance by look-up in a table computed with the same
expressions (bit for bit the same numbers, without a power per posting); the large temporaries
reuse per-thread scratch buffers. Any D >= 1 works: the padding bits of the last byte are zero
in every word (checked when an index or a batch is made), so they agree and add nothing to the
Hamming distance, and the table maps ``h`` to ``selectivity(1 - 2 h / D)`` with the true D
(``dim`` in the header), never the padded ``8 ceil(D/8)``. The result equals
:func:`retrieval.index.aggregation.similarity` against every image, number for number.

On disk an inverted file is a folder: ``header.json`` (format version, kernel, parameters,
shapes, dtypes, config hash) and one ``.npy`` per array, loadable with ``mmap_mode="r"``. No
pickle.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gldboxes.io import atomic_dir, read_json, write_json
from retrieval.index.aggregation import (
    AggregatedBatch,
    AggregatedImage,
    check_packed_bits,
    pair_similarity,
    selectivity,
)
from retrieval.index.kernels import get as get_kernel

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_REGIONAL",
    "FORMAT_VERSION_REGIONAL_FLOOR",
    "POOLINGS",
    "REGION_NORM_FLOOR",
    "InvertedFile",
    "top_k",
]

logger = logging.getLogger("retrieval.index.inverted_file")

FORMAT_VERSION = 1
#: Version written for regional-search indexes (an ``item_image`` array; older readers refuse
#: it instead of silently ranking regions as images). Both versions are read.
FORMAT_VERSION_REGIONAL = 2
#: Version written for regional indexes with a normalisation floor ``region_norm_floor > 0``
#: (older readers would score them without it, so they must refuse them). Versions 1 and 2 load
#: with ``region_norm_floor = 0``, the scoring they were written with.
FORMAT_VERSION_REGIONAL_FLOOR = 3
#: Default ``rho`` of :meth:`InvertedFile.build` for regional indexes (see the module docstring).
REGION_NORM_FLOOR = 0.1
POOLINGS = ("max", "avg")
#: Scoring backends of :meth:`InvertedFile.item_scores`.
BACKENDS = ("numba", "numpy")
_ARRAYS = ("offsets", "image_ids", "data", "words_per_image")
# Postings gathered per scoring step (bounds the temporary memory to ~100 MB at D=128 float).
_GATHER_CHUNK = 1 << 20
# Per-thread scratch of the binary scoring (see _scratch), and the largest buffer it keeps.
_SCRATCH = threading.local()
_SCRATCH_KEEP = 1 << 25


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
        from retrieval.index._kernels import rank_descending

        # The same order by a stable radix sort of the float bits (3x faster at 5k images);
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


def _scratch(slot: str, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialised array in a per-thread buffer that is reused from call to call.

    Scoring one query makes a few arrays of several MB; fresh ones would come from the OS as
    new pages, zeroed at first touch, which costs about as much as the scoring. Each ``slot``
    must be used by one array at a time, and what it holds must not outlive the call. Arrays
    above ``_SCRATCH_KEEP`` bytes are allocated normally (memory held per thread stays bounded).
    """
    dt = np.dtype(dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if need > _SCRATCH_KEEP:
        return np.empty(shape, dt)
    buf: np.ndarray | None = getattr(_SCRATCH, slot, None)
    if buf is None or buf.nbytes < need:
        size = min(max(need, 2 * (0 if buf is None else buf.nbytes)), _SCRATCH_KEEP)
        buf = np.empty(size, np.uint8)
        setattr(_SCRATCH, slot, buf)
    return buf[:need].view(dt).reshape(shape)


@functools.lru_cache(maxsize=16)
def _selectivity_tables(dim: int, alpha: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True, eq=False)
class InvertedFile:
    """An inverted file over a database of aggregated images (see the module docstring).

    Attributes:
        offsets, image_ids, data, words_per_image: the CSR arrays (over items: the images, or
            the regions for regional search; ``image_ids`` hold item ids).
        dim: descriptor dimension D.
        kernel: the aggregation kernel of the database (a name in :mod:`retrieval.index.kernels`).
        alpha, tau, normalize: similarity parameters (defaults: the kernel's ``similarity``).
        meta: free JSON-able metadata saved in the header (config, config hash ...).
        item_image: regional search: uint32 (n_items,) image of each item, non-decreasing,
            every image in ``0..n_images-1`` owning at least one item; None: items are images.
        pooling: regional search: ``"max"`` (eq. 3) or ``"avg"`` (eq. 4); None otherwise.
        region_norm_floor: regional search: ``rho`` in [0, 1], the floor of an item's word count
            in the normalisation as a fraction of its image's first item (region 0); 0: plain
            ASMK normalisation (the default of the constructor; :meth:`build` defaults to
            :data:`REGION_NORM_FLOOR`). Must be 0 for a non-regional index.
    """

    offsets: np.ndarray
    image_ids: np.ndarray
    data: np.ndarray
    words_per_image: np.ndarray
    dim: int
    kernel: str
    alpha: float = 3.0
    tau: float = 0.0
    normalize: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    item_image: np.ndarray | None = None
    pooling: str | None = None
    region_norm_floor: float = 0.0

    def __post_init__(self) -> None:
        dim = self.dim
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"InvertedFile: dim must be an integer >= 1, got {dim!r}")
        object.__setattr__(self, "dim", int(dim))
        if np.ndim(self.data) != 2 or np.shape(self.data)[0] != np.shape(self.image_ids)[0]:
            raise ValueError(
                f"InvertedFile: data must be (n_postings, width) with n_postings="
                f"{np.shape(self.image_ids)[0]}, got shape {np.shape(self.data)}"
            )
        if self.binary:
            # The scoring looks Hamming distances up in a (D + 1,) table: the width must match D
            # and the padding bits must be zero (one pass over the last byte column, only when
            # 8 does not divide D).
            check_packed_bits(self.data, self.dim, "InvertedFile")
        elif self.data.shape[1] != self.dim:
            raise ValueError(
                f"InvertedFile: float data must be (n_postings, {self.dim}), got {self.data.shape}"
            )
        if (self.item_image is None) != (self.pooling is None):
            raise ValueError("InvertedFile: item_image and pooling go together (regional search)")
        rho = self.region_norm_floor
        real = isinstance(rho, int | float | np.integer | np.floating) and not isinstance(rho, bool)
        if not real or not 0.0 <= rho <= 1.0:
            raise ValueError(f"InvertedFile: region_norm_floor must be in [0, 1], got {rho!r}")
        object.__setattr__(self, "region_norm_floor", float(rho))
        if self.item_image is None:
            if rho != 0.0:
                raise ValueError(
                    "InvertedFile: region_norm_floor applies to regional search only (item_image)"
                )
            return
        if self.pooling not in POOLINGS:
            raise ValueError(f"InvertedFile: pooling must be one of {POOLINGS}, got {self.pooling}")
        ii = np.asarray(self.item_image)
        if ii.shape != self.words_per_image.shape:
            raise ValueError(
                f"InvertedFile: item_image has shape {ii.shape}, expected "
                f"({self.words_per_image.shape[0]},) (one image per item)"
            )
        step = np.diff(ii.astype(np.int64))
        if ii.size and (int(ii[0]) != 0 or np.any(step < 0) or np.any(step > 1)):
            raise ValueError(
                "InvertedFile: item_image must be non-decreasing from 0 with every image owning "
                "at least one item (regions sorted by image)"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        batch: AggregatedBatch,
        codebook_size: int,
        kernel: str,
        *,
        alpha: float | None = None,
        tau: float | None = None,
        normalize: bool | None = None,
        meta: Mapping[str, Any] | None = None,
        item_image: np.ndarray | None = None,
        pooling: str | None = None,
        region_norm_floor: float | None = None,
    ) -> InvertedFile:
        """Build from an aggregated database (image ``i`` of the batch gets id ``i``).

        Args:
            batch: the database, as returned by :func:`retrieval.index.aggregation.aggregate_many`.
            codebook_size: K, the number of visual words.
            kernel: the kernel that produced ``batch``; sets default similarity parameters.
            alpha, tau, normalize: override the kernel's defaults.
            item_image: regional search: int (n_items,) image of each item of ``batch`` (sorted,
                every image at least one item); None: the batch's entries are the images.
            pooling: with ``item_image``: ``"max"`` or ``"avg"`` pooling of item scores.
            region_norm_floor: with ``item_image``: ``rho`` of the normalisation floor (None:
                :data:`REGION_NORM_FLOOR`; 0: plain ASMK). Ignored (0) without ``item_image``.
        """
        d = get_kernel(kernel).similarity
        n = batch.n_images
        if n >= 2**32 - 1:
            raise ValueError(f"too many images for uint32 ids: {n}")
        if batch.words.size and int(batch.words.max()) >= codebook_size:
            raise ValueError(f"word id {int(batch.words.max())} >= codebook_size {codebook_size}")
        counts = np.diff(batch.offsets)
        img = np.repeat(np.arange(n, dtype=np.uint32), counts)
        # Stable sort by word keeps ascending image ids inside each posting list.
        order = np.argsort(batch.words, kind="stable")
        offsets = np.zeros(codebook_size + 1, np.int64)
        np.cumsum(np.bincount(batch.words, minlength=codebook_size), out=offsets[1:])
        return cls(
            offsets=offsets,
            image_ids=img[order],
            data=np.ascontiguousarray(batch.data[order]),
            words_per_image=counts.astype(np.uint32),
            dim=int(batch.dim),
            kernel=kernel,
            alpha=float(d["alpha"] if alpha is None else alpha),
            tau=float(d["tau"] if tau is None else tau),
            normalize=bool(d["normalize"] if normalize is None else normalize),
            meta=dict(meta or {}),
            item_image=None if item_image is None else np.asarray(item_image, np.uint32),
            pooling=pooling,
            region_norm_floor=(
                0.0
                if item_image is None
                else REGION_NORM_FLOOR
                if region_norm_floor is None
                else region_norm_floor
            ),
        )

    # ------------------------------------------------------------------ properties
    @property
    def n_items(self) -> int:
        """Indexed entries: the images, or their regions for regional search."""
        return int(self.words_per_image.shape[0])

    @property
    def n_images(self) -> int:
        """Database images (scores and rankings are over these)."""
        if self.item_image is None:
            return self.n_items
        return int(self.item_image[-1]) + 1 if self.item_image.size else 0

    @property
    def regional(self) -> bool:
        """Whether items are regions pooled back to images (regional search)."""
        return self.item_image is not None

    @property
    def codebook_size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def binary(self) -> bool:
        return bool(self.data.dtype == np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the ``.npy`` files hold, headers aside)."""
        extra = 0 if self.item_image is None else int(self.item_image.nbytes)
        return int(sum(getattr(self, a).nbytes for a in _ARRAYS)) + extra

    @property
    def bytes_per_image(self) -> float:
        return self.nbytes / max(self.n_images, 1)

    def stats(self) -> dict[str, float]:
        """Size figures: images, items, postings, bytes (per image), mean words per item."""
        return {
            "images": self.n_images,
            "items": self.n_items,
            "items_per_image": self.n_items / max(self.n_images, 1),
            "postings": int(self.image_ids.shape[0]),
            "bytes": self.nbytes,
            "bytes_per_image": self.bytes_per_image,
            "words_per_image_mean": float(np.mean(self.words_per_image)) if self.n_items else 0.0,
        }

    # ------------------------------------------------------------------ search
    def _as_batch(self, queries: AggregatedBatch | Sequence[AggregatedImage]) -> AggregatedBatch:
        if isinstance(queries, AggregatedImage):
            queries = [queries]
        b = (
            queries
            if isinstance(queries, AggregatedBatch)
            else AggregatedBatch.from_images(list(queries), dim=self.dim)
        )
        if b.binary != self.binary or b.dim != self.dim:
            raise ValueError(
                f"queries ({'binary' if b.binary else 'float'}, D={b.dim}) do not match the "
                f"index ({'binary' if self.binary else 'float'}, D={self.dim})"
            )
        if b.words.size and int(b.words.max()) >= self.codebook_size:
            raise ValueError(
                f"query word {int(b.words.max())} >= codebook size {self.codebook_size}"
            )
        return b

    def scores(
        self, queries: AggregatedBatch | Sequence[AggregatedImage], *, backend: str = "numba"
    ) -> np.ndarray:
        """Similarity of every query to every database image (regions pooled when regional).

        Args:
            queries: aggregated queries (a batch or a list of images) of the index's kind.
            backend: see :meth:`item_scores`.

        Returns:
            float64 (n_queries, n_images); -1 where the query or the image has no words.
        """
        q = self._as_batch(queries)
        items = self.item_scores(q, backend=backend)
        if self.item_image is None:
            return items
        out = self.pool(items)
        out[np.diff(q.offsets) == 0, :] = -1.0  # a query without words
        return out

    def pool(self, items: np.ndarray) -> np.ndarray:
        """Pool item scores per image: max (eq. 3) or mean over items with words (eq. 4).

        Args:
            items: float64 (n_queries, n_items) from :meth:`item_scores`.

        Returns:
            float64 (n_queries, n_images); -1 for images none of whose items has words.
        """
        if self.item_image is None:
            return items
        ii = self.item_image.astype(np.int64)
        starts = np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]]) if ii.size else ii
        has = np.asarray(self.words_per_image) > 0  # items with words
        if self.pooling == "max":
            # Empty items score -1, below any item with words: they win only when alone.
            return np.asarray(np.maximum.reduceat(items, starts, axis=1), np.float64)
        cnt = np.add.reduceat(has.astype(np.float64), starts)
        tot = np.add.reduceat(np.where(has[None, :], items, 0.0), starts, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = tot / cnt[None, :]
        out[:, cnt == 0] = -1.0
        return np.asarray(out, np.float64)

    def item_scores(
        self, queries: AggregatedBatch | Sequence[AggregatedImage], *, backend: str = "numba"
    ) -> np.ndarray:
        """Similarity of every query to every indexed item (before any regional pooling).

        Args:
            queries: aggregated queries of the index's kind.
            backend: ``"numba"`` (default): binary words are scored by the compiled single pass
                of :func:`retrieval.index._kernels.score_binary`; ``"numpy"``: the vectorised
                reference (gathered postings, ``np.bitwise_count``, ``np.bincount``). Both give
                the same numbers, bit for bit. Float words always use the numpy path.

        Returns:
            float64 (n_queries, n_items); -1 where the query or the item has no words.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        q = self._as_batch(queries)
        nq, n = q.n_images, self.n_items
        lanes, qlanes = self._binary_lanes(q)
        if lanes is not None and backend == "numba":
            from retrieval.index._kernels import score_binary

            table, _ = _selectivity_tables(self.dim, self.alpha, self.tau)
            out = np.zeros((nq, n), np.float64)
            score_binary(
                np.asarray(self.offsets, np.int64),
                np.asarray(self.image_ids),
                lanes,
                np.asarray(q.offsets, np.int64),
                np.asarray(q.words),
                qlanes,
                table,
                out,
            )
            return self._normalise(out, q)
        flat = np.zeros(nq * n, np.float64)
        qitem = np.repeat(np.arange(nq, dtype=np.int64), np.diff(q.offsets))
        qw = q.words.astype(np.int64)
        starts = self.offsets[qw]
        lens = self.offsets[qw + 1] - starts
        # Split the query words into chunks of about _GATHER_CHUNK postings.
        cum = np.cumsum(lens)
        bounds = np.searchsorted(
            cum,
            np.arange(_GATHER_CHUNK, int(cum[-1]) if cum.size else 0, _GATHER_CHUNK),
            side="right",
        )
        edges = np.unique(np.r_[0, bounds, qw.size])
        if lanes is not None:
            table, pair_table = _selectivity_tables(self.dim, self.alpha, self.tau)
        image_ids = np.asarray(self.image_ids)  # a plain view of a memmap (slices are faster)
        for a, b in itertools.pairwise(edges):
            ln = lens[a:b]
            tot = int(ln.sum())
            if tot == 0:
                continue
            if lanes is not None:
                # The postings of these words, slice by slice (contiguous in the CSR layout),
                # XOR-ed with their query word; Hamming distances by popcount on the lanes, the
                # selectivity by table look-up. Big temporaries live in per-thread scratch.
                bounds_ab = zip(starts[a:b].tolist(), (starts[a:b] + ln).tolist(), strict=True)
                spans = [(lo, hi) for lo, hi in bounds_ab if hi > lo]
                x = _scratch("lanes", (tot, lanes.shape[1]), lanes.dtype)
                np.concatenate([lanes[lo:hi] for lo, hi in spans], out=x)
                key = _scratch("key", (tot,), np.intp)
                np.concatenate([image_ids[lo:hi] for lo, hi in spans], out=key)
                np.bitwise_xor(x, np.repeat(qlanes[a:b], ln, axis=0), out=x)
                c = np.bitwise_count(x, out=_scratch("count", x.shape, np.uint8))
                s = _scratch("weights", (tot,), np.float64)
                if c.shape[1] == 2:  # D = 128 etc.: both counts at once, as one uint16 index
                    np.take(pair_table, c.view(np.uint16).reshape(-1), out=s, mode="clip")
                else:
                    h = _scratch("distance", (tot,), np.intp)
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
                u = pair_similarity(q.data[rows], self.data[idx], self.dim)
                s = selectivity(u, self.alpha, self.tau)
                key = np.take(image_ids, idx).astype(np.intp)
                if nq > 1:
                    key += np.repeat(qitem[a:b] * n, ln)
            flat += np.bincount(key, weights=s, minlength=nq * n)
        return self._normalise(flat.reshape(nq, n), q)

    def item_norm_words(self) -> np.ndarray:
        """The item side of the normalisation: ``max(|W_item|, rho |W_image|)`` per item.

        Returns:
            float64 (n_items,); ``|W_item|`` itself when ``region_norm_floor`` is 0 (or the index
            is not regional). ``|W_image|`` is the word count of the image's first item.
        """
        dn = self.words_per_image.astype(np.float64)
        if self.item_image is None or self.region_norm_floor == 0.0 or not dn.size:
            return dn
        ii = self.item_image.astype(np.int64)
        first = np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]])  # region 0 of each image
        return np.maximum(dn, self.region_norm_floor * dn[first][ii])

    def _normalise(self, out: np.ndarray, q: AggregatedBatch) -> np.ndarray:
        """Apply the ASMK normalisation to summed scores (in place) and mark empty sides -1."""
        qn = np.diff(q.offsets).astype(np.float64)
        dn = self.words_per_image.astype(np.float64)
        if self.normalize:
            with np.errstate(divide="ignore", invalid="ignore"):
                out /= np.sqrt(qn[:, None] * self.item_norm_words()[None, :])
        out[qn == 0, :] = -1.0
        out[:, dn == 0] = -1.0
        return out

    def _binary_lanes(self, q: AggregatedBatch) -> tuple[np.ndarray | None, np.ndarray]:
        """Binary index: the packed bits of index and queries viewed as the widest unsigned
        lanes (8 to 64 bits) that divide a row (no copy). Float index: ``(None, empty)``."""
        if not self.binary:
            return None, np.zeros(0)
        nbytes = int(self.data.shape[1])
        width = next(w for w in (8, 4, 2, 1) if nbytes % w == 0)
        dt = np.dtype(f"u{width}")
        data = np.ascontiguousarray(self.data)  # a plain view of a memmap (slices are faster)
        qdata = np.ascontiguousarray(q.data, dtype=np.uint8)
        lanes = data.reshape(data.shape[0], nbytes).view(dt)
        qlanes = qdata.reshape(qdata.shape[0], nbytes).view(dt)
        return lanes, qlanes

    def search(
        self,
        queries: AggregatedBatch | Sequence[AggregatedImage],
        k: int | None = None,
        *,
        batch_size: int = 64,
        backend: str = "numba",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database images per query (ties by ascending image id).

        Args:
            queries: aggregated queries.
            k: how many results per query (``None``: rank the whole database).
            batch_size: queries scored together (memory: batch_size * n_images floats).
            backend: scoring backend (see :meth:`item_scores`).

        Returns:
            ``(ids, scores)``: int64 (n_queries, k) and float64 (n_queries, k).
        """
        q = self._as_batch(queries)
        kk = self.n_images if k is None else min(k, self.n_images)
        ids = np.zeros((q.n_images, kk), np.int64)
        scs = np.zeros((q.n_images, kk), np.float64)
        for a in range(0, q.n_images, batch_size):
            b = min(q.n_images, a + batch_size)
            sub = AggregatedBatch(
                offsets=q.offsets[a : b + 1] - q.offsets[a],
                words=q.words[q.offsets[a] : q.offsets[b]],
                data=q.data[q.offsets[a] : q.offsets[b]],
                dim=q.dim,
            )
            s = self.scores(sub, backend=backend)
            top = top_k(s, kk)
            ids[a:b] = top
            scs[a:b] = np.take_along_axis(s, top, axis=1)
        return ids, scs

    def select_images(
        self, keep: npt.ArrayLike, *, meta: Mapping[str, Any] | None = None
    ) -> InvertedFile:
        """A new index holding only the images where ``keep`` is True, renumbered in order.

        Kept postings stay in their order (by word, then ascending id), so the result equals
        :meth:`build` on the kept images' aggregated entries, array for array; regional items
        follow their image. Used to compact a growing index (tombstoned images dropped).

        Args:
            keep: bool (n_images,).
            meta: header metadata of the result (default: this index's).

        Returns:
            an :class:`InvertedFile` over ``keep.sum()`` images (image ``i`` of the result is
            the ``i``-th kept image).
        """
        mask = np.asarray(keep)
        if mask.dtype != np.bool_ or mask.shape != (self.n_images,):
            raise ValueError(
                f"select_images: keep must be bool ({self.n_images},), got {mask.dtype} "
                f"{mask.shape}"
            )
        owner = None if self.item_image is None else np.asarray(self.item_image, np.int64)
        item_keep = mask if owner is None else mask[owner]
        new_item = np.cumsum(item_keep, dtype=np.int64) - 1
        ids = np.asarray(self.image_ids)
        post = item_keep[ids]
        k = self.codebook_size
        words = np.repeat(np.arange(k, dtype=np.int64), np.diff(np.asarray(self.offsets)))
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(np.bincount(words[post], minlength=k), out=offsets[1:])
        item_image = None
        if owner is not None:
            new_image = np.cumsum(mask, dtype=np.int64) - 1
            item_image = new_image[owner[item_keep]].astype(np.uint32)
        return InvertedFile(
            offsets=offsets,
            image_ids=new_item[ids[post]].astype(np.uint32),
            data=np.ascontiguousarray(np.asarray(self.data)[post]),
            words_per_image=np.asarray(self.words_per_image)[item_keep].astype(np.uint32),
            dim=self.dim,
            kernel=self.kernel,
            alpha=self.alpha,
            tau=self.tau,
            normalize=self.normalize,
            meta=dict(self.meta if meta is None else meta),
            item_image=item_image,
            pooling=self.pooling,
            region_norm_floor=self.region_norm_floor,
        )

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, Any]:
        arrays = list(_ARRAYS) + ([] if self.item_image is None else ["item_image"])
        regional = self.item_image is not None
        floor = self.region_norm_floor > 0.0
        return {
            "format": "gldboxes.inverted_file",
            "format_version": (
                FORMAT_VERSION_REGIONAL_FLOOR
                if floor
                else FORMAT_VERSION_REGIONAL
                if regional
                else FORMAT_VERSION
            ),
            "pooling": self.pooling,
            "region_norm_floor": self.region_norm_floor if regional else None,
            "n_items": self.n_items,
            "kernel": self.kernel,
            "dim": self.dim,
            "binary": self.binary,
            "alpha": self.alpha,
            "tau": None if not np.isfinite(self.tau) else self.tau,
            "tau_is_neg_inf": bool(np.isneginf(self.tau)),
            "normalize": self.normalize,
            "n_images": self.n_images,
            "codebook_size": self.codebook_size,
            "arrays": {
                a: {"shape": list(getattr(self, a).shape), "dtype": str(getattr(self, a).dtype)}
                for a in arrays
            },
            "stats": self.stats(),
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index folder atomically (a temp folder renamed onto ``path``)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            for a in self.header()["arrays"]:
                np.save(
                    tmp / f"{a}.npy", np.ascontiguousarray(getattr(self, a)), allow_pickle=False
                )
            write_json(tmp / "header.json", self.header())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> InvertedFile:
        """Open an index folder written by :meth:`save` (memory-mapped by default).

        Raises:
            FileNotFoundError: no such folder / header.
            ValueError: wrong format or version, missing or truncated arrays, or arrays that do
                not match the header.
        """
        path = Path(path)
        hpath = path / "header.json"
        if not hpath.exists():
            raise FileNotFoundError(f"inverted file header not found: {hpath}")
        h = read_json(hpath)
        if not isinstance(h, dict) or h.get("format") != "gldboxes.inverted_file":
            raise ValueError(f"{hpath}: not a gldboxes inverted-file header")
        version = h.get("format_version")
        known = (FORMAT_VERSION, FORMAT_VERSION_REGIONAL, FORMAT_VERSION_REGIONAL_FLOOR)
        if version not in known:
            raise ValueError(
                f"{hpath}: format_version {version!r} is not supported (this gldboxes reads "
                f"versions {', '.join(map(str, known))}); rebuild the index"
            )
        regional = version in (FORMAT_VERSION_REGIONAL, FORMAT_VERSION_REGIONAL_FLOOR)
        names = list(_ARRAYS) + (["item_image"] if regional else [])
        if regional and "item_image" not in h.get("arrays", {}):
            raise ValueError(f"{hpath}: a regional index header without an item_image array")
        # Version 2 predates the floor: its scores were plain ASMK, and so they stay.
        rho = 0.0
        if version == FORMAT_VERSION_REGIONAL_FLOOR:
            rho = float(h.get("region_norm_floor") or 0.0)
        if version == FORMAT_VERSION_REGIONAL_FLOOR and not 0.0 < rho <= 1.0:
            raise ValueError(f"{hpath}: region_norm_floor {rho} must be in (0, 1] in version 3")
        arrays: dict[str, np.ndarray] = {}
        for a in names:
            f = path / f"{a}.npy"
            if not f.exists():
                raise ValueError(f"{path}: array file {f.name} is missing")
            try:
                arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise ValueError(f"{f}: unreadable or truncated array ({exc})") from exc
            want = h["arrays"][a]
            if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise ValueError(
                    f"{f}: shape {arr.shape} dtype {arr.dtype} does not match the header "
                    f"({want['shape']} {want['dtype']}); the file is damaged or from another index"
                )
            arrays[a] = arr
        off = arrays["offsets"]
        if off.shape[0] < 1 or int(off[-1]) != arrays["image_ids"].shape[0]:
            raise ValueError(f"{path}: offsets do not match the number of postings")
        tau = -np.inf if h.get("tau_is_neg_inf") else float(h["tau"])
        item_image = arrays.pop("item_image", None)
        return cls(
            **arrays,
            item_image=item_image,
            pooling=h.get("pooling") if item_image is not None else None,
            region_norm_floor=rho,
            dim=int(h["dim"]),
            kernel=str(h["kernel"]),
            alpha=float(h["alpha"]),
            tau=tau,
            normalize=bool(h["normalize"]),
            meta=dict(h.get("meta") or {}),
        )
