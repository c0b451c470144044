"""Image files for the detectors: find them by id, decode any format, re-encode when needed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "encode_jpeg",
    "list_images",
    "needs_reencoding",
    "read_image_rgb",
    "resolve_image_path",
]

# Extensions looked for when an id has no explicit path (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)


def resolve_image_path(
    image_dir: str | os.PathLike[str], image_id: str, rel_path: str | None = None
) -> Path | None:
    """Find the file of image ``image_id`` under ``image_dir``.

    Looks, in order, at ``image_dir/rel_path`` (e.g. the ``url`` column of a GLD-style
    ``train.csv`` holding a relative path), the GLD layout ``image_dir/a/b/c/<id>.jpg``
    (``a b c`` = the first three characters of the id), the GLD layout under
    ``image_dir/images/``, then ``image_dir/<id><ext>`` for every extension in
    ``IMAGE_EXTENSIONS``. Returns ``None`` when nothing exists.
    """
    root = Path(image_dir)
    candidates: list[Path] = []
    if rel_path and "://" not in rel_path:
        candidates.append(root / rel_path)
    if len(image_id) >= 3:
        sub = Path(image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")
        candidates += [root / sub, root / "images" / sub]
    candidates += [root / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


def list_images(source: str | os.PathLike[str]) -> list[Path]:
    """The image files named by ``source``: a directory (searched recursively, sorted) or a
    text file listing one path per line (relative paths are relative to the list's folder;
    blank lines and ``#`` comments are ignored).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"image source not found: {src}")
    if src.is_dir():
        return sorted(
            p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    out: list[Path] = []
    for line in src.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        out.append(p if p.is_absolute() else src.parent / p)
    return out


def _open(path_or_bytes: str | os.PathLike[str] | bytes) -> Image.Image:
    if isinstance(path_or_bytes, bytes):
        return Image.open(io.BytesIO(path_or_bytes))
    return Image.open(path_or_bytes)


def read_image_rgb(path_or_bytes: str | os.PathLike[str] | bytes) -> np.ndarray:
    """Decode an image of any format Pillow reads into RGB pixels.

    EXIF orientation is applied (as ``cv2.imread`` does), palette/grey/alpha images are
    converted to RGB, and only the first frame of an animation is used.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        ValueError: the data is not a readable image (the message names the file).
    """
    name = "<bytes>" if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
    try:
        with _open(path_or_bytes) as img:
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{name}: decoded to an empty image of shape {rgb.shape}")
    return rgb


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a (H, W, 3) uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def needs_reencoding(data: bytes) -> bool:
    """True unless ``data`` is a plain JPEG/PNG that TensorFlow decodes to the same pixels as
    ``read_image_rgb`` (no EXIF rotation, RGB or grey)."""
    try:
        with _open(data) as img:
            fmt = img.format
            orientation = img.getexif().get(0x0112, 1)
            mode = img.mode
    except (UnidentifiedImageError, OSError, SyntaxError):
        return True
    return fmt not in ("JPEG", "PNG") or orientation != 1 or mode not in ("RGB", "L")
