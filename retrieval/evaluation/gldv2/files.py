"""The GLDv2 files: solution, submission and labels CSVs, and the images of a subset.

:func:`read_solution` parses ``retrieval_solution_v2.1.csv`` / ``recognition_solution_v2.1.csv``
into a :class:`GLDv2Solution` (Ignored rows set apart); :func:`read_submission` reads a Kaggle
submission for it; :func:`read_labels` reads ``id,landmark_id``; :func:`list_images` finds the
images of a folder or an id CSV in the GLD layout ``a/b/c/<id>.jpg``. Every error names the file
and line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gldboxes.gld import image_relpath

__all__ = [
    "USAGES",
    "GLDv2Solution",
    "Task",
    "list_images",
    "read_labels",
    "read_solution",
    "read_submission",
    "write_csv_rows",
]

Task = Literal["retrieval", "recognition"]
USAGES: tuple[str, ...] = ("Public", "Private")
_TRUTH_COLUMN: dict[str, Task] = {"images": "retrieval", "landmarks": "recognition"}


@dataclass(frozen=True, kw_only=True)
class GLDv2Solution:
    """A parsed solution CSV (Ignored rows set apart).

    Attributes:
        task: ``retrieval`` (``id,images,Usage``) or ``recognition`` (``id,landmarks,Usage``).
        ids: scored query ids (n,), in file order.
        usage: ``Public`` or ``Private`` per query (n,).
        truth: per query, the relevant index ids (retrieval, never empty) or the landmark ids
            (recognition, as strings of integers; empty for a non-landmark query).
        ignored: ids of the Ignored rows.
        path: the file read.
    """

    task: Task
    ids: list[str]
    usage: list[str]
    truth: list[list[str]]
    ignored: frozenset[str]
    path: Path

    def subset(self, usage: str) -> np.ndarray:
        """Indices of the queries of one subset (``Public``, ``Private`` or ``all``) (n_sub,)."""
        if usage == "all":
            return np.arange(len(self.ids))
        return np.flatnonzero(np.asarray(self.usage, dtype=str) == usage)


def _read_rows(path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty {what} (expected a header row)")
    return [c.strip() for c in rows[0]], [r for r in rows[1:] if r]


def read_solution(path: str | os.PathLike[str]) -> GLDv2Solution:
    """Read ``retrieval_solution_v2.1.csv`` or ``recognition_solution_v2.1.csv``.

    Raises:
        ValueError: an unknown header, a Usage other than Public/Private/Ignored, a repeated
            id, a scored retrieval query without images, or a non-integer landmark id.
    """
    path = Path(path)
    header, rows = _read_rows(path, "solution CSV")
    if len(header) != 3 or header[0] != "id" or header[1] not in _TRUTH_COLUMN:
        raise ValueError(
            f"{path}: expected the header id,images,Usage or id,landmarks,Usage, got "
            f"{','.join(header)}"
        )
    task = _TRUTH_COLUMN[header[1]]
    ids: list[str] = []
    usage: list[str] = []
    truth: list[list[str]] = []
    ignored: set[str] = set()
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        if len(row) != 3:
            raise ValueError(f"{path}:{line}: expected 3 fields, got {len(row)}")
        qid, values, use = row[0].strip(), row[1].split(), row[2].strip()
        if qid in seen:
            raise ValueError(f"{path}:{line}: query id {qid!r} is repeated")
        seen.add(qid)
        if use == "Ignored":
            ignored.add(qid)
            continue
        if use not in USAGES:
            raise ValueError(f"{path}:{line}: Usage {use!r} is not Public, Private or Ignored")
        if task == "retrieval" and (not values or values == ["None"]):
            raise ValueError(f"{path}:{line}: {use} query {qid!r} has no index images")
        if task == "recognition" and not all(v.isdigit() for v in values):
            raise ValueError(f"{path}:{line}: landmark ids must be integers, got {row[1]!r}")
        ids.append(qid)
        usage.append(use)
        truth.append(values)
    return GLDv2Solution(
        task=task, ids=ids, usage=usage, truth=truth, ignored=frozenset(ignored), path=path
    )


def read_submission(path: str | os.PathLike[str], solution: GLDv2Solution) -> dict[str, list[str]]:
    """Read a Kaggle submission CSV for ``solution``: ``id,images`` (index ids best first) or
    ``id,landmarks`` (``"<landmark_id> <confidence>"``, or empty for no prediction).

    Rows of Ignored queries are skipped; queries missing from the file have no predictions.

    Returns:
        ``{query id: tokens}``: index ids (retrieval) or ``[landmark, confidence]``.

    Raises:
        ValueError: a header not matching the solution's task, a repeated or unknown query id,
            or a malformed recognition prediction.
    """
    path = Path(path)
    header, rows = _read_rows(path, "submission CSV")
    column = "images" if solution.task == "retrieval" else "landmarks"
    if len(header) < 2 or header[0] != "id" or header[1] != column:
        raise ValueError(
            f"{path}: a {solution.task} submission has the header id,{column}, got "
            f"{','.join(header)}"
        )
    known = set(solution.ids)
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        qid = row[0].strip()
        if qid in seen:
            raise ValueError(f"{path}:{line}: query id {qid!r} is repeated")
        seen.add(qid)
        if qid in solution.ignored:
            continue
        if qid not in known:
            raise ValueError(f"{path}:{line}: query id {qid!r} is not in {solution.path.name}")
        tokens = row[1].split() if len(row) > 1 else []
        if solution.task == "recognition" and tokens:
            if len(tokens) != 2 or not tokens[0].isdigit():
                raise ValueError(
                    f"{path}:{line}: expected '<landmark_id> <confidence>', got {row[1]!r}"
                )
            try:
                float(tokens[1])
            except ValueError as exc:
                raise ValueError(
                    f"{path}:{line}: confidence {tokens[1]!r} is not a number"
                ) from exc
        if tokens:
            out[qid] = tokens
    return out


def read_labels(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{image id: landmark id}`` from a CSV with ``id`` and ``landmark_id`` columns
    (``train.csv``, ``index_image_to_landmark.csv``)."""
    path = Path(path)
    header, rows = _read_rows(path, "labels CSV")
    if "id" not in header or "landmark_id" not in header:
        raise ValueError(f"{path}: expected columns id and landmark_id, got {','.join(header)}")
    ci, cl = header.index("id"), header.index("landmark_id")
    out: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            out[row[ci].strip()] = int(row[cl])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{line}: bad row {row!r} ({exc})") from exc
    return out


def list_images(source: str | os.PathLike[str]) -> dict[str, Path]:
    """The images of a GLDv2 subset: ``{image id: path}``, sorted by id.

    Args:
        source: a folder (searched recursively for ``*.jpg``; the id is the file stem, as in the
            GLD layout ``a/b/c/<id>.jpg``), or a CSV with an ``id`` column (``index.csv``,
            ``test.csv``) whose images are in ``images/a/b/c/<id>.jpg`` beside it, as
            ``gldboxes download gldv2`` stores them.

    Raises:
        FileNotFoundError: no such folder or file.
        ValueError: no images, an id found twice, or images of the CSV missing on disk.
    """
    source = Path(source)
    found: dict[str, Path] = {}
    if source.is_dir():
        for p in source.rglob("*.jpg"):
            if p.stem in found:
                raise ValueError(
                    f"{source}: image id {p.stem!r} found twice ({found[p.stem]}, {p})"
                )
            found[p.stem] = p
    elif source.is_file():
        header, rows = _read_rows(source, "image list CSV")
        if "id" not in header:
            raise ValueError(f"{source}: expected an id column, got {','.join(header)}")
        ci = header.index("id")
        root = source.parent / "images"
        for row in rows:
            found[row[ci].strip()] = root / image_relpath(row[ci].strip())
        missing = [i for i, p in found.items() if not p.is_file()]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} of {len(found)} images are missing under {root} "
                f"(first: {missing[:3]}); download them or give the image folder instead"
            )
    else:
        raise FileNotFoundError(f"image folder or CSV not found: {source}")
    if not found:
        raise ValueError(f"{source}: no .jpg images found")
    return dict(sorted(found.items()))


def write_csv_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write a CSV file: the ``header`` row, then ``rows`` (each a list of cell strings)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
