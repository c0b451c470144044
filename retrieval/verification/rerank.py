"""Re-ranking by spatial verification: a shortlist, or a Revisited ranking under every protocol.

Re-ranking never punishes a lack of evidence: a pair with fewer than ``min_inliers`` inliers is
*unverified* and keeps its first-stage order among the unverified; verified pairs go ahead of
them, by inliers (then first-stage score, then position).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.verification.conf import LocalFeatures, VerificationConf, as_conf, check_backend
from retrieval.verification.pairs import verify_many

__all__ = ["RerankResult", "RevisitedRerank", "rerank", "rerank_revisited"]

logger = logging.getLogger("retrieval.verification")


@dataclass(frozen=True)
class RerankResult:
    """A re-ranked list.

    Attributes:
        ids: all input ids; the first ``top_n`` re-ranked by (inliers, first-stage score), the
            rest in their original order.
        inliers: (top_n,) int64 inlier counts of the re-ranked head, in the new order.
        order: (n,) int64 permutation: ``ids[r] == shortlist[order[r]]``.
    """

    ids: list[Hashable]
    inliers: np.ndarray
    order: np.ndarray


def _rerank_order(inliers: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    """Order (n,) of a shortlist by inliers desc, then score desc, then original position."""
    pos = np.arange(inliers.size)
    keys = [pos] if scores is None else [pos, -np.asarray(scores, dtype=np.float64)]
    return np.lexsort((*keys, -inliers)).astype(np.int64)


def rerank(
    query: LocalFeatures,
    db: Mapping[Any, LocalFeatures],
    shortlist: Sequence[Hashable],
    scores: npt.ArrayLike | None = None,
    *,
    top_n: int = 100,
    conf: VerificationConf | None = None,
    num_workers: int | None = None,
    cache: MutableMapping[Any, int] | None = None,
    backend: str = "numba",
    **overrides: Any,
) -> RerankResult:
    """Re-rank the head of a first-stage list by spatial verification.

    Args:
        query: the query's features.
        db: features by id (read once by the caller and held in memory).
        shortlist: ids best first; the caller removes the protocol's junk beforehand.
        scores: (n,) first-stage scores of ``shortlist`` (tie-break; default: list order).
        top_n: how many of the head to verify and re-rank.
        conf: verification settings; keyword overrides accepted (``threshold=...``).
        num_workers: threads for the pairs (default: CPU count, at most 8).
        cache: ``{db id: inliers}`` already computed for this query (filled in), so other
            protocols' shortlists reuse pairs.
        backend: ``"numba"`` or ``"numpy"`` (same results).

    Returns:
        :class:`RerankResult`.
    """
    check_backend(backend)
    c = as_conf(conf, overrides)
    ids = list(shortlist)
    if top_n < 0:
        raise ValueError(f"rerank: top_n must be >= 0, got {top_n}")
    sc = None if scores is None else np.asarray(scores, dtype=np.float64)
    if sc is not None and sc.shape != (len(ids),):
        raise ValueError(f"rerank: scores has shape {sc.shape}, expected ({len(ids)},)")
    head = ids[:top_n]
    missing = [i for i in head if i not in db]
    if missing:
        raise ValueError(f"rerank: no features for shortlist id(s) {missing[:3]}")
    store: MutableMapping[Any, int] = {} if cache is None else cache
    todo = [i for i in dict.fromkeys(head) if i not in store]
    for i, n in zip(
        todo,
        verify_many([(query, db[i]) for i in todo], c, num_workers, backend=backend),
        strict=True,
    ):
        store[i] = n
    inl = np.array([store[i] for i in head], dtype=np.int64)
    order_head = _rerank_order(inl, None if sc is None else sc[: len(head)])
    order = np.concatenate([order_head, np.arange(len(head), len(ids), dtype=np.int64)])
    return RerankResult([ids[o] for o in order], inl[order_head], order)


@dataclass
class RevisitedRerank:
    """Spatial verification of a Revisited ranking, all protocols from one pass.

    Attributes:
        ranks: ``{protocol: (n_db, n_q) int64}`` re-ranked rankings (revisitop layout).
        inliers: ``{(query index, db index): inliers}`` of every verified pair.
        seconds_per_query: wall time of the verification divided by the number of queries.
        pairs: number of distinct pairs verified.
    """

    ranks: dict[str, np.ndarray]
    inliers: dict[tuple[int, int], int] = field(default_factory=dict)
    seconds_per_query: float = 0.0
    pairs: int = 0


def _protocol_head(col: np.ndarray, junk: np.ndarray, top_n: int) -> np.ndarray:
    """Positions (in ``col``) of the first ``top_n`` non-junk items."""
    ok = ~np.isin(col, junk)
    return np.nonzero(ok)[0][:top_n]


def rerank_revisited(
    ranks: npt.ArrayLike,
    gnd: Sequence[Mapping[str, Any]],
    query_features: Sequence[LocalFeatures],
    db_features: Mapping[int, LocalFeatures],
    *,
    scores: npt.ArrayLike | None = None,
    top_n: int = 100,
    protocols: Sequence[str] = ("easy", "medium", "hard"),
    conf: VerificationConf | None = None,
    num_workers: int | None = None,
    backend: str = "numba",
) -> RevisitedRerank:
    """Spatially verify a Revisited ranking under every protocol in one pass.

    Per query and protocol the head is the first ``top_n`` database images that are not junk
    under that protocol; the union of the heads is verified once (pairs of all queries in one
    thread pool), then each protocol's head is re-ranked by (inliers, first-stage order) and
    followed by the rest of the ranking in its original order.

    Args:
        ranks: (n_db or fewer, n_q) database indices best first.
        gnd: per-query ``easy``, ``hard``, ``junk`` lists (Revisited ground truth).
        query_features: n_q query features (extracted on the cropped query).
        db_features: features by database index, for at least every index in the heads.
        scores: optional (n_ranked, n_q) first-stage scores aligned with ``ranks`` (tie-break).
        top_n: head size (paper: 100).
        protocols: which of easy / medium / hard to produce.
        conf: verification settings.
        num_workers: threads (default: CPU count, at most 8).
        backend: ``"numba"`` or ``"numpy"`` (same results).
    """
    from retrieval.evaluation.evaluate import protocol_gnd, validate_ranks

    check_backend(backend)
    c = conf or VerificationConf()
    nq = len(gnd)
    r = validate_ranks(ranks, nq)
    if len(query_features) != nq:
        raise ValueError(f"rerank_revisited: {len(query_features)} query features for {nq} queries")
    sc = None if scores is None else np.asarray(scores, dtype=np.float64)
    if sc is not None and sc.shape != r.shape:
        raise ValueError(f"rerank_revisited: scores shape {sc.shape} != ranks shape {r.shape}")
    pgnd = {p: protocol_gnd(gnd, p) for p in protocols}  # type: ignore[arg-type]
    heads: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    pairs: list[tuple[int, int]] = []
    for q in range(nq):
        col = r[:, q]
        union: set[int] = set()
        for p in protocols:
            h = _protocol_head(col, np.asarray(pgnd[p][q]["junk"], dtype=np.int64), top_n)
            heads[p].append(h)
            union.update(int(v) for v in col[h])
        pairs.extend((q, d) for d in sorted(union))
    missing = sorted({d for _, d in pairs if d not in db_features})
    if missing:
        raise ValueError(f"rerank_revisited: no features for database index(es) {missing[:5]}")
    t0 = time.perf_counter()
    counts = verify_many(
        [(query_features[q], db_features[d]) for q, d in pairs], c, num_workers, backend=backend
    )
    elapsed = time.perf_counter() - t0
    inliers = dict(zip(pairs, counts, strict=True))
    out: dict[str, np.ndarray] = {}
    for p in protocols:
        new = r.copy()
        for q in range(nq):
            col = r[:, q]
            h = heads[p][q]
            ids = col[h]
            inl = np.array([inliers[(q, int(d))] for d in ids], dtype=np.int64)
            o = _rerank_order(inl, None if sc is None else sc[h, q])
            rest = np.ones(col.size, dtype=bool)
            rest[h] = False
            new[:, q] = np.concatenate([ids[o], col[rest]])
        out[p] = new
    logger.info(
        "verified %d pairs for %d queries: %.3f s per query", len(pairs), nq, elapsed / max(nq, 1)
    )
    return RevisitedRerank(out, inliers, elapsed / max(nq, 1), len(pairs))
