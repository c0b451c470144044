"""Batch landmark detection with a SavedModel: boxes CSV for the retrieval region source.

Two SavedModel layouts load through :func:`load_detector`:

* ours (``gldboxes detect export``, Model Garden): signature ``serving_default`` with input
  ``inputs`` uint8 [1, H, W, 3]; boxes in pixels of the resized input (normalised here with
  ``image_info``);
* the authors' released Detect-to-Retrieve Faster R-CNN (a TF1 Object Detection API export):
  tensors fed/fetched by name, ``input_images:0`` uint8 [1, H, W, 3] ->
  ``detection_boxes:0`` (normalised), ``detection_scores:0``, ``detection_classes:0``.

:func:`main` runs a detector over a folder or a list of images and writes ``id,box,score``
(``box`` = normalised ``ymin xmin ymax xmax``; the id is the file stem; every box scoring
>= ``threshold``), resumable through a ``<out>.progress.jsonl`` journal. Unreadable images are
listed in ``<out>.bad.csv``; ``<out>.json`` reports counts and images/s. When the model's card
(``detector.json``, see :mod:`detection.card`) says it was trained on the synthetic world only
and some images are not from a synthetic world, one warning line is logged (and kept in
``<out>.json`` as ``domain_warning``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detection.card import warn_if_unfit
from detection.images import list_images, read_image_rgb
from gldboxes.boxes import Box, write_boxes_csv
from gldboxes.io import write_json

__all__ = [
    "TF1_FEEDS",
    "TF1_FETCHES",
    "Detections",
    "Detector",
    "load_detector",
    "main",
    "to_boxes",
]

logger = logging.getLogger("detection.inference")

TF1_FEEDS = "input_images:0"
TF1_FETCHES = ("detection_boxes:0", "detection_scores:0", "detection_classes:0")


@dataclass(frozen=True, slots=True)
class Detections:
    """Detections of one image.

    Attributes:
        boxes: (N, 4) float32 normalised ``ymin, xmin, ymax, xmax`` (clipped to [0, 1]).
        scores: (N,) float32, descending.
        classes: (N,) int32 (1 = landmark).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


@dataclass
class Detector:
    """A loaded detector: call it on a (H, W, 3) uint8 RGB image.

    Attributes:
        layout: ``model_garden`` or ``tf1``.
        path: the SavedModel folder.
    """

    layout: str
    path: Path
    _fn: Callable[[np.ndarray], Detections]
    _keep: Any = None  # the loaded SavedModel object (keeps its variables alive)

    def __call__(self, rgb: np.ndarray) -> Detections:
        """Detect landmarks in one image (H, W, 3) uint8 RGB."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected a (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
        return self._fn(rgb)


def _postprocess(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Detections:
    """Clip, drop degenerate/padding rows, sort by score (stable)."""
    boxes = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0.0, 1.0)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int32)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(scores)
    boxes, scores, classes = boxes[ok], scores[ok], classes[ok]
    order = np.argsort(-scores, kind="stable")
    return Detections(boxes[order], scores[order], classes[order])


def load_detector(path: str | os.PathLike[str]) -> Detector:
    """Load a detector SavedModel of either layout (see the module docstring).

    Raises:
        FileNotFoundError: no ``saved_model.pb`` in ``path``.
        ValueError: a SavedModel with neither layout.
    """
    from detection.tfcompat import import_tf

    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise FileNotFoundError(f"{path}: no saved_model.pb (not a SavedModel folder)")
    tf = import_tf()
    loaded = tf.saved_model.load(str(path))
    sig = getattr(loaded, "signatures", {}).get("serving_default")
    # Ours: input "inputs" and an "image_info" output. (A TF1 OD API export may also call its
    # input "inputs", but has no image_info: it goes through the tensor-name path below.)
    if (
        sig is not None
        and "inputs" in sig.structured_input_signature[1]
        and "image_info" in sig.structured_outputs
    ):

        def _run_mg(rgb: np.ndarray) -> Detections:
            out = sig(inputs=tf.convert_to_tensor(rgb[None]))
            n = int(np.asarray(out["num_detections"]).reshape(-1)[0])
            info = out["image_info"].numpy()[0]  # [[h, w], [scaled h, w], [sy, sx], [oy, ox]]
            # Boxes are in pixels of the resized input: undo the scale, divide by the size.
            denom = np.tile(info[2] * info[0], 2).astype(np.float32)
            boxes = out["detection_boxes"].numpy()[0, :n] / denom
            return _postprocess(
                boxes,
                out["detection_scores"].numpy()[0, :n],
                out["detection_classes"].numpy()[0, :n],
            )

        return Detector("model_garden", path, _run_mg, loaded)
    if hasattr(loaded, "prune"):
        try:
            pruned = loaded.prune(TF1_FEEDS, list(TF1_FETCHES))
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{path}: a TF1 SavedModel without the tensors {TF1_FEEDS} -> "
                f"{', '.join(TF1_FETCHES)} ({exc})"
            ) from exc

        def _run_tf1(rgb: np.ndarray) -> Detections:
            boxes, scores, classes = pruned(tf.convert_to_tensor(rgb[None]))
            return _postprocess(boxes.numpy()[0], scores.numpy()[0], classes.numpy()[0])

        return Detector("tf1", path, _run_tf1, loaded)
    raise ValueError(
        f"{path}: neither a gldboxes/Model Garden detector (serving_default with "
        f"'inputs') nor a TF1 export with {TF1_FEEDS}"
    )


def to_boxes(det: Detections, threshold: float = 0.0) -> list[Box]:
    """The detections scoring >= ``threshold`` as ``Box`` objects (score set)."""
    keep = det.scores >= threshold
    return [
        Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s))
        for b, s in zip(det.boxes[keep], det.scores[keep], strict=True)
    ]


def _image_ids(paths: Sequence[Path]) -> list[str]:
    """File stems as ids; ``ValueError`` naming both files when two share a stem."""
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise ValueError(f"two images share the id {p.stem!r}: {seen[p.stem]} and {p}")
        seen[p.stem] = p
    return list(seen)


def _read_journal(path: Path, threshold: float) -> dict[str, dict[str, Any]]:
    """Finished images of an interrupted run (a torn last line is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: torn line ignored", path, k + 1)
                continue
            if k == 0:
                if rec.get("threshold") != threshold:
                    raise ValueError(
                        f"{path}: journal written with threshold "
                        f"{rec.get('threshold')}, now {threshold}; delete it or "
                        "use the same threshold"
                    )
                continue
            done[rec["id"]] = rec
    return done


def _prefetch(
    paths: Sequence[Path], max_side: int | None, workers: int = 2, window: int = 8
) -> Iterator[tuple[Path, np.ndarray | str]]:
    """Decode images in background threads, in order; yields (path, pixels or error)."""

    def _load(p: Path) -> np.ndarray | str:
        try:
            rgb = read_image_rgb(p)
        except (ValueError, OSError) as exc:
            return str(exc)
        if max_side is not None and max(rgb.shape[:2]) > max_side:
            import cv2

            s = max_side / max(rgb.shape[:2])
            size = (max(1, round(rgb.shape[1] * s)), max(1, round(rgb.shape[0] * s)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return rgb

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[Path, Future[np.ndarray | str]]] = []
        it = iter(paths)
        for p in it:
            pending.append((p, pool.submit(_load, p)))
            if len(pending) >= window:
                break
        while pending:
            p, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load, nxt)))
            yield p, fut.result()


def main(
    model_dir: str | os.PathLike[str],
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_csv: str | os.PathLike[str],
    *,
    threshold: float = 0.0,
    max_side: int | None = None,
    overwrite: bool = False,
    detector: Detector | None = None,
    warn_domain: bool = True,
) -> Path:
    """Detect landmarks in every image and write a boxes CSV (see the module docstring).

    Args:
        model_dir: a SavedModel folder of either layout.
        images: a folder (recursive), a text file listing image paths, or a list of paths.
        out_csv: ``id,box,score`` output; ``<out>.json`` gets the run's statistics.
        threshold: keep boxes scoring at least this (the paper indexes boxes >= 0.1).
        max_side: downscale larger images before detection (boxes are normalised, so they
            do not change); ``None`` feeds originals.
        detector: an already loaded detector (skips loading ``model_dir``).
        warn_domain: check the model card against the images (see the module docstring);
            ``detection.sharded`` checks once for all shards and turns it off per shard.

    Returns:
        ``out_csv``.
    """
    out = Path(out_csv)
    stats_path = out.with_name(out.name + ".json")
    if out.is_file() and stats_path.is_file() and not overwrite:
        logger.info("boxes already written: %s", out)
        return out
    paths = (
        list_images(images) if isinstance(images, str | os.PathLike) else [Path(p) for p in images]
    )
    ids = _image_ids(paths)
    domain_warning = warn_if_unfit(model_dir, paths) if warn_domain else None
    journal = out.with_name(out.name + ".progress.jsonl")
    if overwrite and journal.exists():
        journal.unlink()
    done = _read_journal(journal, threshold)
    todo = [p for p, i in zip(paths, ids, strict=True) if i not in done]
    logger.info("%d images, %d already done, %d to detect", len(paths), len(done), len(todo))
    t_load = time.perf_counter()
    det_fn = detector if detector is not None else load_detector(model_dir)
    load_seconds = time.perf_counter() - t_load

    from gldboxes.progress import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    new_journal = not journal.is_file()
    started = time.perf_counter()
    n_run = 0
    with open(journal, "a", encoding="utf-8") as jf:
        if new_journal:
            jf.write(json.dumps({"threshold": threshold, "model": str(model_dir)}) + "\n")
        for path, pix in tqdm(
            _prefetch(todo, max_side), total=len(todo), desc="detect", unit="img"
        ):
            if isinstance(pix, str):
                rec: dict[str, Any] = {"id": path.stem, "path": str(path), "error": pix}
            else:
                d = det_fn(pix)
                keep = d.scores >= threshold
                rows = np.concatenate([d.boxes[keep], d.scores[keep, None]], axis=1)
                rec = {"id": path.stem, "boxes": rows.astype(float).tolist()}
                n_run += 1
            jf.write(json.dumps(rec) + "\n")
            jf.flush()
            done[rec["id"]] = rec
    seconds = time.perf_counter() - started

    boxes: dict[str, list[Box]] = {}
    bad: list[tuple[str, str, str]] = []
    for image_id in ids:
        rec = done[image_id]
        if "error" in rec:
            bad.append((image_id, rec.get("path", ""), rec["error"]))
            continue
        boxes[image_id] = [Box(r[0], r[1], r[2], r[3], r[4]) for r in rec["boxes"]]
    write_boxes_csv(out, boxes, with_score=True)
    bad_path = out.with_name(out.name.rsplit(".", 1)[0] + ".bad.csv")
    with open(bad_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "path", "reason"])
        w.writerows(bad)
    if bad:
        logger.warning("%d unreadable images listed in %s", len(bad), bad_path)
    ips = n_run / seconds if seconds > 0 and n_run else None
    write_json(
        stats_path,
        {
            "format_version": 1,
            "model": str(model_dir),
            "layout": det_fn.layout if isinstance(det_fn, Detector) else "custom",
            "threshold": threshold,
            "max_side": max_side,
            "n_images": len(ids),
            "n_with_boxes": sum(1 for v in boxes.values() if v),
            "n_boxes": sum(len(v) for v in boxes.values()),
            "n_bad": len(bad),
            "n_detected_this_run": n_run,
            "seconds": round(seconds, 3),
            "images_per_second": None if ips is None else round(ips, 3),
            "model_load_seconds": round(load_seconds, 2),
            "domain_warning": domain_warning,
        },
    )
    journal.unlink()
    logger.info(
        "wrote %s: %d images, %d boxes, %s images/s",
        out,
        len(ids),
        sum(len(v) for v in boxes.values()),
        "n/a" if ips is None else f"{ips:.2f}",
    )
    return out
