"""Image loading for the features stage: robust decoding, the crop of a query and the resize.

:func:`load_image` decodes what PIL can (CMYK, grayscale, 16-bit, palette, alpha composited on
white, EXIF orientation applied, huge JPEGs decoded at reduced size) and raises
:class:`BadImageError` naming the file otherwise; :func:`crop_and_resize` crops a query to its
``bbx`` and downscales to ``max_side``, returning the map back to original pixels.
:class:`ImageItem` is one image to extract (id, path, optional crop box).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BadImageError",
    "ImageItem",
    "crop_and_resize",
    "load_image",
]


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its id (HDF5 key), path and optional crop box (x1, y1, x2, y2)."""

    name: str
    path: Path
    bbx: tuple[float, float, float, float] | None = None


def load_image(
    path: str | os.PathLike[str],
    *,
    grayscale: bool = True,
    exif_transpose: bool = True,
    max_side: int | None = None,
) -> tuple[np.ndarray, tuple[int, int], float]:
    """Decode an image robustly.

    Handles CMYK, grayscale, 16-bit and palette images, alpha (composited on white) and the EXIF
    orientation; a JPEG much larger than ``max_side`` is decoded at a reduced size (DCT scaling).

    Returns:
        ``(image, (width, height), factor)``: uint8 (H', W') or (H', W', 3) RGB, the size of the
        full-resolution upright image, and ``factor`` = original pixels per decoded pixel.

    Raises:
        BadImageError: unreadable, truncated or corrupt file (the message names it).
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
            orientation = im.getexif().get(0x0112, 1) if exif_transpose else 1
            if max_side and im.format == "JPEG" and max(w0, h0) >= 2 * max_side:
                im.draft("L" if grayscale else "RGB", (max_side, max_side))
            im.load()
            img: Any = im
            factor = w0 / im.size[0]
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                wide = np.asarray(img, dtype=np.float64)
                hi = float(wide.max()) or 1.0
                img = Image.fromarray(np.clip(wide * (255.0 / hi), 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            img = img.convert("L" if grayscale else "RGB")
            arr = np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    size = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    return arr, size, float(factor)


def crop_and_resize(
    arr: np.ndarray, factor: float, bbx: tuple[float, float, float, float] | None, max_side: int
) -> tuple[np.ndarray, float, float, float, float]:
    """Crop to ``bbx`` (original pixels) and downscale to ``max_side``.

    Args:
        arr: (H, W) or (H, W, C) image, already downscaled by ``factor`` from the original.
        factor: original pixels per pixel of ``arr``.
        bbx: ``(x1, y1, x2, y2)`` crop in original pixels, or None for the whole image.
        max_side: the longer side of the result at most this (0: no downscaling).

    Returns:
        ``(image, sx, sy, ox, oy)``: original = image pixel * (sx, sy) + (ox, oy).

    Raises:
        ValueError: when ``bbx`` does not overlap the image.
    """
    import cv2

    sx = sy = factor
    ox = oy = 0.0
    if bbx is not None:
        x1, y1, x2, y2 = (float(v) / factor for v in bbx)
        h, w = arr.shape[:2]
        c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c2, r2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
        if c2 <= c1 or r2 <= r1:
            raise ValueError(f"bbx {bbx} does not overlap the image ({w * factor}x{h * factor})")
        arr = arr[r1:r2, c1:c2]
        ox, oy = c1 * factor, r1 * factor
    h, w = arr.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
        sx *= w / nw
        sy *= h / nh
    return np.ascontiguousarray(arr), sx, sy, ox, oy
