"""MAC / R-MAC pooling: the R-MAC grid on a feature map, regional max-pooling.

Part of :mod:`retrieval.rmac`; see its docstring for the method."""

from __future__ import annotations

import functools
import logging

import numpy as np

from retrieval.regions import rmac_grid

__all__ = [
    "l2_normalise",
    "map_descriptors",
    "region_max_pool",
    "region_max_pool_loop",
    "rmac_regions",
]

logger = logging.getLogger("retrieval.rmac.pooling")


# =========================================================================== pooling
@functools.lru_cache(maxsize=4096)
def _grid_cached(width: int, height: int, levels: int, overlap: float) -> np.ndarray:
    g = rmac_grid(width, height, levels, overlap=overlap)
    out = np.stack(
        [
            g[:, 0],
            g[:, 1],
            np.minimum(g[:, 0] + g[:, 2], width),
            np.minimum(g[:, 1] + g[:, 3], height),
        ],
        1,
    ).astype(np.int64)
    out.flags.writeable = False
    return out


def rmac_regions(width: int, height: int, levels: int, *, overlap: float = 0.4) -> np.ndarray:
    """The R-MAC grid of a ``width x height`` map as boxes ``[x0, y0, x1, y1]`` (end exclusive).

    Thin wrapper over :func:`retrieval.regions.rmac_grid` (the single implementation of the grid).

    Returns:
        (R, 4) int64.
    """
    return _grid_cached(int(width), int(height), int(levels), float(overlap))


def _check_boxes(maps: np.ndarray, img: np.ndarray, boxes: np.ndarray, what: str) -> None:
    if maps.ndim != 4:
        raise ValueError(f"{what}: maps must be (G, H, W, C), got shape {maps.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or img.shape != (boxes.shape[0],):
        raise ValueError(
            f"{what}: expected img (R,) and boxes (R, 4), got {img.shape} and {boxes.shape}"
        )
    if boxes.size == 0:
        return
    _, h, w, _ = maps.shape
    bad = (
        (boxes[:, 0] < 0)
        | (boxes[:, 1] < 0)
        | (boxes[:, 2] > w)
        | (boxes[:, 3] > h)
        | (boxes[:, 2] <= boxes[:, 0])
        | (boxes[:, 3] <= boxes[:, 1])
    )
    if np.any(bad):
        raise ValueError(
            f"{what}: box {boxes[np.argmax(bad)].tolist()} is empty or outside the {w}x{h} map"
        )
    if img.min() < 0 or img.max() >= maps.shape[0]:
        raise ValueError(f"{what}: image index outside [0, {maps.shape[0]})")


def region_max_pool(maps: np.ndarray, img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Exact max-pooling of rectangles, vectorised (1-D sparse table along x, gathered rows).

    Args:
        maps: (G, H, W, C) activations of G images of one map size.
        img: (R,) image index of each region.
        boxes: (R, 4) int ``[x0, y0, x1, y1]`` in cells, end exclusive, non-empty.

    Returns:
        (R, C) per-channel maxima, dtype of ``maps``.
    """
    maps = np.asarray(maps)
    img = np.asarray(img, np.int64)
    boxes = np.asarray(boxes, np.int64)
    _check_boxes(maps, img, boxes, "region_max_pool")
    out = np.empty((boxes.shape[0], maps.shape[-1]), maps.dtype)
    if boxes.shape[0] == 0:
        return out
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ks = np.floor(np.log2(widths)).astype(np.int64)
    table = maps  # table k: max over x .. x + 2^k - 1
    for k in range(int(ks.max()) + 1):
        if k > 0:
            half = 1 << (k - 1)
            table = np.maximum(table[:, :, :-half], table[:, :, half:])
        sel = np.flatnonzero(ks == k)
        if sel.size == 0:
            continue
        hmax = int(heights[sel].max())
        rows = boxes[sel, 1, None] + np.minimum(np.arange(hmax)[None], heights[sel, None] - 1)
        g = img[sel, None]
        left = table[g, rows, boxes[sel, 0, None]]  # (S, hmax, C)
        right = table[g, rows, (boxes[sel, 2] - (1 << k))[:, None]]
        out[sel] = np.maximum(left, right).max(axis=1)
    return out


def region_max_pool_loop(maps: np.ndarray, img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Slow, obviously-correct reference of :func:`region_max_pool` (one slice per region)."""
    return (
        np.stack(
            [
                maps[g, y0:y1, x0:x1].max(axis=(0, 1))
                for g, (x0, y0, x1, y1) in zip(img, boxes, strict=True)
            ]
        )
        if len(boxes)
        else np.empty((0, maps.shape[-1]), maps.dtype)
    )


def l2_normalise(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / (||x|| + eps)`` along ``axis``, as float32: (..., C) -> (..., C) for the last axis."""
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + eps)


def map_descriptors(
    fmap: np.ndarray, levels: int, overlap: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """MAC and the L2-normalised R-MAC regional vectors of one activation map.

    Args:
        fmap: (h, w, C) non-negative activations.

    Returns:
        ``(mac (C,), regional (R, C))``, both L2-normalised, float32.
    """
    h, w = fmap.shape[:2]
    boxes = rmac_regions(w, h, levels, overlap=overlap)
    reg = region_max_pool(fmap[None], np.zeros(len(boxes), np.int64), boxes)
    return l2_normalise(fmap.max(axis=(0, 1))), l2_normalise(reg)
