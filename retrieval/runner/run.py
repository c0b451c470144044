"""The retrieval run, written once: a list of stages from files to files, on any executor.

:data:`STAGES` in order (each skips what is done, so a run resumes after kill -9)::

    features   OUT/features/<features>/<dataset>-db.shards/shard-XXXXX/features.h5 (+ done.json)
               OUT/features/<features>/<dataset>-query.shards/...
    codebook   OUT/codebooks/<features>-k<K>-s<seed>-<training set>/codebook.npy (+ .json)
               (a training set's shards merged into OUT/features/<features>/<set>.h5 first)
    regions    OUT/regions/<dataset>/<regions>.csv (+ <regions>.parts/ per index part);
               reextract: OUT/features/<features>/<dataset>-db-<regions>.shards/...
    index      OUT/index/<run name>/part-XXXXX/index/ (+ done.json), sharded.json
    search     OUT/results/<run name>/ranks.npy   int64 (n_db, n_queries), revisitop layout
                                      scores.npy  float64, first-stage scores; search/ (parts)
    evaluate   OUT/results/<run name>/metrics.json  (Easy / Medium / Hard mAP, mP@k)
    verify     OUT/results/<run name>/gv<top N>-<hash>/ranks_<protocol>.npy, metrics.json

The per-image stages (features, index parts, search of each part, verification of each batch of
queries) run shard by shard on the executor: :class:`gldboxes.executor.SerialExecutor` by
default, ``RayExecutor`` with ``--engine ray``; both write the same files byte for byte
(``done.json`` aside). The run name is :func:`retrieval.runner.conf.run_name`, so two
configurations never overwrite each other.

Codebook convention: train on another dataset's descriptors (``codebook_images``: any image
folders, e.g. the synthetic world's ``train/images``; or ``codebook_dataset``: another Revisited
folder, e.g. rparis6k for roxford5k, the protocol's way). Without either, the benchmark's own
database is used and a warning says the numbers are optimistic.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.executor import Executor, SerialExecutor, StageReport, read_done
from gldboxes.io import config_hash, write_config, write_json
from retrieval import features as features_stage
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.evaluate import Protocol, evaluate_protocols, format_table
from retrieval.features.codebook import load_codebook, word_assignment
from retrieval.index.aggregation import QUERY_KERNEL, AggregatedBatch, aggregate_many
from retrieval.index.assignment import WordIndex
from retrieval.index.sharded import ShardedInvertedFile
from retrieval.runner.conf import (
    codebook_tag,
    feature_conf,
    resolve_conf,
    run_name,
    verification_conf,
)
from retrieval.runner.driver import (
    build_codebook,
    build_regions,
    evaluate,
    folder_items,
    region_crop_items,
)
from retrieval.runner.shards import (
    FeatureShards,
    aggregation_stage,
    feature_stage,
    save_npy,
    search_sharded,
    verify_sharded,
)

__all__ = ["STAGES", "RunResult", "aggregate_named", "run"]

logger = logging.getLogger("retrieval.runner.run")

PROTOCOLS: tuple[Protocol, ...] = ("easy", "medium", "hard")


@dataclass
class RunResult:
    """What :func:`run` wrote, and the metrics.

    Attributes:
        db_features, query_features: the feature shards.
        codebook: ``codebook.npy``. index: the index folder (``sharded.json`` + parts).
        ranks: ``ranks.npy`` (n_db or top_k, n_queries); metrics_path: its ``metrics.json``;
        results: ``{protocol: ProtocolResult}``.
        verification: after spatial verification (when the conf asks for it): ``results``
            per protocol, ``ranks`` (``{protocol: path}``), ``seconds_per_query`` (the
            verification tasks' wall time per query, features reading included), ``pairs``
            and ``metrics_path``.
        reports: the executor's report of every stage run; seconds: per stage, the summed
            time of its shards (also of shards finished by an earlier run).
        index_stats: images, items, postings, bytes and bytes per image of the index.
        regions: the index-side regions CSV (None without regions).
        label: the table's row name (default: the index folder's name).
        distractors: the distractor index searched after the dataset's parts.
    """

    db_features: FeatureShards | None = None
    query_features: FeatureShards | None = None
    codebook: Path | None = None
    index: Path | None = None
    ranks: Path | None = None
    metrics_path: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    index_stats: dict[str, float] = field(default_factory=dict)
    regions: Path | None = None
    label: str | None = None
    distractors: Path | None = None

    def table(self, name: str | None = None) -> str:
        """The metrics as a Markdown table (a ``+SV`` row after verification)."""
        name = name or self.label or (self.index.name if self.index else "run")
        rows = {name: self.results}
        if self.verification:
            rows[f"{name} +SV"] = self.verification["results"]
        return format_table(rows)


@dataclass
class _Run:
    """The state handed from stage to stage (inputs first, then what each stage wrote)."""

    rc: dict[str, Any]
    ds: RevisitedDataset
    out: Path
    executor: Executor
    shard_size: int
    queries_per_shard: int
    overwrite: bool
    codebook_images: Sequence[str | os.PathLike[str]] | None
    codebook_dataset: str | os.PathLike[str] | None
    codebook_path: str | os.PathLike[str] | None
    distractors: str | os.PathLike[str] | None
    res: RunResult = field(default_factory=RunResult)
    training_set: str = ""
    crops: FeatureShards | None = None
    part_dirs: list[Path] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    n_distractors: int = 0

    @property
    def fdir(self) -> Path:
        return self.out / "features" / feature_conf(self.rc)["output"]

    @property
    def name(self) -> str:
        return run_name(self.rc, self.training_set, self.ds.name)

    def features_of(
        self,
        items: Sequence[features_stage.ImageItem],
        folder: Path,
        key: str,
        sizes: Sequence[int] | None = None,
    ) -> FeatureShards:
        """Run the features stage on ``items`` into ``folder`` (report under ``key``)."""
        stage, shards = feature_stage(
            feature_conf(self.rc), items, shard_size=self.shard_size, shard_sizes=sizes
        )
        rep = self.executor.run(stage, shards, folder, overwrite=self.overwrite)
        self.res.reports[key] = rep
        self.res.seconds[key] = _shard_seconds(rep, shards)
        return FeatureShards.from_run(rep, shards)

    def merged(self, shards: FeatureShards, stem: str) -> Path:
        """The shards copied into one features file ``<stem>.h5`` (the codebook's input),
        again when a shard is newer than the file (redone after a kill or a change)."""
        h5 = self.fdir / f"{stem}.h5"
        stale = h5.exists() and any(
            p.stat().st_mtime_ns > h5.stat().st_mtime_ns for p in shards.paths
        )
        if self.overwrite or stale or not h5.exists():
            shards.merge(h5)
        return h5


def _shard_seconds(report: StageReport, shards: Sequence[Any]) -> float:
    """Summed ``seconds`` of the shards' ``done.json`` (finished now or by an earlier run)."""
    total = 0.0
    for d in report.shard_dirs(shards):
        done = read_done(d)
        total += float(done.get("seconds", 0.0)) if done else 0.0
    return total


# ========================================================================== the stages
def _features(r: _Run) -> None:
    """Whole-image features of the database and cropped features of the queries."""
    ds = r.ds
    r.res.db_features = r.features_of(
        [features_stage.ImageItem(n, ds.image_path(n)) for n in ds.imlist],
        r.fdir / f"{ds.name}-db.shards",
        "features-db",
    )
    r.res.query_features = r.features_of(
        [
            features_stage.ImageItem(n, ds.image_path(n), ds.query_bbx(i))
            for i, n in enumerate(ds.qimlist)
        ],
        r.fdir / f"{ds.name}-query.shards",
        "features-query",
    )


def _codebook(r: _Run) -> None:
    """The codebook: given, or k-means on another image set (extracted in shards), or on the
    database itself (warned: optimistic)."""
    rc = r.rc
    if r.codebook_path is not None:
        r.res.codebook = Path(r.codebook_path)
        if r.res.codebook.is_dir():
            r.res.codebook = r.res.codebook / "codebook.npy"
        r.training_set = codebook_tag(r.res.codebook)
        rc["codebook"]["size"] = int(load_codebook(r.res.codebook).shape[0])  # names say real K
        return
    sets: list[tuple[str, list[features_stage.ImageItem]]] = []
    if r.codebook_images is not None:
        if not r.codebook_images:
            raise ValueError("codebook_images: no folder given")
        sets = [folder_items(f) for f in r.codebook_images]
        r.training_set = sets[0][0]
        if len(sets) > 1:
            tag = config_hash({"sets": [n for n, _ in sets]}, 6)
            r.training_set += f"+{len(sets) - 1}-{tag}"
    elif r.codebook_dataset is not None:
        other = RevisitedDataset.load(Path(r.codebook_dataset))
        if other.root.resolve() == r.ds.root.resolve():
            raise ValueError(
                f"{other.root}: the codebook dataset is the benchmark itself; give another "
                "Revisited folder (the protocol: Oxford with a Paris codebook), or none"
            )
        # named after its folder too: two benchmarks may share a name (synthetic worlds)
        tag = config_hash({"dir": os.path.abspath(other.root)}, 8)
        items = [features_stage.ImageItem(n, other.image_path(n)) for n in other.imlist]
        sets = [(f"{other.name}-db-{tag}", items)]
        r.training_set = other.name if other.name != r.ds.name else f"{other.name}-{tag}"
    if sets:
        train = [
            r.merged(r.features_of(items, r.fdir / f"{stem}.shards", f"features-train-{k}"), stem)
            for k, (stem, items) in enumerate(sets)
        ]
    else:
        logger.warning(
            "no codebook training set given: training on %s's own database "
            "(optimistic; the protocol trains on another dataset)",
            r.ds.name,
        )
        assert r.res.db_features is not None
        train = [r.merged(r.res.db_features, f"{r.ds.name}-db")]
        r.training_set = f"{r.ds.name}-self"
    r.res.codebook = build_codebook(rc, train, r.training_set, r.out, overwrite=r.overwrite)


def _regions(r: _Run) -> None:
    """Index-side regions (D2R): the regions CSV on the driver; ``reextract`` crops extracted
    shard by shard, shard ``i`` holding the crops of feature shard ``i``'s images."""
    from retrieval.regions import read_regions_csv

    r.res.regions = build_regions(r.rc, r.ds, r.out, overwrite=r.overwrite)
    if r.res.regions is None or r.rc["region_features"] != "reextract":
        return
    db = r.res.db_features
    assert db is not None
    regions = read_regions_csv(r.res.regions)
    groups = [
        region_crop_items(r.ds, regions, path, names)
        for path, names in zip(db.paths, db.names, strict=True)
    ]
    r.crops = r.features_of(
        [it for g in groups for it in g],
        r.fdir / f"{r.ds.name}-db-{r.res.regions.stem}.shards",
        "features-regions",
        [len(g) for g in groups],
    )


def _index(r: _Run) -> None:
    """Aggregate each feature shard into an index part; ``sharded.json`` over the parts."""
    assert r.res.db_features is not None and r.res.codebook is not None
    stage, parts = aggregation_stage(
        r.rc,
        r.res.db_features,
        r.res.codebook,
        regions_csv=r.res.regions,
        region_features=r.crops,
    )
    idx_dir = r.out / "index" / r.name
    rep = r.executor.run(stage, parts, idx_dir, overwrite=r.overwrite)
    r.res.reports["aggregate"] = rep
    r.res.seconds["aggregate"] = _shard_seconds(rep, parts)
    r.part_dirs = [idx_dir / s.name / "index" for s in parts]
    r.starts = [int(s.meta["start"]) for s in parts]
    sivf = ShardedInvertedFile.from_parts(r.part_dirs)
    sivf.save_header(idx_dir, r.part_dirs)
    write_config(idx_dir, {k: v for k, v in r.rc.items() if k not in ("verification", "top_k")})
    r.res.index, r.res.index_stats = idx_dir, sivf.stats()
    logger.info(
        "index %s: %d images, %d items, %d postings, %.0f bytes/image",
        idx_dir.name,
        r.res.index_stats["images"],
        r.res.index_stats["items"],
        r.res.index_stats["postings"],
        r.res.index_stats["bytes_per_image"],
    )


def aggregate_named(
    rc: Mapping[str, Any],
    shards: FeatureShards,
    names: Sequence[str],
    cb: np.ndarray,
    *,
    kernel: str | None = None,
    assignment: str | WordIndex | None = None,
) -> AggregatedBatch:
    """Aggregate ``names`` of feature shards on the driver, ``batch_images`` at a time.

    ``kernel`` overrides ``rc["kernel"]`` (queries: the single-image kernel
    :data:`retrieval.index.aggregation.QUERY_KERNEL` of the index's kernel); ``assignment``
    overrides ``rc["assignment"]``.
    """
    kern = kernel or rc["kernel"]
    step = int(rc.get("batch_images", 512))
    how = assignment or rc.get("assignment", "exact")
    parts = [
        aggregate_many(
            shards.read_descriptors(names[a : a + step]),
            cb,
            kern,
            num_assignments=int(rc["num_assignments"]),
            assignment=how,
        )
        for a in range(0, len(names), step)
    ]
    return AggregatedBatch.concatenate(parts) if parts else aggregate_many([], cb, kern)


def _search(r: _Run) -> None:
    """Rank the database (and the distractors after it) for every query, part by part."""
    assert r.res.query_features is not None and r.res.codebook is not None
    res_dir = r.out / "results" / r.name
    part_dirs, starts = list(r.part_dirs), list(r.starts)
    if r.distractors is not None:  # appended after the dataset's images, ids n_db ..
        from retrieval.evaluation.distractors import distractor_index, open_distractors

        r.res.distractors = distractor_index(
            r.rc,
            r.distractors,
            r.res.codebook,
            r.training_set,
            r.out,
            executor=r.executor,
            shard_size=r.shard_size,
            overwrite=r.overwrite,
        )
        dis = open_distractors(r.res.distractors)
        r.n_distractors = dis.n_images
        part_dirs += list(dis.part_dirs)
        starts += [r.ds.n_db + s for s in dis.starts]
        res_dir = r.out / "results" / f"{r.name}{dis.label}-{dis.tag}"
        r.res.label = f"{r.name}{dis.label}"
    cb = load_codebook(r.res.codebook)
    q = aggregate_named(
        r.rc,
        r.res.query_features,
        list(r.ds.qimlist),
        cb,
        kernel=QUERY_KERNEL[r.rc["kernel"]],
        assignment=word_assignment(r.res.codebook, r.rc["assignment"]),
    )
    ids, scores = search_sharded(
        r.executor,
        q,
        part_dirs,
        starts,
        res_dir / "search",
        r.rc.get("top_k"),
        overwrite=r.overwrite,
    )
    save_npy(res_dir / "scores.npy", scores.T)
    r.res.ranks = save_npy(res_dir / "ranks.npy", ids.T)
    write_config(res_dir, dict(r.rc))


def _evaluate(r: _Run) -> None:
    """Easy / Medium / Hard mAP and mP@k of the ranking (``metrics.json`` beside it)."""
    assert r.res.ranks is not None
    r.res.metrics_path, ev = evaluate(r.ds, r.res.ranks, n_distractors=r.n_distractors)
    r.res.results = ev["results"]


def _verify(r: _Run) -> None:
    """Spatial verification of every protocol's head, batches of queries on the executor."""
    if r.rc.get("verification") is None:
        return
    assert r.res.ranks is not None and r.res.query_features and r.res.db_features
    vc, top_n, workers = verification_conf(r.rc)
    vconf = {
        **dataclasses.asdict(vc),
        "max_side": int(feature_conf(r.rc)["preprocessing"]["max_side"]),
    }
    folder = r.res.ranks.parent / f"gv{top_n}-{config_hash(vconf, 6)}"
    paths, rep, shards = verify_sharded(
        r.executor,
        r.ds.root,
        r.res.ranks,
        r.res.query_features,
        r.res.db_features,
        folder,
        queries_per_shard=r.queries_per_shard,
        top_n=top_n,
        protocols=PROTOCOLS,
        verification=vconf,
        overwrite=r.overwrite,
        # in this process: the tasks' threads give the parallelism (on Ray: the tasks)
        num_workers=workers if isinstance(r.executor, SerialExecutor) else 1,
    )
    r.res.reports["verify"] = rep
    seconds = r.res.seconds["verify"] = _shard_seconds(rep, shards)
    results, metrics = {}, {}
    for p in PROTOCOLS:
        ranks = np.load(paths[p], allow_pickle=False)
        results[p] = evaluate_protocols(ranks, r.ds.gnd, n_db=r.ds.n_db, protocols=[p])[p]
        metrics[p] = results[p].as_dict()
    pairs = sum(
        int((read_done(d) or {}).get("counts", {}).get("pairs", 0)) for d in rep.shard_dirs(shards)
    )
    spq = seconds / max(r.ds.n_queries, 1)
    mpath = write_json(
        folder / "metrics.json",
        {
            "format_version": 1,
            "dataset": r.ds.name,
            "metrics": metrics,
            "pairs": pairs,
            "top_n": top_n,
        },
    )
    # times apart, so the results are the same bytes on any engine
    write_json(folder / "timing.json", {"format_version": 1, "seconds_per_query": spq})
    write_config(folder, {**r.rc, "verification_resolved": {**vconf, "top_n": top_n}})
    r.res.verification = {
        "results": results,
        "ranks": paths,
        "seconds_per_query": spq,
        "pairs": pairs,
        "metrics_path": mpath,
    }


#: The run, stage by stage: ``(name, function)`` in order; ``run(..., until=name)`` stops
#: after that stage.
STAGES: tuple[tuple[str, Callable[[_Run], None]], ...] = (
    ("features", _features),
    ("codebook", _codebook),
    ("regions", _regions),
    ("index", _index),
    ("search", _search),
    ("evaluate", _evaluate),
    ("verify", _verify),
)


def run(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any] | None = None,
    *,
    executor: Executor | None = None,
    shard_size: int = 256,
    codebook_images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    codebook_dataset: str | os.PathLike[str] | None = None,
    codebook_path: str | os.PathLike[str] | None = None,
    queries_per_shard: int = 8,
    overwrite: bool = False,
    distractors: str | os.PathLike[str] | None = None,
    until: str | None = None,
) -> RunResult:
    """Features, codebook, regions, index, ranks, metrics and verification of a Revisited folder.

    Args:
        dataset_dir: a folder with ``gnd_<name>.pkl`` and ``jpg/`` (roxford5k, rparis6k, the
            synthetic world's ``retrieval/``).
        out_dir: where the config-named folders go (see the module docstring).
        conf: options (:data:`retrieval.runner.conf.default_conf`).
        executor: where the per-image stages run (default: this process,
            :class:`gldboxes.executor.SerialExecutor`); the files are the same on any.
        shard_size: images per feature shard and index part.
        codebook_images: train the codebook on this image folder, or on several pooled.
        codebook_dataset: or on the database images of another Revisited folder (the
            protocol's way: Oxford with a Paris codebook).
        codebook_path: or use this ``codebook.npy``. None of them: the database itself (warned).
        queries_per_shard: queries per spatial-verification task.
        overwrite: redo every stage.
        distractors: a distractor image folder or index
            (:func:`retrieval.evaluation.distractors.distractor_index`, built on ``executor``
            with ``shard_size`` images a part); its parts are searched after the dataset's,
            under ids ``n_db ..``, into ``results/<run name>+<count>-<tag>/``.
        until: stop after this stage of :data:`STAGES` (``features``, ``codebook``,
            ``regions``, ``index``, ``search``, ``evaluate``; default: all).

    Returns:
        the :class:`RunResult` (fields of the stages not run stay None / empty).
    """
    names = [n for n, _ in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"until: unknown stage {until!r}; expected one of {names}")
    if sum(x is not None for x in (codebook_images, codebook_dataset, codebook_path)) > 1:
        raise ValueError("give one of codebook_images, codebook_dataset and codebook_path")
    rc = resolve_conf(conf)
    if distractors is not None:
        from retrieval.evaluation.distractors import check_run_conf

        check_run_conf(rc)  # before any work
    if shard_size < 1 or queries_per_shard < 1:
        raise ValueError("shard_size and queries_per_shard must be >= 1")
    ds = RevisitedDataset.load(Path(dataset_dir))
    missing = ds.missing_images()
    if missing:
        logger.warning(
            "%s: %d images missing (first: %s); they will be recorded as errors",
            ds.root,
            len(missing),
            missing[:3],
        )
    images = (
        [codebook_images] if isinstance(codebook_images, str | os.PathLike) else codebook_images
    )
    r = _Run(
        rc=rc,
        ds=ds,
        out=Path(out_dir),
        executor=executor or SerialExecutor(),
        shard_size=int(shard_size),
        queries_per_shard=int(queries_per_shard),
        overwrite=overwrite,
        codebook_images=None if images is None else list(images),
        codebook_dataset=codebook_dataset,
        codebook_path=codebook_path,
        distractors=distractors,
    )
    for name, stage in STAGES:
        stage(r)
        if name == until:
            break
    return r.res
