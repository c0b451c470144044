"""Regional aggregation (R-VLAD, R-ASMK, R-ASMK* and the naive baselines) on a chunk of images.

The regional kernels of :mod:`retrieval.index.aggregation` (Teichmann et al., CVPR 2019): each
region of an image (region 0 the whole image) is an item, VLAD-aggregated and L2-normalised as a
whole (``naive_*``: ASMK-aggregated, every word unit length); the region vectors are averaged
per image and the average stored in the kernel's word form (see the aggregation module's
docstring).

``naive_r_asmk`` / ``naive_r_asmk_star`` (the paper's Naive-R-ASMK baseline): each region is
ASMK-aggregated (every word's residual sum L2-normalised on its own, no VLAD normalisation of
the region), the per-region unit word vectors are averaged over the image's regions, then each
word is L2-normalised again (``naive_r_asmk``) or binarised (``naive_r_asmk_star``). A word seen
in a region with one stray descriptor thus weighs as much as a word aggregated over hundreds:
the flaw the per-region VLAD normalisation of R-ASMK removes.

:func:`retrieval.index.aggregation.aggregate_many` calls :func:`aggregate_regions_chunk` on
chunks of whole images.
"""

from __future__ import annotations

import numpy as np

from retrieval.index.aggregation import (
    AggregatedBatch,
    drop_zero_words,
    residual_sums,
    sum_sorted_segments,
    to_batch,
    vlad_normalise,
    word_data,
)
from retrieval.index.kernels import Kernel

__all__ = ["aggregate_regions_chunk"]


def aggregate_regions_chunk(
    n_reg: np.ndarray,
    x: np.ndarray,
    ritem: np.ndarray,
    ids: np.ndarray,
    cb: np.ndarray,
    kernel: Kernel,
    backend: str,
) -> AggregatedBatch:
    """Aggregate one chunk of images with a regional kernel, from their stacked regions.

    Args:
        n_reg: int64 (n,) regions of each image of the chunk (region 0 the whole image).
        x: float32 (N, D) the descriptors of every region, image after image, region after
            region; ritem: int64 (N,) the region (0 .. n_reg.sum() - 1) of each row;
            ids: int64 (N, m) the words of each row.
        cb: float32 (K, D) codebook; kernel: a regional :class:`Kernel`; backend: ``"numba"``
            or ``"numpy"``.

    Returns:
        an :class:`AggregatedBatch` with one entry per image of the chunk.
    """
    n, dim = n_reg.shape[0], cb.shape[1]
    n_flat = int(n_reg.sum())
    region_image = np.repeat(np.arange(n, dtype=np.int64), n_reg)
    ritems, words, sums = residual_sums(x, ritem, ids, cb, backend)
    ritems, words, sums, norms = drop_zero_words(ritems, words, sums)
    if kernel.regional == "asmk":
        vlad = (sums / norms[:, None]).astype(np.float32)  # naive: ASMK per region, unit words
    else:
        vlad = vlad_normalise(ritems, sums, norms, n_flat)
    img = region_image[ritems]
    k = cb.shape[0]
    key = img * k + words
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    first = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]]) if key_s.size else key_s
    acc = sum_sorted_segments(vlad, order, first)
    uk = key_s[first]
    items, words = uk // k, uk % k
    acc = (acc / n_reg[items][:, None]).astype(np.float32)  # average of the regions
    items, words, acc, norms = drop_zero_words(items, words, acc)
    return to_batch(items, words, word_data(kernel, items, acc, norms, n), n, dim)
