"""The HDF5 features file: its layout, one image's record, writing one image, validated reading.

Layout (keyed by image id)::

    <id>/keypoints    float32 (N, 2)  x, y in pixels of the original (EXIF-upright) image
    <id>/descriptors  float32 (N, D)
    <id>/scales       float32 (N,)    SIFT size in original pixels / DELF pyramid scale
    <id>/scores       float32 (N,)    SIFT response / DELF attention
    <id>.attrs        status ("ok" | "empty" | "error"), error, image_size (w, h), bbx, done

Readers validate what they read (:func:`check_features`: float (N, 2) keypoints, float (N, D)
descriptors, equal counts, finite values) and name the file and image in every error; a damaged
file is a ``ValueError`` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "FEATURE_DATASETS",
    "FORMAT_VERSION",
    "H5_ERRORS",
    "ExtractedFeatures",
    "check_features",
    "failures",
    "read_descriptors",
    "read_features",
    "write_image",
]

FORMAT_VERSION = 1
#: The per-image datasets of a features file.
FEATURE_DATASETS = ("keypoints", "descriptors", "scales", "scores")
# What h5py raises on a damaged file or object (besides OSError for unreadable blocks).
H5_ERRORS = (OSError, RuntimeError, KeyError)


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
        except H5_ERRORS as exc:
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
            arrays = [np.asarray(_dataset(p, g, name, k)[()]) for k in FEATURE_DATASETS]
        except H5_ERRORS as exc:
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
        except H5_ERRORS as exc:
            raise _damaged(p, current, exc) from exc
    return out
