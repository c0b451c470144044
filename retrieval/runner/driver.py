"""The retrieval stages that run in one process: one file in, one file out.

:func:`extract_folder` (features of an image folder into one HDF5, e.g. a codebook training
set or your own photos), :func:`build_codebook` (seeded k-means into
``OUT/codebooks/<features>-k<K>-s<seed>-<training set>/``), :func:`build_regions` (the regions CSV
``OUT/regions/<dataset>/<output>.csv``), :func:`region_crop_items` (the crops the paper
re-extracts), :func:`aggregate_database` (per-image or per-region entries of a features file,
used by the runner's index parts and by photo indexes) and :func:`evaluate` (Revisited metrics
of a ranking). The per-image stages that run shard by shard on the executor are in
:mod:`retrieval.runner.shards`; :func:`retrieval.runner.run.run` chains them all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import config_hash, write_json
from gldboxes.progress import tqdm
from retrieval import features as features_stage
from retrieval import regions as regions_stage
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.evaluate import evaluate_protocols
from retrieval.features import codebook as codebook_stage
from retrieval.index.aggregation import REGIONAL_KERNELS, AggregatedBatch, aggregate_many
from retrieval.index.assignment import WordIndex
from retrieval.index.inverted_file import InvertedFile
from retrieval.runner.conf import IMAGE_SUFFIXES, feature_conf, region_conf

__all__ = [
    "aggregate_database",
    "aggregate_features",
    "build_codebook",
    "build_regions",
    "evaluate",
    "extract_folder",
    "folder_items",
    "image_sizes",
    "index_part",
    "region_crop_items",
    "regional_descriptor_lists",
]

logger = logging.getLogger("retrieval.runner.driver")


def folder_items(
    image_dir: str | os.PathLike[str], *, empty_ok: bool = False
) -> tuple[str, list[features_stage.ImageItem]]:
    """Every image under a folder (recursive, sorted) and the folder's set name.

    Args:
        image_dir: any folder of photos (:data:`retrieval.runner.conf.IMAGE_SUFFIXES`).
        empty_ok: return an empty list instead of raising for a folder without images.

    Returns:
        ``(name, items)``: ``name`` is ``<folder name>-<hash of its absolute path>`` (the
        training-set tag of a codebook); item ids are paths relative to the folder with ``/``
        written ``__``.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and not empty_ok:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    name = f"{root.name}-{config_hash({'dir': os.path.abspath(root)}, 8)}"
    items = [
        features_stage.ImageItem(p.relative_to(root).as_posix().replace("/", "__"), p)
        for p in files
    ]
    return name, items


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
    name, items = folder_items(image_dir)
    fc = feature_conf(conf)
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


def aggregate_features(
    conf: Mapping[str, Any],
    features: str | os.PathLike[str],
    names: Sequence[str],
    codebook: np.ndarray,
    *,
    kernel: str | None = None,
    assignment: str | WordIndex | None = None,
) -> AggregatedBatch:
    """Aggregate the images ``names`` of a features file, ``batch_images`` at a time.

    ``kernel`` overrides ``conf["kernel"]`` (queries use the single-image kernel);
    ``assignment`` overrides ``conf["assignment"]`` (e.g. with the codebook's cached
    :class:`~retrieval.index.assignment.WordIndex`).
    """
    kern = kernel or conf["kernel"]
    how = assignment or conf.get("assignment", "exact")
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
            aggregate_many(
                descs,
                codebook,
                kern,
                num_assignments=int(conf["num_assignments"]),
                assignment=how,
            )
        )
    if not parts:
        return aggregate_many([], codebook, kern)
    return AggregatedBatch.concatenate(parts)


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


def image_sizes(db_features: str | os.PathLike[str], names: Sequence[str]) -> dict[str, Any]:
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
    sizes = image_sizes(db_features, names)
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
    assignment: str | WordIndex | None = None,
) -> tuple[AggregatedBatch, np.ndarray | None]:
    """Aggregate the database: one entry per image, or per region for regional search.

    ``assignment``: see :func:`aggregate_features`.

    Returns:
        ``(batch, item_image)``: ``item_image`` int64 (n_items,) for regional search, else None.
    """
    if regions is None:
        return aggregate_features(conf, db_features, names, codebook, assignment=assignment), None
    how = assignment or conf.get("assignment", "exact")
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
            parts.append(aggregate_many(flat, codebook, kern, num_assignments=ma, assignment=how))
        elif kern in REGIONAL_KERNELS:
            parts.append(
                aggregate_many(
                    [rr[0] for rr in regs],
                    codebook,
                    kern,
                    regions=regs,
                    num_assignments=ma,
                    assignment=how,
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


def index_part(
    conf: Mapping[str, Any],
    names: Sequence[str],
    db_features: str | os.PathLike[str],
    codebook: np.ndarray,
    *,
    meta: Mapping[str, Any],
    regions: Mapping[str, Sequence[Any]] | None = None,
    regions_features: str | os.PathLike[str] | None = None,
    assignment: str | WordIndex | None = None,
    region_norm_floor: float | None = None,
) -> InvertedFile:
    """The inverted file of some database images (an index part of a run or of a photo index):
    :func:`aggregate_database`, then ``InvertedFile.build`` with the conf's kernel settings.

    Args:
        conf: a run conf (kernel, alpha, tau, normalize, regional_search, ...).
        names, db_features, codebook, regions, regions_features, assignment: as
            :func:`aggregate_database`.
        meta: JSON-able metadata stored with the part (its first image id, names, ...).
        region_norm_floor: regional search's rho (used only when the part is regional).
    """
    batch, item_image = aggregate_database(
        conf,
        names,
        db_features,
        codebook,
        regions=regions,
        regions_features=regions_features,
        assignment=assignment,
    )
    regional = item_image is not None
    return InvertedFile.build(
        batch,
        codebook.shape[0],
        conf["kernel"],
        alpha=conf["alpha"],
        tau=conf["tau"],
        normalize=conf["normalize"],
        meta=dict(meta),
        item_image=item_image,
        pooling=conf.get("regional_search") if regional else None,
        region_norm_floor=region_norm_floor if regional else None,
    )


def evaluate(
    dataset: RevisitedDataset,
    ranks_path: str | os.PathLike[str],
    *,
    kappas: Sequence[int] = (1, 5, 10),
    n_distractors: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Easy/Medium/Hard mAP and mP@k of a ranking; writes ``metrics.json`` beside it.

    ``n_distractors``: ids ``n_db .. n_db + n_distractors - 1`` are distractors (negatives for
    every query); ``metrics.json`` then names the dataset ``<name>+<count>`` (``roxford5k+1m``).
    ``extra``: more top-level keys for ``metrics.json`` (a method, a config hash ...).
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
    body.update(extra or {})
    out = write_json(ranks_path.parent / "metrics.json", body)
    return out, {"results": res, "metrics": metrics}
