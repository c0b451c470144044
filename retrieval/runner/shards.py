"""The retrieval run's per-image stages on the executor (serial or Ray), shard by shard.

Each is a :class:`gldboxes.executor.Stage`; shard ``i`` of a database always covers the same
range of image ids, and a shard's files appear, renamed from a temporary folder, with its
``done.json``:

* **features** (:func:`feature_stage`): RootSIFT, DELF or KAZE (:mod:`retrieval.features`) of a
  shard of images into ``<shard>/features.h5`` (the features file layout); the extractor (a DELF
  SavedModel) is loaded once per worker process. :class:`FeatureShards` reads the shards as
  one dataset.
* **aggregation** (:func:`aggregation_stage`): ASMK/ASMK*/VLAD (:mod:`retrieval.index.aggregation`)
  of a features shard into an index part ``<shard>/index/`` (an
  :class:`retrieval.index.inverted_file.InvertedFile` over the shard's images, local ids
  ``0..n_part-1`` = global ids ``start..stop-1``); the codebook is loaded once per worker.
  With index-side regions (Detect-to-Retrieve) a part holds R-ASMK*-style regional entries or,
  for regional search, one item per region with a part-local ``item_image``.
* **search** (:func:`search_stage`): score the queries against one index part, keep its top-k
  (global ids) in ``<shard>/ids.npy`` and ``scores.npy``; merged on the driver by
  :func:`retrieval.index.sharded.merge_topk`.
* **spatial verification** (:func:`verification_stage`): re-rank a batch of queries
  (:func:`retrieval.verification.rerank_revisited`) into ``<shard>/ranks_<protocol>.npy``.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gldboxes.executor import Executor, Resources, Shard, Stage, StageReport, make_shards
from gldboxes.http import md5sum
from gldboxes.io import atomic_path, atomic_write, config_hash, read_json, write_json
from retrieval import features as features_stage
from retrieval.index.aggregation import KERNELS, AggregatedBatch
from retrieval.index.inverted_file import InvertedFile
from retrieval.index.sharded import merge_topk

__all__ = [
    "FORMAT_VERSION",
    "FeatureShards",
    "aggregation_stage",
    "feature_stage",
    "search_sharded",
    "search_stage",
    "verification_stage",
    "verify_sharded",
]

logger = logging.getLogger("retrieval.runner.shards")

FORMAT_VERSION = 1  # of the aggregated-queries folder (dim.json)


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
def _load_codebook(path: str, assignment: str = "exact") -> tuple[np.ndarray, Any]:
    """The codebook and its word assignment (``hnsw``: the cached graph), once per worker."""
    from retrieval.features.codebook import load_codebook, word_assignment

    return load_codebook(path), word_assignment(path, assignment)


def _aggregation_shard(
    shard: Shard, out: Path, model: tuple[np.ndarray, Any], *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Aggregate the images of one features shard into the index part ``out/index``.

    With regions (``shard.meta["regions"]``: the part's rows of the regions CSV) the part is
    built by :func:`retrieval.runner.driver.index_part` exactly as the single index is: one
    entry per image (regional kernel) or one item per region with a part-local ``item_image``
    (regional search; the part's images are ``0 .. n_part - 1``, ``start`` maps them back).
    """
    from retrieval.regions import read_regions_csv
    from retrieval.runner.driver import index_part

    codebook, how = model
    names = [str(n) for n in shard.items]
    regions = None
    if shard.meta.get("regions"):
        regions = read_regions_csv(Path(shard.meta["regions"]))
    ivf = index_part(
        conf,
        names,
        shard.meta["features"],
        codebook,
        regions=regions,
        regions_features=shard.meta.get("regions_features"),
        assignment=how,
        meta={
            "start": int(shard.meta["start"]),
            "stop": int(shard.meta["stop"]),
            "image_names": names,
            "config_hash": conf["config_hash"],
            "regions": conf.get("regions"),
            "region_features": conf.get("region_features") if regions is not None else None,
        },
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
            :data:`retrieval.runner.conf.default_conf` keys).
        features: the database's feature shards.
        codebook_path: ``codebook.npy`` (its md5 enters the config hash).
        regions_csv: index-side regions (:func:`retrieval.runner.driver.build_regions`); each part
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
    assignment = str(conf.get("assignment") or "exact")
    if assignment != "exact":  # (exact: the config hash of before, finished parts stay valid)
        sconf["assignment"] = assignment
    sconf["codebook"] = cb
    sconf["codebook_md5"] = md5sum(cb)
    if regions_csv is not None:
        sconf["regions"] = Path(regions_csv).stem
        sconf["region_features"] = mode
        sconf["regional_search"] = pooling
        if pooling:
            from retrieval.runner.conf import region_norm_floor

            sconf["region_norm_floor"] = region_norm_floor(conf)
    sconf["config_hash"] = config_hash(sconf)
    stage = Stage(
        f"aggregate-{conf['kernel']}",
        functools.partial(
            _aggregation_shard,
            conf={**sconf, "batch_images": int(conf.get("batch_images") or 512)},
        ),
        conf=sconf,
        load_model=functools.partial(_load_codebook, cb, assignment),
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
def save_npy(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` atomically unless the file already holds exactly it (a rerun keeps the
    file and its time stamp)."""
    array = np.ascontiguousarray(array)
    if path.exists():
        old = np.load(path, allow_pickle=False)
        if old.dtype == array.dtype and np.array_equal(old, array):
            return path
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return path


def _verification_shard(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Spatially verify a batch of queries (``shard.items`` = query indices)."""
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.verification import VerificationConf, rerank_revisited

    qidx = np.asarray(shard.items, np.int64)
    ds = RevisitedDataset.load(conf["dataset"])
    ranks = np.load(conf["ranks"], mmap_mode="r")[:, qidx]
    # first-stage scores break ties among equally verified images, as in rerank_revisited
    scores = np.load(conf["scores"], mmap_mode="r")[:, qidx] if conf.get("scores") else None
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
        scores=None if scores is None else np.asarray(scores),
        top_n=top_n,
        protocols=tuple(conf["protocols"]),
        conf=VerificationConf(**vconf),
        num_workers=conf.get("num_workers", 1),
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
    num_workers: int | None = 1,
) -> tuple[Stage, list[Shard]]:
    """Spatial verification of query batches: one task per ``queries_per_shard`` queries.

    ``num_workers``: threads of a task (1: the executor provides the parallelism, as on Ray;
    None: every CPU, for the serial executor). The results do not depend on it.

    Each task reads its queries' columns of ``ranks_path`` (n_db, n_q), their features and the
    features of the database images in their heads, and writes ``ranks_<protocol>.npy``
    (n_db, n_batch) re-ranked by :func:`retrieval.verification.rerank_revisited` (one thread:
    the executor provides the parallelism).
    """
    from retrieval.evaluation.datasets import RevisitedDataset

    ds = RevisitedDataset.load(Path(dataset_dir))
    rp = os.fspath(Path(ranks_path).resolve())
    sp = Path(rp).with_name("scores.npy")
    has_scores = (
        sp.exists() and np.load(sp, mmap_mode="r").shape == np.load(rp, mmap_mode="r").shape
    )
    conf = {
        "dataset": os.fspath(Path(dataset_dir).resolve()),
        "ranks": rp,
        "ranks_md5": md5sum(rp),
        "scores": os.fspath(sp) if has_scores else None,
        "scores_md5": md5sum(sp) if has_scores else None,
        "query_paths": [os.fspath(p) for p in query_features.paths],
        "query_names": [list(n) for n in query_features.names],
        "db_paths": [os.fspath(p) for p in db_features.paths],
        "db_names": [list(n) for n in db_features.names],
        "top_n": int(top_n),
        "protocols": list(protocols),
        "verification": dict(verification or {}),
        "num_workers": num_workers,
    }
    stage = Stage(
        "verify",
        functools.partial(_verification_shard, conf=conf),
        conf={k: v for k, v in conf.items() if not k.endswith("_names") and k != "num_workers"},
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
    num_workers: int | None = 1,
) -> tuple[dict[str, Path], StageReport, list[Shard]]:
    """Verify every query batch on the executor; join the columns into ``ranks_<p>.npy``.

    Returns:
        ``({protocol: path of the re-ranked (n_db, n_q) ranks}, report, shards)``.
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
        num_workers=num_workers,
    )
    rep = executor.run(stage, shards, out / "batches", overwrite=overwrite)
    paths = {}
    for p in protocols:
        cols = [np.load(d / f"ranks_{p}.npy") for d in rep.shard_dirs(shards)]
        paths[p] = save_npy(out / f"ranks_{p}.npy", np.concatenate(cols, axis=1))
    return paths, rep, shards
