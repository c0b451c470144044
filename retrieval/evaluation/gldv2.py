"""Google Landmarks v2 benchmarks: a benchmark folder from a solution CSV, mAP@100 and GAP.

The GLDv2 challenges (Kaggle 2019-2021, Weyand et al. CVPR 2020) ship their ground truth as
solution CSVs beside the test split (:data:`gldboxes.gld.GLDV2_METADATA`)::

    retrieval_solution_v2.1.csv     id,images,Usage      images: space-separated index ids
    recognition_solution_v2.1.csv   id,landmarks,Usage   landmarks: space-separated ids or empty

``Usage`` is ``Public``, ``Private`` or ``Ignored``; Ignored queries are never scored. The
metrics, as the challenges define them (and the organisers' ``metrics.py`` computes them):

* **mAP@100** (retrieval): for query q with m_q relevant index images and its predictions
  truncated at k = 100, ``AP@k(q) = 1/min(m_q, k) * sum_{i<=k} P_q(i) rel_q(i)``; the mean runs
  over every scored query of the subset, so a query without predictions counts 0. A repeated
  prediction keeps its position but can never be relevant again.
* **GAP** (recognition; micro average precision): each query has at most one prediction
  (landmark, confidence). All predictions sorted by confidence descending,
  ``GAP = 1/M sum_i P(i) rel(i)`` where M counts the queries with at least one ground-truth
  landmark; a prediction for a non-landmark query counts as wrong. Ties in confidence are
  broken as Kaggle does: by query id ascending, then landmark id ascending.

:func:`main` turns a GLDv2 index/test subset (GLD layout ``a/b/c/<id>.jpg``) and a solution
into a Revisited-style folder that ``gldboxes retrieval run --dataset`` accepts::

    BENCH/
        gnd_<name>.json    imlist = index ids, qimlist = test ids, gnd[q] = {easy: positives,
                           hard: [], junk: []}: one positive set per query, no junk
        jpg/<id>.jpg       symbolic links to the GLDv2 images
        gldv2.json         task, per-query Usage, recognition labels (format_version 1)
        config.yaml

Positives are restricted to the index subset (m_q counts the relevant images present), and a
retrieval query left without any is dropped. Because the positives are the ``easy`` list, the
Revisited table of ``retrieval run`` shows them as Easy = Medium (full-list mAP) and Hard as
``nan``; the challenge metric comes from :func:`evaluate_benchmark`
(``gldboxes retrieval evaluate --dataset BENCH --ranks ranks.npy``). A recognition benchmark
needs the landmark of every index image (``--labels``: ``id,landmark_id``, e.g.
``index_image_to_landmark.csv`` or ``train.csv``); its positives are the index images of the
query's landmarks, and the prediction of a query is the landmark of its first-ranked image with
that image's score (``scores.npy`` beside ``ranks.npy``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gldboxes.gld import image_relpath
from gldboxes.io import atomic_dir, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm

__all__ = [
    "FORMAT_VERSION",
    "SUBSETS",
    "GLDv2Solution",
    "Score",
    "confs",
    "evaluate_benchmark",
    "evaluate_submission",
    "export_revisited",
    "format_scores",
    "global_average_precision",
    "global_average_precision_loop",
    "list_images",
    "main",
    "map_at_k",
    "map_at_k_loop",
    "read_labels",
    "read_solution",
    "read_submission",
    "write_submission",
]

logger = logging.getLogger("retrieval.evaluation.gldv2")

FORMAT_VERSION = 1
Task = Literal["retrieval", "recognition"]
USAGES: tuple[str, ...] = ("Public", "Private")
SUBSETS: tuple[str, ...] = ("Public", "Private", "all")
_TRUTH_COLUMN: dict[str, Task] = {"images": "retrieval", "landmarks": "recognition"}

confs: dict[str, dict[str, Any]] = {
    # Both challenge subsets; Ignored queries are always dropped.
    "all": {
        "usage": "all",  # which queries to keep: "all" (Public + Private), "public", "private"
        "k": 100,  # mAP@k cut-off of the retrieval challenge
        "name": None,  # dataset name (gnd_<name>.json); None: gldv2-<task>-<usage>-<hash>
    },
    # The public leaderboard's queries only.
    "public": {"usage": "public", "k": 100, "name": None},
    # The private leaderboard's queries only.
    "private": {"usage": "private", "k": 100, "name": None},
}


# ------------------------------------------------------------------------------------ metrics
def map_at_k(
    predictions: npt.ArrayLike, positives: Sequence[npt.ArrayLike], k: int = 100
) -> tuple[float, np.ndarray]:
    """Mean average precision at k of the GLDv2 retrieval challenge, vectorised.

    Args:
        predictions: predicted index ids best first, one row per query (n_queries, n_pred);
            ``-1`` pads rows with fewer predictions (a row of ``-1``: a query not answered).
            Columns past ``k`` are ignored; a repeated id keeps its position but only its first
            occurrence can be relevant.
        positives: the relevant index ids of each query (n_queries,) of arrays (m_q,), m_q >= 1.
        k: the cut-off (100 in the challenges).

    Returns:
        ``(mAP@k, ap)``: the mean over all queries and the per-query AP@k (n_queries,).

    Raises:
        ValueError: wrong shapes, ``k < 1``, negative ids, or a query without positives.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pred = np.asarray(predictions)
    n_q = len(positives)
    if pred.ndim == 1 and pred.size == 0:
        pred = pred.reshape(n_q, 0)
    if pred.ndim != 2 or pred.shape[0] != n_q:
        raise ValueError(f"predictions must have shape (n_queries={n_q}, n_pred), got {pred.shape}")
    pred = pred[:, :k].astype(np.int64, copy=False)
    pos = [np.unique(np.asarray(p, dtype=np.int64).ravel()) for p in positives]
    npos = np.array([p.size for p in pos], dtype=np.int64)
    if n_q == 0:
        return float("nan"), np.zeros(0)
    empty = np.flatnonzero(npos == 0)
    if empty.size:
        raise ValueError(f"query {int(empty[0])} has no positives: its AP@{k} is undefined")
    pos_ids = np.concatenate(pos)
    if pos_ids.min() < 0 or (pred.size and pred.min() < -1):
        raise ValueError("index ids must be >= 0 (-1 pads predictions)")
    n_pred = pred.shape[1]
    if n_pred == 0:
        return 0.0, np.zeros(n_q)
    # First occurrence of every id in its row: sort each row (stable), mark equal neighbours.
    order = np.argsort(pred, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(pred, order, axis=1)
    dup_sorted = np.zeros(pred.shape, dtype=bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    # Relevance: (query, id) pairs as one int64 key; width > every id so keys never collide.
    width = int(max(int(pred.max()), int(pos_ids.max()))) + 1
    pos_keys = np.repeat(np.arange(n_q, dtype=np.int64), npos) * width + pos_ids
    keys = np.arange(n_q, dtype=np.int64)[:, None] * width + pred
    rel = np.isin(keys, pos_keys) & (pred >= 0) & ~dup
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    precision = hits / np.arange(1, n_pred + 1, dtype=np.float64)
    ap = np.where(rel, precision, 0.0).sum(axis=1) / np.minimum(npos, k)
    return float(ap.mean()), ap


def map_at_k_loop(
    predictions: Sequence[Sequence[Any]], positives: Sequence[Sequence[Any]], k: int = 100
) -> tuple[float, np.ndarray]:
    """Slow, obviously-correct mAP@k (the challenge's definition, query by query).

    ``predictions[q]`` is any sequence of hashable ids (no padding needed).
    """
    ap = np.zeros(len(positives))
    for q, (pred, pos) in enumerate(zip(predictions, positives, strict=True)):
        relevant = set(pos)
        seen: set[Any] = set()
        hits = 0
        total = 0.0
        for i, image in enumerate(list(pred)[:k]):
            if image in seen:
                continue
            seen.add(image)
            if image in relevant:
                hits += 1
                total += hits / (i + 1)
        ap[q] = total / min(len(relevant), k)
    return (float(ap.mean()) if len(ap) else float("nan")), ap


def global_average_precision(
    pred_query: npt.ArrayLike,
    pred_landmark: npt.ArrayLike,
    pred_score: npt.ArrayLike,
    truth: Sequence[npt.ArrayLike],
    query_ids: Sequence[str],
) -> float:
    """Global average precision (micro AP) of the GLDv2 recognition challenge, vectorised.

    Args:
        pred_query: the query of each prediction, an index into ``query_ids`` (n_pred,); at most
            one prediction per query.
        pred_landmark: the predicted landmark ids (n_pred,), >= 0.
        pred_score: the confidences (n_pred,), finite.
        truth: the ground-truth landmarks of each query (n_queries,) of arrays, empty for a
            non-landmark query.
        query_ids: the query ids (n_queries,); ties in confidence are broken by id ascending,
            then landmark ascending (Kaggle's order).

    Returns:
        GAP in [0, 1]: ``1/M sum_i P(i) rel(i)`` over the predictions sorted by confidence
        descending, M = number of queries with at least one ground-truth landmark.

    Raises:
        ValueError: mismatched lengths, a repeated query, negative landmarks, non-finite
            scores, or no query with a ground-truth landmark.
    """
    q = np.asarray(pred_query, dtype=np.int64).ravel()
    lm = np.asarray(pred_landmark, dtype=np.int64).ravel()
    score = np.asarray(pred_score, dtype=np.float64).ravel()
    n_q = len(truth)
    if len(query_ids) != n_q:
        raise ValueError(f"{len(query_ids)} query ids for {n_q} ground-truth entries")
    if not (q.size == lm.size == score.size):
        raise ValueError(f"prediction arrays differ in length: {q.size}, {lm.size}, {score.size}")
    gt = [np.asarray(t, dtype=np.int64).ravel() for t in truth]
    n_gt = np.array([t.size for t in gt], dtype=np.int64)
    m = int((n_gt > 0).sum())
    if m == 0:
        raise ValueError("no query has a ground-truth landmark: GAP is undefined")
    if q.size == 0:
        return 0.0
    if q.min() < 0 or q.max() >= n_q:
        raise ValueError(f"prediction query index outside [0, {n_q})")
    if np.unique(q).size != q.size:
        raise ValueError("more than one prediction for a query (GAP takes one per query)")
    if lm.min() < 0:
        raise ValueError(f"landmark ids must be >= 0, got {int(lm.min())}")
    if not np.all(np.isfinite(score)):
        raise ValueError("prediction confidences must be finite numbers")
    gt_ids = np.concatenate(gt) if gt else np.zeros(0, np.int64)
    width = int(max(int(lm.max()), int(gt_ids.max()) if gt_ids.size else 0)) + 1
    gt_keys = np.repeat(np.arange(n_q, dtype=np.int64), n_gt) * width + gt_ids
    correct = np.isin(q * width + lm, gt_keys)
    id_rank = np.empty(n_q, dtype=np.int64)
    id_rank[np.argsort(np.asarray(query_ids, dtype=str), kind="stable")] = np.arange(n_q)
    order = np.lexsort((lm, id_rank[q], -score))  # score desc, then id asc, then landmark asc
    rel = correct[order]
    precision = np.cumsum(rel, dtype=np.float64) / np.arange(1, rel.size + 1)
    return float(precision[rel].sum() / m)


def global_average_precision_loop(
    predictions: Mapping[str, tuple[int, float]], truth: Mapping[str, Sequence[int]]
) -> float:
    """Slow, obviously-correct GAP: ``predictions[id] = (landmark, confidence)``,
    ``truth[id]`` = ground-truth landmarks (empty for a non-landmark query)."""
    m = sum(1 for t in truth.values() if len(t))
    items = sorted(predictions.items(), key=lambda it: (-it[1][1], it[0], it[1][0]))
    correct = 0
    total = 0.0
    for i, (qid, (landmark, _)) in enumerate(items, start=1):
        if landmark in set(truth[qid]):
            correct += 1
            total += correct / i
    return total / m


# -------------------------------------------------------------------------------------- files
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


# ------------------------------------------------------------------------------ the benchmark
def _positions(ids: Sequence[str], vocabulary: np.ndarray) -> np.ndarray:
    """Position of each id in the sorted ``vocabulary`` (n,), -1 where absent."""
    arr = np.asarray(list(ids), dtype=str)
    if arr.size == 0 or vocabulary.size == 0:
        return np.full(arr.size, -1, dtype=np.int64)
    pos = np.searchsorted(vocabulary, arr).clip(max=vocabulary.size - 1)
    return np.where(vocabulary[pos] == arr, pos, -1).astype(np.int64)


def main(
    conf: Mapping[str, Any],
    index: str | os.PathLike[str],
    test: str | os.PathLike[str],
    solution: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a GLDv2 benchmark folder (see the module docstring) and return it.

    Args:
        conf: a :data:`confs` entry (``usage``, ``k``, ``name``).
        index: the index (retrieval) or labelled (recognition) images: folder or id CSV.
        test: the query images: folder or id CSV.
        solution: ``retrieval_solution_v2.1.csv`` or ``recognition_solution_v2.1.csv``.
        out: the benchmark folder; written atomically, skipped when built from the same inputs.
        labels: recognition only: ``id,landmark_id`` of the index images.
        overwrite: rebuild even if done.

    Raises:
        ValueError: bad inputs (named), no query left, or ``out`` holding something else.
    """
    conf = {**confs["all"], **conf}
    usage = str(conf["usage"]).lower()
    if usage not in ("all", "public", "private"):
        raise ValueError(f"usage must be all, public or private, got {conf['usage']!r}")
    out = Path(out)
    sol = read_solution(solution)
    if sol.task == "recognition" and labels is None:
        raise ValueError(
            f"{sol.path.name} is a recognition solution: give --labels (id,landmark_id of the "
            "index images, e.g. index_image_to_landmark.csv or train.csv)"
        )
    db = list_images(index)
    queries = list_images(test)
    inputs = [index, test, solution] + ([labels] if labels is not None else [])
    key = {
        "conf": conf,
        "inputs": [
            {"path": str(Path(p).resolve()), "mtime_ns": os.stat(p).st_mtime_ns} for p in inputs
        ],
        "n_db": len(db),
        "n_queries": len(queries),
    }
    marker = out / "gldv2.json"
    if marker.is_file():
        same = read_json(marker).get("key") == _plain_key(key)
        if same and not overwrite:
            logger.info("GLDv2 benchmark exists, skipping: %s", out)
            return out
        if not same and not overwrite:
            raise ValueError(f"{out}: a GLDv2 benchmark built from other inputs; use --overwrite")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a GLDv2 benchmark folder; choose another")
    both = sorted(set(db) & set(queries))
    if both:
        raise ValueError(f"{test}: {len(both)} query ids are also index images (first: {both[:3]})")

    db_ids = np.asarray(list(db), dtype=str)  # sorted
    keep_usage = sol.subset({"all": "all", "public": "Public", "private": "Private"}[usage])
    in_test = _positions([sol.ids[i] for i in keep_usage], np.asarray(list(queries), dtype=str))
    chosen = keep_usage[in_test >= 0]
    dropped: dict[str, int] = {
        "not_in_usage": len(sol.ids) - len(keep_usage),
        "not_in_test_images": int((in_test < 0).sum()),
        "ignored": len(sol.ignored),
    }
    meta: dict[str, Any] = {}
    n_ch = int(chosen.size)
    lengths = np.array([len(sol.truth[i]) for i in chosen], dtype=np.int64)
    q_rep = np.repeat(np.arange(n_ch, dtype=np.int64), lengths)
    tokens = [v for i in chosen for v in sol.truth[i]]
    if sol.task == "retrieval":
        flat = _positions(tokens, db_ids)
        meta["positives_outside_index"] = int((flat < 0).sum())
        positives = _group(q_rep[flat >= 0], flat[flat >= 0], n_ch)
        keep = np.array([p.size > 0 for p in positives], dtype=bool)
        dropped["no_positive_in_index"] = int(n_ch - keep.sum())
    elif labels is not None:
        lab = read_labels(labels)
        unlabelled = [i for i in db if i not in lab]
        if unlabelled:
            raise ValueError(
                f"{labels}: {len(unlabelled)} index images have no landmark_id "
                f"(first: {unlabelled[:3]})"
            )
        db_lab = np.array([lab[i] for i in db], dtype=np.int64)
        landmarks = _group(q_rep, np.array([int(v) for v in tokens], dtype=np.int64), n_ch)
        # Join (query, landmark) with the index labels: every index image of the landmark.
        order = np.argsort(db_lab, kind="stable")
        lm_q = np.repeat(np.arange(n_ch, dtype=np.int64), [a.size for a in landmarks])
        lm_flat = np.concatenate(landmarks) if landmarks else np.zeros(0, np.int64)
        lo = np.searchsorted(db_lab[order], lm_flat, side="left")
        hi = np.searchsorted(db_lab[order], lm_flat, side="right")
        images = order[np.repeat(lo, hi - lo) + _ranges(hi - lo)]
        positives = _group(np.repeat(lm_q, hi - lo), images, n_ch)
        keep = np.ones(n_ch, dtype=bool)  # non-landmark queries count in GAP
        meta["query_landmarks"] = [a.tolist() for a in landmarks]
        meta["db_landmarks"] = db_lab.tolist()
        if not lm_flat.size:
            raise ValueError(f"{sol.path}: no selected query has a ground-truth landmark")
    q_ids = [sol.ids[i] for i in chosen[keep]]
    q_usage = [sol.usage[i] for i in chosen[keep]]
    gnd = [
        {"easy": p.tolist(), "hard": [], "junk": []}
        for p, k in zip(positives, keep, strict=True)
        if k
    ]
    if not q_ids:
        raise ValueError(
            f"{sol.path}: no {usage} query of the solution is left among the test images "
            f"{test} with a positive in the index {index} (dropped: {dropped})"
        )
    name = conf["name"] or (
        f"gldv2-{sol.task}-{usage}-"
        + config_hash({"db": db_ids.tolist(), "q": q_ids, "gnd": gnd}, 6)
    )
    with atomic_dir(out) as tmp:
        (tmp / "jpg").mkdir()
        all_ids = (*db_ids.tolist(), *q_ids)
        for image_id in tqdm(all_ids, desc="linking images", unit="img", leave=False):
            src = db.get(image_id) or queries[image_id]
            os.symlink(src.resolve(), tmp / "jpg" / f"{image_id}.jpg")
        write_json(
            tmp / f"gnd_{name}.json",
            {"imlist": db_ids.tolist(), "qimlist": q_ids, "gnd": gnd},
        )
        write_config(tmp, {**conf, "index": index, "test": test, "solution": solution})
        write_json(
            tmp / "gldv2.json",
            {
                "format_version": FORMAT_VERSION,
                "task": sol.task,
                "name": name,
                "k": int(conf["k"]),
                "n_index": len(db_ids),
                "query_usage": q_usage,
                "dropped": dropped,
                **meta,
                "key": _plain_key(key),
            },
        )
    logger.info(
        "GLDv2 %s benchmark %s: %d index images, %d queries (%d Public, %d Private); dropped %s",
        sol.task,
        name,
        len(db_ids),
        len(q_ids),
        q_usage.count("Public"),
        q_usage.count("Private"),
        dropped,
    )
    return out


def _group(query: np.ndarray, values: np.ndarray, n: int) -> list[np.ndarray]:
    """Per query, its sorted distinct values: ``query`` (m,) in [0, n), ``values`` (m,) ints;
    returns n int64 arrays."""
    if query.size == 0:
        return [np.zeros(0, np.int64) for _ in range(n)]
    pairs = np.unique(np.stack([query, values], axis=1).astype(np.int64), axis=0)
    counts = np.bincount(pairs[:, 0], minlength=n)
    return np.split(pairs[:, 1], np.cumsum(counts)[:-1])


def _plain_key(key: Mapping[str, Any]) -> Any:
    import json

    return json.loads(json.dumps(key, default=str, sort_keys=True))


# ------------------------------------------------------------- a Revisited folder as GLDv2
def export_revisited(
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    protocol: str = "medium",
    overwrite: bool = False,
) -> Path:
    """Lay out a Revisited-style folder (roxford5k, rparis6k, the synthetic world) as a GLDv2
    download with a retrieval solution, to try the GLDv2 tools on any benchmark::

        OUT/index/index.csv, OUT/index/images/a/b/c/<id>.jpg     database images (copies)
        OUT/test/test.csv, OUT/test/images/a/b/c/<id>.jpg        queries, cropped to their box
        OUT/test/retrieval_solution_v2.1.csv                     id,images,Usage

    Ids are the image names (a query also in the database gets ``_query`` appended). The
    positives of a query are those of the Revisited ``protocol`` (medium: easy + hard); its
    junk becomes negative (GLDv2 has no junk). Queries alternate Public, Private in file order;
    a query without positives is Ignored (``None``). Written atomically; skipped when done.
    """
    from PIL import Image, ImageOps

    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import protocol_gnd

    ds = RevisitedDataset.load(Path(dataset))
    out = Path(out)
    key = {"dataset": str(ds.root.resolve()), "name": ds.name, "protocol": protocol}
    done = out / "export.json"
    if done.is_file() and read_json(done).get("key") == key and not overwrite:
        logger.info("GLDv2 export exists, skipping: %s", out)
        return out
    if out.exists() and not done.is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a GLDv2 export; choose another folder")
    gnd = protocol_gnd(ds.gnd, protocol)  # type: ignore[arg-type]  # checked there
    missing = ds.missing_images()
    if missing:
        raise ValueError(f"{ds.root}: {len(missing)} images missing (first: {missing[:3]})")
    db = set(ds.imlist)
    q_ids = [f"{n}_query" if n in db else n for n in ds.qimlist]
    rows: list[list[str]] = []
    for j, (qid, g) in enumerate(zip(q_ids, gnd, strict=True)):
        pos = sorted(ds.imlist[i] for i in np.unique(g["ok"]))
        usage = "Public" if j % 2 == 0 else "Private"
        rows.append([qid, " ".join(pos), usage] if pos else [qid, "None", "Ignored"])
    with atomic_dir(out) as tmp:
        for name in ds.imlist:
            dst = tmp / "index" / "images" / image_relpath(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ds.image_path(name), dst)
        for i, (name, qid) in enumerate(zip(ds.qimlist, q_ids, strict=True)):
            dst = tmp / "test" / "images" / image_relpath(qid)
            dst.parent.mkdir(parents=True, exist_ok=True)
            box = ds.query_bbx(i)
            if box is None:
                shutil.copyfile(ds.image_path(name), dst)
                continue
            x1, y1, x2, y2 = box  # the features stage's crop: floor / ceil, clipped
            with Image.open(ds.image_path(name)) as raw:
                im = ImageOps.exif_transpose(raw)  # boxes are in upright pixels
                w, h = im.size
                crop = (
                    max(0, math.floor(x1)),
                    max(0, math.floor(y1)),
                    min(w, math.ceil(x2)),
                    min(h, math.ceil(y2)),
                )
                im.convert("RGB").crop(crop).save(dst, quality=95)
        for split, ids in (("index", ds.imlist), ("test", q_ids)):
            _write_rows(tmp / split / f"{split}.csv", ["id"], [[i] for i in ids])
        _write_rows(tmp / "test" / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], rows)
        write_json(
            tmp / "export.json",
            {"format_version": FORMAT_VERSION, "key": key, "n_index": ds.n_db},
        )
    logger.info("%s as GLDv2 in %s: %d index images, %d queries", ds.name, out, ds.n_db, len(q_ids))
    return out


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True, kw_only=True)
class Score:
    """One challenge metric on the Public, Private and all scored queries.

    Attributes:
        metric: ``mAP@100`` or ``GAP``.
        values: ``{subset: value in [0, 1]}`` (``nan`` for an empty subset).
        queries: ``{subset: number of scored queries}``.
        per_query: per-query AP@k of all queries (retrieval), else empty (n_queries,).
    """

    metric: str
    values: dict[str, float]
    queries: dict[str, int]
    per_query: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            **{
                s: {"value": None if np.isnan(v) else v, "queries": self.queries[s]}
                for s, v in self.values.items()
            },
        }


def _subset_masks(usage: Sequence[str]) -> dict[str, np.ndarray]:
    u = np.asarray(list(usage), dtype=str)
    return {"Public": u == "Public", "Private": u == "Private", "all": np.ones(u.size, bool)}


def _map_score(ap: np.ndarray, usage: Sequence[str], k: int) -> Score:
    masks = _subset_masks(usage)
    return Score(
        metric=f"mAP@{k}",
        values={s: float(ap[m].mean()) if m.any() else float("nan") for s, m in masks.items()},
        queries={s: int(m.sum()) for s, m in masks.items()},
        per_query=ap,
    )


def _gap_score(
    pred_query: np.ndarray,
    pred_landmark: np.ndarray,
    pred_score: np.ndarray,
    truth: Sequence[Sequence[int]],
    query_ids: Sequence[str],
    usage: Sequence[str],
) -> Score:
    values: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s, mask in _subset_masks(usage).items():
        sel = np.flatnonzero(mask)
        counts[s] = int(sel.size)
        if not any(len(truth[i]) for i in sel):
            values[s] = float("nan")
            continue
        new = np.full(len(query_ids), -1, dtype=np.int64)
        new[sel] = np.arange(sel.size)
        keep = mask[pred_query]
        values[s] = global_average_precision(
            new[pred_query[keep]],
            pred_landmark[keep],
            pred_score[keep],
            [truth[i] for i in sel],
            [query_ids[i] for i in sel],
        )
    return Score(metric="GAP", values=values, queries=counts)


def evaluate_submission(
    solution: str | os.PathLike[str] | GLDv2Solution,
    submission: str | os.PathLike[str],
    *,
    k: int = 100,
) -> Score:
    """Score a Kaggle submission CSV against a solution CSV: mAP@k (retrieval) or GAP
    (recognition), on the Public, Private and all scored queries."""
    sol = solution if isinstance(solution, GLDv2Solution) else read_solution(solution)
    sub = read_submission(submission, sol)
    if sol.task == "retrieval":
        vocab = np.unique(np.asarray([v for t in sol.truth for v in t], dtype=str))
        positives = [_positions(t, vocab) for t in sol.truth]
        rows = [sub.get(qid, [])[:k] for qid in sol.ids]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if lengths.size else 0
        pred = np.full((len(rows), width), -1, dtype=np.int64)
        flat = _positions([v for r in rows for v in r], vocab)
        # Unknown ids stay -1 (never relevant); they still take their position.
        pred[np.repeat(np.arange(len(rows)), lengths), _ranges(lengths)] = flat
        _, ap = map_at_k(pred, positives, k)
        return _map_score(ap, sol.usage, k)
    ids = list(sub)
    pos = {qid: i for i, qid in enumerate(sol.ids)}
    pred_query = np.array([pos[q] for q in ids], dtype=np.int64)
    pred_landmark = np.array([int(sub[q][0]) for q in ids], dtype=np.int64)
    pred_score = np.array([float(sub[q][1]) for q in ids], dtype=np.float64)
    truth = [[int(v) for v in t] for t in sol.truth]
    return _gap_score(pred_query, pred_landmark, pred_score, truth, sol.ids, sol.usage)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(n) for n in lengths])`` without the loop."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def _load_benchmark(bench: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from retrieval.evaluation.datasets import RevisitedDataset

    marker = bench / "gldv2.json"
    if not marker.is_file():
        raise ValueError(f"{bench}: not a GLDv2 benchmark (no gldv2.json; build it with gldv2)")
    meta = read_json(marker)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{marker}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    ds = RevisitedDataset.load(bench, meta["name"])
    return meta, {"imlist": ds.imlist, "qimlist": ds.qimlist, "gnd": ds.gnd}


def _load_ranks(path: Path, n_queries: int, n_db: int) -> np.ndarray:
    from retrieval.evaluation.evaluate import validate_ranks

    if not path.is_file():
        raise FileNotFoundError(f"ranks file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc
    try:
        return validate_ranks(arr, n_queries, n_db)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def evaluate_benchmark(
    bench: str | os.PathLike[str], ranks: str | os.PathLike[str], *, k: int | None = None
) -> Score:
    """Score ``ranks.npy`` (n_ranked, n_queries) of ``retrieval run`` on a GLDv2 benchmark.

    Retrieval: mAP@k of the ranking's first k rows (k from the benchmark, 100). Recognition:
    GAP of the predictions "landmark of the first-ranked index image, with its score"
    (``scores.npy`` beside ``ranks.npy``).
    """
    bench, ranks_path = Path(bench), Path(ranks)
    meta, cfg = _load_benchmark(bench)
    r = _load_ranks(ranks_path, len(cfg["qimlist"]), len(cfg["imlist"]))
    usage = meta["query_usage"]
    if meta["task"] == "retrieval":
        kk = int(k or meta["k"])
        _, ap = map_at_k(r[:kk].T, [g["easy"] for g in cfg["gnd"]], kk)
        return _map_score(ap, usage, kk)
    if r.shape[0] == 0:
        raise ValueError(f"{ranks_path}: an empty ranking has no first image to predict from")
    scores_path = ranks_path.parent / "scores.npy"
    if not scores_path.is_file():
        raise FileNotFoundError(f"recognition needs the scores beside the ranks: {scores_path}")
    scores = np.load(scores_path, allow_pickle=False)
    if scores.shape != r.shape:
        raise ValueError(f"{scores_path}: shape {scores.shape} differs from the ranks' {r.shape}")
    db_lab = np.asarray(meta["db_landmarks"], dtype=np.int64)
    n_q = r.shape[1]
    return _gap_score(
        np.arange(n_q, dtype=np.int64),
        db_lab[r[0]],
        scores[0].astype(np.float64),
        meta["query_landmarks"],
        cfg["qimlist"],
        usage,
    )


def write_submission(
    bench: str | os.PathLike[str],
    ranks: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    k: int = 100,
) -> Path:
    """Write the Kaggle submission CSV of a benchmark's ranking (``id,images`` with the top k
    index ids, or ``id,landmarks`` with ``"<landmark> <score>"``), atomically."""
    from gldboxes.io import atomic_write

    bench, ranks_path = Path(bench), Path(ranks)
    meta, cfg = _load_benchmark(bench)
    r = _load_ranks(ranks_path, len(cfg["qimlist"]), len(cfg["imlist"]))
    imlist = np.asarray(cfg["imlist"], dtype=str)
    with atomic_write(path, newline="") as fh:
        w = csv.writer(fh)
        if meta["task"] == "retrieval":
            w.writerow(["id", "images"])
            top = imlist[r[:k].T]
            for qid, row in zip(cfg["qimlist"], top, strict=True):
                w.writerow([qid, " ".join(row.tolist())])
        else:
            scores = np.load(ranks_path.parent / "scores.npy", allow_pickle=False)
            lab = np.asarray(meta["db_landmarks"], dtype=np.int64)[r[0]]
            w.writerow(["id", "landmarks"])
            for qid, lm, s in zip(cfg["qimlist"], lab, scores[0], strict=True):
                w.writerow([qid, f"{int(lm)} {float(s):.6f}"])
    return Path(path)


def format_scores(scores: Mapping[str, Score]) -> str:
    """A Markdown table: one row per ranking, the metric on Public / Private / all (percent,
    with the number of scored queries)."""
    lines = ["| ranking | metric | Public | Private | all |", "|---|---|---|---|---|"]
    for name, sc in scores.items():
        cells = [
            "-" if np.isnan(sc.values[s]) else f"{100 * sc.values[s]:.2f} ({sc.queries[s]})"
            for s in SUBSETS
        ]
        lines.append(f"| {name} | {sc.metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
