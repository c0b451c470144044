"""Annotation campaigns in Label Studio: project, local-files storage, tasks, raters, progress.

Images are never copied into Label Studio: each task points at
``/data/local-files/?d=<path relative to the document root>`` and the project gets a Local
Storage record over the image folder (without it the image URL is 404). Each task's ``data``
carries our own bookkeeping::

    image         the local-files URL shown by <Image>
    gld_id        the image id of the split (the key of the boxes CSV)
    landmark_id   the landmark of the split ("" when unknown)
    width/height  the image size in pixels
    overlap       true when the task goes to two raters (agreement sample)
    gold          null, or {"box": "ymin xmin ymax xmax" | null, "no_landmark": bool}

Pre-annotations travel inline in the import (one prediction per task with ``model_version`` and
``score``); that is ~280 tasks/s against ~5/s for one ``predictions.create`` per task.
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
import requests

from annotation.config import (
    BOX_FROM_NAME,
    DEFAULT_INSTRUCTIONS,
    IMAGE_NAME,
    box_to_rect_value,
    labeling_config,
)
from gldboxes.boxes import Box, read_boxes_csv

__all__ = [
    "ImageItem",
    "ImportResult",
    "Rater",
    "add_rater",
    "best_boxes",
    "connect",
    "create_campaign",
    "existing_task_ids",
    "import_images",
    "local_files_url",
    "prediction_for",
    "read_predictions",
    "read_split",
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
class Rater:
    """A Label Studio user who annotates: id, e-mail and API token (keep the token secret)."""

    id: int
    email: str
    token: str

    def __repr__(self) -> str:  # never print the token
        return f"Rater(id={self.id}, email={self.email!r})"


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What one import did: tasks added, images already present, the new ids by image id."""

    added: int
    skipped: int
    task_ids: dict[str, int]
    seconds: float


def read_split(
    csv_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    read_sizes: bool = True,
) -> list[ImageItem]:
    """Read a split CSV (``id,url[,landmark_id]``, url relative to ``image_root``).

    Args:
        image_root: folder the ``url`` column is relative to (default: the CSV's folder).
        read_sizes: read width/height from each image header (fast: no decoding).

    Raises:
        ValueError: missing columns, an empty id, or an image file that does not exist.
    """
    from PIL import Image

    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    items: list[ImageItem] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or "url" not in cols:
            raise ValueError(f"{csv_path}: expected columns 'id,url[,landmark_id]', got {cols}")
        for line, row in enumerate(reader, start=2):
            if not row["id"]:
                raise ValueError(f"{csv_path}:{line}: empty id")
            path = (root / row["url"]).resolve()
            if not path.is_file():
                raise ValueError(f"{csv_path}:{line}: image {path} does not exist")
            width = height = 0
            if read_sizes:
                with Image.open(path) as im:
                    width, height = im.size
            items.append(
                ImageItem(row["id"], path, str(row.get("landmark_id") or ""), width, height)
            )
    return items


def connect(url: str, token: str) -> Any:
    """A ``label_studio_sdk.LabelStudio`` client for ``url`` (imported lazily)."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=120)


def _session(url: str, token: str) -> requests.Session:
    """A plain HTTP session with the token header, for endpoints the SDK does not cover."""
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {token}"
    sess.headers["User-Agent"] = "gldboxes"
    return sess


def _check(resp: requests.Response, what: str) -> Any:
    if resp.status_code >= 400:
        raise ValueError(f"Label Studio {what}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else None


def create_campaign(
    client: Any,
    *,
    title: str,
    image_dir: str | os.PathLike[str],
    instructions: str = DEFAULT_INSTRUCTIONS,
    description: str = "",
) -> int:
    """Create the project (labeling config, instructions) and its Local Storage record.

    Args:
        client: from :func:`connect`.
        image_dir: absolute folder holding the campaign's images; it must lie under the server's
            ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.

    Returns:
        The project id.
    """
    if not 3 <= len(title) <= 50:
        raise ValueError(f"campaign title {title!r} must have 3 to 50 characters (Label Studio)")
    image_dir = Path(image_dir).resolve()
    if not image_dir.is_dir():
        raise ValueError(f"image_dir {image_dir} is not a folder")
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
    try:
        client.import_storage.local.create(
            project=project.id,
            path=str(image_dir),
            title="campaign images",
            use_blob_urls=False,
        )
    except Exception as exc:  # the SDK's ApiError: remove the project, say what to do
        client.projects.delete(id=project.id)
        detail = " ".join(str(getattr(exc, "body", None) or exc).split())[:200]
        raise ValueError(
            f"Label Studio refused local-files storage for {image_dir} ({detail}); start the "
            "server with --document-root set to a folder holding the images "
            "(gldboxes annotate server start --document-root DIR); no project was left behind"
        ) from exc
    logger.info("created project %d %r over %s", project.id, title, image_dir)
    return int(project.id)


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
    sess = _session(url, token)
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
        body = _check(resp, f"list tasks of project {project_id}")
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


def set_task_overlap(url: str, token: str, task_ids: Iterable[int], overlap: int) -> int:
    """Set how many raters each task needs (``PATCH /api/tasks/<id>``); returns tasks changed."""
    sess = _session(url, token)
    n = 0
    for tid in task_ids:
        _check(
            sess.patch(
                f"{url.rstrip('/')}/api/tasks/{int(tid)}", json={"overlap": overlap}, timeout=60
            ),
            f"set overlap of task {tid}",
        )
        n += 1
    return n


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
            landmark); gold tasks always go to ``overlap_raters`` raters.
        batch_size: tasks per import request.

    Returns:
        An :class:`ImportResult` (the new tasks' ids by image id).
    """
    if not 0.0 <= overlap_fraction <= 1.0:
        raise ValueError(f"overlap_fraction must be in [0, 1], got {overlap_fraction}")
    predictions = predictions or {}
    gold = gold or {}
    if predictions and not model_version:
        raise ValueError("import_images: predictions need a model_version")
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
        gold_data: dict[str, Any] | None = None
        if it.id in gold:
            g = gold[it.id]
            gold_data = {"box": None if g is None else g.to_string(), "no_landmark": g is None}
        data: dict[str, Any] = {
            IMAGE_NAME: local_files_url(it.path, doc_root),
            "gld_id": it.id,
            "landmark_id": it.landmark_id,
            "width": it.width,
            "height": it.height,
            "overlap": bool(ov) or it.id in gold,
            "gold": gold_data,
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
    if model_version and any("predictions" in t for t in tasks):
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
    return ImportResult(len(tasks), len(items) - len(new), new_ids, dt)


def read_predictions(path: str | os.PathLike[str]) -> dict[str, Box]:
    """Pre-annotations from a boxes CSV (detector or autobox output): best box per image."""
    return best_boxes(read_boxes_csv(path))


def add_rater(url: str, admin_token: str, email: str, password: str) -> Rater:
    """Sign a rater up through the organisation's invite link (or log in if the e-mail exists).

    Label Studio only adds a user to the organisation via its invite link (signup without it is
    disabled on our servers) and only hands a user's API token to that user, so this signs up /
    logs in as the rater (``/user/signup/?token=...``, ``/user/login/``) and reads
    ``/api/current-user/token``.
    """
    base = url.rstrip("/")
    admin = _session(url, admin_token)
    users = _check(admin.get(f"{base}/api/users/", timeout=60), "list users")
    exists = any(u.get("email") == email for u in users)
    sess = requests.Session()
    if exists:
        page = f"{base}/user/login/"
    else:
        invite = _check(admin.get(f"{base}/api/invite", timeout=60), "get the invite link")
        page = f"{base}/user/signup/?token={invite['token']}"
    sess.get(page, timeout=60)
    csrf = sess.cookies.get("csrftoken", "")
    resp = sess.post(
        page,
        data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
        headers={"Referer": page},
        timeout=60,
        allow_redirects=False,
    )
    if resp.status_code not in (200, 302):
        raise ValueError(
            f"Label Studio {'login' if exists else 'signup'} of {email} failed: "
            f"HTTP {resp.status_code}"
        )
    tok = sess.get(f"{base}/api/current-user/token", timeout=60)
    who = sess.get(f"{base}/api/current-user/whoami", timeout=60)
    if tok.status_code != 200 or who.status_code != 200 or "token" not in tok.json():
        raise ValueError(
            f"Label Studio {'login' if exists else 'signup'} of {email} failed "
            f"(wrong password, or a password too short/common?): "
            f"HTTP {tok.status_code}"
        )
    return Rater(int(who.json()["id"]), email, str(tok.json()["token"]))
