"""Export a campaign: Label Studio JSON snapshot (full predictions) -> parsed annotation records.

The built-in COCO/YOLO exports drop images without boxes and rename files, so we export the
snapshot JSON and convert it ourselves. The snapshot file wraps Label Studio's task list::

    {"format_version": 1, "source": "label-studio", "project_id": 3,
     "users": {"3": "rater@example.org", ...}, "tasks": [<Label Studio task>, ...]}

:func:`load_snapshot` also accepts a bare Label Studio JSON export (a list of tasks).
Rectangles are percent of ``original_width/original_height``; records keep the *unclipped*
edges in [0, 1] units so validation can see boxes that leave the image.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annotation.config import (
    BOX_FROM_NAME,
    FLAG_FROM_NAME,
    NO_LANDMARK_CHOICE,
    rect_value_to_edges,
)
from gldboxes.io import atomic_write, read_json

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "AnnotationRecord",
    "TaskRecord",
    "export_snapshot",
    "fetch_snapshot",
    "load_snapshot",
    "parse_snapshot",
    "progress",
    "progress_rates",
]

logger = logging.getLogger("annotation.export")

SNAPSHOT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskRecord:
    """One task (image) of the campaign.

    Attributes:
        task_id: Label Studio task id.
        image_id: the image id of the split (``data.gld_id``).
        width, height: image size in pixels.
        overlap: the task was meant for two raters.
        gold: ``None`` or ``{"box": "ymin xmin ymax xmax" | None, "no_landmark": bool}``.
        prediction: the pre-annotated box edges ``(4,)`` ``(ymin, xmin, ymax, xmax)`` or ``None``.
        prediction_version: its ``model_version`` (``""`` when none).
    """

    task_id: int
    image_id: str
    width: int
    height: int
    overlap: bool = False
    gold: dict[str, Any] | None = None
    prediction: tuple[float, float, float, float] | None = None
    prediction_version: str = ""


@dataclass(frozen=True)
class AnnotationRecord:
    """One submitted (or skipped) annotation.

    Attributes:
        annotation_id, task_id, image_id: identifiers.
        rater: the rater's e-mail (or ``"user<id>"`` when unknown).
        boxes: unclipped edges ``(ymin, xmin, ymax, xmax)`` in [0, 1] units of every
            ``landmark`` rectangle (validation decides what is acceptable).
        flag: the ``no prominent landmark`` choice is ticked.
        cancelled: the rater skipped the task.
        lead_time: seconds spent, as recorded by Label Studio.
        unknown: result items we do not understand (other from_names, malformed rectangles).
    """

    annotation_id: int
    task_id: int
    image_id: str
    rater: str
    boxes: tuple[tuple[float, float, float, float], ...]
    flag: bool
    cancelled: bool = False
    lead_time: float | None = None
    unknown: tuple[str, ...] = field(default=())


def fetch_snapshot(
    client: Any,
    project_id: int,
    *,
    timeout: float = 600.0,
    gold: Mapping[str, Any] | None = None,
    keep: bool = True,
    known_users: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Create a snapshot export with full predictions, wait for it, return it (our envelope).

    Args:
        gold: the project's gold answers (:func:`annotation.campaign.load_gold`), kept in the
            snapshot's ``gold`` (they are never in the tasks, which raters can read).
        known_users: ``{user id: e-mail}`` of users Label Studio no longer names (raters
            removed from the organisation are listed as "Deleted";
            :func:`annotation.campaign.removed_raters`).
        keep: leave the export in Label Studio's export list; ``False`` deletes it once
            downloaded (``annotate progress --watch`` polls without filling the server's disk).
    """
    export = client.projects.exports.create(
        project_id,
        title=f"gldboxes snapshot {time.strftime('%Y-%m-%d %H:%M:%S')}",
        serialization_options={"predictions": {"only_id": False}},
    )
    deadline = time.monotonic() + timeout
    status = export.status
    while status not in ("completed", "failed"):
        if time.monotonic() > deadline:
            raise ValueError(
                f"project {project_id}: export {export.id} not done after "
                f"{timeout:.0f} s (status {status})"
            )
        time.sleep(0.25)
        status = client.projects.exports.get(project_id, export.id).status
    if status != "completed":
        raise ValueError(f"project {project_id}: export {export.id} failed in Label Studio")
    blob = b"".join(client.projects.exports.download(project_id, export.id, export_type="JSON"))
    if not keep:
        client.projects.exports.delete(project_id, export.id)
    try:
        tasks = json.loads(blob)
    except json.JSONDecodeError as exc:
        raise ValueError(f"project {project_id}: export {export.id} is not JSON ({exc})") from exc
    users = dict(known_users or {})
    users.update({str(u.id): str(u.email) for u in client.users.list() if "@" in str(u.email)})
    return {
        "format_version": SNAPSHOT_FORMAT_VERSION,
        "source": "label-studio",
        "project_id": int(project_id),
        "users": users,
        "tasks": tasks,
        "gold": dict(gold or {}),
    }


def export_snapshot(
    client: Any,
    project_id: int,
    out_path: str | os.PathLike[str],
    *,
    gold: Mapping[str, Any] | None = None,
    known_users: Mapping[str, str] | None = None,
) -> Path:
    """Fetch the snapshot (:func:`fetch_snapshot`, with ``gold``, ``known_users``) and write it
    atomically."""
    snap = fetch_snapshot(client, project_id, gold=gold, known_users=known_users)
    with atomic_write(out_path) as fh:
        json.dump(snap, fh, indent=1, sort_keys=True)
    logger.info("project %d: %d tasks exported to %s", project_id, len(snap["tasks"]), out_path)
    return Path(out_path)


def load_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a snapshot written by :func:`export_snapshot` (or a bare Label Studio JSON export)."""
    obj = read_json(path)
    if isinstance(obj, list):
        return {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "source": "label-studio",
            "project_id": None,
            "users": {},
            "tasks": obj,
        }
    if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), list):
        raise ValueError(f"{path}: not a snapshot (expected a task list or {{'tasks': [...]}})")
    if int(obj.get("format_version", 0)) > SNAPSHOT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: snapshot format_version {obj['format_version']} is newer "
            f"than this code ({SNAPSHOT_FORMAT_VERSION})"
        )
    return obj


def _rect_edges(item: Mapping[str, Any]) -> tuple[float, float, float, float]:
    return rect_value_to_edges(item.get("value") or {})


def _prediction_box(
    task: Mapping[str, Any],
) -> tuple[tuple[float, float, float, float] | None, str]:
    """The first landmark rectangle of the task's first prediction (full predictions needed)."""
    for pred in task.get("predictions") or []:
        if not isinstance(pred, Mapping):
            raise ValueError(
                f"task {task.get('id')}: predictions exported as ids only; export "
                "with serialization_options predictions.only_id=False"
            )
        for item in pred.get("result") or []:
            if item.get("from_name") == BOX_FROM_NAME and item.get("type") == "rectanglelabels":
                return _rect_edges(item), str(pred.get("model_version") or "")
    return None, ""


def parse_snapshot(snapshot: Mapping[str, Any]) -> tuple[list[TaskRecord], list[AnnotationRecord]]:
    """Tasks and annotations of a snapshot, in task-id then annotation-id order.

    Raises:
        ValueError: a task without ``data.gld_id`` or a malformed prediction.
    """
    users: Mapping[str, str] = snapshot.get("users") or {}
    gold: Mapping[str, Any] = snapshot.get("gold") or {}
    tasks: list[TaskRecord] = []
    anns: list[AnnotationRecord] = []
    for task in sorted(snapshot["tasks"], key=lambda t: int(t["id"])):
        data = task.get("data") or {}
        if "gld_id" not in data:
            raise ValueError(f"task {task.get('id')}: data has no gld_id (not a gldboxes task)")
        image_id = str(data["gld_id"])
        pred, version = _prediction_box(task)
        tasks.append(
            TaskRecord(
                int(task["id"]),
                image_id,
                int(data.get("width") or 0),
                int(data.get("height") or 0),
                bool(data.get("overlap")),
                gold.get(image_id, data.get("gold")),  # task data: older snapshots
                pred,
                version,
            )
        )
        for ann in sorted(task.get("annotations") or [], key=lambda a: int(a["id"])):
            boxes: list[tuple[float, float, float, float]] = []
            unknown: list[str] = []
            flag = False
            for item in ann.get("result") or []:
                name, kind = item.get("from_name"), item.get("type")
                if name == BOX_FROM_NAME and kind == "rectanglelabels":
                    try:
                        boxes.append(_rect_edges(item))
                    except ValueError as exc:
                        unknown.append(str(exc))
                elif name == FLAG_FROM_NAME and kind == "choices":
                    flag = flag or NO_LANDMARK_CHOICE in (item.get("value") or {}).get(
                        "choices", []
                    )
                else:
                    unknown.append(f"{name}/{kind}")
            by = ann.get("completed_by")
            if isinstance(by, Mapping):
                rater = str(by.get("email") or f"user{by.get('id')}")
            else:
                rater = users.get(str(by), f"user{by}")
            lead = ann.get("lead_time")
            anns.append(
                AnnotationRecord(
                    int(ann["id"]),
                    int(task["id"]),
                    image_id,
                    rater,
                    tuple(boxes),
                    flag,
                    bool(ann.get("was_cancelled")),
                    None if lead is None else float(lead),
                    tuple(unknown),
                )
            )
    return tasks, anns


def progress(tasks: Sequence[TaskRecord], anns: Sequence[AnnotationRecord]) -> dict[str, Any]:
    """Campaign progress: tasks done (enough raters) and, per rater, what they submitted.

    Returns:
        ``{"tasks", "tasks_done", "tasks_started", "annotations", "raters": {email: {
        "submitted", "skipped", "boxes", "no_landmark", "median_lead_time"}}}``.
    """
    per_task: dict[int, set[str]] = {}
    raters: dict[str, dict[str, Any]] = {}
    leads: dict[str, list[float]] = {}
    for a in anns:
        r = raters.setdefault(a.rater, {"submitted": 0, "skipped": 0, "boxes": 0, "no_landmark": 0})
        if a.cancelled:
            r["skipped"] += 1
        else:
            r["submitted"] += 1
            r["boxes"] += int(len(a.boxes) > 0)
            r["no_landmark"] += int(a.flag)
            per_task.setdefault(a.task_id, set()).add(a.rater)
        if a.lead_time is not None:
            leads.setdefault(a.rater, []).append(a.lead_time)
    for name, r in raters.items():
        vals = leads.get(name)
        r["median_lead_time"] = float(np.median(vals)) if vals else None
    needed = {t.task_id: 2 if t.overlap else 1 for t in tasks}
    done = sum(len(per_task.get(tid, ())) >= n for tid, n in needed.items())
    return {
        "tasks": len(tasks),
        "tasks_done": int(done),
        "tasks_started": len(per_task),
        "annotations": len(anns),
        "raters": dict(sorted(raters.items())),
    }


def progress_rates(
    first: Mapping[str, Any], current: Mapping[str, Any], seconds: float
) -> dict[str, Any]:
    """Throughput and ETA between two :func:`progress` snapshots taken ``seconds`` apart.

    Returns:
        ``{"tasks", "tasks_done", "window_s", "tasks_per_hour", "eta_s", "raters": {email:
        {"boxes", "submitted", "boxes_per_hour", "submitted_per_hour"}}}``: rates over the
        window (``current - first``, per hour); ``eta_s`` = tasks left / task rate (0 when done,
        ``None`` while nothing was finished in the window).
    """
    if seconds < 0:
        raise ValueError(f"progress_rates: negative window {seconds} s")
    per_hour = 3600.0 / seconds if seconds > 0 else 0.0
    before: Mapping[str, Mapping[str, Any]] = first.get("raters") or {}
    raters: dict[str, dict[str, Any]] = {}
    for name, r in sorted((current.get("raters") or {}).items()):
        b = before.get(name, {})
        d_boxes = int(r["boxes"]) - int(b.get("boxes", 0))
        d_sub = int(r["submitted"]) - int(b.get("submitted", 0))
        raters[name] = {
            "boxes": int(r["boxes"]),
            "submitted": int(r["submitted"]),
            "boxes_per_hour": d_boxes * per_hour,
            "submitted_per_hour": d_sub * per_hour,
        }
    total, done = int(current["tasks"]), int(current["tasks_done"])
    task_rate = (done - int(first["tasks_done"])) * per_hour
    left = total - done
    eta: float | None
    if left <= 0:
        eta = 0.0
    elif task_rate > 0:
        eta = left / task_rate * 3600.0
    else:
        eta = None
    return {
        "tasks": total,
        "tasks_done": done,
        "window_s": float(seconds),
        "tasks_per_hour": task_rate,
        "eta_s": eta,
        "raters": raters,
    }
