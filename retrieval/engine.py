"""The retrieval pipeline as resumable stages: extract -> codebook -> index -> search -> evaluate.

Every stage writes into a config-named folder under one output directory and skips work that is
already done, so a run can be interrupted and resumed and two configurations never overwrite
each other::

    OUT/features/<features>/<dataset>-db.h5, <dataset>-query.h5, <trainset>.h5
    OUT/codebooks/<features>-k<K>-s<seed>-<trainset>/codebook.npy (+ .json, config.yaml)
    OUT/index/<kernel>-k<K>-<features>[-ma<m>]-<trainset>-<dataset>/  (inverted file folder)
    OUT/results/<same name>/ranks.npy   int64 (n_db, n_queries), revisitop layout
                            metrics.json, config.yaml

Codebook convention: train on another dataset's descriptors (``codebook_images``: any image
folder, e.g. the synthetic world's ``train/images``; or ``codebook_dataset``: another Revisited
folder, e.g. rparis6k for roxford5k). Without either, the benchmark's own database is used and a
warning says the numbers are optimistic.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json
from retrieval import codebook as codebook_stage
from retrieval import features as features_stage
from retrieval.aggregation import KERNELS, AggregatedBatch, aggregate_many
from retrieval.datasets import RevisitedDataset
from retrieval.evaluate import evaluate_protocols, format_table
from retrieval.inverted_file import InvertedFile

__all__ = [
    "IMAGE_SUFFIXES",
    "RunResult",
    "aggregate_features",
    "build_codebook",
    "build_index",
    "codebook_tag",
    "default_conf",
    "evaluate",
    "extract",
    "extract_folder",
    "resolve_conf",
    "run",
    "search",
]

logger = logging.getLogger("retrieval.engine")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Every key of a run's configuration (the resolved dict is written beside each output).
default_conf: dict[str, Any] = {
    "features": "rootsift",  # preset of retrieval.features.confs
    "feature_model": {},  # overrides of the preset's "model" (e.g. {"path": ..., "pca_path": ...})
    "codebook": {  # see retrieval.codebook.confs
        "size": 1024,
        "niter": 20,
        "seed": 0,
        "max_descriptors": 500_000,
        "max_points_per_centroid": 256,
    },
    "kernel": "asmk_star",  # vlad | asmk | asmk_star | r_vlad | r_asmk | r_asmk_star
    "num_assignments": 1,  # visual words per descriptor
    "alpha": None,  # selectivity exponent (None: the kernel's default, 3 for ASMK)
    "tau": None,  # selectivity threshold (None: kernel default, 0 for ASMK)
    "normalize": None,  # ASMK image normalisation (None: kernel default)
    "top_k": None,  # ranks kept per query (None: the whole database)
    "batch_images": 512,  # images aggregated per batch (memory bound)
}


def resolve_conf(conf: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``default_conf`` updated with ``conf`` and keyword overrides (nested ``codebook`` merged)."""
    out = copy.deepcopy(default_conf)
    for src in (conf or {}, overrides):
        for k, v in src.items():
            if k not in out:
                raise ValueError(f"unknown retrieval option {k!r}; expected one of {sorted(out)}")
            if k == "codebook" and isinstance(v, Mapping):
                out[k].update(v)
            elif v is not None or k in ("alpha", "tau", "normalize", "top_k"):
                out[k] = v
    if out["kernel"] not in KERNELS:
        raise ValueError(f"unknown kernel {out['kernel']!r}; expected one of {list(KERNELS)}")
    if out["features"] not in features_stage.confs:
        raise ValueError(
            f"unknown features preset {out['features']!r}; expected one of "
            f"{sorted(features_stage.confs)}"
        )
    return out


def _feature_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    fc = copy.deepcopy(features_stage.confs[conf["features"]])
    fc["model"].update(conf.get("feature_model") or {})
    return fc


# ---------------------------------------------------------------------------- stages
def extract(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    queries: bool = True,
) -> tuple[Path, Path | None]:
    """Features of the database (whole images) and of the queries (cropped to their bbx).

    Returns:
        ``(db_h5, query_h5)`` (``query_h5`` is None when ``queries`` is False).
    """
    fc = _feature_conf(conf)
    folder = Path(out_dir) / "features" / fc["output"]
    db = features_stage.main(
        fc,
        [features_stage.ImageItem(n, dataset.image_path(n)) for n in dataset.imlist],
        folder / f"{dataset.name}-db.h5",
        overwrite=overwrite,
    )
    if not queries:
        return db, None
    items = [
        features_stage.ImageItem(n, dataset.image_path(n), dataset.query_bbx(i))
        for i, n in enumerate(dataset.qimlist)
    ]
    q = features_stage.main(fc, items, folder / f"{dataset.name}-query.h5", overwrite=overwrite)
    return db, q


def extract_folder(
    conf: Mapping[str, Any],
    image_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Features of every image under a folder (recursive), e.g. a codebook training set.

    Returns:
        ``(h5 path, training-set name)``; ids are paths relative to ``image_dir``.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    name = f"{root.name}-{config_hash({'dir': os.path.abspath(root)}, 8)}"
    fc = _feature_conf(conf)
    items = [
        features_stage.ImageItem(p.relative_to(root).as_posix().replace("/", "__"), p)
        for p in files
    ]
    out = features_stage.main(
        fc, items, Path(out_dir) / "features" / fc["output"] / f"{name}.h5", overwrite=overwrite
    )
    return out, name


def build_codebook(
    conf: Mapping[str, Any],
    train_features: str | os.PathLike[str],
    training_set: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Train the codebook on ``train_features``; returns ``codebook.npy``."""
    fc = _feature_conf(conf)
    cb = conf["codebook"]
    folder = (
        Path(out_dir) / "codebooks" / f"{fc['output']}-k{cb['size']}-s{cb['seed']}-{training_set}"
    )
    return codebook_stage.main(
        cb, train_features, folder, training_set=training_set, overwrite=overwrite
    )


def codebook_tag(codebook_path: str | os.PathLike[str]) -> str:
    """The training-set name used in folder names: from the codebook's sidecar, else a hash."""
    p = Path(codebook_path)
    side = (p / "codebook.json") if p.is_dir() else p.with_suffix(".json")
    if side.exists():
        name = read_json(side).get("training_set")
        if isinstance(name, str) and name:
            return name.replace("/", "_")
    return f"cb{config_hash({'p': os.path.abspath(p)}, 8)}"


def aggregate_features(
    conf: Mapping[str, Any],
    features: str | os.PathLike[str],
    names: Sequence[str],
    codebook: np.ndarray,
) -> AggregatedBatch:
    """Aggregate the images ``names`` of a features file, ``batch_images`` at a time."""
    step = int(conf.get("batch_images", 512))
    parts = []
    for a in tqdm(
        range(0, len(names), step),
        desc=f"aggregate {conf['kernel']}",
        unit="batch",
        disable=len(names) <= step,
    ):
        descs = features_stage.read_descriptors(features, names[a : a + step])
        parts.append(
            aggregate_many(
                descs, codebook, conf["kernel"], num_assignments=int(conf["num_assignments"])
            )
        )
    if not parts:
        return aggregate_many([], codebook, conf["kernel"])
    return AggregatedBatch.concatenate(parts)


def _run_name(conf: Mapping[str, Any], training_set: str, dataset: str) -> str:
    fc = _feature_conf(conf)
    ma = f"-ma{conf['num_assignments']}" if int(conf["num_assignments"]) != 1 else ""
    extra = {k: conf[k] for k in ("alpha", "tau", "normalize") if conf[k] is not None}
    tag = f"-{config_hash(extra, 6)}" if extra else ""
    return (
        f"{conf['kernel']}-k{conf['codebook']['size']}-{fc['output']}{ma}{tag}-"
        f"{training_set}-{dataset}"
    )


def build_index(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    db_features: str | os.PathLike[str],
    codebook_path: str | os.PathLike[str],
    training_set: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Aggregate the database and write its inverted file; returns the index folder."""
    path = Path(out_dir) / "index" / _run_name(conf, training_set, dataset.name)
    # The hash covers the inputs' identity and age, so a retrained codebook rebuilds the index.
    chash = config_hash(
        {
            "conf": conf,
            "codebook": os.fspath(codebook_path),
            "codebook_mtime": os.stat(codebook_path).st_mtime_ns,
            "features_mtime": os.stat(db_features).st_mtime_ns,
        }
    )
    if (path / "header.json").exists() and not overwrite:
        meta = read_json(path / "header.json").get("meta", {})
        if meta.get("config_hash") == chash:
            logger.info("index exists, skipping: %s", path)
            return path
    cb = codebook_stage.load_codebook(codebook_path)
    batch = aggregate_features(conf, db_features, dataset.imlist, cb)
    ivf = InvertedFile.build(
        batch,
        cb.shape[0],
        conf["kernel"],
        alpha=conf["alpha"],
        tau=conf["tau"],
        normalize=conf["normalize"],
        meta={
            "config_hash": chash,
            "dataset": dataset.name,
            "codebook": os.fspath(codebook_path),
            "image_names": list(dataset.imlist),
        },
    )
    ivf.save(path)
    write_config(path, conf)
    st = ivf.stats()
    logger.info(
        "index %s: %d images, %d postings, %.0f bytes/image",
        path.name,
        st["images"],
        st["postings"],
        st["bytes_per_image"],
    )
    return path


def search(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    query_features: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    codebook_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Rank the database for every query; writes ``ranks.npy`` (n_ranked, n_queries)."""
    index_path = Path(index_path)
    folder = Path(out_dir) / "results" / index_path.name
    ranks_path = folder / "ranks.npy"
    done = folder / "search.json"
    ivf = InvertedFile.load(index_path)
    key = {
        "index_config_hash": ivf.meta.get("config_hash"),
        "queries_mtime": os.stat(query_features).st_mtime_ns,
        "top_k": conf.get("top_k"),
    }
    if ranks_path.exists() and done.exists() and read_json(done) == key and not overwrite:
        logger.info("ranks exist, skipping: %s", ranks_path)
        return ranks_path
    cb = codebook_stage.load_codebook(codebook_path)
    q = aggregate_features(conf, query_features, dataset.qimlist, cb)
    ids, _ = ivf.search(q, conf.get("top_k"))
    with atomic_path(ranks_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(ids.T), allow_pickle=False)
    write_config(folder, conf)
    write_json(done, key)
    return ranks_path


def evaluate(
    dataset: RevisitedDataset,
    ranks_path: str | os.PathLike[str],
    *,
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[Path, dict[str, Any]]:
    """Easy/Medium/Hard mAP and mP@k of a ranking; writes ``metrics.json`` beside it."""
    ranks_path = Path(ranks_path)
    ranks = np.load(ranks_path, allow_pickle=False)
    res = evaluate_protocols(ranks, dataset.gnd, kappas, n_db=dataset.n_db)
    metrics = {p: r.as_dict() for p, r in res.items()}
    out = write_json(
        ranks_path.parent / "metrics.json",
        {"format_version": 1, "dataset": dataset.name, "metrics": metrics},
    )
    return out, {"results": res, "metrics": metrics}


@dataclass
class RunResult:
    """Paths written by :func:`run` and the metrics."""

    features: tuple[Path, Path | None]
    codebook: Path
    index: Path
    ranks: Path
    metrics_path: Path
    results: dict[str, Any] = field(default_factory=dict)
    index_stats: dict[str, float] = field(default_factory=dict)

    def table(self, name: str | None = None) -> str:
        return format_table({name or self.index.name: self.results})


def run(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any] | None = None,
    *,
    codebook_images: str | os.PathLike[str] | None = None,
    codebook_dataset: str | os.PathLike[str] | None = None,
    codebook_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """One shot: features, codebook, index, ranks and metrics for a Revisited-style folder.

    Args:
        dataset_dir: a folder with ``gnd_<name>.pkl`` and ``jpg/`` (roxford5k, rparis6k, the
            synthetic world's ``retrieval/``).
        out_dir: where the config-named folders go.
        conf: options (see :data:`default_conf`).
        codebook_images: train the codebook on this image folder (another dataset).
        codebook_dataset: or on the database images of another Revisited folder.
        codebook_path: or use an existing ``codebook.npy``.
    """
    rc = resolve_conf(conf)
    ds = RevisitedDataset.load(Path(dataset_dir))
    missing = ds.missing_images()
    if missing:
        logger.warning(
            "%s: %d images missing (first: %s); they will be recorded as errors",
            ds.root,
            len(missing),
            missing[:3],
        )
    feats = extract(rc, ds, out_dir, overwrite=overwrite)
    if codebook_path is not None:
        cb_path = Path(codebook_path)
        training_set = codebook_tag(cb_path)
    else:
        if codebook_images is not None:
            train_h5, training_set = extract_folder(
                rc, codebook_images, out_dir, overwrite=overwrite
            )
        elif codebook_dataset is not None:
            other = RevisitedDataset.load(Path(codebook_dataset))
            train_h5, _ = extract(rc, other, out_dir, overwrite=overwrite, queries=False)
            training_set = other.name
        else:
            logger.warning(
                "no codebook training set given: training on %s's own database "
                "(optimistic; the protocol trains on another dataset)",
                ds.name,
            )
            train_h5, training_set = feats[0], f"{ds.name}-self"
        cb_path = build_codebook(rc, train_h5, training_set, out_dir, overwrite=overwrite)
    idx = build_index(rc, ds, feats[0], cb_path, training_set, out_dir, overwrite=overwrite)
    if feats[1] is None:
        raise ValueError(f"{ds.root}: query features were not extracted")
    ranks = search(rc, ds, feats[1], idx, cb_path, out_dir, overwrite=overwrite)
    mpath, ev = evaluate(ds, ranks)
    stats = read_json(idx / "header.json").get("stats", {})
    return RunResult(
        features=feats,
        codebook=cb_path,
        index=idx,
        ranks=ranks,
        metrics_path=mpath,
        results=ev["results"],
        index_stats=stats,
    )
