"""RootSIFT: OpenCV SIFT with RootSIFT descriptors, the default local feature, and its presets.

:func:`rootsift` maps SIFT descriptors (N, 128) to RootSIFT (Arandjelovic & Zisserman 2012:
L1-normalise, square root, so unit L2 norm); :class:`RootSift` is the extractor that
:func:`retrieval.features.make_extractor` returns for ``model.name == "rootsift"`` (the
``max_features`` strongest by response, optionally upright); :func:`rootsift_conf` builds a preset
of :data:`retrieval.features.confs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "RootSift",
    "rootsift",
    "rootsift_conf",
]


def rootsift_conf(max_features: int) -> dict[str, Any]:
    """The RootSIFT features preset keeping the ``max_features`` strongest keypoints."""
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


def rootsift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root. (N, D) -> (N, D)."""
    d = np.asarray(descriptors, np.float32)
    d = d / (np.abs(d).sum(axis=1, keepdims=True) + eps)
    return np.sqrt(np.maximum(d, 0.0)).astype(np.float32)


class RootSift:
    """The RootSIFT extractor of a ``model`` conf (see :func:`rootsift_conf`): OpenCV SIFT,
    then :func:`rootsift`; ``dim`` 128, keypoint sizes in pixels of the image it is given.

    Raises:
        ValueError: when ``max_features`` is below 1.
    """

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
