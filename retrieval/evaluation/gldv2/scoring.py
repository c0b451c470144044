"""Scores on the Public, Private and all scored queries: of a Kaggle submission, or of a ranking.

:func:`evaluate_submission` scores a submission CSV against a solution CSV;
:func:`evaluate_benchmark` scores ``ranks.npy`` of ``retrieval run`` on a benchmark folder
(:func:`retrieval.evaluation.gldv2.main`); :func:`write_submission` writes a ranking as a
submission; :func:`format_scores` is the Markdown table of several :class:`Score`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import read_json
from retrieval.evaluation.gldv2.benchmark import FORMAT_VERSION
from retrieval.evaluation.gldv2.files import GLDv2Solution, read_solution, read_submission
from retrieval.evaluation.gldv2.metrics import (
    concat_ranges,
    global_average_precision,
    id_positions,
    map_at_k,
)

__all__ = [
    "SUBSETS",
    "Score",
    "evaluate_benchmark",
    "evaluate_submission",
    "format_scores",
    "write_submission",
]

SUBSETS: tuple[str, ...] = ("Public", "Private", "all")


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
        positives = [id_positions(t, vocab) for t in sol.truth]
        rows = [sub.get(qid, [])[:k] for qid in sol.ids]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if lengths.size else 0
        pred = np.full((len(rows), width), -1, dtype=np.int64)
        flat = id_positions([v for r in rows for v in r], vocab)
        # Unknown ids stay -1 (never relevant); they still take their position.
        pred[np.repeat(np.arange(len(rows)), lengths), concat_ranges(lengths)] = flat
        _, ap = map_at_k(pred, positives, k)
        return _map_score(ap, sol.usage, k)
    ids = list(sub)
    pos = {qid: i for i, qid in enumerate(sol.ids)}
    pred_query = np.array([pos[q] for q in ids], dtype=np.int64)
    pred_landmark = np.array([int(sub[q][0]) for q in ids], dtype=np.int64)
    pred_score = np.array([float(sub[q][1]) for q in ids], dtype=np.float64)
    truth = [[int(v) for v in t] for t in sol.truth]
    return _gap_score(pred_query, pred_landmark, pred_score, truth, sol.ids, sol.usage)


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
