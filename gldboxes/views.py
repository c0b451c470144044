"""FiftyOne datasets for looking at boxes, detector predictions and retrieval results.

Two builders here, each making a persistent ``fo.Dataset`` from the files the pipeline writes
(the third, of retrieval results, is :func:`retrieval.evaluation.view.build_retrieval_dataset`;
all three build on the shared machinery of :mod:`gldboxes.views_base`):

* :func:`build_box_dataset` — the Google Landmark Boxes ground truth: images, boxes, split,
  landmark id, the "no prominent landmark" flag and annotation metadata (rater, agreement,
  whether a pre-annotation was kept).
* :func:`build_detection_dataset` — ground truth beside detector predictions (with confidence),
  evaluated by FiftyOne's COCO-style ``evaluate_detections`` at IoU 0.5 (the paper's AP@0.5)
  with an IoU sweep 0.50:0.95, leaving per-sample TP/FP/FN counts and per-box ``tp/fp/fn`` tags.

Every dataset carries image metadata (``metadata.width``, ``height``, ``size_bytes``,
``mime_type``, ``num_channels``), read from each distinct file's header once
(:func:`gldboxes.views_base.image_metadata`).

Boxes travel as Google Landmark Boxes CSVs (``ymin xmin ymax xmax`` in [0, 1], see
:mod:`gldboxes.boxes`); FiftyOne wants relative ``[x, y, w, h]``
(:func:`gldboxes.views_base.boxes_to_xywh`).

A dataset remembers a fingerprint of its sources and options in ``dataset.info["gldboxes"]``:
building again with the same inputs returns the stored dataset untouched (hloc's "skip when
done"); changed inputs or ``overwrite=True`` rebuild it under a temporary name and swap it in,
so a failed build never leaves a half-written dataset under the real name.

FiftyOne is imported lazily (``import fiftyone`` takes ~5 s); configure the database first
(:func:`gldboxes.fodb.database`); the App that shows them is :mod:`gldboxes.views_app`. This
module never imports ``retrieval``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gldboxes.boxes import read_boxes_csv
from gldboxes.views_base import (
    ANNOTATION_FIELDS,
    LANDMARK_LABEL,
    Missing,
    finish_view,
    image_metadata,
    new_building_dataset,
    read_annotation_metadata,
    read_id_csv,
    resolve_image_paths,
    slug,
    to_detections,
    up_to_date_dataset,
    view_fingerprint,
)

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

__all__ = [
    "COCO_IOU_SWEEP",
    "DEFAULT_MIN_SCORE",
    "build_box_dataset",
    "build_detection_dataset",
    "slug",  # defined in gldboxes.views_base; gldboxes/cli/pipeline.py calls views.slug
]

logger = logging.getLogger("gldboxes.views")

# COCO's IoU sweep 0.50:0.05:0.95 (the paper reports AP at 0.5, the first entry).
COCO_IOU_SWEEP: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Detector boxes below this confidence are left out of the detection view by default: at 0 a
# detector keeping its top-20 boxes draws 20 boxes on every image.
DEFAULT_MIN_SCORE = 0.3


# --------------------------------------------------------------------------- box dataset


def build_box_dataset(
    *,
    boxes_csv: str | os.PathLike[str],
    train_csv: str | os.PathLike[str],
    images_root: str | os.PathLike[str] | None = None,
    no_landmark_csv: str | os.PathLike[str] | None = None,
    annotations: str | os.PathLike[str] | None = None,
    splits_csv: str | os.PathLike[str] | None = None,
    split: str = "train",
    name: str | None = None,
    missing: Missing = "error",
    overwrite: bool = False,
) -> fo.Dataset:
    """The Google Landmark Boxes dataset: one sample per image of ``train_csv``.

    Args:
        boxes_csv: ground truth ``id,box`` (several rows per id allowed).
        train_csv: ``id,url,landmark_id`` (GLD format); ``url`` may be a path relative to
            ``images_root`` (the synthetic world) or an http URL (then the GLD ``a/b/c/<id>.jpg``
            layout under ``images_root`` is used).
        images_root: where images live; default: the folder of ``train_csv``.
        no_landmark_csv: ``id,reason`` of images dropped as "no prominent landmark"; without
            it, an image with no box is flagged.
        annotations: per-image annotation metadata CSV/JSON (:func:`read_annotation_metadata`).
        splits_csv: ``id,split``; images not listed get ``split``.
        split: split name for images without an entry in ``splits_csv``.
        name: dataset name; default ``gldboxes-boxes-<folder>`` after the boxes CSV's folder.
        missing: ``"error"`` (default) or ``"skip"`` images whose file is not found.
        overwrite: rebuild even when the stored dataset is up to date.

    Sample fields: ``gld_id`` (str), ``landmark_id`` (int), ``split`` (str, also a tag),
    ``metadata`` (``fo.ImageMetadata``: width, height, ...),
    ``ground_truth`` (``fo.Detections`` labelled ``landmark``), ``n_boxes`` (int),
    ``no_landmark`` (bool, also tag ``no_landmark``), ``no_landmark_reason`` (str | None),
    ``rater`` (str | None), ``agreement`` (float | None), ``pre_annotation_kept``
    (bool | None) and any extra annotation columns as ``annotation_<column>`` strings.
    """
    import fiftyone as fo

    boxes_csv, train_csv = Path(boxes_csv), Path(train_csv)
    root = Path(images_root) if images_root is not None else train_csv.parent
    if name is None:
        name = (
            f"gldboxes-boxes-{slug(boxes_csv.resolve().parent.parent.name)}-"
            f"{slug(boxes_csv.resolve().parent.name)}"
        )
    files = {
        "boxes_csv": boxes_csv,
        "train_csv": train_csv,
        "no_landmark_csv": no_landmark_csv,
        "annotations": annotations,
        "splits_csv": splits_csv,
    }
    options = {"images_root": str(root.resolve()), "split": split, "missing": missing}
    fp = view_fingerprint("boxes", files, options)
    if not overwrite and (ds := up_to_date_dataset(name, fp)) is not None:
        return ds

    boxes = read_boxes_csv(boxes_csv)
    rows = read_id_csv(train_csv, ("id", "landmark_id"))
    urls = {r["id"]: r.get("url") or "" for r in rows}
    try:
        landmark = {r["id"]: int(r["landmark_id"]) for r in rows}
    except ValueError as exc:
        raise ValueError(f"{train_csv}: landmark_id must be an integer ({exc})") from exc
    ids = list(dict.fromkeys(r["id"] for r in rows))
    unknown = sorted(set(boxes) - set(landmark))
    if unknown:
        raise ValueError(
            f"{boxes_csv}: {len(unknown)} box ids are not in {train_csv} (first: {unknown[:3]})"
        )
    reasons: dict[str, str] | None = None
    if no_landmark_csv is not None:
        reasons = {r["id"]: r.get("reason") or "" for r in read_id_csv(no_landmark_csv)}
        both = sorted(set(reasons) & set(boxes))
        if both:
            logger.warning(
                "%s: %d images have boxes but are listed as no-landmark (first %s)",
                no_landmark_csv,
                len(both),
                both[:3],
            )
    meta = read_annotation_metadata(annotations) if annotations is not None else {}
    splits = (
        {r["id"]: r.get("split") or split for r in read_id_csv(splits_csv, ("id", "split"))}
        if splits_csv is not None
        else {}
    )
    ids, paths = resolve_image_paths(ids, root, urls, missing, str(train_csv))

    extra_cols = sorted({c for m in meta.values() for c in m} - set(ANNOTATION_FIELDS))
    img_meta = image_metadata(paths)
    samples = []
    for i, path in zip(ids, paths, strict=True):
        bs = boxes.get(i, [])
        flagged = (i in reasons) if reasons is not None else not bs
        sp = splits.get(i, split)
        m = meta.get(i, {})
        fields: dict[str, Any] = {
            "gld_id": i,
            "landmark_id": landmark[i],
            "split": sp,
            "ground_truth": to_detections(bs),
            "n_boxes": len(bs),
            "no_landmark": flagged,
            "no_landmark_reason": (reasons or {}).get(i) if flagged else None,
            "rater": m.get("rater"),
            "agreement": m.get("agreement"),
            "pre_annotation_kept": m.get("pre_annotation_kept"),
        }
        for c in extra_cols:
            fields[f"annotation_{c}"] = m.get(c)
        tags = [sp] + (["no_landmark"] if flagged else [])
        samples.append(
            fo.Sample(filepath=str(path), tags=tags, metadata=img_meta[str(path)], **fields)
        )

    ds = new_building_dataset(name)
    try:
        # Declare the optional fields so the schema is the same with or without metadata.
        for fname, ftype in (
            ("no_landmark_reason", fo.StringField),
            ("rater", fo.StringField),
            ("agreement", fo.FloatField),
            ("pre_annotation_kept", fo.BooleanField),
        ):
            ds.add_sample_field(fname, ftype)
        ds.add_samples(samples, progress=False)
        ds.save_view("no_landmark", ds.match_tags("no_landmark"), overwrite=True)
        ds.save_view("with_boxes", ds.match(fo.ViewField("n_boxes") > 0), overwrite=True)
        n_flag = sum(1 for s in samples if s["no_landmark"])
        summary = {
            "n_samples": len(samples),
            "n_boxes": int(sum(s["n_boxes"] for s in samples)),
            "n_no_landmark": n_flag,
            "n_annotated": sum(1 for i in ids if i in meta),
            "splits": {k: int(v) for k, v in ds.count_values("split").items()},
        }
        return finish_view(ds, name, "boxes", fp, {**files, "images_root": root}, summary)
    except BaseException:
        ds.delete()
        raise


# --------------------------------------------------------------------------- detections


def build_detection_dataset(
    *,
    gt_csv: str | os.PathLike[str],
    pred_csv: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    ids_csv: str | os.PathLike[str] | None = None,
    name: str | None = None,
    iou: float = 0.5,
    iou_sweep: Sequence[float] = COCO_IOU_SWEEP,
    min_score: float = DEFAULT_MIN_SCORE,
    missing: Missing = "error",
    overwrite: bool = False,
) -> fo.Dataset:
    """Ground-truth boxes beside detector predictions, evaluated COCO-style.

    Args:
        gt_csv: ground truth ``id,box``.
        pred_csv: detector output ``id,box,score`` (several rows per id).
        images_root: where the images are (see :func:`resolve_image_path`).
        ids_csv: optional CSV with an ``id`` column listing further images (e.g. images with
            neither a ground-truth box nor a detection); the samples are the union of all ids.
        name: dataset name; default ``gldboxes-detections-<predictions file>``.
        iou: IoU threshold of the TP/FP/FN matching (0.5 as in the paper).
        iou_sweep: IoU thresholds of the COCO sweep (``iou`` must be one of them).
        min_score: predictions below this confidence are left out of the dataset and of the
            evaluation (default :data:`DEFAULT_MIN_SCORE` = 0.3, so the view shows the boxes a
            detector is confident about; pass 0 for every box and the detector's full AP).
        missing: ``"error"`` or ``"skip"`` images that are not found.
        overwrite: rebuild even when up to date.

    Sample fields: ``gld_id``, ``metadata`` (``fo.ImageMetadata``), ``ground_truth`` and
    ``predictions`` (``fo.Detections``; predictions carry ``confidence``), and from
    ``evaluate_detections(eval_key="eval")``: ``eval_tp``, ``eval_fp``, ``eval_fn`` (ints per
    sample) and per-box ``eval`` = ``tp|fp|fn`` with ``eval_iou``.
    ``dataset.info["gldboxes"]["summary"]`` holds ``ap`` (AP at ``iou``), ``ap_per_iou`` (over
    the sweep), ``map_sweep`` (their mean, COCO mAP) and the TP/FP/FN totals, with
    ``min_score`` and ``n_pred_below_min_score`` (predictions left out). Saved views:
    ``false_positives``, ``missed``.
    """
    import fiftyone as fo
    from fiftyone import ViewField as F

    gt_csv, pred_csv, root = Path(gt_csv), Path(pred_csv), Path(images_root)
    sweep = [float(t) for t in iou_sweep]
    if not sweep or not any(abs(t - iou) < 1e-9 for t in sweep):
        raise ValueError(f"iou_sweep {sweep} must contain the matching IoU {iou}")
    if not 0.0 < iou < 1.0:
        raise ValueError(f"iou must be in (0, 1), got {iou}")
    if not np.isfinite(min_score):
        raise ValueError(f"min_score must be a finite number, got {min_score}")
    if name is None:
        name = f"gldboxes-detections-{slug(pred_csv.resolve().parent.name)}-{slug(pred_csv.stem)}"
    files = {"gt_csv": gt_csv, "pred_csv": pred_csv, "ids_csv": ids_csv}
    options = {
        "images_root": str(root.resolve()),
        "iou": iou,
        "iou_sweep": sweep,
        "min_score": min_score,
        "missing": missing,
    }
    fp = view_fingerprint("detections", files, options)
    if not overwrite and (ds := up_to_date_dataset(name, fp)) is not None:
        return ds

    gt = read_boxes_csv(gt_csv)
    preds = read_boxes_csv(pred_csv)
    unscored = [i for i, bs in preds.items() if any(b.score is None for b in bs)]
    if unscored:
        raise ValueError(
            f"{pred_csv}: predictions need a score column with a value on every "
            f"row (first id without: {unscored[0]})"
        )
    n_pred_all = sum(len(bs) for bs in preds.values())
    preds = {i: [b for b in bs if (b.score or 0.0) >= min_score] for i, bs in preds.items()}
    extra = [r["id"] for r in read_id_csv(ids_csv)] if ids_csv is not None else []
    ids = sorted(set(gt) | set(preds) | set(extra))
    ids, paths = resolve_image_paths(ids, root, None, missing, str(gt_csv))
    img_meta = image_metadata(paths)

    samples = [
        fo.Sample(
            filepath=str(p),
            metadata=img_meta[str(p)],
            gld_id=i,
            ground_truth=to_detections(gt.get(i, [])),
            predictions=to_detections(preds.get(i, [])),
        )
        for i, p in zip(ids, paths, strict=True)
    ]
    ds = new_building_dataset(name)
    try:
        ds.add_samples(samples, progress=False)
        results = ds.evaluate_detections(
            "predictions",
            gt_field="ground_truth",
            eval_key="eval",
            method="coco",
            iou=iou,
            iou_threshs=sweep,
            compute_mAP=True,
            progress=False,
        )
        # precision: (n_iou, n_classes, 101) with -1 where a class has no ground truth.
        prec = np.asarray(results.precision, dtype=np.float64)
        ci = (
            list(results.classes).index(LANDMARK_LABEL)
            if LANDMARK_LABEL in results.classes
            else None
        )
        ap_per_iou = {
            f"{t:.2f}": (
                float(prec[k, ci].mean()) if ci is not None and prec[k, ci].min() > -1 else None
            )
            for k, t in enumerate(results.iou_threshs)
        }
        k50 = int(np.argmin(np.abs(np.asarray(results.iou_threshs) - iou)))
        tp, fpos, fn = (
            int(v or 0) for v in (ds.sum("eval_tp"), ds.sum("eval_fp"), ds.sum("eval_fn"))
        )
        summary = {
            "n_samples": len(ds),
            "n_gt": int(sum(len(v) for v in gt.values())),
            "n_pred": int(sum(len(v) for v in preds.values())),
            "min_score": float(min_score),
            "n_pred_below_min_score": int(n_pred_all - sum(len(v) for v in preds.values())),
            "iou": iou,
            "ap": ap_per_iou[f"{float(results.iou_threshs[k50]):.2f}"],
            "ap_per_iou": ap_per_iou,
            "map_sweep": float(results.mAP()) if ci is not None else None,
            "tp": tp,
            "fp": fpos,
            "fn": fn,
            "precision": tp / (tp + fpos) if tp + fpos else None,
            "recall": tp / (tp + fn) if tp + fn else None,
        }
        ds.save_view(
            "false_positives", ds.filter_labels("predictions", F("eval") == "fp"), overwrite=True
        )
        ds.save_view("missed", ds.filter_labels("ground_truth", F("eval") == "fn"), overwrite=True)
        return finish_view(ds, name, "detections", fp, {**files, "images_root": root}, summary)
    except BaseException:
        ds.delete()
        raise
