"""The Google Landmark Boxes format: one ``Box`` model and its CSV reader/writer.

A boxes CSV has a header ``id,box`` (ground truth) or ``id,box,score`` (detector output, several
rows per id allowed), with ``box = "ymin xmin ymax xmax"`` normalised to [0, 1].
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gldboxes.io import atomic_write

__all__ = ["Box", "read_boxes_csv", "write_boxes_csv"]


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


def read_boxes_csv(path: str | os.PathLike[str]) -> dict[str, list[Box]]:
    """Read a boxes CSV into ``{id: [Box, ...]}`` (ids without a box have no entry).

    Raises:
        ValueError: missing header columns or a malformed row, naming the file and line.
    """
    path = Path(path)
    out: dict[str, list[Box]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or "box" not in cols:
            raise ValueError(f"{path}: expected header with 'id,box[,score]', got {cols}")
        has_score = "score" in cols
        for line, row in enumerate(reader, start=2):
            try:
                score = float(row["score"]) if has_score and row.get("score") else None
                box = Box.from_string(row["box"] or "", score)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc
            out.setdefault(row["id"], []).append(box)
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
