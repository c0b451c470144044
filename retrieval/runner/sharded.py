"""Retrieval's per-image stages on the executor, and the sharded inverted file.

Stages (each a :class:`gldboxes.executor.Stage`, run shard by shard by the serial or the Ray
executor; shard ``i`` of a database always covers the same range of image ids):

* **features** (:func:`feature_stage`): RootSIFT or DELF (:mod:`retrieval.features`) of a
  shard of images into ``<shard>/features.h5`` (the features file layout); the extractor (a DELF
  SavedModel) is loaded once per worker process.
* **aggregation** (:func:`aggregation_stage`): ASMK/ASMK*/VLAD (:mod:`retrieval.index.aggregation`)
  of a features shard into an index part ``<shard>/index/`` (an
  :class:`retrieval.index.inverted_file.InvertedFile` over the shard's images, local ids
  ``0..n_part-1`` = global ids ``start..stop-1``); the codebook is loaded once per worker.
  With index-side regions (Detect-to-Retrieve) a part holds R-ASMK*-style regional entries or,
  for regional search, one item per region with a part-local ``item_image``.
* **search** (:func:`search_stage`): score the queries against one index part, keep its top-k
  (global ids) in ``<shard>/ids.npy`` and ``scores.npy``; :func:`merge_topk` on the driver.
* **spatial verification** (:func:`verification_stage`): re-rank a batch of queries
  (:func:`retrieval.verification.rerank_revisited`) into ``<shard>/ranks_<protocol>.npy``.

Global steps run on the driver: the codebook's k-means on a seeded sample gathered from the
feature shards (:meth:`FeatureShards.sample_descriptors`, the same sample as
:func:`retrieval.features.codebook.sample_descriptors` on the merged file), merging index parts
(:meth:`ShardedInvertedFile.merge`), merging top-k lists and the metrics.

The **sharded inverted file** (:class:`ShardedInvertedFile`) is a list of index parts by
image-id range. Searching it part by part and merging the per-part top-k by (score desc, global
id asc) gives the same rankings as the single index: a (query, image) score only involves the
query's and that image's words, so every part computes the score the single index computes, and
the tie-break by ascending id is preserved because local ids keep the global order.

:func:`run` chains everything for a Revisited-style folder (features -> codebook -> index parts
-> search -> metrics, optionally spatial verification) with any executor.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gldboxes.executor import Executor, Resources, Shard, Stage, StageReport, make_shards
from gldboxes.http import md5sum
from gldboxes.io import (
    atomic_path,
    atomic_write,
    config_hash,
    read_json,
    read_tagged_json,
    write_config,
    write_json,
)
from retrieval import features as features_stage
from retrieval.features.codebook import sample_rows
from retrieval.index.aggregation import KERNELS, AggregatedBatch, aggregate_many
from retrieval.index.inverted_file import InvertedFile

__all__ = [
    "FORMAT_VERSION",
    "FeatureShards",
    "ShardedInvertedFile",
    "ShardedRun",
    "aggregation_stage",
    "feature_stage",
    "merge_topk",
    "run",
    "search_sharded",
    "search_stage",
    "verification_stage",
    "verify_sharded",
]

logger = logging.getLogger("retrieval.runner.sharded")

FORMAT_VERSION = 1
HEADER_NAME = "sharded.json"


# ====================================================================================== features
def _features_shard(
    shard: Shard, out: Path, extractor: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Extract the images ``[name, path, bbx or None]`` of a shard into ``out/features.h5``."""
    counts = {"images": 0, "ok": 0, "empty": 0, "error": 0, "descriptors": 0}
    dim = max(int(getattr(extractor, "dim", 128)), 0)
    with h5py.File(out / "features.h5", "w") as f:
        f.attrs["format_version"] = features_stage.FORMAT_VERSION
        f.attrs["conf"] = conf["output"]
        for name, path, bbx in shard.items:
            item = features_stage.ImageItem(name, Path(path), None if bbx is None else tuple(bbx))
            attrs: dict[str, Any] = {}
            if item.bbx is not None:
                attrs["bbx"] = np.asarray(item.bbx, np.float64)
            try:
                feats, size = features_stage.extract_image(extractor, item, conf)
                attrs["image_size"] = np.asarray(size, np.int64)
                attrs["status"] = "ok" if feats.descriptors.shape[0] else "empty"
            except (features_stage.BadImageError, FileNotFoundError, ValueError) as exc:
                feats = features_stage.ExtractedFeatures.empty(dim)
                attrs["status"] = "error"
                attrs["error"] = str(exc)
                logger.warning("%s: %s", name, exc)
            features_stage.write_image(f, name, feats, attrs)
            counts["images"] += 1
            counts[str(attrs["status"])] += 1
            counts["descriptors"] += int(feats.descriptors.shape[0])
    return counts


def feature_stage(
    conf: Mapping[str, Any],
    images: Sequence[features_stage.ImageItem],
    *,
    shard_size: int = 256,
    shard_sizes: Sequence[int] | None = None,
    resources: Resources | None = None,
    retries: int = 2,
) -> tuple[Stage, list[Shard]]:
    """Local features as an executor stage: one shard per ``shard_size`` images, in order.

    Args:
        conf: a preset of :data:`retrieval.features.confs` (resolved ``model`` overrides).
        images: the images (unique ids; ``bbx`` set for cropped queries and region crops).
        shard_size: images per shard (shard ``i`` holds images ``i*shard_size ...``).
        shard_sizes: or the number of images of every shard, in order (zeros allowed: region
            crops grouped by the feature shard of their image).
        resources: per-task resources (default: 0.5 CPU; DELF on GPU: ``num_gpus``).

    Returns:
        ``(stage, shards)``; run with ``executor.run(stage, shards, folder)`` and open the
        result with :class:`FeatureShards`.
    """
    names = [it.name for it in images]
    if len(set(names)) != len(names):
        raise ValueError(f"feature_stage: duplicate image ids among {len(names)} images")
    items = [
        [it.name, os.fspath(Path(it.path).resolve()), None if it.bbx is None else list(it.bbx)]
        for it in images
    ]
    import cv2

    stage = Stage(
        f"features-{conf['output']}",
        functools.partial(_features_shard, conf=dict(conf)),
        conf=dict(conf),
        # the factory features.main uses: a shard's features are the single-file stage's
        load_model=functools.partial(features_stage.make_extractor, dict(conf)),
        resources=resources or Resources(num_cpus=0.5),
        retries=retries,
        versions={"opencv": cv2.__version__, "h5py": h5py.__version__},
    )
    if shard_sizes is None:
        return stage, make_shards(items, shard_size, prefix="shard")
    sizes = [int(n) for n in shard_sizes]
    if sum(sizes) != len(items) or min(sizes, default=0) < 0:
        raise ValueError(
            f"feature_stage: shard sizes {sizes[:5]}... add up to {sum(sizes)}, not to the "
            f"{len(items)} images (or are negative)"
        )
    offs = np.r_[0, np.cumsum(sizes)].tolist()
    shards = [
        Shard(i, tuple(items[a:b]), f"shard-{i:05d}", {"start": a, "stop": b})
        for i, (a, b) in enumerate(itertools.pairwise(offs))
    ]
    return stage, shards


@dataclass(frozen=True)
class FeatureShards:
    """The feature files of a sharded extraction, read as one dataset.

    Attributes:
        paths: ``features.h5`` of every shard, in shard order.
        names: per shard, its image ids in order.
    """

    paths: tuple[Path, ...]
    names: tuple[tuple[str, ...], ...]

    @classmethod
    def from_run(cls, report: StageReport | Path, shards: Sequence[Shard]) -> FeatureShards:
        """The shards of a finished :func:`feature_stage` run (its report or output folder)."""
        root = report.out_dir if isinstance(report, StageReport) else Path(report)
        paths = tuple(root / s.name / "features.h5" for s in shards)
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{root}: {len(missing)} feature shard(s) missing: {missing[:3]}"
            )
        return cls(paths, tuple(tuple(str(it[0]) for it in s.items) for s in shards))

    @property
    def all_names(self) -> list[str]:
        return [n for ns in self.names for n in ns]

    def _where(self) -> dict[str, int]:
        return {n: i for i, ns in enumerate(self.names) for n in ns}

    def read_descriptors(self, names: Sequence[str]) -> list[np.ndarray]:
        """float32 (N_i, D) descriptors of ``names`` in order (one file open per shard)."""
        where = self._where()
        missing = [n for n in names if n not in where]
        if missing:
            raise ValueError(f"no feature shard holds {len(missing)} ids (first: {missing[:3]})")
        out: dict[str, np.ndarray] = {}
        by_shard: dict[int, list[str]] = {}
        for n in dict.fromkeys(names):
            by_shard.setdefault(where[n], []).append(n)
        for s, ns in by_shard.items():
            for n, d in zip(ns, features_stage.read_descriptors(self.paths[s], ns), strict=True):
                out[n] = d
        return [out[n] for n in names]

    def read_local(self, names: Sequence[str], *, max_side: int | None = None) -> dict[str, Any]:
        """``{id: Features(keypoints, descriptors, scale)}`` for spatial verification
        (``max_side``: see :func:`retrieval.verification.read_features_h5`)."""
        from retrieval.verification import read_features_h5

        where = self._where()
        by_shard: dict[int, list[str]] = {}
        for n in dict.fromkeys(names):
            if n not in where:
                raise ValueError(f"no feature shard holds id {n!r}")
            by_shard.setdefault(where[n], []).append(n)
        out: dict[str, Any] = {}
        for s, ns in by_shard.items():
            out.update(read_features_h5(self.paths[s], ns, max_side=max_side))
        return out

    def sample_descriptors(self, max_descriptors: int, seed: int) -> tuple[np.ndarray, int]:
        """A seeded uniform sample of all shards' descriptors (driver-side, for k-means).

        The draw is over the images sorted by id, exactly as
        :func:`retrieval.features.codebook.sample_descriptors` draws from one merged file, so
        sharded
        and single-file runs train the same codebook.

        Returns:
            ``(sample (M, D) float32, total number of descriptors)``.
        """
        where = self._where()
        names = sorted(where)
        files = [h5py.File(p, "r") for p in self.paths]
        try:
            counts = np.array([files[where[n]][n]["descriptors"].shape[0] for n in names], np.int64)
            total = int(counts.sum())
            if total == 0:
                raise ValueError(f"{self.paths[0].parent.parent}: no descriptors to sample")
            items, bounds, rows = sample_rows(counts, max_descriptors, seed)
            spans = zip(items.tolist(), itertools.pairwise(bounds.tolist()), strict=True)
            parts = [  # per sampled image (not per descriptor)
                files[where[names[i]]][names[i]]["descriptors"][()][rows[a:b]]
                for i, (a, b) in spans
            ]
        finally:
            for f in files:
                f.close()
        return np.concatenate(parts).astype(np.float32, copy=False), total

    def merge(self, output: str | os.PathLike[str]) -> Path:
        """Copy every shard into one features file (the layout of :mod:`retrieval.features`)."""
        out = Path(output)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
            for p in self.paths:
                with h5py.File(p, "r") as src:
                    for k, v in src.attrs.items():
                        dst.attrs[k] = v
                    for n in src:
                        src.copy(src[n], dst, name=n)
        return out


# =================================================================================== aggregation
def _load_codebook(path: str) -> np.ndarray:
    from retrieval.features.codebook import load_codebook

    return load_codebook(path)


def _aggregation_shard(
    shard: Shard, out: Path, codebook: np.ndarray, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Aggregate the images of one features shard into the index part ``out/index``.

    With regions (``shard.meta["regions"]``: the part's rows of the regions CSV) the part is
    built by :func:`retrieval.runner.engine.aggregate_database` exactly as the single index is: one
    entry per image (regional kernel) or one item per region with a part-local ``item_image``
    (regional search; the part's images are ``0 .. n_part - 1``, ``start`` maps them back).
    """
    from retrieval.regions import read_regions_csv
    from retrieval.runner.engine import aggregate_database

    names = [str(n) for n in shard.items]
    regions = None
    if shard.meta.get("regions"):
        regions = read_regions_csv(Path(shard.meta["regions"]))
    batch, item_image = aggregate_database(
        conf,
        names,
        shard.meta["features"],
        codebook,
        regions=regions,
        regions_features=shard.meta.get("regions_features"),
    )
    ivf = InvertedFile.build(
        batch,
        codebook.shape[0],
        conf["kernel"],
        alpha=conf["alpha"],
        tau=conf["tau"],
        normalize=conf["normalize"],
        meta={
            "start": int(shard.meta["start"]),
            "stop": int(shard.meta["stop"]),
            "image_names": names,
            "config_hash": conf["config_hash"],
            "regions": conf.get("regions"),
            "region_features": conf.get("region_features") if regions is not None else None,
        },
        item_image=item_image,
        pooling=conf.get("regional_search") if item_image is not None else None,
        region_norm_floor=conf.get("region_norm_floor"),
    )
    ivf.save(out / "index")
    st = ivf.stats()
    return {
        "images": int(st["images"]),
        "items": int(st["items"]),
        "postings": int(st["postings"]),
        "bytes": int(st["bytes"]),
    }


def _split_regions_csv(
    regions_csv: Path, parts: Sequence[Sequence[str]], folder: Path
) -> list[Path]:
    """Write each part's rows of a regions CSV (same fields, file order) to its own CSV.

    The files are named after their content (``part-XXXXX-<md5>.csv``), so runs with other
    shard sizes never overwrite each other's inputs and an unchanged part keeps its name.
    """
    import csv
    import hashlib

    with open(regions_csv, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or "id" not in header:
            raise ValueError(f"{regions_csv}: expected a regions CSV with an 'id' column")
        i_id = header.index("id")
        rows: dict[str, list[list[str]]] = {}
        for row in reader:
            if row:
                rows.setdefault(row[i_id], []).append(row)
    out = []
    for i, names in enumerate(parts):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for n in names:
            w.writerows(rows.get(n, []))
        text = buf.getvalue()
        digest = hashlib.md5(text.encode("utf-8")).hexdigest()[:10]
        path = folder / f"part-{i:05d}-{digest}.csv"
        if not path.exists():
            with atomic_write(path, newline="") as fh:
                fh.write(text)
        out.append(path)
    return out


def aggregation_stage(
    conf: Mapping[str, Any],
    features: FeatureShards,
    codebook_path: str | os.PathLike[str],
    *,
    regions_csv: str | os.PathLike[str] | None = None,
    region_features: FeatureShards | None = None,
    resources: Resources | None = None,
    retries: int = 2,
) -> tuple[Stage, list[Shard]]:
    """Per-image aggregation into index parts: one part per feature shard (same id range).

    Args:
        conf: ``kernel``, ``num_assignments``, ``alpha``, ``tau``, ``normalize`` and, with
            regions, ``region_features`` and ``regional_search`` (the
            :data:`retrieval.runner.engine.default_conf` keys).
        features: the database's feature shards.
        codebook_path: ``codebook.npy`` (its md5 enters the config hash).
        regions_csv: index-side regions (:func:`retrieval.runner.engine.build_regions`); each part
            gets its images' rows in ``<regions stem>.parts/`` beside it.
        region_features: ``reextract`` mode: the crops' feature shards, shard ``i`` holding
            the crops of feature shard ``i``'s images.

    Returns:
        ``(stage, shards)``; open the parts with :meth:`ShardedInvertedFile.from_stage`.
    """
    from retrieval.index.aggregation import REGIONAL_KERNELS

    if conf["kernel"] not in KERNELS:
        raise ValueError(f"unknown kernel {conf['kernel']!r}; expected one of {list(KERNELS)}")
    cb = os.fspath(Path(codebook_path).resolve())
    if Path(cb).is_dir():
        cb = os.fspath(Path(cb) / "codebook.npy")
    if not Path(cb).exists():
        raise FileNotFoundError(f"codebook not found: {cb}")
    mode = conf.get("region_features") or "assign"
    pooling = conf.get("regional_search")
    if regions_csv is None:
        if pooling:
            raise ValueError("aggregation_stage: regional_search needs regions (regions_csv)")
        if region_features is not None:
            raise ValueError("aggregation_stage: region_features given without regions_csv")
    else:
        if not pooling and conf["kernel"] not in REGIONAL_KERNELS:
            raise ValueError(
                f"regions given with the single-image kernel {conf['kernel']!r} and no "
                f"regional_search: use a regional kernel ({sorted(REGIONAL_KERNELS)}) or "
                "regional_search"
            )
        if mode == "reextract" and region_features is None:
            raise ValueError("aggregation_stage: reextract mode needs the crops' feature shards")
        if region_features is not None and len(region_features.paths) != len(features.paths):
            raise ValueError(
                f"aggregation_stage: {len(region_features.paths)} crop feature shards for "
                f"{len(features.paths)} image feature shards (they must pair up)"
            )
    sconf: dict[str, Any] = {
        k: conf.get(k) for k in ("kernel", "num_assignments", "alpha", "tau", "normalize")
    }
    sconf["num_assignments"] = int(sconf["num_assignments"] or 1)
    sconf["codebook"] = cb
    sconf["codebook_md5"] = md5sum(cb)
    if regions_csv is not None:
        sconf["regions"] = Path(regions_csv).stem
        sconf["region_features"] = mode
        sconf["regional_search"] = pooling
        if pooling:
            from retrieval.runner.engine import region_norm_floor

            sconf["region_norm_floor"] = region_norm_floor(conf)
    sconf["config_hash"] = config_hash(sconf)
    stage = Stage(
        f"aggregate-{conf['kernel']}",
        functools.partial(
            _aggregation_shard,
            conf={**sconf, "batch_images": int(conf.get("batch_images") or 512)},
        ),
        conf=sconf,
        load_model=functools.partial(_load_codebook, cb),
        resources=resources or Resources(num_cpus=0.5),
        retries=retries,
    )
    part_regions: list[Path | None] = [None] * len(features.paths)
    if regions_csv is not None:
        rpath = Path(regions_csv).resolve()
        part_regions = list(
            _split_regions_csv(rpath, features.names, rpath.with_name(f"{rpath.stem}.parts"))
        )
    shards = []
    start = 0
    for i, (path, names) in enumerate(zip(features.paths, features.names, strict=True)):
        meta: dict[str, Any] = {
            "start": start,
            "stop": start + len(names),
            "features": os.fspath(path),
            "features_md5": md5sum(path),
        }
        rpart = part_regions[i]
        if rpart is not None:
            meta["regions"] = os.fspath(rpart)
            meta["regions_md5"] = md5sum(rpart)
        if region_features is not None and mode == "reextract":
            meta["regions_features"] = os.fspath(region_features.paths[i])
            meta["regions_features_md5"] = md5sum(region_features.paths[i])
        shards.append(Shard(i, tuple(names), f"part-{i:05d}", meta))
        start += len(names)
    return stage, shards


# ============================================================================ sharded index
def merge_topk(
    ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part top-k lists into one: score descending, then global id ascending.

    Args:
        ids: per part, int64 (n_queries, k_p) global image ids.
        scores: per part, float64 (n_queries, k_p), aligned with ``ids``.
        k: how many to keep (``None``: all).

    Returns:
        ``(ids, scores)``: int64 and float64 (n_queries, k).
    """
    if not ids or len(ids) != len(scores):
        raise ValueError("merge_topk: give one (ids, scores) pair per part")
    all_ids = np.concatenate([np.asarray(a, np.int64) for a in ids], axis=1)
    all_sc = np.concatenate([np.asarray(s, np.float64) for s in scores], axis=1)
    if all_ids.shape != all_sc.shape:
        raise ValueError(f"merge_topk: ids {all_ids.shape} and scores {all_sc.shape} differ")
    order = np.lexsort((all_ids, -all_sc), axis=-1)
    if k is not None:
        order = order[:, :k]
    return np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_sc, order, 1)


@dataclass(frozen=True, eq=False)
class ShardedInvertedFile:
    """An inverted file split into parts by image-id range, searched part by part.

    Regional-search parts (D2R: items are regions, pooled per image) keep a part-local
    ``item_image`` (images ``0 .. n_p - 1`` of the part); pooling happens inside each part, so
    the parts' image scores and the merged top-k are those of the single regional index.

    Attributes:
        parts: the index parts; part ``p`` holds global images ``starts[p] .. starts[p] +
            parts[p].n_images - 1`` under local ids ``0 ..``.
        starts: int64 (n_parts,) first global id of each part (contiguous ranges).
        meta: JSON-able metadata (image names, config hash ...).
    """

    parts: tuple[InvertedFile, ...]
    starts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("ShardedInvertedFile: no parts")
        starts = np.asarray(self.starts, np.int64)
        sizes = np.array([p.n_images for p in self.parts], np.int64)
        want = np.r_[0, np.cumsum(sizes)[:-1]]
        if starts.shape != want.shape or np.any(starts != want):
            raise ValueError(
                f"ShardedInvertedFile: part starts {starts.tolist()} are not contiguous ranges "
                f"for part sizes {sizes.tolist()}"
            )
        kinds = {
            (p.kernel, p.dim, p.binary, p.codebook_size, p.alpha, p.tau, p.normalize, p.pooling)
            for p in self.parts
        }
        if len(kinds) != 1:
            raise ValueError(f"ShardedInvertedFile: parts disagree on kernel/parameters: {kinds}")
        object.__setattr__(self, "starts", starts)

    # ---------------------------------------------------------------- build / files
    @classmethod
    def build(
        cls,
        batch: AggregatedBatch,
        codebook_size: int,
        kernel: str,
        part_size: int,
        *,
        alpha: float | None = None,
        tau: float | None = None,
        normalize: bool | None = None,
        meta: Mapping[str, Any] | None = None,
        item_image: np.ndarray | None = None,
        pooling: str | None = None,
        region_norm_floor: float | None = None,
    ) -> ShardedInvertedFile:
        """Build parts of ``part_size`` images from one aggregated database (in memory).

        Args:
            batch: the database, one entry per image, or per item with ``item_image``.
            item_image: regional search: int (n_items,) image of each item (sorted, as for
                :meth:`InvertedFile.build`); each part gets its images' items and a
                part-local ``item_image``. pooling: ``"max"`` or ``"avg"`` with it.
        """
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        owner = None if item_image is None else np.asarray(item_image, np.int64)
        if owner is not None and owner.shape != (batch.n_images,):
            raise ValueError(
                f"item_image has shape {owner.shape}, expected ({batch.n_images},) items"
            )
        n_images = batch.n_images if owner is None else (int(owner[-1]) + 1 if owner.size else 0)
        parts = []
        starts = []
        for a in range(0, max(n_images, 1), part_size):
            b = min(n_images, a + part_size)
            # the part's items: all of them for images a..b-1
            ia, ib = (a, b) if owner is None else np.searchsorted(owner, [a, b]).tolist()
            lo, hi = int(batch.offsets[ia]), int(batch.offsets[ib])
            sub = AggregatedBatch(
                batch.offsets[ia : ib + 1] - lo, batch.words[lo:hi], batch.data[lo:hi], batch.dim
            )
            parts.append(
                InvertedFile.build(
                    sub,
                    codebook_size,
                    kernel,
                    alpha=alpha,
                    tau=tau,
                    normalize=normalize,
                    item_image=None if owner is None else owner[ia:ib] - a,
                    pooling=None if owner is None else pooling,
                    region_norm_floor=region_norm_floor,
                )
            )
            starts.append(a)
        return cls(tuple(parts), np.asarray(starts, np.int64), dict(meta or {}))

    @classmethod
    def from_stage(
        cls, out_dir: str | os.PathLike[str], shards: Sequence[Shard], *, mmap: bool = True
    ) -> ShardedInvertedFile:
        """Open the index parts written by :func:`aggregation_stage` into ``out_dir``."""
        root = Path(out_dir)
        parts = tuple(InvertedFile.load(root / s.name / "index", mmap=mmap) for s in shards)
        starts = np.array([int(s.meta["start"]) for s in shards], np.int64)
        names = [n for p in parts for n in p.meta.get("image_names", [])]
        return cls(parts, starts, {"image_names": names})

    def save_header(
        self, folder: str | os.PathLike[str], part_dirs: Sequence[str | os.PathLike[str]]
    ) -> Path:
        """Write ``sharded.json`` describing parts already on disk (paths relative to it)."""
        root = Path(folder)
        if len(part_dirs) != len(self.parts):
            raise ValueError(f"{root}: {len(part_dirs)} part folders for {len(self.parts)} parts")
        return write_json(
            root / HEADER_NAME,
            {
                "format": "gldboxes.sharded_inverted_file",
                "format_version": FORMAT_VERSION,
                "n_images": self.n_images,
                "parts": [
                    {
                        "path": os.path.relpath(Path(d), root),
                        "start": int(s),
                        "n_images": p.n_images,
                    }
                    for d, s, p in zip(part_dirs, self.starts, self.parts, strict=True)
                ],
                "stats": self.stats(),
                "meta": self.meta,
            },
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write every part (``part-00000/`` ...) and ``sharded.json`` into ``folder``."""
        root = Path(folder)
        dirs = [p.save(root / f"part-{i:05d}") for i, p in enumerate(self.parts)]
        self.save_header(root, dirs)
        return root

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = True) -> ShardedInvertedFile:
        """Open a folder with ``sharded.json`` (parts memory-mapped by default).

        Raises:
            FileNotFoundError: no header. ValueError: wrong format/version or parts that do not
                match the header.
        """
        root = Path(folder)
        hpath = root / HEADER_NAME
        if not hpath.exists():
            raise FileNotFoundError(f"sharded index header not found: {hpath}")
        h = read_tagged_json(
            hpath, "gldboxes.sharded_inverted_file", FORMAT_VERSION, "sharded inverted-file header"
        )
        parts = []
        for e in h["parts"]:
            p = InvertedFile.load(root / e["path"], mmap=mmap)
            if p.n_images != int(e["n_images"]):
                raise ValueError(
                    f"{hpath}: part {e['path']} has {p.n_images} images, "
                    f"the header says {e['n_images']}"
                )
            parts.append(p)
        return cls(
            tuple(parts), np.array([e["start"] for e in h["parts"]], np.int64), h.get("meta") or {}
        )

    # ---------------------------------------------------------------- figures
    @property
    def n_images(self) -> int:
        return int(sum(p.n_images for p in self.parts))

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def stats(self) -> dict[str, float]:
        """Images, items (regions for regional search), postings, bytes and bytes per image
        summed over the parts."""
        n = self.n_images
        postings = int(sum(p.image_ids.shape[0] for p in self.parts))
        return {
            "parts": len(self.parts),
            "images": n,
            "items": int(sum(p.n_items for p in self.parts)),
            "postings": postings,
            "bytes": self.nbytes,
            "bytes_per_image": self.nbytes / max(n, 1),
        }

    # ---------------------------------------------------------------- search
    def scores(self, queries: AggregatedBatch) -> np.ndarray:
        """float64 (n_queries, n_images): the parts' score matrices side by side."""
        return np.concatenate([p.scores(queries) for p in self.parts], axis=1)

    def search(
        self, queries: AggregatedBatch, k: int | None = None, *, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` global ids per query: each part's top-k, merged (see :func:`merge_topk`).

        Returns:
            ``(ids, scores)``: int64 and float64 (n_queries, min(k, n_images)).
        """
        ids, scs = [], []
        for p, s in zip(self.parts, self.starts, strict=True):
            i, sc = p.search(queries, k, batch_size=batch_size)
            ids.append(i + s)
            scs.append(sc)
        return merge_topk(ids, scs, None if k is None else min(k, self.n_images))

    def merge(self, *, meta: Mapping[str, Any] | None = None) -> InvertedFile:
        """One :class:`InvertedFile` with every part (global ids), built without re-aggregating.

        The postings of each word are the parts' postings of that word one after the other,
        i.e. in ascending global id, exactly as :meth:`InvertedFile.build` orders them. In a
        regional index postings point to items: they are shifted by the items of the parts
        before, and ``item_image`` by the part's first image.
        """
        k = self.parts[0].codebook_size
        words = np.concatenate(
            [np.repeat(np.arange(k, dtype=np.int64), np.diff(p.offsets)) for p in self.parts]
        )
        item_starts = np.r_[0, np.cumsum([p.n_items for p in self.parts])[:-1]].astype(np.int64)
        gids = np.concatenate(
            [
                np.asarray(p.image_ids, np.int64) + s
                for p, s in zip(self.parts, item_starts, strict=True)
            ]
        )
        data = np.concatenate([np.asarray(p.data) for p in self.parts])
        order = np.argsort(words, kind="stable")
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(np.bincount(words, minlength=k), out=offsets[1:])
        p0 = self.parts[0]
        return InvertedFile(
            offsets=offsets,
            image_ids=gids[order].astype(np.uint32),
            data=np.ascontiguousarray(data[order]),
            words_per_image=np.concatenate([np.asarray(p.words_per_image) for p in self.parts]),
            dim=p0.dim,
            kernel=p0.kernel,
            alpha=p0.alpha,
            tau=p0.tau,
            normalize=p0.normalize,
            meta=dict(meta if meta is not None else self.meta),
            item_image=None
            if p0.item_image is None
            else np.concatenate(
                [
                    np.asarray(p.item_image, np.int64) + s
                    for p, s in zip(self.parts, self.starts, strict=True)
                ]
            ).astype(np.uint32),
            pooling=p0.pooling,
            region_norm_floor=p0.region_norm_floor,
        )


# ======================================================================================= search
def _search_shard(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Score the queries against one part; write its top-k with global ids."""
    part = InvertedFile.load(shard.meta["part"])
    q = _load_batch(Path(conf["queries"]))
    ids, scores = part.search(q, conf["top_k"])
    np.save(out / "ids.npy", ids + int(shard.meta["start"]), allow_pickle=False)
    np.save(out / "scores.npy", scores, allow_pickle=False)
    return {"queries": q.n_images, "images": part.n_images}


def search_stage(
    queries: str | os.PathLike[str],
    part_dirs: Sequence[str | os.PathLike[str]],
    starts: Sequence[int],
    top_k: int | None,
    *,
    resources: Resources | None = None,
) -> tuple[Stage, list[Shard]]:
    """Search one index part per task (``queries``: a folder written by the driver)."""
    qpath = Path(queries).resolve()
    sums = [md5sum(qpath / f"{a}.npy") for a in _BATCH_ARRAYS]
    conf = {"queries": os.fspath(qpath), "queries_md5": sums, "top_k": top_k}
    stage = Stage(
        "search",
        functools.partial(_search_shard, conf=conf),
        conf=conf,
        resources=resources or Resources(num_cpus=0.5),
    )
    shards = []
    for i, (d, s) in enumerate(zip(part_dirs, starts, strict=True)):
        hdr = Path(d) / "header.json"
        meta = {"part": os.fspath(Path(d).resolve()), "start": int(s), "part_md5": md5sum(hdr)}
        shards.append(Shard(i, (i,), f"part-{i:05d}", meta))
    return stage, shards


_BATCH_ARRAYS = ("offsets", "words", "data")


def _save_batch(folder: Path, q: AggregatedBatch) -> Path:
    """Aggregated queries as plain ``.npy`` files (+ ``dim.json``): byte-stable, no zip dates."""
    folder.mkdir(parents=True, exist_ok=True)
    for a in _BATCH_ARRAYS:
        with atomic_path(folder / f"{a}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(getattr(q, a)), allow_pickle=False)
    write_json(folder / "dim.json", {"format_version": FORMAT_VERSION, "dim": int(q.dim)})
    return folder


def _load_batch(folder: Path) -> AggregatedBatch:
    arrays = {a: np.load(folder / f"{a}.npy", allow_pickle=False) for a in _BATCH_ARRAYS}
    return AggregatedBatch(**arrays, dim=int(read_json(folder / "dim.json")["dim"]))


def search_sharded(
    executor: Executor,
    queries: AggregatedBatch,
    part_dirs: Sequence[str | os.PathLike[str]],
    starts: Sequence[int],
    out_dir: str | os.PathLike[str],
    top_k: int | None = None,
    *,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Search every part on the executor, merge the top-k on the driver.

    Returns:
        ``(ids, scores)`` (n_queries, k) with global ids, equal to the single index's search.
    """
    out = Path(out_dir)
    qpath = _save_batch(out / "queries", queries)
    stage, shards = search_stage(qpath, part_dirs, starts, top_k)
    rep = executor.run(stage, shards, out / "parts", overwrite=overwrite)
    ids = [np.load(d / "ids.npy") for d in rep.shard_dirs(shards)]
    scs = [np.load(d / "scores.npy") for d in rep.shard_dirs(shards)]
    n = int(sum(a.shape[1] for a in ids)) if top_k is None else top_k
    return merge_topk(ids, scs, n)


# ================================================================================ verification
def _verification_shard(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Spatially verify a batch of queries (``shard.items`` = query indices)."""
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.verification import VerificationConf, rerank_revisited

    qidx = np.asarray(shard.items, np.int64)
    ds = RevisitedDataset.load(conf["dataset"])
    ranks = np.load(conf["ranks"], mmap_mode="r")[:, qidx]
    gnd = [ds.gnd[int(i)] for i in qidx]
    qf = FeatureShards(
        tuple(Path(p) for p in conf["query_paths"]), tuple(tuple(n) for n in conf["query_names"])
    )
    dbf = FeatureShards(
        tuple(Path(p) for p in conf["db_paths"]), tuple(tuple(n) for n in conf["db_names"])
    )
    qnames = [ds.qimlist[int(i)] for i in qidx]
    vconf = dict(conf["verification"])
    max_side = vconf.pop("max_side", None)
    qfeat = qf.read_local(qnames, max_side=max_side)
    top_n = int(conf["top_n"])
    # Every protocol's head lies within the first top_n + (junk + easy + hard) ranks.
    depth = top_n + max(sum(len(g.get(k, [])) for k in ("junk", "easy", "hard")) for g in gnd)
    heads = np.unique(np.asarray(ranks[:depth]))
    dbfeat_named = dbf.read_local([ds.imlist[int(d)] for d in heads], max_side=max_side)
    dbfeat = {int(d): dbfeat_named[ds.imlist[int(d)]] for d in heads}
    res = rerank_revisited(
        np.asarray(ranks),
        gnd,
        [qfeat[n] for n in qnames],
        dbfeat,
        top_n=top_n,
        protocols=tuple(conf["protocols"]),
        conf=VerificationConf(**vconf),
        num_workers=1,
    )
    for p, r in res.ranks.items():
        np.save(out / f"ranks_{p}.npy", np.ascontiguousarray(r), allow_pickle=False)
    return {"queries": int(qidx.size), "pairs": int(res.pairs)}


def verification_stage(
    dataset_dir: str | os.PathLike[str],
    ranks_path: str | os.PathLike[str],
    query_features: FeatureShards,
    db_features: FeatureShards,
    *,
    queries_per_shard: int = 8,
    top_n: int = 100,
    protocols: Sequence[str] = ("easy", "medium", "hard"),
    verification: Mapping[str, Any] | None = None,
    resources: Resources | None = None,
) -> tuple[Stage, list[Shard]]:
    """Spatial verification of query batches: one task per ``queries_per_shard`` queries.

    Each task reads its queries' columns of ``ranks_path`` (n_db, n_q), their features and the
    features of the database images in their heads, and writes ``ranks_<protocol>.npy``
    (n_db, n_batch) re-ranked by :func:`retrieval.verification.rerank_revisited` (one thread:
    the executor provides the parallelism).
    """
    from retrieval.evaluation.datasets import RevisitedDataset

    ds = RevisitedDataset.load(Path(dataset_dir))
    rp = os.fspath(Path(ranks_path).resolve())
    conf = {
        "dataset": os.fspath(Path(dataset_dir).resolve()),
        "ranks": rp,
        "ranks_md5": md5sum(rp),
        "query_paths": [os.fspath(p) for p in query_features.paths],
        "query_names": [list(n) for n in query_features.names],
        "db_paths": [os.fspath(p) for p in db_features.paths],
        "db_names": [list(n) for n in db_features.names],
        "top_n": int(top_n),
        "protocols": list(protocols),
        "verification": dict(verification or {}),
    }
    stage = Stage(
        "verify",
        functools.partial(_verification_shard, conf=conf),
        conf={k: v for k, v in conf.items() if not k.endswith("_names")},
        resources=resources or Resources(num_cpus=0.5),
    )
    return stage, make_shards(list(range(ds.n_queries)), queries_per_shard, prefix="queries")


def verify_sharded(
    executor: Executor,
    dataset_dir: str | os.PathLike[str],
    ranks_path: str | os.PathLike[str],
    query_features: FeatureShards,
    db_features: FeatureShards,
    out_dir: str | os.PathLike[str],
    *,
    queries_per_shard: int = 8,
    top_n: int = 100,
    protocols: Sequence[str] = ("easy", "medium", "hard"),
    verification: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Verify every query batch on the executor; join the columns into ``ranks_<p>.npy``.

    Returns:
        ``{protocol: path of the re-ranked (n_db, n_q) ranks}``.
    """
    out = Path(out_dir)
    stage, shards = verification_stage(
        dataset_dir,
        ranks_path,
        query_features,
        db_features,
        queries_per_shard=queries_per_shard,
        top_n=top_n,
        protocols=protocols,
        verification=verification,
    )
    rep = executor.run(stage, shards, out / "batches", overwrite=overwrite)
    paths = {}
    for p in protocols:
        cols = [np.load(d / f"ranks_{p}.npy") for d in rep.shard_dirs(shards)]
        paths[p] = out / f"ranks_{p}.npy"
        with atomic_path(paths[p]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(cols, axis=1), allow_pickle=False)
    return paths


# ========================================================================================== run
@dataclass
class ShardedRun:
    """What :func:`run` wrote.

    Attributes:
        db_features, query_features: the feature shards.
        codebook: ``codebook.npy``; index: the sharded index folder (``sharded.json``);
        ranks: ``ranks.npy`` (n_db or top_k, n_q); metrics_path: ``metrics.json``;
        verified: ``{protocol: ranks}`` after spatial verification (when asked);
        reports: the executor's report of every stage; index_stats: size figures;
        regions: the index-side regions CSV (None without regions).
    """

    db_features: FeatureShards
    query_features: FeatureShards
    codebook: Path
    index: Path
    ranks: Path
    metrics_path: Path
    results: dict[str, Any] = field(default_factory=dict)
    verified: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=dict)
    index_stats: dict[str, float] = field(default_factory=dict)
    regions: Path | None = None
    distractors: Path | None = None  # the distractor index searched after the dataset's parts


def _train_codebook(
    rc: Mapping[str, Any], train: FeatureShards, training_set: str, out_dir: Path, fc_name: str
) -> Path:
    """k-means on a seeded sample gathered from the feature shards (driver), engine layout."""
    from retrieval.features.codebook import FORMAT_VERSION as CB_VERSION
    from retrieval.features.codebook import train_codebook

    cb = rc["codebook"]
    folder = out_dir / "codebooks" / f"{fc_name}-k{cb['size']}-s{cb['seed']}-{training_set}"
    npy = folder / "codebook.npy"
    if npy.exists() and (folder / "codebook.json").exists():
        logger.info("codebook exists, skipping: %s", npy)
        return npy
    x, total = train.sample_descriptors(int(cb.get("max_descriptors", 0)), int(cb["seed"]))
    c = train_codebook(
        x,
        int(cb["size"]),
        seed=int(cb["seed"]),
        niter=int(cb.get("niter", 20)),
        max_points_per_centroid=int(cb.get("max_points_per_centroid", 256)),
        nredo=int(cb.get("nredo", 1)),
    )
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, c, allow_pickle=False)
    write_json(
        folder / "codebook.json",
        {
            "format_version": CB_VERSION,
            "size": int(cb["size"]),
            "dim": int(c.shape[1]),
            "seed": int(cb["seed"]),
            "niter": int(cb.get("niter", 20)),
            "training_set": training_set,
            "training_features": [os.fspath(p) for p in train.paths],
            "n_training_descriptors": int(x.shape[0]),
            "n_available_descriptors": total,
            "config_hash": config_hash(dict(cb)),
        },
    )
    write_config(folder, dict(cb))
    return npy


def run(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any] | None = None,
    *,
    executor: Executor,
    shard_size: int = 256,
    codebook_images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    codebook_dataset: str | os.PathLike[str] | None = None,
    codebook_path: str | os.PathLike[str] | None = None,
    verify: bool = False,
    verify_top_n: int = 100,
    queries_per_shard: int = 8,
    overwrite: bool = False,
    distractors: str | os.PathLike[str] | None = None,
) -> ShardedRun:
    """The retrieval pipeline of :func:`retrieval.runner.engine.run`, shard by shard on
    ``executor``.

    Layout under ``out_dir`` (config-named, like the engine's)::

        features/<preset>/<dataset>-db.shards/shard-XXXXX/features.h5 (+ done.json)
        features/<preset>/<dataset>-query.shards/...
        features/<preset>/<dataset>-db-<regions>.shards/...  (region crops, reextract mode)
        codebooks/<preset>-k<K>-s<seed>-<trainset>/codebook.npy
        regions/<dataset>/<regions>.csv, <regions>.parts/part-XXXXX-<md5>.csv  (with regions)
        index/<run name>.parts/part-XXXXX/index/ (+ done.json), sharded.json
        results/<run name>.sharded/ranks.npy, metrics.json, search/, verify/

    Index-side regions (``regions``, ``region_features``, ``regional_search``) work as in the
    engine: the regions CSV is written on the driver by
    :func:`retrieval.runner.engine.build_regions`,
    ``reextract`` crops are extracted shard by shard, and each index part is aggregated by
    :func:`retrieval.runner.engine.aggregate_database` (regional kernels: one entry per image;
    regional search: one item per region, pooled per image inside its part), so the ranks
    equal :func:`retrieval.runner.engine.run`'s.

    Args:
        conf: options of :data:`retrieval.runner.engine.default_conf`.
        executor: :class:`gldboxes.executor.SerialExecutor` or ``RayExecutor``.
        shard_size: images per feature shard and index part.
        codebook_images: train the codebook on this image folder, or on several pooled.
        codebook_dataset: or on the database images of another Revisited folder (the
            protocol's way: Oxford with a Paris codebook).
        codebook_path: or use this ``codebook.npy``. None of them: the database itself
            (warned). A training set is extracted in shards on ``executor``, merged into the
            single file :func:`retrieval.runner.engine.extract_folder` / ``extract`` would write,
            and
            trained by :func:`retrieval.runner.engine.build_codebook`: the engine's codebook, byte
            for byte.
        verify: also spatially verify the top ``verify_top_n`` (batches of queries).
        distractors: a distractor image folder or index
            (:func:`retrieval.evaluation.distractors.distractor_index`, built here on ``executor``
            with
            ``shard_size`` images a part); its parts are searched after the dataset's, under
            ids ``n_db ..``, into ``results/<run name>+<count>-<tag>.sharded/``.
    """
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.index.aggregation import QUERY_KERNEL
    from retrieval.regions import read_regions_csv
    from retrieval.runner.engine import (
        IMAGE_SUFFIXES,
        build_codebook,
        build_regions,
        codebook_tag,
        evaluate,
        feature_conf,
        region_crop_items,
        resolve_conf,
        run_name,
        verification_conf,
    )

    rc = resolve_conf(conf)
    if distractors is not None:
        from retrieval.evaluation.distractors import check_run_conf

        check_run_conf(rc, verify=verify)  # before any work
    fc = feature_conf(rc)
    vconf: dict[str, Any] = {}
    if rc.get("verification") is not None or verify:
        verify = True
        ver = dict(rc.get("verification") or {})
        ver.setdefault("top_n", verify_top_n)
        vc, verify_top_n, _ = verification_conf({**rc, "verification": ver})
        vconf = {**dataclasses.asdict(vc), "max_side": int(fc["preprocessing"]["max_side"])}
    ds = RevisitedDataset.load(Path(dataset_dir))
    out = Path(out_dir)
    fdir = out / "features" / fc["output"]
    reports: dict[str, StageReport] = {}

    def features_of(
        items: Sequence[features_stage.ImageItem],
        folder: Path,
        key: str,
        sizes: Sequence[int] | None = None,
    ) -> FeatureShards:
        stage, shards = feature_stage(fc, items, shard_size=shard_size, shard_sizes=sizes)
        reports[key] = executor.run(stage, shards, folder, overwrite=overwrite)
        return FeatureShards.from_run(reports[key], shards)

    db = features_of(
        [features_stage.ImageItem(n, ds.image_path(n)) for n in ds.imlist],
        fdir / f"{ds.name}-db.shards",
        "features-db",
    )
    qf = features_of(
        [
            features_stage.ImageItem(n, ds.image_path(n), ds.query_bbx(i))
            for i, n in enumerate(ds.qimlist)
        ],
        fdir / f"{ds.name}-query.shards",
        "features-query",
    )
    if codebook_path is not None:
        from retrieval.features.codebook import load_codebook as _load

        cb_path = Path(codebook_path)
        training_set = codebook_tag(cb_path)
        rc["codebook"]["size"] = int(_load(cb_path).shape[0])  # names say the real K
    elif codebook_images is not None or codebook_dataset is not None:
        # Another image set: its shards merged into the engine's file, the engine's k-means.
        sets: list[tuple[str, list[features_stage.ImageItem]]] = []
        if codebook_images is not None:
            folders = (
                [codebook_images]
                if isinstance(codebook_images, str | os.PathLike)
                else list(codebook_images)
            )
            if not folders:
                raise ValueError("codebook_images: no folder given")
            for folder in map(Path, folders):
                if not folder.is_dir():
                    raise FileNotFoundError(f"image folder not found: {folder}")
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
                items = [
                    features_stage.ImageItem(p.relative_to(folder).as_posix().replace("/", "__"), p)
                    for p in files
                ]
                sets.append(
                    (f"{folder.name}-{config_hash({'dir': os.path.abspath(folder)}, 8)}", items)
                )
            training_set = sets[0][0]
            if len(sets) > 1:
                training_set += f"+{len(sets) - 1}-{config_hash({'sets': [n for n, _ in sets]}, 6)}"
        else:
            other = RevisitedDataset.load(Path(str(codebook_dataset)))
            items = [features_stage.ImageItem(n, other.image_path(n)) for n in other.imlist]
            sets.append((f"{other.name}-db", items))
            training_set = other.name
        train_h5 = []
        for k, (stem, items) in enumerate(sets):
            shards = features_of(items, fdir / f"{stem}.shards", f"features-train-{k}")
            h5 = fdir / f"{stem}.h5"
            if overwrite or not h5.exists():
                shards.merge(h5)
            train_h5.append(h5)
        cb_path = build_codebook(rc, train_h5, training_set, out, overwrite=overwrite)
    else:
        logger.warning(
            "no codebook training set given: training on %s's own database (optimistic)",
            ds.name,
        )
        cb_path = _train_codebook(rc, db, f"{ds.name}-self", out, fc["output"])
        training_set = f"{ds.name}-self"
    name = run_name(rc, training_set, ds.name)
    # Index-side regions (D2R): the regions CSV on the driver (the engine's stage, same file),
    # the crops re-extracted shard by shard beside their images' feature shards.
    regions_csv = build_regions(rc, ds, out, overwrite=overwrite)
    crops: FeatureShards | None = None
    if regions_csv is not None and rc["region_features"] == "reextract":
        regions = read_regions_csv(regions_csv)
        groups = [
            region_crop_items(ds, regions, path, names)
            for path, names in zip(db.paths, db.names, strict=True)
        ]
        crops = features_of(
            [it for g in groups for it in g],
            fdir / f"{ds.name}-db-{regions_csv.stem}.shards",
            "features-regions",
            [len(g) for g in groups],
        )
    stage, parts = aggregation_stage(
        rc, db, cb_path, regions_csv=regions_csv, region_features=crops
    )
    idx_dir = out / "index" / f"{name}.parts"
    reports["aggregate"] = executor.run(stage, parts, idx_dir, overwrite=overwrite)
    sivf = ShardedInvertedFile.from_stage(idx_dir, parts)
    part_dirs = [idx_dir / s.name / "index" for s in parts]
    sivf.save_header(idx_dir, part_dirs)

    from retrieval.features.codebook import load_codebook

    res_dir = out / "results" / f"{name}.sharded"
    starts = [int(s.meta["start"]) for s in parts]
    n_dis, dis_index = 0, None
    if distractors is not None:  # appended after the dataset's images
        from retrieval.evaluation.distractors import distractor_index, open_distractors

        dis_index = distractor_index(
            rc,
            distractors,
            cb_path,
            training_set,
            out,
            executor=executor,
            shard_size=shard_size,
            overwrite=overwrite,
        )
        dis = open_distractors(dis_index)
        n_dis = dis.n_images
        part_dirs += list(dis.part_dirs)
        starts += [ds.n_db + s for s in dis.starts]
        res_dir = out / "results" / f"{name}{dis.label}-{dis.tag}.sharded"
    cb = load_codebook(cb_path)
    qnames = list(ds.qimlist)
    q_batch = _aggregate_named(rc, qf, qnames, cb, kernel=QUERY_KERNEL[rc["kernel"]])
    ids, _ = search_sharded(
        executor,
        q_batch,
        part_dirs,
        starts,
        res_dir / "search",
        rc.get("top_k"),
        overwrite=overwrite,
    )
    ranks = res_dir / "ranks.npy"
    with atomic_path(ranks) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(ids.T), allow_pickle=False)
    write_config(res_dir, dict(rc))
    mpath, ev = evaluate(ds, ranks, n_distractors=n_dis)
    verified: dict[str, Path] = {}
    if verify:
        verified = verify_sharded(
            executor,
            ds.root,
            ranks,
            qf,
            db,
            res_dir / "verify",
            queries_per_shard=queries_per_shard,
            top_n=verify_top_n,
            verification=vconf,
            overwrite=overwrite,
        )
    return ShardedRun(
        db_features=db,
        query_features=qf,
        codebook=cb_path,
        index=idx_dir,
        ranks=ranks,
        metrics_path=mpath,
        results=ev["results"],
        verified=verified,
        reports=reports,
        index_stats=sivf.stats(),
        regions=regions_csv,
        distractors=dis_index,
    )


def _aggregate_named(
    rc: Mapping[str, Any],
    shards: FeatureShards,
    names: Sequence[str],
    cb: np.ndarray,
    *,
    kernel: str | None = None,
) -> AggregatedBatch:
    """Aggregate ``names`` of feature shards on the driver, ``batch_images`` at a time.

    ``kernel`` overrides ``rc["kernel"]`` (queries: the single-image kernel, as in
    :func:`retrieval.runner.engine.search`).
    """
    kern = kernel or rc["kernel"]
    step = int(rc.get("batch_images", 512))
    parts = [
        aggregate_many(
            shards.read_descriptors(names[a : a + step]),
            cb,
            kern,
            num_assignments=int(rc["num_assignments"]),
        )
        for a in range(0, len(names), step)
    ]
    return AggregatedBatch.concatenate(parts) if parts else aggregate_many([], cb, kern)
