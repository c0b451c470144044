"""Inverted file for ASMK-family kernels: CSR posting lists, vectorised scoring, top-k, npy files.

Layout (``K`` visual words, ``N`` postings, ``n`` images)::

    offsets          int64  (K + 1,)     word w owns postings offsets[w]:offsets[w+1]
    id_offsets       int64  (K + 1,)     word w owns bytes id_offsets[w]:id_offsets[w+1] of
                                         id_stream, ``width = bytes / postings`` a posting
    id_stream        uint8  (B,)         the item ids of each word's postings (ascending),
                                         delta-encoded: the first id, then the gap to the
                                         previous one, little-endian in the narrowest width
                                         (1, 2 or 4 bytes) holding the word's largest gap
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

The numpy scoring (float words, ``backend="numpy"``) is :mod:`retrieval.index.scoring`; search
(:meth:`InvertedFile.search`) is :mod:`retrieval.index.search` (top-k, the compiled binary
search, threads, selectivity tables). Posting ids are delta-encoded
(:mod:`retrieval.index.postings`); :attr:`InvertedFile.image_ids` decodes them and the
constructor accepts them either way. On disk (format versions, header, save, load, no pickle):
:mod:`retrieval.index.index_io`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.index.aggregation import (
    AggregatedBatch,
    AggregatedImage,
    check_packed_bits,
)
from retrieval.index.index_io import ARRAYS as _ARRAYS
from retrieval.index.index_io import (
    FORMAT_VERSION,
    FORMAT_VERSION_REGIONAL,
    FORMAT_VERSION_REGIONAL_FLOOR,
    OLD_FORMAT_VERSIONS,
    index_header,
    load_index,
    save_index,
)
from retrieval.index.kernels import get as get_kernel
from retrieval.index.postings import check_id_encoding, decode_posting_ids, encode_posting_ids
from retrieval.index.scoring import gather_scores
from retrieval.index.search import binary_lanes, default_num_threads, search_index, top_k
from retrieval.index.search import selectivity_tables as _selectivity_tables

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_REGIONAL",
    "FORMAT_VERSION_REGIONAL_FLOOR",
    "OLD_FORMAT_VERSIONS",
    "POOLINGS",
    "REGION_NORM_FLOOR",
    "InvertedFile",
    "check_id_encoding",
    "decode_posting_ids",
    "default_num_threads",
    "encode_posting_ids",
    "top_k",
]

logger = logging.getLogger("retrieval.index.inverted_file")

#: Default ``rho`` of :meth:`InvertedFile.build` for regional indexes (see the module docstring).
REGION_NORM_FLOOR = 0.1
POOLINGS = ("max", "avg")
#: Scoring backends of :meth:`InvertedFile.item_scores`.
BACKENDS = ("numba", "numpy")
# Postings gathered per step of the numpy scoring (scoring.gather_scores; bounds the temporary
# memory to ~100 MB at D=128 float).
_GATHER_CHUNK = 1 << 20
# The largest per-thread scratch buffer of the numpy binary scoring (scoring._scratch) keeps.
_SCRATCH_KEEP = 1 << 25


@dataclass(frozen=True, eq=False, init=False)
class InvertedFile:
    """An inverted file over a database of aggregated images (see the module docstring).

    Constructed from absolute posting ids (``image_ids``, encoded on construction) or from
    their encoding (``id_offsets`` and ``id_stream``, as :meth:`load` and
    ``dataclasses.replace`` do), every other argument by keyword.

    Attributes:
        offsets, id_offsets, id_stream, data, words_per_image: the CSR arrays (over items: the
            images, or the regions for regional search; the ids are item ids);
            :attr:`image_ids` decodes the ids.
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
    id_offsets: np.ndarray
    id_stream: np.ndarray
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

    def __init__(
        self,
        offsets: np.ndarray,
        image_ids: np.ndarray | None = None,
        data: np.ndarray | None = None,
        words_per_image: np.ndarray | None = None,
        dim: int = 0,
        kernel: str = "",
        alpha: float = 3.0,
        tau: float = 0.0,
        normalize: bool = True,
        meta: dict[str, Any] | None = None,
        item_image: np.ndarray | None = None,
        pooling: str | None = None,
        region_norm_floor: float = 0.0,
        *,
        id_offsets: np.ndarray | None = None,
        id_stream: np.ndarray | None = None,
    ) -> None:
        """See the class docstring: ``image_ids`` uint (N,) or ``id_offsets`` + ``id_stream``."""
        if data is None or words_per_image is None:
            raise ValueError("InvertedFile: data and words_per_image are required")
        offs = np.asarray(offsets)
        if offs.ndim != 1 or offs.shape[0] < 1 or not np.issubdtype(offs.dtype, np.integer):
            raise ValueError(f"InvertedFile: offsets must be int (K + 1,), got {offs.shape}")
        if image_ids is not None:
            if id_offsets is not None or id_stream is not None:
                raise ValueError("InvertedFile: give image_ids or id_offsets + id_stream, not both")
            id_offsets, id_stream = encode_posting_ids(offs, image_ids)
        elif id_offsets is None or id_stream is None:
            raise ValueError("InvertedFile: image_ids (or id_offsets + id_stream) are required")
        else:
            check_id_encoding(offs, id_offsets, id_stream)
        for name, value in (
            ("offsets", offs),
            ("id_offsets", id_offsets),
            ("id_stream", id_stream),
            ("data", data),
            ("words_per_image", words_per_image),
            ("dim", dim),
            ("kernel", kernel),
            ("alpha", alpha),
            ("tau", tau),
            ("normalize", normalize),
            ("meta", {} if meta is None else meta),
            ("item_image", item_image),
            ("pooling", pooling),
            ("region_norm_floor", region_norm_floor),
        ):
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        dim = self.dim
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"InvertedFile: dim must be an integer >= 1, got {dim!r}")
        object.__setattr__(self, "dim", int(dim))
        if np.ndim(self.data) != 2 or np.shape(self.data)[0] != self.n_postings:
            raise ValueError(
                f"InvertedFile: data must be (n_postings, width) with n_postings="
                f"{self.n_postings}, got shape {np.shape(self.data)}"
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
    def n_postings(self) -> int:
        """Postings N (one per (item, word) pair)."""
        return int(self.offsets[-1])

    @property
    def image_ids(self) -> np.ndarray:
        """uint32 (N,) the item id of every posting, decoded (a new array on each access)."""
        from retrieval.index._kernels import decode_ids

        out = np.empty(self.n_postings, np.uint32)
        decode_ids(
            np.asarray(self.offsets, np.int64),
            np.asarray(self.id_offsets, np.int64),
            np.asarray(self.id_stream),
            out,
        )
        return out

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
            "postings": self.n_postings,
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
        lanes, qlanes = binary_lanes(self, q)
        if lanes is not None and backend == "numba":
            from retrieval.index._kernels import score_binary

            table, _ = _selectivity_tables(self.dim, self.alpha, self.tau)
            out = np.zeros((nq, n), np.float64)
            score_binary(
                np.asarray(self.offsets, np.int64),
                np.asarray(self.id_offsets, np.int64),
                np.asarray(self.id_stream),
                lanes,
                np.asarray(q.offsets, np.int64),
                np.asarray(q.words),
                qlanes,
                table,
                out,
            )
            return self._normalise(out, q)
        # The numpy reference; the knobs are read here so tests can shrink them.
        flat = gather_scores(
            self, q, lanes, qlanes, chunk=_GATHER_CHUNK, scratch_keep=_SCRATCH_KEEP
        )
        return self._normalise(flat, q)

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

    def search(
        self,
        queries: AggregatedBatch | Sequence[AggregatedImage],
        k: int | None = None,
        *,
        batch_size: int = 64,
        backend: str = "numba",
        num_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database images per query (ties by ascending image id).

        Binary, non-regional indexes with ``backend="numba"`` score only the images sharing a
        word with the query and never sort all n (see the module docstring); the others score
        every image (:meth:`scores`) and rank with :func:`top_k`. Both give the ranking of
        :func:`top_k` on :meth:`scores`, id for id and score for score.

        Args:
            queries: aggregated queries.
            k: how many results per query (``None``: rank the whole database).
            batch_size: most queries a thread scores in one call (the dense path holds
                batch_size * n_images floats a thread).
            backend: scoring backend (see :meth:`item_scores`).
            num_threads: threads running chunks of queries in parallel (None: every core this
                process may use). The results do not depend on it.

        Returns:
            ``(ids, scores)``: int64 (n_queries, k) and float64 (n_queries, k).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        threads = default_num_threads() if num_threads is None else num_threads
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        q = self._as_batch(queries)
        return search_index(self, q, k, batch_size=batch_size, backend=backend, threads=threads)

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
        """The JSON header of the index folder (:func:`retrieval.index.index_io.index_header`)."""
        return index_header(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index folder atomically (a temp folder renamed onto ``path``)."""
        return save_index(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> InvertedFile:
        """Open an index folder written by :meth:`save` (memory-mapped by default).

        Raises:
            FileNotFoundError: no such folder / header.
            ValueError: wrong format or version, missing or truncated arrays, or arrays that do
                not match the header.
        """
        return load_index(cls, path, mmap=mmap)
