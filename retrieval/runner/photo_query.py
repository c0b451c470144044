"""Opening and querying a photo index, and scoring it on own ground truth.

Owns :class:`PhotoIndex` (a photo index of :mod:`retrieval.runner.photos` opened for search:
first-stage ranking, optional spatial verification, the results' regions), its per-query
:class:`QueryResult`, and the ground truth of own photos (:func:`read_gt_csv`, a CSV
``query,positive[,kind]``; :func:`evaluate_gt`, Revisited mAP / mP@k). The folder layout it reads
is :mod:`retrieval.runner.photo_index`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import features as features_stage
from retrieval.runner import conf as run_conf
from retrieval.runner import driver
from retrieval.runner.photo_index import (
    HEADER_NAME,
    photo_regions,
    read_header,
    read_regions,
    sharded_index,
)

__all__ = ["GT_KINDS", "PhotoIndex", "QueryResult", "evaluate_gt", "read_gt_csv"]

# Query photos scored together (the score matrix is _QUERY_BATCH x n_ids float64).
_QUERY_BATCH = 16
GT_KINDS = ("easy", "hard", "junk")
_REGION_KEYS = ("regions", "region_boxes", "region_threshold")


# ------------------------------------------------------------------------------------ queries
@dataclass(frozen=True)
class QueryResult:
    """The top-k of one query photo.

    Attributes:
        query: the query photo. ids: int64 (k,) image ids, best first. paths: their photos.
        scores: float64 (k,) first-stage scores (ASMK*...). inliers: int64 (k,) verified
            inlier counts (None without verification). matches: per result, float64 (m, 4)
            inlier correspondences ``x_q, y_q, x_db, y_db`` in original pixels (None without
            verification). regions: per result, its index-side regions (empty without).
        query_size: (width, height) of the query photo.
    """

    query: Path
    ids: np.ndarray
    paths: tuple[str, ...]
    scores: np.ndarray
    inliers: np.ndarray | None = None
    matches: tuple[np.ndarray, ...] | None = None
    regions: tuple[tuple[Any, ...], ...] = ()
    query_size: tuple[int, int] = (0, 0)


@dataclass(frozen=True, eq=False)
class PhotoIndex:
    """An opened photo index (see :mod:`retrieval.runner.photos`): parts, codebook and the id map.

    Attributes:
        root: the index folder. header: ``photos.json``. conf: the resolved run conf.
        index: the parts as a :class:`retrieval.index.sharded.ShardedInvertedFile`.
        codebook: float32 (K, D). live: bool (n_ids,) not tombstoned.
        order_key: int64 (n_ids,) rank of each id by (photo name, path): the tie-break.
    """

    root: Path
    header: dict[str, Any]
    conf: dict[str, Any]
    index: Any
    codebook: np.ndarray
    live: np.ndarray
    order_key: np.ndarray

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str]) -> PhotoIndex:
        from retrieval.features.codebook import load_codebook

        idx = Path(index_dir)
        h = read_header(idx)
        if not h["parts"]:
            raise ValueError(f"{idx}: the index holds no photos")
        sivf = sharded_index(idx, h)
        n = sivf.n_images
        if len(h["images"]) != n:
            raise ValueError(f"{idx / HEADER_NAME}: {len(h['images'])} photos for {n} indexed")
        live = np.ones(n, bool)
        live[np.asarray(h["tombstones"], np.int64)] = False
        names = [(im["name"], im["path"]) for im in h["images"]]
        key = np.empty(n, np.int64)
        key[sorted(range(n), key=names.__getitem__)] = np.arange(n)
        return cls(
            idx,
            h,
            run_conf.resolve_conf(h["conf"]),
            sivf,
            load_codebook(idx / h["codebook"]),
            live,
            key,
        )

    @property
    def n_photos(self) -> int:
        """Photos that can be returned (tombstones excluded)."""
        return int(self.live.sum())

    def path(self, image_id: int) -> str:
        return str(self.header["images"][image_id]["path"])

    def extract(self, photos: Sequence[str | os.PathLike[str]]) -> list[Any]:
        """Features of query photos, in memory: ``[(ExtractedFeatures, (w, h)), ...]``."""
        fc = run_conf.feature_conf(self.conf)
        extractor = features_stage.make_extractor(fc)
        out = []
        for p in photos:
            path = Path(p)
            if not path.is_file():
                raise FileNotFoundError(f"query photo not found: {path}")
            out.append(
                features_stage.extract_image(
                    extractor, features_stage.ImageItem(path.name, path), fc
                )
            )
        return out

    def rank(
        self, photos: Sequence[str | os.PathLike[str]], k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """First-stage ranking of the live photos for each query photo.

        Returns:
            ``(ids, scores, features)``: int64 and float64 (n_queries, min(k, n_photos)),
            ordered by score desc then photo name / path; and the queries' features.
        """
        from retrieval.index.aggregation import QUERY_KERNEL, aggregate_many

        feats = self.extract(photos)
        n = self.live.shape[0]
        kk = self.n_photos if k is None else min(int(k), self.n_photos)
        ids = np.zeros((len(feats), kk), np.int64)
        out = np.zeros((len(feats), kk), np.float64)
        for a in range(0, len(feats), _QUERY_BATCH):  # memory: _QUERY_BATCH x n_ids floats
            q = aggregate_many(
                [f.descriptors for f, _ in feats[a : a + _QUERY_BATCH]],
                self.codebook,
                QUERY_KERNEL[self.conf["kernel"]],
                num_assignments=int(self.conf["num_assignments"]),
            )
            scores = self.index.scores(q)  # (batch, n_ids)
            scores[:, ~self.live] = -np.inf
            for r, row in enumerate(scores, start=a):
                cand = np.arange(n)
                if 0 < kk < n:  # only the photos scoring at least the k-th best are sorted
                    cand = np.flatnonzero(row >= np.partition(row, n - kk)[n - kk])
                best = cand[np.lexsort((self.order_key[cand], -row[cand]))][:kk]
                ids[r], out[r] = best, row[best]
        return ids, out, feats

    def regions_of(
        self, ids: Sequence[int], conf: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Regions of the given ids: the index's own (empty tuples for an index without
        regions), or computed under ``conf`` (a resolved conf with ``regions``)."""
        if conf is not None:
            ims = [self.header["images"][int(i)] for i in ids]
            sizes: dict[str, Any] = {}
            for rel in {im["features"] for im in ims}:
                names = [im["name"] for im in ims if im["features"] == rel]
                sizes.update(driver.image_sizes(self.root / rel, names))
            keys = [im["name"] for im in ims]
            paths = [Path(im["path"]) for im in ims]
            got = photo_regions(conf, keys, paths, None, sizes) or {}
            return [tuple(got[n]) for n in keys]
        parts = self.header["parts"]
        if not any(p["regions"] for p in parts):
            return [() for _ in ids]
        regs: dict[int, list[Any]] = {}
        for p in parts:
            regs.update(read_regions(self.root / p["regions"]))
        return [tuple(regs.get(int(i), [])) for i in ids]

    def query(
        self,
        photos: Sequence[str | os.PathLike[str]],
        k: int = 10,
        *,
        verification: Mapping[str, Any] | None = None,
        regions: Mapping[str, Any] | None = None,
    ) -> list[QueryResult]:
        """The top-``k`` photos of each query photo, optionally spatially verified.

        Args:
            verification: None (off) or the run's ``verification`` dict (``top_n``: head
                verified, default 100; the other keys of
                :class:`retrieval.verification.VerificationConf`, defaults from the features
                preset). The verified head is re-ranked by (inliers, score, name) with
                :func:`retrieval.verification.rerank` and the top ``k`` of it returned.
            regions: the results' regions to report instead of the index's own: ``regions``
                (a :data:`retrieval.regions.confs` preset), ``region_boxes`` (a boxes CSV,
                e.g. ``detect boxes`` run on the photos), ``region_threshold``.
        """
        if k < 1:
            raise ValueError(f"--top-k must be >= 1, got {k}")
        rconf = None
        if regions is not None and regions.get("regions"):
            rconf = run_conf.resolve_conf(
                {**{key: regions.get(key) for key in _REGION_KEYS}, "region_features": "assign"}
            )
        verify = verification is not None
        vc = top_n = None
        if verify:
            vc, top_n, _ = run_conf.verification_conf(
                {**self.conf, "verification": dict(verification or {})}
            )
        depth = max(k, int(top_n or 0))
        ids, scores, feats = self.rank(photos, depth)
        out = []
        for qi, photo in enumerate(photos):
            qid, qsc = ids[qi], scores[qi]
            inl = matches = None
            if verify:
                qid, qsc, inl, matches = self._verify(feats[qi], qid, qsc, vc, int(top_n or 0))
            qid, qsc = qid[:k], qsc[:k]
            out.append(
                QueryResult(
                    query=Path(photo),
                    ids=qid,
                    paths=tuple(self.path(int(i)) for i in qid),
                    scores=qsc,
                    inliers=None if inl is None else inl[:k],
                    matches=None if matches is None else tuple(matches[:k]),
                    regions=tuple(self.regions_of(qid.tolist(), rconf)),
                    query_size=(int(feats[qi][1][0]), int(feats[qi][1][1])),
                )
            )
        return out

    def _verify(
        self, qfeat: Any, ids: np.ndarray, scores: np.ndarray, vc: Any, top_n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Verify the head of one ranking; returns it re-ranked with inliers and matches."""
        from retrieval.verification import Features, read_features_h5, rerank, verify_pair

        max_side = int(run_conf.feature_conf(self.conf)["preprocessing"].get("max_side", 1024))
        f, size = qfeat
        q = Features(f.keypoints.astype(np.float64), f.descriptors, max(1.0, max(size) / max_side))
        head = [int(i) for i in ids[:top_n]]
        by_file: dict[str, list[int]] = {}
        for i in head:
            by_file.setdefault(self.header["images"][i]["features"], []).append(i)
        db: dict[int, Any] = {}
        for rel, members in by_file.items():
            names = [self.header["images"][i]["name"] for i in members]
            got = read_features_h5(self.root / rel, names, max_side=max_side)
            db.update({i: got[n] for i, n in zip(members, names, strict=True)})
        pairs = {i: verify_pair(q, db[i], vc) for i in head}
        cache = {
            i: (r.num_inliers if r.num_inliers >= vc.min_inliers else 0) for i, r in pairs.items()
        }
        rr = rerank(q, db, ids.tolist(), scores, top_n=len(head), conf=vc, cache=cache)
        order = rr.order
        new_ids = ids[order]
        inl = np.array([cache.get(int(i), 0) for i in new_ids], np.int64)
        matches = []
        for i in new_ids[: len(head)]:
            r = pairs[int(i)]
            m = r.matches[r.affine.inliers]
            matches.append(np.hstack([q.keypoints[m[:, 0]], db[int(i)].keypoints[m[:, 1]]]))
        return new_ids, scores[order], inl, matches


# ------------------------------------------------------------------------------------ ground truth
def read_gt_csv(
    path: str | os.PathLike[str], index: PhotoIndex
) -> tuple[list[Path], list[dict[str, list[int]]]]:
    """Ground truth of own photos from a CSV ``query,positive[,kind]`` (kind easy|hard|junk,
    default easy).

    Queries are photo paths; positives are paths or ids of indexed photos (relative paths are
    taken from the CSV's folder). Returns the queries (first-seen order) and their Revisited
    ground truth ``{"easy", "hard", "junk"}`` as positions among the index's live photos (the
    rows of a ranking over them, see :meth:`PhotoIndex.rank`).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ground-truth CSV not found: {p}")
    live_ids = np.flatnonzero(index.live)
    pos = {int(i): j for j, i in enumerate(live_ids)}
    by_path = {im["path"]: im["id"] for im in index.header["images"]}
    queries: dict[str, dict[str, list[int]]] = {}
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "query" not in cols or "positive" not in cols:
            raise ValueError(f"{p}: expected columns query,positive[,kind], got {cols}")
        for line, row in enumerate(reader, start=2):
            q, t = (row.get("query") or "").strip(), (row.get("positive") or "").strip()
            kind = (row.get("kind") or "easy").strip() or "easy"
            if not q or not t:
                raise ValueError(f"{p}:{line}: empty query or positive")
            if kind not in GT_KINDS:
                raise ValueError(f"{p}:{line}: kind {kind!r} is not one of {GT_KINDS}")
            qpath = (p.parent / q).resolve()
            tpath = os.fspath((p.parent / t).resolve())
            iid = by_path.get(tpath)
            if iid is None and t.isdigit():
                iid = int(t)
            if iid is None or iid not in pos:
                raise ValueError(f"{p}:{line}: {t!r} is not a photo of the index (path or id)")
            g = queries.setdefault(os.fspath(qpath), {k: [] for k in GT_KINDS})
            g[kind].append(pos[iid])
    if not queries:
        raise ValueError(f"{p}: no rows")
    return [Path(q) for q in queries], list(queries.values())


def evaluate_gt(
    index: PhotoIndex, gt_csv: str | os.PathLike[str], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[dict[str, Any], np.ndarray]:
    """Easy/Medium/Hard mAP and mP@k of the index's ranking for the CSV's queries.

    The ranking is over the live photos (positions as in :func:`read_gt_csv`) and is scored by
    :func:`retrieval.evaluation.evaluate.evaluate_protocols`.

    Returns:
        ``({protocol: ProtocolResult}, ranks int64 (n_photos, n_queries))``.
    """
    from retrieval.evaluation.evaluate import evaluate_protocols

    queries, gnd = read_gt_csv(gt_csv, index)
    ids, _, _ = index.rank(queries)
    pos = np.full(index.live.shape[0], -1, np.int64)
    pos[index.live] = np.arange(index.n_photos)
    ranks = np.ascontiguousarray(pos[ids].T)
    return evaluate_protocols(ranks, gnd, kappas, n_db=index.n_photos), ranks
