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
* ``delf``: a DELF/DELG SavedModel directory as released with the DELF code. TF2 exports are
  called through ``signatures["serving_default"]``; TF1 exports through the graph tensors
  ``input_image``, ``input_scales``, ``input_abs_thres``, ``input_max_feature_num`` ->
  ``boxes``, ``features``, ``scales``, ``scores``. DELF's configuration: scales 0.25 ... 2.0 by
  sqrt(2), attention threshold 100, at most 1,000 features, L2 -> PCA to 128 -> L2 with a PCA
  file (``.npz`` with ``mean`` (D,), ``projection`` (D', D), optional ``variances``; or the
  released folder of DatumProto files ``mean.datum``, ``pca_proj_mat.datum``,
  ``pca_vars.datum``); locations are the receptive-field centres divided by the scale.

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
reported by name; images without features are recorded as empty. Extraction is resumable: work
goes to ``<file>.partial`` (renamed when complete) and finished images are skipped.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from gldboxes.io import write_config

__all__ = [
    "FORMAT_VERSION",
    "BadImageError",
    "DelfExtractor",
    "ExtractedFeatures",
    "ImageItem",
    "confs",
    "extract_image",
    "failures",
    "load_image",
    "main",
    "make_extractor",
    "output_name",
    "read_datum",
    "read_descriptors",
    "read_features",
    "rootsift",
    "write_image",
]

logger = logging.getLogger("retrieval.features")

FORMAT_VERSION = 1

DELF_SCALES = [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]


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
    "delf": {
        "output": "delf-n1000",
        "model": {
            "name": "delf",
            "path": None,  # SavedModel directory (required)
            "pca_path": None,  # PCA file (.npz) or folder of DELF .datum files; None: no PCA
            "pca_dim": 128,  # output dimension after PCA
            "pca_whitening": False,  # divide by sqrt(variances) (DELF: off)
            "scales": DELF_SCALES,  # image pyramid scales
            "score_threshold": 100.0,  # attention threshold
            "max_features": 1000,
        },
        "preprocessing": {
            "max_side": 1024,
            "min_side": 16,
            "exif_transpose": True,
            "grayscale": False,
        },
        # The DELF authors' matching: 1-NN with L2 distance below 0.8 (DELF match_images),
        # affine RANSAC with a 10 px residual threshold.
        "verification": {
            "max_distance": 0.8,
            "ratio": None,
            "mutual": False,
            "threshold": 10.0,
            "min_inliers": 0,
        },
    },
}


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


# ---------------------------------------------------------------------------- DELF
def read_datum(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a DELF ``DatumProto`` file (``mean.datum``, ``pca_proj_mat.datum`` ...).

    The message is ``{shape: {dim: repeated int64}, float_list: {value: repeated float}}``
    (or ``uint32_list``); decoded here from the protobuf wire format without DELF's protos.
    """
    path = Path(path)
    buf = path.read_bytes()

    def varint(b: bytes, i: int) -> tuple[int, int]:
        out = shift = 0
        while True:
            if i >= len(b):
                raise ValueError(f"{path}: truncated DatumProto")
            c = b[i]
            i += 1
            out |= (c & 0x7F) << shift
            if not c & 0x80:
                return out, i
            shift += 7

    def fields(b: bytes) -> Iterable[tuple[int, int, Any]]:
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(b, i)
                yield num, wt, v
            elif wt == 2:
                ln, i = varint(b, i)
                yield num, wt, b[i : i + ln]
                i += ln
            elif wt == 5:
                yield num, wt, b[i : i + 4]
                i += 4
            elif wt == 1:
                yield num, wt, b[i : i + 8]
                i += 8
            else:
                raise ValueError(f"{path}: unsupported protobuf wire type {wt}")

    dims: list[int] = []
    values: list[np.ndarray] = []
    for num, wt, v in fields(buf):
        if num == 1 and wt == 2:  # shape
            for n2, w2, v2 in fields(v):
                if n2 == 1 and w2 == 0:
                    dims.append(int(v2))
                elif n2 == 1 and w2 == 2:  # packed int64
                    j = 0
                    while j < len(v2):
                        d, j = varint(v2, j)
                        dims.append(d)
        elif num in (2, 3) and wt == 2:  # float_list / uint32_list
            for n2, w2, v2 in fields(v):
                if n2 != 1:
                    continue
                if num == 2 and w2 == 2:
                    values.append(np.frombuffer(v2, "<f4"))
                elif num == 2 and w2 == 5:
                    values.append(np.array(struct.unpack("<f", v2), np.float32))
                elif num == 3 and w2 == 2:
                    j, vals = 0, []
                    while j < len(v2):
                        d, j = varint(v2, j)
                        vals.append(d)
                    values.append(np.array(vals, np.float32))
                elif num == 3 and w2 == 0:
                    values.append(np.array([v2], np.float32))
    data = np.concatenate(values) if values else np.zeros(0, np.float32)
    if dims and int(np.prod(dims)) != data.size:
        raise ValueError(f"{path}: DatumProto shape {dims} does not match {data.size} values")
    return data.reshape(dims).astype(np.float32) if dims else data.astype(np.float32)


def _load_pca(
    path: str | os.PathLike[str], dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mean (D,), projection (dim, D), variances (dim,) or None) from .npz or a .datum folder."""
    p = Path(path)
    if p.is_dir():
        mean = read_datum(p / "mean.datum").ravel()
        proj = read_datum(p / "pca_proj_mat.datum")
        var_p = p / "pca_vars.datum"
        var = read_datum(var_p).ravel() if var_p.exists() else None
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "mean" not in z or "projection" not in z:
                raise ValueError(f"{p}: a PCA .npz needs 'mean' and 'projection' arrays")
            mean, proj = z["mean"].ravel(), z["projection"]
            var = z["variances"].ravel() if "variances" in z else None
    else:
        raise ValueError(f"{p}: PCA file must be an .npz or a folder of DELF .datum files")
    if proj.ndim != 2 or proj.shape[1] != mean.size or proj.shape[0] < dim:
        raise ValueError(
            f"{p}: projection {proj.shape} does not fit mean ({mean.size},) and pca_dim {dim}"
        )
    return (
        mean.astype(np.float32),
        proj[:dim].astype(np.float32),
        None if var is None else var[:dim].astype(np.float32),
    )


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class DelfExtractor:
    """Run a DELF/DELG SavedModel (TF2 signature or TF1 named tensors) with DELF's settings.

    Call with an RGB uint8 (H, W, 3) image; returns ``(xy (N, 2), descriptors (N, D'),
    scales (N,), scores (N,))`` with xy in input-image pixels.
    """

    def __init__(self, model: Mapping[str, Any]) -> None:
        if not model.get("path"):
            raise ValueError("delf features need model.path: a DELF SavedModel directory")
        path = Path(str(model["path"]))
        if not (path / "saved_model.pb").exists():
            raise FileNotFoundError(f"no saved_model.pb in the DELF model directory {path}")
        import tensorflow as tf

        self.tf = tf
        self.scales = np.asarray(model.get("scales", DELF_SCALES), np.float32)
        self.threshold = float(model.get("score_threshold", 100.0))
        self.max_features = int(model.get("max_features", 1000))
        self.pca = (
            None
            if not model.get("pca_path")
            else _load_pca(str(model["pca_path"]), int(model.get("pca_dim", 128)))
        )
        self.whiten = bool(model.get("pca_whitening", False))
        self._fn: Any = None
        self._sess: Any = None
        loaded = None
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:
            logger.debug("TF2 load of %s failed (%s); trying a TF1 session", path, exc)
        if loaded is not None and "serving_default" in getattr(loaded, "signatures", {}):
            self._model = loaded  # keep a reference: the signature needs its variables alive
            self._fn = loaded.signatures["serving_default"]
        else:
            graph = tf.Graph()
            self._sess = tf.compat.v1.Session(graph=graph)
            with graph.as_default():
                tf.compat.v1.saved_model.loader.load(
                    self._sess, [tf.compat.v1.saved_model.tag_constants.SERVING], str(path)
                )
        self.dim = int(self.pca[1].shape[0]) if self.pca is not None else -1

    def _run(self, img: np.ndarray) -> tuple[np.ndarray, ...]:
        tf = self.tf
        feeds = {
            "input_image": img,
            "input_scales": self.scales,
            "input_abs_thres": np.float32(self.threshold),
            "input_max_feature_num": np.int32(self.max_features),
        }
        if self._fn is not None:
            out = self._fn(**{k: tf.constant(v) for k, v in feeds.items()})
            return tuple(np.asarray(out[k]) for k in ("boxes", "features", "scales", "scores"))
        fetches = [f"{k}:0" for k in ("boxes", "features", "scales", "scores")]
        res = self._sess.run(fetches, feed_dict={f"{k}:0": v for k, v in feeds.items()})
        return tuple(np.asarray(r) for r in res)

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, ...]:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        boxes, feats, scales, scores = self._run(np.ascontiguousarray(img, np.uint8))
        boxes = boxes.reshape(-1, 4).astype(np.float32)
        scales = scales.reshape(-1).astype(np.float32)
        # Receptive-field boxes are (ymin, xmin, ymax, xmax) at the pyramid scale.
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0 / np.maximum(scales[:, None], 1e-12)
        xy = centres[:, ::-1].astype(np.float32)
        d = _l2n(feats.reshape(boxes.shape[0], -1).astype(np.float32))
        if self.pca is not None and d.shape[0]:
            mean, proj, var = self.pca
            d = (d - mean) @ proj.T
            if self.whiten and var is not None:
                d = d / np.sqrt(var + 1e-12)
            d = _l2n(d)
        return xy, d, scales, scores.reshape(-1).astype(np.float32)


# ---------------------------------------------------------------------------- extraction
def make_extractor(conf: Mapping[str, Any]) -> Any:
    """The extractor of a features preset (the one :func:`main` uses), ready for
    :func:`extract_image`.

    Args:
        conf: a preset of :data:`confs` (with any ``model`` overrides resolved).

    Returns:
        a RootSIFT extractor (OpenCV SIFT + RootSIFT) for ``model.name == "rootsift"``, or a
        :class:`DelfExtractor` (its SavedModel loaded here) for ``"delf"``; both expose ``dim``
        and ``__call__(image) -> (keypoints (N, 2), descriptors (N, D), scales (N,),
        scores (N,))``.

    Raises:
        ValueError: an unknown ``model.name``.
    """
    name = conf["model"]["name"]
    if name == "rootsift":
        return _RootSift(conf["model"])
    if name == "delf":
        return DelfExtractor(conf["model"])
    raise ValueError(f"unknown feature model {name!r}; expected 'rootsift' or 'delf'")


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
    if conf["model"]["name"] == "rootsift":
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


def main(
    conf: Mapping[str, Any],
    images: Sequence[ImageItem],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Extract features of ``images`` into the HDF5 file ``output`` (resumable).

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
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        out.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    if out.exists():
        with h5py.File(out, "r") as f:
            todo = [it for it in images if it.name not in f or not f[it.name].attrs.get("done")]
        if not todo:
            logger.info("features complete, skipping: %s", out)
            return out
        os.replace(out, partial)
    try:
        fh = h5py.File(partial, "a")
    except OSError as exc:
        logger.warning("%s: unreadable partial file (%s); starting over", partial, exc)
        partial.unlink()
        fh = h5py.File(partial, "a")
    bad: list[str] = []
    with fh as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["conf"] = conf["output"]
        todo = [it for it in images if it.name not in f or not f[it.name].attrs.get("done")]
        if len(todo) < len(images):
            logger.info("%s: resuming, %d of %d images left", out.name, len(todo), len(images))
        extractor = make_extractor(conf) if todo else None
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
            write_image(f, it.name, feats, attrs)
    os.replace(partial, out)
    write_config(out.parent, dict(conf), name=f"{out.stem}.config.yaml")
    if bad:
        logger.warning(
            "%s: %d images could not be read and have no features: %s%s",
            out.name,
            len(bad),
            ", ".join(bad[:20]),
            " ..." if len(bad) > 20 else "",
        )
    return out


def failures(path: str | os.PathLike[str]) -> dict[str, str]:
    """Images of a features file that could not be decoded: ``{id: error message}``."""
    with h5py.File(path, "r") as f:
        return {
            n: str(f[n].attrs.get("error", "")) for n in f if f[n].attrs.get("status") == "error"
        }


def read_features(path: str | os.PathLike[str], name: str) -> ExtractedFeatures:
    """Read one image's features."""
    p = Path(path)
    with h5py.File(p, "r") as f:
        if name not in f:
            raise ValueError(f"{p}: no features for image {name!r}")
        g = f[name]
        return ExtractedFeatures(
            *(np.asarray(g[k][()]) for k in ("keypoints", "descriptors", "scales", "scores"))
        )


def read_descriptors(path: str | os.PathLike[str], names: Sequence[str]) -> list[np.ndarray]:
    """Descriptors of ``names`` in order: a list of float32 (N_i, D) arrays.

    Raises:
        ValueError: an image is missing from the file (the message names it).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"features file not found: {p}")
    out: list[np.ndarray] = []
    with h5py.File(p, "r") as f:
        missing = [n for n in names if n not in f]
        if missing:
            raise ValueError(f"{p}: no features for {len(missing)} images (first: {missing[:3]})")
        for n in names:
            out.append(np.asarray(f[n]["descriptors"][()], np.float32))
    return out
