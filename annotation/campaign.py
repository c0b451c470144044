"""Annotation campaigns in Label Studio: project, local-files storage, tasks, raters, progress.

Images are never copied into Label Studio: each task points at
``/data/local-files/?d=<path relative to the document root>`` and the project gets a Local
Storage record over the image folder (without it the image URL is 404). Each task's ``data``
carries our own bookkeeping::

    image         the local-files URL shown by <Image>
    gld_id        the image id of the split (the key of the boxes CSV)
    landmark_id   the landmark of the split ("" when unknown)
    width/height  the image size in pixels
    overlap       true when the task goes to two raters (agreement sample, and gold tasks)

Gold answers never go into the task data (raters can read it: ``GET /api/tasks/N``): they live
in our own file ``<data dir>/gold/project-<id>.json`` (:func:`save_gold`, :func:`load_gold`),
which ``annotate export`` copies into the snapshot for the agreement and gold-accuracy reports.

Pre-annotations travel inline in the import (one prediction per task with ``model_version`` and
``score``); that is ~280 tasks/s against ~5/s for one ``predictions.create`` per task.

The raters (sign up, list, remove) are :mod:`annotation.raters` and the client
(:func:`connect`) :mod:`annotation.client`; their names are importable from here too.
"""

from __future__ import annotations

import csv
import logging
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from annotation.client import checked_json, connect, token_session
from annotation.config import (
    BOX_FROM_NAME,
    DEFAULT_INSTRUCTIONS,
    IMAGE_NAME,
    box_to_rect_value,
    labeling_config,
)
from annotation.raters import Rater, add_rater, list_raters, remove_rater, removed_raters
from gldboxes.boxes import Box, read_boxes_csv
from gldboxes.io import read_json, write_json

__all__ = [
    "ImageItem",
    "ImportResult",
    "Rater",
    "add_rater",
    "best_boxes",
    "connect",
    "create_campaign",
    "existing_task_ids",
    "gold_path",
    "import_images",
    "list_raters",
    "load_gold",
    "local_files_url",
    "prediction_for",
    "read_predictions",
    "read_split",
    "refresh_predictions",
    "remove_rater",
    "removed_raters",
    "save_gold",
    "set_task_overlap",
]

logger = logging.getLogger("annotation.campaign")


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One image of a split.

    Attributes:
        id: the image id (key of the boxes CSV).
        path: absolute path of the image file.
        landmark_id: landmark of the split, ``""`` when unknown.
        width, height: size in pixels (read from the file header when not given).
    """

    id: str
    path: Path
    landmark_id: str = ""
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What one import did: tasks added, images already present, the new ids by image id,
    and tasks already present whose prediction was replaced (``refresh_predictions``)."""

    added: int
    skipped: int
    task_ids: dict[str, int]
    seconds: float
    refreshed: int = 0


def read_split(
    csv_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    read_sizes: bool = True,
) -> list[ImageItem]:
    """Read a split CSV: ``id,url[,landmark_id]`` or ``id,landmark_id`` as ``gldboxes split``
    writes it.

    Without a ``url`` column each image is found by id under ``image_root`` the way the other
    stages do (:func:`gldboxes.views_base.resolve_image_path`: ``<id>.jpg``, ``jpg/<id>.jpg``,
    the GLD layout ``[images/]a/b/c/<id>.jpg``).

    Args:
        image_root: folder the ``url`` column (or the id layout) is relative to (default: the
            CSV's folder).
        read_sizes: read width/height from each image header (fast: no decoding).

    Raises:
        ValueError: missing columns, an empty id, or an image file that does not exist.
    """
    from PIL import Image

    from gldboxes.views_base import resolve_image_path

    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    items: list[ImageItem] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or ("url" not in cols and "landmark_id" not in cols):
            raise ValueError(
                f"{csv_path}: expected columns 'id,url[,landmark_id]' or 'id,landmark_id', "
                f"got {cols}"
            )
        for line, row in enumerate(reader, start=2):
            if not row["id"]:
                raise ValueError(f"{csv_path}:{line}: empty id")
            path = resolve_image_path(root, row["id"], row.get("url"))
            if not path.is_file():
                where = "" if row.get("url") else f" (no url column: looked under {root})"
                raise ValueError(f"{csv_path}:{line}: image {path} does not exist{where}")
            width = height = 0
            if read_sizes:
                with Image.open(path) as im:
                    width, height = im.size
            items.append(
                ImageItem(row["id"], path, str(row.get("landmark_id") or ""), width, height)
            )
    return items


def create_campaign(
    client: Any,
    *,
    title: str,
    image_dir: str | os.PathLike[str],
    instructions: str = DEFAULT_INSTRUCTIONS,
    description: str = "",
) -> int:
    """Create the project (labeling config, instructions) and its Local Storage record.

    Safe to rerun: a project with the same title is reused (its storage added if it has none);
    when Label Studio refuses the storage of a new project, the project is deleted again.

    Args:
        client: from :func:`connect`.
        image_dir: absolute folder holding the campaign's images; it must lie under the server's
            ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.

    Returns:
        The project id.

    Raises:
        ValueError: bad title or folder; a project of that title serves another folder; Label
            Studio refuses the storage (e.g. local-files serving off, folder outside the root).
    """
    if not 3 <= len(title) <= 50:
        raise ValueError(f"campaign title {title!r} must have 3 to 50 characters (Label Studio)")
    image_dir = Path(image_dir).resolve()
    if not image_dir.is_dir():
        raise ValueError(f"image_dir {image_dir} is not a folder")
    same = [p for p in client.projects.list() if p.title == title]
    if same:
        pid = int(min(p.id for p in same))
        folders = {Path(str(st.path)) for st in client.import_storage.local.list(project=pid)}
        if image_dir in folders:
            logger.info("reusing project %d %r over %s", pid, title, image_dir)
            return pid
        if folders:
            raise ValueError(
                f"project {pid} {title!r} already serves {sorted(map(str, folders))[0]}, not "
                f"{image_dir}: choose another --title"
            )
        _add_local_storage(client, pid, image_dir, delete_on_error=False)
        return pid
    project = client.projects.create(
        title=title,
        description=description,
        label_config=labeling_config(instructions),
        expert_instruction=f"<p>{instructions}</p>",
        show_instruction=True,
        show_skip_button=True,
        maximum_annotations=1,
        overlap_cohort_percentage=100,
        show_collab_predictions=True,
    )
    _add_local_storage(client, int(project.id), image_dir, delete_on_error=True)
    logger.info("created project %d %r over %s", project.id, title, image_dir)
    return int(project.id)


def _add_local_storage(
    client: Any, project_id: int, image_dir: Path, *, delete_on_error: bool
) -> None:
    """Add the Local Storage record of ``image_dir``; on refusal delete the project if asked."""
    try:
        client.import_storage.local.create(
            project=project_id,
            path=str(image_dir),
            title="campaign images",
            use_blob_urls=False,
        )
    except Exception as exc:  # the SDK's ApiError: remove the project, say what to do
        if delete_on_error:
            client.projects.delete(id=project_id)
        detail = " ".join(str(getattr(exc, "body", None) or exc).split())[:200]
        raise ValueError(
            f"Label Studio refused local-files storage for {image_dir} ({detail}); start the "
            "server with --document-root set to a folder holding the images "
            "(gldboxes annotate server start --document-root DIR)"
            + ("; no project was left behind" if delete_on_error else "")
        ) from exc


def local_files_url(path: Path, document_root: Path) -> str:
    """The URL Label Studio serves ``path`` at (``path`` must lie under ``document_root``)."""
    try:
        rel = Path(path).resolve().relative_to(Path(document_root).resolve())
    except ValueError as exc:
        raise ValueError(f"image {path} is not under the document root {document_root}") from exc
    return "/data/local-files/?d=" + urllib.parse.quote(rel.as_posix(), safe="/")


def best_boxes(boxes: Mapping[str, Sequence[Box]]) -> dict[str, Box]:
    """The highest-scoring box of each image (ground truth without score: the first row)."""
    out: dict[str, Box] = {}
    for key, bs in boxes.items():
        if bs:
            out[key] = max(bs, key=lambda b: -np.inf if b.score is None else b.score)
    return out


def prediction_for(box: Box, width: int, height: int, model_version: str) -> dict[str, Any]:
    """An inline prediction (pre-annotation) of one landmark box, ``score`` = box score or 1."""
    score = 1.0 if box.score is None else float(box.score)
    return {
        "model_version": model_version,
        "score": score,
        "result": [
            {
                "id": "prelabel",
                "from_name": BOX_FROM_NAME,
                "to_name": IMAGE_NAME,
                "type": "rectanglelabels",
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "value": box_to_rect_value(box.ymin, box.xmin, box.ymax, box.xmax),
                "score": score,
            }
        ],
    }


def existing_task_ids(
    url: str, token: str, project_id: int, *, page_size: int = 1000
) -> dict[str, int]:
    """``{gld_id: task id}`` of the tasks already in the project (paged ``GET /api/tasks``)."""
    sess = token_session(url, token)
    out: dict[str, int] = {}
    page = 1
    while True:
        resp = sess.get(
            f"{url.rstrip('/')}/api/tasks",
            params={
                "project": str(project_id),
                "page": str(page),
                "page_size": str(page_size),
                "fields": "task_only",
                "include": "id,data",
            },
            timeout=120,
        )
        if resp.status_code == 404 and page > 1:  # past the last page
            break
        body = checked_json(resp, f"list tasks of project {project_id}")
        tasks = body["tasks"] if isinstance(body, dict) else body
        for t in tasks:
            gid = (t.get("data") or {}).get("gld_id")
            if gid is not None:
                out[str(gid)] = int(t["id"])
        total = body.get("total", 0) if isinstance(body, dict) else 0
        if len(tasks) < page_size or page * page_size >= total:
            break
        page += 1
    return out


def set_task_overlap(
    url: str, token: str, task_ids: Iterable[int], overlap: int, *, workers: int = 8
) -> int:
    """Set how many raters each task needs (``PATCH /api/tasks/<id>``); returns tasks changed.

    Label Studio 1.23 has no bulk route for a chosen set of tasks: the import ignores a task's
    ``overlap`` (every new task gets the project's ``maximum_annotations``), setting
    ``maximum_annotations`` back to 1 resets every task of the project, and
    ``overlap_cohort_percentage`` lets the server pick the tasks (not our seeded sample, not the
    gold tasks). So the PATCHes go out ``workers`` at a time, each worker on its own keep-alive
    session (measured in ``benchmarks/annotation_import.py``).
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gldboxes.progress import tqdm

    ids = [int(t) for t in task_ids]
    if workers < 1:
        raise ValueError(f"set_task_overlap: workers must be >= 1, got {workers}")
    local = threading.local()
    base = url.rstrip("/")

    def patch(tid: int) -> None:
        sess = getattr(local, "sess", None)
        if sess is None:
            sess = local.sess = token_session(url, token)
        resp = sess.patch(f"{base}/api/tasks/{tid}", json={"overlap": overlap}, timeout=60)
        checked_json(resp, f"set overlap of task {tid}")

    with ThreadPoolExecutor(max_workers=min(workers, max(len(ids), 1))) as pool:
        for _ in tqdm(pool.map(patch, ids), total=len(ids), desc="task overlap", unit="task"):
            pass
    return len(ids)


def refresh_predictions(
    client: Any,
    *,
    url: str,
    token: str,
    project_id: int,
    task_predictions: Mapping[int, dict[str, Any]],
    batch_size: int = 1000,
) -> int:
    """Replace the predictions of existing tasks (annotations are left as they are).

    Args:
        task_predictions: ``{task id: prediction}`` as :func:`prediction_for` makes them.

    Returns:
        The number of tasks refreshed. Their old predictions are deleted in bulk (Data Manager
        action ``delete_tasks_predictions``) and the new ones imported in bulk
        (``POST /api/projects/<id>/import/predictions``); annotations made from an old prediction
        keep their result (Label Studio only clears their ``parent_prediction`` link).
    """
    ids = sorted(int(t) for t in task_predictions)
    sess = token_session(url, token)
    base = url.rstrip("/")
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        client.actions.create(
            id="delete_tasks_predictions",
            project=project_id,
            selected_items={"all": False, "included": chunk},
        )
        body = [{**task_predictions[tid], "task": tid} for tid in chunk]
        target = f"{base}/api/projects/{project_id}/import/predictions"
        resp = sess.post(target, json=body, timeout=600)
        checked_json(resp, f"import predictions into project {project_id}")
    return len(ids)


def import_images(
    client: Any,
    *,
    url: str,
    token: str,
    project_id: int,
    items: Sequence[ImageItem],
    document_root: str | os.PathLike[str],
    predictions: Mapping[str, Box] | None = None,
    model_version: str = "",
    overlap_fraction: float = 0.0,
    overlap_raters: int = 2,
    gold: Mapping[str, Box | None] | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    refresh: bool = False,
) -> ImportResult:
    """Import images as tasks (idempotent: images already in the project are skipped).

    Args:
        items: the images (see :func:`read_split`); ``width/height`` must be set.
        document_root: the server's local-files document root.
        predictions: ``{image id: Box}`` pre-annotations (at most one box per image).
        model_version: name of the predictions' source (e.g. ``autobox-rootsift``); also made the
            project's active model version so the boxes are shown as pre-annotations.
        overlap_fraction: fraction of the *new* tasks (chosen with ``seed``) given to
            ``overlap_raters`` raters for the agreement report.
        gold: ``{image id: Box or None}`` gold tasks with known answer (``None``: no prominent
            landmark); gold tasks always go to ``overlap_raters`` raters. The answers are not
            put in the tasks (raters can read those): keep them with :func:`save_gold`.
        batch_size: tasks per import request.
        refresh: images already in the project that have a prediction in ``predictions`` get
            it instead of their old ones (:func:`refresh_predictions`; a new ``model_version``
            of the boxes); no task is added twice and annotations are untouched.

    Returns:
        An :class:`ImportResult` (the new tasks' ids by image id).
    """
    if not 0.0 <= overlap_fraction <= 1.0:
        raise ValueError(f"overlap_fraction must be in [0, 1], got {overlap_fraction}")
    predictions = predictions or {}
    gold = gold or {}
    if predictions and not model_version:
        raise ValueError("import_images: predictions need a model_version")
    if refresh and not predictions:
        raise ValueError("import_images: refreshing predictions needs predictions (--predictions)")
    t0 = time.perf_counter()
    present = existing_task_ids(url, token, project_id)
    new = [it for it in items if it.id not in present]
    ids = [it.id for it in new]
    if len(set(ids)) != len(ids):
        raise ValueError("import_images: duplicate image ids in the split")
    rng = np.random.default_rng(seed)
    n_overlap = round(overlap_fraction * len(new))
    overlap_mask = np.zeros(len(new), dtype=bool)
    overlap_mask[rng.permutation(len(new))[:n_overlap]] = True
    doc_root = Path(document_root)
    tasks: list[dict[str, Any]] = []
    for it, ov in zip(new, overlap_mask, strict=True):
        if it.width <= 0 or it.height <= 0:
            raise ValueError(f"image {it.path}: unknown size (read_split(read_sizes=True))")
        data: dict[str, Any] = {
            IMAGE_NAME: local_files_url(it.path, doc_root),
            "gld_id": it.id,
            "landmark_id": it.landmark_id,
            "width": it.width,
            "height": it.height,
            "overlap": bool(ov) or it.id in gold,
        }
        task: dict[str, Any] = {"data": data}
        if it.id in predictions:
            task["predictions"] = [
                prediction_for(predictions[it.id], it.width, it.height, model_version)
            ]
        tasks.append(task)
    for start in range(0, len(tasks), batch_size):
        client.projects.import_tasks(
            id=project_id, request=tasks[start : start + batch_size], return_task_ids=True
        )
    refreshed = 0
    if refresh and predictions:
        sizes = {it.id: (it.width, it.height) for it in items if it.id in present}
        refreshed = refresh_predictions(
            client,
            url=url,
            token=token,
            project_id=project_id,
            task_predictions={
                present[k]: prediction_for(predictions[k], *sizes[k], model_version)
                for k in sizes
                if k in predictions
            },
            batch_size=batch_size,
        )
    if model_version and (refreshed or any("predictions" in t for t in tasks)):
        # only accepted once predictions with this version exist
        client.projects.update(id=project_id, model_version=model_version)
    after = existing_task_ids(url, token, project_id) if tasks else present
    new_ids = {k: v for k, v in after.items() if k not in present}
    if len(new_ids) != len(tasks):
        raise ValueError(
            f"project {project_id}: imported {len(tasks)} tasks but "
            f"{len(new_ids)} new ones are listed"
        )
    double = [new_ids[t["data"]["gld_id"]] for t in tasks if t["data"]["overlap"]]
    if double:
        set_task_overlap(url, token, double, overlap_raters)
    dt = time.perf_counter() - t0
    logger.info(
        "project %d: %d tasks added (%d with 2 raters, %d with predictions), "
        "%d already present, %.1f s",
        project_id,
        len(tasks),
        len(double),
        sum("predictions" in t for t in tasks),
        len(present),
        dt,
    )
    if refreshed:
        logger.info("project %d: predictions of %d tasks replaced", project_id, refreshed)
    return ImportResult(len(tasks), len(items) - len(new), new_ids, dt, refreshed)


def read_predictions(path: str | os.PathLike[str]) -> dict[str, Box]:
    """Pre-annotations from a boxes CSV (detector or autobox output): best box per image."""
    return best_boxes(read_boxes_csv(path))


def gold_path(data_dir: str | os.PathLike[str], project_id: int) -> Path:
    """``<data_dir>/gold/project-<id>.json``: the gold answers of a project (never in its tasks)."""
    return Path(data_dir) / "gold" / f"project-{int(project_id)}.json"


def save_gold(
    data_dir: str | os.PathLike[str], project_id: int, gold: Mapping[str, Box | None]
) -> Path:
    """Add gold answers (``{image id: Box, or None for no prominent landmark}``) to the project's
    gold file (merged with what it holds; written atomically, owner-only folder)."""
    path = gold_path(data_dir, project_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    known = load_gold(data_dir, project_id)
    for key, g in gold.items():
        known[str(key)] = {"box": None if g is None else g.to_string(), "no_landmark": g is None}
    write_json(
        path, {"format_version": 1, "project": int(project_id), "gold": dict(sorted(known.items()))}
    )
    return path


def load_gold(data_dir: str | os.PathLike[str], project_id: int) -> dict[str, dict[str, Any]]:
    """The project's gold answers: ``{image id: {"box": "ymin xmin ymax xmax" | None,
    "no_landmark": bool}}`` (``{}`` when it has none); the snapshot and
    :func:`annotation.quality.agreement` use this form."""
    path = gold_path(data_dir, project_id)
    if not path.exists():
        return {}
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("gold"), dict):
        raise ValueError(f"{path}: not a gold file (needs a 'gold' mapping)")
    if int(obj.get("project", project_id)) != int(project_id):
        raise ValueError(f"{path}: holds project {obj['project']}, not {project_id}")
    return {str(k): dict(v) for k, v in obj["gold"].items()}
