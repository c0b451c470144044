"""Regional features: a region box's pixels, and the whole image's features assigned to regions.

:func:`crop_box` is the crop on which the paper's way re-extracts features;
:func:`assign_features_to_regions` and :func:`regional_descriptors` are the fast way, taking the
keypoints inside the same pixel rectangle (``x0 <= x < x1`` and ``y0 <= y < y1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box

__all__ = ["assign_features_to_regions", "crop_box", "regional_descriptors"]


def crop_box(image: npt.NDArray[Any], box: Box) -> npt.NDArray[Any]:
    """The pixels of ``box``: ``image[floor(ymin H):ceil(ymax H), floor(xmin W):ceil(xmax W)]``.

    Args:
        image: (H, W) or (H, W, C) array.

    Returns:
        A view (h, w[, C]) with ``h, w >= 1``; features extracted on it are in crop pixels and
        map back to the image by adding ``(floor(xmin W), floor(ymin H))``.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"crop_box: expected an (H, W[, C]) image, got shape {img.shape}")
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box.to_pixels(w, h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop_box: box {box.to_string()} is empty on a {w}x{h} image")
    return img[y0:y1, x0:x1]


def assign_features_to_regions(
    keypoints: npt.ArrayLike, boxes: Sequence[Box], width: int, height: int
) -> list[np.ndarray]:
    """Indices of the keypoints inside each region's crop rectangle (fast regional features).

    A keypoint ``(x, y)`` belongs to a box when ``x0 <= x < x1`` and ``y0 <= y < y1`` with
    ``(x0, y0, x1, y1)`` the crop of :func:`crop_box`; regions may share keypoints.

    Args:
        keypoints: (N, 2) ``x, y`` in pixels of the whole image.
        boxes: R regions (region 0 is normally the whole image).
        width, height: image size in pixels.

    Returns:
        R sorted int64 index arrays into ``keypoints``.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[1] != 2:
        raise ValueError(f"assign_features_to_regions: keypoints must be (N, 2), got {kp.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"assign_features_to_regions: bad image size {width}x{height}")
    if not boxes:
        return []
    rect = np.array([b.to_pixels(width, height) for b in boxes], dtype=np.float64)  # (R, 4)
    x, y = kp[None, :, 0], kp[None, :, 1]
    inside = (
        (x >= rect[:, 0:1]) & (x < rect[:, 2:3]) & (y >= rect[:, 1:2]) & (y < rect[:, 3:4])
    )  # (R, N)
    r_idx, k_idx = np.nonzero(inside)
    cuts = np.searchsorted(r_idx, np.arange(1, len(boxes)))
    return [a.astype(np.int64) for a in np.split(k_idx, cuts)]


def regional_descriptors(
    keypoints: npt.ArrayLike,
    descriptors: npt.ArrayLike,
    boxes: Sequence[Box],
    width: int,
    height: int,
) -> list[np.ndarray]:
    """Per-region descriptor arrays from the whole image's features (the fast mode).

    The output is what ``retrieval.index.aggregation.aggregate(..., regions=[...])`` takes for one
    image: entry ``j`` holds the descriptors of the keypoints inside region ``j``.

    Args:
        keypoints: (N, 2) ``x, y`` pixels; descriptors: (N, D).
        boxes: R regions, region 0 normally the whole image.

    Returns:
        R arrays (N_j, D), same dtype as ``descriptors``.
    """
    desc = np.asarray(descriptors)
    kp = np.asarray(keypoints)
    if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
        raise ValueError(
            f"regional_descriptors: {kp.shape[0]} keypoints but descriptors have shape {desc.shape}"
        )
    return [desc[idx] for idx in assign_features_to_regions(kp, boxes, width, height)]
