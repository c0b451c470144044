"""Settings and small result types of spatial verification (features, conf, fits, pairs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

__all__ = [
    "BACKENDS",
    "AffineResult",
    "Features",
    "LocalFeatures",
    "PairResult",
    "VerificationConf",
    "as_conf",
    "check_backend",
]

#: Implementations of matching and RANSAC: ``"numba"`` (compiled, the default) and ``"numpy"``
#: (the vectorised reference: two ``faiss.knn`` searches, RANSAC over (trials, K) arrays). Both
#: give the same matches and inliers on the same seed (tested).
BACKENDS = ("numba", "numpy")


def check_backend(backend: str) -> None:
    """Raise ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"verification: unknown backend {backend!r}; expected one of {BACKENDS}")


class LocalFeatures(Protocol):
    """Anything with ``keypoints`` (N, 2) x, y pixels and ``descriptors`` (N, D)."""

    @property
    def keypoints(self) -> np.ndarray: ...

    @property
    def descriptors(self) -> np.ndarray: ...


class Features(NamedTuple):
    """Local features of one image.

    Attributes:
        keypoints: (N, 2) float ``x, y`` in pixels.
        descriptors: (N, D) float32.
        scale: original pixels per pixel of the image the features were extracted from (>= 1
            when a large photo was downscaled); the RANSAC threshold of a pair is multiplied by
            the second image's scale.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scale: float = 1.0


@dataclass(frozen=True)
class VerificationConf:
    """Spatial verification settings (defaults: the paper's, for DELF descriptors)."""

    max_distance: float | None = 0.9  # 1-NN kept when its L2 distance is below this (None: any)
    ratio: float | None = None  # Lowe's ratio test: d(1-NN) < ratio * d(2-NN) (None: off)
    mutual: bool = False  # keep only mutual nearest neighbours
    threshold: float = 10.0  # RANSAC inlier residual threshold, pixels at extraction size
    trials: int = 1000  # RANSAC trials (3-point samples)
    seed: int = 0  # RANSAC seed (every pair uses it: results do not depend on order or threads)
    min_matches: int = 4  # pairs with fewer putative matches get 0 inliers
    # Pairs with fewer inliers are unverified (counted 0): they keep their first-stage order.
    min_inliers: int = 0
    # Reject affine models whose linear part scales areas by more than max_scale**2 or less
    # than 1 / max_scale**2 (None: off). Without it, many query points matched to one
    # database point (1-NN matching is many-to-one) give a collapsing model whose "inliers"
    # are those duplicates: on real photos this made unrelated pairs score 59 inliers.
    max_scale: float | None = 10.0

    def __post_init__(self) -> None:
        if self.max_distance is not None and not self.max_distance > 0:
            raise ValueError(f"verification: max_distance must be > 0, got {self.max_distance}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"verification: ratio must be in (0, 1], got {self.ratio}")
        if not self.threshold > 0:
            raise ValueError(f"verification: threshold must be > 0 pixels, got {self.threshold}")
        if self.trials < 1:
            raise ValueError(f"verification: trials must be >= 1, got {self.trials}")
        if self.min_inliers < 0 or self.min_matches < 0:
            raise ValueError("verification: min_inliers and min_matches must be >= 0")
        if self.max_scale is not None and not self.max_scale > 1:
            raise ValueError(f"verification: max_scale must be > 1 or None, got {self.max_scale}")


def as_conf(conf: VerificationConf | None, overrides: Mapping[str, Any]) -> VerificationConf:
    """``conf`` (default: the paper's) with keyword ``overrides``; unknown keys raise."""
    base = conf or VerificationConf()
    if not overrides:
        return base
    fields = set(VerificationConf.__dataclass_fields__)
    bad = set(overrides) - fields
    if bad:
        raise ValueError(
            f"unknown verification setting(s) {sorted(bad)}; expected {sorted(fields)}"
        )
    return VerificationConf(**{**base.__dict__, **overrides})


class AffineResult(NamedTuple):
    """A RANSAC affine fit ``p2 ~ matrix @ [x1, y1, 1]``.

    Attributes:
        matrix: (2, 3) float64, or all-NaN when no model was found.
        inliers: (K,) bool mask over the correspondences.
    """

    matrix: np.ndarray
    inliers: np.ndarray

    @property
    def ok(self) -> bool:
        """Whether a model was found."""
        return bool(np.isfinite(self.matrix).all())

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


class PairResult(NamedTuple):
    """Verification of one image pair.

    Attributes:
        matches: (K, 2) int64 putative matches ``(i in image 1, j in image 2)``.
        affine: the RANSAC fit on them (``inliers`` has K entries).
    """

    matches: np.ndarray
    affine: AffineResult

    @property
    def num_inliers(self) -> int:
        return self.affine.num_inliers
