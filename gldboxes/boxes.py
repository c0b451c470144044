"""The Google Landmark Boxes format: one ``Box`` model, its CSV files and every box conversion.

A boxes CSV has a header ``id,box`` (ground truth) or ``id,box,score`` (detector output, several
rows per id allowed), with ``box = "ymin xmin ymax xmax"`` normalised to [0, 1].

Conversions (all through :class:`Box`, whose native order is the Google Landmark Boxes one):

========================  ==========================================  =========================
format                    coordinates                                 needs
========================  ==========================================  =========================
``gld`` / ``tf_od``       normalised ``(ymin, xmin, ymax, xmax)``     -
``fiftyone``              relative ``[x, y, w, h]`` (top-left, size)  -
``coco``                  absolute ``[x, y, w, h]`` in pixels         image width and height
``label_studio``          percent ``x, y, width, height`` + rotation  image size if rotated
========================  ==========================================  =========================

Axis-aligned conversions round-trip to float precision (well within 1e-6). A Label Studio
rectangle with a non-zero ``rotation`` (degrees, clockwise on screen, about its top-left corner
``(x, y)``) becomes the axis-aligned box enclosing it, clipped to the image: that conversion is
**lossy** (the rotation is not kept) and needs ``original_width``/``original_height``, because
the rotation happens in pixels, not in percentages.

The official Google Landmark Boxes files (``boxes_split1.csv``: ~54k training boxes,
``boxes_split2.csv``: ~32k validation boxes, from the GLDv1 training set) have the header
``id,box`` and one row per image with ``box = "ymin xmin ymax xmax"`` (normalised top, left,
bottom, right). :func:`read_gld_boxes_csv` reads them and also accepts repeated ids and fields
holding several boxes (a multiple of 4 numbers), which the official files do not use.

Files of ``{image id: [Box]}`` (``gldboxes boxes convert``): boxes CSV here
(:func:`read_boxes_csv`, :func:`write_boxes_csv`); COCO instances JSON and Label Studio JSON
exports in :mod:`gldboxes.box_formats`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gldboxes.io import atomic_write

__all__ = [
    "BOX_FORMATS",
    "OFFICIAL_BOX_FILES",
    "Box",
    "BoxFormat",
    "array_to_boxes",
    "box_iou",
    "boxes_from_label_studio_results",
    "boxes_to_array",
    "check_image_size",
    "convert_boxes",
    "image_id_problem",
    "pairwise_iou",
    "read_boxes_csv",
    "read_gld_boxes_csv",
    "read_official_boxes",
    "validate_boxes",
    "write_boxes_csv",
]

BoxFormat = Literal["gld", "tf_od", "fiftyone", "coco", "label_studio"]
BOX_FORMATS: tuple[str, ...] = ("gld", "tf_od", "fiftyone", "coco", "label_studio")

# The official Google Landmark Boxes release: split name -> file name.
OFFICIAL_BOX_FILES: dict[str, str] = {"train": "boxes_split1.csv", "val": "boxes_split2.csv"}

# Coordinates this close outside [0, 1] are floating-point noise from a conversion and snapped.
_SNAP = 1e-9
_LABEL_STUDIO_RECT_TYPES = frozenset({"rectanglelabels", "rectangle"})


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in normalised image coordinates (Google Landmark Boxes order).

    Attributes:
        ymin, xmin, ymax, xmax: edges in [0, 1], ``ymin < ymax`` and ``xmin < xmax``.
        score: detector confidence, or ``None`` for ground truth.
    """

    ymin: float
    xmin: float
    ymax: float
    xmax: float
    score: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, tol: float = 1e-9) -> None:
        """Raise ``ValueError`` unless the box is finite, inside [0, 1], ordered, non-degenerate."""
        vals = (self.ymin, self.xmin, self.ymax, self.xmax)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"box has a non-finite coordinate: {vals}")
        if min(vals) < -tol or max(vals) > 1 + tol:
            raise ValueError(f"box {vals} is not inside [0, 1] (ymin xmin ymax xmax)")
        if not (self.ymin < self.ymax and self.xmin < self.xmax):
            raise ValueError(f"box {vals} is degenerate or unordered (need ymin<ymax, xmin<xmax)")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"box score must be finite, got {self.score}")

    @property
    def area(self) -> float:
        """Area as a fraction of the image."""
        return (self.ymax - self.ymin) * (self.xmax - self.xmin)

    def to_string(self) -> str:
        """``"ymin xmin ymax xmax"`` as in the CSV, with enough digits to round-trip floats."""
        return " ".join(repr(float(v)) for v in (self.ymin, self.xmin, self.ymax, self.xmax))

    @classmethod
    def from_string(cls, text: str, score: float | None = None) -> Box:
        """Parse ``"ymin xmin ymax xmax"``."""
        parts = text.split()
        if len(parts) != 4:
            raise ValueError(f"box {text!r} must have 4 numbers 'ymin xmin ymax xmax'")
        try:
            y0, x0, y1, x1 = (float(p) for p in parts)
        except ValueError as exc:
            raise ValueError(f"box {text!r} holds a non-number") from exc
        return cls(y0, x0, y1, x1, score)

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer crop ``(x0, y0, x1, y1)`` covering the box: floor of mins, ceil of maxes."""
        x0 = max(0, math.floor(self.xmin * width))
        y0 = max(0, math.floor(self.ymin * height))
        x1 = min(width, math.ceil(self.xmax * width))
        y1 = min(height, math.ceil(self.ymax * height))
        return x0, y0, x1, y1

    # ----------------------------------------------------------------------------- TF OD / GLD
    def to_tf_od(self) -> tuple[float, float, float, float]:
        """TF Object Detection order: normalised ``(ymin, xmin, ymax, xmax)``."""
        return (self.ymin, self.xmin, self.ymax, self.xmax)

    @classmethod
    def from_tf_od(
        cls, values: Sequence[float], score: float | None = None, *, clip: bool = False
    ) -> Box:
        """From normalised ``(ymin, xmin, ymax, xmax)`` (TF OD API, Google Landmark Boxes)."""
        y0, x0, y1, x1 = _four(values, "TF OD (ymin, xmin, ymax, xmax)")
        return _make("TF OD (ymin, xmin, ymax, xmax)", values, y0, x0, y1, x1, score, clip)

    # ------------------------------------------------------------------------------- FiftyOne
    def to_fiftyone(self) -> list[float]:
        """FiftyOne ``bounding_box``: relative ``[x, y, w, h]`` (top-left corner and size)."""
        return [self.xmin, self.ymin, self.xmax - self.xmin, self.ymax - self.ymin]

    @classmethod
    def from_fiftyone(
        cls, values: Sequence[float], score: float | None = None, *, clip: bool = False
    ) -> Box:
        """From FiftyOne's relative ``[x, y, w, h]``."""
        name = "FiftyOne [x, y, w, h]"
        x, y, w, h = _four(values, name)
        _positive_size(name, values, w, h)
        return _make(name, values, y, x, y + h, x + w, score, clip)

    # ----------------------------------------------------------------------------------- COCO
    def to_coco(self, width: float, height: float) -> list[float]:
        """COCO ``bbox``: absolute ``[x, y, w, h]`` in pixels of a ``width`` x ``height`` image."""
        check_image_size(width, height, "COCO")
        return [
            self.xmin * width,
            self.ymin * height,
            (self.xmax - self.xmin) * width,
            (self.ymax - self.ymin) * height,
        ]

    @classmethod
    def from_coco(
        cls,
        values: Sequence[float],
        width: float,
        height: float,
        score: float | None = None,
        *,
        clip: bool = False,
    ) -> Box:
        """From COCO's absolute ``[x, y, w, h]`` in a ``width`` x ``height`` image."""
        name = f"COCO [x, y, w, h] in a {width}x{height} image"
        check_image_size(width, height, "COCO")
        x, y, w, h = _four(values, name)
        _positive_size(name, values, w, h)
        return _make(
            name, values, y / height, x / width, (y + h) / height, (x + w) / width, score, clip
        )

    # ---------------------------------------------------------------------------- Label Studio
    def to_label_studio(
        self, width: int | None = None, height: int | None = None
    ) -> dict[str, float]:
        """A Label Studio rectangle ``value``: percent ``x, y, width, height`` and ``rotation`` 0.

        Args:
            width, height: the original image size; when given, ``original_width`` and
                ``original_height`` are added (Label Studio stores them beside the value).
        """
        out: dict[str, float] = {
            "x": self.xmin * 100.0,
            "y": self.ymin * 100.0,
            "width": (self.xmax - self.xmin) * 100.0,
            "height": (self.ymax - self.ymin) * 100.0,
            "rotation": 0.0,
        }
        if width is not None or height is not None:
            if width is None or height is None:
                raise ValueError("Label Studio export needs both width and height, or neither")
            check_image_size(width, height, "Label Studio")
            out["original_width"] = width
            out["original_height"] = height
        return out

    @classmethod
    def from_label_studio(
        cls,
        value: Mapping[str, Any],
        original_width: float | None = None,
        original_height: float | None = None,
        score: float | None = None,
        *,
        clip: bool = False,
    ) -> Box:
        """From a Label Studio rectangle ``value`` (percent ``x, y, width, height``, ``rotation``).

        A rotated rectangle (``rotation`` not a multiple of 360) becomes the axis-aligned box
        enclosing its four corners, clipped to the image: lossy, and it needs the original size
        (taken from the arguments or from ``value["original_width"/"original_height"]``).

        Args:
            clip: clip an axis-aligned box that sticks out of the image instead of raising
                (Label Studio lets annotators drag a box past the border).
        """
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            rotation = float(value.get("rotation", 0.0) or 0.0)
        except KeyError as exc:
            raise ValueError(f"Label Studio value {dict(value)} lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Label Studio value {dict(value)} holds a non-number") from exc
        name = "Label Studio rectangle (percent x, y, width, height)"
        shown = (x, y, w, h, rotation)
        _positive_size(name, shown, w, h)
        turn = math.remainder(rotation, 360.0)
        if abs(turn) < 1e-9:
            return _make(
                name, shown, y / 100.0, x / 100.0, (y + h) / 100.0, (x + w) / 100.0, score, clip
            )
        ow = original_width if original_width is not None else value.get("original_width")
        oh = original_height if original_height is not None else value.get("original_height")
        if ow is None or oh is None:
            raise ValueError(
                f"{name} {shown} is rotated by {rotation} degrees: converting it "
                "needs original_width and original_height"
            )
        ow, oh = float(ow), float(oh)
        check_image_size(ow, oh, "Label Studio")
        corners = _label_studio_corners(x, y, w, h, rotation, ow, oh)
        xs, ys = corners[:, 0] / ow, corners[:, 1] / oh
        return _make(
            f"rotated {name}",
            shown,
            float(ys.min()),
            float(xs.min()),
            float(ys.max()),
            float(xs.max()),
            score,
            clip=True,
        )


def _label_studio_corners(
    x: float, y: float, w: float, h: float, rotation: float, width: float, height: float
) -> np.ndarray:
    """Pixel corners (4, 2) as (x, y) of a Label Studio rectangle rotated about its top-left."""
    px, py = x / 100.0 * width, y / 100.0 * height
    pw, ph = w / 100.0 * width, h / 100.0 * height
    theta = math.radians(rotation)
    c, s = math.cos(theta), math.sin(theta)
    local = np.array([[0.0, 0.0], [pw, 0.0], [pw, ph], [0.0, ph]])
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.array([px, py])


def _four(values: Sequence[float], name: str) -> tuple[float, float, float, float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} box {values!r} holds a non-number") from exc
    if len(vals) != 4:
        raise ValueError(f"{name} box {values!r} must have 4 numbers, got {len(vals)}")
    return vals[0], vals[1], vals[2], vals[3]


def _positive_size(name: str, values: Any, w: float, h: float) -> None:
    if not (w > 0 and h > 0):  # also catches NaN
        raise ValueError(f"{name} box {values!r} has a non-positive width or height")


def check_image_size(width: float, height: float, fmt: str) -> None:
    """Check an image size (pixels) before a conversion to or from absolute coordinates.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        fmt: the box format being converted (``"COCO"``, ``"Label Studio"``), for the message.

    Raises:
        ValueError: when ``width`` or ``height`` is not a finite positive number.
    """
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"{fmt} conversion needs a positive image size, got {width}x{height}")


def _make(
    name: str,
    values: Any,
    ymin: float,
    xmin: float,
    ymax: float,
    xmax: float,
    score: float | None,
    clip: bool,
) -> Box:
    """Build a Box from converted edges: snap float noise, optionally clip, validate."""
    edges = [ymin, xmin, ymax, xmax]
    lo, hi = (-math.inf, math.inf) if clip else (-_SNAP, 1.0 + _SNAP)
    edges = [min(1.0, max(0.0, v)) if lo <= v <= hi else v for v in edges]
    try:
        return Box(edges[0], edges[1], edges[2], edges[3], score)
    except ValueError as exc:
        raise ValueError(f"{name} box {values!r}: {exc}") from exc


# ------------------------------------------------------------------------------ array versions
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(ymin, xmin, ymax, xmax)``, broadcasting: the one box
    IoU of the toolkit (annotation agreement, autobox, detector AP).

    Args:
        a, b: (..., 4) boxes in the same units; (N, 4) with (N, 4) pairs them, (N, 1, 4) with
            (1, M, 4) compares every pair (see :func:`pairwise_iou`).

    Returns:
        float64 IoU of the broadcast shape, in [0, 1]; 0 where the union is empty (a box with a
        negative extent counts as empty).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ih * iw
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4): (N, M) float64."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(1, -1, 4)
    return box_iou(a, b)


def boxes_to_array(boxes: Iterable[Box]) -> np.ndarray:
    """Stack boxes into a (N, 4) float64 array in ``ymin, xmin, ymax, xmax`` order."""
    arr = np.array([[b.ymin, b.xmin, b.ymax, b.xmax] for b in boxes], dtype=np.float64)
    return arr.reshape(-1, 4)


def array_to_boxes(arr: np.ndarray, scores: np.ndarray | None = None) -> list[Box]:
    """(N, 4) ``ymin, xmin, ymax, xmax`` array (and optional (N,) scores) into ``Box`` objects."""
    arr = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
    validate_boxes(arr)
    sc: list[float | None] = (
        [None] * len(arr) if scores is None else [float(s) for s in np.asarray(scores)]
    )
    return [
        Box(float(r[0]), float(r[1]), float(r[2]), float(r[3]), s)
        for r, s in zip(arr.tolist(), sc, strict=True)
    ]


def validate_boxes(arr: np.ndarray, *, name: str = "boxes", tol: float = 1e-9) -> None:
    """Vectorised :meth:`Box.validate` for a (N, 4) ``ymin, xmin, ymax, xmax`` array.

    Raises:
        ValueError: naming ``name``, the number of bad rows and the first bad row.
    """
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name}: expected an (N, 4) array, got shape {arr.shape}")
    checks = (
        (~np.isfinite(arr).all(axis=1), "non-finite coordinate"),
        (((arr < -tol) | (arr > 1 + tol)).any(axis=1), "not inside [0, 1]"),
        (
            ~((arr[:, 0] < arr[:, 2]) & (arr[:, 1] < arr[:, 3])),
            "degenerate or unordered (need ymin<ymax, xmin<xmax)",
        ),
    )
    for bad, what in checks:
        if bad.any():
            idx = np.flatnonzero(bad)
            raise ValueError(
                f"{name}: {len(idx)} box(es) {what}; first is row {idx[0]}: "
                f"{arr[idx[0]].tolist()} (ymin xmin ymax xmax)"
            )


def convert_boxes(
    arr: np.ndarray,
    src: BoxFormat | str,
    dst: BoxFormat | str,
    *,
    width: float | np.ndarray | None = None,
    height: float | np.ndarray | None = None,
    clip: bool = False,
) -> np.ndarray:
    """Convert an (N, 4) array of boxes between formats, vectorised (no rotation support).

    Args:
        arr: (N, 4) boxes in ``src`` layout (``label_studio`` means percent ``x, y, w, h``
            with rotation 0).
        src, dst: one of :data:`BOX_FORMATS`.
        width, height: image size, scalars or (N,) arrays; required when ``coco`` is involved.
        clip: clip to the image instead of raising on boxes that stick out.

    Returns:
        (N, 4) float64 array in ``dst`` layout. The boxes are validated in normalised form.
    """
    for fmt in (src, dst):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{src} boxes: expected an (N, 4) array, got shape {a.shape}")
    scale: np.ndarray = np.ones((len(a), 4))  # pixels per normalised unit, as (w, h, w, h) per box
    if "coco" in (src, dst):
        if width is None or height is None:
            raise ValueError("COCO conversion needs the image width and height")
        w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(a),))
        h = np.broadcast_to(np.asarray(height, dtype=np.float64), (len(a),))
        if not (np.isfinite(w).all() and np.isfinite(h).all() and (w > 0).all() and (h > 0).all()):
            raise ValueError("COCO conversion needs positive, finite image sizes")
        scale = np.stack([w, h, w, h], axis=1)
    # to normalised ymin, xmin, ymax, xmax
    if src in ("gld", "tf_od"):
        g = a.copy()
    else:
        if src == "label_studio":
            a = a / 100.0
        elif src == "coco":
            a = a / scale
        x, y, bw, bh = a.T
        if not ((bw > 0) & (bh > 0)).all():
            bad = int(np.flatnonzero(~((bw > 0) & (bh > 0)))[0])
            raise ValueError(
                f"{src} boxes: non-positive width or height at row {bad}: "
                f"{np.asarray(arr)[bad].tolist()}"
            )
        g = np.stack([y, x, y + bh, x + bw], axis=1)
    lo, hi = (-np.inf, np.inf) if clip else (-_SNAP, 1.0 + _SNAP)
    near = (g >= lo) & (g <= hi)
    g = np.where(near, np.clip(g, 0.0, 1.0), g)
    validate_boxes(g, name=f"{src} boxes")
    if dst in ("gld", "tf_od"):
        return g
    ymin, xmin, ymax, xmax = g.T
    out = np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=1)
    if dst == "label_studio":
        out *= 100.0
    elif dst == "coco":
        out *= scale
    return out


# ------------------------------------------------------------------------------ Label Studio
def boxes_from_label_studio_results(
    results: Iterable[Mapping[str, Any]],
    *,
    from_name: str | None = None,
    clip: bool = False,
) -> list[Box]:
    """Boxes of the rectangle results of one Label Studio annotation or prediction.

    Args:
        results: the ``result`` list (each item has ``type``, ``value``, ``original_width``,
            ``original_height``); non-rectangle results (choices, polygons) are skipped.
        from_name: keep only results of this control tag.
        clip: clip boxes that stick out of the image instead of raising.

    Returns:
        one ``Box`` per rectangle, with ``score`` from the result when present (predictions).
    """
    out: list[Box] = []
    for res in results:
        if res.get("type") not in _LABEL_STUDIO_RECT_TYPES:
            continue
        if from_name is not None and res.get("from_name") != from_name:
            continue
        value = res.get("value")
        if not isinstance(value, Mapping):
            raise ValueError(f"Label Studio result {res.get('id')!r} has no 'value' mapping")
        score = res.get("score")
        try:
            box = Box.from_label_studio(
                value,
                res.get("original_width"),
                res.get("original_height"),
                None if score is None else float(score),
                clip=clip,
            )
        except ValueError as exc:
            raise ValueError(f"Label Studio result {res.get('id')!r}: {exc}") from exc
        out.append(box)
    return out


# --------------------------------------------------------------------------------- CSV files
def image_id_problem(image_id: object) -> str:
    """What makes ``image_id`` unusable as an image id (it names files: ``<id>.jpg``), or ``""``.

    An id must be a non-empty, printable string without path separators or ``..``.
    """
    if not isinstance(image_id, str) or not image_id.strip():
        return "empty image id"
    if not image_id.isprintable():
        return f"image id {image_id!r} holds non-printable characters"
    if "/" in image_id or "\\" in image_id or ".." in image_id:
        return f"image id {image_id!r} is not a safe file name (no '/', '\\' or '..')"
    return ""


def read_boxes_csv(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Read a boxes CSV into ``{id: [Box, ...]}`` (ids without a box have no entry).

    Raises:
        ValueError: ``"FILE:LINE: what is wrong"`` for a missing header column, a short row,
            an empty or unsafe id (see :func:`image_id_problem`) or a malformed box or score.
    """
    path = Path(path)
    out: dict[str, list[Box]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or "box" not in cols:
            raise ValueError(f"{path}:1: expected header with 'id,box[,score]', got {cols}")
        has_score = "score" in cols
        for row in reader:
            line = reader.line_num  # the row's (last) line; blank lines are skipped
            if row["box"] is None:
                raise ValueError(f"{path}:{line}: expected fields {cols}, got a shorter row")
            problem = image_id_problem(row["id"])
            if problem:
                raise ValueError(f"{path}:{line}: {problem}")
            try:
                score = float(row["score"]) if has_score and row.get("score") else None
                box = Box.from_string(row["box"] or "", score)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc
            out.setdefault(row["id"], []).append(box)
    return out


def read_gld_boxes_csv(path: str | os.PathLike[str], *, clip: bool = False) -> dict[str, list[Box]]:
    """Read an official Google Landmark Boxes file (``boxes_split1.csv``/``boxes_split2.csv``).

    Header ``id,box``; ``box`` is ``"ymin xmin ymax xmax"`` normalised. Tolerated beyond the
    official layout: repeated ids (boxes accumulate), a field with ``4k`` numbers (``k``
    boxes), an empty field (the id maps to an empty list), extra columns (ignored).

    Args:
        clip: clip coordinates into [0, 1] instead of raising.

    Raises:
        ValueError: naming the file, line and what is wrong.
    """
    path = Path(path)
    out: dict[str, list[Box]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected header 'id,box')")
        cols = [c.strip().lower() for c in header]
        if "id" not in cols or "box" not in cols:
            raise ValueError(f"{path}: expected header 'id,box', got {header}")
        i_id, i_box = cols.index("id"), cols.index("box")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(i_id, i_box):
                raise ValueError(f"{path}:{line}: expected {len(cols)} fields, got {row}")
            key, text = row[i_id].strip(), row[i_box]
            problem = image_id_problem(key)
            if problem:
                raise ValueError(f"{path}:{line}: {problem}")
            parts = text.split()
            if len(parts) % 4:
                raise ValueError(
                    f"{path}:{line}: box field {text!r} must hold 4 numbers "
                    "per box (ymin xmin ymax xmax)"
                )
            try:
                nums = [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: box field {text!r} holds a non-number") from exc
            boxes = out.setdefault(key, [])
            for k in range(0, len(nums), 4):
                try:
                    boxes.append(Box.from_tf_od(nums[k : k + 4], clip=clip))
                except ValueError as exc:
                    raise ValueError(f"{path}:{line}: id {key}: {exc}") from exc
    return out


def read_official_boxes(
    directory: str | os.PathLike[str], *, clip: bool = False
) -> dict[str, dict[str, list[Box]]]:
    """Read ``boxes_split1.csv`` (train) and ``boxes_split2.csv`` (val) from ``directory``.

    Returns:
        ``{"train": {id: [Box]}, "val": {id: [Box]}}`` for the files that exist.

    Raises:
        FileNotFoundError: neither file is in ``directory``.
    """
    directory = Path(directory)
    out: dict[str, dict[str, list[Box]]] = {}
    for split, name in OFFICIAL_BOX_FILES.items():
        if (directory / name).exists():
            out[split] = read_gld_boxes_csv(directory / name, clip=clip)
    if not out:
        raise FileNotFoundError(
            f"{directory}: neither {' nor '.join(OFFICIAL_BOX_FILES.values())} found"
        )
    return out


def write_boxes_csv(
    path: str | os.PathLike[str],
    boxes: Mapping[str, Iterable[Box]],
    *,
    with_score: bool | None = None,
) -> Path:
    """Write ``{id: [Box, ...]}`` as a boxes CSV (atomically); ids are written sorted.

    Args:
        with_score: add a ``score`` column; by default when any box has a score.
    """
    items = {k: list(v) for k, v in boxes.items()}
    if with_score is None:
        with_score = any(b.score is not None for bs in items.values() for b in bs)
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "box", "score"] if with_score else ["id", "box"])
        for key in sorted(items):
            for b in items[key]:
                row = [key, b.to_string()]
                if with_score:
                    row.append("" if b.score is None else repr(float(b.score)))
                writer.writerow(row)
    return Path(path)
