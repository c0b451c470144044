"""The R-MAC grid of Tolias et al. (ICLR 2016) as pixel squares and as normalised region boxes.

:func:`rmac_grid` is their exact sampling (also the pooling regions of the global descriptors in
:mod:`retrieval.rmac`); :func:`rmac_boxes` gives the same squares as the ``rmac`` region source's
boxes (``ymin xmin ymax xmax`` in [0, 1], score 1.0).
"""

from __future__ import annotations

import math

import numpy as np

from gldboxes.boxes import Box

__all__ = ["rmac_boxes", "rmac_grid"]


def rmac_grid(width: int, height: int, levels: int, *, overlap: float = 0.4) -> np.ndarray:
    """R-MAC square regions of Tolias et al. (ICLR 2016), their exact sampling procedure.

    At level ``l`` the square side is ``floor(2 w / (l + 1))`` with ``w = min(W, H)``; the long
    side gets ``l + m - 1`` positions and the short side ``l``, where ``m`` (2..7, or 1 for a
    square image) is the number of level-1 regions along the long side whose neighbours overlap
    closest to ``overlap``. Positions are spread evenly from one border to the other.

    Args:
        width, height: image size ``W, H`` in pixels.
        levels: ``L`` >= 1.
        overlap: desired overlap of neighbouring level-1 regions.

    Returns:
        (R, 4) int64 regions ``[x0, y0, side, side]`` in pixels (top-left, 0-based), level by
        level, row-major within a level; ``R = sum_l l (l + m - 1)``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"rmac_grid: image size must be positive, got {width}x{height}")
    if levels < 1:
        raise ValueError(f"rmac_grid: levels must be >= 1, got {levels}")
    w = min(width, height)
    steps = np.arange(2, 8, dtype=np.float64)
    b = (max(width, height) - w) / (steps - 1)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - overlap))) + 1  # 1-based, as MATLAB
    wd = idx if height < width else 0  # extra positions along x
    hd = idx if height > width else 0  # extra positions along y
    out: list[np.ndarray] = []
    for lev in range(1, levels + 1):
        wl = math.floor(2 * w / (lev + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for size, extra in ((width, wd), (height, hd)):
            n = lev + extra
            step = (size - wl) / (n - 1) if n > 1 else 0.0
            starts.append(np.floor(wl2 + np.arange(n) * step) - wl2)
        xs, ys = starts
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        reg = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, wl), np.full(gx.size, wl)], 1)
        out.append(reg.astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0, 4), np.int64)


def rmac_boxes(width: int, height: int, levels: int, *, overlap: float = 0.4) -> list[Box]:
    """R-MAC grid regions (:func:`rmac_grid`) as normalised boxes with score 1.0."""
    grid = rmac_grid(width, height, levels, overlap=overlap).astype(np.float64)
    x0, y0, side = grid[:, 0] / width, grid[:, 1] / height, grid[:, 2]
    x1 = np.minimum((grid[:, 0] + side) / width, 1.0)
    y1 = np.minimum((grid[:, 1] + side) / height, 1.0)
    return [
        Box(float(a), float(b), float(c), float(d), 1.0)
        for a, b, c, d in zip(y0, x0, y1, x1, strict=True)
    ]
