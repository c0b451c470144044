"""FiftyOne datasets for looking at boxes, detector predictions and retrieval results.

Two builders here, each making a persistent ``fo.Dataset`` from the files the pipeline writes
(the third, of retrieval results, is :func:`retrieval.evaluation.view.build_retrieval_dataset`, on
the
shared machinery below):

* :func:`build_box_dataset` — the Google Landmark Boxes ground truth: images, boxes, split,
  landmark id, the "no prominent landmark" flag and annotation metadata (rater, agreement,
  whether a pre-annotation was kept).
* :func:`build_detection_dataset` — ground truth beside detector predictions (with confidence),
  evaluated by FiftyOne's COCO-style ``evaluate_detections`` at IoU 0.5 (the paper's AP@0.5)
  with an IoU sweep 0.50:0.95, leaving per-sample TP/FP/FN counts and per-box ``tp/fp/fn`` tags.

Every dataset carries image metadata (``metadata.width``, ``height``, ``size_bytes``,
``mime_type``, ``num_channels``), read from each distinct file's header once
(:func:`image_metadata`).

Boxes travel as Google Landmark Boxes CSVs (``ymin xmin ymax xmax`` in [0, 1], see
:mod:`gldboxes.boxes`); FiftyOne wants relative ``[x, y, w, h]`` (:func:`boxes_to_xywh`).

A dataset remembers a fingerprint of its sources and options in ``dataset.info["gldboxes"]``:
building again with the same inputs returns the stored dataset untouched (hloc's "skip when
done"); changed inputs or ``overwrite=True`` rebuild it under a temporary name and swap it in,
so a failed build never leaves a half-written dataset under the real name.

FiftyOne is imported lazily (``import fiftyone`` takes ~5 s); configure the database first
(:func:`gldboxes.fodb.database`). This module never imports ``retrieval``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box, read_boxes_csv

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

__all__ = [
    "COCO_IOU_SWEEP",
    "DEFAULT_MIN_SCORE",
    "FORMAT_VERSION",
    "AppServer",
    "boxes_to_xywh",
    "build_box_dataset",
    "build_detection_dataset",
    "dataset_summary",
    "image_metadata",
    "read_annotation_metadata",
    "read_id_csv",
    "resolve_image_path",
    "slug",
    "start_app",
]

logger = logging.getLogger("gldboxes.views")

# 2: image metadata on every sample; retrieval chips name their protocol, per-query views.
FORMAT_VERSION = 2
# COCO's IoU sweep 0.50:0.05:0.95 (the paper reports AP at 0.5, the first entry).
COCO_IOU_SWEEP: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Detector boxes below this confidence are left out of the detection view by default: at 0 a
# detector keeping its top-20 boxes draws 20 boxes on every image.
DEFAULT_MIN_SCORE = 0.3
LANDMARK_LABEL = "landmark"
Missing = Literal["error", "skip"]


# --------------------------------------------------------------------------- helpers


def boxes_to_xywh(boxes: npt.ArrayLike) -> np.ndarray:
    """Google Landmark Boxes ``(ymin, xmin, ymax, xmax)`` to FiftyOne's relative ``[x, y, w, h]``.

    Args:
        boxes: (N, 4) array in [0, 1].

    Returns:
        (N, 4) float64 array ``[xmin, ymin, xmax - xmin, ymax - ymin]``.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([arr[:, 1], arr[:, 0], arr[:, 3] - arr[:, 1], arr[:, 2] - arr[:, 0]], axis=1)


def _detections(boxes: Sequence[Box], label: str = LANDMARK_LABEL, **attrs: Any) -> fo.Detections:
    """``fo.Detections`` of ``boxes`` (scores become ``confidence``)."""
    import fiftyone as fo

    if not boxes:
        return fo.Detections(detections=[])
    xywh = boxes_to_xywh([(b.ymin, b.xmin, b.ymax, b.xmax) for b in boxes]).tolist()
    return fo.Detections(
        detections=[
            fo.Detection(label=label, bounding_box=r, confidence=b.score, **attrs)
            for r, b in zip(xywh, boxes, strict=True)
        ]
    )


def resolve_image_path(root: str | os.PathLike[str], image_id: str, url: str | None = None) -> Path:
    """Where image ``image_id`` lives under ``root``.

    Tried in order: ``root/url`` (when ``url`` is a relative path, as in the synthetic world's
    ``train.csv``), ``root/<id>.jpg``, ``root/jpg/<id>.jpg`` (Revisited layout),
    ``root/images/a/b/c/<id>.jpg`` and ``root/a/b/c/<id>.jpg`` (GLD layout). Returns the first
    that exists, else the first candidate (so the caller can report it as missing).
    """
    root = Path(root)
    cands: list[Path] = []
    if url and "://" not in url:
        cands.append(root / url)
    cands += [root / f"{image_id}.jpg", root / "jpg" / f"{image_id}.jpg"]
    if len(image_id) >= 3:
        sub = Path(image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")
        cands += [root / "images" / sub, root / sub]
    for c in cands:
        if c.is_file():
            return c.resolve()
    return cands[0].resolve()


def image_metadata(paths: Sequence[str | os.PathLike[str]]) -> dict[str, fo.ImageMetadata]:
    """``fo.ImageMetadata`` (width, height, size, MIME type, channels) of each distinct file.

    Reads only each file's header, once per distinct path (a retrieval dataset lists a database
    image under many queries), on a few threads. What ``dataset.compute_metadata()`` stores.

    Returns:
        ``{str(path): fo.ImageMetadata}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    import fiftyone as fo

    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(unique) // 64 + 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        metas = list(pool.map(fo.ImageMetadata.build_for, unique))
    return dict(zip(unique, metas, strict=True))


def read_id_csv(
    path: str | os.PathLike[str], columns: Sequence[str] = ("id",)
) -> list[dict[str, str]]:
    """Rows of a CSV that must have the header ``columns`` (others are kept too).

    Raises:
        ValueError: a required column is missing (names the file and the header found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in columns if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {cols}")
        return [dict(r) for r in reader]


_TRUE = {"1", "true", "yes", "y", "t", "kept"}
_FALSE = {"0", "false", "no", "n", "f", "", "dropped", "discarded"}


def _parse_bool(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("", "none", "null", "nan"):
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: {value!r} is not a boolean (true/false/1/0/yes/no)")


def _parse_float(value: Any, where: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() in ("", "none", "null")):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {value!r} is not a number") from exc
    return None if np.isnan(out) else out


# Annotation metadata columns with a type; other columns are kept as strings.
_ANNOTATION_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "rater": lambda v, w: None if v in (None, "") else str(v),
    "agreement": _parse_float,
    "pre_annotation_kept": _parse_bool,
}


def read_annotation_metadata(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per-image annotation metadata from a CSV or JSON file.

    CSV: header ``id`` plus any of ``rater``, ``agreement`` (a number, e.g. IoU between
    raters), ``pre_annotation_kept`` (true/false); other columns are kept as strings.
    JSON: a list of objects with ``id``, an object ``{id: {...}}``, or ``{"annotations": [...]}``
    (with an optional ``format_version``).

    Returns:
        ``{id: {"rater": str | None, "agreement": float | None, "pre_annotation_kept":
        bool | None, <extra>: str}}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation metadata file not found: {path}")
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                raw = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(raw, dict) and "annotations" in raw:
            raw = raw["annotations"]
        if isinstance(raw, dict):
            rows = [{"id": k, **v} for k, v in raw.items() if isinstance(v, dict)]
            if len(rows) != len(raw):
                raise ValueError(f"{path}: expected {{id: {{...}}}} with object values")
        elif isinstance(raw, list) and all(isinstance(r, dict) and "id" in r for r in raw):
            rows = list(raw)
        else:
            raise ValueError(
                f"{path}: expected a list of objects with 'id', {{id: {{...}}}} or "
                "{'annotations': [...]}"
            )
    else:
        rows = read_id_csv(path)
    out: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        key = str(row["id"])
        where = f"{path} (row {i + 1}, id {key})"
        entry: dict[str, Any] = {}
        for col, value in row.items():
            if col == "id" or col == "format_version":
                continue
            parse = _ANNOTATION_FIELDS.get(col)
            entry[col] = parse(value, where) if parse else (None if value is None else str(value))
        out[key] = entry
    return out


def _fingerprint(
    kind: str,
    files: Mapping[str, str | os.PathLike[str] | None],
    options: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> str:
    """Hash of source files (path, size, mtime), options and arrays: equal means up to date."""
    h = hashlib.sha256()
    h.update(f"{kind}:{FORMAT_VERSION}".encode())
    for key in sorted(files):
        p = files[key]
        if p is None:
            h.update(f"{key}=None;".encode())
            continue
        st = Path(p).stat()
        h.update(f"{key}={Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for key in sorted(arrays or {}):
        a = np.ascontiguousarray((arrays or {})[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def slug(text: str) -> str:
    """A dataset-name-friendly slug: lowercase ``a-z0-9`` words joined by ``-``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-") or "x"


def _up_to_date(name: str, fingerprint: str) -> fo.Dataset | None:
    """The existing dataset ``name`` when it was built from the same fingerprint."""
    import fiftyone as fo

    if not fo.dataset_exists(name):
        return None
    ds = fo.load_dataset(name)
    meta = ds.info.get("gldboxes", {})
    if meta.get("fingerprint") == fingerprint and meta.get("complete"):
        logger.info("dataset %r is up to date (%d samples); skipping", name, len(ds))
        return ds
    return None


def _new_building(name: str) -> fo.Dataset:
    import fiftyone as fo

    tmp = f"{name}-building-{os.getpid()}"
    if fo.dataset_exists(tmp):
        fo.delete_dataset(tmp)
    return fo.Dataset(tmp)


def _finish(
    ds: fo.Dataset,
    name: str,
    kind: str,
    fingerprint: str,
    sources: Mapping[str, Any],
    summary: Mapping[str, Any],
) -> fo.Dataset:
    """Record provenance, make ``ds`` persistent and swap it in under ``name``."""
    import fiftyone as fo

    ds.info["gldboxes"] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "complete": True,
        "sources": {k: (None if v is None else str(v)) for k, v in sources.items()},
        "summary": dict(summary),
    }
    ds.persistent = True
    ds.save()
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    ds.name = name
    logger.info("dataset %r ready: %d samples", name, len(ds))
    return ds


def dataset_summary(ds: fo.Dataset) -> dict[str, Any]:
    """The provenance and figures stored by a builder (``dataset.info["gldboxes"]``)."""
    return dict(ds.info.get("gldboxes", {}))


def _image_paths(
    ids: Sequence[str], root: Path, urls: Mapping[str, str] | None, missing: Missing, what: str
) -> tuple[list[str], list[Path]]:
    """Resolve ``ids`` to image files; drop (``skip``) or reject (``error``) missing ones."""
    paths = [resolve_image_path(root, i, (urls or {}).get(i)) for i in ids]
    exists = [p.is_file() for p in paths]
    n_missing = len(exists) - sum(exists)
    if n_missing:
        first = next(p for p, e in zip(paths, exists, strict=True) if not e)
        if missing == "error":
            raise ValueError(
                f"{what}: {n_missing} of {len(ids)} images not found under {root} "
                f"(first: {first}); pass missing='skip' to leave them out"
            )
        logger.warning(
            "%s: skipping %d of %d images not found under %s (first: %s)",
            what,
            n_missing,
            len(ids),
            root,
            first,
        )
    kept = [(i, p) for i, p, e in zip(ids, paths, exists, strict=True) if e]
    return [k for k, _ in kept], [p for _, p in kept]


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
    fp = _fingerprint("boxes", files, options)
    if not overwrite and (ds := _up_to_date(name, fp)) is not None:
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
    ids, paths = _image_paths(ids, root, urls, missing, str(train_csv))

    extra_cols = sorted({c for m in meta.values() for c in m} - set(_ANNOTATION_FIELDS))
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
            "ground_truth": _detections(bs),
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

    ds = _new_building(name)
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
        return _finish(ds, name, "boxes", fp, {**files, "images_root": root}, summary)
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
    fp = _fingerprint("detections", files, options)
    if not overwrite and (ds := _up_to_date(name, fp)) is not None:
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
    ids, paths = _image_paths(ids, root, None, missing, str(gt_csv))
    img_meta = image_metadata(paths)

    samples = [
        fo.Sample(
            filepath=str(p),
            metadata=img_meta[str(p)],
            gld_id=i,
            ground_truth=_detections(gt.get(i, [])),
            predictions=_detections(preds.get(i, [])),
        )
        for i, p in zip(ids, paths, strict=True)
    ]
    ds = _new_building(name)
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
        return _finish(ds, name, "detections", fp, {**files, "images_root": root}, summary)
    except BaseException:
        ds.delete()
        raise


# --------------------------------------------------------------------------- bulk insertion


def _classification_doc(label: str, new_id: Callable[[], Any], **attrs: Any) -> dict[str, Any]:
    """An ``fo.Classification`` in FiftyOne's stored form (``new_id``: ``bson.ObjectId``).

    ``attrs`` become dynamic attributes of the label (declared by the public insertion path).
    """
    return {"_id": new_id(), "_cls": "Classification", "label": label, "tags": [], **attrs}


def _detections_doc(
    xywh: Sequence[Sequence[float]],
    scores: Sequence[float | None],
    label: str,
    new_id: Callable[[], Any],
) -> dict[str, Any]:
    """An ``fo.Detections`` of relative ``[x, y, w, h]`` boxes in FiftyOne's stored form."""
    dets = []
    for bb, c in zip(xywh, scores, strict=False):
        d: dict[str, Any] = {
            "_id": new_id(),
            "_cls": "Detection",
            "attributes": {},
            "label": label,
            "bounding_box": [float(v) for v in bb],
            "tags": [],
        }
        if c is not None:
            d["confidence"] = float(c)
        dets.append(d)
    return {"_cls": "Detections", "detections": dets}


def _add_docs(ds: fo.Dataset, docs: list[dict[str, Any]], *, fast: bool, n_public: int) -> None:
    """Add sample documents (FiftyOne's stored form, labels as ``_cls`` dicts) to ``ds``.

    The first ``n_public`` go through ``fo.Sample.from_dict`` + ``add_samples``, FiftyOne's
    public path, which declares every field (including the labels' nested fields) as FiftyOne
    would. With ``fast`` the rest are written in one bulk insert with the bookkeeping fields
    ``add_samples`` adds (``_dataset_id``, ``_media_type``, ``_rand``, ``created_at``,
    ``last_modified_at``): building mongoengine documents costs ~5 ms per sample here, the bulk
    insert ~0.1 ms. The tests check both paths store the same values.
    """
    import datetime as _dt
    import random

    import fiftyone as fo

    head = docs if not fast else docs[:n_public]
    ds.add_samples([fo.Sample.from_dict(d) for d in head], progress=False)
    rest = docs[len(head) :]
    if not rest:
        return
    now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None)
    rng = random.Random(len(docs))
    for d in rest:
        d.update(
            _dataset_id=ds._doc.id,
            _media_type="image",
            _rand=rng.random() * 0.001 + 0.999,
            created_at=now,
            last_modified_at=now,
        )
    ds._sample_collection.insert_many(rest, ordered=False)


# --------------------------------------------------------------------------- the App


class AppServer:
    """The FiftyOne App server (``fiftyone.server.main``) as a child process on 127.0.0.1.

    Starting the server module directly is ready in ~6 s (``fo.launch_app`` takes ~27 s here)
    and leaves nothing behind once :meth:`stop` has run. The child inherits the environment, so
    call :func:`gldboxes.fodb.configure_fiftyone` (or set ``FIFTYONE_DATABASE_URI``) first.
    It is killed when the process that started it dies (Linux), and a pidfile beside its log
    (``fiftyone-app-<port>.json``) lets the next :func:`start_app` on that port stop a server
    that outlived its starting command.

    Attributes:
        port: the TCP port.
        process: the server process.
        log_path: its log file.
        state_path: its pidfile (pid, port, owner).
    """

    def __init__(
        self,
        port: int,
        process: subprocess.Popen[bytes],
        log_path: Path,
        state_path: Path | None = None,
    ) -> None:
        self.port = port
        self.process = process
        self.log_path = log_path
        self.state_path = state_path

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def dataset_url(self, name: str) -> str:
        """The App page of dataset ``name`` (``/datasets/<slug>``)."""
        import fiftyone.core.utils as fou

        return f"{self.url}/datasets/{fou.to_slug(name)}"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``timeout`` s); idempotent."""
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            logger.info("FiftyOne App on port %d stopped", self.port)
        if self.state_path is not None:
            try:
                if json.loads(self.state_path.read_text()).get("pid") == proc.pid:
                    self.state_path.unlink()
            except (OSError, ValueError, AttributeError):
                pass

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_app(
    port: int | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
) -> AppServer:
    """Start the FiftyOne App server on 127.0.0.1 and wait until it serves its page.

    Args:
        port: TCP port; a free one by default.
        log_dir: where ``fiftyone-app-<port>.log`` goes (default: the system temp folder).
        timeout: seconds to wait for the first successful HTTP response.

    A server left on ``port`` by a command that died (its pidfile names a dead owner) is
    stopped first.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its log's end).
    """
    import tempfile
    import time
    import urllib.error
    import urllib.request

    from gldboxes.fodb import (
        ServerStartError,
        die_with_parent,
        free_port,
        owner_record,
        stop_orphan,
    )

    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        raise RuntimeError(
            "FIFTYONE_DATABASE_URI is not set; start the database first (gldboxes.fodb.database)"
        )
    port = free_port() if port is None else int(port)
    log_path = Path(log_dir or tempfile.gettempdir()) / f"fiftyone-app-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_path = log_path.with_suffix(".json")
    try:
        stale = json.loads(state_path.read_text())
    except (OSError, ValueError):
        stale = None
    marker = f"fiftyone.server.main --address 127.0.0.1 --port {port} "
    if isinstance(stale, dict) and stop_orphan(
        stale, marker=marker, what="FiftyOne App", timeout=5.0
    ):
        state_path.unlink(missing_ok=True)
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_DATABASE_VALIDATION": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fiftyone.server.main",
                "--address",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # SIGKILL: the App keeps no state, and its graceful shutdown can wait ~30 s for a
            # database that is going down with the same parent.
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
    app = AppServer(port, proc, log_path, state_path)
    tmp = state_path.with_name(f".{state_path.name}.tmp")
    state = {"format_version": 1, "pid": proc.pid, "port": port, **owner_record()}
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"FiftyOne App exited with code {proc.returncode}; {_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(app.url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            app.stop()
            raise ServerStartError(
                f"FiftyOne App did not answer on {app.url} within "
                f"{timeout:.0f} s; {_tail(log_path)}"
            )
        time.sleep(0.3)
    logger.info("FiftyOne App serving on %s (log %s)", app.url, log_path)
    return app


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "log tail: " + " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
