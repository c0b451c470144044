"""The FiftyOne view of retrieval results: each query, then its ranked results with their labels.

:func:`build_retrieval_dataset` makes a persistent ``fo.Dataset`` with one sample per query (with
its box and AP under each Revisited protocol) and one sample per (query, rank) for its top-k
results (rank, score, positive/junk/negative under each protocol, the Revisited class, the
regions indexed for that database image); a saved dynamic-group view ``by_query`` shows each query
followed by its ranked results, and one saved view per query (``query-<index>-<name>``, up to
``max_query_views``) shows the query first, then its results in rank order.

The labels come from the evaluator's protocol rule
(:data:`retrieval.evaluation.evaluate.PROTOCOL_RULES`);
the dataset machinery shared with the box and detection views (fingerprints, bulk insertion,
image metadata) from :mod:`gldboxes.views`. FiftyOne is imported lazily.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box
from gldboxes.views_base import (
    add_sample_docs,
    boxes_to_xywh,
    classification_doc,
    detections_doc,
    finish_view,
    image_metadata,
    new_building_dataset,
    slug,
    up_to_date_dataset,
    view_fingerprint,
)
from retrieval.evaluation.evaluate import (
    PROTOCOLS,
    REVISITED_CLASSES,
    protocol_labels,
    revisited_classes,
)

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

__all__ = [
    "DEFAULT_MAX_QUERY_VIEWS",
    "build_retrieval_dataset",
    "protocol_chip",
    "query_view",
    "query_view_name",
    "revisited_chip",
]

logger = logging.getLogger("retrieval.evaluation.view")

# One saved view per query up to this many queries (R-Oxford and R-Paris have 70 each).
DEFAULT_MAX_QUERY_VIEWS = 100


def protocol_chip(protocol: str, outcome: str) -> str:
    """Chip text of a result under a Revisited protocol: ``"positive (Easy)"``, ``"junk (Hard)"``.

    The word is the outcome (positive/junk/negative), the bracket the protocol, capitalised as
    in the paper's ROxf (E)/(M)/(H).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return f"{outcome} ({protocol.capitalize()})"


def revisited_chip(cls: str) -> str:
    """Chip text of a result's Revisited ground-truth class: ``"easy (Revisited)"``, ..."""
    if cls not in REVISITED_CLASSES:
        raise ValueError(f"unknown Revisited class {cls!r}; expected one of {REVISITED_CLASSES}")
    return f"{cls} (Revisited)"


_LABEL_NAMES = np.array(["negative", "positive", "junk"], dtype=object)
_CHIPS = {p: np.array([protocol_chip(p, o) for o in _LABEL_NAMES], dtype=object) for p in PROTOCOLS}
_REVISITED_CHIPS = np.array([revisited_chip(c) for c in REVISITED_CLASSES], dtype=object)


def query_view_name(index: int, name: str) -> str:
    """Name of the saved view of query ``index`` called ``name``: ``query-<index>-<slug>``."""
    return f"query-{index}-{slug(name)}"


def _positive_ranks(inv: np.ndarray, gnd: Sequence[Mapping[str, Any]], key: str) -> list[list[int]]:
    """Per query, the sorted 1-based ranks of its ``key`` positives (0 = not in the ranking)."""
    out = []
    for q, g in enumerate(gnd):  # loop over queries (tens), not database images
        ids = np.asarray(g.get(key, []), dtype=np.int64).ravel()
        ranks = inv[q, ids] + 1
        out.append(sorted(int(v) for v in ranks[ranks > 0]) + [0] * int((ranks == 0).sum()))
    return out


def _query_box(path: Path, bbx: Sequence[float] | None) -> list[float] | None:
    """The query box ``[x1, y1, x2, y2]`` in pixels as relative ``[x, y, w, h]`` (clipped)."""
    if bbx is None:
        return None
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        w, h = im.size
    x1, y1, x2, y2 = (float(v) for v in bbx)
    x1, x2 = max(0.0, min(x1, w)) / w, max(0.0, min(x2, w)) / w
    y1, y2 = max(0.0, min(y1, h)) / h, max(0.0, min(y2, h)) / h
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"query box {list(bbx)} is empty inside image {path} ({w}x{h})")
    return [x1, y1, x2 - x1, y2 - y1]


def build_retrieval_dataset(
    *,
    gnd: Mapping[str, Any],
    image_root: str | os.PathLike[str],
    ranks: npt.ArrayLike,
    scores: npt.ArrayLike | None = None,
    aps: Mapping[str, npt.ArrayLike] | None = None,
    regions: Mapping[str, Sequence[Box]] | None = None,
    top_k: int = 100,
    name: str,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    fast: bool = True,
    max_query_views: int = DEFAULT_MAX_QUERY_VIEWS,
) -> fo.Dataset:
    """Retrieval results: each query and its top-k database images, one sample per (query, rank).

    Args:
        gnd: Revisited ground truth ``{"imlist": [str] (n_db), "qimlist": [str] (n_q),
            "gnd": [{"bbx": [x1, y1, x2, y2] pixels, "easy", "hard", "junk"}]}`` (as
            ``retrieval.evaluation.datasets.load_gnd`` returns).
        image_root: the dataset folder; images are ``image_root/jpg/<name>.jpg``.
        ranks: database ids best first, shape (n_ranked, n_q), as revisitop expects.
        scores: similarity of each ranked item, same shape as ``ranks`` (``scores[r, q]`` is the
            score of ``ranks[r, q]``); optional.
        aps: per-protocol AP per query, ``{"easy": (n_q,), ...}`` (``nan`` for a query with no
            positives), computed on the full ranking by the evaluator; optional.
        regions: ``{db image name: [Box]}`` regions indexed for each database image (detector
            boxes of a boxes CSV; the whole image, always region 0, is not drawn).
        top_k: results kept per query.
        name: dataset name.
        source: file paths to record as provenance and to fingerprint (e.g. ranks file).
        overwrite: rebuild even when up to date.
        fast: insert all but the first query's samples as documents in bulk (70 queries x
            top-100 in seconds); ``False`` sends every sample through ``add_samples`` (the
            slow reference the tests compare against).
        max_query_views: save a view per query for the first this many queries (0: none).

    Samples: queries have ``kind="query"``, ``rank=0``, ``query_box`` (``fo.Detections``),
    ``ap_<protocol>``, ``n_<easy|hard|junk>``, ``<easy|hard>_positive_ranks`` (1-based ranks
    in the full ranking; 0 = not ranked). Results have ``kind="result"``, ``rank`` (1-based),
    ``db_index``, ``db_name``, ``score``, ``label_<protocol>`` (``fo.Classification`` whose
    chip names the protocol: ``positive (Easy)``, ``junk (Medium)``, ``negative (Hard)``, see
    :func:`protocol_chip`; the bare outcome is its ``outcome`` attribute), ``revisited``
    (``fo.Classification``: the Revisited ground-truth class ``easy (Revisited)``, ``hard
    (Revisited)``, ``junk (Revisited)`` or ``negative (Revisited)``; bare class in ``cls``) and
    ``regions`` (``fo.Detections``). Both carry ``query_name``, ``query_index`` and
    ``metadata`` (``fo.ImageMetadata``). Saved views: ``queries``, ``by_query`` (dynamic groups
    by query, the query first then its results by rank) and, for the first ``max_query_views``
    queries, ``query-<index>-<name>`` (:func:`query_view_name`): that query, then its results
    in rank order (:func:`query_view`).
    """
    inp = _validate(gnd, ranks, scores, aps, top_k=top_k, max_query_views=max_query_views)
    root = Path(image_root)
    files = {k2: v for k2, v in (source or {}).items() if v is not None and Path(v).is_file()}
    arrays = {
        "ranks": inp.top,
        **({"scores": inp.scores} if inp.scores is not None else {}),
        **{f"ap_{p}": a for p, a in inp.aps.items()},
    }
    if regions is not None:
        arrays["regions"] = _region_rows(regions)
    options = {
        "image_root": str(root.resolve()),
        "top_k": inp.top.shape[0],
        "n_db": len(inp.imlist),
        "n_q": len(inp.qimlist),
        "regions": regions is not None,
        "max_query_views": max_query_views,
    }
    fp = view_fingerprint("retrieval", files, options, arrays)
    if not overwrite and (ds := up_to_date_dataset(name, fp)) is not None:
        return ds
    docs, n_positive = _sample_docs(inp, root, regions)
    return _store(
        inp,
        docs,
        n_positive,
        name=name,
        fingerprint=fp,
        source={**(source or {}), "image_root": root},
        fast=fast,
        max_query_views=max_query_views,
    )


@dataclass(frozen=True)
class _Ranked:
    """The validated inputs of :func:`build_retrieval_dataset`."""

    imlist: list[str]  # database names (n_db)
    qimlist: list[str]  # query names (n_q)
    gnd: list[Mapping[str, Any]]  # per-query easy/hard/junk/bbx (n_q)
    ranks: np.ndarray  # (n_ranked, n_q) int64, the full ranking
    top: np.ndarray  # (k, n_q) int64, the ranks kept
    scores: np.ndarray | None  # (k, n_q) float64
    aps: dict[str, np.ndarray]  # protocol -> (n_q,) float64


def _validate(
    gnd: Mapping[str, Any],
    ranks: npt.ArrayLike,
    scores: npt.ArrayLike | None,
    aps: Mapping[str, npt.ArrayLike] | None,
    *,
    top_k: int,
    max_query_views: int,
) -> _Ranked:
    for key in ("imlist", "qimlist", "gnd"):
        if key not in gnd:
            raise ValueError(f"ground truth has no {key!r} entry")
    imlist, qimlist, qgnd = list(gnd["imlist"]), list(gnd["qimlist"]), list(gnd["gnd"])
    n_db, nq = len(imlist), len(qimlist)
    r = np.asarray(ranks)
    if r.ndim != 2 or r.shape[1] != nq:
        hint = " (transposed?)" if r.ndim == 2 and r.shape[0] == nq else ""
        raise ValueError(f"ranks must have shape (n_ranked, {nq}), got {r.shape}{hint}")
    if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= n_db):
        raise ValueError(f"ranks must hold integer database ids in [0, {n_db})")
    r = r.astype(np.int64)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if max_query_views < 0:
        raise ValueError(f"max_query_views must be >= 0, got {max_query_views}")
    k = min(top_k, r.shape[0])
    s = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != r.shape:
            raise ValueError(f"scores must have the shape of ranks {r.shape}, got {s.shape}")
        s = s[:k]
    ap_arr: dict[str, np.ndarray] = {}
    for p, v in (aps or {}).items():
        a = np.asarray(v, dtype=np.float64).ravel()
        if p not in PROTOCOLS or a.shape != (nq,):
            raise ValueError(
                f"aps[{p!r}] must be a protocol in {PROTOCOLS} with {nq} values, "
                f"got shape {a.shape}"
            )
        ap_arr[p] = a
    return _Ranked(imlist, qimlist, qgnd, r, r[:k], s, ap_arr)


def _region_rows(regions: Mapping[str, Sequence[Box]]) -> np.ndarray:
    """(n_boxes, 6) float64 rows ``crc32(name), ymin, xmin, ymax, xmax, score`` (-1: none),
    the regions' part of the dataset fingerprint."""
    return np.array(
        [
            (
                zlib.crc32(n.encode()),
                b.ymin,
                b.xmin,
                b.ymax,
                b.xmax,
                -1.0 if b.score is None else b.score,
            )
            for n in sorted(regions)
            for b in regions[n]
        ],
        dtype=np.float64,
    ).reshape(-1, 6)


def _image_files(inp: _Ranked, root: Path) -> tuple[list[str], list[Path], dict[str, Any]]:
    """Database paths (n_db), query paths (n_q) and the metadata of every file shown,
    checking that each exists."""
    db_paths = [str(root / "jpg" / f"{n}.jpg") for n in inp.imlist]
    missing = [p for p in {db_paths[i] for i in np.unique(inp.top)} if not Path(p).is_file()]
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} ranked database images not found (first: {missing[0]})"
        )
    qpaths = [root / "jpg" / f"{qname}.jpg" for qname in inp.qimlist]
    for qpath in qpaths:
        if not qpath.is_file():
            raise ValueError(f"{root}: query image not found: {qpath}")
    metas = {
        p: m.to_dict()
        for p, m in image_metadata(
            [*map(str, qpaths), *(db_paths[i] for i in np.unique(inp.top).tolist())]
        ).items()
    }
    return db_paths, qpaths, metas


def _sample_docs(
    inp: _Ranked, root: Path, regions: Mapping[str, Sequence[Box]] | None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The samples as documents in FiftyOne's stored format (labels as ``_cls`` dicts, see
    :func:`gldboxes.views_base.add_sample_docs`): per query, the query then its top-k results;
    and the number of positives shown under each protocol."""
    from bson import ObjectId as oid

    top, qgnd, nq = inp.top, inp.gnd, len(inp.qimlist)
    # Vectorised labels (k, n_q) per protocol and the inverse ranking (n_q, n_db).
    codes = {p: protocol_labels(qgnd, top, p) for p in PROTOCOLS}
    labels = {p: _LABEL_NAMES[c] for p, c in codes.items()}
    chips = {p: _CHIPS[p][c] for p, c in codes.items()}
    rev_codes = revisited_classes(qgnd, top)
    inv = np.full((nq, len(inp.imlist)), -1, dtype=np.int64)
    inv[np.arange(nq)[None, :], inp.ranks] = np.arange(inp.ranks.shape[0])[:, None]
    pos_ranks = {key: _positive_ranks(inv, qgnd, key) for key in ("easy", "hard")}
    db_paths, qpaths, metas = _image_files(inp, root)
    # Region boxes once per database image in a top-k list (labels get fresh ids per sample).
    region_docs: dict[int, tuple[list[list[float]], list[float | None]]] = {}
    if regions is not None:
        for i in np.unique(top).tolist():
            bs = regions.get(inp.imlist[i], [])
            xywh = boxes_to_xywh([(b.ymin, b.xmin, b.ymax, b.xmax) for b in bs]).tolist()
            region_docs[i] = (xywh if bs else [], [b.score for b in bs])

    docs: list[dict[str, Any]] = []
    for q, qname in enumerate(inp.qimlist):  # loop over queries; results below are per rank
        qpath, g = qpaths[q], qgnd[q]
        box = _query_box(qpath, g.get("bbx"))
        qdoc: dict[str, Any] = {
            "filepath": str(qpath),
            "metadata": dict(metas[str(qpath)]),
            "tags": ["query"],
            "kind": "query",
            "query_name": qname,
            "query_index": q,
            "rank": 0,
            "query_box": detections_doc([] if box is None else [box], [None], "query", oid),
            "n_easy": len(g.get("easy", [])),
            "n_hard": len(g.get("hard", [])),
            "n_junk": len(g.get("junk", [])),
            "easy_positive_ranks": pos_ranks["easy"][q],
            "hard_positive_ranks": pos_ranks["hard"][q],
        }
        for p, a in inp.aps.items():
            if not np.isnan(a[q]):
                qdoc[f"ap_{p}"] = float(a[q])
        docs.append(qdoc)
        sc = inp.scores[:, q].tolist() if inp.scores is not None else None
        lab = {p: labels[p][:, q].tolist() for p in PROTOCOLS}
        chip = {p: chips[p][:, q].tolist() for p in PROTOCOLS}
        rev = rev_codes[:, q].tolist()
        for rank0, dbi in enumerate(top[:, q].tolist()):
            rdoc: dict[str, Any] = {
                "filepath": db_paths[dbi],
                "metadata": dict(metas[db_paths[dbi]]),
                "tags": [],
                "kind": "result",
                "query_name": qname,
                "query_index": q,
                "rank": rank0 + 1,
                "db_index": dbi,
                "db_name": inp.imlist[dbi],
            }
            if sc is not None:
                rdoc["score"] = sc[rank0]
            for p in PROTOCOLS:
                rdoc[f"label_{p}"] = classification_doc(chip[p][rank0], oid, outcome=lab[p][rank0])
            rdoc["revisited"] = classification_doc(
                str(_REVISITED_CHIPS[rev[rank0]]), oid, cls=REVISITED_CLASSES[rev[rank0]]
            )
            if regions is not None:
                rdoc["regions"] = detections_doc(*region_docs[dbi], "region", oid)
            docs.append(rdoc)
    return docs, {p: int((c == 1).sum()) for p, c in codes.items()}


def _store(
    inp: _Ranked,
    docs: list[dict[str, Any]],
    n_positive: Mapping[str, int],
    *,
    name: str,
    fingerprint: str,
    source: Mapping[str, Any],
    fast: bool,
    max_query_views: int,
) -> fo.Dataset:
    """Insert ``docs`` into a dataset built under a temporary name, save its views and swap it
    in as ``name`` (deleted again if anything fails)."""
    import fiftyone as fo
    from fiftyone import ViewField as F

    nq, k = len(inp.qimlist), inp.top.shape[0]
    ds = new_building_dataset(name)
    try:
        ds.add_sample_field("score", fo.FloatField)
        for p in PROTOCOLS:
            ds.add_sample_field(f"ap_{p}", fo.FloatField)
        add_sample_docs(ds, docs, fast=fast, n_public=k + 1)
        ds.add_dynamic_sample_fields()  # the chips' ``outcome``/``cls`` attributes
        ds.save_view("queries", ds.match(F("kind") == "query"), overwrite=True)
        ds.save_view("by_query", ds.group_by("query_name", order_by="rank"), overwrite=True)
        _save_query_views(ds, inp.qimlist[:max_query_views])
        if nq > max_query_views:
            logger.info(
                "saved views for the first %d of %d queries (max_query_views)",
                max_query_views,
                nq,
            )
        summary: dict[str, Any] = {
            "n_queries": nq,
            "n_query_views": min(nq, max_query_views),
            "top_k": k,
            "n_samples": len(docs),
            "n_db": len(inp.imlist),
        }
        for p in PROTOCOLS:
            summary[f"n_positive_{p}"] = n_positive[p]
            if p in inp.aps:
                valid = ~np.isnan(inp.aps[p])
                summary[f"map_{p}"] = float(inp.aps[p][valid].mean()) if valid.any() else None
        return finish_view(ds, name, "retrieval", fingerprint, source, summary)
    except BaseException:
        ds.delete()
        raise


def _save_query_views(ds: fo.Dataset, qnames: Sequence[str]) -> None:
    """Save :func:`query_view` of each of ``qnames`` (queries 0, 1, ...) on ``ds``."""
    from fiftyone import ViewField as F

    for q, qname in enumerate(qnames):  # loop over queries (tens), one small document each
        view = ds.match(F("query_index") == q).sort_by("rank")
        ds.save_view(
            query_view_name(q, qname),
            view,
            description=f"query {q} ({qname}), then its results in rank order",
            overwrite=True,
        )


def query_view(ds: fo.Dataset, query: str | int) -> Any:
    """The view of one query: the query sample (rank 0) then its results by rank.

    Args:
        query: query name or index.
    """
    from fiftyone import ViewField as F

    field = "query_index" if isinstance(query, int) else "query_name"
    view = ds.match(F(field) == query).sort_by("rank")
    if len(view) == 0:
        raise ValueError(f"dataset {ds.name!r} has no query {query!r}")
    return view
