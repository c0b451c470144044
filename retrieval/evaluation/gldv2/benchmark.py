"""A GLDv2 benchmark folder from a GLDv2 subset and its solution CSV (:func:`main`, :data:`confs`).

The folder is Revisited-style (``gnd_<name>.json``, ``jpg/`` links, ``gldv2.json``,
``config.yaml``; see :mod:`retrieval.evaluation.gldv2`), written atomically and skipped when
built from the same inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import atomic_dir, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval.evaluation.gldv2.files import list_images, read_labels, read_solution
from retrieval.evaluation.gldv2.metrics import concat_ranges, id_positions

__all__ = ["FORMAT_VERSION", "confs", "main"]

logger = logging.getLogger("retrieval.evaluation.gldv2")

FORMAT_VERSION = 1

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
    """Build a GLDv2 benchmark folder (see :mod:`retrieval.evaluation.gldv2`) and return it.

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
    in_test = id_positions([sol.ids[i] for i in keep_usage], np.asarray(list(queries), dtype=str))
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
        flat = id_positions(tokens, db_ids)
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
        images = order[np.repeat(lo, hi - lo) + concat_ranges(hi - lo)]
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
