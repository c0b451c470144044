"""PCA whitening of regional vectors and the R-MAC aggregation with it.

Part of :mod:`retrieval.rmac`; see its docstring for the method."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import atomic_path
from retrieval.rmac.pooling import l2_normalise

__all__ = [
    "FORMAT_VERSION",
    "Whitening",
    "aggregate_rmac",
    "learn_whitening",
]

logger = logging.getLogger("retrieval.rmac.whitening")

# Version of every file the R-MAC stage writes (features .h5, whitening.npz).
FORMAT_VERSION = 1


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
        return l2_normalise((x - self.mean) @ self.proj.T)

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
    v = whitening.apply(regional) if whitening is not None else l2_normalise(regional)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return l2_normalise(np.add.reduceat(v, starts, axis=0))
