"""The regions stage: the regions CSV of a dataset's database images under one preset.

:func:`main` writes ``<output>.csv`` in the boxes format (``id,box,score``), one row per region in
region order, region 0 the whole image; :func:`read_regions_csv` reads it back, checked.
Selective-search proposals are computed once per dataset and kept in a cache that every ``ss-N``
preset (N <= :data:`SS_CACHE_TOP_N`) takes a prefix of.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.io import write_config
from gldboxes.progress import tqdm
from retrieval.regions.sources import WHOLE_IMAGE, compute_regions, region_source, select_regions

__all__ = ["SS_CACHE_TOP_N", "main", "read_regions_csv"]

logger = logging.getLogger("retrieval.regions")


def read_regions_csv(path: str | Path) -> dict[str, list[Box]]:
    """Read a regions CSV written by :func:`main`, checking that region 0 is the whole image.

    Returns:
        ``{image id: [region_0, region_1, ...]}`` in file order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"regions file not found: {path}")
    regions = read_boxes_csv(path)
    for key, boxes in regions.items():
        b = boxes[0]
        if (b.ymin, b.xmin, b.ymax, b.xmax) != (0.0, 0.0, 1.0, 1.0):
            raise ValueError(
                f"{path}: region 0 of {key!r} is {b.to_string()}, not the whole "
                "image '0.0 0.0 1.0 1.0'"
            )
    return regions


def _regions_of_image(
    conf: Mapping[str, Any], path: Path, boxes: Sequence[Box] | None
) -> list[Box]:
    """Regions of one image file under ``conf`` (reads what the source needs)."""
    width = height = None
    image: npt.NDArray[Any] | None = None
    needs = region_source(conf).needs
    if needs == "size":
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
    elif needs == "pixels":
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
    return compute_regions(conf, width=width, height=height, image=image, boxes=boxes)


#: Selective-search proposals per image kept in the cache the ``ss-N`` presets share: the
#: proposals are ranked, filtered and then cut, so ``ss-N`` is exactly the first N of them.
SS_CACHE_TOP_N = 32
_SS_CACHE_VERSION = 1


def _ss_cache(conf: Mapping[str, Any], export_dir: Path) -> Path | None:
    """The proposals cache of a selective-search conf (None when ``top_n`` exceeds it)."""
    from gldboxes.io import config_hash

    if int(conf["top_n"]) > SS_CACHE_TOP_N:
        return None
    key = {
        "mode": conf.get("mode", "fast"),
        "max_side": conf.get("max_side", 256),
        "min_area": conf.get("min_area", 0.01),
        "seed": conf.get("seed", 0),
        "min_size": float(conf.get("min_size") or 0.0),
        "top_n": SS_CACHE_TOP_N,
        "version": _SS_CACHE_VERSION,
    }
    return export_dir / f"ss-proposals-{config_hash(key, 10)}.npz"


def _selective_search_all(
    conf: Mapping[str, Any], paths: Sequence[tuple[str, Path]], num_workers: int, desc: str
) -> dict[str, list[Box]]:
    """Selective-search regions of every image (processes when ``num_workers > 1``)."""
    if num_workers > 1:
        # processes, not threads: the seeded C rand() is per process
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            jobs = pool.map(
                _regions_of_image,
                [conf] * len(paths),
                [p for _, p in paths],
                [None] * len(paths),
                chunksize=4,
            )
            return {
                name: regs
                for (name, _), regs in tqdm(
                    zip(paths, jobs, strict=True), total=len(paths), desc=desc
                )
            }
    return {
        name: _regions_of_image(conf, path, None)
        for name, path in tqdm(paths, desc=desc, disable=len(paths) < 50)
    }


def _write_ss_cache(path: Path, regions: Mapping[str, Sequence[Box]]) -> None:
    """Save proposals (region 0 excluded) as npz: names, offsets, boxes (M, 5) with scores."""
    from gldboxes.io import atomic_path

    names = list(regions)
    props = [list(regions[n])[1:] for n in names]
    offsets = np.r_[0, np.cumsum([len(p) for p in props])].astype(np.int64)
    rows = [(b.ymin, b.xmin, b.ymax, b.xmax, b.score or 0.0) for p in props for b in p]
    arr = np.asarray(rows, np.float64).reshape(-1, 5)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            format_version=np.int64(_SS_CACHE_VERSION),
            names=np.asarray(names, dtype=str),
            offsets=offsets,
            boxes=arr,
        )


def _from_ss_cache(
    conf: Mapping[str, Any], path: Path, names: Sequence[str]
) -> dict[str, list[Box]]:
    """The regions of ``names`` under ``conf`` from the proposals cache (a prefix of each)."""
    with np.load(path, allow_pickle=False) as z:
        if int(z["format_version"]) != _SS_CACHE_VERSION:
            raise ValueError(f"{path}: unsupported proposals cache version")
        cached = [str(n) for n in z["names"]]
        offsets, arr = z["offsets"], z["boxes"]
    if cached != list(names):
        raise ValueError(f"{path}: proposals cache is for other images; delete it to recompute")
    top_n = int(conf["top_n"])
    min_size = float(conf.get("min_size") or 0.0)
    out: dict[str, list[Box]] = {}
    for i, name in enumerate(names):
        rows = arr[offsets[i] : offsets[i + 1]][:top_n]
        found = [Box(*map(float, r)) for r in rows]
        out[name] = [
            WHOLE_IMAGE,
            *select_regions(found, min_size=min_size, max_regions=conf.get("max_regions")),
        ]
    return out


def main(
    conf: Mapping[str, Any],
    dataset: str | Path,
    export_dir: str | Path,
    *,
    boxes: str | Path | None = None,
    overwrite: bool = False,
    num_workers: int = 1,
) -> Path:
    """Write the regions CSV of a Revisited-style dataset's database images under one preset.

    Args:
        conf: a preset of :data:`confs`.
        dataset: dataset folder (``gnd_*.pkl`` + ``jpg/``; the synthetic world's
            ``OUT/retrieval``); ids are the database image names.
        export_dir: output folder; writes ``<conf['output']>.csv`` and ``.yaml`` (config).
        boxes: the boxes CSV for ``detector`` (required) and ``gt`` (default
            ``dataset/boxes_gt.csv``).
        overwrite: recompute even when the output exists.
        num_workers: processes for selective search (the output does not depend on it).

    Returns:
        The regions CSV path.
    """
    from retrieval.evaluation.datasets import RevisitedDataset

    conf = dict(conf)
    src = region_source(conf)
    source = src.name
    out = Path(export_dir) / f"{conf['output']}.csv"
    if out.exists() and not overwrite:
        logger.info("regions %s exist, skipping", out)
        return out
    ds = RevisitedDataset.load(dataset)
    by_id: dict[str, list[Box]] = {}
    if src.needs == "boxes":
        if boxes is None and src.default_boxes is not None:
            boxes = ds.root / src.default_boxes
        if boxes is None:
            raise ValueError(f"regions: the {source!r} source needs a boxes file (--boxes)")
        if not Path(boxes).exists():
            raise FileNotFoundError(f"boxes file not found: {boxes}")
        by_id = read_boxes_csv(boxes)
        unknown = set(by_id) - set(ds.imlist)
        if unknown and len(unknown) == len(by_id):
            raise ValueError(
                f"{boxes}: none of its ids is a database image of {ds.root} "
                f"(e.g. {sorted(unknown)[:3]})"
            )
    paths = [(name, ds.image_path(name)) for name in ds.imlist]
    desc = f"regions {conf['output']}"
    regions: dict[str, list[Box]] = {}
    cache = _ss_cache(conf, Path(export_dir)) if source == "selective_search" else None
    if cache is not None and cache.exists() and not overwrite:
        regions = _from_ss_cache(conf, cache, [n for n, _ in paths])
    elif cache is not None:
        # compute SS_CACHE_TOP_N proposals once; every ss-N preset (N <= it) takes a prefix
        wide = {**conf, "top_n": SS_CACHE_TOP_N, "max_regions": None}
        proposals = _selective_search_all(wide, paths, num_workers, desc)
        _write_ss_cache(cache, proposals)
        regions = _from_ss_cache(conf, cache, [n for n, _ in paths])
    elif source == "selective_search":  # more proposals than the cache keeps
        regions = _selective_search_all(conf, paths, num_workers, desc)
    else:
        for name, path in tqdm(paths, desc=desc, disable=len(paths) < 50):
            regions[name] = _regions_of_image(conf, path, by_id.get(name))
    n = sum(len(v) for v in regions.values())
    write_boxes_csv(out, regions, with_score=True)
    write_config(
        out.parent,
        {**conf, "dataset": str(dataset), "boxes": None if boxes is None else str(boxes)},
        name=f"{conf['output']}.yaml",
    )
    logger.info(
        "wrote %d regions of %d images (%.2f per image) to %s",
        n,
        len(regions),
        n / max(len(regions), 1),
        out,
    )
    return out
