"""The R-MAC run: presets, feature files, and ``run_rmac`` from images to a ranking.

Part of :mod:`retrieval.rmac`; see its docstring for the method. :func:`run_rmac` is written as
the retrieval runner is (:mod:`retrieval.runner.run`): :data:`STAGES`, a tuple of ``(name,
function)`` over a small state object, each stage reading the files the stages before it wrote
and skipping what is done (all under ``OUT/rmac/``)::

    features   features/<tag>/<dataset>-db.h5, <dataset>-query.h5   MAC + regional vectors
               (+ 8-bit activation maps of the database for AML)
    whitening  whitening/<tag>-<training set>/whitening.npz  (its images' features beside the
               others: features/<tag>/<training set>.h5)
    describe   descriptors/<mac|rmac|learned-rmac>-<tag>-<training set>-<dataset>/db.npy,
               query.npy  (n, D) global vectors, descriptors.json (learned R-MAC: described
               shard by shard on the executor in db.shards/, query.shards/ there, removed
               once merged)
    search     results/<name>/ranks.npy  int64 (n_db, n_queries), revisitop layout
               (AML methods: results/<name>/search/ranks.npy, re-ranked next)
    aml        results/<name>/ranks.npy  the top N re-ranked by AML (+QE)
    evaluate   results/<name>/metrics.json (Easy / Medium / Hard, timings), config.yaml
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.executor import Executor, SerialExecutor
from gldboxes.http import md5sum
from gldboxes.io import config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.features.images import ImageItem
from retrieval.rmac.activations import extract, read_features, read_maps
from retrieval.rmac.aml import aml_rerank, query_expansion, search
from retrieval.rmac.backbone import BACKBONES
from retrieval.rmac.whitening import FORMAT_VERSION, Whitening, aggregate_rmac, learn_whitening

__all__ = [
    "METHODS",
    "STAGES",
    "RmacResult",
    "confs",
    "extract",
    "read_features",
    "resolve_conf",
    "run_rmac",
]

logger = logging.getLogger("retrieval.rmac.stage")


METHODS = ("mac", "rmac", "rmac+aml", "rmac+aml+qe", "learned-rmac")


def _conf(backbone: str, weights: str | None, max_side: int) -> dict[str, Any]:
    return {
        "method": "rmac",  # mac | rmac | rmac+aml | rmac+aml+qe | learned-rmac
        "backbone": backbone,  # resnet50 | resnet101 | vgg16 | tiny (a small CNN for CPU tests)
        "weights": weights,  # "imagenet" (Keras download), None (random, seeded) or a file path
        "seed": 0,  # seeds the random initialisation when weights is None
        "max_side": max_side,  # images are downscaled so that their long side is at most this
        "levels": 3,  # R-MAC levels L (Tolias: 3)
        "overlap": 0.4,  # desired overlap of neighbouring R-MAC regions (Tolias: 0.4)
        "whitening_dim": None,  # PCA-whitening output dimension (None: all non-null components)
        "whitening_eps": 1e-6,  # eigenvalue floor, relative to the largest eigenvalue
        "aml": {
            "alpha": 10.0,  # generalised-mean exponent of the approximate max (paper: 10)
            "step": 3,  # window grid step t in map cells (paper: 3)
            "ratio": 1.1,  # aspect-ratio tolerance s: |log(r_window / r_query)| <= log(s)
            "refine_step": 3,  # coordinate-descent refinement steps 3, 2, 1
            "refine_iter": 5,  # at most this many rounds per refinement step
            "rerank": 1000,  # re-rank the top N images (paper: 1000)
            "chunk_mb": 256,  # memory budget of one batch of integral images
        },
        "qe": 5,  # query expansion: the query plus its top-k re-ranked windows (paper: 5)
        "model": None,  # learned-rmac: the folder written by retrieval.rmac.learned.main
        "maps_memory_mb": 2048,  # keep database activations in memory when they fit
    }


#: Named presets; ``weights="imagenet"`` needs Keras' download (or pass a weights file).
confs: dict[str, dict[str, Any]] = {
    "resnet101-rmac": _conf("resnet101", "imagenet", 1024),
    "resnet50-rmac": _conf("resnet50", "imagenet", 1024),
    "vgg16-rmac": _conf("vgg16", "imagenet", 1024),
    # CPU tests and the synthetic world: a small random CNN (stride 8, 64 channels).
    "tiny-rmac": _conf("tiny", None, 320),
}


def resolve_conf(
    preset: str | Mapping[str, Any] = "resnet101-rmac", **overrides: Any
) -> dict[str, Any]:
    """A preset (name or dict) with overrides applied; ``aml`` overrides merge key by key."""
    if isinstance(preset, str):
        if preset not in confs:
            raise ValueError(f"unknown R-MAC preset {preset!r}; expected one of {sorted(confs)}")
        conf = copy.deepcopy(confs[preset])
    else:
        conf = copy.deepcopy(dict(preset))
    for key, value in overrides.items():
        if key == "aml" and isinstance(value, Mapping):
            conf["aml"] = {**conf.get("aml", {}), **value}
        else:
            conf[key] = value
    if conf.get("method") not in METHODS:
        raise ValueError(f"R-MAC conf: unknown method {conf.get('method')!r}; expected {METHODS}")
    if conf.get("backbone") not in BACKBONES:
        raise ValueError(
            f"R-MAC conf: unknown backbone {conf.get('backbone')!r}; expected {BACKBONES}"
        )
    if int(conf["levels"]) < 1:
        raise ValueError(f"R-MAC conf: levels must be >= 1, got {conf['levels']}")
    return conf


# =========================================================================== output names
def _feature_tag(conf: Mapping[str, Any]) -> str:
    w = conf.get("weights")
    wtag = (
        "random"
        if w is None
        else (
            "imagenet" if w == "imagenet" else f"w{config_hash({'w': os.path.abspath(str(w))}, 8)}"
        )
    )
    seed = f"-seed{conf.get('seed', 0)}" if w is None else ""
    return f"{conf['backbone']}-{wtag}{seed}-s{conf['max_side']}-L{conf['levels']}"


# =========================================================================== the run
@dataclass
class RmacResult:
    """What :func:`run_rmac` wrote and measured (fields of stages not run stay None / empty).

    Attributes:
        method: the conf's method. ranks: ``ranks.npy`` (n_db, n_queries) of the last ranking
            stage run. metrics_path: ``metrics.json``. results: ``{protocol: ProtocolResult}``.
        timings: seconds per query of the search (and of AML re-ranking and QE).
        folder: the results folder ``OUT/rmac/results/<name>/``.
        features: ``{"db": h5, "query": h5}`` (R-MAC methods). whitening: ``whitening.npz``.
        descriptors: the folder of the global descriptors (``db.npy``, ``query.npy``).
    """

    method: str
    ranks: Path | None = None
    metrics_path: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    features: dict[str, Path] = field(default_factory=dict)
    whitening: Path | None = None
    descriptors: Path | None = None

    def table(self) -> str:
        from retrieval.evaluation.evaluate import format_table

        return format_table({self.method: self.results})


@dataclass
class _Rmac:
    """The state handed from stage to stage (inputs first, then what each stage wrote)."""

    conf: dict[str, Any]
    ds: RevisitedDataset
    dataset_dir: Path
    out: Path  # OUT/rmac
    whitening_images: str | os.PathLike[str] | None
    whitening_dataset: str | os.PathLike[str] | None
    overwrite: bool
    tag: str  # features (backbone, weights, size, levels) or the learned model
    trainset: str  # what the whitening was learned on ("none", "learned", "<dataset>-self" ...)
    key: str  # config hash of the results (``metrics.json``)
    done: bool  # the results exist with this key: search, aml and evaluate only read them
    res: RmacResult
    executor: Executor  # where the per-image extraction runs
    shard_size: int

    @property
    def method(self) -> str:
        return str(self.conf["method"])

    @property
    def use_aml(self) -> bool:
        return "aml" in self.method

    @property
    def folder(self) -> Path:
        extra = f"-n{self.conf['aml']['rerank']}" if self.use_aml else ""
        return (
            self.out / "results" / f"{self.method}-{self.tag}-{self.trainset}-{self.ds.name}{extra}"
        )

    def db_items(self) -> list[ImageItem]:
        return [ImageItem(n, self.ds.image_path(n)) for n in self.ds.imlist]

    def query_items(self) -> list[ImageItem]:
        ds = self.ds
        return [ImageItem(n, ds.image_path(n), ds.query_bbx(i)) for i, n in enumerate(ds.qimlist)]


# ========================================================================== the stages
def _features(r: _Rmac) -> None:
    """MAC and regional vectors of the database (+ quantised maps for AML) and of the cropped
    queries: ``features/<tag>/<dataset>-db.h5``, ``-query.h5`` (learned R-MAC: none, its model
    describes the images itself)."""
    if r.method == "learned-rmac":
        return
    fdir = r.out / "features" / r.tag
    r.res.features["db"] = extract(
        r.conf,
        r.db_items(),
        fdir / f"{r.ds.name}-db.h5",
        keep_maps=r.use_aml,
        overwrite=r.overwrite,
        executor=r.executor,
        shard_size=r.shard_size,
    )
    r.res.features["query"] = extract(
        r.conf,
        r.query_items(),
        fdir / f"{r.ds.name}-query.h5",
        overwrite=r.overwrite,
        executor=r.executor,
        shard_size=r.shard_size,
    )


def _whitening(r: _Rmac) -> None:
    """The PCA-whitening of regional vectors (R-MAC methods): learned on ``whitening_images``,
    ``whitening_dataset``'s database or (warned) the benchmark's own database, into
    ``whitening/<tag>-<training set>/whitening.npz``."""
    if r.method in ("mac", "learned-rmac"):
        return
    folder = r.out / "whitening" / f"{r.tag}-{r.trainset}"
    path = folder / "whitening.npz"
    r.res.whitening = path
    if path.exists() and not r.overwrite:
        return
    if r.whitening_images is not None:
        from retrieval.runner.driver import folder_items

        items = folder_items(r.whitening_images)[1]
    elif r.whitening_dataset is not None:
        other = RevisitedDataset.load(Path(r.whitening_dataset))
        items = [ImageItem(n, other.image_path(n)) for n in other.imlist]
    else:
        logger.warning(
            "no whitening training set given: learning it on %s's own database (optimistic; "
            "Tolias et al. use another dataset)",
            r.ds.name,
        )
        items = r.db_items()
    h5 = extract(
        r.conf,
        items,
        r.out / "features" / r.tag / f"{r.trainset}.h5",
        overwrite=r.overwrite,
        executor=r.executor,
        shard_size=r.shard_size,
    )
    _, reg, _ = read_features(h5, [it.name for it in items])
    wh = learn_whitening(
        reg,
        dim=r.conf.get("whitening_dim"),
        eps=float(r.conf["whitening_eps"]),
        meta={"training_set": r.trainset, "features": r.tag},
    )
    wh.save(path)
    write_config(folder, {**r.conf, "training_set": r.trainset})


def _describe(r: _Rmac) -> None:
    """One global vector per image: MAC, whitened R-MAC or the learned model's, into
    ``descriptors/<family>-<tag>-<training set>-<dataset>/db.npy`` (n_db, D) and ``query.npy``
    (n_queries, D), ``descriptors.json`` last (skipped when its inputs hash is the same).

    Learned R-MAC describes the images on ``r.executor``, ``r.shard_size`` a shard
    (:func:`retrieval.rmac.learned.describe_stage`), into ``db.shards/`` and ``query.shards/``
    beside the descriptors (a killed run redoes only unfinished shards); they are concatenated
    in order and removed once ``descriptors.json`` is written."""
    family = {"mac": "mac", "learned-rmac": "learned-rmac"}.get(r.method, "rmac")
    folder = r.out / "descriptors" / f"{family}-{r.tag}-{r.trainset}-{r.ds.name}"
    r.res.descriptors = folder
    shard_dirs: list[Path] = []
    if family == "learned-rmac":
        shard_dirs = [folder / "db.shards", folder / "query.shards"]
        items = r.db_items(), r.query_items()
        inputs: dict[str, Any] = {
            "model": r.tag,
            "items": [[[it.name, str(it.path), it.bbx] for it in its] for its in items],
        }
    else:
        inputs = {k: _h5_hash(p) for k, p in r.res.features.items()}
        inputs["whitening"] = md5sum(r.res.whitening) if r.res.whitening else None
    key = config_hash(inputs)
    meta = folder / "descriptors.json"
    if meta.exists() and not r.overwrite and read_json(meta).get("inputs") == key:
        for d in shard_dirs:  # left by a run killed between its last two steps
            shutil.rmtree(d, ignore_errors=True)
        return
    from retrieval.runner.shards import save_npy

    if family == "learned-rmac":
        db = _learned_descriptors(r, items[0], shard_dirs[0])
        qv = _learned_descriptors(r, items[1], shard_dirs[1])
    else:
        db_mac, db_reg, db_cnt = read_features(r.res.features["db"], r.ds.imlist)
        q_mac, q_reg, q_cnt = read_features(r.res.features["query"], r.ds.qimlist)
        if r.res.whitening is None:
            db, qv = db_mac, q_mac
        else:
            wh = Whitening.load(r.res.whitening)
            db, qv = aggregate_rmac(db_reg, db_cnt, wh), aggregate_rmac(q_reg, q_cnt, wh)
    save_npy(folder / "db.npy", db)
    save_npy(folder / "query.npy", qv)
    write_json(
        meta,
        {"format_version": FORMAT_VERSION, "inputs": key, "dim": int(db.shape[1])},
    )
    for d in shard_dirs:  # merged into db.npy / query.npy
        shutil.rmtree(d, ignore_errors=True)


def _learned_descriptors(r: _Rmac, items: list[ImageItem], shard_dir: Path) -> np.ndarray:
    """Learned R-MAC descriptors (n, D) float32 of ``items``, in order, described shard by shard
    on ``r.executor`` into ``shard_dir`` (finished shards of an earlier run are kept)."""
    from retrieval.rmac.learned import DESCRIPTORS_NAME, describe_stage

    stage, shards = describe_stage(r.conf["model"], items, shard_size=r.shard_size)
    rep = r.executor.run(stage, shards, shard_dir, overwrite=r.overwrite)
    parts = [np.load(d / DESCRIPTORS_NAME, allow_pickle=False) for d in rep.shard_dirs(shards)]
    if not parts:
        with np.load(Path(r.conf["model"]) / "head.npz", allow_pickle=False) as z:
            return np.zeros((0, int(z["fc"].shape[1])), np.float32)
    return np.concatenate(parts)


def _h5_hash(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs["config_hash"])


def _search(r: _Rmac) -> None:
    """Cosine similarity ranking of the database for every query: ``results/<name>/ranks.npy``
    int64 (n_db, n_queries) (``search/ranks.npy`` there for the AML methods, re-ranked next)."""
    from retrieval.runner.shards import save_npy

    folder = r.folder
    if r.done:
        r.res.ranks = folder / "ranks.npy"
        return
    assert r.res.descriptors is not None
    db = np.load(r.res.descriptors / "db.npy", allow_pickle=False)
    qv = np.load(r.res.descriptors / "query.npy", allow_pickle=False)
    t0 = time.perf_counter()
    ranks, _ = search(qv, db)
    r.res.timings["search_s_per_query"] = (time.perf_counter() - t0) / max(r.ds.n_queries, 1)
    path = folder / "search" / "ranks.npy" if r.use_aml else folder / "ranks.npy"
    r.res.ranks = save_npy(path, ranks.astype(np.int64))


def _aml(r: _Rmac) -> None:
    """AML re-ranking (+QE) of every query's top N into ``results/<name>/ranks.npy``."""
    if not r.use_aml or r.done:
        return
    from retrieval.runner.shards import save_npy

    assert r.res.ranks is not None and r.res.descriptors is not None
    ranks = np.load(r.res.ranks, allow_pickle=False)
    qv = np.load(r.res.descriptors / "query.npy", allow_pickle=False)
    q_mac = read_features(r.res.features["query"], r.ds.qimlist)[0]
    wh = Whitening.load(r.res.whitening) if r.res.whitening else None
    ranks = _aml_all(
        r.conf,
        r.ds,
        r.res.features["db"],
        r.res.features["query"],
        ranks,
        qv,
        q_mac,
        wh,
        r.res.timings,
    )
    r.res.ranks = save_npy(r.folder / "ranks.npy", ranks.astype(np.int64))


def _evaluate(r: _Rmac) -> None:
    """Easy / Medium / Hard mAP and mP@k: ``metrics.json`` (with the conf's hash and the
    timings) and ``config.yaml`` beside the ranking."""
    from retrieval.evaluation.evaluate import evaluate_protocols
    from retrieval.runner.driver import evaluate

    assert r.res.ranks is not None
    folder = r.folder
    r.res.metrics_path = folder / "metrics.json"
    if r.done:
        meta = read_json(r.res.metrics_path)
        ranks = np.load(r.res.ranks, allow_pickle=False)
        r.res.results = evaluate_protocols(ranks, r.ds.gnd, n_db=r.ds.n_db)
        r.res.timings = meta.get("timings", {})
        return
    _, ev = evaluate(
        r.ds,
        r.res.ranks,
        extra={"method": r.method, "config_hash": r.key, "timings": r.res.timings},
    )
    write_config(
        folder,
        {
            **r.conf,
            "whitening_images": r.whitening_images,
            "whitening_dataset": r.whitening_dataset,
            "dataset": str(r.dataset_dir),
        },
    )
    r.res.results = ev["results"]
    logger.info(
        "%s on %s: medium mAP %.2f, hard mAP %.2f",
        r.method,
        r.ds.name,
        100 * r.res.results["medium"].map,
        100 * r.res.results["hard"].map,
    )


#: The run, stage by stage: ``(name, function)`` in order; ``run_rmac(..., until=name)`` stops
#: after that stage.
STAGES: tuple[tuple[str, Callable[[_Rmac], None]], ...] = (
    ("features", _features),
    ("whitening", _whitening),
    ("describe", _describe),
    ("search", _search),
    ("aml", _aml),
    ("evaluate", _evaluate),
)


def run_rmac(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any],
    *,
    whitening_images: str | os.PathLike[str] | None = None,
    whitening_dataset: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    until: str | None = None,
    executor: Executor | None = None,
    shard_size: int = 256,
) -> RmacResult:
    """Rank a Revisited-style dataset with MAC / R-MAC (+AML re-ranking, +QE) or learned R-MAC.

    Runs :data:`STAGES` in order; each reads the files the stages before it wrote and skips
    what is done (the results with the same configuration: search, AML and evaluation only
    read them back).

    Args:
        dataset_dir: ``gnd_<name>.pkl`` + ``jpg/`` (roxford5k, rparis6k, the world's
            ``retrieval/``).
        out_dir: output root; everything goes under ``out_dir/rmac/``.
        conf: see :data:`confs` / :func:`resolve_conf`.
        whitening_images: learn the PCA-whitening on this image folder (another dataset, e.g. the
            synthetic world's ``train/images``); or ``whitening_dataset``: another Revisited
            folder's database. Without either the benchmark's own database is used (optimistic,
            a warning says so). Not used by ``learned-rmac`` (its head holds the projection).
        overwrite: redo finished work.
        until: stop after this stage of :data:`STAGES` (default: all).
        executor: where the per-image work runs, ``shard_size`` images a shard (the
            activations, :func:`retrieval.rmac.activations.feature_stage`; learned R-MAC's
            descriptors, :func:`retrieval.rmac.learned.describe_stage`; default: this process,
            :class:`gldboxes.executor.SerialExecutor`); the files are the same on any.

    Returns:
        :class:`RmacResult`; ``results`` maps easy/medium/hard to ``ProtocolResult``, ``timings``
        holds seconds per query of the search and of AML re-ranking.
    """
    names = [n for n, _ in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"until: unknown stage {until!r}; expected one of {names}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    conf = resolve_conf(conf)
    method = conf["method"]
    ds = RevisitedDataset.load(Path(dataset_dir))
    missing = ds.missing_images()
    if missing:
        raise ValueError(f"{ds.root}: {len(missing)} images missing (first: {missing[:3]})")
    if method == "learned-rmac":
        if not conf.get("model"):
            raise ValueError("method learned-rmac needs conf['model'] (a trained model folder)")
        from retrieval.rmac.learned import model_tag

        tag, trainset = model_tag(Path(conf["model"])), "learned"
    else:
        tag = _feature_tag(conf)
        if whitening_images is not None:
            trainset = (
                f"{Path(whitening_images).name}-"
                f"{config_hash({'d': os.path.abspath(whitening_images)}, 8)}"
            )
        elif whitening_dataset is not None:
            trainset = RevisitedDataset.load(Path(whitening_dataset)).name
        elif method == "mac":
            trainset = "none"
        else:
            trainset = f"{ds.name}-self"
    key = config_hash(
        {
            **conf,
            "whitening_images": str(whitening_images),
            "whitening_dataset": str(whitening_dataset),
        }
    )
    r = _Rmac(
        conf=conf,
        ds=ds,
        dataset_dir=Path(dataset_dir),
        out=Path(out_dir) / "rmac",
        whitening_images=whitening_images,
        whitening_dataset=whitening_dataset,
        overwrite=overwrite,
        tag=tag,
        trainset=trainset,
        key=key,
        done=False,
        res=RmacResult(method),
        executor=executor or SerialExecutor(),
        shard_size=int(shard_size),
    )
    r.res.folder = r.folder
    mpath = r.folder / "metrics.json"
    if not overwrite and (r.folder / "ranks.npy").exists() and mpath.exists():
        r.done = read_json(mpath).get("config_hash") == key
        if r.done:
            logger.info("results exist, skipping search and evaluation: %s", r.folder)
    for name, stage in STAGES:
        stage(r)
        if name == until:
            break
    return r.res


def _aml_all(
    conf: Mapping[str, Any],
    ds: Any,
    db_h5: Path,
    q_h5: Path,
    ranks: np.ndarray,
    qv: np.ndarray,
    q_mac: np.ndarray,
    wh: Whitening | None,
    timings: dict[str, float],
) -> np.ndarray:
    """AML re-ranking (+QE) of every query's top N; fills per-query timings."""
    import h5py

    aml = conf["aml"]
    n_top = min(int(aml["rerank"]), ds.n_db)
    with h5py.File(db_h5, "r") as f:
        nbytes = sum(int(np.prod(f[n]["maps"].shape)) * 4 for n in ds.imlist)
    cache: dict[int, np.ndarray] | None = None
    if nbytes <= float(conf.get("maps_memory_mb", 2048)) * 2**20:
        cache = dict(enumerate(read_maps(db_h5, ds.imlist)))
    with h5py.File(q_h5, "r") as f:
        sizes = [tuple(f[n].attrs["image_size"]) for n in ds.qimlist]
    out = ranks.copy()
    t_aml = t_qe = 0.0
    for qi in tqdm(range(ds.n_queries), desc="AML re-ranking", disable=ds.n_queries < 10):
        top = ranks[:n_top, qi]
        if cache is not None:
            maps = [cache[int(i)] for i in top]
        else:
            maps = read_maps(db_h5, [ds.imlist[int(i)] for i in top])
        w, h = sizes[qi]
        t0 = time.perf_counter()
        ids, _, vecs, _ = aml_rerank(
            qv[qi],
            q_mac[qi],
            h / w,
            top,
            maps,
            wh,
            levels=int(conf["levels"]),
            overlap=float(conf["overlap"]),
            alpha=float(aml["alpha"]),
            step=int(aml["step"]),
            ratio=float(aml["ratio"]),
            refine_step=int(aml["refine_step"]),
            refine_iter=int(aml["refine_iter"]),
            chunk_mb=float(aml["chunk_mb"]),
        )
        t1 = time.perf_counter()
        t_aml += t1 - t0
        if conf["method"] == "rmac+aml+qe":
            sc = query_expansion(qv[qi], vecs, vecs, int(conf["qe"]))
            ids = ids[np.argsort(-sc, kind="stable")]
            t_qe += time.perf_counter() - t1
        out[:n_top, qi] = ids
    timings["aml_s_per_query"] = t_aml / max(ds.n_queries, 1)
    timings["qe_s_per_query"] = t_qe / max(ds.n_queries, 1)
    timings["aml_rerank_n"] = float(n_top)
    return out
