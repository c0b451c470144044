"""DELF / DELG local features (Noh et al., ICCV 2017; Cao et al., ECCV 2020) as a plug-in of
:mod:`retrieval.features`: a SavedModel directory as released with the DELF code.

TF2 exports are called through ``signatures["serving_default"]``; TF1 exports through the graph
tensors ``input_image``, ``input_scales``, ``input_abs_thres``, ``input_max_feature_num`` ->
``boxes``, ``features``, ``scales``, ``scores``. DELF's configuration: scales 0.25 ... 2.0 by
sqrt(2), attention threshold 100, at most 1,000 features, L2 -> PCA to 128 -> L2 with a PCA file
(``.npz`` with ``mean`` (D,), ``projection`` (D', D), optional ``variances``; or the released
folder of DatumProto files ``mean.datum``, ``pca_proj_mat.datum``, ``pca_vars.datum``);
locations are the receptive-field centres divided by the scale. TensorFlow is imported when an
extractor is made. Listed once in :data:`retrieval.features.FEATURE_PLUGINS`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DELF_SCALES", "NAME", "DelfExtractor", "confs", "make", "read_datum"]

logger = logging.getLogger("retrieval.features.delf")

NAME = "delf"
DELF_SCALES = [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]

confs: dict[str, dict[str, Any]] = {
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


def make(model: Mapping[str, Any]) -> DelfExtractor:
    """The extractor of a preset's ``model`` dict (its SavedModel loaded here)."""
    return DelfExtractor(model)
