"""Posting ids of the inverted file, delta-encoded: encode, check, decode (numpy twin).

Word ``w`` owns bytes ``id_offsets[w]:id_offsets[w+1]`` of ``id_stream``: its postings' item
ids (ascending) as the first id, then the gap to the previous id, little-endian, in the
narrowest width of 1, 2 or 4 bytes that holds the word's largest gap (``width = bytes /
postings``). Frequent words, which hold most postings, get one byte a posting instead of four.
The compiled loops (:func:`retrieval.index._kernels.encode_ids`, ``decode_ids`` and the
scoring loops) read the same layout; :func:`decode_posting_ids` is their numpy twin.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["check_id_encoding", "decode_posting_ids", "encode_posting_ids"]


def encode_posting_ids(
    offsets: np.ndarray, image_ids: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Delta-encode posting ids (see the module docstring and ``_kernels.encode_ids``).

    Args:
        offsets: int (K + 1,) CSR offsets.
        image_ids: int (N,) item id of each posting, ascending within each word, in [0, 2^32).

    Returns:
        ``(id_offsets, id_stream)``: int64 (K + 1,) and uint8 (B,).
    """
    from retrieval.index._kernels import encode_ids

    ids = np.asarray(image_ids)
    offs = np.asarray(offsets, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] != offs[-1]:
        raise ValueError(
            f"InvertedFile: image_ids must be int ({int(offs[-1])},) (one per posting), got "
            f"{ids.dtype} {ids.shape}"
        )
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
        raise ValueError("InvertedFile: image_ids must be in [0, 2^32)")
    if ids.dtype.kind == "i":
        ids = ids.astype(np.int64)
    id_offsets = np.empty(offs.shape[0], np.int64)
    stream = encode_ids(offs, ids, id_offsets)
    if id_offsets[0] < 0:
        raise ValueError("InvertedFile: image_ids must be ascending within each word")
    return id_offsets, stream


def _id_widths(offsets: np.ndarray, id_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Postings and bytes a posting id (0 for an empty word) of every word: int64 (K,) each."""
    cnt = np.diff(np.asarray(offsets, np.int64))
    nbytes = np.diff(np.asarray(id_offsets, np.int64))
    width = np.zeros_like(cnt)
    np.floor_divide(nbytes, cnt, out=width, where=cnt > 0)
    return cnt, width


def check_id_encoding(offsets: np.ndarray, id_offsets: np.ndarray, id_stream: np.ndarray) -> None:
    """Raise ValueError unless ``id_offsets``/``id_stream`` fit ``offsets`` (O(K), no decoding)."""
    io = np.asarray(id_offsets)
    st = np.asarray(id_stream)
    k1 = np.shape(offsets)[0]
    if io.shape != (k1,) or not np.issubdtype(io.dtype, np.integer):
        raise ValueError(f"InvertedFile: id_offsets must be int ({k1},), got {io.dtype} {io.shape}")
    if st.ndim != 1 or st.dtype != np.uint8:
        raise ValueError(f"InvertedFile: id_stream must be uint8 (B,), got {st.dtype} {st.shape}")
    if int(io[0]) != 0 or int(io[-1]) != st.shape[0]:
        raise ValueError(
            f"InvertedFile: id_offsets must run from 0 to the stream length {st.shape[0]}, got "
            f"{int(io[0])}..{int(io[-1])}"
        )
    cnt, width = _id_widths(offsets, io)
    if np.any(width * cnt != np.diff(io.astype(np.int64))) or not np.all(
        np.isin(width[cnt > 0], (1, 2, 4))
    ):
        raise ValueError("InvertedFile: id_offsets do not give 1, 2 or 4 bytes a posting per word")


def decode_posting_ids(
    offsets: np.ndarray, id_offsets: np.ndarray, id_stream: np.ndarray, words: np.ndarray
) -> np.ndarray:
    """The item ids of the postings of ``words``, concatenated (the numpy twin of
    ``_kernels.decode_ids``, for a subset of the words).

    Args:
        offsets, id_offsets, id_stream: the CSR offsets and the encoded ids.
        words: int (M,) words, in any order (repeats allowed).

    Returns:
        int64 (sum of the words' postings,).
    """
    w = np.asarray(words, np.int64)
    off = np.asarray(offsets)
    cnt_all, width_all = _id_widths(off, id_offsets)
    cnt = cnt_all[w]
    tot = int(cnt.sum())
    if tot == 0:
        return np.zeros(0, np.int64)
    excl = np.cumsum(cnt) - cnt
    local = np.arange(tot, dtype=np.int64) - np.repeat(excl, cnt)
    wp = np.repeat(width_all[w], cnt)
    pos = np.repeat(np.asarray(id_offsets, np.int64)[w], cnt) + local * wp
    stream = np.asarray(id_stream)
    delta = stream[pos].astype(np.int64)
    for b in (1, 2, 3):
        sel = np.flatnonzero(wp > b)
        delta[sel] |= stream[pos[sel] + b].astype(np.int64) << (8 * b)
    csum = np.cumsum(delta)
    base = csum[excl[cnt > 0]] - delta[excl[cnt > 0]]
    return csum - np.repeat(base, cnt[cnt > 0])
