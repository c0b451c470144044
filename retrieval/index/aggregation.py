"""Aggregation kernels (VLAD, ASMK, ASMK* and their regional forms) and their similarity.

An image is aggregated into a set of visual words, each carrying one vector:

* ``vlad``: per-word residual sums ``sum(x - c)``; the whole K*D vector is L2-normalised, so the
  similarity of two images (``alpha=1, tau=-inf, normalize=False``) is the VLAD cosine.
* ``asmk``: per-word residual sums, each L2-normalised (float32 (n_words, D)).
* ``asmk_star``: the sign bits ``residual > 0`` packed MSB-first (uint8 (n_words, ceil(D/8)),
  the last byte zero-padded when D is not a multiple of 8: any D >= 1 works, see
  :func:`pack_signs`).
* ``r_vlad`` / ``r_asmk`` / ``r_asmk_star`` (regional, Teichmann et al. CVPR 2019): each region
  (``regions[0]`` is the whole image) is VLAD-aggregated and L2-normalised as a whole; the region
  vectors are averaged; then ``r_vlad`` L2-normalises the whole vector, ``r_asmk`` each word and
  ``r_asmk_star`` keeps the sign bits.
* ``naive_r_asmk`` / ``naive_r_asmk_star`` (the paper's Naive-R-ASMK baseline): regions
  ASMK-aggregated instead (see :mod:`retrieval.index.regional`, which computes the regional
  forms).

Words whose aggregated residual has a norm below :data:`ZERO_NORM` are dropped (they carry no
direction). The similarity (:func:`similarity`) sums the selectivity
``sigma(u) = sign(u)|u|^alpha if u > tau else 0`` over the shared words, where ``u`` is the dot
product of the two words' vectors, or ``1 - 2h/D`` for binary words with Hamming distance ``h``
(over the D true bits: the zero padding of the last byte agrees on both sides and adds nothing
to ``h``, and ``D`` is the descriptor dimension, never the padded ``8 ceil(D/8)``);
with ``normalize=True`` the sum is divided by ``sqrt(|W_a| |W_b|)`` (the ASMK normalisation of
images whose words have unit self-similarity). An image without words scores -1 against anything.

Everything is vectorised: :func:`aggregate_many` assigns a chunk of images' descriptors at once
(exact GEMM or approximate HNSW, :mod:`retrieval.index.assignment`) and reduces them with one
sort and a compiled segment sum, chunks on parallel threads (same bits for any thread count).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.index.assignment import (
    ASSIGNMENTS,
    WordIndex,
    assign,
    check_codebook,
    n_threads,
    resolve_assignment,
)
from retrieval.index.kernels import Kernel
from retrieval.index.kernels import get as get_kernel
from retrieval.index.kernels import kernels as KERNEL_REGISTRY

__all__ = [
    "ASSIGNMENTS",
    "BACKENDS",
    "BINARY_KERNELS",
    "KERNELS",
    "KERNEL_SIMILARITY",
    "QUERY_KERNEL",
    "REGIONAL_KERNELS",
    "ZERO_NORM",
    "AggregatedBatch",
    "AggregatedImage",
    "WordIndex",
    "aggregate",
    "aggregate_many",
    "assign",
    "check_packed_bits",
    "drop_zero_words",
    "pack_signs",
    "packed_width",
    "pair_similarity",
    "residual_sums",
    "selectivity",
    "similarity",
    "sum_sorted_segments",
    "to_batch",
    "vlad_normalise",
    "word_data",
]

logger = logging.getLogger("retrieval.index.aggregation")

# Views of the kernel registry (retrieval.index.kernels), the one place kernels are defined.
KERNELS: tuple[str, ...] = tuple(KERNEL_REGISTRY)
REGIONAL_KERNELS: frozenset[str] = frozenset(k.name for k in KERNEL_REGISTRY.values() if k.regional)
BINARY_KERNELS: frozenset[str] = frozenset(k.name for k in KERNEL_REGISTRY.values() if k.binary)
#: The single-image kernel a regional database kernel's queries use (queries stay one region;
#: each regional kernel with one region equals it).
QUERY_KERNEL: dict[str, str] = {k.name: k.query for k in KERNEL_REGISTRY.values()}
#: Default similarity parameters of each kernel (alpha, tau, normalize).
KERNEL_SIMILARITY: dict[str, dict[str, Any]] = {
    k.name: k.similarity for k in KERNEL_REGISTRY.values()
}

#: Aggregated residuals with an L2 norm at or below this are dropped (descriptor units).
ZERO_NORM = 1e-6

#: Backends of the compiled inner loops (``"numba"``) and of their numpy references.
BACKENDS: tuple[str, ...] = ("numba", "numpy")

# Descriptors per chunk of aggregate_many (16 MB of float32 at D=128; glibc reuses blocks of up
# to 32 MB instead of returning them to the OS, and fresh pages cost ~10 us each on a VM).
_ASSIGN_CHUNK = 32768


def packed_width(dim: int) -> int:
    """Bytes of one binary word of dimension ``dim``: ``ceil(dim / 8)`` (MSB-first, the last
    byte zero-padded), the width :func:`pack_signs` and ``np.packbits`` give."""
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"descriptor dimension must be an integer >= 1, got {dim!r}")
    return (int(dim) + 7) // 8


def check_packed_bits(data: np.ndarray, dim: int, what: str = "packed bits") -> None:
    """Check packed sign bits against their dimension D.

    Args:
        data: uint8 (M, ceil(D/8)) sign bits packed MSB-first.
        dim: the descriptor dimension D >= 1.
        what: the name of the checked object, for the error message.

    Raises:
        ValueError: a row is not ``ceil(D/8)`` bytes wide, or one of the ``8 ceil(D/8) - D``
            padding bits of the last byte is set (padding must agree between any two words,
            or the Hamming distance would count bits beyond D).
    """
    width = packed_width(dim)
    if data.shape[1] != width:
        raise ValueError(
            f"{what}: packed bits of D={dim} need {width} bytes a row, got {data.shape[1]}"
        )
    pad = 8 * width - dim
    if pad and data.shape[0] and np.any(data[:, -1] & np.uint8((1 << pad) - 1)):
        raise ValueError(
            f"{what}: the {pad} padding bits after bit D={dim} must be zero "
            "(pack with np.packbits(residuals > 0, axis=1, bitorder='big'))"
        )


@dataclass(frozen=True, eq=False)
class AggregatedImage:
    """One aggregated image: its visual words and one vector per word.

    Attributes:
        words: sorted, unique visual-word ids, uint32 (n_words,).
        data: float32 (n_words, D) residual vectors, or uint8 (n_words, ceil(D/8)) sign bits
            packed MSB-first, the last byte zero-padded (binary kernels).
        dim: descriptor dimension D (keyword). ``0`` (default) infers it from ``data``: its
            width for float data, 8 bits a byte for binary data (exact only when D is a multiple
            of 8: give ``dim`` otherwise).

    Construct it from the two arrays (``AggregatedImage(words, data)`` or
    ``AggregatedImage(words, bits, dim=13)``); they are checked and converted (C-contiguous
    uint32 / float32 or uint8).
    """

    words: np.ndarray
    data: np.ndarray
    dim: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        words = np.ascontiguousarray(self.words)
        data = np.ascontiguousarray(self.data)
        if words.ndim != 1:
            raise ValueError(f"AggregatedImage words must be 1-D, got shape {words.shape}")
        if words.size and not np.issubdtype(words.dtype, np.integer):
            raise ValueError(f"AggregatedImage words must be integer ids, got {words.dtype}")
        if words.size and (words.min() < 0 or words.max() > np.iinfo(np.uint32).max):
            raise ValueError("AggregatedImage words must be in [0, 2**32)")
        if data.ndim != 2 or data.shape[0] != words.shape[0]:
            raise ValueError(
                f"AggregatedImage data must be (n_words, D) with n_words={words.shape[0]}, "
                f"got shape {data.shape}"
            )
        if data.dtype == np.uint8:
            pass
        elif np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float32, copy=False)
        else:
            raise ValueError(
                f"AggregatedImage data must be float (residuals) or uint8 (packed bits), "
                f"got {data.dtype}"
            )
        words = words.astype(np.uint32, copy=False)
        if words.size > 1 and np.any(words[1:] <= words[:-1]):
            raise ValueError("AggregatedImage words must be sorted and unique")
        binary = data.dtype == np.uint8
        dim = self.dim
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise ValueError(f"AggregatedImage dim must be an integer >= 0, got {dim!r}")
        if dim == 0:
            dim = data.shape[1] * (8 if binary else 1)
            if dim == 0:
                raise ValueError("AggregatedImage data has zero width: give (n_words, D>=1)")
        elif binary:
            check_packed_bits(data, int(dim), "AggregatedImage")
        elif data.shape[1] != dim:
            raise ValueError(f"AggregatedImage data must be (n_words, {dim}), got {data.shape}")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "dim", int(dim))

    @property
    def binary(self) -> bool:
        """True for packed sign bits (ASMK*), False for float residuals."""
        return bool(self.data.dtype == np.uint8)

    @property
    def n_words(self) -> int:
        return int(self.words.shape[0])

    def __len__(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        kind = "binary" if self.binary else "float"
        return f"AggregatedImage(n_words={self.n_words}, dim={self.dim}, {kind})"


@dataclass(frozen=True, eq=False)
class AggregatedBatch:
    """Many aggregated images in CSR form (the input of the inverted file).

    Attributes:
        offsets: int64 (n_images + 1,); image ``i`` owns rows ``offsets[i]:offsets[i+1]``.
        words: uint32 (n_rows,), sorted and unique within each image.
        data: float32 (n_rows, D) or uint8 (n_rows, ceil(D/8)) (the last byte zero-padded).
        dim: descriptor dimension D >= 1 (the true D, also for binary data).

    The shapes are checked on construction (and, when D is not a multiple of 8, that the
    padding bits of binary data are zero).
    """

    offsets: np.ndarray
    words: np.ndarray
    data: np.ndarray
    dim: int

    def __post_init__(self) -> None:
        packed_width(self.dim)  # raises unless an integer >= 1
        object.__setattr__(self, "dim", int(self.dim))
        if np.ndim(self.offsets) != 1 or np.shape(self.offsets)[0] < 1:
            raise ValueError(
                f"AggregatedBatch offsets must be (n_images + 1,), got {np.shape(self.offsets)}"
            )
        if np.ndim(self.data) != 2 or np.shape(self.data)[0] != np.shape(self.words)[0]:
            raise ValueError(
                f"AggregatedBatch data must be (n_rows, width) with n_rows="
                f"{np.shape(self.words)[0]}, got shape {np.shape(self.data)}"
            )
        if self.binary:
            check_packed_bits(self.data, self.dim, "AggregatedBatch")
        elif self.data.shape[1] != self.dim:
            raise ValueError(
                f"AggregatedBatch data must be (n_rows, {self.dim}), got {self.data.shape}"
            )

    @property
    def n_images(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def binary(self) -> bool:
        return bool(self.data.dtype == np.uint8)

    def __len__(self) -> int:
        return self.n_images

    def image(self, i: int) -> AggregatedImage:
        """The ``i``-th image as an :class:`AggregatedImage` (views, no copy)."""
        if not 0 <= i < self.n_images:
            raise ValueError(f"image index {i} outside [0, {self.n_images})")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return AggregatedImage(self.words[a:b], self.data[a:b], dim=self.dim)

    def images(self) -> list[AggregatedImage]:
        return [self.image(i) for i in range(self.n_images)]

    @classmethod
    def concatenate(cls, batches: Sequence[AggregatedBatch]) -> AggregatedBatch:
        """Join batches (same kind and dimension) one after the other."""
        if not batches:
            raise ValueError("concatenate: no batches given")
        if len({(b.dim, b.binary) for b in batches}) > 1:
            raise ValueError("concatenate: batches mix dimensions or binary/float data")
        counts = np.concatenate([np.diff(b.offsets) for b in batches])
        offsets = np.zeros(counts.size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(
            offsets=offsets,
            words=np.concatenate([b.words for b in batches]),
            data=np.concatenate([b.data for b in batches]),
            dim=batches[0].dim,
        )

    @classmethod
    def from_images(
        cls, images: Sequence[AggregatedImage], dim: int | None = None
    ) -> AggregatedBatch:
        """Stack aggregated images (all binary or all float, one dimension) into a batch."""
        if not images and dim is None:
            raise ValueError("from_images: give dim when the list of images is empty")
        dims = {im.dim for im in images}
        kinds = {im.binary for im in images}
        if len(dims) > 1 or len(kinds) > 1:
            raise ValueError(f"from_images: images mix dimensions {dims} or binary/float data")
        d = dim if dim is not None else dims.pop()
        if images and images[0].dim != d:
            raise ValueError(f"from_images: dim={d} but the images have D={images[0].dim}")
        binary = kinds.pop() if images else False
        counts = np.array([im.n_words for im in images], dtype=np.int64)
        offsets = np.zeros(len(images) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        width = packed_width(d) if binary else d
        dt = np.uint8 if binary else np.float32
        words = np.concatenate([im.words for im in images]) if images else np.zeros(0, np.uint32)
        data = np.concatenate([im.data for im in images]) if images else np.zeros((0, width), dt)
        return cls(
            offsets=offsets,
            words=words.astype(np.uint32, copy=False),
            data=data.reshape(-1, width),
            dim=d,
        )


def selectivity(u: npt.ArrayLike, alpha: float = 3.0, tau: float = 0.0) -> np.ndarray:
    """The ASMK selectivity ``sigma(u) = sign(u)|u|^alpha`` where ``u > tau``, else 0.

    Args:
        u: word similarities, any shape, in [-1, 1] for normalised words.
        alpha: the exponent (3 in ASMK).
        tau: the threshold (0 in ASMK; ``-inf`` keeps every word).

    Returns:
        float64 array of the same shape.
    """
    u = np.asarray(u, dtype=np.float64)
    out = np.sign(u) * np.abs(u) ** alpha if alpha != 1.0 else u.copy()
    out[~(u > tau)] = 0.0
    return out


def pair_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """Row-wise word similarity ``u`` of two aligned word-vector arrays.

    Args:
        a, b: float32 (M, D) residuals (dot product) or uint8 (M, ceil(D/8)) packed bits
            (``1 - 2 h / D`` with ``h`` the Hamming distance; the zero padding bits of the last
            byte agree on both sides, so ``h`` counts the D true bits only).
        dim: descriptor dimension D (the true D, not the padded ``8 ceil(D/8)``).

    Returns:
        float64 (M,).
    """
    if a.dtype == np.uint8:
        x = np.bitwise_xor(a, b)
        if x.shape[1] % 8 == 0 and x.flags.c_contiguous:
            x = x.view(np.uint64)
        h = np.bitwise_count(x).sum(axis=1, dtype=np.int64)
        return 1.0 - 2.0 * h.astype(np.float64) / dim
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


def similarity(
    a: AggregatedImage,
    b: AggregatedImage,
    *,
    alpha: float = 3.0,
    tau: float = 0.0,
    normalize: bool = True,
) -> float:
    """Kernel similarity of two aggregated images.

    ``sum over shared words w of selectivity(u_w, alpha, tau)``, divided by
    ``sqrt(|W_a| |W_b|)`` when ``normalize``. An image with no words scores -1. The sum runs
    sequentially in ascending word order in float64, exactly as
    :class:`retrieval.index.inverted_file.InvertedFile` accumulates, so both give identical numbers.
    """
    if a.binary != b.binary:
        raise ValueError("similarity: one image has binary words, the other float words")
    if a.dim != b.dim:
        raise ValueError(f"similarity: dimensions differ ({a.dim} vs {b.dim})")
    if a.n_words == 0 or b.n_words == 0:
        return -1.0
    _, ia, ib = np.intersect1d(a.words, b.words, assume_unique=True, return_indices=True)
    s = selectivity(pair_similarity(a.data[ia], b.data[ib], a.dim), alpha, tau)
    # np.bincount adds weights one by one in order: the same rounding as the inverted file.
    total = float(np.bincount(np.zeros(s.size, np.intp), weights=s, minlength=1)[0])
    if normalize:
        total /= float(np.sqrt(float(a.n_words) * float(b.n_words)))
    return total


def pack_signs(residuals: np.ndarray) -> np.ndarray:
    """Binarise residuals (``> 0``) and pack the bits MSB-first.

    Args:
        residuals: float (M, D), any D >= 1.

    Returns:
        uint8 (M, ceil(D/8)): ``np.packbits(residuals > 0, axis=1, bitorder="big")``, bit ``j``
        of a row in byte ``j // 8`` at bit ``7 - j % 8``; the ``8 ceil(D/8) - D`` bits after
        the last one are zero.
    """
    if np.ndim(residuals) != 2 or np.shape(residuals)[1] < 1:
        raise ValueError(f"pack_signs: residuals must be (M, D) with D >= 1, got {residuals.shape}")
    return np.packbits(residuals > 0, axis=1, bitorder="big")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def residual_sums(
    x: np.ndarray, item: np.ndarray, ids: np.ndarray, cb: np.ndarray, backend: str = "numba"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (item, word) residual sums, sorted by item then word.

    Args:
        x: float32 (N, D) descriptors; item: int64 (N,) non-decreasing item index of each row;
        ids: int64 (N, m) the words of each row (:func:`assign`).

    Returns:
        ``(items, words, sums)``: int64 (M,), int64 (M,), float32 (M, D).
    """
    k = cb.shape[0]
    if x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, cb.shape[1]), np.float32)
    w = ids.ravel()
    rows = np.repeat(np.arange(x.shape[0]), ids.shape[1])
    key = item[rows] * k + w
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    first = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    if backend == "numba":
        from retrieval.index._kernels import segment_residual_sums

        sums = segment_residual_sums(x, rows, w, order, first, cb)
    else:
        sums = sum_sorted_segments(x[rows] - cb[w], order, first)
    uk = key_s[first]
    return uk // k, uk % k, sums.astype(np.float32, copy=False)


def sum_sorted_segments(rows: np.ndarray, order: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Sum rows (M, D) per segment: segment j holds rows ``order[first[j]:first[j+1]]``.

    A sparse (n_segments, M) 0/1 matrix times the rows: one pass over the data in C, ~15x
    faster than ``np.add.reduceat`` on 2-D rows. Returns float32 (n_segments, D).
    """
    import scipy.sparse as sp

    if first.size == 0:
        return np.zeros((0, rows.shape[1]), np.float32)
    indptr = np.r_[first, order.size].astype(np.int64)
    ones = np.ones(order.size, np.float32)
    mat = sp.csr_matrix((ones, order, indptr), shape=(first.size, rows.shape[0]))
    return np.asarray(mat @ rows, dtype=np.float32)


def _segment_sum(values: np.ndarray, segment: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``values`` (M,) per segment id (M,) into (n,) float64."""
    return np.bincount(segment, weights=values.astype(np.float64), minlength=n)


def drop_zero_words(
    items: np.ndarray, words: np.ndarray, sums: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop the (item, word) rows whose residual sum has a norm of at most ``ZERO_NORM``.

    Args:
        items, words: int (M,) the item and the word of each row.
        sums: float32 (M, D) residual sums.

    Returns:
        ``(items, words, sums, norms)`` of the rows kept; ``norms`` float64 (M',).
    """
    # float64 products cast chunk by chunk inside einsum (no (M, D) float64 copies: 25x faster)
    norms = np.sqrt(np.einsum("ij,ij->i", sums, sums, dtype=np.float64))
    keep = norms > ZERO_NORM
    return items[keep], words[keep], sums[keep], norms[keep]


def vlad_normalise(items: np.ndarray, sums: np.ndarray, norms: np.ndarray, n: int) -> np.ndarray:
    """Divide each item's residuals by the L2 norm of its whole K*D vector."""
    tot = np.sqrt(_segment_sum(norms**2, items, n))
    return (sums / tot[items][:, None]).astype(np.float32)


def to_batch(
    items: np.ndarray, words: np.ndarray, data: np.ndarray, n: int, dim: int
) -> AggregatedBatch:
    """An :class:`AggregatedBatch` of ``n`` items from rows sorted by item: ``items`` int (M,),
    ``words`` int (M,), ``data`` (M, ...) the stored word vectors, ``dim`` the descriptor D."""
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(items, minlength=n), out=offsets[1:])
    return AggregatedBatch(offsets=offsets, words=words.astype(np.uint32), data=data, dim=dim)


def _sizes(descs: Sequence[np.ndarray], dim: int, what: str) -> np.ndarray:
    """Rows of each descriptor array, int64 (n,), after checking every shape."""
    counts = np.zeros(len(descs), np.int64)
    for i, d in enumerate(descs):
        shape = np.shape(d)
        if len(shape) != 2 or (shape[0] and shape[1] != dim):
            raise ValueError(f"{what} {i}: descriptors must be (N, {dim}), got shape {shape}")
        counts[i] = shape[0]
    return counts


def _stack(descs: Sequence[np.ndarray], dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-image descriptor arrays; return (X (N, D), item index (N,))."""
    cnt = _sizes(descs, dim, what)
    if cnt.sum() == 0:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    x = np.concatenate([np.asarray(d).reshape(-1, dim) for d in descs], dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: descriptors hold NaN or infinite values")
    return x, np.repeat(np.arange(len(descs), dtype=np.int64), cnt)


def _chunks(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split images into consecutive runs of at most ``budget`` descriptors (an image larger
    than the budget is a run of its own); every image in exactly one run."""
    out: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, c in enumerate(sizes.tolist()):
        if i > start and acc + c > budget:
            out.append((start, i))
            start, acc = i, 0
        acc += c
    if start < sizes.shape[0]:
        out.append((start, int(sizes.shape[0])))
    return out


def aggregate_many(
    descriptors: Sequence[np.ndarray],
    codebook: np.ndarray,
    kernel: str,
    *,
    regions: Sequence[Sequence[np.ndarray]] | None = None,
    num_assignments: int = 1,
    backend: str = "numba",
    assignment: str | WordIndex = "exact",
    threads: int | None = None,
) -> AggregatedBatch:
    """Aggregate a batch of images at once (vectorised over all their descriptors).

    The images are cut into chunks of whole images of ~``_ASSIGN_CHUNK`` descriptors, assigned
    one after the other and reduced on parallel threads; the chunks do not depend on
    ``threads`` and each is computed the same way on any thread, so the result is the same, bit
    for bit, for every thread count.

    Args:
        descriptors: per image, float32 (N_i, D) local descriptors (N_i may be 0).
        codebook: float32 (K, D) visual words.
        kernel: one of :data:`KERNELS`.
        regions: regional kernels only: per image, a list of per-region descriptor arrays with
            region 0 the whole image; ``None`` uses ``[descriptors[i]]`` (one region).
        num_assignments: visual words per descriptor.
        backend: ``"numba"`` (compiled argmin and residual sums) or ``"numpy"`` (the
            vectorised reference); the results are identical.
        assignment: ``"exact"`` (nearest word by GEMM, the default), ``"hnsw"`` (approximate:
            faiss HNSW over the centroids, built once per process) or a
            :class:`~retrieval.index.assignment.WordIndex` of this codebook (e.g. the cached one
            of :func:`retrieval.features.codebook.load_word_index`).
        threads: threads at work (``None``: every core this process may use): this one
            assigns the chunks' descriptors (BLAS / faiss with their own thread pools), the
            ``threads - 1`` others reduce the assigned chunks into words meanwhile.

    Returns:
        an :class:`AggregatedBatch` with one entry per image.
    """
    _check_backend(backend)
    kern = get_kernel(kernel)
    cb = check_codebook(codebook)
    words_index = resolve_assignment(assignment, cb)
    workers = n_threads(threads)
    dim = cb.shape[1]
    n = len(descriptors)
    if not kern.regional:
        if regions is not None:
            raise ValueError(
                f"kernel {kernel} is not regional; pass regions only with "
                f"{sorted(REGIONAL_KERNELS)}"
            )
        sizes = _sizes(descriptors, dim, "image")
    else:
        if regions is None:
            regions = [[d] for d in descriptors]
        if len(regions) != n:
            raise ValueError(f"regions has {len(regions)} entries for {n} images")
        if any(len(r) < 1 for r in regions):
            raise ValueError("every image needs at least one region (region 0 = whole image)")
        n_reg = np.array([len(r) for r in regions], np.int64)
        flat_sizes = _sizes([r for regs in regions for r in regs], dim, "region")
        sizes = np.add.reduceat(flat_sizes, np.r_[0, np.cumsum(n_reg)[:-1]]) if n else n_reg
    from retrieval.index.regional import aggregate_regions_chunk

    def stack(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """X (N, D), item (N,) (images, or their regions) and words (N, m) of images a..b-1."""
        if regions is not None:
            x, item = _stack([r for regs in regions[a:b] for r in regs], dim, "region")
        else:
            try:
                x, item = _stack(descriptors[a:b], dim, "image")
            except ValueError as exc:
                raise ValueError(f"{exc} (images {a}..{b - 1})") from None
        return x, item, assign(x, cb, num_assignments, assignment=words_index or "exact")

    def reduce(a: int, b: int, x: np.ndarray, item: np.ndarray, ids: np.ndarray) -> AggregatedBatch:
        if regions is None:
            return _aggregate_images(x, item, ids, b - a, cb, kern, backend)
        n_reg = np.array([len(r) for r in regions[a:b]], np.int64)
        return aggregate_regions_chunk(n_reg, x, item, ids, cb, kern, backend)

    # Chunks of whole images of ~_ASSIGN_CHUNK descriptors: every temporary stays small (and is
    # recycled by the allocator instead of paged in afresh), whatever the batch size. This
    # thread assigns chunk after chunk (BLAS / faiss use their own threads); `helpers` threads
    # reduce the assigned chunks meanwhile (at most 2 a helper in flight).
    chunks = _chunks(sizes, _ASSIGN_CHUNK)
    helpers = min(workers - 1, len(chunks) - 1)
    if helpers < 1:
        parts = [reduce(a, b, *stack(a, b)) for a, b in chunks]
    else:
        with ThreadPoolExecutor(helpers, thread_name_prefix="aggregate") as pool:
            pending: list[Future[AggregatedBatch]] = []
            for i, (a, b) in enumerate(chunks):
                pending.append(pool.submit(reduce, a, b, *stack(a, b)))
                if i >= 2 * helpers:
                    pending[i - 2 * helpers].result()
            parts = [f.result() for f in pending]
    if not parts:
        width = packed_width(dim) if kern.binary else dim
        dt = np.uint8 if kern.binary else np.float32
        return to_batch(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, width), dt), 0, dim)
    return parts[0] if len(parts) == 1 else AggregatedBatch.concatenate(parts)


def _aggregate_images(
    x: np.ndarray,
    item: np.ndarray,
    ids: np.ndarray,
    n: int,
    cb: np.ndarray,
    kernel: Kernel,
    backend: str,
) -> AggregatedBatch:
    """:func:`aggregate_many` of a non-regional kernel on one chunk of ``n`` images, from their
    stacked descriptors x (N, D), image of each row item (N,) and words ids (N, m)."""
    dim = cb.shape[1]
    items, words, sums = residual_sums(x, item, ids, cb, backend)
    items, words, sums, norms = drop_zero_words(items, words, sums)
    return to_batch(items, words, word_data(kernel, items, sums, norms, n), n, dim)


def word_data(
    kernel: Kernel, items: np.ndarray, sums: np.ndarray, norms: np.ndarray, n: int
) -> np.ndarray:
    """The stored form of each word (``kernel.words``) from its residual sum.

    Args:
        items: (W,) image of each word; sums: (W, D) float residual sums, norms: (W,) their
            L2 norms (all > 0); n: images in the batch.

    Returns:
        (W, D) float32 (``vlad``: normalised over each image's whole vector; ``asmk``: each
        word unit length) or (W, ceil(D/8)) uint8 packed sign bits (``binary``).
    """
    if kernel.words == "vlad":
        return vlad_normalise(items, sums, norms, n)
    if kernel.words == "asmk":
        return (sums / norms[:, None]).astype(np.float32)
    return pack_signs(sums)


def aggregate(
    descriptors: np.ndarray,
    codebook: np.ndarray,
    kernel: str,
    *,
    regions: Sequence[np.ndarray] | None = None,
    num_assignments: int = 1,
    assignment: str | WordIndex = "exact",
) -> AggregatedImage:
    """Aggregate one image's local descriptors with a kernel.

    Args:
        descriptors: float32 (N, D) local descriptors (N may be 0: an empty image).
        codebook: float32 (K, D) visual words.
        kernel: ``vlad``, ``asmk``, ``asmk_star`` or a regional kernel (``r_vlad``, ``r_asmk``,
            ``r_asmk_star``, ``naive_r_asmk``, ``naive_r_asmk_star``).
        regions: regional kernels: per-region descriptor arrays, region 0 the whole image
            (``None``: the whole image is the only region). Other kernels reject it.
        num_assignments: visual words per descriptor (multiple assignment when > 1).
        assignment: ``"exact"``, ``"hnsw"`` or a ``WordIndex`` (see :func:`aggregate_many`).

    Returns:
        :class:`AggregatedImage` with sorted uint32 words (n_words,) and float32 (n_words, D)
        or packed uint8 (n_words, ceil(D/8)) data.
    """
    regs = None if regions is None else [list(regions)]
    return aggregate_many(
        [descriptors],
        codebook,
        kernel,
        regions=regs,
        num_assignments=num_assignments,
        assignment=assignment,
        threads=1,
    ).image(0)
