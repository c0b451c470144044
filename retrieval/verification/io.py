"""Reading local features for verification from the project's features HDF5, once."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from retrieval.verification.conf import Features

__all__ = ["read_features_h5"]


def read_features_h5(
    path: str | os.PathLike[str], keys: Sequence[str], *, max_side: int | None = None
) -> dict[str, Features]:
    """Read ``keypoints`` and ``descriptors`` of the given ids from a features HDF5, once.

    The layout is the project's (``/<id>/keypoints`` (N, 2) x, y pixels,
    ``/<id>/descriptors`` (N, D), attribute ``image_size`` (w, h)).

    Args:
        path: the features file.
        keys: image ids.
        max_side: the extraction size of the features preset: each image's ``scale`` is
            ``max(1, max(w, h) / max_side)`` (None: 1).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file (and the id): a damaged file, a missing id or dataset,
            keypoints not float (N, 2), descriptors not float (N, D) (integers, byte strings,
            objects), different keypoint and descriptor counts, NaN or inf values.
    """
    import h5py

    from retrieval.features import check_features

    if not os.path.exists(path):
        raise FileNotFoundError(f"features file not found: {path}")
    out: dict[str, Features] = {}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: damaged features file, cannot be opened ({exc})") from exc
    with f:
        k = None
        try:
            for k in dict.fromkeys(keys):
                if k not in f:
                    raise ValueError(f"{path}: no features for id {k!r}")
                g = f[k]
                kp_ds = desc_ds = None
                if isinstance(g, h5py.Group):
                    try:
                        kp_ds, desc_ds = g["keypoints"], g["descriptors"]
                    except KeyError:
                        pass
                if not isinstance(kp_ds, h5py.Dataset) or not isinstance(desc_ds, h5py.Dataset):
                    raise ValueError(f"{path}: {k!r} lacks 'keypoints' or 'descriptors'")
                check_features(path, k, kp_ds, desc_ds)  # dtypes and shapes before reading
                kp, desc = np.asarray(kp_ds[()]), np.asarray(desc_ds[()])
                check_features(path, k, kp, desc)  # finite values
                scale = 1.0
                size = g.attrs.get("image_size")
                if max_side and size is not None and len(size) == 2:
                    scale = max(1.0, float(max(size)) / float(max_side))
                out[k] = Features(
                    kp.astype(np.float64, copy=False), desc.astype(np.float32, copy=False), scale
                )
        except (OSError, RuntimeError, KeyError) as exc:
            what = f", id {k!r} cannot be read" if k is not None else ""
            raise ValueError(
                f"{path}: damaged features file{what} ({type(exc).__name__}: {exc})"
            ) from exc
    return out
