"""AML (approximate max-pooling localisation) re-ranking, nearest-neighbour search and
query expansion (Tolias et al., ICLR 2016).

Part of :mod:`retrieval.rmac`; see its docstring for the method."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from retrieval.rmac.pooling import l2_normalise, region_max_pool, rmac_regions
from retrieval.rmac.whitening import Whitening, aggregate_rmac

__all__ = [
    "aml_localize",
    "aml_localize_loop",
    "aml_rerank",
    "aml_windows",
    "approx_max",
    "integral_images",
    "query_expansion",
    "search",
]

logger = logging.getLogger("retrieval.rmac.aml")


# =========================================================================== AML
def _power(x: np.ndarray, alpha: float) -> np.ndarray:
    """``x ** alpha`` in place, by repeated squaring when ``alpha`` is a small integer (faster)."""
    if float(alpha).is_integer() and 1 <= alpha <= 64:
        n = int(alpha)
        out: np.ndarray | None = None
        base = x
        while n:
            if n & 1:
                out = base.copy() if out is None else np.multiply(out, base, out=out)
            n >>= 1
            if n:
                base = base * base
        assert out is not None
        return out
    return np.power(x, alpha, out=x)


def integral_images(maps: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Integral images of ``(x / scale)^alpha`` with a zero first row and column.

    ``scale`` is the per-image, per-channel maximum, so powers stay in [0, 1] (no overflow).

    Args:
        maps: (G, H, W, C) non-negative activations.

    Returns:
        ``(ii (G, H + 1, W + 1, C) float64, scale (G, C) float64)``.
    """
    x = np.asarray(maps, np.float64)
    if x.ndim != 4:
        raise ValueError(f"integral_images: maps must be (G, H, W, C), got shape {x.shape}")
    if x.size and x.min() < 0:
        raise ValueError("integral_images: activations must be non-negative (after ReLU)")
    scale = x.max(axis=(1, 2))
    scale[scale <= 0] = 1.0
    g, h, w, c = x.shape
    ii = np.zeros((g, h + 1, w + 1, c))
    p = _power(x / scale[:, None, None, :], alpha)
    np.cumsum(p, axis=1, out=p)
    np.cumsum(p, axis=2, out=ii[:, 1:, 1:])
    return ii, scale


def approx_max(
    ii: np.ndarray, scale: np.ndarray, img: np.ndarray, boxes: np.ndarray, alpha: float
) -> np.ndarray:
    """Approximate max-pooling of windows, O(1) per channel from integral images.

    Args:
        ii, scale: from :func:`integral_images`.
        img: (N,) image index; boxes: (N, 4) ``[x0, y0, x1, y1]`` cells, end exclusive.

    Returns:
        (N, C) ``scale * (sum_p (x(p)/scale)^alpha)^(1/alpha)`` over each window.
    """
    img = np.asarray(img, np.int64)
    b = np.asarray(boxes, np.int64)
    s = (
        ii[img, b[:, 3], b[:, 2]]
        - ii[img, b[:, 1], b[:, 2]]
        - ii[img, b[:, 3], b[:, 0]]
        + ii[img, b[:, 1], b[:, 0]]
    )
    return np.maximum(s, 0.0) ** (1.0 / alpha) * scale[img]


def aml_windows(
    height: int, width: int, step: int, qratio: float | None, ratio: float
) -> np.ndarray:
    """Candidate windows of AML on a ``height x width`` map (the order of the authors' loops).

    Windows are at least 2 cells on each side; tops/lefts are ``0, t, 2t, ...`` and heights /
    widths ``2, 2 + t, ...``. With ``qratio`` (query height / width), windows whose
    height/width ratio differs from it by more than a factor ``ratio`` are dropped.

    Returns:
        (Nw, 4) int64 ``[x0, y0, x1, y1]``, end exclusive, ordered by y0, y1, x0, x1.
    """

    def spans(n: int) -> np.ndarray:
        a = np.arange(0, n - 1, step)
        lo, ext = np.meshgrid(a, np.arange(0, n, step), indexing="ij")
        hi = lo + 2 + ext
        keep = hi <= n
        return np.stack([lo[keep], hi[keep]], 1)

    ys, xs = spans(height), spans(width)
    if len(ys) == 0 or len(xs) == 0:
        return np.zeros((0, 4), np.int64)
    iy, ix = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    y, x = ys[iy.ravel()], xs[ix.ravel()]
    win = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.int64)
    if qratio is not None and qratio > 0:
        r = (win[:, 3] - win[:, 1]) / (win[:, 2] - win[:, 0])
        win = win[np.abs(np.log(qratio / r)) <= math.log(ratio) + 1e-12]
    return win


def _cosines(
    ii: np.ndarray,
    scale: np.ndarray,
    q: np.ndarray,
    img: np.ndarray,
    boxes: np.ndarray,
    alpha: float,
    chunk: int,
) -> np.ndarray:
    out = np.empty(len(boxes))
    for s in range(0, len(boxes), chunk):
        v = approx_max(ii, scale, img[s : s + chunk], boxes[s : s + chunk], alpha)
        out[s : s + chunk] = (v @ q) / (np.linalg.norm(v, axis=1) + 1e-12)
    return out


# Coordinate-descent moves of the refinement, in the authors' order: (coordinate, delta sign).
_MOVES = ((1, -1), (1, +1), (3, -1), (3, +1), (0, -1), (0, +1), (2, -1), (2, +1))


def aml_localize(
    maps: np.ndarray,
    query_mac: np.ndarray,
    *,
    qratio: float | None,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
    chunk_mb: float = 64.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Localise the query in G activation maps of one size: window search + refinement.

    Vectorised over images and windows; the result equals :func:`aml_localize_loop`.

    Args:
        maps: (G, H, W, C) non-negative activations.
        query_mac: (C,) the query's MAC vector (the authors localise with MAC, not R-MAC).
        qratio: query height / width (None: no aspect-ratio filter).

    Returns:
        ``(boxes (G, 4) int64 [x0, y0, x1, y1], scores (G,) cosine)``.
    """
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[1] < 2 or maps.shape[2] < 2:
        raise ValueError(f"aml_localize: need (G, H >= 2, W >= 2, C) maps, got {maps.shape}")
    q = np.asarray(query_mac, np.float64)
    if q.shape != (maps.shape[-1],):
        raise ValueError(f"aml_localize: query vector {q.shape} vs {maps.shape[-1]} channels")
    q = q / (np.linalg.norm(q) + 1e-12)
    g, h, w, c = maps.shape
    ii, scale = integral_images(maps, alpha)
    chunk = max(1, int(chunk_mb * 2**20 / (8 * c)))
    win = aml_windows(h, w, step, qratio, ratio)
    if len(win) == 0:  # no window passes the filter: start from the whole map
        win = np.array([[0, 0, w, h]], np.int64)
    nw = len(win)
    img = np.repeat(np.arange(g), nw)
    scores = _cosines(ii, scale, q, img, np.tile(win, (g, 1)), alpha, chunk).reshape(g, nw)
    first = np.argmax(scores, axis=1)  # first maximum, as the authors' strict '>'
    best = win[first].copy()
    best_s = scores[np.arange(g), first]
    limit = {0: w, 1: h, 2: w, 3: h}
    for st in range(refine_step, 0, -1):
        active = np.ones(g, bool)
        for _ in range(refine_iter):
            if not active.any():
                break
            changed = np.zeros(g, bool)
            for coord, sign in _MOVES:
                lo, hi = (coord % 2, coord % 2 + 2)  # (x0, x1) or (y0, y1)
                cand = best.copy()
                cand[:, coord] += sign * st
                if coord == lo and sign < 0:
                    ok = best[:, lo] - st >= 0
                elif coord == hi and sign > 0:
                    ok = best[:, hi] + st <= limit[coord]
                else:  # shrinking: keep at least 2 cells
                    ok = best[:, hi] - best[:, lo] - st >= 2
                sel = np.flatnonzero(ok & active)
                if sel.size == 0:
                    continue
                s_new = _cosines(ii, scale, q, sel, cand[sel], alpha, chunk)
                better = s_new > best_s[sel]
                upd = sel[better]
                best[upd] = cand[upd]
                best_s[upd] = s_new[better]
                changed[upd] = True
            active &= changed
    return best, best_s


def aml_localize_loop(
    fmap: np.ndarray,
    query_mac: np.ndarray,
    *,
    qratio: float | None,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
) -> tuple[np.ndarray, float]:
    """Slow reference of :func:`aml_localize` for one (H, W, C) map, loop for loop as ``aml.c``.

    Window sums are taken directly over the window's cells (no integral images).
    """
    x = np.asarray(fmap, np.float64)
    h, w, _ = x.shape
    scale = x.max(axis=(0, 1))
    scale[scale <= 0] = 1.0
    p = (x / scale) ** alpha
    q = np.asarray(query_mac, np.float64)
    q = q / (np.linalg.norm(q) + 1e-12)

    def score(b: list[int]) -> float:
        v = p[b[1] : b[3], b[0] : b[2]].sum(axis=(0, 1)) ** (1.0 / alpha) * scale
        return float(v @ q / (np.linalg.norm(v) + 1e-12))

    best: list[int] = [0, 0, w, h]
    best_s = -1e11
    found = False
    for i1 in range(1, h, step):  # 1-based rows i1..i2 inclusive, as aml.c
        for i2 in range(i1 + 1, h + 1, step):
            for j1 in range(1, w, step):
                for j2 in range(j1 + 1, w + 1, step):
                    if qratio is not None and qratio > 0:
                        r = abs(math.log(qratio / ((i2 - i1 + 1) / (j2 - j1 + 1))))
                        if r > math.log(ratio) + 1e-12:
                            continue
                    b = [j1 - 1, i1 - 1, j2, i2]
                    s = score(b)
                    found = True
                    if s > best_s:
                        best, best_s = b, s
    if not found:
        best_s = score(best)
    for st in range(refine_step, 0, -1):
        change, it = True, 0
        while change and it < refine_iter:
            change = False
            for coord, sign in _MOVES:
                lo, hi = coord % 2, coord % 2 + 2
                lim = w if coord in (0, 2) else h
                if coord == lo and sign < 0:
                    ok = best[lo] - st >= 0
                elif coord == hi and sign > 0:
                    ok = best[hi] + st <= lim
                else:
                    ok = best[hi] - best[lo] - st >= 2
                if not ok:
                    continue
                cand = list(best)
                cand[coord] += sign * st
                s = score(cand)
                if s > best_s:
                    best, best_s, change = cand, s, True
            it += 1
    return np.asarray(best, np.int64), best_s


# =========================================================================== search + AML
def search(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product ranking: ``(ranks (n_db, n_q) int64, scores (n_db, n_q))`` best first."""
    sim = np.asarray(database, np.float32) @ np.asarray(queries, np.float32).T
    order = np.argsort(-sim, axis=0, kind="stable")
    return order.astype(np.int64), np.take_along_axis(sim, order, axis=0)


def _window_regional(
    stack: np.ndarray, boxes: np.ndarray, levels: int, overlap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Regional vectors of the R-MAC grid of each window (exact max), L2-normalised.

    Args:
        stack: (G, H, W, C) maps of one size; boxes: (G, 4) windows ``[x0, y0, x1, y1]``.

    Returns:
        ``(regional (sum R_g, C), counts (G,))``.
    """
    grids = [
        rmac_regions(int(b[2] - b[0]), int(b[3] - b[1]), levels, overlap=overlap) for b in boxes
    ]
    counts = np.array([len(gr) for gr in grids], np.int64)
    img = np.repeat(np.arange(len(boxes)), counts)
    offs = np.repeat(np.asarray(boxes)[:, [0, 1, 0, 1]], counts, axis=0)
    return l2_normalise(region_max_pool(stack, img, np.concatenate(grids) + offs)), counts


def aml_rerank(
    query_rmac: np.ndarray,
    query_mac: np.ndarray,
    qratio: float | None,
    top_ids: np.ndarray,
    maps: Sequence[np.ndarray],
    whitening: Whitening | None,
    *,
    levels: int = 3,
    overlap: float = 0.4,
    alpha: float = 10.0,
    step: int = 3,
    ratio: float = 1.1,
    refine_step: int = 3,
    refine_iter: int = 5,
    chunk_mb: float = 256.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank a query's top N by the R-MAC similarity of the localised windows.

    Images are processed in batches of one map size (at most ``chunk_mb`` of integral images).

    Args:
        query_rmac: (d,) the query's R-MAC; query_mac: (C,) its MAC (localisation).
        qratio: query height / width (aspect-ratio filter).
        top_ids: (N,) database ids of the initial top N, best first.
        maps: N (h, w, C) activation maps of those images (same order).

    Returns:
        ``(ids (N,) re-ranked, scores (N,), window vectors (N, d) in re-ranked order,
        boxes (N, 4) [x0, y0, x1, y1] map cells, in re-ranked order)``.
    """
    n = len(top_ids)
    if len(maps) != n:
        raise ValueError(f"aml_rerank: {len(maps)} maps for {n} images")
    boxes = np.zeros((n, 4), np.int64)
    regional: list[np.ndarray] = [np.empty(0)] * n
    counts = np.zeros(n, np.int64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(m.shape, []).append(i)
    for shape, members in by_shape.items():
        h, w, c = shape
        per_img = (h + 1) * (w + 1) * c * 8
        gsize = max(1, int(chunk_mb * 2**20 // max(per_img, 1)))
        for s in range(0, len(members), gsize):
            sel = members[s : s + gsize]
            stack = np.stack([maps[i] for i in sel])
            if h < 2 or w < 2:
                b = np.tile(np.array([[0, 0, w, h]], np.int64), (len(sel), 1))
            else:
                b, _ = aml_localize(
                    stack,
                    query_mac,
                    qratio=qratio,
                    alpha=alpha,
                    step=step,
                    ratio=ratio,
                    refine_step=refine_step,
                    refine_iter=refine_iter,
                    chunk_mb=min(chunk_mb, 64.0),
                )
            boxes[sel] = b
            reg, cnt = _window_regional(stack, b, levels, overlap)
            for i, part in zip(sel, np.split(reg, np.cumsum(cnt)[:-1]), strict=True):
                regional[i] = part
            counts[sel] = cnt
    vecs = aggregate_rmac(np.concatenate(regional), counts, whitening)
    scores = vecs @ np.asarray(query_rmac, np.float32)
    order = np.argsort(-scores, kind="stable")
    return np.asarray(top_ids)[order], scores[order], vecs[order], boxes[order]


def query_expansion(
    query: np.ndarray, top_vectors: np.ndarray, candidates: np.ndarray, k: int = 5
) -> np.ndarray:
    """Average query expansion: scores of ``candidates`` against mean(query, top k vectors).

    Args:
        query: (d,). top_vectors: (>= k, d) best first. candidates: (N, d).

    Returns:
        (N,) scores (sort descending to re-rank).
    """
    if k < 0:
        raise ValueError(f"query_expansion: k must be >= 0, got {k}")
    q = np.vstack([np.asarray(top_vectors)[:k], np.asarray(query)[None]]).mean(axis=0)
    return np.asarray(candidates) @ q
