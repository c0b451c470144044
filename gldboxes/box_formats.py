"""Box files in other tools' formats: COCO instances JSON and Label Studio JSON exports.

Both hold ``{image id: [Box]}`` (:class:`gldboxes.boxes.Box`) and are what ``gldboxes boxes
convert`` reads and writes beside the Google Landmark Boxes CSV (:mod:`gldboxes.boxes`):

* COCO instances JSON (:func:`read_coco_json`, :func:`write_coco_json`, :func:`coco_instances`):
  one category ``landmark``, image id = file stem, image sizes from the image files
  (:func:`find_images`) or a size map.
* Label Studio JSON exports (:func:`read_label_studio_json`, reading only; the image id of a task
  by :func:`label_studio_image_id`). Rotated rectangles become their enclosing axis-aligned box
  (lossy, see :meth:`gldboxes.boxes.Box.from_label_studio`).

The per-box conversions live on :class:`gldboxes.boxes.Box`; this module only reads and writes
the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gldboxes.boxes import Box, boxes_from_label_studio_results, check_image_size, image_id_problem
from gldboxes.io import atomic_write

__all__ = [
    "COCO_CATEGORY",
    "IMAGE_SUFFIXES",
    "coco_instances",
    "find_images",
    "label_studio_image_id",
    "read_coco_json",
    "read_label_studio_json",
    "write_coco_json",
]


# --------------------------------------------------------------------------------- COCO files
# The one category of a COCO instances file written by :func:`write_coco_json`.
COCO_CATEGORY: dict[str, Any] = {"id": 1, "name": "landmark", "supercategory": "landmark"}
# Image files looked for under an images folder (:func:`find_images`).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif")


def find_images(root: str | os.PathLike[str]) -> dict[str, Path]:
    """``{stem: path}`` of every image file under ``root`` (recursive; suffix in IMAGE_SUFFIXES).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: two image files share a stem (the image id would be ambiguous).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {root}")
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in found:
            raise ValueError(
                f"{root}: image id {p.stem!r} is ambiguous: {found[p.stem]} and {p} share a stem"
            )
        found[p.stem] = p
    return found


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header (the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def coco_instances(
    boxes: Mapping[str, Iterable[Box]],
    *,
    images: str | os.PathLike[str] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """A COCO instances dict of ``{image id: [Box, ...]}`` with the one category ``landmark``.

    Images get ids 1..N in sorted image-id order and ``file_name`` = their path under
    ``images`` (or ``<id>.jpg`` when the size comes from ``sizes``); annotations get ids 1..M,
    ``bbox`` = pixel ``[x, y, w, h]``, ``area`` = ``w * h``, ``iscrowd`` 0 and ``score`` when the
    box has one (detections). An image id with an empty list is listed without annotations.

    Args:
        images: folder holding ``<id>.<ext>`` (any depth): sizes are read from the headers.
        sizes: ``{image id: (width, height)}`` in pixels; wins over ``images``.

    Raises:
        ValueError: an image id lacks a size, is unsafe, or an image file is unreadable.
    """
    sizes = dict(sizes or {})
    items = {k: list(v) for k, v in boxes.items()}
    for key in items:
        problem = image_id_problem(key)
        if problem:
            raise ValueError(problem)
    need = [k for k in sorted(items) if k not in sizes]
    root = None if images is None else Path(images)
    files: dict[str, Path] = {}
    if need and root is not None:
        found = find_images(root)
        files = {k: found[k] for k in need if k in found}
    missing = [k for k in need if k not in files]
    if missing:
        where = f"under {root}" if root is not None else "(give an images folder or sizes)"
        raise ValueError(
            f"no image size for {len(missing)} of {len(items)} image ids {where}; "
            f"first is {missing[0]!r}"
        )
    out_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for num, key in enumerate(sorted(items), start=1):
        if key in sizes:
            width, height = (int(v) for v in sizes[key])
            file_name = f"{key}.jpg"
        else:
            width, height = _image_size(files[key])
            file_name = files[key].relative_to(root or Path()).as_posix()
        check_image_size(width, height, f"COCO (image {key!r})")
        out_images.append({"id": num, "file_name": file_name, "width": width, "height": height})
        for b in items[key]:
            bbox = b.to_coco(width, height)
            ann: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": num,
                "category_id": COCO_CATEGORY["id"],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if b.score is not None:
                ann["score"] = float(b.score)
            annotations.append(ann)
    return {
        "info": {"description": "landmark boxes written by gldboxes"},
        "licenses": [],
        "images": out_images,
        "annotations": annotations,
        "categories": [dict(COCO_CATEGORY)],
    }


def write_coco_json(
    path: str | os.PathLike[str],
    boxes: Mapping[str, Iterable[Box]],
    *,
    images: str | os.PathLike[str] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Write ``{id: [Box, ...]}`` as a COCO instances JSON file (atomically); see
    :func:`coco_instances` for the layout and the arguments."""
    data = coco_instances(boxes, images=images, sizes=sizes)
    with atomic_write(path) as fh:
        json.dump(data, fh)
        fh.write("\n")
    return Path(path)


def _number(obj: Mapping[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    return float(value)


def read_coco_json(path: str | os.PathLike[str], *, clip: bool = False) -> dict[str, list[Box]]:
    """Read a COCO instances JSON file into ``{image id: [Box, ...]}``, normalised.

    The image id is the stem of the image's ``file_name``; every image is a key (an empty list
    when it has no annotation). Every annotation is read, whatever its category; ``score`` is
    kept when present. A detection *results* file (a bare list) holds no image sizes and is
    refused.

    Args:
        clip: clip boxes that stick out of the image instead of raising.

    Raises:
        ValueError: ``"FILE: what is wrong"`` for anything but a valid instances file.
    """
    from gldboxes.io import read_json

    path = Path(path)
    data = read_json(path)
    if isinstance(data, list):
        raise ValueError(
            f"{path}: a COCO detection results list has no image sizes; expected an "
            "instances file (an object with 'images' and 'annotations')"
        )
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise ValueError(
            f"{path}: not a COCO instances file (expected an object with 'images' and "
            "'annotations' lists)"
        )
    by_num: dict[Any, tuple[str, float, float]] = {}
    out: dict[str, list[Box]] = {}
    for i, img in enumerate(data["images"]):
        try:
            if not isinstance(img, dict) or "id" not in img:
                raise ValueError("expected an object with 'id'")
            name = img.get("file_name")
            if not isinstance(name, str):
                raise ValueError(f"'file_name' must be a string, got {name!r}")
            key = Path(name.replace("\\", "/")).stem
            problem = image_id_problem(key)
            if problem:
                raise ValueError(problem)
            width, height = _number(img, "width"), _number(img, "height")
            check_image_size(width, height, "COCO")
            if img["id"] in by_num:
                raise ValueError(f"image id {img['id']!r} is repeated")
            if key in out:
                raise ValueError(f"two images have the file stem {key!r}")
        except ValueError as exc:
            raise ValueError(f"{path}: images[{i}]: {exc}") from exc
        by_num[img["id"]] = (key, width, height)
        out[key] = []
    for i, ann in enumerate(data["annotations"]):
        try:
            if not isinstance(ann, dict):
                raise ValueError("expected an object")
            if ann.get("image_id") not in by_num:
                raise ValueError(f"image_id {ann.get('image_id')!r} is not in 'images'")
            key, width, height = by_num[ann["image_id"]]
            bbox = ann.get("bbox")
            if not isinstance(bbox, list):
                raise ValueError(f"'bbox' must be a list [x, y, w, h], got {bbox!r}")
            score = _number(ann, "score") if ann.get("score") is not None else None
            box = Box.from_coco(bbox, width, height, score, clip=clip)
        except ValueError as exc:
            raise ValueError(f"{path}: annotations[{i}]: {exc}") from exc
        out[key].append(box)
    return out


# ----------------------------------------------------------------------- Label Studio exports
def label_studio_image_id(data: Mapping[str, Any], image_key: str = "image") -> str:
    """The image id of a Label Studio task's ``data``: ``gld_id`` (our campaigns), else the
    file stem of the image URL (``d=`` of a local-files URL, else the URL path).

    Raises:
        ValueError: neither is there, or the id is unsafe (see :func:`image_id_problem`).
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    if data.get("gld_id") is not None:
        key = str(data["gld_id"])
    else:
        url = data.get(image_key)
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"task data has neither 'gld_id' nor an {image_key!r} URL")
        parts = urlsplit(url)
        local = parse_qs(parts.query).get("d")
        name = local[0] if local else unquote(parts.path)
        key = Path(name.replace("\\", "/")).stem
    problem = image_id_problem(key)
    if problem:
        raise ValueError(problem)
    return key


def read_label_studio_json(
    path: str | os.PathLike[str],
    *,
    from_name: str | None = None,
    clip: bool = False,
) -> dict[str, list[Box]]:
    """Read a Label Studio JSON export (a list of tasks) into ``{image id: [Box, ...]}``.

    Also accepts our snapshot envelope (``{"tasks": [...]}``, :mod:`annotation.export`). The
    rectangles of every annotation that was not cancelled are read (predictions are not);
    polygons, choices and other results are skipped. Rotated rectangles become their enclosing
    axis-aligned box (lossy, see :meth:`Box.from_label_studio`). The image id is given by
    :func:`label_studio_image_id`; every task is a key.

    Args:
        from_name: keep only rectangles of this control tag.
        clip: clip boxes that stick out of the image instead of raising.

    Raises:
        ValueError: ``"FILE: task N: what is wrong"``.
    """
    from gldboxes.io import read_json

    path = Path(path)
    data = read_json(path)
    tasks = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    out: dict[str, list[Box]] = {}
    for i, task in enumerate(tasks):
        where = f"{path}: task {task.get('id', i) if isinstance(task, dict) else i}"
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ValueError("expected an object with a 'data' object")
            key = label_studio_image_id(task["data"])
            boxes = out.setdefault(key, [])
            for ann in task.get("annotations") or []:
                if not isinstance(ann, dict):
                    raise ValueError("an annotation is not an object")
                if ann.get("was_cancelled"):
                    continue
                results = ann.get("result") or []
                if not isinstance(results, list):
                    raise ValueError(f"annotation {ann.get('id')!r}: 'result' is not a list")
                boxes += boxes_from_label_studio_results(results, from_name=from_name, clip=clip)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return out
