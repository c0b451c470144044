"""Local features (RootSIFT, DELF/DELG SavedModels) into one HDF5 file per dataset and config.

Presets (:data:`confs`), hloc-style; the ``output`` name encodes the settings:

* ``rootsift`` (default): OpenCV SIFT, the ``max_features`` strongest by response, RootSIFT
  (L1-normalise, square root: unit L2 norm), 128-D. Runs offline everywhere. ``upright`` drops
  the dominant orientations (one descriptor per keypoint at angle 0, as for the upright
  photos of Revisited Oxford/Paris). Image-size policy: the longer side is downscaled to
  ``max_side`` (1,024 px, the size of the Revisited images) before extraction and keypoints
  are stored in original pixels, so thresholds in pixels (spatial verification) refer to the
  image at ``max_side``.
* ``rootsift-n4000``: the same with a budget of 4,000 features per image (the classical
  ASMK setups use several thousand; slower to extract, index and verify).
* ``delf`` (:mod:`retrieval.features.delf`) and ``kaze`` (:mod:`retrieval.features.kaze`):
  plug-ins, listed in
  :data:`FEATURE_PLUGINS`.

HDF5 layout (keyed by image id)::

    <id>/keypoints    float32 (N, 2)  x, y in pixels of the original (EXIF-upright) image
    <id>/descriptors  float32 (N, D)
    <id>/scales       float32 (N,)    SIFT size in original pixels / DELF pyramid scale
    <id>/scores       float32 (N,)    SIFT response / DELF attention
    <id>.attrs        status ("ok" | "empty" | "error"), error, image_size (w, h), bbx

Queries are cropped to their ``bbx`` (x1, y1, x2, y2) before extraction (Revisited protocol);
their keypoints are still in full-image pixels. Bad images are decoded when PIL can (CMYK,
grayscale, 16-bit, palette, alpha composited on white, EXIF orientation applied, huge JPEGs
decoded at reduced size) and otherwise recorded as ``status="error"`` with no features and
reported by name; images without features are recorded as empty.

Extraction is resumable and survives kill -9: finished images are committed every 32 images or
2 s to small chunk files in ``<file>.partial.d/`` (each written under a temporary name, closed,
flushed and renamed, so a chunk torn by a kill is just discarded); a rerun skips the images of
committed chunks, and completion merges them into a temporary file renamed onto ``<file>``. A
damaged ``<file>`` (truncated, not HDF5) is named in a warning and redone. Readers validate what
they read (:func:`check_features`: float (N, 2) keypoints, float (N, D) descriptors, equal
counts, finite values) and name the file and image in every error.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gldboxes.io import write_config
from gldboxes.progress import tqdm

__all__ = [
    "FORMAT_VERSION",
    "BadImageError",
    "ExtractedFeatures",
    "ImageItem",
    "check_features",
    "confs",
    "extract_image",
    "failures",
    "load_image",
    "main",
    "make_extractor",
    "output_name",
    "read_descriptors",
    "read_features",
    "rootsift",
    "write_image",
]

logger = logging.getLogger("retrieval.features")

FORMAT_VERSION = 1


def _rootsift(max_features: int) -> dict[str, Any]:
    return {
        "output": f"rootsift-n{max_features}",  # folder / file name (see output_name)
        "model": {
            "name": "rootsift",
            "max_features": max_features,  # keep the strongest by SIFT response
            "upright": False,  # True: one descriptor per keypoint at angle 0 (upright SIFT)
            "contrast_threshold": 0.04,  # OpenCV SIFT defaults
            "edge_threshold": 10.0,
            "sigma": 1.6,
        },
        "preprocessing": {
            "max_side": 1024,  # longer side is downscaled to this before extraction
            "min_side": 8,  # smaller images (or crops) are recorded as empty
            "exif_transpose": True,  # apply the EXIF orientation (keypoints in upright pixels)
            "grayscale": True,
        },
        # Spatial verification defaults for these descriptors (retrieval.verification): nearly
        # every RootSIFT 1-NN is closer than DELF's absolute 0.8-0.9, so RootSIFT matches by
        # Lowe's ratio test (0.8, his paper's value) and mutual nearest neighbours. Below
        # min_inliers a pair counts as unverified and keeps its first-stage place: with 3-point
        # affine samples a few consistent matches arise by chance between unrelated photos.
        "verification": {
            "max_distance": None,
            "ratio": 0.8,
            "mutual": True,
            "threshold": 10.0,  # pixels of the image at max_side
            "min_inliers": 10,
        },
    }


confs: dict[str, dict[str, Any]] = {
    "rootsift": _rootsift(1000),
    "rootsift-n4000": _rootsift(4000),
}


# Plug-in local features: one module each, holding ``NAME`` (the ``model.name`` of its presets),
# ``confs`` (its presets, in the format above, ``verification`` defaults included) and
# ``make(model_conf)`` returning an extractor with ``dim``, ``pixel_scales`` (``scales`` are
# keypoint sizes in pixels, rescaled with the image) and ``__call__(image) -> (keypoints (N, 2),
# descriptors (N, D), scales (N,), scores (N,))``. Adding a feature = one module + this line.
FEATURE_PLUGINS: tuple[str, ...] = ("retrieval.features.delf", "retrieval.features.kaze")


def _plugin(name: str) -> Any:
    """The plug-in module whose ``NAME`` is ``name``, or ``None``."""
    for module in FEATURE_PLUGINS:
        mod = importlib.import_module(module)
        if mod.NAME == name:
            return mod
    return None


for _module in FEATURE_PLUGINS:
    confs.update(importlib.import_module(_module).confs)


def output_name(conf: Mapping[str, Any]) -> str:
    """The features folder name of a preset after overrides: ``<model>-n<budget>`` plus
    ``-up`` (upright RootSIFT) and ``-r<max_side>`` when it differs from 1,024 px.

    Args:
        conf: a features preset (``model`` and ``preprocessing`` dicts).

    Returns:
        e.g. ``rootsift-n1000`` (the default preset), ``rootsift-n4000-up``, ``delf-n1000-r800``.
    """
    model, pre = conf["model"], conf.get("preprocessing", {})
    name = f"{model['name']}-n{int(model['max_features'])}"
    if model.get("upright"):
        name += "-up"
    if int(pre.get("max_side", 1024)) != 1024:
        name += f"-r{int(pre['max_side'])}"
    return name


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its id (HDF5 key), path and optional crop box (x1, y1, x2, y2)."""

    name: str
    path: Path
    bbx: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ExtractedFeatures:
    """Features of one image (coordinates in original-image pixels).

    Attributes:
        keypoints: float32 (N, 2) x, y. descriptors: float32 (N, D). scales, scores: (N,).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> ExtractedFeatures:
        z = np.zeros(0, np.float32)
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), z, z)


# ---------------------------------------------------------------------------- images
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


def _crop_and_resize(
    arr: np.ndarray, factor: float, bbx: tuple[float, float, float, float] | None, max_side: int
) -> tuple[np.ndarray, float, float, float, float]:
    """Crop to ``bbx`` (original pixels) and downscale to ``max_side``.

    Returns:
        ``(image, sx, sy, ox, oy)``: original = image pixel * (sx, sy) + (ox, oy).
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


# ---------------------------------------------------------------------------- RootSIFT
def rootsift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root. (N, D) -> (N, D)."""
    d = np.asarray(descriptors, np.float32)
    d = d / (np.abs(d).sum(axis=1, keepdims=True) + eps)
    return np.sqrt(np.maximum(d, 0.0)).astype(np.float32)


class _RootSift:
    def __init__(self, model: Mapping[str, Any]) -> None:
        import cv2

        self.max_features = int(model["max_features"])
        if self.max_features < 1:
            raise ValueError(f"rootsift: max_features must be >= 1, got {self.max_features}")
        self.upright = bool(model.get("upright", False))
        self.sift = cv2.SIFT_create(  # type: ignore[attr-defined]
            nfeatures=self.max_features,
            contrastThreshold=float(model.get("contrast_threshold", 0.04)),
            edgeThreshold=float(model.get("edge_threshold", 10.0)),
            sigma=float(model.get("sigma", 1.6)),
        )
        self.dim = 128
        self.pixel_scales = True  # keypoint sizes in pixels of the (resized) image

    @staticmethod
    def _upright(kps: Sequence[Any]) -> list[Any]:
        """One keypoint per (location, size, octave) at angle 0: SIFT repeats a keypoint for
        each dominant orientation; the repeat with the strongest response is kept."""
        import cv2

        if not kps:
            return []
        rows = np.array([(*k.pt, k.size, k.response, k.octave) for k in kps], np.float64)
        key = np.round(rows[:, [0, 1, 2]], 2)
        order = np.lexsort((-rows[:, 3], rows[:, 4], key[:, 2], key[:, 1], key[:, 0]))
        k = key[order]
        first = np.r_[True, (np.diff(k, axis=0) != 0).any(axis=1) | (np.diff(rows[order, 4]) != 0)]
        keep = rows[order[first]]
        return [
            cv2.KeyPoint(float(x), float(y), float(s), 0.0, float(r), int(o))
            for x, y, s, r, o in keep
        ]

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.upright:
            kps, desc = self.sift.compute(img, self._upright(self.sift.detect(img, None)))
        else:
            kps, desc = self.sift.detectAndCompute(img, None)
        if desc is None or not kps:
            return (
                np.zeros((0, 2), np.float32),
                np.zeros((0, 128), np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, np.float32),
            )
        xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        size = np.array([k.size for k in kps], np.float32)
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[: self.max_features]
        return xy[order], rootsift(desc[order]), size[order], resp[order]


# ---------------------------------------------------------------------------- extraction
def make_extractor(conf: Mapping[str, Any]) -> Any:
    """The extractor of a features preset (the one :func:`main` uses), ready for
    :func:`extract_image`.

    Args:
        conf: a preset of :data:`confs` (with any ``model`` overrides resolved).

    Returns:
        a RootSIFT extractor (OpenCV SIFT + RootSIFT) for ``model.name == "rootsift"``, or the
        plug-in's (``delf``: :class:`retrieval.features.delf.DelfExtractor`, its SavedModel loaded
        here;
        ``kaze``); each exposes ``dim`` and ``__call__(image) -> (keypoints (N, 2), descriptors
        (N, D), scales (N,), scores (N,))``.

    Raises:
        ValueError: an unknown ``model.name``.
    """
    name = conf["model"]["name"]
    if name == "rootsift":
        return _RootSift(conf["model"])
    plugin = _plugin(name)
    if plugin is not None:
        return plugin.make(conf["model"])
    known = ["rootsift", *(importlib.import_module(m).NAME for m in FEATURE_PLUGINS)]
    raise ValueError(f"unknown feature model {name!r}; expected one of {known}")


def extract_image(
    extractor: Any, item: ImageItem, conf: Mapping[str, Any]
) -> tuple[ExtractedFeatures, tuple[int, int]]:
    """Extract one image (cropped to its bbx) with coordinates mapped back to original pixels."""
    pre = conf["preprocessing"]
    max_side = int(pre.get("max_side", 1024))
    arr, size, factor = load_image(
        item.path,
        grayscale=bool(pre.get("grayscale", True)),
        exif_transpose=bool(pre.get("exif_transpose", True)),
        max_side=max_side if item.bbx is None else None,
    )
    arr, sx, sy, ox, oy = _crop_and_resize(arr, factor, item.bbx, max_side)
    dim = getattr(extractor, "dim", 128)
    if min(arr.shape[:2]) < int(pre.get("min_side", 8)):
        return ExtractedFeatures.empty(max(dim, 0)), size
    xy, desc, scales, scores = extractor(arr)
    kp = (xy * np.array([sx, sy], np.float32) + np.array([ox, oy], np.float32)).astype(np.float32)
    if getattr(extractor, "pixel_scales", False):
        scales = scales * np.float32((sx + sy) / 2)
    return ExtractedFeatures(
        kp.reshape(-1, 2),
        desc.astype(np.float32),
        scales.astype(np.float32),
        scores.astype(np.float32),
    ), size


def write_image(
    f: h5py.File, name: str, feats: ExtractedFeatures, attrs: Mapping[str, Any]
) -> None:
    """Write one image's features as group ``name`` of an open features file (replacing an
    earlier group of that name), with ``attrs`` and ``done = True`` set last."""
    if name in f:
        del f[name]
    g = f.create_group(name)
    for key in ("keypoints", "descriptors", "scales", "scores"):
        g.create_dataset(key, data=getattr(feats, key))
    for k, v in attrs.items():
        g.attrs[k] = v
    g.attrs["done"] = True


# ---------------------------------------------------------------------------- committed chunks
# Finished images are committed to small chunk files every _COMMIT_IMAGES images or
# _COMMIT_SECONDS seconds, whichever comes first: a kill -9 loses at most that much work.
_COMMIT_IMAGES = 32
_COMMIT_SECONDS = 2.0
_CHUNK_PATTERN = re.compile(r"chunk-(\d{6,})\.h5")
_DATASETS = ("keypoints", "descriptors", "scales", "scores")
_DATASET_LINKS = tuple(k.encode() for k in _DATASETS)
# What h5py raises on a damaged file or object (besides OSError for unreadable blocks).
_H5_ERRORS = (OSError, RuntimeError, KeyError)

_Sources = list[tuple[Path, set[str]]]  # files and the complete images to take from each


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete(f: h5py.File, ids: Iterable[str]) -> tuple[set[str], list[str]]:
    """Of ``ids``, those an open features file holds complete (a group with the ``done``
    attribute and the four datasets) and those marked done that lack a dataset.

    Low-level h5py calls (about 0.1 ms per image, half of what ``name in f`` and
    ``f[name].attrs`` cost): this runs over every image whenever a finished stage is checked.
    """
    fid = f.id
    done: set[str] = set()
    broken: list[str] = []
    for n in ids:
        b = n.encode()
        try:
            if not fid.links.exists(b):
                continue
        except RuntimeError:  # a missing parent group of a nested id ("a/region_1")
            continue
        obj = h5py.h5o.open(fid, b)
        if not isinstance(obj, h5py.h5g.GroupID) or not h5py.h5a.exists(obj, b"done"):
            continue
        if all(obj.links.exists(k) for k in _DATASET_LINKS):
            done.add(n)
        else:
            broken.append(n)
    return done, broken


def _damaged_file(path: Path, what: str, exc: BaseException) -> None:
    """One warning naming a damaged file; the file is removed so that its images are redone."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    logger.warning(
        "%s: damaged %s, cannot be read (%s: %s); redoing its images",
        path,
        what,
        type(exc).__name__,
        msg,
    )
    path.unlink(missing_ok=True)


def _held(path: Path, ids: Iterable[str], what: str) -> set[str] | None:
    """Of ``ids``, the images an existing features file holds complete; None (after one
    warning naming it, and its removal) when it is damaged. Images marked done but lacking a
    dataset are named in a warning and left out (redone)."""
    try:
        with h5py.File(path, "r") as f:
            done, broken = _complete(f, ids)
    except _H5_ERRORS as exc:
        _damaged_file(path, what, exc)
        return None
    if broken:
        logger.warning(
            "%s: damaged %s, %d images marked done lack their features (first: %s); redoing them",
            path,
            what,
            len(broken),
            ", ".join(repr(n) for n in broken[:3]),
        )
    return done


def _legacy_images(path: Path) -> set[str] | None:
    """The complete images of the single append-mode ``.partial`` file of earlier versions
    (None when a kill left it unreadable: warned and removed)."""
    try:
        with h5py.File(path, "r") as f:
            ids: list[str] = []
            f.visit(ids.append)
    except _H5_ERRORS as exc:
        _damaged_file(path, "partial file", exc)
        return None
    return _held(path, ids, "partial file")


def _chunk_images(path: Path) -> set[str] | None:
    """The images of a committed chunk (listed in its ``images`` attribute, each complete);
    None when the chunk is damaged (warned and removed)."""
    try:
        with h5py.File(path, "r") as f:
            ids = json.loads(str(f.attrs["images"]))
            done, _ = _complete(f, ids)
        if len(done) != len(ids):
            raise OSError(f"{len(ids) - len(done)} of its {len(ids)} images are incomplete")
    except (*_H5_ERRORS, ValueError) as exc:
        _damaged_file(path, "committed chunk", exc)
        return None
    return done


def _committed_chunks(folder: Path) -> tuple[_Sources, int]:
    """The committed chunks of a partial folder in commit order, with their images, and the
    next free chunk number. Torn chunks (uncommitted ``.tmp`` files, unreadable chunks) and
    an unfinished merge are removed."""
    if not folder.is_dir():
        return [], 0
    chunks: _Sources = []
    seq, torn = 0, 0
    for p in sorted(folder.iterdir()):
        m = _CHUNK_PATTERN.fullmatch(p.name)
        if m is None:
            if p.name.endswith(".tmp") and p.is_file():
                p.unlink()
                torn += 1
            continue
        seq = max(seq, int(m.group(1)) + 1)
        images = _chunk_images(p)
        if images is not None:
            chunks.append((p, images))
    if torn:
        logger.info("%s: discarded %d uncommitted file(s)", folder, torn)
    return chunks, seq


class _ChunkWriter:
    """Writes finished images into ``<folder>/chunk-<seq>.h5`` files, each written under a
    temporary name and closed; a background thread flushes it to disk and renames it to its
    committed name (off the extraction thread). A chunk torn by a kill is a leftover ``.tmp``
    file, discarded on resume."""

    def __init__(self, folder: Path, conf_output: str, seq: int) -> None:
        self.folder = folder
        self.conf_output = conf_output
        self.seq = seq
        self._names: list[str] = []
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._since = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[tuple[Path, set[str]]]] = []

    def add(self, name: str, feats: ExtractedFeatures, attrs: Mapping[str, Any]) -> None:
        """Write one finished image; commit the chunk when it is full or old enough."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".chunk-{self.seq:06d}.h5.tmp"
            self._file = h5py.File(self._tmp, "w")
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["conf"] = self.conf_output
        write_image(self._file, name, feats, attrs)
        self._names.append(name)
        if len(self._names) >= _COMMIT_IMAGES or time.monotonic() - self._since >= _COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Close the open chunk and hand it to the thread that flushes and renames it."""
        self._since = time.monotonic()
        if self._file is None or self._tmp is None:
            return
        self._file.attrs["images"] = json.dumps(self._names)
        self._file.close()
        path = self.folder / f"chunk-{self.seq:06d}.h5"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-commit")
        self._pending.append(self._pool.submit(_publish, self._tmp, path, set(self._names)))
        self._file, self._tmp, self._names = None, None, []
        self.seq += 1

    def wait(self) -> _Sources:
        """Wait for the commits in flight; the chunks this writer committed, in order."""
        try:
            return [fut.result() for fut in self._pending]
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def discard(self) -> None:
        """Drop the open, uncommitted chunk (after an error inside the file)."""
        if self._file is not None:
            try:
                self._file.close()
            except _H5_ERRORS:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file, self._tmp, self._names = None, None, []


def _publish(tmp: Path, path: Path, names: set[str]) -> tuple[Path, set[str]]:
    _fsync(tmp)
    os.replace(tmp, path)
    return path, names


def _copy_image(src: h5py.File, dst: h5py.File, name: str) -> None:
    """Copy image ``name`` (datasets and attributes) from ``src`` into ``dst``, replacing
    what ``dst`` holds under that name but not the image groups nested in it (ids may
    contain ``/``)."""
    if name not in dst:
        src.copy(src[name], dst, name=name)  # one H5Ocopy of the group
        return
    g, s = dst[name], src[name]
    for key in [k for k, v in g.items() if isinstance(v, h5py.Dataset)]:
        del g[key]
    for key in list(g.attrs):
        del g.attrs[key]
    for key, obj in s.items():
        if isinstance(obj, h5py.Dataset):
            s.copy(obj, g, name=key)
    for key, value in s.attrs.items():
        g.attrs[key] = value


def _merge(out: Path, base: bool, sources: _Sources, scratch: Path, conf_output: str) -> None:
    """Write ``out``: a copy of the existing ``out`` (``base``) or a new file, plus the images
    of ``sources`` (a later source wins), as a temporary file in ``scratch`` flushed to disk
    and renamed onto ``out``."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / ".merged.h5.tmp"
    if base:
        shutil.copyfile(out, tmp)
    with h5py.File(tmp, "r+" if base else "w") as dst:
        dst.attrs["format_version"] = FORMAT_VERSION
        dst.attrs["conf"] = conf_output
        for path, ids in sources:
            with h5py.File(path, "r") as src:
                for n in sorted(ids):  # parents before the ids nested under them
                    _copy_image(src, dst, n)
    _fsync(tmp)
    os.replace(tmp, out)
    _fsync(out.parent)


def main(
    conf: Mapping[str, Any],
    images: Sequence[ImageItem],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Extract features of ``images`` into the HDF5 file ``output`` (resumable, kill-safe).

    Finished images are committed every 32 images or 2 s to chunk files in
    ``<output>.partial.d/`` (written under a temporary name, closed, flushed, renamed); a
    rerun skips the images of committed chunks, and the last step merges the chunks (into a
    copy of an existing ``output``, whose other images are kept) as a temporary file renamed
    onto ``output``. A damaged ``output`` is named in a warning and redone.

    Args:
        conf: a preset of :data:`confs`.
        images: the images (ids must be unique; ``bbx`` set for cropped queries).
        output: the ``.h5`` file to write.
        overwrite: re-extract every image.

    Returns:
        ``output``. Images that cannot be decoded are recorded with ``status="error"`` and no
        features, and listed (by name) in a warning; :func:`failures` returns them.
    """
    out = Path(output)
    names = [it.name for it in images]
    if len(set(names)) != len(names):
        raise ValueError(f"{out}: duplicate image ids among the {len(names)} images to extract")
    partial_dir = out.with_name(out.name + ".partial.d")
    legacy = out.with_name(out.name + ".partial")  # the append-mode file of earlier versions
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        out.unlink(missing_ok=True)
        legacy.unlink(missing_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
    sources: _Sources = []  # finished work not in `out`, oldest first
    if legacy.exists():
        old = _legacy_images(legacy)
        if old is not None:
            sources.append((legacy, old))
    chunks, seq = _committed_chunks(partial_dir)
    sources.extend(chunks)
    pending = set().union(*(ids for _, ids in sources))
    held = None  # the images `out` holds complete (of those asked for and those pending)
    if out.exists():
        held = _held(out, [*names, *pending.difference(names)], "features file")
    if held is not None and pending <= held:
        # nothing newer than `out`: leftovers of a merge killed before it cleaned up
        sources, chunks = [], []
        if held.issuperset(names):
            legacy.unlink(missing_ok=True)
            shutil.rmtree(partial_dir, ignore_errors=True)
            logger.info("features complete, skipping: %s", out)
            return out
    done = (held or set()) | pending
    todo = [it for it in images if it.name not in done]
    if len(todo) < len(images):
        logger.info(
            "%s: resuming, %d of %d images left (%d committed chunks)",
            out.name,
            len(todo),
            len(images),
            len(chunks),
        )
    extractor = make_extractor(conf) if todo else None
    writer = _ChunkWriter(partial_dir, str(conf["output"]), seq)
    bad: list[str] = []
    try:
        for it in tqdm(
            todo,
            desc=f"features {out.name}",
            unit="img",
            disable=len(todo) < 20 or not logger.isEnabledFor(logging.INFO),
        ):
            attrs: dict[str, Any] = {}
            if it.bbx is not None:
                attrs["bbx"] = np.asarray(it.bbx, np.float64)
            try:
                feats, size = extract_image(extractor, it, conf)
                attrs["image_size"] = np.asarray(size, np.int64)
                attrs["status"] = "ok" if feats.descriptors.shape[0] else "empty"
            except (BadImageError, FileNotFoundError, ValueError) as exc:
                bad.append(it.name)
                feats = ExtractedFeatures.empty(max(getattr(extractor, "dim", 128), 0))
                attrs["status"] = "error"
                attrs["error"] = str(exc)
                logger.debug("%s", exc)
            writer.add(it.name, feats, attrs)
    except BaseException:
        try:  # keep the images finished so far (Ctrl-C, a failing extractor)
            writer.commit()
        except _H5_ERRORS:
            writer.discard()
        writer.wait()
        raise
    writer.commit()
    sources.extend(writer.wait())
    _merge(out, held is not None, sources, partial_dir, str(conf["output"]))
    legacy.unlink(missing_ok=True)
    shutil.rmtree(partial_dir, ignore_errors=True)
    write_config(out.parent, dict(conf), name=f"{out.stem}.config.yaml")
    if todo:
        logger.info(
            "%s: %d images extracted, %d kept from earlier runs",
            out.name,
            len(todo),
            len(images) - len(todo),
        )
    if bad:
        logger.warning(
            "%s: %d images could not be read and have no features: %s%s",
            out.name,
            len(bad),
            ", ".join(bad[:20]),
            " ..." if len(bad) > 20 else "",
        )
    return out


# ---------------------------------------------------------------------------- reading
def _check_array(path: str | os.PathLike[str], name: str, key: str, arr: Any, cols: int) -> None:
    """A float (N, cols) array (cols 0: any D); values checked only of numpy arrays."""
    dtype, shape = arr.dtype, arr.shape
    if dtype.kind != "f":  # integers, byte/unicode strings, objects (variable-length strings)
        want = f"(N, {cols})" if cols else "(N, D)"
        raise ValueError(
            f"{path}: image {name!r}: {key} must be a float {want} array, got dtype {dtype} "
            f"shape {tuple(shape)}"
        )
    if len(shape) != 2 or (cols and shape[1] != cols):
        want = f"(N, {cols})" if cols else "(N, D)"
        raise ValueError(f"{path}: image {name!r}: {key} must be {want}, got shape {tuple(shape)}")
    if isinstance(arr, np.ndarray) and not np.isfinite(arr).all():
        raise ValueError(f"{path}: image {name!r}: {key} hold NaN or inf values")


def check_features(
    path: str | os.PathLike[str], name: str, keypoints: Any, descriptors: Any
) -> None:
    """Validate one image's keypoints and descriptors as read from a features file.

    Args:
        path, name: the file and image id (named in the error).
        keypoints: float (N, 2) x, y; a numpy array or an h5py dataset.
        descriptors: float (N, D); a numpy array or an h5py dataset.

    Shapes and dtypes are always checked; values (all finite) only of numpy arrays, so passing
    a dataset checks its metadata without reading it.

    Raises:
        ValueError: naming ``path`` and ``name``: not a float array (integers, byte strings,
            objects), a wrong shape, different keypoint and descriptor counts, NaN or inf.
    """
    _check_array(path, name, "keypoints", keypoints, 2)
    _check_array(path, name, "descriptors", descriptors, 0)
    if keypoints.shape[0] != descriptors.shape[0]:
        raise ValueError(
            f"{path}: image {name!r}: {keypoints.shape[0]} keypoints but "
            f"{descriptors.shape[0]} descriptors"
        )


def _open_features(p: Path) -> h5py.File:
    """Open a features file for reading; a damaged file is a ValueError naming it."""
    if not p.exists():
        raise FileNotFoundError(f"features file not found: {p}")
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise ValueError(f"{p}: damaged features file, cannot be opened ({exc})") from exc


def _damaged(p: Path, name: str | None, exc: BaseException) -> ValueError:
    what = f", image {name!r} cannot be read" if name else ""
    return ValueError(f"{p}: damaged features file{what} ({type(exc).__name__}: {exc})")


def _member(g: Any, key: str) -> Any:
    """``g[key]``, or None when ``g`` is not a group or has no ``key`` (a third of the cost of
    ``g.get(key)``, which looks the name up twice)."""
    if not isinstance(g, h5py.Group):
        return None
    try:
        return g[key]
    except KeyError:
        return None


def _dataset(p: Path, g: Any, name: str, key: str) -> h5py.Dataset:
    obj = _member(g, key)
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"{p}: image {name!r} has no {key!r} dataset")
    return obj


def failures(path: str | os.PathLike[str]) -> dict[str, str]:
    """Images of a features file that could not be decoded: ``{id: error message}``.

    Raises:
        ValueError: the file is damaged (the message names it).
    """
    p = Path(path)
    with _open_features(p) as f:
        try:
            return {
                n: str(f[n].attrs.get("error", ""))
                for n in f
                if f[n].attrs.get("status") == "error"
            }
        except _H5_ERRORS as exc:
            raise _damaged(p, None, exc) from exc


def read_features(path: str | os.PathLike[str], name: str) -> ExtractedFeatures:
    """Read one image's features, validated (:func:`check_features`; scales and scores (N,)).

    Raises:
        ValueError: the image is missing, its arrays are malformed or the file is damaged
            (the message names the file and the image).
    """
    p = Path(path)
    with _open_features(p) as f:
        try:
            if name not in f:
                raise ValueError(f"{p}: no features for image {name!r}")
            g = f[name]
            arrays = [np.asarray(_dataset(p, g, name, k)[()]) for k in _DATASETS]
        except _H5_ERRORS as exc:
            raise _damaged(p, name, exc) from exc
    feats = ExtractedFeatures(*arrays)
    check_features(p, name, feats.keypoints, feats.descriptors)
    n = feats.keypoints.shape[0]
    for key in ("scales", "scores"):
        a = getattr(feats, key)
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.number):
            raise ValueError(
                f"{p}: image {name!r}: {key} must be ({n},) numbers, got {a.dtype} {a.shape}"
            )
    return feats


def read_descriptors(path: str | os.PathLike[str], names: Sequence[str]) -> list[np.ndarray]:
    """Descriptors of ``names`` in order: a list of float32 (N_i, D) arrays, validated
    (:func:`check_features`; stored keypoints by shape and dtype only, not read).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an image is missing, its arrays are malformed or the file is damaged (the
            message names the file and the image).
    """
    p = Path(path)
    out: list[np.ndarray] = []
    with _open_features(p) as f:
        current: str | None = None
        try:
            missing = [n for n in names if n not in f]
            if missing:
                raise ValueError(
                    f"{p}: no features for {len(missing)} images (first: {missing[:3]})"
                )
            for n in names:
                current = n
                g = f[n]
                d = np.asarray(_dataset(p, g, n, "descriptors")[()])
                kp = _member(g, "keypoints")
                if isinstance(kp, h5py.Dataset):
                    check_features(p, n, kp, d)
                else:  # a descriptors-only file (e.g. a codebook training set)
                    _check_array(p, n, "descriptors", d, 0)
                out.append(d.astype(np.float32, copy=False))
        except _H5_ERRORS as exc:
            raise _damaged(p, current, exc) from exc
    return out
