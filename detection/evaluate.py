"""AP@0.5 (the paper's detector metric) and the COCO AP sweep, for checkpoints and boxes files.

Two entry points:

* :func:`main` evaluates a training run's checkpoint on a records split with Model Garden's
  COCO evaluator (pycocotools inside) and writes ``RUN/eval/<split>-step<N>.json``
  (``detection.train.main(eval_every=N)`` runs the same evaluation, :func:`evaluate_trainer`,
  on the model while it trains);
* :func:`evaluate_boxes` scores any detector boxes CSV (``id,box,score``) against a ground-truth
  boxes CSV, e.g. the output of ``gldboxes detect boxes`` or of the authors' released model.

:func:`average_precision` is a NumPy implementation of COCO's single-class AP at one IoU
threshold (101 recall points, at most ``max_dets`` boxes per image, no crowd regions); the
tests check it against pycocotools. Images listed with no ground-truth box count their
detections as false positives.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.boxes import Box, pairwise_iou, read_boxes_csv
from gldboxes.io import read_json, write_json

__all__ = [
    "COCO_STAT_NAMES",
    "average_precision",
    "coco_metrics",
    "evaluate_boxes",
    "evaluate_trainer",
    "load_metrics",
    "main",
    "metrics_record",
    "squeeze_groundtruth_counts",
]

logger = logging.getLogger("detection.evaluate")

# Order of pycocotools' ``COCOeval.stats`` for bounding boxes.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "ARmax1",
    "ARmax10",
    "ARmax100",
    "ARs",
    "ARm",
    "ARl",
)


def _as_arrays(boxes: Iterable[Box]) -> tuple[np.ndarray, np.ndarray]:
    items = list(boxes)
    coords = np.array([[b.ymin, b.xmin, b.ymax, b.xmax] for b in items], dtype=np.float64).reshape(
        -1, 4
    )
    scores = np.array([1.0 if b.score is None else b.score for b in items], dtype=np.float64)
    return coords, scores


def average_precision(
    predictions: Mapping[str, Sequence[Box]],
    ground_truth: Mapping[str, Sequence[Box]],
    image_ids: Iterable[str] | None = None,
    *,
    iou_threshold: float = 0.5,
    max_dets: int = 100,
) -> float:
    """Single-class average precision at one IoU threshold, as COCO computes it.

    Per image, detections are ranked by score (stable), the top ``max_dets`` kept, and each is
    greedily matched, in score order, to the unmatched ground-truth box of highest IoU
    (>= ``iou_threshold``). Over all images, precision is made monotone and sampled at the
    101 recall points 0, 0.01, ..., 1 (zero beyond the highest recall reached).

    Args:
        predictions: id -> detected boxes with scores.
        ground_truth: id -> ground-truth boxes.
        image_ids: the evaluated images (default: every id of ``ground_truth`` and
            ``predictions``); detections on other images are ignored.

    Returns:
        AP in [0, 1], or ``nan`` when there is no ground-truth box.
    """
    ids = (
        sorted(set(ground_truth) | set(predictions))
        if image_ids is None
        else list(dict.fromkeys(image_ids))
    )
    thr = min(iou_threshold, 1 - 1e-10)
    all_scores: list[np.ndarray] = []
    all_tp: list[np.ndarray] = []
    n_gt = 0
    for image_id in ids:
        gt, _ = _as_arrays(ground_truth.get(image_id, ()))
        det, scores = _as_arrays(predictions.get(image_id, ()))
        n_gt += len(gt)
        if not len(det):
            continue
        order = np.argsort(-scores, kind="mergesort")[:max_dets]
        det, scores = det[order], scores[order]
        tp = np.zeros(len(det), dtype=bool)
        if len(gt):
            iou = pairwise_iou(det, gt)
            taken = np.zeros(len(gt), dtype=bool)
            for d in range(len(det)):  # greedy in score order (<= max_dets per image)
                cand = np.where(~taken & (iou[d] >= thr), iou[d], -1.0)
                g = int(np.argmax(cand))
                if cand[g] >= 0:
                    taken[g] = True
                    tp[d] = True
        all_scores.append(scores)
        all_tp.append(tp)
    if n_gt == 0:
        return float("nan")
    if not all_scores:
        return 0.0
    order = np.argsort(-np.concatenate(all_scores), kind="mergesort")
    tp = np.concatenate(all_tp)[order]
    tps = np.cumsum(tp)
    fps = np.cumsum(~tp)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    rec_thresholds = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, rec_thresholds, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def coco_metrics(
    predictions: Mapping[str, Sequence[Box]],
    ground_truth: Mapping[str, Sequence[Box]],
    image_ids: Iterable[str] | None = None,
    *,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """The COCO bounding-box AP/AR sweep with pycocotools (one category, "landmark").

    Args:
        sizes: id -> (height, width) in pixels, to place boxes in COCO's small/medium/large
            area ranges; without it boxes are scaled to a 1000x1000 image and the area-range
            entries (APs, APm, APl, ARs, ARm, ARl) are left out.

    Returns:
        ``COCO_STAT_NAMES`` -> value (-1 where pycocotools has nothing to measure).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = (
        sorted(set(ground_truth) | set(predictions))
        if image_ids is None
        else list(dict.fromkeys(image_ids))
    )
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for num, image_id in enumerate(ids, 1):
        h, w = sizes[image_id] if sizes is not None else (1000, 1000)
        images.append({"id": num, "height": int(h), "width": int(w), "file_name": image_id})
        for b in ground_truth.get(image_id, ()):
            bw, bh = (b.xmax - b.xmin) * w, (b.ymax - b.ymin) * h
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": num,
                    "category_id": 1,
                    "bbox": [b.xmin * w, b.ymin * h, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        for b in predictions.get(image_id, ()):
            dets.append(
                {
                    "image_id": num,
                    "category_id": 1,
                    "bbox": [b.xmin * w, b.ymin * h, (b.xmax - b.xmin) * w, (b.ymax - b.ymin) * h],
                    "score": 1.0 if b.score is None else float(b.score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "landmark"}],
        }
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            dt.dataset = {
                "images": images,
                "annotations": [],
                "categories": gt.dataset["categories"],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats, strict=True)}
    if sizes is None:
        for name in ("APs", "APm", "APl", "ARs", "ARm", "ARl"):
            stats.pop(name)
    return stats


def evaluate_boxes(
    predictions_csv: str | os.PathLike[str],
    ground_truth_csv: str | os.PathLike[str],
    *,
    image_ids: Iterable[str] | None = None,
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
) -> dict[str, Any]:
    """Score a detector boxes CSV against ground truth: AP@``iou_threshold`` + COCO sweep.

    Args:
        predictions_csv: ``id,box,score`` (several rows per id allowed).
        ground_truth_csv: ``id,box``.
        image_ids: evaluated images (e.g. the validation split's ids, negatives included);
            default: every id in either file.
        min_score: drop detections scoring below this first.
    """
    pred = read_boxes_csv(predictions_csv)
    pred = {
        k: [b for b in v if (b.score if b.score is not None else 1.0) >= min_score]
        for k, v in pred.items()
    }
    gt = read_boxes_csv(ground_truth_csv)
    ids = sorted(set(gt) | set(pred)) if image_ids is None else list(image_ids)
    ap = average_precision(pred, gt, ids, iou_threshold=iou_threshold)
    return {
        "ap": ap,
        "iou_threshold": iou_threshold,
        "n_images": len(ids),
        "n_ground_truth": sum(len(gt.get(i, ())) for i in ids),
        "n_detections": sum(len(pred.get(i, ())) for i in ids),
        "coco": coco_metrics(pred, gt, ids),
    }


def _metric_value(v: Any) -> float:
    arr = np.asarray(v, dtype=np.float64)
    return float(arr.reshape(-1)[0]) if arr.size else float("nan")


def squeeze_groundtruth_counts(task: Any, tf: Any) -> None:
    """Patch ``task.validation_step`` in place for tf-models-official 2.20's RetinaNet parser,
    which stores each image's ground-truth count with shape (1,) instead of (): batched to
    (B, 1), the COCO evaluator's ``int(num_instances)`` warns on NumPy < 2.4 and fails on 2.4+.
    Reshape it to (B,)."""
    original = task.validation_step

    def validation_step(inputs: Any, model: Any, metrics: Any = None) -> Any:
        features, labels = inputs
        gts = labels.get("groundtruths") if isinstance(labels, dict) else None
        if gts is not None and "num_detections" in gts and gts["num_detections"].shape.rank == 2:
            gts = {**gts, "num_detections": tf.reshape(gts["num_detections"], [-1])}
            labels = {**labels, "groundtruths": gts}
        return original((features, labels), model, metrics)

    task.validation_step = validation_step


def main(
    run_dir: str | os.PathLike[str],
    records_dir: str | os.PathLike[str],
    *,
    split: str = "val",
    checkpoint: str = "latest",
    overwrite: bool = False,
) -> Path:
    """Evaluate a run's checkpoint on a records split with Model Garden's COCO evaluator.

    Args:
        run_dir: a folder written by ``detection.train.main``.
        records_dir: a folder written by ``detection.records.main``.
        split: records split to evaluate (``val`` by default).
        checkpoint: ``latest`` (the newest ``ckpt-N`` of the run), ``init`` (the untrained,
            seeded initial weights: the baseline), or a checkpoint prefix.

    Returns:
        ``run_dir/eval/<split>-step<N>.json`` (``-init`` for the untrained model) with
        ``ap50`` (AP@0.5, the paper's metric), the COCO sweep and the validation loss.
    """
    from detection.configs import build_experiment
    from detection.records import load_records_info
    from detection.tfcompat import import_tf
    from detection.train import load_run_conf, seed_everything, strategy_for_devices

    run_dir = Path(run_dir)
    conf = load_run_conf(run_dir)
    records = load_records_info(records_dir)
    if not records.splits.get(split):
        raise ValueError(f"{records_dir}: split {split!r} is empty or absent")
    tf = import_tf()
    if checkpoint == "latest":
        ckpt_path = tf.train.latest_checkpoint(str(run_dir))
        if ckpt_path is None:
            raise FileNotFoundError(
                f"{run_dir}: no checkpoint yet (train first, or use "
                "checkpoint='init' for the untrained baseline)"
            )
    elif checkpoint == "init":
        ckpt_path = None
    else:
        ckpt_path = checkpoint
        if not Path(ckpt_path + ".index").is_file():
            raise FileNotFoundError(f"{ckpt_path}: not a checkpoint prefix (no .index file)")
    tag = "init" if ckpt_path is None else f"step{ckpt_path.rsplit('-', 1)[-1]}"
    out = run_dir / "eval" / f"{split}-{tag}.json"
    if out.is_file() and not overwrite:
        logger.info("already evaluated: %s", out)
        return out

    import time

    import official.vision  # noqa: F401 - registers the vision tasks
    from official.core import task_factory, train_utils

    params = build_experiment(conf, records, val_split=split)
    seed_everything(int(conf["seed"]))
    strategy = strategy_for_devices()
    started = time.perf_counter()
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=str(run_dir))
        squeeze_groundtruth_counts(task, tf)
        trainer = train_utils.create_trainer(params, task, train=False, evaluate=True)
    if ckpt_path is not None:
        status = tf.train.Checkpoint(model=trainer.model).read(ckpt_path)
        status.expect_partial().assert_existing_objects_matched()
    scores = evaluate_trainer(trainer, strategy, tf, name=str(run_dir))
    result = metrics_record(
        scores,
        run_dir=run_dir,
        conf=conf,
        records=records,
        split=split,
        checkpoint=ckpt_path,
        seconds=time.perf_counter() - started,
    )
    write_json(out, result)
    logger.info(
        "%s %s: AP@0.5 = %.4f (AP = %.4f)",
        run_dir.name,
        tag,
        result["ap50"],
        result["coco"].get("AP", float("nan")),
    )
    return out


def evaluate_trainer(trainer: Any, strategy: Any, tf: Any, *, name: str) -> dict[str, Any]:
    """One pass of a Model Garden trainer's evaluator over its whole validation set.

    Used by :func:`main` (a checkpoint read into a fresh model) and by
    ``detection.train.main --eval-every`` (the model being trained, no reload). The task must
    have gone through :func:`squeeze_groundtruth_counts` before its first evaluation.

    Args:
        trainer: ``official.core.base_trainer.Trainer`` built with ``evaluate=True``.
        strategy: the distribution strategy the trainer was built under.
        tf: the TensorFlow module.
        name: the run, for error messages.

    Returns:
        ``{"ap50": AP@0.5, "coco": COCO_STAT_NAMES -> value, "validation_loss": float}``.

    Raises:
        ValueError: the evaluator returned no AP50.
    """
    chatter = io.StringIO()  # pycocotools prints its summary table: keep it at DEBUG
    with strategy.scope(), contextlib.redirect_stdout(chatter):
        logs = trainer.evaluate(tf.convert_to_tensor(-1, dtype=tf.int32))
    logger.debug("COCO evaluator output:\n%s", chatter.getvalue())
    metrics = {k: _metric_value(v) for k, v in (logs or {}).items()}
    coco = {k: metrics[k] for k in COCO_STAT_NAMES if k in metrics}
    if "AP50" not in coco:
        raise ValueError(f"{name}: the evaluator returned no AP50 (got {sorted(metrics)})")
    return {"ap50": coco["AP50"], "coco": coco, "validation_loss": metrics.get("validation_loss")}


def metrics_record(
    scores: Mapping[str, Any],
    *,
    run_dir: str | os.PathLike[str],
    conf: Mapping[str, Any],
    records: Any,
    split: str,
    checkpoint: str | None,
    seconds: float,
) -> dict[str, Any]:
    """The ``<split>-step<N>.json`` record of :func:`main` for scores of :func:`evaluate_trainer`.

    Args:
        records: ``detection.records.RecordsInfo`` of the evaluated records folder.
    """
    return {
        "format_version": 1,
        "run": str(run_dir),
        "preset": conf["output"],
        "split": split,
        "checkpoint": checkpoint,
        "n_images": records.splits[split],
        "n_positive_images": records.positives.get(split, 0),
        "ap50": scores["ap50"],
        "coco": dict(scores["coco"]),
        "validation_loss": scores["validation_loss"],
        "seconds": round(seconds, 2),
    }


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metrics JSON written by :func:`main`."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format_version") != 1 or "ap50" not in data:
        raise ValueError(f"{path}: not a detector metrics file (format_version 1 with ap50)")
    return data
