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
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import read_tagged_json, write_config, write_json
from retrieval import features as features_stage
from retrieval.index.inverted_file import InvertedFile
from retrieval.runner import conf as run_conf
from retrieval.runner import driver

__all__ = [
    "FORMAT_VERSION",
    "HEADER_NAME",
    "PhotoIndex",
    "QueryResult",
    "compact",
    "folder_images",
    "main",
    "read_gt_csv",
    "remove",
]

logger = logging.getLogger("retrieval.runner.photos")

FORMAT_VERSION = 1
HEADER_NAME = "photos.json"
# Query photos scored together (the score matrix is _QUERY_BATCH x n_ids float64).
_QUERY_BATCH = 16
GT_KINDS = ("easy", "hard", "junk")
_REGION_KEYS = ("regions", "region_boxes", "region_threshold")


# ------------------------------------------------------------------------------------ folders
def folder_images(image_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Every image under a folder (recursive), sorted, as ``(features id, resolved path)``.

    The ids are those of :func:`retrieval.runner.driver.extract_folder` (the path relative to the
    folder, ``/`` written ``__``).
    """
    _, items = driver.folder_items(image_dir, empty_ok=True)
    return [(it.name, Path(it.path).resolve()) for it in items]


def _empty_header(conf: Mapping[str, Any]) -> dict[str, Any]:
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


def _read_header(index_dir: Path) -> dict[str, Any]:
    hpath = index_dir / HEADER_NAME
    if not hpath.exists():
        raise FileNotFoundError(f"photo index not found: {hpath} (build it with --images)")
    return read_tagged_json(hpath, "gldboxes.photo_index", FORMAT_VERSION, "photo index")


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


# ------------------------------------------------------------------------------------ regions
def _photo_regions(
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
        h = _read_header(idx)
        _check_same_conf(idx, h["conf"], rc)
        if codebook is not None or codebook_images is not None:
            logger.warning("%s: the codebook stays fixed when an index grows; ignoring it", idx)
        rc = run_conf.resolve_conf(h["conf"])
    else:
        h = _empty_header(rc)
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
    regions = _photo_regions(rc, names, paths, root, driver.image_sizes(h5, names))
    start = int(h["next_id"])
    part_name = f"part-{int(h['next_part']):05d}"
    batch, item_image = driver.aggregate_database(rc, names, h5, cb, regions=regions)
    ivf = InvertedFile.build(
        batch,
        cb.shape[0],
        rc["kernel"],
        alpha=rc["alpha"],
        tau=rc["tau"],
        normalize=rc["normalize"],
        meta={"start": start, "image_names": names, "features": os.fspath(h5)},
        item_image=item_image,
        pooling=rc.get("regional_search") if item_image is not None else None,
        region_norm_floor=run_conf.region_norm_floor(rc) if item_image is not None else None,
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
        _write_regions(idx / part["regions"], {start + i: regions[n] for i, n in enumerate(names)})
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


def _write_regions(path: Path, regions: Mapping[int, Sequence[Any]]) -> Path:
    from gldboxes.boxes import write_boxes_csv

    return write_boxes_csv(path, {str(k): v for k, v in regions.items()}, with_score=True)


def _read_regions(path: Path) -> dict[int, list[Any]]:
    from retrieval.regions import read_regions_csv

    return {int(k): v for k, v in read_regions_csv(path).items()}


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
    h = _read_header(idx)
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
    h = _read_header(idx)
    if not h["parts"]:
        raise ValueError(f"{idx}: the index has no photos to compact")
    sivf = _sharded(idx, h)
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
            regs.update(_read_regions(idx / p["regions"]))
        part["regions"] = f"parts/{part_name}.regions.csv"
        _write_regions(
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


def _sharded(idx: Path, h: Mapping[str, Any]) -> Any:
    from retrieval.index.sharded import ShardedInvertedFile

    parts = tuple(InvertedFile.load(idx / p["path"]) for p in h["parts"])
    starts = np.array([int(p["start"]) for p in h["parts"]], np.int64)
    return ShardedInvertedFile(parts, starts, {})


# ------------------------------------------------------------------------------------ queries
@dataclass(frozen=True)
class QueryResult:
    """The top-k of one query photo.

    Attributes:
        query: the query photo. ids: int64 (k,) image ids, best first. paths: their photos.
        scores: float64 (k,) first-stage scores (ASMK*...). inliers: int64 (k,) verified
            inlier counts (None without verification). matches: per result, float64 (m, 4)
            inlier correspondences ``x_q, y_q, x_db, y_db`` in original pixels (None without
            verification). regions: per result, its index-side regions (empty without).
        query_size: (width, height) of the query photo.
    """

    query: Path
    ids: np.ndarray
    paths: tuple[str, ...]
    scores: np.ndarray
    inliers: np.ndarray | None = None
    matches: tuple[np.ndarray, ...] | None = None
    regions: tuple[tuple[Any, ...], ...] = ()
    query_size: tuple[int, int] = (0, 0)


@dataclass(frozen=True, eq=False)
class PhotoIndex:
    """An opened photo index (see the module docstring): parts, codebook and the id map.

    Attributes:
        root: the index folder. header: ``photos.json``. conf: the resolved run conf.
        index: the parts as a :class:`retrieval.index.sharded.ShardedInvertedFile`.
        codebook: float32 (K, D). live: bool (n_ids,) not tombstoned.
        order_key: int64 (n_ids,) rank of each id by (photo name, path): the tie-break.
    """

    root: Path
    header: dict[str, Any]
    conf: dict[str, Any]
    index: Any
    codebook: np.ndarray
    live: np.ndarray
    order_key: np.ndarray

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str]) -> PhotoIndex:
        from retrieval.features.codebook import load_codebook

        idx = Path(index_dir)
        h = _read_header(idx)
        if not h["parts"]:
            raise ValueError(f"{idx}: the index holds no photos")
        sivf = _sharded(idx, h)
        n = sivf.n_images
        if len(h["images"]) != n:
            raise ValueError(f"{idx / HEADER_NAME}: {len(h['images'])} photos for {n} indexed")
        live = np.ones(n, bool)
        live[np.asarray(h["tombstones"], np.int64)] = False
        names = [(im["name"], im["path"]) for im in h["images"]]
        key = np.empty(n, np.int64)
        key[sorted(range(n), key=names.__getitem__)] = np.arange(n)
        return cls(
            idx,
            h,
            run_conf.resolve_conf(h["conf"]),
            sivf,
            load_codebook(idx / h["codebook"]),
            live,
            key,
        )

    @property
    def n_photos(self) -> int:
        """Photos that can be returned (tombstones excluded)."""
        return int(self.live.sum())

    def path(self, image_id: int) -> str:
        return str(self.header["images"][image_id]["path"])

    def extract(self, photos: Sequence[str | os.PathLike[str]]) -> list[Any]:
        """Features of query photos, in memory: ``[(ExtractedFeatures, (w, h)), ...]``."""
        fc = run_conf.feature_conf(self.conf)
        extractor = features_stage.make_extractor(fc)
        out = []
        for p in photos:
            path = Path(p)
            if not path.is_file():
                raise FileNotFoundError(f"query photo not found: {path}")
            out.append(
                features_stage.extract_image(
                    extractor, features_stage.ImageItem(path.name, path), fc
                )
            )
        return out

    def rank(
        self, photos: Sequence[str | os.PathLike[str]], k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """First-stage ranking of the live photos for each query photo.

        Returns:
            ``(ids, scores, features)``: int64 and float64 (n_queries, min(k, n_photos)),
            ordered by score desc then photo name / path; and the queries' features.
        """
        from retrieval.index.aggregation import QUERY_KERNEL, aggregate_many

        feats = self.extract(photos)
        n = self.live.shape[0]
        kk = self.n_photos if k is None else min(int(k), self.n_photos)
        ids = np.zeros((len(feats), kk), np.int64)
        out = np.zeros((len(feats), kk), np.float64)
        for a in range(0, len(feats), _QUERY_BATCH):  # memory: _QUERY_BATCH x n_ids floats
            q = aggregate_many(
                [f.descriptors for f, _ in feats[a : a + _QUERY_BATCH]],
                self.codebook,
                QUERY_KERNEL[self.conf["kernel"]],
                num_assignments=int(self.conf["num_assignments"]),
            )
            scores = self.index.scores(q)  # (batch, n_ids)
            scores[:, ~self.live] = -np.inf
            for r, row in enumerate(scores, start=a):
                cand = np.arange(n)
                if 0 < kk < n:  # only the photos scoring at least the k-th best are sorted
                    cand = np.flatnonzero(row >= np.partition(row, n - kk)[n - kk])
                best = cand[np.lexsort((self.order_key[cand], -row[cand]))][:kk]
                ids[r], out[r] = best, row[best]
        return ids, out, feats

    def regions_of(
        self, ids: Sequence[int], conf: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Regions of the given ids: the index's own (empty tuples for an index without
        regions), or computed under ``conf`` (a resolved conf with ``regions``)."""
        if conf is not None:
            ims = [self.header["images"][int(i)] for i in ids]
            sizes: dict[str, Any] = {}
            for rel in {im["features"] for im in ims}:
                names = [im["name"] for im in ims if im["features"] == rel]
                sizes.update(driver.image_sizes(self.root / rel, names))
            keys = [im["name"] for im in ims]
            paths = [Path(im["path"]) for im in ims]
            got = _photo_regions(conf, keys, paths, None, sizes) or {}
            return [tuple(got[n]) for n in keys]
        parts = self.header["parts"]
        if not any(p["regions"] for p in parts):
            return [() for _ in ids]
        regs: dict[int, list[Any]] = {}
        for p in parts:
            regs.update(_read_regions(self.root / p["regions"]))
        return [tuple(regs.get(int(i), [])) for i in ids]

    def query(
        self,
        photos: Sequence[str | os.PathLike[str]],
        k: int = 10,
        *,
        verification: Mapping[str, Any] | None = None,
        regions: Mapping[str, Any] | None = None,
    ) -> list[QueryResult]:
        """The top-``k`` photos of each query photo, optionally spatially verified.

        Args:
            verification: None (off) or the run's ``verification`` dict (``top_n``: head
                verified, default 100; the other keys of
                :class:`retrieval.verification.VerificationConf`, defaults from the features
                preset). The verified head is re-ranked by (inliers, score, name) with
                :func:`retrieval.verification.rerank` and the top ``k`` of it returned.
            regions: the results' regions to report instead of the index's own: ``regions``
                (a :data:`retrieval.regions.confs` preset), ``region_boxes`` (a boxes CSV,
                e.g. ``detect boxes`` run on the photos), ``region_threshold``.
        """
        if k < 1:
            raise ValueError(f"--top-k must be >= 1, got {k}")
        rconf = None
        if regions is not None and regions.get("regions"):
            rconf = run_conf.resolve_conf(
                {**{key: regions.get(key) for key in _REGION_KEYS}, "region_features": "assign"}
            )
        verify = verification is not None
        vc = top_n = None
        if verify:
            vc, top_n, _ = run_conf.verification_conf(
                {**self.conf, "verification": dict(verification or {})}
            )
        depth = max(k, int(top_n or 0))
        ids, scores, feats = self.rank(photos, depth)
        out = []
        for qi, photo in enumerate(photos):
            qid, qsc = ids[qi], scores[qi]
            inl = matches = None
            if verify:
                qid, qsc, inl, matches = self._verify(feats[qi], qid, qsc, vc, int(top_n or 0))
            qid, qsc = qid[:k], qsc[:k]
            out.append(
                QueryResult(
                    query=Path(photo),
                    ids=qid,
                    paths=tuple(self.path(int(i)) for i in qid),
                    scores=qsc,
                    inliers=None if inl is None else inl[:k],
                    matches=None if matches is None else tuple(matches[:k]),
                    regions=tuple(self.regions_of(qid.tolist(), rconf)),
                    query_size=(int(feats[qi][1][0]), int(feats[qi][1][1])),
                )
            )
        return out

    def _verify(
        self, qfeat: Any, ids: np.ndarray, scores: np.ndarray, vc: Any, top_n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Verify the head of one ranking; returns it re-ranked with inliers and matches."""
        from retrieval.verification import Features, read_features_h5, rerank, verify_pair

        max_side = int(run_conf.feature_conf(self.conf)["preprocessing"].get("max_side", 1024))
        f, size = qfeat
        q = Features(f.keypoints.astype(np.float64), f.descriptors, max(1.0, max(size) / max_side))
        head = [int(i) for i in ids[:top_n]]
        by_file: dict[str, list[int]] = {}
        for i in head:
            by_file.setdefault(self.header["images"][i]["features"], []).append(i)
        db: dict[int, Any] = {}
        for rel, members in by_file.items():
            names = [self.header["images"][i]["name"] for i in members]
            got = read_features_h5(self.root / rel, names, max_side=max_side)
            db.update({i: got[n] for i, n in zip(members, names, strict=True)})
        pairs = {i: verify_pair(q, db[i], vc) for i in head}
        cache = {
            i: (r.num_inliers if r.num_inliers >= vc.min_inliers else 0) for i, r in pairs.items()
        }
        rr = rerank(q, db, ids.tolist(), scores, top_n=len(head), conf=vc, cache=cache)
        order = rr.order
        new_ids = ids[order]
        inl = np.array([cache.get(int(i), 0) for i in new_ids], np.int64)
        matches = []
        for i in new_ids[: len(head)]:
            r = pairs[int(i)]
            m = r.matches[r.affine.inliers]
            matches.append(np.hstack([q.keypoints[m[:, 0]], db[int(i)].keypoints[m[:, 1]]]))
        return new_ids, scores[order], inl, matches


# ------------------------------------------------------------------------------------ ground truth
def read_gt_csv(
    path: str | os.PathLike[str], index: PhotoIndex
) -> tuple[list[Path], list[dict[str, list[int]]]]:
    """Ground truth of own photos from a CSV ``query,positive[,kind]`` (kind easy|hard|junk,
    default easy).

    Queries are photo paths; positives are paths or ids of indexed photos (relative paths are
    taken from the CSV's folder). Returns the queries (first-seen order) and their Revisited
    ground truth ``{"easy", "hard", "junk"}`` as positions among the index's live photos (the
    rows of a ranking over them, see :meth:`PhotoIndex.rank`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ground-truth CSV not found: {p}")
    live_ids = np.flatnonzero(index.live)
    pos = {int(i): j for j, i in enumerate(live_ids)}
    by_path = {im["path"]: im["id"] for im in index.header["images"]}
    queries: dict[str, dict[str, list[int]]] = {}
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "query" not in cols or "positive" not in cols:
            raise ValueError(f"{p}: expected columns query,positive[,kind], got {cols}")
        for line, row in enumerate(reader, start=2):
            q, t = (row.get("query") or "").strip(), (row.get("positive") or "").strip()
            kind = (row.get("kind") or "easy").strip() or "easy"
            if not q or not t:
                raise ValueError(f"{p}:{line}: empty query or positive")
            if kind not in GT_KINDS:
                raise ValueError(f"{p}:{line}: kind {kind!r} is not one of {GT_KINDS}")
            qpath = (p.parent / q).resolve()
            tpath = os.fspath((p.parent / t).resolve())
            iid = by_path.get(tpath)
            if iid is None and t.isdigit():
                iid = int(t)
            if iid is None or iid not in pos:
                raise ValueError(f"{p}:{line}: {t!r} is not a photo of the index (path or id)")
            g = queries.setdefault(os.fspath(qpath), {k: [] for k in GT_KINDS})
            g[kind].append(pos[iid])
    if not queries:
        raise ValueError(f"{p}: no rows")
    return [Path(q) for q in queries], list(queries.values())


def evaluate_gt(
    index: PhotoIndex, gt_csv: str | os.PathLike[str], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[dict[str, Any], np.ndarray]:
    """Easy/Medium/Hard mAP and mP@k of the index's ranking for the CSV's queries.

    The ranking is over the live photos (positions as in :func:`read_gt_csv`) and is scored by
    :func:`retrieval.evaluation.evaluate.evaluate_protocols`.

    Returns:
        ``({protocol: ProtocolResult}, ranks int64 (n_photos, n_queries))``.
    """
    from retrieval.evaluation.evaluate import evaluate_protocols

    queries, gnd = read_gt_csv(gt_csv, index)
    ids, _, _ = index.rank(queries)
    pos = np.full(index.live.shape[0], -1, np.int64)
    pos[index.live] = np.arange(index.n_photos)
    ranks = np.ascontiguousarray(pos[ids].T)
    return evaluate_protocols(ranks, gnd, kappas, n_db=index.n_photos), ranks
