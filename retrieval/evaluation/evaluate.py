"""Revisited Oxford/Paris evaluation: mAP and mP@k, vectorised, exact to revisitop's reference.

The reference is ``compute_map`` of Radenovic et al.'s revisitop kit. Its semantics, kept here:

* ``ranks`` has shape (n_ranked, n_queries): column ``q`` lists database ids, best first.
  ``n_ranked`` may be smaller than the database (a truncated ranking): positives missing from
  the list count as not found, because AP divides by the number of positives.
* Junk images are removed from the list before positions are counted.
* AP is the trapezoid rule over the positives' positions; mP@k uses ``k`` capped at the position
  of the last positive found. Queries without positives are left out of the means (their AP and
  precisions are ``nan``). A query whose list holds none of its positives has AP 0 and P@k 0
  (the reference crashes there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_RULES",
    "REVISITED_CLASSES",
    "ProtocolResult",
    "compute_ap",
    "compute_map",
    "compute_map_loop",
    "evaluate_protocols",
    "format_table",
    "protocol_gnd",
    "protocol_labels",
    "revisited_classes",
    "validate_ranks",
]

Protocol = Literal["easy", "medium", "hard"]
PROTOCOLS: tuple[Protocol, ...] = ("easy", "medium", "hard")


def compute_ap(ranks: npt.ArrayLike, nres: int) -> float:
    """Average precision of one query by the trapezoid rule (revisitop's ``compute_ap``).

    Args:
        ranks: 0-based positions (after junk removal) of the positives found, ascending (P,).
        nres: number of positives of the query (>= P).
    """
    pos = np.asarray(ranks, dtype=np.float64)
    if nres <= 0:
        raise ValueError(f"nres must be positive, got {nres}")
    j = np.arange(pos.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(pos == 0, 1.0, j / pos)
    p1 = (j + 1.0) / (pos + 1.0)
    return float(((p0 + p1) / 2.0).sum() / nres)


def validate_ranks(ranks: npt.ArrayLike, n_queries: int, n_db: int | None = None) -> np.ndarray:
    """Check a ranking matrix and return it as an int64 array (n_ranked, n_queries).

    Raises:
        ValueError: wrong number of dimensions or queries, ids out of range, negative ids, or
            an id listed twice for the same query.
    """
    arr = np.asarray(ranks)
    if arr.ndim == 1 and n_queries == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_db, n_queries), got shape {arr.shape}")
    if arr.shape[1] != n_queries:
        hint = " (did you pass the transpose?)" if arr.shape[0] == n_queries else ""
        raise ValueError(
            f"ranks has {arr.shape[1]} columns but the ground truth has {n_queries} queries; "
            f"expected shape (n_db, {n_queries}), got {arr.shape}{hint}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"ranks must hold integer image ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"ranks holds a negative image id ({lo})")
        if n_db is not None and hi >= n_db:
            raise ValueError(f"ranks holds image id {hi} but the database has {n_db} images")
        # Duplicates: count every (query, id) pair once with one bincount.
        width = hi + 1
        keys = arr + (np.arange(arr.shape[1], dtype=np.int64) * width)[None, :]
        counts = np.bincount(keys.ravel(), minlength=width * arr.shape[1])
        dup = np.flatnonzero(counts > 1)
        if dup.size:
            q, d = divmod(int(dup[0]), width)
            raise ValueError(f"ranks lists image id {d} more than once for query {q}")
    return arr


def compute_map(
    ranks: npt.ArrayLike,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and mean precision at k, revisitop's ``compute_map``.

    Args:
        ranks: database ids best first, shape (n_ranked, n_queries); may be truncated.
        gnd: one dict per query with ``ok`` (positive ids) and optionally ``junk``.
        kappas: the k of mP@k.
        n_db: database size, to reject out-of-range ids (optional).

    Returns:
        ``(map, aps, pr, prs)``: mAP (float), per-query AP (n_queries,), mP@k (len(kappas),)
        and per-query P@k (n_queries, len(kappas)); queries without positives are ``nan`` and
        left out of the means.
    """
    nq = len(gnd)
    r = validate_ranks(ranks, nq, n_db)
    kap = np.asarray(list(kappas), dtype=np.int64)
    if kap.size and kap.min() < 1:
        raise ValueError(f"kappas must be >= 1, got {list(kappas)}")
    n_ranked = r.shape[0]

    ok = [np.asarray(g["ok"], dtype=np.int64).ravel() for g in gnd]
    junk = [np.asarray(g.get("junk", []), dtype=np.int64).ravel() for g in gnd]
    max_id = max([int(r.max()) if r.size else -1] + [int(a.max()) for a in ok + junk if a.size])
    width = max_id + 1

    # Label matrix (n_queries, width): bit 1 = positive, bit 2 = junk.
    labels = np.zeros((nq, max(width, 1)), dtype=np.int8)
    q_ok = np.repeat(np.arange(nq), [a.size for a in ok])
    q_junk = np.repeat(np.arange(nq), [a.size for a in junk])
    if q_ok.size:
        labels[q_ok, np.concatenate(ok)] |= 1
    if q_junk.size:
        labels[q_junk, np.concatenate(junk)] |= 2
    npos = np.array([a.size for a in ok], dtype=np.int64)

    lab = labels[np.arange(nq)[:, None], r.T] if n_ranked else np.zeros((nq, 0), np.int8)
    # Junk before each item (exclusive), then work on the positives found only.
    is_junk = ((lab >> 1) & 1).astype(np.int32)
    junk_before = np.cumsum(is_junk, axis=1) - is_junk
    qi, ci = np.nonzero(lab & 1)  # row-major: grouped by query, ascending rank
    adj = (ci - junk_before[qi, ci]).astype(np.float64)  # 0-based position without junk
    found = np.bincount(qi, minlength=nq)
    starts = np.cumsum(found) - found
    j = (np.arange(qi.size) - starts[qi]).astype(np.float64)  # index among positives found
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(adj == 0, 1.0, j / adj)
    p1 = (j + 1.0) / (adj + 1.0)
    ap_sum = np.bincount(qi, weights=(p0 + p1) / 2.0, minlength=nq)
    valid = npos > 0
    aps = np.full(nq, np.nan)
    aps[valid] = ap_sum[valid] / npos[valid]

    # mP@k: k capped at the (1-based) position of the last positive found.
    prs = np.full((nq, kap.size), np.nan)
    last = np.zeros(nq)
    has = found > 0
    last[has] = adj[(starts + found - 1)[has]] + 1.0
    for c, k in enumerate(kap):
        kq = np.minimum(last, k)
        hits = np.bincount(qi, weights=(adj + 1.0 <= kq[qi]).astype(np.float64), minlength=nq)
        with np.errstate(divide="ignore", invalid="ignore"):
            pk = np.where(has, hits / np.maximum(kq, 1.0), 0.0)
        prs[valid, c] = pk[valid]

    n_valid = int(valid.sum())
    if n_valid == 0:
        return float("nan"), aps, np.full(kap.size, np.nan), prs
    mean_ap = float(np.nansum(aps) / n_valid)
    pr = np.nansum(prs, axis=0) / n_valid
    return mean_ap, aps, pr, prs


def compute_map_loop(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int]
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Slow, obviously-correct reference: revisitop's ``compute_map`` loop for loop.

    Used by the tests and the benchmark to check :func:`compute_map`. A query whose list holds
    none of its positives has AP 0 and P@k 0 (where the original raises).
    """
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    total = 0.0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        ok_set, junk_set = set(qgnd.tolist()), set(qgndj.tolist())
        pos = [j for j in range(ranks.shape[0]) if ranks[j, i] in ok_set]
        junk = [j for j in range(ranks.shape[0]) if ranks[j, i] in junk_set]
        k = 0
        ij = 0
        if junk:
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        recall_step = 1.0 / len(qgnd)
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        total += ap
        aps[i] = ap
        pos1 = [p + 1 for p in pos]
        for j, kap in enumerate(kappas):
            if not pos1:
                prs[i, j] = 0.0
                continue
            kq = min(max(pos1), kap)
            prs[i, j] = sum(1 for p in pos1 if p <= kq) / kq
        pr += prs[i, :]
    return total / (nq - nempty), aps, pr / (nq - nempty), prs


# The Revisited protocols (Radenovic et al., CVPR 2018), the one place their rule is written:
# which ground-truth lists are positives and which are junk (left out of the ranking).
PROTOCOL_RULES: dict[Protocol, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
# Revisited ground-truth class of a database image for a query (codes of revisited_classes).
REVISITED_CLASSES: tuple[str, ...] = ("negative", "easy", "hard", "junk")
_GND_LISTS: tuple[str, ...] = ("easy", "hard", "junk")  # bit 1, 2, 4 of _gnd_bits


def _rule(protocol: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if protocol not in PROTOCOL_RULES:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return PROTOCOL_RULES[protocol]


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: Protocol) -> list[dict[str, Any]]:
    """Build the ``ok``/``junk`` lists of one Revisited protocol from ``easy/hard/junk``
    (:data:`PROTOCOL_RULES`).

    Easy: positives easy, junk junk + hard. Medium: positives easy + hard, junk junk.
    Hard: positives hard, junk junk + easy.
    """
    pos, junk = _rule(protocol)
    out: list[dict[str, Any]] = []
    for i, g in enumerate(gnd):
        try:
            lists = {k: np.asarray(g[k], dtype=np.int64) for k in _GND_LISTS}
        except KeyError as exc:
            raise ValueError(f"ground truth of query {i} has no {exc.args[0]!r} list") from exc
        out.append(
            {
                "ok": np.concatenate([lists[k] for k in pos]),
                "junk": np.concatenate([lists[k] for k in junk]),
            }
        )
    return out


def _gnd_bits(gnd: Sequence[Mapping[str, Any]], ids: npt.ArrayLike) -> np.ndarray:
    """(k, n_q) int8 bit set of each ranked id: 1 easy, 2 hard, 4 junk for its query."""
    r = np.asarray(ids, dtype=np.int64)
    if r.ndim != 2 or r.shape[1] != len(gnd):
        raise ValueError(f"ids must have shape (k, {len(gnd)}), got {r.shape}")
    nq = len(gnd)
    lists = {
        key: [np.asarray(g.get(key, []), dtype=np.int64).ravel() for g in gnd] for key in _GND_LISTS
    }
    width = 1 + max(
        [int(r.max()) if r.size else 0]
        + [int(a.max()) for v in lists.values() for a in v if a.size]
    )
    code = np.zeros((nq, width), dtype=np.int8)
    for bit, key in enumerate(_GND_LISTS):
        arrs = lists[key]
        q = np.repeat(np.arange(nq), [a.size for a in arrs])
        if q.size:
            code[q, np.concatenate(arrs)] |= 1 << bit
    return np.asarray(code[np.arange(nq)[None, :], r])  # (k, n_q)


def protocol_labels(
    gnd: Sequence[Mapping[str, Any]], ids: npt.ArrayLike, protocol: str
) -> np.ndarray:
    """Label of each ranked database image under a Revisited protocol, vectorised
    (:data:`PROTOCOL_RULES`).

    Args:
        gnd: per-query ``{"easy", "hard", "junk"}`` lists of database ids (n_q entries).
        ids: database ids, shape (k, n_q) (column ``q`` belongs to query ``q``).
        protocol: ``easy``, ``medium`` or ``hard``.

    Returns:
        (k, n_q) int8: 1 positive, 2 junk, 0 negative (a positive listed as junk too counts
        as positive, as in :func:`compute_map`).
    """
    pos, junk = _rule(protocol)
    c = _gnd_bits(gnd, ids)
    bits = {k: 1 << i for i, k in enumerate(_GND_LISTS)}
    out = np.zeros(c.shape, dtype=np.int8)
    out[(c & sum(bits[k] for k in junk)) != 0] = 2
    out[(c & sum(bits[k] for k in pos)) != 0] = 1
    return out


def revisited_classes(gnd: Sequence[Mapping[str, Any]], ids: npt.ArrayLike) -> np.ndarray:
    """Revisited ground-truth class of each ranked database image, vectorised.

    Args:
        gnd: per-query ``{"easy", "hard", "junk"}`` lists of database ids (n_q entries).
        ids: database ids, shape (k, n_q).

    Returns:
        (k, n_q) int8 indexing :data:`REVISITED_CLASSES`: 0 negative, 1 easy, 2 hard, 3 junk
        (an id in several lists takes the first of easy, hard, junk).
    """
    c = _gnd_bits(gnd, ids)
    out = np.zeros(c.shape, dtype=np.int8)
    for bit, code in ((4, 3), (2, 2), (1, 1)):  # later assignments win: easy > hard > junk
        out[(c & bit) != 0] = code
    return out


@dataclass(frozen=True)
class ProtocolResult:
    """Metrics of one protocol: mAP, mP@k and the per-query figures (fractions in [0, 1])."""

    protocol: str
    map: float
    mp_at: dict[int, float]
    aps: np.ndarray
    prs: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {
            "mAP": self.map,
            "mP@k": {str(k): v for k, v in self.mp_at.items()},
            "aps": [None if np.isnan(a) else float(a) for a in self.aps],
        }


def evaluate_protocols(
    ranks: npt.ArrayLike,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    n_db: int | None = None,
    protocols: Sequence[Protocol] = PROTOCOLS,
) -> dict[str, ProtocolResult]:
    """Evaluate a ranking under the Revisited protocols (easy / medium / hard)."""
    res: dict[str, ProtocolResult] = {}
    for p in protocols:
        m, aps, pr, prs = compute_map(ranks, protocol_gnd(gnd, p), kappas, n_db=n_db)
        res[p] = ProtocolResult(
            p, m, {int(k): float(v) for k, v in zip(kappas, pr, strict=True)}, aps, prs
        )
    return res


def format_table(
    results: Mapping[str, Mapping[str, ProtocolResult]], kappas: Sequence[int] = (1, 5, 10)
) -> str:
    """A Markdown table, one row per method: mAP and mP@k per protocol, in percent."""
    cols = ["method"]
    for p in PROTOCOLS:
        cols += [f"{p[0].upper()} mAP"] + [f"{p[0].upper()} mP@{k}" for k in kappas]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, res in results.items():
        row = [method]
        for p in PROTOCOLS:
            r = res.get(p)
            if r is None:
                row += ["-"] * (1 + len(kappas))
                continue
            row.append(f"{100 * r.map:.2f}")
            row += [f"{100 * r.mp_at.get(int(k), float('nan')):.2f}" for k in kappas]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
