"""The on-disk layout of a photo index (see :mod:`retrieval.runner.photos`).

Owns the folder's format and its shared readers/writers: the header ``photos.json``
(:data:`FORMAT_VERSION`, :func:`empty_header`, :func:`read_header`), the photos of a folder
(:func:`folder_images`), the index-side regions of photos (:func:`photo_regions`) and their
per-part CSV files (:func:`write_regions`, :func:`read_regions`), and the parts opened together
as one :class:`retrieval.index.sharded.ShardedInvertedFile` (:func:`sharded_index`). Building and
growing the index is :mod:`retrieval.runner.photos`; opening and querying it is
:mod:`retrieval.runner.photo_query`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import read_tagged_json
from retrieval.index.inverted_file import InvertedFile
from retrieval.runner import conf as run_conf
from retrieval.runner import driver

__all__ = [
    "FORMAT_VERSION",
    "HEADER_NAME",
    "empty_header",
    "folder_images",
    "photo_regions",
    "read_header",
    "read_regions",
    "sharded_index",
    "write_regions",
]

FORMAT_VERSION = 1
HEADER_NAME = "photos.json"


# ------------------------------------------------------------------------------------ folders
def folder_images(image_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Every image under a folder (recursive), sorted, as ``(features id, resolved path)``.

    The ids are those of :func:`retrieval.runner.driver.extract_folder` (the path relative to the
    folder, ``/`` written ``__``).
    """
    _, items = driver.folder_items(image_dir, empty_ok=True)
    return [(it.name, Path(it.path).resolve()) for it in items]


def empty_header(conf: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": "gldboxes.photo_index",
        "format_version": FORMAT_VERSION,
        "conf": dict(conf),
        "codebook": None,  # path relative to the index
        "codebook_source": None,
        "training_set": None,
        "next_id": 0,
        "next_part": 0,
        "parts": [],  # {"path", "start", "n_images", "regions"}
        "images": [],  # {"id", "name", "path", "features"} by ascending id
        "tombstones": [],
        "removed_paths": [],  # every photo ever removed (a repeated --remove is a no-op)
    }


def read_header(index_dir: Path) -> dict[str, Any]:
    hpath = index_dir / HEADER_NAME
    if not hpath.exists():
        raise FileNotFoundError(f"photo index not found: {hpath} (build it with --images)")
    return read_tagged_json(hpath, "gldboxes.photo_index", FORMAT_VERSION, "photo index")


# ------------------------------------------------------------------------------------ regions
def photo_regions(
    conf: Mapping[str, Any],
    names: Sequence[str],
    paths: Sequence[Path],
    root: Path | None,
    sizes: Mapping[str, Any],
) -> dict[str, list[Any]] | None:
    """Regions (region 0 the whole image) of each photo under the conf's regions preset
    (``regions``, ``region_boxes``, ``region_threshold``), keyed by ``names``; None without
    regions. Detector/gt boxes come from ``region_boxes``, whose ids may be the features id,
    the path relative to ``root`` or the file name (with or without its extension).
    ``sizes``: ``{name: (width, height) or None}`` (None: unreadable, whole image only)."""
    from gldboxes.boxes import read_boxes_csv
    from retrieval import regions as regions_stage

    rc = run_conf.region_conf(conf)
    if rc is None:
        return None
    if conf.get("region_features") != "assign":
        raise ValueError(
            "photo indexes support --region-features assign only (features of the whole "
            "photo assigned to its boxes)"
        )
    needs = regions_stage.region_source(rc).needs
    by_id: dict[str, list[Any]] = {}
    if needs == "boxes":
        if not conf.get("region_boxes"):
            raise ValueError(f"regions {conf['regions']!r} need --region-boxes (a boxes CSV)")
        by_id = read_boxes_csv(conf["region_boxes"])
    out: dict[str, list[Any]] = {}
    for n, p in zip(names, paths, strict=True):
        inside = root is not None and p.is_relative_to(root)
        rel = p.relative_to(root).as_posix() if root is not None and inside else p.name
        keys = (n, rel, rel.rsplit(".", 1)[0], p.name, p.stem)
        boxes = next((by_id[k] for k in keys if k in by_id), None)
        size = sizes[n]
        image = None
        if needs == "pixels":
            import cv2

            image = cv2.imread(os.fspath(p), cv2.IMREAD_COLOR)
        if size is None or (needs == "pixels" and image is None):
            out[n] = [regions_stage.WHOLE_IMAGE]  # unreadable: whole image only
            continue
        out[n] = regions_stage.compute_regions(
            rc, width=size[0], height=size[1], image=image, boxes=boxes
        )
    return out


# ------------------------------------------------------------------------------------ parts
def write_regions(path: Path, regions: Mapping[int, Sequence[Any]]) -> Path:
    from gldboxes.boxes import write_boxes_csv

    return write_boxes_csv(path, {str(k): v for k, v in regions.items()}, with_score=True)


def read_regions(path: Path) -> dict[int, list[Any]]:
    from retrieval.regions import read_regions_csv

    return {int(k): v for k, v in read_regions_csv(path).items()}


def sharded_index(idx: Path, h: Mapping[str, Any]) -> Any:
    from retrieval.index.sharded import ShardedInvertedFile

    parts = tuple(InvertedFile.load(idx / p["path"]) for p in h["parts"])
    starts = np.array([int(p["start"]) for p in h["parts"]], np.int64)
    return ShardedInvertedFile(parts, starts, {})
