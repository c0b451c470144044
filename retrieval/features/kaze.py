"""KAZE local features (Alcantarilla et al., ECCV 2012) as a plug-in of :mod:`retrieval.features`.

OpenCV's KAZE detects blobs in a nonlinear (diffusion) scale space and describes them with
64-D float M-SURF descriptors. They are L2-normalised here, so the codebook, the ASMK(*)
kernels (ASMK* keeps 64 sign bits, 8 bytes a word) and verification treat them like RootSIFT.

Presets (``confs``) follow :data:`retrieval.features.confs`; this module is listed once in
:data:`retrieval.features.FEATURE_PLUGINS` and nowhere else::

    gldboxes retrieval run --dataset DATA --out OUT --features kaze
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["NAME", "KazeExtractor", "confs", "make"]

logger = logging.getLogger("retrieval.features.kaze")

NAME = "kaze"


def _kaze(max_features: int) -> dict[str, Any]:
    return {
        "output": f"kaze-n{max_features}",  # folder / file name (retrieval.features.output_name)
        "model": {
            "name": NAME,
            "max_features": max_features,  # keep the strongest by detector response
            "threshold": 0.001,  # detector response threshold (OpenCV default)
            "octaves": 4,  # OpenCV defaults
            "octave_layers": 4,
            "upright": False,  # True: no orientation (U-KAZE), faster
        },
        "preprocessing": {
            "max_side": 1024,  # longer side is downscaled to this before extraction
            "min_side": 8,  # smaller images (or crops) are recorded as empty
            "exif_transpose": True,
            "grayscale": True,
        },
        # Float descriptors with no absolute distance scale of their own: matched like RootSIFT,
        # by Lowe's ratio test and mutual nearest neighbours, with the same inlier floor.
        "verification": {
            "max_distance": None,
            "ratio": 0.8,
            "mutual": True,
            "threshold": 10.0,  # pixels of the image at max_side
            "min_inliers": 10,
        },
    }


confs: dict[str, dict[str, Any]] = {"kaze": _kaze(1000)}


class KazeExtractor:
    """OpenCV KAZE with L2-normalised 64-D descriptors, the strongest ``max_features`` kept.

    Args:
        max_features: keypoints kept per image (by response, ties in detection order).
        threshold: KAZE detector threshold.
        octaves: scale-space octaves.
        octave_layers: sublevels per octave.
        upright: skip the orientation (U-KAZE).
    """

    dim = 64
    pixel_scales = True  # keypoint sizes are pixels of the resized image

    def __init__(
        self,
        *,
        max_features: int,
        threshold: float = 0.001,
        octaves: int = 4,
        octave_layers: int = 4,
        upright: bool = False,
    ) -> None:
        import cv2

        if max_features < 1:
            raise ValueError(f"kaze: max_features must be >= 1, got {max_features}")
        if threshold <= 0:
            raise ValueError(f"kaze: threshold must be > 0, got {threshold}")
        self.max_features = int(max_features)
        self.kaze = cv2.KAZE_create(  # type: ignore[attr-defined]
            extended=False,
            upright=bool(upright),
            threshold=float(threshold),
            nOctaves=int(octaves),
            nOctaveLayers=int(octave_layers),
        )

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Features of one image.

        Args:
            img: (H, W) uint8 grayscale image.

        Returns:
            keypoints (N, 2) float32 x, y in pixels; descriptors (N, 64) float32, unit L2 norm;
            scales (N,) float32 keypoint sizes in pixels; scores (N,) float32 responses; sorted
            by decreasing response, N <= max_features.
        """
        kps, desc = self.kaze.detectAndCompute(img, None)
        if desc is None or not kps:
            return (
                np.zeros((0, 2), np.float32),
                np.zeros((0, self.dim), np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, np.float32),
            )
        xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        size = np.array([k.size for k in kps], np.float32)
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[: self.max_features]
        d = desc[order].astype(np.float32)
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        return xy[order], d, size[order], resp[order]


def make(model: Mapping[str, Any]) -> KazeExtractor:
    """The extractor of a preset's ``model`` dict (see :data:`confs`)."""
    return KazeExtractor(
        max_features=int(model["max_features"]),
        threshold=float(model.get("threshold", 0.001)),
        octaves=int(model.get("octaves", 4)),
        octave_layers=int(model.get("octave_layers", 4)),
        upright=bool(model.get("upright", False)),
    )
