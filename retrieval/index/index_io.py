"""Inverted-file folders on disk: the format versions, the header, save and load.

On disk an inverted file is a folder: ``header.json`` (format version, kernel, parameters,
shapes, dtypes, config hash) and one ``.npy`` per array, opened with ``mmap_mode="r"`` by
default (a large index opens in the time of reading its header). Posting ids are
delta-encoded (format version 4; 5 and 6 for regional indexes, as 2 and 3 before). Versions 1
to 3 (absolute uint32 ``image_ids.npy``) still load: their ids are encoded in memory on load.
No pickle. :meth:`retrieval.index.inverted_file.InvertedFile.save` and ``load`` call
:func:`save_index` and :func:`load_index`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gldboxes.io import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    from retrieval.index.inverted_file import InvertedFile

__all__ = [
    "ARRAYS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_REGIONAL",
    "FORMAT_VERSION_REGIONAL_FLOOR",
    "OLD_ARRAYS",
    "OLD_FORMAT_VERSIONS",
    "index_header",
    "load_index",
    "save_index",
]

#: Version written for plain indexes: delta-encoded posting ids (``id_offsets``, ``id_stream``).
#: Versions 1, 2, 3 (absolute uint32 ``image_ids``) are the same three kinds before the
#: encoding; they still load (:data:`OLD_FORMAT_VERSIONS`).
FORMAT_VERSION = 4
#: Version written for regional-search indexes (an ``item_image`` array; older readers refuse
#: it instead of silently ranking regions as images). Was 2 before the id encoding.
FORMAT_VERSION_REGIONAL = 5
#: Version written for regional indexes with a normalisation floor ``region_norm_floor > 0``
#: (older readers would score them without it, so they must refuse them). Was 3 before the id
#: encoding. Regional versions without the floor (2, 5) load with ``region_norm_floor = 0``,
#: the scoring they were written with.
FORMAT_VERSION_REGIONAL_FLOOR = 6
#: The versions 4, 5, 6 were before posting ids were delta-encoded (read, never written).
OLD_FORMAT_VERSIONS = {
    1: FORMAT_VERSION,
    2: FORMAT_VERSION_REGIONAL,
    3: FORMAT_VERSION_REGIONAL_FLOOR,
}
#: The arrays of every index (regional ones add ``item_image``), and of versions 1 to 3.
ARRAYS = ("offsets", "id_offsets", "id_stream", "data", "words_per_image")
OLD_ARRAYS = ("offsets", "image_ids", "data", "words_per_image")


def index_header(ivf: InvertedFile) -> dict[str, Any]:
    """The JSON header of ``ivf``: format version, parameters, array shapes/dtypes, stats, meta."""
    arrays = list(ARRAYS) + ([] if ivf.item_image is None else ["item_image"])
    regional = ivf.item_image is not None
    floor = ivf.region_norm_floor > 0.0
    return {
        "format": "gldboxes.inverted_file",
        "format_version": (
            FORMAT_VERSION_REGIONAL_FLOOR
            if floor
            else FORMAT_VERSION_REGIONAL
            if regional
            else FORMAT_VERSION
        ),
        "pooling": ivf.pooling,
        "region_norm_floor": ivf.region_norm_floor if regional else None,
        "n_items": ivf.n_items,
        "kernel": ivf.kernel,
        "dim": ivf.dim,
        "binary": ivf.binary,
        "alpha": ivf.alpha,
        "tau": None if not np.isfinite(ivf.tau) else ivf.tau,
        "tau_is_neg_inf": bool(np.isneginf(ivf.tau)),
        "normalize": ivf.normalize,
        "n_images": ivf.n_images,
        "codebook_size": ivf.codebook_size,
        "arrays": {
            a: {"shape": list(getattr(ivf, a).shape), "dtype": str(getattr(ivf, a).dtype)}
            for a in arrays
        },
        "stats": ivf.stats(),
        "meta": ivf.meta,
    }


def save_index(ivf: InvertedFile, path: str | os.PathLike[str]) -> Path:
    """Write the index folder atomically (a temp folder renamed onto ``path``)."""
    path = Path(path)
    header = ivf.header()
    with atomic_dir(path) as tmp:
        for a in header["arrays"]:
            np.save(tmp / f"{a}.npy", np.ascontiguousarray(getattr(ivf, a)), allow_pickle=False)
        write_json(tmp / "header.json", header)
    return path


def load_index(
    cls: type[InvertedFile], path: str | os.PathLike[str], *, mmap: bool = True
) -> InvertedFile:
    """Open an index folder written by :func:`save_index` as a ``cls`` (memory-mapped by default).

    Raises:
        FileNotFoundError: no such folder / header.
        ValueError: wrong format or version, missing or truncated arrays, or arrays that do
            not match the header.
    """
    path = Path(path)
    hpath = path / "header.json"
    if not hpath.exists():
        raise FileNotFoundError(f"inverted file header not found: {hpath}")
    h = read_json(hpath)
    if not isinstance(h, dict) or h.get("format") != "gldboxes.inverted_file":
        raise ValueError(f"{hpath}: not a gldboxes inverted-file header")
    raw_version = h.get("format_version")
    current = (FORMAT_VERSION, FORMAT_VERSION_REGIONAL, FORMAT_VERSION_REGIONAL_FLOOR)
    known = (*OLD_FORMAT_VERSIONS, *current)
    if raw_version not in known:
        raise ValueError(
            f"{hpath}: format_version {raw_version!r} is not supported (this gldboxes reads "
            f"versions {', '.join(map(str, known))}); rebuild the index"
        )
    old = raw_version in OLD_FORMAT_VERSIONS  # absolute image_ids, encoded on load
    version = OLD_FORMAT_VERSIONS.get(raw_version, raw_version)
    regional = version in (FORMAT_VERSION_REGIONAL, FORMAT_VERSION_REGIONAL_FLOOR)
    names = list(OLD_ARRAYS if old else ARRAYS) + (["item_image"] if regional else [])
    if regional and "item_image" not in h.get("arrays", {}):
        raise ValueError(f"{hpath}: a regional index header without an item_image array")
    # Version 2 predates the floor: its scores were plain ASMK, and so they stay.
    rho = 0.0
    if version == FORMAT_VERSION_REGIONAL_FLOOR:
        rho = float(h.get("region_norm_floor") or 0.0)
    if version == FORMAT_VERSION_REGIONAL_FLOOR and not 0.0 < rho <= 1.0:
        raise ValueError(f"{hpath}: region_norm_floor {rho} must be in (0, 1] in version 3")
    arrays: dict[str, np.ndarray] = {}
    for a in names:
        f = path / f"{a}.npy"
        if not f.exists():
            raise ValueError(f"{path}: array file {f.name} is missing")
        try:
            arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{f}: unreadable or truncated array ({exc})") from exc
        want = h["arrays"][a]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise ValueError(
                f"{f}: shape {arr.shape} dtype {arr.dtype} does not match the header "
                f"({want['shape']} {want['dtype']}); the file is damaged or from another index"
            )
        arrays[a] = arr
    off = arrays["offsets"]
    n_post = arrays["image_ids" if old else "data"].shape[0]
    if off.shape[0] < 1 or int(off[-1]) != n_post:
        raise ValueError(f"{path}: offsets do not match the number of postings")
    tau = -np.inf if h.get("tau_is_neg_inf") else float(h["tau"])
    item_image = arrays.pop("item_image", None)
    try:
        return cls(
            **arrays,
            item_image=item_image,
            pooling=h.get("pooling") if item_image is not None else None,
            region_norm_floor=rho,
            dim=int(h["dim"]),
            kernel=str(h["kernel"]),
            alpha=float(h["alpha"]),
            tau=tau,
            normalize=bool(h["normalize"]),
            meta=dict(h.get("meta") or {}),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
