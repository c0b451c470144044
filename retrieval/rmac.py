"""MAC / R-MAC global descriptors, AML re-ranking and query expansion (Tolias et al., ICLR 2016).

The pipeline of "Particular object retrieval with integral max-pooling of CNN activations":

1. **Activations**: the last convolutional map of a Keras backbone (ResNet50/101: the output of
   ``conv5_block3``; VGG16: ``block5_conv3`` after its ReLU, i.e. before ``pool5``), images at
   any size and aspect ratio, downscaled to ``max_side``. Queries are cropped to their
   ground-truth box at the database's scale.
2. **MAC** is the per-channel maximum over the whole map; **R-MAC** max-pools the square regions
   of the R-MAC grid (:func:`retrieval.regions.rmac_grid`, evaluated on the map's cells, shared
   with the RMACB region source), L2-normalises each regional vector, PCA-whitens it (learned on
   another dataset's regional vectors), L2-normalises again, sums and L2-normalises.
3. **AML** (approximate max-pooling localisation): the max over a window is approximated by the
   generalised mean ``(sum_p x(p)^alpha)^(1/alpha)`` (``alpha = 10``), read in O(1) per channel
   from integral images of ``x^alpha``. Candidate windows lie on a grid of step ``t`` (in map
   cells) and keep an aspect ratio within a factor ``s`` of the query's; the best window (cosine
   with the query's MAC vector) is refined by coordinate descent (steps ``3, 2, 1``, five rounds
   each). The top ``N`` images are re-ranked by the similarity of the query's R-MAC with the
   R-MAC of their localised window (computed on the window's activations).
4. **Query expansion**: the mean of the query vector and the top 5 re-ranked window vectors
   re-ranks the top ``N`` again.

These are the semantics of the authors' released MATLAB/MEX code (``test.m``, ``aml.c``); the
database activations are stored quantised to 8 bits per value (the authors used 4 bits). One
difference: when no window passes the aspect-ratio filter, the search starts from the whole map
with its real score (``aml.c`` starts from a score of -1e11). Cost: AML re-ranking computes the
float64 integral images of every re-ranked map per query, which dominates its time
(``benchmarks/aml_rerank.py``).

Files (under ``OUT/rmac``)::

    features/<tag>/<name>.h5       per image: regional (R, C) L2-normalised regional max-pooled
                                   vectors, mac (C,), optionally maps uint8 (h, w, C) + scale (C,)
    whitening/<tag>-<trainset>/whitening.npz   mean (C,), proj (d, C), eigvals (d,)
    results/<method>-<tag>-<trainset>-<dataset>/ranks.npy, metrics.json, config.yaml

TensorFlow/Keras is imported inside the functions that need it.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval.regions import rmac_grid

__all__ = [
    "BACKBONES",
    "FORMAT_VERSION",
    "METHODS",
    "Backbone",
    "RmacResult",
    "Whitening",
    "aggregate_rmac",
    "aml_localize",
    "aml_localize_loop",
    "aml_rerank",
    "aml_windows",
    "approx_max",
    "build_backbone",
    "confs",
    "extract",
    "integral_images",
    "learn_whitening",
    "load_rgb",
    "map_descriptors",
    "query_expansion",
    "read_features",
    "region_max_pool",
    "region_max_pool_loop",
    "resolve_conf",
    "rmac_regions",
    "run_rmac",
    "search",
]

logger = logging.getLogger("retrieval.rmac")

FORMAT_VERSION = 1
METHODS = ("mac", "rmac", "rmac+aml", "rmac+aml+qe", "learned-rmac")
BACKBONES = ("resnet50", "resnet101", "vgg16", "tiny")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _conf(backbone: str, weights: str | None, max_side: int) -> dict[str, Any]:
    return {
        "method": "rmac",  # mac | rmac | rmac+aml | rmac+aml+qe | learned-rmac
        "backbone": backbone,  # resnet50 | resnet101 | vgg16 | tiny (a small CNN for CPU tests)
        "weights": weights,  # "imagenet" (Keras download), None (random, seeded) or a file path
        "seed": 0,  # seeds the random initialisation when weights is None
        "max_side": max_side,  # images are downscaled so that their long side is at most this
        "levels": 3,  # R-MAC levels L (Tolias: 3)
        "overlap": 0.4,  # desired overlap of neighbouring R-MAC regions (Tolias: 0.4)
        "whitening_dim": None,  # PCA-whitening output dimension (None: all non-null components)
        "whitening_eps": 1e-6,  # eigenvalue floor, relative to the largest eigenvalue
        "aml": {
            "alpha": 10.0,  # generalised-mean exponent of the approximate max (paper: 10)
            "step": 3,  # window grid step t in map cells (paper: 3)
            "ratio": 1.1,  # aspect-ratio tolerance s: |log(r_window / r_query)| <= log(s)
            "refine_step": 3,  # coordinate-descent refinement steps 3, 2, 1
            "refine_iter": 5,  # at most this many rounds per refinement step
            "rerank": 1000,  # re-rank the top N images (paper: 1000)
            "chunk_mb": 256,  # memory budget of one batch of integral images
        },
        "qe": 5,  # query expansion: the query plus its top-k re-ranked windows (paper: 5)
        "model": None,  # learned-rmac: the folder written by retrieval.learned_rmac.main
        "maps_memory_mb": 2048,  # keep database activations in memory when they fit
    }


#: Named presets; ``weights="imagenet"`` needs Keras' download (or pass a weights file).
confs: dict[str, dict[str, Any]] = {
    "resnet101-rmac": _conf("resnet101", "imagenet", 1024),
    "resnet50-rmac": _conf("resnet50", "imagenet", 1024),
    "vgg16-rmac": _conf("vgg16", "imagenet", 1024),
    # CPU tests and the synthetic world: a small random CNN (stride 8, 64 channels).
    "tiny-rmac": _conf("tiny", None, 320),
}


def resolve_conf(
    preset: str | Mapping[str, Any] = "resnet101-rmac", **overrides: Any
) -> dict[str, Any]:
    """A preset (name or dict) with overrides applied; ``aml`` overrides merge key by key."""
    if isinstance(preset, str):
        if preset not in confs:
            raise ValueError(f"unknown R-MAC preset {preset!r}; expected one of {sorted(confs)}")
        conf = copy.deepcopy(confs[preset])
    else:
        conf = copy.deepcopy(dict(preset))
    for key, value in overrides.items():
        if key == "aml" and isinstance(value, Mapping):
            conf["aml"] = {**conf.get("aml", {}), **value}
        else:
            conf[key] = value
    if conf.get("method") not in METHODS:
        raise ValueError(f"R-MAC conf: unknown method {conf.get('method')!r}; expected {METHODS}")
    if conf.get("backbone") not in BACKBONES:
        raise ValueError(
            f"R-MAC conf: unknown backbone {conf.get('backbone')!r}; expected {BACKBONES}"
        )
    if int(conf["levels"]) < 1:
        raise ValueError(f"R-MAC conf: levels must be >= 1, got {conf['levels']}")
    return conf


# =========================================================================== backbone
@dataclass
class Backbone:
    """A Keras backbone cut at its last convolutional map.

    Attributes:
        name: ``resnet50`` | ``resnet101`` | ``vgg16`` | ``tiny``.
        model: keras Model, (B, H, W, 3) preprocessed float32 -> (B, h, w, C) non-negative.
        channels: C.
        mode: input preprocessing, ``caffe`` (BGR, ImageNet mean) or ``tf`` (to [-1, 1]).
    """

    name: str
    model: Any
    channels: int
    mode: str
    _fn: Any = None

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) RGB uint8 -> float32 network input."""
        x = np.asarray(images, np.float32)
        if self.mode == "caffe":
            x = x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
        else:
            x = x / 127.5 - 1.0
        return np.ascontiguousarray(x)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) RGB uint8 images of one size -> (B, h, w, C) float32 activations."""
        import tensorflow as tf

        if self._fn is None:
            self._fn = tf.function(
                lambda x: self.model(x, training=False),
                input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            )
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"backbone {self.name}: expected (B, H, W, 3) images, got {arr.shape}")
        out = self._fn(tf.constant(self.preprocess(arr))).numpy()
        return np.maximum(out, 0.0).astype(np.float32, copy=False)


def _tiny_model(keras: Any, seed: int) -> Any:
    """A small VGG-like CNN (stride 8, 64 channels): the CPU backbone of tests and tiny runs."""
    init = keras.initializers.HeNormal(seed=seed)
    inp = keras.Input((None, None, 3))
    x = inp
    for i, ch in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(
            ch,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=init,
            name=f"tiny_conv{i + 1}",
        )(x)
        if i < 3:
            x = keras.layers.MaxPooling2D(2, name=f"tiny_pool{i + 1}")(x)
    return keras.Model(inp, x, name="tiny")


def build_backbone(name: str, weights: str | None = None, *, seed: int = 0) -> Backbone:
    """Build a backbone cut at its last convolutional map.

    Args:
        name: ``resnet50``, ``resnet101``, ``vgg16`` or ``tiny``.
        weights: ``"imagenet"`` (Keras downloads them; needs the internet), ``None`` (random
            initialisation, seeded by ``seed``) or the path of a Keras weights file
            (``.weights.h5`` / ``.h5``) for this architecture.
        seed: seed of the random initialisation.
    """
    import keras

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    path: Path | None = None
    kweights: str | None = None
    if weights == "imagenet":
        if name == "tiny":
            raise ValueError("backbone 'tiny' has no ImageNet weights; use weights=None or a file")
        kweights = "imagenet"
    elif weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
    keras.utils.set_random_seed(seed)
    shape = (None, None, 3)
    apps = {"resnet50": "ResNet50", "resnet101": "ResNet101", "vgg16": "VGG16"}
    if name in apps:
        try:
            full = getattr(keras.applications, apps[name])(
                include_top=False, weights=kweights, input_shape=shape
            )
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            if kweights != "imagenet" or not (
                isinstance(exc, OSError) or "URL fetch failure" in str(exc)
            ):
                raise
            file = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
            cache = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"
            raise ConnectionError(
                f"backbone {name}: cannot download its ImageNet weights {file} "
                f"({' '.join(str(exc).split())}); copy that file into {cache}/ "
                "or pass --weights FILE (a Keras weights file of this backbone; "
                "--weights random for a seeded random initialisation)"
            ) from exc
        model = (
            keras.Model(full.input, full.get_layer("block5_conv3").output, name="vgg16_conv5")
            if name == "vgg16"
            else full
        )
        mode = "caffe"
    else:
        model = _tiny_model(keras, seed)
        mode = "tf"
    if path is not None:
        try:
            model.load_weights(str(path))
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: cannot load {name} weights ({exc})") from exc
    return Backbone(name=name, model=model, channels=int(model.output.shape[-1]), mode=mode)


# =========================================================================== images
def load_rgb(
    path: str | os.PathLike[str],
    max_side: int,
    bbx: Sequence[float] | None = None,
    *,
    min_side: int = 16,
) -> np.ndarray:
    """Decode an image as RGB, downscale its long side to ``max_side``, crop to ``bbx``.

    The crop ``bbx = (x1, y1, x2, y2)`` is in original pixels and is applied after the downscale,
    so a cropped query has the same scale as the database images. Images smaller than
    ``min_side`` are upscaled to it (the backbones need a few cells).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    import cv2

    from retrieval.features import load_image

    arr, (w0, h0), _ = load_image(path, grayscale=False, max_side=max_side)
    s = min(1.0, max_side / max(w0, h0))
    nw, nh = max(1, round(w0 * s)), max(1, round(h0 * s))
    if arr.shape[:2] != (nh, nw):
        arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
    if bbx is not None:
        x1, y1, x2, y2 = (float(v) * s for v in bbx)
        c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c2, r2 = min(nw, math.ceil(x2)), min(nh, math.ceil(y2))
        if c2 <= c1 or r2 <= r1:
            raise ValueError(f"{path}: bbx {list(bbx)} does not overlap the {w0}x{h0} image")
        arr = arr[r1:r2, c1:c2]
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        f = min_side / min(h, w)
        arr = cv2.resize(
            arr,
            (max(min_side, round(w * f)), max(min_side, round(h * f))),
            interpolation=cv2.INTER_LINEAR,
        )
    return np.ascontiguousarray(arr)


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


def _l2n(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
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
    return _l2n(fmap.max(axis=(0, 1))), _l2n(reg)


# =========================================================================== whitening
@dataclass(frozen=True)
class Whitening:
    """PCA-whitening ``P (x - m)`` learned on regional vectors of another dataset.

    Attributes:
        mean: (C,) float32. proj: (d, C) float32 (rows scaled by eigval^-1/2).
        eigvals: (d,) float64. meta: training set, counts, backbone tag.
    """

    mean: np.ndarray
    proj: np.ndarray
    eigvals: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, C) -> (N, d) whitened and L2-normalised."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"whitening: expected (N, {self.mean.shape[0]}) vectors, got {x.shape}"
            )
        return _l2n((x - self.mean) @ self.proj.T)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(FORMAT_VERSION),
                kind=np.str_("pca_whitening"),
                mean=self.mean,
                proj=self.proj,
                eigvals=self.eigvals,
                meta=np.str_(json.dumps(self.meta, sort_keys=True)),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Whitening:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"whitening file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a readable whitening .npz ({exc})") from exc
        for key in ("format_version", "kind", "mean", "proj", "eigvals"):
            if key not in data:
                raise ValueError(f"{path}: whitening file has no {key!r} array")
        if str(data["kind"]) != "pca_whitening":
            raise ValueError(f"{path}: not a PCA-whitening file (kind {str(data['kind'])!r})")
        if int(data["format_version"]) != FORMAT_VERSION:
            raise ValueError(
                f"{path}: whitening format_version {int(data['format_version'])}, "
                f"this code reads {FORMAT_VERSION}"
            )
        mean, proj = data["mean"].astype(np.float32), data["proj"].astype(np.float32)
        if proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
            raise ValueError(f"{path}: proj {proj.shape} does not match mean {mean.shape}")
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        return cls(mean, proj, data["eigvals"].astype(np.float64), meta)


def learn_whitening(
    vectors: np.ndarray,
    *,
    dim: int | None = None,
    eps: float = 1e-6,
    meta: Mapping[str, Any] | None = None,
) -> Whitening:
    """Learn PCA-whitening on (N, C) regional vectors (Tolias: on another dataset).

    Keeps at most ``min(dim, C, N - 1)`` components; eigenvalues are floored at ``eps`` times the
    largest one so that near-null directions are not blown up.
    """
    x = np.asarray(vectors, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"learn_whitening: need (N >= 2, C) vectors, got shape {x.shape}")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    d = min(dim or x.shape[1], x.shape[1], x.shape[0] - 1)
    eigvals, eigvecs = eigvals[:d], eigvecs[:, :d]
    floor = max(eps * float(eigvals[0]), 1e-12)
    ev = np.maximum(eigvals, floor)
    proj = (eigvecs / np.sqrt(ev)[None, :]).T
    return Whitening(
        mean.astype(np.float32),
        proj.astype(np.float32),
        ev,
        {"n_train": int(x.shape[0]), "dim": int(d), **dict(meta or {})},
    )


def aggregate_rmac(
    regional: np.ndarray, counts: Sequence[int] | np.ndarray, whitening: Whitening | None
) -> np.ndarray:
    """R-MAC of several images: whiten + L2 each region, sum per image, L2.

    Args:
        regional: (sum(counts), C) L2-normalised regional vectors, image after image.
        counts: regions per image (n,); every image needs at least one region.
        whitening: PCA-whitening (None: regional vectors are summed as they are).

    Returns:
        (n, d) float32 L2-normalised.
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or np.any(counts < 1) or int(counts.sum()) != len(regional):
        raise ValueError(
            f"aggregate_rmac: counts {counts.tolist()[:5]}... do not split "
            f"{len(regional)} regional vectors (each image needs >= 1 region)"
        )
    v = whitening.apply(regional) if whitening is not None else _l2n(regional)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return _l2n(np.add.reduceat(v, starts, axis=0))


# =========================================================================== AML
def _power(x: np.ndarray, alpha: float) -> np.ndarray:
    """``x ** alpha`` in place, by repeated squaring when ``alpha`` is a small integer (faster)."""
    if float(alpha).is_integer() and 1 <= alpha <= 64:
        n = int(alpha)
        out: np.ndarray | None = None
        base = x
        while n:
            if n & 1:
                out = base.copy() if out is None else np.multiply(out, base, out=out)
            n >>= 1
            if n:
                base = base * base
        assert out is not None
        return out
    return np.power(x, alpha, out=x)


def integral_images(maps: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Integral images of ``(x / scale)^alpha`` with a zero first row and column.

    ``scale`` is the per-image, per-channel maximum, so powers stay in [0, 1] (no overflow).

    Args:
        maps: (G, H, W, C) non-negative activations.

    Returns:
        ``(ii (G, H + 1, W + 1, C) float64, scale (G, C) float64)``.
    """
    x = np.asarray(maps, np.float64)
    if x.ndim != 4:
        raise ValueError(f"integral_images: maps must be (G, H, W, C), got shape {x.shape}")
    if x.size and x.min() < 0:
        raise ValueError("integral_images: activations must be non-negative (after ReLU)")
    scale = x.max(axis=(1, 2))
    scale[scale <= 0] = 1.0
    g, h, w, c = x.shape
    ii = np.zeros((g, h + 1, w + 1, c))
    p = _power(x / scale[:, None, None, :], alpha)
    np.cumsum(p, axis=1, out=p)
    np.cumsum(p, axis=2, out=ii[:, 1:, 1:])
    return ii, scale


def approx_max(
    ii: np.ndarray, scale: np.ndarray, img: np.ndarray, boxes: np.ndarray, alpha: float
) -> np.ndarray:
    """Approximate max-pooling of windows, O(1) per channel from integral images.

    Args:
        ii, scale: from :func:`integral_images`.
        img: (N,) image index; boxes: (N, 4) ``[x0, y0, x1, y1]`` cells, end exclusive.

    Returns:
        (N, C) ``scale * (sum_p (x(p)/scale)^alpha)^(1/alpha)`` over each window.
    """
    img = np.asarray(img, np.int64)
    b = np.asarray(boxes, np.int64)
    s = (
        ii[img, b[:, 3], b[:, 2]]
        - ii[img, b[:, 1], b[:, 2]]
        - ii[img, b[:, 3], b[:, 0]]
        + ii[img, b[:, 1], b[:, 0]]
    )
    return np.maximum(s, 0.0) ** (1.0 / alpha) * scale[img]


def aml_windows(
    height: int, width: int, step: int, qratio: float | None, ratio: float
) -> np.ndarray:
    """Candidate windows of AML on a ``height x width`` map (the order of the authors' loops).

    Windows are at least 2 cells on each side; tops/lefts are ``0, t, 2t, ...`` and heights /
    widths ``2, 2 + t, ...``. With ``qratio`` (query height / width), windows whose
    height/width ratio differs from it by more than a factor ``ratio`` are dropped.

    Returns:
        (Nw, 4) int64 ``[x0, y0, x1, y1]``, end exclusive, ordered by y0, y1, x0, x1.
    """

    def spans(n: int) -> np.ndarray:
        a = np.arange(0, n - 1, step)
        lo, ext = np.meshgrid(a, np.arange(0, n, step), indexing="ij")
        hi = lo + 2 + ext
        keep = hi <= n
        return np.stack([lo[keep], hi[keep]], 1)

    ys, xs = spans(height), spans(width)
    if len(ys) == 0 or len(xs) == 0:
        return np.zeros((0, 4), np.int64)
    iy, ix = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    y, x = ys[iy.ravel()], xs[ix.ravel()]
    win = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.int64)
    if qratio is not None and qratio > 0:
        r = (win[:, 3] - win[:, 1]) / (win[:, 2] - win[:, 0])
        win = win[np.abs(np.log(qratio / r)) <= math.log(ratio) + 1e-12]
    return win


def _cosines(
    ii: np.ndarray,
    scale: np.ndarray,
    q: np.ndarray,
    img: np.ndarray,
    boxes: np.ndarray,
    alpha: float,
    chunk: int,
) -> np.ndarray:
    out = np.empty(len(boxes))
    for s in range(0, len(boxes), chunk):
        v = approx_max(ii, scale, img[s : s + chunk], boxes[s : s + chunk], alpha)
        out[s : s + chunk] = (v @ q) / (np.linalg.norm(v, axis=1) + 1e-12)
    return out


# Coordinate-descent moves of the refinement, in the authors' order: (coordinate, delta sign).
_MOVES = ((1, -1), (1, +1), (3, -1), (3, +1), (0, -1), (0, +1), (2, -1), (2, +1))


def aml_localize(
    maps: np.ndarray,
    query_mac: np.ndarray,
    *,
    qratio: float | None,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
    chunk_mb: float = 64.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Localise the query in G activation maps of one size: window search + refinement.

    Vectorised over images and windows; the result equals :func:`aml_localize_loop`.

    Args:
        maps: (G, H, W, C) non-negative activations.
        query_mac: (C,) the query's MAC vector (the authors localise with MAC, not R-MAC).
        qratio: query height / width (None: no aspect-ratio filter).

    Returns:
        ``(boxes (G, 4) int64 [x0, y0, x1, y1], scores (G,) cosine)``.
    """
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[1] < 2 or maps.shape[2] < 2:
        raise ValueError(f"aml_localize: need (G, H >= 2, W >= 2, C) maps, got {maps.shape}")
    q = np.asarray(query_mac, np.float64)
    if q.shape != (maps.shape[-1],):
        raise ValueError(f"aml_localize: query vector {q.shape} vs {maps.shape[-1]} channels")
    q = q / (np.linalg.norm(q) + 1e-12)
    g, h, w, c = maps.shape
    ii, scale = integral_images(maps, alpha)
    chunk = max(1, int(chunk_mb * 2**20 / (8 * c)))
    win = aml_windows(h, w, step, qratio, ratio)
    if len(win) == 0:  # no window passes the filter: start from the whole map
        win = np.array([[0, 0, w, h]], np.int64)
    nw = len(win)
    img = np.repeat(np.arange(g), nw)
    scores = _cosines(ii, scale, q, img, np.tile(win, (g, 1)), alpha, chunk).reshape(g, nw)
    first = np.argmax(scores, axis=1)  # first maximum, as the authors' strict '>'
    best = win[first].copy()
    best_s = scores[np.arange(g), first]
    limit = {0: w, 1: h, 2: w, 3: h}
    for st in range(refine_step, 0, -1):
        active = np.ones(g, bool)
        for _ in range(refine_iter):
            if not active.any():
                break
            changed = np.zeros(g, bool)
            for coord, sign in _MOVES:
                lo, hi = (coord % 2, coord % 2 + 2)  # (x0, x1) or (y0, y1)
                cand = best.copy()
                cand[:, coord] += sign * st
                if coord == lo and sign < 0:
                    ok = best[:, lo] - st >= 0
                elif coord == hi and sign > 0:
                    ok = best[:, hi] + st <= limit[coord]
                else:  # shrinking: keep at least 2 cells
                    ok = best[:, hi] - best[:, lo] - st >= 2
                sel = np.flatnonzero(ok & active)
                if sel.size == 0:
                    continue
                s_new = _cosines(ii, scale, q, sel, cand[sel], alpha, chunk)
                better = s_new > best_s[sel]
                upd = sel[better]
                best[upd] = cand[upd]
                best_s[upd] = s_new[better]
                changed[upd] = True
            active &= changed
    return best, best_s


def aml_localize_loop(
    fmap: np.ndarray,
    query_mac: np.ndarray,
    *,
    qratio: float | None,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
) -> tuple[np.ndarray, float]:
    """Slow reference of :func:`aml_localize` for one (H, W, C) map, loop for loop as ``aml.c``.

    Window sums are taken directly over the window's cells (no integral images).
    """
    x = np.asarray(fmap, np.float64)
    h, w, _ = x.shape
    scale = x.max(axis=(0, 1))
    scale[scale <= 0] = 1.0
    p = (x / scale) ** alpha
    q = np.asarray(query_mac, np.float64)
    q = q / (np.linalg.norm(q) + 1e-12)

    def score(b: list[int]) -> float:
        v = p[b[1] : b[3], b[0] : b[2]].sum(axis=(0, 1)) ** (1.0 / alpha) * scale
        return float(v @ q / (np.linalg.norm(v) + 1e-12))

    best: list[int] = [0, 0, w, h]
    best_s = -1e11
    found = False
    for i1 in range(1, h, step):  # 1-based rows i1..i2 inclusive, as aml.c
        for i2 in range(i1 + 1, h + 1, step):
            for j1 in range(1, w, step):
                for j2 in range(j1 + 1, w + 1, step):
                    if qratio is not None and qratio > 0:
                        r = abs(math.log(qratio / ((i2 - i1 + 1) / (j2 - j1 + 1))))
                        if r > math.log(ratio) + 1e-12:
                            continue
                    b = [j1 - 1, i1 - 1, j2, i2]
                    s = score(b)
                    found = True
                    if s > best_s:
                        best, best_s = b, s
    if not found:
        best_s = score(best)
    for st in range(refine_step, 0, -1):
        change, it = True, 0
        while change and it < refine_iter:
            change = False
            for coord, sign in _MOVES:
                lo, hi = coord % 2, coord % 2 + 2
                lim = w if coord in (0, 2) else h
                if coord == lo and sign < 0:
                    ok = best[lo] - st >= 0
                elif coord == hi and sign > 0:
                    ok = best[hi] + st <= lim
                else:
                    ok = best[hi] - best[lo] - st >= 2
                if not ok:
                    continue
                cand = list(best)
                cand[coord] += sign * st
                s = score(cand)
                if s > best_s:
                    best, best_s, change = cand, s, True
            it += 1
    return np.asarray(best, np.int64), best_s


# =========================================================================== features I/O
def _feature_tag(conf: Mapping[str, Any]) -> str:
    w = conf.get("weights")
    wtag = (
        "random"
        if w is None
        else (
            "imagenet" if w == "imagenet" else f"w{config_hash({'w': os.path.abspath(str(w))}, 8)}"
        )
    )
    seed = f"-seed{conf.get('seed', 0)}" if w is None else ""
    return f"{conf['backbone']}-{wtag}{seed}-s{conf['max_side']}-L{conf['levels']}"


@dataclass(frozen=True)
class _Item:
    name: str
    path: Path
    bbx: tuple[float, float, float, float] | None = None


def extract(
    conf: Mapping[str, Any],
    items: Sequence[_Item],
    out_h5: str | os.PathLike[str],
    *,
    keep_maps: bool = False,
    backbone: Backbone | Callable[[], Backbone] | None = None,
    overwrite: bool = False,
) -> Path:
    """Activations -> MAC and regional vectors (and optionally quantised maps) of images.

    Writes an HDF5 file with one group per image id: ``mac`` (C,), ``regional`` (R, C), and with
    ``keep_maps`` ``maps`` uint8 (h, w, C) + ``scale`` (C,) (value = maps / 255 * scale). Skipped
    when the file exists with the same configuration (and maps when needed). ``backbone`` may be
    a built :class:`Backbone` or a factory called only when there is work to do.
    """
    import h5py

    out_h5 = Path(out_h5)
    key = config_hash(
        {k: conf[k] for k in ("backbone", "weights", "seed", "max_side", "levels", "overlap")}
        | {"items": [[it.name, str(it.path), it.bbx] for it in items]}
    )
    if out_h5.exists() and not overwrite:
        with h5py.File(out_h5, "r") as f:
            if f.attrs.get("config_hash") == key and (not keep_maps or f.attrs.get("maps")):
                logger.info("features exist, skipping: %s", out_h5)
                return out_h5
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{out_h5}: image ids are not unique")
    if isinstance(backbone, Backbone):
        bb = backbone
    elif backbone is not None:
        bb = backbone()
    else:
        bb = build_backbone(conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0)))
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config_hash"] = key
        f.attrs["maps"] = bool(keep_maps)
        f.attrs["config"] = json.dumps(
            {k: conf[k] for k in ("backbone", "weights", "seed", "max_side", "levels", "overlap")}
        )
        for it in tqdm(items, desc=f"R-MAC {out_h5.stem}", disable=len(items) < 20):
            img = load_rgb(it.path, int(conf["max_side"]), it.bbx)
            fmap = bb(img)[0]
            mac, reg = map_descriptors(fmap, int(conf["levels"]), float(conf["overlap"]))
            grp = f.create_group(it.name)
            grp.create_dataset("mac", data=mac)
            grp.create_dataset("regional", data=reg)
            grp.attrs["image_size"] = (img.shape[1], img.shape[0])
            if keep_maps:
                sc = fmap.max(axis=(0, 1)).astype(np.float32)
                qm = np.round(fmap / np.where(sc > 0, sc, 1.0) * 255.0).astype(np.uint8)
                grp.create_dataset("maps", data=qm, compression="gzip", compression_opts=1)
                grp.create_dataset("scale", data=sc)
    return out_h5


def read_features(
    path: str | os.PathLike[str], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mac (n, C), regional (sum R, C), counts (n,))`` of the named images."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"R-MAC features not found: {path}")
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError(f"{path}: not an R-MAC features file of format {FORMAT_VERSION}")
        missing = [n for n in names if n not in f]
        if missing:
            raise ValueError(f"{path}: no features for {len(missing)} images (e.g. {missing[:3]})")
        mac = np.stack([f[n]["mac"][()] for n in names])
        regs = [f[n]["regional"][()] for n in names]
    return mac, np.concatenate(regs), np.array([len(r) for r in regs], np.int64)


def _read_maps(path: Path, names: Sequence[str]) -> list[np.ndarray]:
    """Dequantised float32 (h, w, C) activation maps of the named images."""
    import h5py

    with h5py.File(path, "r") as f:
        if not f.attrs.get("maps"):
            raise ValueError(f"{path}: holds no activation maps (extract with keep_maps)")
        return [f[n]["maps"][()].astype(np.float32) * (f[n]["scale"][()] / 255.0) for n in names]


# =========================================================================== search + AML
def search(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product ranking: ``(ranks (n_db, n_q) int64, scores (n_db, n_q))`` best first."""
    sim = np.asarray(database, np.float32) @ np.asarray(queries, np.float32).T
    order = np.argsort(-sim, axis=0, kind="stable")
    return order.astype(np.int64), np.take_along_axis(sim, order, axis=0)


def _window_regional(
    stack: np.ndarray, boxes: np.ndarray, levels: int, overlap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Regional vectors of the R-MAC grid of each window (exact max), L2-normalised.

    Args:
        stack: (G, H, W, C) maps of one size; boxes: (G, 4) windows ``[x0, y0, x1, y1]``.

    Returns:
        ``(regional (sum R_g, C), counts (G,))``.
    """
    grids = [
        rmac_regions(int(b[2] - b[0]), int(b[3] - b[1]), levels, overlap=overlap) for b in boxes
    ]
    counts = np.array([len(gr) for gr in grids], np.int64)
    img = np.repeat(np.arange(len(boxes)), counts)
    offs = np.repeat(np.asarray(boxes)[:, [0, 1, 0, 1]], counts, axis=0)
    return _l2n(region_max_pool(stack, img, np.concatenate(grids) + offs)), counts


def aml_rerank(
    query_rmac: np.ndarray,
    query_mac: np.ndarray,
    qratio: float | None,
    top_ids: np.ndarray,
    maps: Sequence[np.ndarray],
    whitening: Whitening | None,
    *,
    levels: int = 3,
    overlap: float = 0.4,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
    chunk_mb: float = 256.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank a query's top N by the R-MAC similarity of the localised windows.

    Images are processed in batches of one map size (at most ``chunk_mb`` of integral images).

    Args:
        query_rmac: (d,) the query's R-MAC; query_mac: (C,) its MAC (localisation).
        qratio: query height / width (aspect-ratio filter).
        top_ids: (N,) database ids of the initial top N, best first.
        maps: N (h, w, C) activation maps of those images (same order).

    Returns:
        ``(ids (N,) re-ranked, scores (N,), window vectors (N, d) in re-ranked order,
        boxes (N, 4) [x0, y0, x1, y1] map cells, in re-ranked order)``.
    """
    n = len(top_ids)
    if len(maps) != n:
        raise ValueError(f"aml_rerank: {len(maps)} maps for {n} images")
    boxes = np.zeros((n, 4), np.int64)
    regional: list[np.ndarray] = [np.empty(0)] * n
    counts = np.zeros(n, np.int64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(m.shape, []).append(i)
    for shape, members in by_shape.items():
        h, w, c = shape
        per_img = (h + 1) * (w + 1) * c * 8
        gsize = max(1, int(chunk_mb * 2**20 // max(per_img, 1)))
        for s in range(0, len(members), gsize):
            sel = members[s : s + gsize]
            stack = np.stack([maps[i] for i in sel])
            if h < 2 or w < 2:
                b = np.tile(np.array([[0, 0, w, h]], np.int64), (len(sel), 1))
            else:
                b, _ = aml_localize(
                    stack,
                    query_mac,
                    qratio=qratio,
                    alpha=alpha,
                    step=step,
                    ratio=ratio,
                    refine_step=refine_step,
                    refine_iter=refine_iter,
                    chunk_mb=min(chunk_mb, 64.0),
                )
            boxes[sel] = b
            reg, cnt = _window_regional(stack, b, levels, overlap)
            for i, part in zip(sel, np.split(reg, np.cumsum(cnt)[:-1]), strict=True):
                regional[i] = part
            counts[sel] = cnt
    vecs = aggregate_rmac(np.concatenate(regional), counts, whitening)
    scores = vecs @ np.asarray(query_rmac, np.float32)
    order = np.argsort(-scores, kind="stable")
    return np.asarray(top_ids)[order], scores[order], vecs[order], boxes[order]


def query_expansion(
    query: np.ndarray, top_vectors: np.ndarray, candidates: np.ndarray, k: int = 5
) -> np.ndarray:
    """Average query expansion: scores of ``candidates`` against mean(query, top k vectors).

    Args:
        query: (d,). top_vectors: (>= k, d) best first. candidates: (N, d).

    Returns:
        (N,) scores (sort descending to re-rank).
    """
    if k < 0:
        raise ValueError(f"query_expansion: k must be >= 0, got {k}")
    q = np.vstack([np.asarray(top_vectors)[:k], np.asarray(query)[None]]).mean(axis=0)
    return np.asarray(candidates) @ q


# =========================================================================== the stage
@dataclass
class RmacResult:
    """What :func:`run_rmac` wrote and measured."""

    method: str
    ranks: Path
    metrics_path: Path
    results: dict[str, Any]
    timings: dict[str, float]
    folder: Path

    def table(self) -> str:
        from retrieval.evaluate import format_table

        return format_table({self.method: self.results})


def _folder_items(root: Path) -> list[_Item]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return [_Item(p.relative_to(root).as_posix().replace("/", "__"), p) for p in files]


def _whitening(
    conf: Mapping[str, Any],
    out: Path,
    tag: str,
    train_items: Sequence[_Item],
    trainset: str,
    backbone: Callable[[], Backbone],
    overwrite: bool,
) -> Path:
    folder = out / "whitening" / f"{tag}-{trainset}"
    path = folder / "whitening.npz"
    if path.exists() and not overwrite:
        return path
    h5 = extract(
        conf,
        train_items,
        out / "features" / tag / f"{trainset}.h5",
        backbone=backbone,
        overwrite=overwrite,
    )
    _, reg, _ = read_features(h5, [it.name for it in train_items])
    wh = learn_whitening(
        reg,
        dim=conf.get("whitening_dim"),
        eps=float(conf["whitening_eps"]),
        meta={"training_set": trainset, "features": tag},
    )
    wh.save(path)
    write_config(folder, {**conf, "training_set": trainset})
    return path


def run_rmac(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any],
    *,
    whitening_images: str | os.PathLike[str] | None = None,
    whitening_dataset: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RmacResult:
    """Rank a Revisited-style dataset with MAC / R-MAC (+AML re-ranking, +QE) or learned R-MAC.

    Args:
        dataset_dir: ``gnd_<name>.pkl`` + ``jpg/`` (roxford5k, rparis6k, the world's
            ``retrieval/``).
        out_dir: output root; everything goes under ``out_dir/rmac/``.
        conf: see :data:`confs` / :func:`resolve_conf`.
        whitening_images: learn the PCA-whitening on this image folder (another dataset, e.g. the
            synthetic world's ``train/images``); or ``whitening_dataset``: another Revisited
            folder's database. Without either the benchmark's own database is used (optimistic,
            a warning says so). Not used by ``learned-rmac`` (its head holds the projection).
        overwrite: redo finished work.

    Returns:
        :class:`RmacResult`; ``results`` maps easy/medium/hard to ``ProtocolResult``, ``timings``
        holds seconds per query of the search and of AML re-ranking.
    """
    from retrieval.datasets import RevisitedDataset
    from retrieval.evaluate import evaluate_protocols

    conf = resolve_conf(conf)
    method = conf["method"]
    ds = RevisitedDataset.load(Path(dataset_dir))
    missing = ds.missing_images()
    if missing:
        raise ValueError(f"{ds.root}: {len(missing)} images missing (first: {missing[:3]})")
    out = Path(out_dir) / "rmac"
    db_items = [_Item(n, ds.image_path(n)) for n in ds.imlist]
    q_items = [_Item(n, ds.image_path(n), ds.query_bbx(i)) for i, n in enumerate(ds.qimlist)]

    if method == "learned-rmac":
        if not conf.get("model"):
            raise ValueError("method learned-rmac needs conf['model'] (a trained model folder)")
        from retrieval.learned_rmac import load_model, model_tag

        mpath = Path(conf["model"])
        tag, trainset = model_tag(mpath), "learned"
    else:
        tag = _feature_tag(conf)
        if whitening_images is not None:
            trainset = (
                f"{Path(whitening_images).name}-"
                f"{config_hash({'d': os.path.abspath(whitening_images)}, 8)}"
            )
        elif whitening_dataset is not None:
            trainset = RevisitedDataset.load(Path(whitening_dataset)).name
        elif method == "mac":
            trainset = "none"
        else:
            trainset = f"{ds.name}-self"
    extra = f"-n{conf['aml']['rerank']}" if "aml" in method else ""
    folder = out / "results" / f"{method}-{tag}-{trainset}-{ds.name}{extra}"
    ranks_path, metrics_path = folder / "ranks.npy", folder / "metrics.json"
    key = config_hash(
        {
            **conf,
            "whitening_images": str(whitening_images),
            "whitening_dataset": str(whitening_dataset),
        }
    )
    if ranks_path.exists() and metrics_path.exists() and not overwrite:
        meta = read_json(metrics_path)
        if meta.get("config_hash") == key:
            logger.info("results exist, skipping: %s", folder)
            ranks = np.load(ranks_path, allow_pickle=False)
            res = evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)
            return RmacResult(
                method, ranks_path, metrics_path, res, meta.get("timings", {}), folder
            )

    timings: dict[str, float] = {}
    if method == "learned-rmac":
        model = load_model(mpath)
        db = model.describe_paths([it.path for it in db_items])
        qv = model.describe_paths([it.path for it in q_items], [it.bbx for it in q_items])
        t0 = time.perf_counter()
        ranks, _ = search(qv, db)
        timings["search_s_per_query"] = (time.perf_counter() - t0) / max(ds.n_queries, 1)
    else:
        bb_cache: list[Backbone] = []

        def backbone() -> Backbone:
            if not bb_cache:
                bb_cache.append(
                    build_backbone(
                        conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0))
                    )
                )
            return bb_cache[0]

        use_aml = "aml" in method
        db_h5 = extract(
            conf,
            db_items,
            out / "features" / tag / f"{ds.name}-db.h5",
            keep_maps=use_aml,
            backbone=backbone,
            overwrite=overwrite,
        )
        q_h5 = extract(
            conf,
            q_items,
            out / "features" / tag / f"{ds.name}-query.h5",
            backbone=backbone,
            overwrite=overwrite,
        )
        db_mac, db_reg, db_cnt = read_features(db_h5, ds.imlist)
        q_mac, q_reg, q_cnt = read_features(q_h5, ds.qimlist)
        wh: Whitening | None = None
        if method != "mac":
            if whitening_images is not None:
                t_items = _folder_items(Path(whitening_images))
            elif whitening_dataset is not None:
                other = RevisitedDataset.load(Path(whitening_dataset))
                t_items = [_Item(n, other.image_path(n)) for n in other.imlist]
            else:
                logger.warning(
                    "no whitening training set given: learning it on %s's own "
                    "database (optimistic; Tolias et al. use another dataset)",
                    ds.name,
                )
                t_items = db_items
            wpath = _whitening(conf, out, tag, t_items, trainset, backbone, overwrite)
            wh = Whitening.load(wpath)
            db = aggregate_rmac(db_reg, db_cnt, wh)
            qv = aggregate_rmac(q_reg, q_cnt, wh)
        else:
            db, qv = db_mac, q_mac
        t0 = time.perf_counter()
        ranks, _ = search(qv, db)
        timings["search_s_per_query"] = (time.perf_counter() - t0) / max(ds.n_queries, 1)
        if use_aml:
            ranks = _aml_all(conf, ds, db_h5, q_h5, ranks, qv, q_mac, wh, timings)
    with atomic_path(ranks_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(ranks.astype(np.int64)), allow_pickle=False)
    res = evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)
    write_json(
        metrics_path,
        {
            "format_version": FORMAT_VERSION,
            "dataset": ds.name,
            "method": method,
            "config_hash": key,
            "timings": timings,
            "metrics": {p: r.as_dict() for p, r in res.items()},
        },
    )
    write_config(
        folder,
        {
            **conf,
            "whitening_images": whitening_images,
            "whitening_dataset": whitening_dataset,
            "dataset": str(dataset_dir),
        },
    )
    logger.info(
        "%s on %s: medium mAP %.2f, hard mAP %.2f",
        method,
        ds.name,
        100 * res["medium"].map,
        100 * res["hard"].map,
    )
    return RmacResult(method, ranks_path, metrics_path, res, timings, folder)


def _aml_all(
    conf: Mapping[str, Any],
    ds: Any,
    db_h5: Path,
    q_h5: Path,
    ranks: np.ndarray,
    qv: np.ndarray,
    q_mac: np.ndarray,
    wh: Whitening | None,
    timings: dict[str, float],
) -> np.ndarray:
    """AML re-ranking (+QE) of every query's top N; fills per-query timings."""
    import h5py

    aml = conf["aml"]
    n_top = min(int(aml["rerank"]), ds.n_db)
    with h5py.File(db_h5, "r") as f:
        nbytes = sum(int(np.prod(f[n]["maps"].shape)) * 4 for n in ds.imlist)
    cache: dict[int, np.ndarray] | None = None
    if nbytes <= float(conf.get("maps_memory_mb", 2048)) * 2**20:
        cache = dict(enumerate(_read_maps(db_h5, ds.imlist)))
    with h5py.File(q_h5, "r") as f:
        sizes = [tuple(f[n].attrs["image_size"]) for n in ds.qimlist]
    out = ranks.copy()
    t_aml = t_qe = 0.0
    for qi in tqdm(range(ds.n_queries), desc="AML re-ranking", disable=ds.n_queries < 10):
        top = ranks[:n_top, qi]
        if cache is not None:
            maps = [cache[int(i)] for i in top]
        else:
            maps = _read_maps(db_h5, [ds.imlist[int(i)] for i in top])
        w, h = sizes[qi]
        t0 = time.perf_counter()
        ids, _, vecs, _ = aml_rerank(
            qv[qi],
            q_mac[qi],
            h / w,
            top,
            maps,
            wh,
            levels=int(conf["levels"]),
            overlap=float(conf["overlap"]),
            alpha=float(aml["alpha"]),
            step=int(aml["step"]),
            ratio=float(aml["ratio"]),
            refine_step=int(aml["refine_step"]),
            refine_iter=int(aml["refine_iter"]),
            chunk_mb=float(aml["chunk_mb"]),
        )
        t1 = time.perf_counter()
        t_aml += t1 - t0
        if conf["method"] == "rmac+aml+qe":
            sc = query_expansion(qv[qi], vecs, vecs, int(conf["qe"]))
            ids = ids[np.argsort(-sc, kind="stable")]
            t_qe += time.perf_counter() - t1
        out[:n_top, qi] = ids
    timings["aml_s_per_query"] = t_aml / max(ds.n_queries, 1)
    timings["qe_s_per_query"] = t_qe / max(ds.n_queries, 1)
    timings["aml_rerank_n"] = float(n_top)
    return out
