"""The R-MAC stage: presets, feature files, and ``run_rmac`` from images to a ranking.

Part of :mod:`retrieval.rmac`; see its docstring for the method."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval.rmac.aml import aml_rerank, query_expansion, search
from retrieval.rmac.backbone import BACKBONES, Backbone, build_backbone, load_rgb
from retrieval.rmac.pooling import map_descriptors
from retrieval.rmac.whitening import FORMAT_VERSION, Whitening, aggregate_rmac, learn_whitening

__all__ = [
    "IMAGE_SUFFIXES",
    "METHODS",
    "RmacResult",
    "confs",
    "extract",
    "read_features",
    "resolve_conf",
    "run_rmac",
]

logger = logging.getLogger("retrieval.rmac.stage")


METHODS = ("mac", "rmac", "rmac+aml", "rmac+aml+qe", "learned-rmac")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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


# =========================================================================== features I/O
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


@dataclass(frozen=True)
class _Item:
    name: str
    path: Path
    bbx: tuple[float, float, float, float] | None = None


def extract(
    conf: Mapping[str, Any],
    items: Sequence[_Item],
    out_h5: str | os.PathLike[str],
    *,
    keep_maps: bool = False,
    backbone: Backbone | Callable[[], Backbone] | None = None,
    overwrite: bool = False,
) -> Path:
    """Activations -> MAC and regional vectors (and optionally quantised maps) of images.

    Writes an HDF5 file with one group per image id: ``mac`` (C,), ``regional`` (R, C), and with
    ``keep_maps`` ``maps`` uint8 (h, w, C) + ``scale`` (C,) (value = maps / 255 * scale). Skipped
    when the file exists with the same configuration (and maps when needed). ``backbone`` may be
    a built :class:`Backbone` or a factory called only when there is work to do.
    """
    import h5py

    out_h5 = Path(out_h5)
    key = config_hash(
        {k: conf[k] for k in ("backbone", "weights", "seed", "max_side", "levels", "overlap")}
        | {"items": [[it.name, str(it.path), it.bbx] for it in items]}
    )
    if out_h5.exists() and not overwrite:
        with h5py.File(out_h5, "r") as f:
            if f.attrs.get("config_hash") == key and (not keep_maps or f.attrs.get("maps")):
                logger.info("features exist, skipping: %s", out_h5)
                return out_h5
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{out_h5}: image ids are not unique")
    if isinstance(backbone, Backbone):
        bb = backbone
    elif backbone is not None:
        bb = backbone()
    else:
        bb = build_backbone(conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0)))
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config_hash"] = key
        f.attrs["maps"] = bool(keep_maps)
        f.attrs["config"] = json.dumps(
            {k: conf[k] for k in ("backbone", "weights", "seed", "max_side", "levels", "overlap")}
        )
        for it in tqdm(items, desc=f"R-MAC {out_h5.stem}", disable=len(items) < 20):
            img = load_rgb(it.path, int(conf["max_side"]), it.bbx)
            fmap = bb(img)[0]
            mac, reg = map_descriptors(fmap, int(conf["levels"]), float(conf["overlap"]))
            grp = f.create_group(it.name)
            grp.create_dataset("mac", data=mac)
            grp.create_dataset("regional", data=reg)
            grp.attrs["image_size"] = (img.shape[1], img.shape[0])
            if keep_maps:
                sc = fmap.max(axis=(0, 1)).astype(np.float32)
                qm = np.round(fmap / np.where(sc > 0, sc, 1.0) * 255.0).astype(np.uint8)
                grp.create_dataset("maps", data=qm, compression="gzip", compression_opts=1)
                grp.create_dataset("scale", data=sc)
    return out_h5


def read_features(
    path: str | os.PathLike[str], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mac (n, C), regional (sum R, C), counts (n,))`` of the named images."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"R-MAC features not found: {path}")
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError(f"{path}: not an R-MAC features file of format {FORMAT_VERSION}")
        missing = [n for n in names if n not in f]
        if missing:
            raise ValueError(f"{path}: no features for {len(missing)} images (e.g. {missing[:3]})")
        mac = np.stack([f[n]["mac"][()] for n in names])
        regs = [f[n]["regional"][()] for n in names]
    return mac, np.concatenate(regs), np.array([len(r) for r in regs], np.int64)


def _read_maps(path: Path, names: Sequence[str]) -> list[np.ndarray]:
    """Dequantised float32 (h, w, C) activation maps of the named images."""
    import h5py

    with h5py.File(path, "r") as f:
        if not f.attrs.get("maps"):
            raise ValueError(f"{path}: holds no activation maps (extract with keep_maps)")
        return [f[n]["maps"][()].astype(np.float32) * (f[n]["scale"][()] / 255.0) for n in names]


# =========================================================================== the stage
@dataclass
class RmacResult:
    """What :func:`run_rmac` wrote and measured."""

    method: str
    ranks: Path
    metrics_path: Path
    results: dict[str, Any]
    timings: dict[str, float]
    folder: Path

    def table(self) -> str:
        from retrieval.evaluation.evaluate import format_table

        return format_table({self.method: self.results})


def _folder_items(root: Path) -> list[_Item]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return [_Item(p.relative_to(root).as_posix().replace("/", "__"), p) for p in files]


def _whitening(
    conf: Mapping[str, Any],
    out: Path,
    tag: str,
    train_items: Sequence[_Item],
    trainset: str,
    backbone: Callable[[], Backbone],
    overwrite: bool,
) -> Path:
    folder = out / "whitening" / f"{tag}-{trainset}"
    path = folder / "whitening.npz"
    if path.exists() and not overwrite:
        return path
    h5 = extract(
        conf,
        train_items,
        out / "features" / tag / f"{trainset}.h5",
        backbone=backbone,
        overwrite=overwrite,
    )
    _, reg, _ = read_features(h5, [it.name for it in train_items])
    wh = learn_whitening(
        reg,
        dim=conf.get("whitening_dim"),
        eps=float(conf["whitening_eps"]),
        meta={"training_set": trainset, "features": tag},
    )
    wh.save(path)
    write_config(folder, {**conf, "training_set": trainset})
    return path


def run_rmac(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any],
    *,
    whitening_images: str | os.PathLike[str] | None = None,
    whitening_dataset: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RmacResult:
    """Rank a Revisited-style dataset with MAC / R-MAC (+AML re-ranking, +QE) or learned R-MAC.

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

    Returns:
        :class:`RmacResult`; ``results`` maps easy/medium/hard to ``ProtocolResult``, ``timings``
        holds seconds per query of the search and of AML re-ranking.
    """
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import evaluate_protocols

    conf = resolve_conf(conf)
    method = conf["method"]
    ds = RevisitedDataset.load(Path(dataset_dir))
    missing = ds.missing_images()
    if missing:
        raise ValueError(f"{ds.root}: {len(missing)} images missing (first: {missing[:3]})")
    out = Path(out_dir) / "rmac"
    db_items = [_Item(n, ds.image_path(n)) for n in ds.imlist]
    q_items = [_Item(n, ds.image_path(n), ds.query_bbx(i)) for i, n in enumerate(ds.qimlist)]

    if method == "learned-rmac":
        if not conf.get("model"):
            raise ValueError("method learned-rmac needs conf['model'] (a trained model folder)")
        from retrieval.rmac.learned import load_model, model_tag

        mpath = Path(conf["model"])
        tag, trainset = model_tag(mpath), "learned"
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
    extra = f"-n{conf['aml']['rerank']}" if "aml" in method else ""
    folder = out / "results" / f"{method}-{tag}-{trainset}-{ds.name}{extra}"
    ranks_path, metrics_path = folder / "ranks.npy", folder / "metrics.json"
    key = config_hash(
        {
            **conf,
            "whitening_images": str(whitening_images),
            "whitening_dataset": str(whitening_dataset),
        }
    )
    if ranks_path.exists() and metrics_path.exists() and not overwrite:
        meta = read_json(metrics_path)
        if meta.get("config_hash") == key:
            logger.info("results exist, skipping: %s", folder)
            ranks = np.load(ranks_path, allow_pickle=False)
            res = evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)
            return RmacResult(
                method, ranks_path, metrics_path, res, meta.get("timings", {}), folder
            )

    timings: dict[str, float] = {}
    if method == "learned-rmac":
        model = load_model(mpath)
        db = model.describe_paths([it.path for it in db_items])
        qv = model.describe_paths([it.path for it in q_items], [it.bbx for it in q_items])
        t0 = time.perf_counter()
        ranks, _ = search(qv, db)
        timings["search_s_per_query"] = (time.perf_counter() - t0) / max(ds.n_queries, 1)
    else:
        bb_cache: list[Backbone] = []

        def backbone() -> Backbone:
            if not bb_cache:
                bb_cache.append(
                    build_backbone(
                        conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0))
                    )
                )
            return bb_cache[0]

        use_aml = "aml" in method
        db_h5 = extract(
            conf,
            db_items,
            out / "features" / tag / f"{ds.name}-db.h5",
            keep_maps=use_aml,
            backbone=backbone,
            overwrite=overwrite,
        )
        q_h5 = extract(
            conf,
            q_items,
            out / "features" / tag / f"{ds.name}-query.h5",
            backbone=backbone,
            overwrite=overwrite,
        )
        db_mac, db_reg, db_cnt = read_features(db_h5, ds.imlist)
        q_mac, q_reg, q_cnt = read_features(q_h5, ds.qimlist)
        wh: Whitening | None = None
        if method != "mac":
            if whitening_images is not None:
                t_items = _folder_items(Path(whitening_images))
            elif whitening_dataset is not None:
                other = RevisitedDataset.load(Path(whitening_dataset))
                t_items = [_Item(n, other.image_path(n)) for n in other.imlist]
            else:
                logger.warning(
                    "no whitening training set given: learning it on %s's own "
                    "database (optimistic; Tolias et al. use another dataset)",
                    ds.name,
                )
                t_items = db_items
            wpath = _whitening(conf, out, tag, t_items, trainset, backbone, overwrite)
            wh = Whitening.load(wpath)
            db = aggregate_rmac(db_reg, db_cnt, wh)
            qv = aggregate_rmac(q_reg, q_cnt, wh)
        else:
            db, qv = db_mac, q_mac
        t0 = time.perf_counter()
        ranks, _ = search(qv, db)
        timings["search_s_per_query"] = (time.perf_counter() - t0) / max(ds.n_queries, 1)
        if use_aml:
            ranks = _aml_all(conf, ds, db_h5, q_h5, ranks, qv, q_mac, wh, timings)
    with atomic_path(ranks_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(ranks.astype(np.int64)), allow_pickle=False)
    res = evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)
    write_json(
        metrics_path,
        {
            "format_version": FORMAT_VERSION,
            "dataset": ds.name,
            "method": method,
            "config_hash": key,
            "timings": timings,
            "metrics": {p: r.as_dict() for p, r in res.items()},
        },
    )
    write_config(
        folder,
        {
            **conf,
            "whitening_images": whitening_images,
            "whitening_dataset": whitening_dataset,
            "dataset": str(dataset_dir),
        },
    )
    logger.info(
        "%s on %s: medium mAP %.2f, hard mAP %.2f",
        method,
        ds.name,
        100 * res["medium"].map,
        100 * res["hard"].map,
    )
    return RmacResult(method, ranks_path, metrics_path, res, timings, folder)


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
        cache = dict(enumerate(_read_maps(db_h5, ds.imlist)))
    with h5py.File(q_h5, "r") as f:
        sizes = [tuple(f[n].attrs["image_size"]) for n in ds.qimlist]
    out = ranks.copy()
    t_aml = t_qe = 0.0
    for qi in tqdm(range(ds.n_queries), desc="AML re-ranking", disable=ds.n_queries < 10):
        top = ranks[:n_top, qi]
        if cache is not None:
            maps = [cache[int(i)] for i in top]
        else:
            maps = _read_maps(db_h5, [ds.imlist[int(i)] for i in top])
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
