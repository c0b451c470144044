"""Campaign quality: validation, per-image decisions, filtering to a boxes CSV, agreement.

Nothing is dropped silently: every annotation problem becomes an :class:`Issue`, every image
left out of the boxes CSV gets a row ``id,status,reason`` in the removed file.

Issue kinds (per annotation):
    two_boxes       more than one landmark box (the protocol allows one)
    box_and_flag    a box *and* the "no prominent landmark" flag
    empty           neither a box nor the flag (and not skipped)
    outside_image   a box edge beyond the image (clipped; invalid if nothing is left)
    tiny_box        a box side below ``min_side`` of the image side (after clipping)
    unknown_result  result items we do not understand (kept in the report)

Image decisions: ``box`` (one box, the mean of the valid raters' boxes when they agree),
``no_landmark`` (the valid raters all ticked the flag), ``conflict`` (valid raters disagree:
box vs flag, or boxes with IoU below ``agree_iou``), ``invalid`` (only invalid annotations),
``gold_failed`` (only raters dropped for their gold accuracy), ``skipped`` (only skips),
``unannotated``.

Gold filtering (:func:`gold_weights`): a rater who answered at least ``min_answered`` gold
tasks with an accuracy below ``min_accuracy`` is dropped (policy ``drop``: weight 0, their
annotations are ignored) or down-weighted (policy ``weight``: weight ``accuracy /
min_accuracy`` in the box mean; still weight 0 at accuracy 0). Raters with fewer gold answers
keep weight 1. What was dropped is counted by :func:`gold_filter_report`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from annotation.export import AnnotationRecord, TaskRecord
from gldboxes.boxes import Box, box_iou, write_boxes_csv
from gldboxes.io import atomic_write, write_json

__all__ = [
    "REPORT_FORMAT_VERSION",
    "Decision",
    "Issue",
    "agreement",
    "clip_edges",
    "decide",
    "filter_boxes",
    "filter_campaign",
    "gold_accuracy",
    "gold_filter_report",
    "gold_weights",
    "validate",
    "validation_report",
]

REPORT_FORMAT_VERSION = 1
INVALIDATING = frozenset({"two_boxes", "box_and_flag", "empty", "tiny_box"})
GOLD_POLICIES = ("drop", "weight")


@dataclass(frozen=True)
class Issue:
    """One problem found in one annotation."""

    kind: str
    task_id: int
    image_id: str
    annotation_id: int
    rater: str
    detail: str


@dataclass(frozen=True)
class Decision:
    """What the campaign concluded about one image."""

    image_id: str
    status: str
    box: Box | None
    reason: str


def clip_edges(edges: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Clip ``(ymin, xmin, ymax, xmax)`` to [0, 1]; ``None`` when nothing is left inside."""
    y0, x0, y1, x1 = (min(max(float(v), 0.0), 1.0) for v in edges)
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, x0, y1, x1


def validate(
    anns: Sequence[AnnotationRecord], *, min_side: float = 0.02, tol: float = 1e-6
) -> list[Issue]:
    """Every problem of every annotation (skipped annotations are not checked).

    Args:
        min_side: smallest acceptable box side as a fraction of the image side.
        tol: slack for boxes touching the image border (percent rounding).
    """
    issues: list[Issue] = []
    for a in anns:

        def add(kind: str, detail: str, a: AnnotationRecord = a) -> None:
            issues.append(Issue(kind, a.task_id, a.image_id, a.annotation_id, a.rater, detail))

        if a.unknown:
            add("unknown_result", "; ".join(a.unknown))
        if a.cancelled:
            continue
        if len(a.boxes) > 1:
            add("two_boxes", f"{len(a.boxes)} boxes")
        if a.boxes and a.flag:
            add("box_and_flag", "box drawn and 'no prominent landmark' ticked")
        if not a.boxes and not a.flag:
            add("empty", "neither a box nor the flag")
        for edges in a.boxes:
            if min(edges) < -tol or max(edges) > 1 + tol:
                add("outside_image", "edges " + " ".join(f"{v:.4f}" for v in edges))
            clipped = clip_edges(edges)
            if clipped is None:
                add("tiny_box", "nothing left inside the image")
                continue
            h, w = clipped[2] - clipped[0], clipped[3] - clipped[1]
            if h < min_side or w < min_side:
                add("tiny_box", f"{h:.4f} x {w:.4f} of the image (min side {min_side})")
    return issues


def validation_report(
    tasks: Sequence[TaskRecord], anns: Sequence[AnnotationRecord], issues: Sequence[Issue]
) -> dict[str, Any]:
    """A JSON-ready report: counts per issue kind and every issue."""
    counts: dict[str, int] = {}
    for i in issues:
        counts[i.kind] = counts.get(i.kind, 0) + 1
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "tasks": len(tasks),
        "annotations": len(anns),
        "skipped": sum(a.cancelled for a in anns),
        "annotations_with_issues": len({i.annotation_id for i in issues}),
        "counts": dict(sorted(counts.items())),
        "issues": [asdict(i) for i in issues],
    }


def decide(
    tasks: Sequence[TaskRecord],
    anns: Sequence[AnnotationRecord],
    issues: Sequence[Issue],
    *,
    agree_iou: float = 0.5,
    weights: Mapping[str, float] | None = None,
) -> dict[str, Decision]:
    """One :class:`Decision` per image (see the module docstring for the statuses).

    Args:
        weights: ``{rater: weight}`` from :func:`gold_weights` (raters not listed: 1). Raters with
            weight 0 are ignored (an image left with only them is ``gold_failed``); the box is the
            weighted mean of the other raters' boxes.
    """
    weights = weights or {}
    bad: dict[int, list[str]] = {}
    for i in issues:
        if i.kind in INVALIDATING:
            bad.setdefault(i.annotation_id, []).append(i.kind)
    by_task: dict[int, list[AnnotationRecord]] = {}
    for a in anns:
        by_task.setdefault(a.task_id, []).append(a)
    out: dict[str, Decision] = {}
    for t in tasks:
        mine = by_task.get(t.task_id, [])
        done = [a for a in mine if not a.cancelled]
        checked = [a for a in done if a.annotation_id not in bad]
        valid = [a for a in checked if weights.get(a.rater, 1.0) > 0]
        if not mine:
            out[t.image_id] = Decision(t.image_id, "unannotated", None, "no annotation")
            continue
        if not done:
            out[t.image_id] = Decision(
                t.image_id, "skipped", None, f"skipped by {', '.join(a.rater for a in mine)}"
            )
            continue
        if not checked:
            bads = sorted({f"{a.rater}: {'+'.join(bad[a.annotation_id])}" for a in done})
            out[t.image_id] = Decision(t.image_id, "invalid", None, "; ".join(bads))
            continue
        if not valid:
            who = ", ".join(sorted({a.rater for a in checked}))
            out[t.image_id] = Decision(
                t.image_id, "gold_failed", None, f"only raters below the gold threshold: {who}"
            )
            continue
        flags = [a for a in valid if a.flag]
        boxed = [a for a in valid if a.boxes]
        if flags and boxed:
            out[t.image_id] = Decision(
                t.image_id,
                "conflict",
                None,
                f"box by {', '.join(a.rater for a in boxed)}; no prominent landmark by "
                f"{', '.join(a.rater for a in flags)}",
            )
            continue
        if flags:
            who = ", ".join(a.rater for a in flags)
            out[t.image_id] = Decision(
                t.image_id, "no_landmark", None, f"no prominent landmark ({who})"
            )
            continue
        edges = np.array([clip_edges(a.boxes[0]) for a in boxed], dtype=np.float64)
        if len(edges) > 1:
            pair = box_iou(edges[:, None, :], edges[None, :, :])
            worst = float(pair.min())
            if worst < agree_iou:
                why = f"raters' boxes disagree (IoU {worst:.3f} < {agree_iou})"
                out[t.image_id] = Decision(t.image_id, "conflict", None, why)
                continue
        w = np.array([weights.get(a.rater, 1.0) for a in boxed], dtype=np.float64)
        mean = (edges * w[:, None]).sum(axis=0) / w.sum()
        out[t.image_id] = Decision(
            t.image_id, "box", Box(*(float(v) for v in mean)), f"{len(boxed)} rater(s)"
        )
    return out


def filter_boxes(
    decisions: Mapping[str, Decision],
    boxes_csv: str | os.PathLike[str],
    removed_csv: str | os.PathLike[str],
) -> tuple[Path, Path]:
    """Write the clean boxes CSV (``box`` decisions) and ``id,status,reason`` for the rest."""
    write_boxes_csv(
        boxes_csv,
        {k: [d.box] for k, d in decisions.items() if d.status == "box" and d.box is not None},
        with_score=False,
    )
    with atomic_write(removed_csv, newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "status", "reason"])
        for key in sorted(decisions):
            d = decisions[key]
            if d.status != "box":
                writer.writerow([key, d.status, d.reason])
    return Path(boxes_csv), Path(removed_csv)


def filter_campaign(
    tasks: Sequence[TaskRecord],
    anns: Sequence[AnnotationRecord],
    out_stem: str | os.PathLike[str],
    *,
    min_side: float = 0.02,
    agree_iou: float = 0.5,
    min_gold_accuracy: float = 0.7,
    gold_policy: str = "drop",
    min_gold_answers: int = 1,
) -> dict[str, Any]:
    """Validate, judge raters on gold, decide and write the clean boxes (``annotate filter``).

    Writes ``<out_stem>-boxes.csv``, ``<out_stem>-removed.csv`` (:func:`filter_boxes`) and
    ``<out_stem>-filter.json`` (this summary).

    Args:
        min_gold_accuracy, gold_policy, min_gold_answers: see :func:`gold_weights` (gold
            answers match with ``agree_iou``).

    Returns:
        ``{"boxes", "removed", "summary"`` (paths), ``"statuses"`` (images per decision
        status), ``"gold_filter"`` (:func:`gold_filter_report`)``}``.
    """
    stem = str(out_stem)
    issues = validate(anns, min_side=min_side)
    gold = gold_accuracy(tasks, anns, issues, match_iou=agree_iou)
    weights = gold_weights(
        gold, min_accuracy=min_gold_accuracy, policy=gold_policy, min_answered=min_gold_answers
    )
    decisions = decide(tasks, anns, issues, agree_iou=agree_iou, weights=weights)
    boxes, removed = filter_boxes(decisions, f"{stem}-boxes.csv", f"{stem}-removed.csv")
    statuses: dict[str, int] = {}
    for d in decisions.values():
        statuses[d.status] = statuses.get(d.status, 0) + 1
    report = gold_filter_report(
        anns, issues, gold, weights, min_accuracy=min_gold_accuracy, policy=gold_policy
    )
    report["min_answered"] = min_gold_answers
    summary = {
        "format_version": REPORT_FORMAT_VERSION,
        "images": len(decisions),
        "statuses": dict(sorted(statuses.items())),
        "gold_filter": report,
    }
    path = write_json(f"{stem}-filter.json", summary)
    return {
        "boxes": str(boxes),
        "removed": str(removed),
        "summary": str(path),
        "statuses": summary["statuses"],
        "gold_filter": report,
    }


def _gold_edges(gold: Mapping[str, Any]) -> np.ndarray | None:
    if gold.get("no_landmark") or not gold.get("box"):
        return None
    b = Box.from_string(str(gold["box"]))
    return np.array([b.ymin, b.xmin, b.ymax, b.xmax], dtype=np.float64)


def gold_accuracy(
    tasks: Sequence[TaskRecord],
    anns: Sequence[AnnotationRecord],
    issues: Sequence[Issue],
    *,
    match_iou: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Accuracy of each rater on the gold tasks (tasks whose ``gold`` is set).

    Only valid annotations (no invalidating issue, not skipped) count. A gold box is answered
    correctly by a box with IoU >= ``match_iou``, a gold no-landmark task by the flag.

    Returns:
        ``{rater: {"answered", "correct", "accuracy", "mean_iou"}}`` sorted by rater
        (``mean_iou`` over gold boxes, ``None`` when the rater saw only no-landmark gold).
    """
    bad = {i.annotation_id for i in issues if i.kind in INVALIDATING}
    task_of = {t.task_id: t for t in tasks}
    gold: dict[str, dict[str, Any]] = {}
    gold_ious: dict[str, list[float]] = {}
    for a in anns:
        if a.cancelled or a.annotation_id in bad:
            continue
        t = task_of.get(a.task_id)
        if t is None or not t.gold:
            continue
        g = gold.setdefault(a.rater, {"answered": 0, "correct": 0})
        g["answered"] += 1
        ge = _gold_edges(t.gold)
        if ge is None:
            g["correct"] += int(a.flag)
        elif a.boxes:
            v = float(box_iou(np.array(clip_edges(a.boxes[0])), ge))
            gold_ious.setdefault(a.rater, []).append(v)
            g["correct"] += int(v >= match_iou)
        else:
            gold_ious.setdefault(a.rater, []).append(0.0)
    for rater, g in gold.items():
        g["accuracy"] = g["correct"] / g["answered"]
        vals = gold_ious.get(rater)
        g["mean_iou"] = float(np.mean(vals)) if vals else None
    return dict(sorted(gold.items()))


def gold_weights(
    gold: Mapping[str, Mapping[str, Any]],
    *,
    min_accuracy: float = 0.7,
    policy: str = "drop",
    min_answered: int = 1,
) -> dict[str, float]:
    """Weight of each rater in the decisions, from their gold accuracy.

    Args:
        gold: :func:`gold_accuracy` (raters without gold answers are not listed: weight 1).
        min_accuracy: raters with a lower accuracy are dropped or down-weighted; 0 keeps everyone.
        policy: ``drop`` (weight 0) or ``weight`` (``accuracy / min_accuracy``).
        min_answered: raters with fewer gold answers are not judged yet (weight 1).

    Returns:
        ``{rater: weight}`` for the judged raters of ``gold``, weights in [0, 1].
    """
    if policy not in GOLD_POLICIES:
        raise ValueError(f"gold policy must be one of {', '.join(GOLD_POLICIES)}, got {policy!r}")
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min gold accuracy must be in [0, 1], got {min_accuracy}")
    if min_answered < 1:
        raise ValueError(f"min gold answers must be >= 1, got {min_answered}")
    out: dict[str, float] = {}
    for rater, g in gold.items():
        acc = float(g["accuracy"])
        if int(g["answered"]) < min_answered:
            continue
        if acc >= min_accuracy:
            out[rater] = 1.0
        else:
            out[rater] = 0.0 if policy == "drop" else acc / min_accuracy
    return out


def gold_filter_report(
    anns: Sequence[AnnotationRecord],
    issues: Sequence[Issue],
    gold: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, float],
    *,
    min_accuracy: float,
    policy: str,
) -> dict[str, Any]:
    """What gold filtering changed: raters dropped/down-weighted, their boxes, images touched.

    Returns:
        ``min_accuracy``, ``policy``, ``raters_judged`` (raters with a weight in ``weights``),
        ``raters_dropped`` / ``raters_downweighted`` (lists of ``{rater, accuracy, answered,
        weight}``), ``boxes_dropped`` / ``boxes_downweighted`` (valid annotations with a box of
        those raters), ``images_affected`` (images with at least one such valid annotation).
    """
    bad = {i.annotation_id for i in issues if i.kind in INVALIDATING}
    below = {r: w for r, w in weights.items() if w < 1.0}
    touched = [
        a for a in anns if a.rater in below and not a.cancelled and a.annotation_id not in bad
    ]

    def who(rs: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "rater": r,
                "accuracy": gold[r]["accuracy"],
                "answered": gold[r]["answered"],
                "weight": below[r],
            }
            for r in sorted(rs)
        ]

    dropped = [r for r, w in below.items() if w == 0.0]
    return {
        "min_accuracy": min_accuracy,
        "policy": policy,
        "raters_judged": len(weights),
        "raters_dropped": who(dropped),
        "raters_downweighted": who([r for r, w in below.items() if w > 0.0]),
        "boxes_dropped": sum(bool(a.boxes) for a in touched if below[a.rater] == 0.0),
        "boxes_downweighted": sum(bool(a.boxes) for a in touched if below[a.rater] > 0.0),
        "images_affected": len({a.image_id for a in touched}),
    }


def agreement(
    tasks: Sequence[TaskRecord],
    anns: Sequence[AnnotationRecord],
    issues: Sequence[Issue],
    *,
    kept_iou: float = 0.95,
    match_iou: float = 0.5,
) -> dict[str, Any]:
    """Agreement between raters, accuracy on gold tasks, acceptance of pre-annotations.

    Only valid annotations (no invalidating issue, not skipped) are compared.

    - ``overlap``: every pair of raters on a task: ``both_box`` pairs with their IoU,
      ``both_flag`` and ``box_vs_flag`` counts; ``mean_iou`` and ``agree`` (IoU >= match_iou)
      over ``both_box`` pairs.
    - ``gold`` per rater: ``answered``, ``correct`` (box with IoU >= match_iou against a gold box,
      or the flag on a gold no-landmark task), ``accuracy``, ``mean_iou`` on gold boxes.
    - ``preannotation``: over annotations of tasks with a prediction: ``kept`` (one box with
      IoU >= kept_iou to the prediction), ``moved`` (one box, lower IoU), ``deleted`` (no box),
      plus the same per rater.
    """
    bad = {i.annotation_id for i in issues if i.kind in INVALIDATING}
    valid = [a for a in anns if not a.cancelled and a.annotation_id not in bad]
    task_of = {t.task_id: t for t in tasks}
    by_task: dict[int, list[AnnotationRecord]] = {}
    for a in valid:
        by_task.setdefault(a.task_id, []).append(a)

    pairs: list[dict[str, Any]] = []
    for tid, group in sorted(by_task.items()):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                if a.rater == b.rater:
                    continue
                entry: dict[str, Any] = {
                    "task_id": tid,
                    "image_id": a.image_id,
                    "raters": [a.rater, b.rater],
                }
                if a.boxes and b.boxes:
                    ea = np.array(clip_edges(a.boxes[0]), dtype=np.float64)
                    eb = np.array(clip_edges(b.boxes[0]), dtype=np.float64)
                    entry.update(kind="both_box", iou=float(box_iou(ea, eb)))
                elif a.flag and b.flag:
                    entry.update(kind="both_flag", iou=None)
                else:
                    entry.update(kind="box_vs_flag", iou=None)
                pairs.append(entry)
    ious = np.array([p["iou"] for p in pairs if p["kind"] == "both_box"], dtype=np.float64)
    overlap = {
        "pairs": len(pairs),
        "both_box": int(ious.size),
        "both_flag": sum(p["kind"] == "both_flag" for p in pairs),
        "box_vs_flag": sum(p["kind"] == "box_vs_flag" for p in pairs),
        "mean_iou": float(ious.mean()) if ious.size else None,
        "agree": float((ious >= match_iou).mean()) if ious.size else None,
        "details": pairs,
    }

    gold = gold_accuracy(tasks, anns, issues, match_iou=match_iou)

    accept: dict[str, dict[str, int]] = {}
    total = {"kept": 0, "moved": 0, "deleted": 0}
    for a in valid:
        t = task_of.get(a.task_id)
        if t is None or t.prediction is None:
            continue
        if not a.boxes:
            kind = "deleted"
        else:
            pe = clip_edges(t.prediction)
            v = (
                0.0
                if pe is None
                else float(box_iou(np.array(clip_edges(a.boxes[0])), np.array(pe)))
            )
            kind = "kept" if v >= kept_iou else "moved"
        accept.setdefault(a.rater, {"kept": 0, "moved": 0, "deleted": 0})[kind] += 1
        total[kind] += 1
    n = sum(total.values())
    pre = {
        **total,
        "annotations": n,
        "kept_rate": total["kept"] / n if n else None,
        "moved_rate": total["moved"] / n if n else None,
        "deleted_rate": total["deleted"] / n if n else None,
        "per_rater": dict(sorted(accept.items())),
    }
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "overlap": overlap,
        "gold": gold,
        "preannotation": pre,
        "thresholds": {"kept_iou": kept_iou, "match_iou": match_iou},
    }
