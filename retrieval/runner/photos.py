"""Search your own photos: an index of any image folder that grows, queries, and ground truth.

The index is a folder built from the runner's one-process stages
(:mod:`retrieval.runner.driver`): features of the image folder
(:func:`~retrieval.runner.driver.extract_folder`, resumable chunk files), a codebook
(:func:`~retrieval.runner.driver.build_codebook`, or a given ``codebook.npy`` copied in),
per-image aggregation (:func:`~retrieval.runner.driver.aggregate_database`, with index-side
regions when asked) into :class:`retrieval.index.inverted_file.InvertedFile` parts, searched
together as a
:class:`retrieval.index.sharded.ShardedInvertedFile`::

    IDX/photos.json                      format_version, conf, codebook, images, parts, tombstones
    IDX/features/<preset>/<dir>-<hash>.h5  features of each indexed folder (one file per folder)
    IDX/codebooks/<...>/codebook.npy     trained here (--codebook-images, or the photos)
    IDX/codebook/codebook.npy            or a given codebook, copied
    IDX/parts/part-XXXXX/                one inverted file per add (global ids start..stop-1)
    IDX/parts/part-XXXXX.regions.csv     its images' regions, keyed by global id (with regions)

**Growing.** Indexing a folder again adds the photos not yet in the index as a new part (ids
continue; the features file resumes, so only new photos are extracted). Removing puts ids on a
tombstone list: they are never returned, and :func:`compact` merges the parts and drops them
(:meth:`retrieval.index.inverted_file.InvertedFile.select_images`, nothing re-aggregated). The
codebook and every option are fixed when the index is created.

**Why results equal a fresh build.** An ASMK/ASMK*/VLAD score of (query, image) depends only on
the query's and that image's aggregated words (the selectivity of each shared word and the
normalisation ``1/sqrt(|W_q| |W_x|)``): there is no IDF or other collection statistic in it. A
part scores its images exactly as an index of any other image set would (binary kernels: one
compiled pass adding per query word; float kernels: exact while a query's postings fit one
gather chunk of 2^20 postings). Rankings are ordered by (score desc, photo name asc, path asc),
never by id, so adds, removals and compaction give the scores and rankings of a fresh index of
the final photos, bit for bit; ``tests/test_growing_index.py`` checks it.

Photos are identified by their resolved path. A removed photo stays out when its folder is
indexed again (the header keeps every removed path), so reruns are no-ops; a photo edited in
place keeps its old features (copy it under a new name to index the new version).

**Modules.** This one builds and grows the index (:func:`main`, :func:`remove`,
:func:`compact`); the folder layout and its readers are :mod:`retrieval.runner.photo_index`;
opening, querying and ground truth (:class:`PhotoIndex`, :func:`evaluate_gt`) are
:mod:`retrieval.runner.photo_query`. Every name is re-exported here.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import write_config, write_json
from retrieval.runner import conf as run_conf
from retrieval.runner import driver
from retrieval.runner.photo_index import (
    FORMAT_VERSION,
    HEADER_NAME,
    empty_header,
    folder_images,
    photo_regions,
    read_header,
    read_regions,
    sharded_index,
    write_regions,
)
from retrieval.runner.photo_query import (
    GT_KINDS,
    PhotoIndex,
    QueryResult,
    evaluate_gt,
    read_gt_csv,
)

__all__ = [
    "FORMAT_VERSION",
    "GT_KINDS",
    "HEADER_NAME",
    "PhotoIndex",
    "QueryResult",
    "compact",
    "evaluate_gt",
    "folder_images",
    "main",
    "read_gt_csv",
    "remove",
]

logger = logging.getLogger("retrieval.runner.photos")


def _check_same_conf(index_dir: Path, stored: Mapping[str, Any], asked: Mapping[str, Any]) -> None:
    """An existing index keeps its options: refuse asked values that differ from both the
    stored ones and the defaults (a default is taken as 'not given')."""
    base = run_conf.resolve_conf()
    bad = [
        k
        for k, v in asked.items()
        if k != "verification" and v != stored.get(k) and v != base.get(k)
    ]
    if bad:
        raise ValueError(
            f"{index_dir}: the index was built with "
            + ", ".join(f"{k}={stored.get(k)!r}" for k in bad)
            + f"; got {', '.join(f'{k}={asked[k]!r}' for k in bad)} (options are fixed when an "
            "index is created)"
        )


# ------------------------------------------------------------------------------------ codebook
def _codebook(
    conf: Mapping[str, Any],
    index_dir: Path,
    h: dict[str, Any],
    photos_h5: Path,
    photos_name: str,
    *,
    codebook: str | os.PathLike[str] | None,
    codebook_images: str | os.PathLike[str] | None,
) -> None:
    """Set ``h["codebook"]`` on a new index: copy a given one, or train on a folder's
    features (or, with neither, on the photos themselves, with a warning)."""
    if codebook is not None and codebook_images is not None:
        raise ValueError("give --codebook or --codebook-images, not both")
    if codebook is not None:
        src = Path(codebook)
        src = src / "codebook.npy" if src.is_dir() else src
        from retrieval.features.codebook import load_codebook

        k = int(load_codebook(src).shape[0])  # checks it
        dst = index_dir / "codebook" / "codebook.npy"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if src.with_suffix(".json").exists():
            shutil.copyfile(src.with_suffix(".json"), dst.with_suffix(".json"))
        h["codebook_source"] = {"file": os.fspath(src.resolve())}
        h["training_set"] = run_conf.codebook_tag(src)
        h["conf"]["codebook"]["size"] = k
        h["codebook"] = os.path.relpath(dst, index_dir)
        return
    if codebook_images is not None:
        train, name = driver.extract_folder(conf, codebook_images, index_dir)
        h["codebook_source"] = {"images": os.fspath(Path(codebook_images).resolve())}
    else:
        logger.warning(
            "no codebook given: training it on the indexed photos themselves (fine for "
            "searching; give --codebook-images of other photos for fair evaluation)"
        )
        train, name = photos_h5, f"{photos_name}-self"
        h["codebook_source"] = {"self": photos_name}
    path = driver.build_codebook(conf, train, name, index_dir)
    h["training_set"] = name
    h["codebook"] = os.path.relpath(path, index_dir)


# ------------------------------------------------------------------------------------ stage
def main(
    conf: Mapping[str, Any] | None,
    image_dir: str | os.PathLike[str],
    index_dir: str | os.PathLike[str],
    *,
    codebook: str | os.PathLike[str] | None = None,
    codebook_images: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Index the photos of ``image_dir`` into ``index_dir``: create it, or add a new part.

    Args:
        conf: options of :data:`retrieval.runner.conf.default_conf` (features, kernel, codebook
            size, regions ...); fixed when the index is created.
        image_dir: any folder of photos (recursive; jpg, png, ...).
        index_dir: the index folder.
        codebook: a ``codebook.npy`` (or its folder) to copy in; or
        codebook_images: a folder of other photos to train the codebook on (neither: the
            photos themselves, warned).
        overwrite: delete an existing index first.

    Returns:
        ``index_dir/photos.json``. Photos already indexed (same resolved path) or removed
        (:func:`remove`) are skipped; a rerun after a kill extracts only the photos not yet
        committed.
    """
    idx = Path(index_dir)
    if overwrite and idx.exists():
        shutil.rmtree(idx)
    rc = run_conf.resolve_conf(conf)
    root = Path(image_dir).resolve()
    photos = folder_images(root)
    if not photos:
        raise ValueError(f"{image_dir}: no images ({', '.join(run_conf.IMAGE_SUFFIXES)}) found")
    if (idx / HEADER_NAME).exists():
        h = read_header(idx)
        _check_same_conf(idx, h["conf"], rc)
        if codebook is not None or codebook_images is not None:
            logger.warning("%s: the codebook stays fixed when an index grows; ignoring it", idx)
        rc = run_conf.resolve_conf(h["conf"])
    else:
        h = empty_header(rc)
    dead = set(h["tombstones"])
    known = {im["path"] for im in h["images"] if im["id"] not in dead}
    removed = set(h.get("removed_paths", [])) - known
    new = [(n, p) for n, p in photos if os.fspath(p) not in known | removed]
    skipped = sum(os.fspath(p) in removed for _, p in photos)
    if skipped:
        logger.info("%s: %d photos of %s were removed and stay out", idx, skipped, root)
    h5, folder_name = driver.extract_folder(rc, root, idx)  # resumable; skips extracted photos
    if h["codebook"] is None:
        _codebook(rc, idx, h, h5, folder_name, codebook=codebook, codebook_images=codebook_images)
        rc = h["conf"] = run_conf.resolve_conf(h["conf"])
    if not new:
        logger.info("%s: every photo of %s is indexed already", idx, root)
        write_json(idx / HEADER_NAME, h)
        return idx / HEADER_NAME
    from retrieval.features.codebook import load_codebook

    names = [n for n, _ in new]
    paths = [p for _, p in new]
    cb = load_codebook(idx / h["codebook"])
    regions = photo_regions(rc, names, paths, root, driver.image_sizes(h5, names))
    start = int(h["next_id"])
    part_name = f"part-{int(h['next_part']):05d}"
    ivf = driver.index_part(
        rc,
        names,
        h5,
        cb,
        regions=regions,
        meta={"start": start, "image_names": names, "features": os.fspath(h5)},
        region_norm_floor=run_conf.region_norm_floor(rc),
    )
    ivf.save(idx / "parts" / part_name)
    part: dict[str, Any] = {
        "path": f"parts/{part_name}",
        "start": start,
        "n_images": len(new),
        "regions": None,
    }
    if regions is not None:
        part["regions"] = f"parts/{part_name}.regions.csv"
        write_regions(idx / part["regions"], {start + i: regions[n] for i, n in enumerate(names)})
    h5_rel = os.path.relpath(h5, idx)
    h["images"].extend(
        {"id": start + i, "name": n, "path": os.fspath(p), "features": h5_rel}
        for i, (n, p) in enumerate(new)
    )
    h["parts"].append(part)
    h["next_id"] = start + len(new)
    h["next_part"] = int(h["next_part"]) + 1
    write_json(idx / HEADER_NAME, h)  # the commit point: the part is now part of the index
    write_config(idx, rc)
    logger.info("%s: added %d photos of %s as %s", idx, len(new), root, part_name)
    return idx / HEADER_NAME


def remove(index_dir: str | os.PathLike[str], targets: Sequence[str]) -> list[int]:
    """Put photos on the tombstone list (never returned again; dropped by :func:`compact`).

    Args:
        targets: image ids, photo paths, or folders (every indexed photo under them).

    Returns:
        the ids removed now (sorted); a photo removed before is skipped (a rerun is a no-op).

    Raises:
        ValueError: a target matching no photo ever indexed (nothing is removed then).
    """
    idx = Path(index_dir)
    h = read_header(idx)
    dead = set(h["tombstones"])
    by_path = {im["path"]: im["id"] for im in h["images"]}
    ids = {im["id"] for im in h["images"]}
    gone = set(h.setdefault("removed_paths", []))  # every path removed, also before compaction
    found: set[int] = set()
    for t in targets:
        p = os.fspath(Path(t).resolve())
        hit = {by_path[p]} if p in by_path else set()
        if not hit and Path(t).is_dir():
            hit = {i for q, i in by_path.items() if q.startswith(p.rstrip(os.sep) + os.sep)}
        if not hit and t.isdigit() and int(t) in ids:
            hit = {int(t)}
        if not hit and p in gone:
            logger.info("%s: %s was removed already", idx, t)
            continue
        if not hit:
            raise ValueError(f"--remove {t!r}: no such photo (path or id) in {idx}")
        found |= hit - dead
    h["tombstones"] = sorted(dead | found)
    paths = {im["id"]: im["path"] for im in h["images"]}
    h["removed_paths"] = sorted(gone | {paths[i] for i in found})
    write_json(idx / HEADER_NAME, h)
    logger.info("%s: removed %d photos (%d tombstones)", idx, len(found), len(h["tombstones"]))
    return sorted(found)


def compact(index_dir: str | os.PathLike[str]) -> Path:
    """Merge every part into one and drop the tombstoned photos (ids renumbered from 0).

    Nothing is re-aggregated (:meth:`retrieval.index.sharded.ShardedInvertedFile.merge`, then
    :meth:`retrieval.index.inverted_file.InvertedFile.select_images`); the new part is written
    before
    the header switches to it, and the old parts are deleted last.

    Returns:
        ``index_dir/photos.json``.
    """
    idx = Path(index_dir)
    h = read_header(idx)
    if not h["parts"]:
        raise ValueError(f"{idx}: the index has no photos to compact")
    sivf = sharded_index(idx, h)
    dead = np.zeros(sivf.n_images, bool)
    dead[np.asarray(h["tombstones"], np.int64)] = True
    keep = ~dead
    old = [im for im in h["images"] if not dead[im["id"]]]
    new_id = np.cumsum(keep) - 1
    part_name = f"part-{int(h['next_part']):05d}"
    merged = sivf.merge(meta={})
    ivf = merged.select_images(keep, meta={"start": 0, "compacted_from": len(h["parts"])})
    ivf.save(idx / "parts" / part_name)
    part: dict[str, Any] = {
        "path": f"parts/{part_name}",
        "start": 0,
        "n_images": ivf.n_images,
        "regions": None,
    }
    if any(p["regions"] for p in h["parts"]):
        regs: dict[int, list[Any]] = {}
        for p in h["parts"]:
            regs.update(read_regions(idx / p["regions"]))
        part["regions"] = f"parts/{part_name}.regions.csv"
        write_regions(
            idx / part["regions"], {int(new_id[i]): regs[i] for i in np.flatnonzero(keep)}
        )
    stale = list(h["parts"])
    h["images"] = [{**im, "id": int(new_id[im["id"]])} for im in old]
    h["parts"] = [part]
    h["tombstones"] = []
    h["next_id"] = ivf.n_images
    h["next_part"] = int(h["next_part"]) + 1
    write_json(idx / HEADER_NAME, h)
    for p in stale:
        shutil.rmtree(idx / p["path"], ignore_errors=True)
        if p["regions"]:
            (idx / p["regions"]).unlink(missing_ok=True)
    logger.info(
        "%s: compacted %d parts into %s (%d photos)", idx, len(stale), part_name, ivf.n_images
    )
    return idx / HEADER_NAME
