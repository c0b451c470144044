"""Selective-search proposals (OpenCV contrib ``ximgproc``) as region boxes, reproducibly.

OpenCV ranks proposals with C ``rand()``; :func:`selective_search_boxes` seeds it under a process
lock so the first ``top_n`` proposals are the same on every run.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box

__all__ = ["selective_search_boxes"]

_SS_LOCK = threading.Lock()


def _seed_libc_rand(seed: int) -> None:
    """Seed C ``rand()``: OpenCV's selective search ranks proposals with it."""
    libc = ctypes.CDLL(None)
    libc.srand(ctypes.c_uint(seed))


def selective_search_boxes(
    image: npt.NDArray[Any],
    *,
    top_n: int,
    mode: str = "fast",
    max_side: int | None = 256,
    min_area: float = 0.01,
    seed: int | None = 0,
    min_size: float = 0.0,
) -> list[Box]:
    """The first ``top_n`` selective-search proposals (OpenCV contrib ``ximgproc``).

    OpenCV orders proposals by a randomised hierarchical rank (level times C ``rand()``); with
    ``seed`` set, ``rand()`` is seeded under a lock so the result is reproducible (this touches
    the process-wide C generator). Exact duplicates, proposals under ``min_area`` and proposals
    narrower or lower than ``min_size`` of the image side are dropped before taking the first
    ``top_n``.

    Args:
        image: (H, W, 3) BGR or (H, W) grey uint8 image.
        top_n: number of proposals to keep (>= 0).
        mode: ``"fast"`` or ``"quality"``.
        max_side: downscale so the long side is at most this (None: full size).
        min_area: minimum proposal area as a fraction of the image.
        seed: seed of the ranking randomness (None: unseeded, not reproducible).
        min_size: minimum proposal width and height as a fraction of the image's (0: any).

    Returns:
        Up to ``top_n`` boxes, best-ranked first, score ``1 / (1 + rank)``.
    """
    import cv2

    if top_n < 0:
        raise ValueError(f"selective_search_boxes: top_n must be >= 0, got {top_n}")
    if mode not in ("fast", "quality"):
        raise ValueError(f"selective_search_boxes: mode must be 'fast' or 'quality', got {mode!r}")
    img: npt.NDArray[Any] = np.asarray(image)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"selective_search_boxes: expected an (H, W, 3) image, got {img.shape}")
    if top_n == 0:
        return []
    if not hasattr(cv2, "ximgproc") or not hasattr(cv2.ximgproc, "segmentation"):
        raise ValueError(
            "selective search needs OpenCV contrib (cv2.ximgproc.segmentation); reinstall "
            "opencv-contrib-python-headless with the same version as opencv-python-headless"
        )
    h, w = img.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(
            img, (max(2, round(w * s)), max(2, round(h * s))), interpolation=cv2.INTER_AREA
        )
        h, w = img.shape[:2]
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img))
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    if seed is not None:
        with _SS_LOCK:
            _seed_libc_rand(seed)
            raw = ss.process()
    else:
        raw = ss.process()
    rects: np.ndarray = np.asarray(raw, dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    keep = rects[:, 2] * rects[:, 3] >= min_area * w * h
    keep &= (rects[:, 2] >= min_size * w) & (rects[:, 3] >= min_size * h)
    rects = rects[keep]
    _, first = np.unique(rects, axis=0, return_index=True)
    rects = rects[np.sort(first)][:top_n]
    out = []
    for r, (x, y, bw, bh) in enumerate(rects.tolist()):
        out.append(
            Box(y / h, x / w, min((y + bh) / h, 1.0), min((x + bw) / w, 1.0), 1.0 / (1.0 + r))
        )
    return out
