"""The GLDv2 challenge metrics, vectorised, each with its slow, obviously-correct twin.

:func:`map_at_k` (retrieval, mAP@100) and :func:`global_average_precision` (recognition, GAP) as
the challenges define them (see :mod:`retrieval.evaluation.gldv2`); :func:`map_at_k_loop` and
:func:`global_average_precision_loop` compute the same query by query, for the tests.
:func:`id_positions` and :func:`concat_ranges` turn id lists into the integer arrays the metrics
take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "concat_ranges",
    "global_average_precision",
    "global_average_precision_loop",
    "id_positions",
    "map_at_k",
    "map_at_k_loop",
]


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


def id_positions(ids: Sequence[str], vocabulary: np.ndarray) -> np.ndarray:
    """Position of each id in the sorted ``vocabulary``, -1 where absent.

    Args:
        ids: n image or landmark ids.
        vocabulary: (V,) sorted string array.

    Returns:
        (n,) int64 positions into ``vocabulary``.
    """
    arr = np.asarray(list(ids), dtype=str)
    if arr.size == 0 or vocabulary.size == 0:
        return np.full(arr.size, -1, dtype=np.int64)
    pos = np.searchsorted(vocabulary, arr).clip(max=vocabulary.size - 1)
    return np.where(vocabulary[pos] == arr, pos, -1).astype(np.int64)


def concat_ranges(lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(n) for n in lengths])`` without the loop.

    Args:
        lengths: (m,) non-negative integer lengths.

    Returns:
        (lengths.sum(),) int64: 0..lengths[0]-1, then 0..lengths[1]-1, and so on.
    """
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts
