"""Detector inference as an executor stage: serial or Ray, one boxes CSV per shard of images.

The detector (a SavedModel of either layout, see :mod:`detection.inference`) is loaded once per
worker process and reused for every shard that worker runs; each shard writes
``<shard>/boxes.csv`` (``id,box,score``) through :func:`detection.inference.main`, and
:func:`merge_boxes` joins the shards into one boxes file for the retrieval region source::

    from gldboxes.executor import make_executor
    stage, shards = detect_stage("model/", image_paths, threshold=0.1, shard_size=256)
    make_executor("ray", work_dir="runs").run(stage, shards, "runs/boxes-shards")
    merge_boxes("runs/boxes-shards", shards, "runs/db_boxes.csv")
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.executor import Resources, Shard, Stage, make_shards

__all__ = ["detect_stage", "merge_boxes"]


def _load_detector(model_dir: str) -> Any:
    from detection.inference import load_detector

    return load_detector(model_dir)


def _detect_shard(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    from detection import inference

    csv_path = inference.main(
        conf["model"],
        [Path(p) for p in shard.items],
        out / "boxes.csv",
        threshold=float(conf["threshold"]),
        max_side=conf["max_side"],
        detector=model,
        warn_domain=False,  # detect_stage checked every image once
    )
    boxes = read_boxes_csv(csv_path)
    return {"images": len(shard.items), "boxes": sum(len(v) for v in boxes.values())}


def detect_stage(
    model_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    threshold: float = 0.0,
    max_side: int | None = None,
    shard_size: int = 256,
    resources: Resources | None = None,
    retries: int = 2,
) -> tuple[Stage, list[Shard]]:
    """Detector inference over ``images`` as ``(stage, shards)`` for an executor.

    Args:
        model_dir: an exported detector (ours) or the authors' TF1 SavedModel.
        images: image paths; their file stems are the ids of the boxes file (must be unique).
        threshold: keep boxes scoring at least this.
        max_side: downscale larger images before detection.
        shard_size: images per shard.
        resources: per-task resources (default 0.5 CPU; on GPU set ``num_gpus``).

    A detector whose model card says it was trained on the synthetic world only gets one
    warning line here when some images are not from a synthetic world
    (:func:`detection.card.warn_if_unfit`).
    """
    from detection.card import warn_if_unfit

    paths = [os.fspath(Path(p).resolve()) for p in images]
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"detect_stage: image file names are not unique among {len(paths)}")
    model = os.fspath(Path(model_dir).resolve())
    warn_if_unfit(model_dir, paths)
    conf = {"model": model, "threshold": float(threshold), "max_side": max_side}
    stage = Stage(
        "detect-boxes",
        functools.partial(_detect_shard, conf=conf),
        conf=conf,
        load_model=functools.partial(_load_detector, model),
        resources=resources or Resources(num_cpus=0.5),
        retries=retries,
    )
    return stage, make_shards(paths, shard_size, prefix="images")


def merge_boxes(
    shards_dir: str | os.PathLike[str], shards: Sequence[Shard], out_csv: str | os.PathLike[str]
) -> Path:
    """Join the shards' ``boxes.csv`` into one boxes file (ids sorted, scores kept)."""
    merged: dict[str, list[Box]] = {}
    for shard in shards:
        part = Path(shards_dir) / shard.name / "boxes.csv"
        if not part.is_file():
            raise ValueError(f"{part}: missing; run the stage to completion first")
        for key, boxes in read_boxes_csv(part).items():
            if key in merged:
                raise ValueError(f"{part}: image id {key!r} appears in two shards")
            merged[key] = boxes
    return write_boxes_csv(out_csv, merged, with_score=True)
