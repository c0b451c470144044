"""The retrieval pipeline as resumable stages: extract -> codebook -> [regions] -> index -> search
-> evaluate -> [verify].

Every stage writes into a config-named folder under one output directory and skips work that is
already done, so a run can be interrupted and resumed and two configurations never overwrite
each other::

    OUT/features/<features>/<dataset>-db.h5, <dataset>-query.h5, <trainset>.h5
    OUT/codebooks/<features>-k<K>-s<seed>-<trainset>/codebook.npy (+ .json, config.yaml)
    OUT/index/<kernel>-k<K>-<features>[-ma<m>]-<trainset>-<dataset>/  (inverted file folder)
    OUT/results/<same name>/ranks.npy   int64 (n_db, n_queries), revisitop layout
                            scores.npy  float64 (n_db, n_queries), first-stage scores
                            metrics.json, config.yaml
    OUT/results/<same name>-gv<N>-<hash>/ranks_<protocol>.npy, metrics.json  (verification)

Detect-to-Retrieve (Teichmann et al. CVPR 2019) on the index side:

* ``regions``: a preset of :data:`retrieval.regions.confs` (``gt``, ``d2r-0.3``, ``rmacb-L2``,
  ``ss-5`` ...) or a regions conf dict; with ``region_boxes`` (a detector's boxes CSV) and
  ``region_threshold``. The regions CSV goes to ``OUT/regions/<dataset>/<output>.csv``; region 0
  is always the whole image.
* ``region_features``: ``"assign"`` gives each region the whole image's features whose keypoint
  lies in its crop (fast, nothing extracted); ``"reextract"`` extracts features again on every
  crop ``[floor(xmin W), floor(ymin H), ceil(xmax W), ceil(ymax H)]`` (the paper's way) into
  ``OUT/features/<features>/<dataset>-db-<regions output>.h5`` keyed ``<id>/region_<j>``
  (``j >= 1``; region 0 is the whole-image entry of ``<dataset>-db.h5``).
* a regional ``kernel`` (``r_asmk_star``, ``naive_r_asmk_star``, ``r_vlad`` ...) aggregates the
  regions into one entry per image; ``regional_search="max"|"avg"`` instead indexes every region
  as its own entry with the (single-image) ``kernel`` and pools scores per image (D2R-ASMK*).
* queries always stay single-region (``retrieval.index.aggregation.QUERY_KERNEL``), and regional
  kernels are compared without the ASMK score normalisation, as the authors do.
* ``verification``: spatial verification of the top ``top_n`` (junk removed per protocol, one pass
  for all protocols, :mod:`retrieval.verification`), evaluated per protocol.

Codebook convention: train on another dataset's descriptors (``codebook_images``: any image
folder, e.g. the synthetic world's ``train/images``; or ``codebook_dataset``: another Revisited
folder, e.g. rparis6k for roxford5k). Without either, the benchmark's own database is used and a
warning says the numbers are optimistic.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval import features as features_stage
from retrieval import regions as regions_stage
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.evaluate import evaluate_protocols, format_table
from retrieval.features import codebook as codebook_stage
from retrieval.index.aggregation import (
    KERNELS,
    QUERY_KERNEL,
    REGIONAL_KERNELS,
    AggregatedBatch,
    aggregate_many,
)
from retrieval.index.inverted_file import InvertedFile

__all__ = [
    "IMAGE_SUFFIXES",
    "RunResult",
    "aggregate_database",
    "aggregate_features",
    "build_codebook",
    "build_index",
    "build_regions",
    "codebook_tag",
    "default_conf",
    "evaluate",
    "extract",
    "extract_folder",
    "extract_regions",
    "feature_conf",
    "region_conf",
    "region_crop_items",
    "region_norm_floor",
    "regional_descriptor_lists",
    "resolve_conf",
    "run",
    "run_name",
    "search",
    "verification_conf",
    "verify",
]

logger = logging.getLogger("retrieval.runner.engine")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Every key of a run's configuration (the resolved dict is written beside each output).
default_conf: dict[str, Any] = {
    "features": "rootsift",  # preset of retrieval.features.confs
    "feature_model": {},  # overrides of the preset's "model" (e.g. {"max_features": 4000})
    "feature_preprocessing": {},  # overrides of the preset's "preprocessing" ({"max_side": 800})
    "codebook": {  # see retrieval.features.codebook.confs
        "size": 1024,
        "niter": 20,
        "seed": 0,
        "max_descriptors": 500_000,
        "max_points_per_centroid": 256,
    },
    "kernel": "asmk_star",  # one of retrieval.index.aggregation.KERNELS (naive_r_asmk_star, r_vlad
    # ...)
    "num_assignments": 1,  # visual words per descriptor
    "alpha": None,  # selectivity exponent (None: the kernel's default, 3 for ASMK)
    "tau": None,  # selectivity threshold (None: kernel default, 0 for ASMK)
    "normalize": None,  # ASMK image normalisation (None: kernel default)
    "top_k": None,  # ranks kept per query (None: the whole database)
    "batch_images": 512,  # images aggregated per batch (memory bound)
    # Index-side regions (Detect-to-Retrieve); None: whole images only.
    "regions": None,  # a retrieval.regions.confs preset name, or a regions conf dict
    "region_boxes": None,  # boxes CSV: detector source (required), gt (default DATASET/boxes_gt)
    "region_threshold": None,  # detector score threshold overriding the preset's
    "region_features": "assign",  # "assign" (whole-image features in each box) | "reextract"
    "regional_search": None,  # None | "max" | "avg": D2R search, each region its own entry
    # Regional search: floor of a region's word count in the ASMK normalisation, as a fraction
    # of its image's (retrieval.index.inverted_file; None: REGION_NORM_FLOOR = 0.1; 0: plain ASMK).
    "region_norm_floor": None,
    # Spatial verification after search; None: off. A dict of VerificationConf fields
    # (max_distance, threshold, trials, seed, min_matches, min_inliers, max_scale) plus
    # "top_n" (head verified per protocol, 100) and "num_workers" (threads, None: CPUs).
    "verification": None,
}

REGION_FEATURE_MODES = ("assign", "reextract")
_VERIFY_KEYS = ("top_n", "num_workers")


def resolve_conf(conf: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``default_conf`` updated with ``conf`` and keyword overrides (nested ``codebook`` merged)."""
    out = copy.deepcopy(default_conf)
    for src in (conf or {}, overrides):
        for k, v in src.items():
            if k not in out:
                raise ValueError(f"unknown retrieval option {k!r}; expected one of {sorted(out)}")
            if k in ("codebook", "feature_model", "feature_preprocessing") and isinstance(
                v, Mapping
            ):
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
    _check_regional(out)
    return out


def _check_regional(out: Mapping[str, Any]) -> None:
    """Validate the region / regional-search / verification options of a resolved conf."""
    if out["region_features"] not in REGION_FEATURE_MODES:
        raise ValueError(
            f"region_features must be one of {REGION_FEATURE_MODES}, got {out['region_features']!r}"
        )
    if out["regional_search"] not in (None, "max", "avg"):
        raise ValueError(
            f"regional_search must be None, 'max' or 'avg', got {out['regional_search']!r}"
        )
    if out["regional_search"] is not None:
        if out["kernel"] in REGIONAL_KERNELS:
            raise ValueError(
                f"regional_search indexes each region with a single-image kernel; got the "
                f"regional kernel {out['kernel']!r} (use asmk_star for D2R-ASMK*)"
            )
        if out["regions"] is None:
            raise ValueError("regional_search needs regions (a retrieval.regions.confs preset)")
    reg = out["regions"]
    if isinstance(reg, str) and reg not in regions_stage.confs:
        raise ValueError(
            f"unknown regions preset {reg!r}; expected one of {sorted(regions_stage.confs)}"
        )
    if reg is not None and not isinstance(reg, str | Mapping):
        raise ValueError(f"regions must be a preset name or a conf dict, got {type(reg).__name__}")
    ver = out["verification"]
    if ver is not None:
        if not isinstance(ver, Mapping):
            raise ValueError(f"verification must be a dict of settings, got {ver!r}")
        from retrieval.verification import VerificationConf

        known = set(VerificationConf.__dataclass_fields__) | set(_VERIFY_KEYS)
        bad = sorted(set(ver) - known)
        if bad:
            raise ValueError(f"unknown verification setting(s) {bad}; expected {sorted(known)}")


def feature_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The features preset of a run, with the run's ``feature_model`` overrides applied.

    Args:
        conf: a resolved run conf (:func:`resolve_conf`).

    Returns:
        a deep copy of ``retrieval.features.confs[conf["features"]]`` whose ``model`` and
        ``preprocessing`` dicts are updated with ``conf["feature_model"]`` and
        ``conf["feature_preprocessing"]``; its ``output`` (the features folder) names the
        resulting budget, orientation and image size (:func:`retrieval.features.output_name`).
    """
    fc = copy.deepcopy(features_stage.confs[conf["features"]])
    model = dict(conf.get("feature_model") or {})
    pre = dict(conf.get("feature_preprocessing") or {})
    bad = sorted(set(pre) - set(fc["preprocessing"]))
    if bad:
        raise ValueError(
            f"unknown feature preprocessing option(s) {bad}; expected {sorted(fc['preprocessing'])}"
        )
    base = copy.deepcopy(fc)
    fc["model"].update(model)
    fc["preprocessing"].update(pre)
    if model or pre:
        fc["output"] = features_stage.output_name(fc)
        # Settings the name does not spell out (a model file, SIFT thresholds) get a hash, so
        # two configurations never share a features folder.
        named = {"max_features", "upright", "max_side", "name"}
        other = {
            f"{part}.{k}": v
            for part in ("model", "preprocessing")
            for k, v in fc[part].items()
            if k not in named and base[part].get(k) != v
        }
        if other:
            fc["output"] += f"-{config_hash(other, 6)}"
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
    fc = feature_conf(conf)
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
    fc = feature_conf(conf)
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
    train_features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    training_set: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Train the codebook on ``train_features`` (one file or several pooled); returns
    ``codebook.npy``."""
    fc = feature_conf(conf)
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
    *,
    kernel: str | None = None,
) -> AggregatedBatch:
    """Aggregate the images ``names`` of a features file, ``batch_images`` at a time.

    ``kernel`` overrides ``conf["kernel"]`` (queries use the single-image kernel).
    """
    kern = kernel or conf["kernel"]
    step = int(conf.get("batch_images", 512))
    parts = []
    for a in tqdm(
        range(0, len(names), step),
        desc=f"aggregate {kern}",
        unit="batch",
        disable=len(names) <= step,
    ):
        descs = features_stage.read_descriptors(features, names[a : a + step])
        parts.append(
            aggregate_many(descs, codebook, kern, num_assignments=int(conf["num_assignments"]))
        )
    if not parts:
        return aggregate_many([], codebook, kern)
    return AggregatedBatch.concatenate(parts)


# ---------------------------------------------------------------------------- regions
def region_conf(conf: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resolved regions conf of a run (preset + threshold override), or None.

    The ``output`` name gets the threshold and, for a detector's boxes file, a hash of its path,
    so two boxes files or thresholds never share a regions CSV.
    """
    reg = conf.get("regions")
    if reg is None:
        return None
    rc = copy.deepcopy(regions_stage.confs[reg] if isinstance(reg, str) else dict(reg))
    if "source" not in rc or "output" not in rc:
        raise ValueError(f"regions conf needs 'source' and 'output' keys, got {sorted(rc)}")
    thr = conf.get("region_threshold")
    if thr is not None:
        if rc["source"] != "detector":
            raise ValueError(f"region_threshold applies to detector regions, not {rc['source']!r}")
        rc["score_threshold"] = float(thr)
        rc["output"] = f"regions-d2r-{float(thr):g}"
    boxes = conf.get("region_boxes")
    if boxes is not None and rc["source"] in ("detector", "gt"):
        tag = config_hash({"boxes": os.path.abspath(os.fspath(boxes))}, 6)
        rc["output"] = f"{rc['output']}-{Path(boxes).stem}{tag}"
    return rc


def build_regions(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path | None:
    """Write the regions CSV of the database (``OUT/regions/<dataset>/<output>.csv``) or None."""
    rc = region_conf(conf)
    if rc is None:
        return None
    return regions_stage.main(
        rc,
        dataset.root,
        Path(out_dir) / "regions" / dataset.name,
        boxes=conf.get("region_boxes"),
        overwrite=overwrite,
    )


def _image_sizes(db_features: str | os.PathLike[str], names: Sequence[str]) -> dict[str, Any]:
    """``{name: (width, height)}`` from the features file (None for unreadable images)."""
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(db_features, "r") as f:
        for n in names:
            if n not in f:
                raise ValueError(f"{db_features}: no features for image {n!r}")
            size = f[n].attrs.get("image_size")
            out[n] = None if size is None else (int(size[0]), int(size[1]))
    return out


def region_crop_items(
    dataset: RevisitedDataset,
    regions: Mapping[str, Sequence[Any]],
    db_features: str | os.PathLike[str],
    names: Sequence[str] | None = None,
) -> list[features_stage.ImageItem]:
    """The crops to re-extract for regional features: region ``j >= 1`` of every image.

    Args:
        dataset: the database (image paths).
        regions: ``{name: [Box, ...]}`` (region 0, the whole image, first).
        db_features: the whole-image features ``.h5`` of ``names`` (their ``image_size``).
        names: the images (default: the whole database, in order).

    Returns:
        one item ``<name>/region_<j>`` per non-empty crop, cropped to the pixel rectangle
        ``(x0, y0, x1, y1)`` of :meth:`gldboxes.boxes.Box.to_pixels`, image by image; images
        that could not be read (no ``image_size``) get none.
    """
    names = list(dataset.imlist if names is None else names)
    sizes = _image_sizes(db_features, names)
    items = []
    for name in names:
        size = sizes[name]
        boxes = regions.get(name, [])
        if size is None:
            continue  # unreadable image: its regions stay empty
        for j, box in enumerate(boxes[1:], start=1):
            x0, y0, x1, y1 = box.to_pixels(*size)
            if x1 <= x0 or y1 <= y0:
                continue
            items.append(
                features_stage.ImageItem(
                    f"{name}/region_{j}", dataset.image_path(name), (x0, y0, x1, y1)
                )
            )
    return items


def extract_regions(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    regions_csv: str | os.PathLike[str],
    db_features: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Re-extract features on every region crop ``j >= 1`` (the paper's regional features).

    Crops are ``[floor(xmin W), floor(ymin H), ceil(xmax W), ceil(ymax H)]`` of the original
    image (``W, H`` from the whole-image features file); keypoints are stored in whole-image
    pixels. Keys ``<id>/region_<j>``; the time spent is written to ``<file>.timing.json`` when
    the extraction runs.

    Returns:
        the ``.h5`` path ``OUT/features/<features>/<dataset>-db-<regions stem>.h5``.
    """
    fc = feature_conf(conf)
    out = (
        Path(out_dir) / "features" / fc["output"] / f"{dataset.name}-db-{Path(regions_csv).stem}.h5"
    )
    regions = regions_stage.read_regions_csv(Path(regions_csv))
    items = region_crop_items(dataset, regions, db_features)
    existed = out.exists() and not overwrite
    t0 = time.perf_counter()
    features_stage.main(fc, items, out, overwrite=overwrite)
    if not existed or not out.with_suffix(".timing.json").exists():
        write_json(
            out.with_suffix(".timing.json"),
            {
                "format_version": 1,
                "seconds": time.perf_counter() - t0,
                "crops": len(items),
                "resumed": existed,
            },
        )
    return out


def regional_descriptor_lists(
    conf: Mapping[str, Any],
    names: Sequence[str],
    db_features: str | os.PathLike[str],
    regions: Mapping[str, Sequence[Any]],
    regions_features: str | os.PathLike[str] | None = None,
) -> list[list[np.ndarray]]:
    """Per image, its per-region descriptor arrays (region 0 = the whole image).

    Args:
        conf: the run's conf (``region_features`` picks the mode).
        names: database image names.
        db_features: whole-image features ``.h5``.
        regions: ``{name: [Box, ...]}`` (region 0 first); images without an entry have one
            region.
        regions_features: ``reextract`` mode: the ``.h5`` of :func:`extract_regions`.

    Returns:
        ``len(names)`` lists of float32 (N_ij, D) arrays.
    """
    import h5py

    mode = conf.get("region_features", "assign")
    if mode == "reextract" and regions_features is None:
        raise ValueError("region_features='reextract' needs the regional features file")
    out: list[list[np.ndarray]] = []
    rf = h5py.File(regions_features, "r") if mode == "reextract" and regions_features else None
    try:
        with h5py.File(db_features, "r") as f:
            for n in names:
                if n not in f:
                    raise ValueError(f"{db_features}: no features for image {n!r}")
                g = f[n]
                desc = np.asarray(g["descriptors"][()], np.float32)
                boxes = list(regions.get(n, [])) or [regions_stage.WHOLE_IMAGE]
                size = g.attrs.get("image_size")
                empty = desc[:0]
                if size is None:
                    out.append([desc] + [empty] * (len(boxes) - 1))
                elif rf is None:
                    kp = np.asarray(g["keypoints"][()], np.float32)
                    out.append(
                        regions_stage.regional_descriptors(
                            kp, desc, boxes, int(size[0]), int(size[1])
                        )
                    )
                else:
                    regs = [desc]
                    for j in range(1, len(boxes)):
                        key = f"{n}/region_{j}"
                        regs.append(
                            np.asarray(rf[key]["descriptors"][()], np.float32)
                            if key in rf
                            else empty
                        )
                    out.append(regs)
    finally:
        if rf is not None:
            rf.close()
    return out


def aggregate_database(
    conf: Mapping[str, Any],
    names: Sequence[str],
    db_features: str | os.PathLike[str],
    codebook: np.ndarray,
    *,
    regions: Mapping[str, Sequence[Any]] | None = None,
    regions_features: str | os.PathLike[str] | None = None,
) -> tuple[AggregatedBatch, np.ndarray | None]:
    """Aggregate the database: one entry per image, or per region for regional search.

    Returns:
        ``(batch, item_image)``: ``item_image`` int64 (n_items,) for regional search, else None.
    """
    if regions is None:
        return aggregate_features(conf, db_features, names, codebook), None
    kern = conf["kernel"]
    ma = int(conf["num_assignments"])
    step = int(conf.get("batch_images", 512))
    parts, owners = [], []
    for a in tqdm(
        range(0, len(names), step),
        desc=f"aggregate regions {kern}",
        unit="batch",
        disable=len(names) <= step,
    ):
        regs = regional_descriptor_lists(
            conf, names[a : a + step], db_features, regions, regions_features
        )
        if conf.get("regional_search"):
            flat = [r for rr in regs for r in rr]
            owners.append(np.repeat(np.arange(a, a + len(regs)), [len(rr) for rr in regs]))
            parts.append(aggregate_many(flat, codebook, kern, num_assignments=ma))
        elif kern in REGIONAL_KERNELS:
            parts.append(
                aggregate_many(
                    [rr[0] for rr in regs], codebook, kern, regions=regs, num_assignments=ma
                )
            )
        else:
            raise ValueError(
                f"regions given with the single-image kernel {kern!r} and no regional_search: "
                f"use a regional kernel ({sorted(REGIONAL_KERNELS)}) or regional_search"
            )
    if not parts:
        return aggregate_many([], codebook, kern), None
    batch = AggregatedBatch.concatenate(parts)
    item_image = np.concatenate(owners).astype(np.int64) if owners else None
    return batch, item_image


def region_norm_floor(conf: Mapping[str, Any]) -> float | None:
    """The normalisation floor of a run's regional-search index (None without regional search).

    Args:
        conf: a run conf; ``region_norm_floor`` None means the library default.
    """
    from retrieval.index.inverted_file import REGION_NORM_FLOOR

    if not conf.get("regional_search"):
        return None
    rho = conf.get("region_norm_floor")
    return float(REGION_NORM_FLOOR if rho is None else rho)


def run_name(conf: Mapping[str, Any], training_set: str, dataset: str) -> str:
    """The config-named folder of a run's index and results.

    Args:
        conf: a resolved run conf; training_set: the codebook's training-set tag
            (:func:`codebook_tag`); dataset: the database's name.

    Returns:
        ``<method>-k<K>-<features>[-ma<m>][-<hash of alpha/tau/normalize>][-<regions>-<ra|rx>]
        -<training set>-<dataset>``, ``method`` being the kernel or ``d2r_<pooling>-<kernel>``
        for regional search, e.g.
        ``d2r_max-asmk_star-k128-rootsift-n1000-gt-rx-images-0a1b2c3d-synth``.
    """
    fc = feature_conf(conf)
    ma = f"-ma{conf['num_assignments']}" if int(conf["num_assignments"]) != 1 else ""
    extra = {k: conf[k] for k in ("alpha", "tau", "normalize") if conf[k] is not None}
    tag = f"-{config_hash(extra, 6)}" if extra else ""
    method = conf["kernel"]
    rc = region_conf(conf)
    if conf.get("regional_search"):
        method = f"d2r_{conf['regional_search']}-{method}"
    if rc is not None:
        mode = "ra" if conf.get("region_features", "assign") == "assign" else "rx"
        tag += f"-{rc['output'].removeprefix('regions-')}-{mode}"
    return f"{method}-k{conf['codebook']['size']}-{fc['output']}{ma}{tag}-{training_set}-{dataset}"


def build_index(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    db_features: str | os.PathLike[str],
    codebook_path: str | os.PathLike[str],
    training_set: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    regions_csv: str | os.PathLike[str] | None = None,
    regions_features: str | os.PathLike[str] | None = None,
) -> Path:
    """Aggregate the database and write its inverted file; returns the index folder.

    With ``regions_csv`` (from :func:`build_regions`) a regional kernel aggregates every
    image's regions into one entry, or ``regional_search`` indexes each region as an entry
    (``regions_features``: the crops' features in ``reextract`` mode). The header's meta holds
    ``aggregate_seconds`` (time to build the entries, regional features included).
    """
    path = Path(out_dir) / "index" / run_name(conf, training_set, dataset.name)
    if conf.get("regions") is not None and regions_csv is None:
        raise ValueError(f"{path.name}: the conf has regions but no regions CSV was given")
    if conf.get("region_features") == "reextract" and regions_csv and regions_features is None:
        raise ValueError(f"{path.name}: reextract mode needs the regional features file")
    # The hash covers the inputs' identity and age, so a retrained codebook rebuilds the index.
    ident: dict[str, Any] = {
        # search/verification options do not change the index
        "conf": {k: v for k, v in conf.items() if k not in ("verification", "top_k")},
        "codebook": os.fspath(codebook_path),
        "codebook_mtime": os.stat(codebook_path).st_mtime_ns,
        "features_mtime": os.stat(db_features).st_mtime_ns,
    }
    if regions_csv is not None:
        ident["regions_mtime"] = os.stat(regions_csv).st_mtime_ns
    if conf.get("regional_search"):  # the resolved floor: a changed default rebuilds
        ident["region_norm_floor"] = region_norm_floor(conf)
    if regions_features is not None and conf.get("region_features") == "reextract":
        ident["regions_features_mtime"] = os.stat(regions_features).st_mtime_ns
    chash = config_hash(ident)
    if (path / "header.json").exists() and not overwrite:
        meta = read_json(path / "header.json").get("meta", {})
        if meta.get("config_hash") == chash:
            logger.info("index exists, skipping: %s", path)
            return path
    cb = codebook_stage.load_codebook(codebook_path)
    regions = None if regions_csv is None else regions_stage.read_regions_csv(Path(regions_csv))
    t0 = time.perf_counter()
    batch, item_image = aggregate_database(
        conf,
        dataset.imlist,
        db_features,
        cb,
        regions=regions,
        regions_features=regions_features,
    )
    seconds = time.perf_counter() - t0
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
            "regions": None if regions_csv is None else os.fspath(regions_csv),
            "region_features": conf.get("region_features") if regions_csv else None,
            "aggregate_seconds": seconds,
        },
        item_image=item_image,
        pooling=conf.get("regional_search") if item_image is not None else None,
        region_norm_floor=region_norm_floor(conf) if item_image is not None else None,
    )
    ivf.save(path)
    write_config(path, conf)
    st = ivf.stats()
    logger.info(
        "index %s: %d images, %d items, %d postings, %.0f bytes/image",
        path.name,
        st["images"],
        st["items"],
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
    distractors: str | os.PathLike[str] | None = None,
) -> Path:
    """Rank the database for every query; writes ``ranks.npy`` and ``scores.npy``.

    Queries are aggregated with the single-image kernel of the index's kernel
    (:data:`retrieval.index.aggregation.QUERY_KERNEL`: one region, asymmetric regional search).
    Both arrays are (n_ranked, n_queries), best first. With ``distractors`` (a distractor
    index, :func:`retrieval.evaluation.distractors.distractor_index`) its images rank too, under ids
    ``n_db ..``, into ``results/<index name>+<count>-<tag>/``.
    """
    index_path = Path(index_path)
    folder = Path(out_dir) / "results" / index_path.name
    ivf = InvertedFile.load(index_path)
    key: dict[str, Any] = {
        "index_config_hash": ivf.meta.get("config_hash"),
        "queries_mtime": os.stat(query_features).st_mtime_ns,
        "top_k": conf.get("top_k"),
    }
    index: Any = ivf
    if distractors is not None:
        from retrieval.evaluation.distractors import open_distractors, with_distractors

        dis = open_distractors(distractors)
        folder = folder.with_name(f"{folder.name}{dis.label}-{dis.tag}")
        key["distractors"] = {"index": os.fspath(dis.folder), "md5": dis.header_md5}
        index = with_distractors(ivf, dis.folder)
    ranks_path = folder / "ranks.npy"
    done = folder / "search.json"
    if ranks_path.exists() and done.exists() and read_json(done) == key and not overwrite:
        logger.info("ranks exist, skipping: %s", ranks_path)
        return ranks_path
    cb = codebook_stage.load_codebook(codebook_path)
    q = aggregate_features(
        conf, query_features, dataset.qimlist, cb, kernel=QUERY_KERNEL[conf["kernel"]]
    )
    ids, scores = index.search(q, conf.get("top_k"))
    with atomic_path(folder / "scores.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(scores.T), allow_pickle=False)
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
    n_distractors: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Easy/Medium/Hard mAP and mP@k of a ranking; writes ``metrics.json`` beside it.

    ``n_distractors``: ids ``n_db .. n_db + n_distractors - 1`` are distractors (negatives for
    every query); ``metrics.json`` then names the dataset ``<name>+<count>`` (``roxford5k+1m``).
    """
    ranks_path = Path(ranks_path)
    ranks = np.load(ranks_path, allow_pickle=False)
    res = evaluate_protocols(ranks, dataset.gnd, kappas, n_db=dataset.n_db + n_distractors)
    metrics = {p: r.as_dict() for p, r in res.items()}
    body: dict[str, Any] = {"format_version": 1, "dataset": dataset.name, "metrics": metrics}
    if n_distractors:
        from retrieval.evaluation.distractors import count_label

        body["dataset"] = f"{dataset.name}+{count_label(n_distractors)}"
        body["distractors"] = n_distractors
    out = write_json(ranks_path.parent / "metrics.json", body)
    return out, {"results": res, "metrics": metrics}


def verification_conf(conf: Mapping[str, Any]) -> tuple[Any, int, int | None]:
    """The spatial verification settings of a run: the features preset's ``verification``
    defaults (RootSIFT: ratio test + mutual NN; DELF: 1-NN below 0.8), updated with the run's
    ``verification`` dict (keys set to None keep the preset's value).

    Args:
        conf: a resolved run conf whose ``verification`` is not None.

    Returns:
        ``(VerificationConf, top_n, num_workers)``.
    """
    from retrieval.verification import VerificationConf

    ver = {k: v for k, v in dict(conf.get("verification") or {}).items() if v is not None}
    top_n = int(ver.pop("top_n", 100))
    workers = ver.pop("num_workers", None)
    if top_n < 1:
        raise ValueError(f"verification top_n must be >= 1, got {top_n}")
    preset = dict(feature_conf(resolve_conf(conf)).get("verification") or {})
    return VerificationConf(**{**preset, **ver}), top_n, None if workers is None else int(workers)


def verify(
    conf: Mapping[str, Any],
    dataset: RevisitedDataset,
    ranks_path: str | os.PathLike[str],
    query_features: str | os.PathLike[str],
    db_features: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Spatial verification of a ranking: every protocol from one pass, then its metrics.

    Per query and protocol the first ``top_n`` non-junk images are verified against the query
    (whole-image features, read once) and re-ranked by (inliers, first-stage score); each
    protocol's ranking is evaluated under that protocol. Writes ``ranks_<protocol>.npy`` and
    ``metrics.json`` (with ``seconds_per_query``: verification wall time per query, feature
    reading excluded, and ``read_seconds``) into ``<results>-gv<top_n>-<hash>/``.

    Returns:
        ``(metrics.json path, {"results": {protocol: ProtocolResult}, "seconds_per_query": s,
        "pairs": n})``.
    """
    from dataclasses import asdict

    from retrieval.evaluation.evaluate import Protocol, evaluate_protocols
    from retrieval.verification import read_features_h5, rerank_revisited

    vconf, top_n, workers = verification_conf(conf)
    ranks_path = Path(ranks_path)
    folder = ranks_path.parent.parent / (
        f"{ranks_path.parent.name}-gv{top_n}-{config_hash(asdict(vconf), 6)}"
    )
    key = {
        "ranks_mtime": os.stat(ranks_path).st_mtime_ns,
        "queries_mtime": os.stat(query_features).st_mtime_ns,
        "db_mtime": os.stat(db_features).st_mtime_ns,
        "verification": asdict(vconf),
        "top_n": top_n,
    }
    protocols: tuple[Protocol, ...] = ("easy", "medium", "hard")
    mpath = folder / "metrics.json"
    done = folder / "verify.json"
    if mpath.exists() and done.exists() and read_json(done) == key and not overwrite:
        logger.info("verification exists, skipping: %s", folder)
        m = read_json(mpath)
        res = {
            p: evaluate_protocols(
                np.load(folder / f"ranks_{p}.npy"), dataset.gnd, n_db=dataset.n_db, protocols=[p]
            )[p]
            for p in protocols
        }
        return mpath, {
            "results": res,
            "seconds_per_query": m["seconds_per_query"],
            "pairs": m["pairs"],
        }
    ranks = np.load(ranks_path, allow_pickle=False)
    spath = ranks_path.parent / "scores.npy"
    scores = np.load(spath, allow_pickle=False) if spath.exists() else None
    if scores is not None and scores.shape != ranks.shape:
        scores = None
    # Database images any protocol's head can reach: the first top_n + |junk| rows, junk being
    # junk + hard (Easy) or junk + easy (Hard) depending on the protocol.
    needed: set[int] = set()
    for q, g in enumerate(dataset.gnd):
        extra = max(len(g.get("easy", [])), len(g.get("hard", [])))
        depth = top_n + len(g.get("junk", [])) + extra
        needed.update(int(i) for i in ranks[:depth, q])
    t0 = time.perf_counter()
    max_side = int(feature_conf(resolve_conf(conf))["preprocessing"].get("max_side", 1024))
    qf = read_features_h5(query_features, dataset.qimlist, max_side=max_side)
    names = [dataset.imlist[i] for i in sorted(needed)]
    by_name = read_features_h5(db_features, names, max_side=max_side)
    dbf = {i: by_name[dataset.imlist[i]] for i in sorted(needed)}
    read_s = time.perf_counter() - t0
    gv = rerank_revisited(
        ranks,
        dataset.gnd,
        [qf[n] for n in dataset.qimlist],
        dbf,
        scores=scores,
        top_n=top_n,
        protocols=protocols,
        conf=vconf,
        num_workers=workers,
    )
    res = {}
    metrics = {}
    for p in protocols:
        with atomic_path(folder / f"ranks_{p}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(gv.ranks[p]), allow_pickle=False)
        res[p] = evaluate_protocols(gv.ranks[p], dataset.gnd, n_db=dataset.n_db, protocols=[p])[p]
        metrics[p] = res[p].as_dict()
    write_json(
        mpath,
        {
            "format_version": 1,
            "dataset": dataset.name,
            "metrics": metrics,
            "seconds_per_query": gv.seconds_per_query,
            "read_seconds": read_s,
            "pairs": gv.pairs,
            "top_n": top_n,
        },
    )
    write_config(folder, {**conf, "verification_resolved": {**asdict(vconf), "top_n": top_n}})
    write_json(done, key)
    return mpath, {"results": res, "seconds_per_query": gv.seconds_per_query, "pairs": gv.pairs}


@dataclass
class RunResult:
    """Paths written by :func:`run` and the metrics.

    ``verification`` (when the conf asks for it) holds ``results`` per protocol after spatial
    verification, ``seconds_per_query``, ``pairs`` and ``metrics_path``.
    """

    features: tuple[Path, Path | None]
    codebook: Path
    index: Path
    ranks: Path
    metrics_path: Path
    results: dict[str, Any] = field(default_factory=dict)
    index_stats: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    regions: Path | None = None
    label: str | None = None  # the table's row name (default: the index folder's name)
    distractors: Path | None = None  # the distractor index searched with the dataset's

    def table(self, name: str | None = None) -> str:
        name = name or self.label or self.index.name
        rows = {name: self.results}
        if self.verification:
            rows[f"{name} +GV"] = self.verification["results"]
        return format_table(rows)


def run(
    dataset_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    conf: Mapping[str, Any] | None = None,
    *,
    codebook_images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    codebook_dataset: str | os.PathLike[str] | None = None,
    codebook_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    distractors: str | os.PathLike[str] | None = None,
    distractor_shard_size: int = 256,
) -> RunResult:
    """One shot: features, codebook, index, ranks and metrics for a Revisited-style folder.

    Args:
        dataset_dir: a folder with ``gnd_<name>.pkl`` and ``jpg/`` (roxford5k, rparis6k, the
            synthetic world's ``retrieval/``).
        out_dir: where the config-named folders go.
        conf: options (see :data:`default_conf`).
        codebook_images: train the codebook on this image folder (another dataset), or on
            several folders pooled.
        codebook_dataset: or on the database images of another Revisited folder.
        codebook_path: or use an existing ``codebook.npy``.
        distractors: add these distractors to the database (an image folder, e.g. the
            extracted revisitop1m, or a distractor index built with the same settings; see
            :func:`retrieval.evaluation.distractors.distractor_index`, built here shard by shard
            with
            ``distractor_shard_size`` images a part); the table row ends ``+<count>``.
    """
    rc = resolve_conf(conf)
    if distractors is not None:
        from retrieval.evaluation.distractors import check_run_conf

        check_run_conf(rc)  # before any work
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
        train_h5: Path | list[Path]
        if codebook_images is not None:
            folders = (
                [codebook_images]
                if isinstance(codebook_images, str | os.PathLike)
                else list(codebook_images)
            )
            if not folders:
                raise ValueError("codebook_images: no folder given")
            done = [extract_folder(rc, d, out_dir, overwrite=overwrite) for d in folders]
            train_h5 = [p for p, _ in done]
            training_set = done[0][1]
            if len(done) > 1:
                training_set += f"+{len(done) - 1}-{config_hash({'sets': [n for _, n in done]}, 6)}"
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
    regions_csv = build_regions(rc, ds, out_dir, overwrite=overwrite)
    regions_h5 = None
    if regions_csv is not None and rc["region_features"] == "reextract":
        regions_h5 = extract_regions(rc, ds, regions_csv, feats[0], out_dir, overwrite=overwrite)
    idx = build_index(
        rc,
        ds,
        feats[0],
        cb_path,
        training_set,
        out_dir,
        overwrite=overwrite,
        regions_csv=regions_csv,
        regions_features=regions_h5,
    )
    if feats[1] is None:
        raise ValueError(f"{ds.root}: query features were not extracted")
    dis_index, n_dis, label = None, 0, None
    if distractors is not None:
        from retrieval.evaluation.distractors import distractor_index, open_distractors

        dis_index = distractor_index(
            rc,
            distractors,
            cb_path,
            training_set,
            out_dir,
            shard_size=distractor_shard_size,
            overwrite=overwrite,
        )
        dis = open_distractors(dis_index)
        n_dis, label = dis.n_images, f"{idx.name}{dis.label}"
    ranks = search(
        rc, ds, feats[1], idx, cb_path, out_dir, overwrite=overwrite, distractors=dis_index
    )
    mpath, ev = evaluate(ds, ranks, n_distractors=n_dis)
    stats = read_json(idx / "header.json").get("stats", {})
    ver: dict[str, Any] = {}
    if rc["verification"] is not None:
        vpath, ver = verify(rc, ds, ranks, feats[1], feats[0], overwrite=overwrite)
        ver["metrics_path"] = vpath
    return RunResult(
        features=feats,
        codebook=cb_path,
        index=idx,
        ranks=ranks,
        metrics_path=mpath,
        results=ev["results"],
        index_stats=stats,
        verification=ver,
        regions=regions_csv,
        label=label,
        distractors=dis_index,
    )
