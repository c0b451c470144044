"""Automatic landmark boxes from geometrically verified matches (after Gordo et al., ECCV 2016).

Per landmark of a training split:

1. RootSIFT features of every image; every pair is matched (2-NN ratio test) and verified by
   affine RANSAC (:func:`retrieval.verification.estimate_affine_ransac`); a pair with at least
   ``min_inliers`` inliers is an edge of the match graph.
2. Cleaning: only the largest connected component is kept; the other images are reported as
   likely noise (no landmark, or another landmark) and get no box.
3. Initial box of image i: the geometric median, over its edges, of the rectangle around the
   inlier keypoints of that pair in image i.
4. Diffusion: repeatedly, every neighbour j proposes its box mapped into image i by the pair's
   affine transform; ``b_i <- (1 - step) b_i + step * geomedian(proposals)`` (step 0.1) until
   the largest change is below ``tol`` (normalised units) or ``max_iter``.

Evidence for a box: the RANSAC inliers summed over the verified neighbours whose mapped box
agrees with it (IoU >= ``agree_iou``); more agreeing views and more inliers per view both raise
it. The ``score`` column of the boxes CSV maps it monotonically to [0, 1):

    score = evidence / (evidence + score_inliers)

(``score_inliers`` = 300: one agreeing view with 15 inliers scores 0.05, 300 agreeing inliers
score 0.5, 3000 score 0.91; it never saturates to 1, so ranks stay distinct). Sorting by score
puts the weakly supported boxes first for review. The report keeps each image's ``evidence``
and ``confidence`` (the fraction of its neighbours that agree). The CSV is usable directly as
pre-annotations (``gldboxes annotate import --predictions``).
"""

from __future__ import annotations

import copy
import csv
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.boxes import Box, box_iou, read_boxes_csv, write_boxes_csv
from gldboxes.io import config_hash, write_config, write_json
from gldboxes.progress import tqdm

__all__ = [
    "FORMAT_VERSION",
    "LandmarkResult",
    "PairEdge",
    "confs",
    "diffuse_boxes",
    "estimate_landmark_boxes",
    "evaluate",
    "extract_rootsift",
    "geometric_median",
    "geometric_median_reference",
    "main",
    "match_graph",
]

logger = logging.getLogger("annotation.autobox")

FORMAT_VERSION = 1

confs: dict[str, dict[str, Any]] = {
    "gordo-rootsift": {
        "output": "autobox-rootsift-r0.8-i15",  # file stem of the boxes CSV and report
        "features": {
            "max_features": 1000,  # strongest SIFT keypoints kept per image
            "max_side": 1024,  # longer side downscaled to this before extraction
        },
        "matching": {
            "ratio": 0.8,  # Lowe's ratio test on RootSIFT L2 distances
        },
        "verification": {
            "threshold": 10.0,  # RANSAC inlier residual in pixels (of the extraction scale)
            "trials": 1000,  # 3-point affine samples
            "seed": 0,
            "min_inliers": 15,  # a pair with fewer inliers is not an edge
        },
        "diffusion": {
            "step": 0.1,  # Gordo et al.'s update step
            "tol": 1e-4,  # stop when no box edge moves more than this (normalised units)
            "max_iter": 500,
        },
        "agree_iou": 0.5,  # a neighbour agrees with a box when its mapped box has this IoU
        "score_inliers": 300.0,  # score = agreeing inliers / (agreeing inliers + this)
    },
}


@dataclass(frozen=True)
class PairEdge:
    """A verified pair ``i -> j``.

    Attributes:
        i, j: image indices within the landmark.
        matrix: (2, 3) affine map of image-i pixels onto image-j pixels.
        inliers: number of RANSAC inliers.
        box_i, box_j: (4,) ``(ymin, xmin, ymax, xmax)`` normalised rectangles around the inlier
            keypoints in image i and image j.
    """

    i: int
    j: int
    matrix: np.ndarray
    inliers: int
    box_i: np.ndarray
    box_j: np.ndarray


@dataclass(frozen=True)
class LandmarkResult:
    """Boxes of one landmark.

    Attributes:
        boxes: (N, 4) normalised (NaN rows for dropped images).
        confidence: (N,) fraction of verified neighbours whose mapped box agrees.
        kept: (N,) bool, in the largest connected component.
        evidence: (N,) inliers summed over the agreeing neighbours.
        score: (N,) ``evidence / (evidence + score_inliers)`` in [0, 1) (0 for dropped images).
    """

    ids: list[str]
    boxes: np.ndarray
    confidence: np.ndarray
    kept: np.ndarray
    edges: int
    iterations: int
    evidence: np.ndarray
    score: np.ndarray


def extract_rootsift(
    path: str | os.PathLike[str], *, max_features: int = 1000, max_side: int = 1024
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """RootSIFT of one image, in memory: the retrieval extractor
    (:func:`retrieval.features.extract_image` with the ``rootsift`` preset), so annotation and
    retrieval see the same features.

    Returns:
        keypoints (N, 2) float64 ``x, y`` in pixels of the original image, descriptors (N, 128)
        float32 RootSIFT, and the image size ``(width, height)``.

    Raises:
        ValueError: an unreadable image (the message names it).
    """
    from retrieval import features

    conf = copy.deepcopy(features.confs["rootsift"])
    conf["model"]["max_features"] = int(max_features)
    conf["preprocessing"]["max_side"] = int(max_side)
    item = features.ImageItem(name=Path(path).name, path=Path(path))
    feats, size = features.extract_image(_rootsift_extractor(int(max_features)), item, conf)
    return feats.keypoints.astype(np.float64), feats.descriptors, size


@functools.lru_cache(maxsize=4)
def _rootsift_extractor(max_features: int) -> Any:
    from retrieval import features

    conf = copy.deepcopy(features.confs["rootsift"])
    conf["model"]["max_features"] = max_features
    return features.make_extractor(conf)


def _rect(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return np.clip(np.array([y0 / h, x0 / w, y1 / h, x1 / w]), 0.0, 1.0)


def match_graph(
    feats: Sequence[tuple[np.ndarray, np.ndarray, tuple[int, int]]],
    conf: Mapping[str, Any],
) -> list[PairEdge]:
    """Verify every pair ``i < j`` of one landmark's images; return the edges found."""
    from retrieval.verification import estimate_affine_ransac, match_descriptors

    ver = conf["verification"]
    edges: list[PairEdge] = []
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            (p1, d1, s1), (p2, d2, s2) = feats[i], feats[j]
            m = match_descriptors(d1, d2, max_distance=None, ratio=conf["matching"]["ratio"])
            if len(m) < ver["min_inliers"]:
                continue
            res = estimate_affine_ransac(
                p1[m[:, 0]],
                p2[m[:, 1]],
                threshold=ver["threshold"],
                trials=ver["trials"],
                seed=ver["seed"],
            )
            if not res.ok or res.num_inliers < ver["min_inliers"]:
                continue
            inl = m[res.inliers]
            edges.append(
                PairEdge(
                    i,
                    j,
                    np.asarray(res.matrix, np.float64),
                    res.num_inliers,
                    _rect(p1[inl[:, 0]], s1),
                    _rect(p2[inl[:, 1]], s2),
                )
            )
    return edges


def geometric_median(
    points: np.ndarray, mask: np.ndarray, *, iters: int = 200, eps: float = 1e-9
) -> np.ndarray:
    """Geometric medians of padded point sets by Weiszfeld's algorithm, all sets at once.

    Args:
        points: (N, M, D) up to M points per set.
        mask: (N, M) bool, which points are real; every set needs at least one.

    Returns:
        (N, D) the point minimising the sum of Euclidean distances to each set.
    """
    points = np.asarray(points, np.float64)
    mask = np.asarray(mask, bool)
    if (mask.sum(axis=1) == 0).any():
        raise ValueError("geometric_median: a point set is empty")
    w = mask.astype(np.float64)
    y = (points * w[..., None]).sum(axis=1) / w.sum(axis=1, keepdims=True)
    for _ in range(iters):
        dist = np.linalg.norm(points - y[:, None, :], axis=2)
        inv = w / np.maximum(dist, eps)
        new = (points * inv[..., None]).sum(axis=1) / inv.sum(axis=1, keepdims=True)
        if np.abs(new - y).max() < eps:
            return new
        y = new
    return y


def geometric_median_reference(points: np.ndarray) -> np.ndarray:
    """Slow reference: minimise the sum of distances with scipy (one (M, D) set)."""
    from scipy.optimize import minimize

    pts = np.asarray(points, np.float64)

    def cost(y: np.ndarray) -> float:
        return float(np.linalg.norm(pts - y, axis=1).sum())

    best = min(
        (
            minimize(
                cost,
                start,
                method="Nelder-Mead",
                options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
            )
            for start in (pts.mean(axis=0), np.median(pts, axis=0))
        ),
        key=lambda r: r.fun,
    )
    return np.asarray(best.x)


def _map_boxes(
    boxes: np.ndarray, matrices: np.ndarray, src_size: np.ndarray, dst_size: np.ndarray
) -> np.ndarray:
    """Map normalised boxes (E, 4) through pixel affines (E, 2, 3): bounding box of the corners."""
    y0, x0, y1, x1 = (boxes[:, k] for k in range(4))
    sw, sh = src_size[:, 0], src_size[:, 1]
    cx = np.stack([x0, x1, x1, x0], axis=1) * sw[:, None]  # (E, 4)
    cy = np.stack([y0, y0, y1, y1], axis=1) * sh[:, None]
    px = matrices[:, 0, 0, None] * cx + matrices[:, 0, 1, None] * cy + matrices[:, 0, 2, None]
    py = matrices[:, 1, 0, None] * cx + matrices[:, 1, 1, None] * cy + matrices[:, 1, 2, None]
    dw, dh = dst_size[:, 0, None], dst_size[:, 1, None]
    out = np.stack(
        [
            py.min(1, keepdims=True) / dh,
            px.min(1, keepdims=True) / dw,
            py.max(1, keepdims=True) / dh,
            px.max(1, keepdims=True) / dw,
        ],
        axis=1,
    )[..., 0]
    return np.clip(out, 0.0, 1.0)


def _invert(m: np.ndarray) -> np.ndarray:
    full = np.concatenate([m, np.array([[0.0, 0.0, 1.0]])], axis=0)
    return np.linalg.inv(full)[:2]


def diffuse_boxes(
    init: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    matrices: np.ndarray,
    sizes: np.ndarray,
    *,
    step: float = 0.1,
    tol: float = 1e-4,
    max_iter: int = 500,
) -> tuple[np.ndarray, int]:
    """Diffuse boxes along directed edges until they stop moving.

    Args:
        init: (N, 4) initial normalised boxes.
        src, dst: (E,) directed edges ``src -> dst`` (give both directions of a pair).
        matrices: (E, 2, 3) pixel affine maps from image ``src`` to image ``dst``.
        sizes: (N, 2) image ``(width, height)``.
        step: update step of ``b <- (1 - step) b + step * geomedian(proposals)``.

    Returns:
        The (N, 4) boxes and the number of iterations run. Images without incoming edges keep
        their initial box.
    """
    n = init.shape[0]
    boxes = np.array(init, np.float64)
    if len(src) == 0:
        return boxes, 0
    order = np.argsort(dst, kind="stable")
    src, dst, matrices = src[order], dst[order], matrices[order]
    deg = np.bincount(dst, minlength=n)
    slot = np.arange(len(dst)) - np.repeat(np.cumsum(deg) - deg, deg)
    mask = np.zeros((n, max(int(deg.max()), 1)), bool)
    mask[dst, slot] = True
    has = deg > 0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (returned)
        props = _map_boxes(boxes[src], matrices, sizes[src], sizes[dst])
        padded = np.zeros((*mask.shape, 4))
        padded[dst, slot] = props
        med = geometric_median(padded[has], mask[has])
        new = boxes.copy()
        new[has] = (1.0 - step) * boxes[has] + step * med
        moved = float(np.abs(new - boxes).max())
        boxes = new
        if moved < tol:
            break
    return boxes, it


def estimate_landmark_boxes(
    ids: Sequence[str], paths: Sequence[Path], conf: Mapping[str, Any]
) -> LandmarkResult:
    """Boxes for the images of one landmark (see the module docstring)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    fc = conf["features"]
    feats = [
        extract_rootsift(p, max_features=fc["max_features"], max_side=fc["max_side"]) for p in paths
    ]
    sizes = np.array([f[2] for f in feats], np.float64)
    edges = match_graph(feats, conf)
    boxes = np.full((n, 4), np.nan)
    conf_out = np.zeros(n)
    kept = np.zeros(n, bool)
    if not edges:
        return LandmarkResult(list(ids), boxes, conf_out, kept, 0, 0, np.zeros(n), np.zeros(n))
    ei = np.array([e.i for e in edges])
    ej = np.array([e.j for e in edges])
    graph = coo_matrix((np.ones(len(edges)), (ei, ej)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes_cc = np.bincount(labels[np.concatenate([ei, ej])], minlength=labels.max() + 1)
    biggest = int(np.argmax(sizes_cc))
    kept = labels == biggest
    use = [e for e in edges if kept[e.i]]
    # Directed edges (both ways) with their pair rectangles in the destination image.
    src = np.array([e.i for e in use] + [e.j for e in use])
    dst = np.array([e.j for e in use] + [e.i for e in use])
    mats = np.array([e.matrix for e in use] + [_invert(e.matrix) for e in use])
    rect_dst = np.array([e.box_j for e in use] + [e.box_i for e in use])
    deg = np.bincount(dst, minlength=n)
    order = np.argsort(dst, kind="stable")
    slot = np.arange(len(dst)) - np.repeat(np.cumsum(deg) - deg, deg)
    mask = np.zeros((n, int(deg.max())), bool)
    mask[dst[order], slot] = True
    padded = np.zeros((*mask.shape, 4))
    padded[dst[order], slot] = rect_dst[order]
    init = np.full((n, 4), np.nan)
    init[kept] = geometric_median(padded[kept], mask[kept])
    dconf = conf["diffusion"]
    final, iters = diffuse_boxes(
        np.where(kept[:, None], init, 0.0),
        src,
        dst,
        mats,
        sizes,
        step=dconf["step"],
        tol=dconf["tol"],
        max_iter=dconf["max_iter"],
    )
    props = _map_boxes(final[src], mats, sizes[src], sizes[dst])
    agree = box_iou(props, final[dst]) >= conf["agree_iou"]
    conf_out = np.bincount(dst, weights=agree.astype(np.float64), minlength=n) / np.maximum(deg, 1)
    inliers = np.array([e.inliers for e in use] * 2, np.float64)
    evidence = np.bincount(dst, weights=agree * inliers, minlength=n)
    final[~kept] = np.nan
    conf_out[~kept] = 0.0
    evidence[~kept] = 0.0
    score = evidence / (evidence + float(conf["score_inliers"]))
    return LandmarkResult(list(ids), final, conf_out, kept, len(use), iters, evidence, score)


def _read_train(csv_path: Path, image_root: Path) -> dict[str, list[tuple[str, Path]]]:
    """``{landmark id: [(image id, path)]}`` of a split CSV (see :func:`campaign.read_split`)."""
    from annotation.campaign import read_split

    groups: dict[str, list[tuple[str, Path]]] = {}
    for it in read_split(csv_path, image_root, read_sizes=False):
        if not it.landmark_id:
            raise ValueError(f"{csv_path}: image {it.id} has no landmark_id")
        groups.setdefault(it.landmark_id, []).append((it.id, it.path))
    return groups


def main(
    conf: Mapping[str, Any],
    train_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Estimate boxes for every landmark of a split; write ``OUT/<output>.csv`` and a report.

    Args:
        conf: a preset of :data:`confs`.
        train_csv: ``id,url,landmark_id`` (url relative to ``image_root``, default its folder)
            or ``id,landmark_id`` as ``gldboxes split`` writes it (images found by id under
            ``image_root``).
        out_dir: output folder; ``<output>.csv`` (``id,box,score``), ``<output>.json`` (per
            landmark: images, edges, iterations, dropped ids) and the resolved config.

    Returns:
        The boxes CSV path (skipped when it exists, unless ``overwrite``).
    """
    train_csv = Path(train_csv)
    root = Path(image_root) if image_root is not None else train_csv.parent
    out = Path(out_dir) / f"{conf['output']}.csv"
    report_path = out.with_suffix(".json")
    if out.exists() and report_path.exists() and not overwrite:
        logger.info("%s exists; skipping (overwrite=False)", out)
        return out
    groups = _read_train(train_csv, root)
    boxes: dict[str, list[Box]] = {}
    landmarks: dict[str, Any] = {}
    for lm, rows in tqdm(sorted(groups.items()), desc="autobox landmarks", unit="lm"):
        ids = [r[0] for r in rows]
        res = estimate_landmark_boxes(ids, [r[1] for r in rows], conf)
        for k, key in enumerate(ids):
            if res.kept[k]:
                y0, x0, y1, x1 = (float(v) for v in res.boxes[k])
                if y1 > y0 and x1 > x0:
                    boxes[key] = [Box(y0, x0, y1, x1, float(res.score[k]))]
        landmarks[lm] = {
            "images": len(ids),
            "kept": int(res.kept.sum()),
            "edges": res.edges,
            "iterations": res.iterations,
            "dropped": [k for k, m in zip(ids, res.kept, strict=True) if not m],
            "evidence": {k: float(res.evidence[j]) for j, k in enumerate(ids) if res.kept[j]},
            "confidence": {k: float(res.confidence[j]) for j, k in enumerate(ids) if res.kept[j]},
        }
    write_boxes_csv(out, boxes, with_score=True)
    n_img = sum(v["images"] for v in landmarks.values())
    write_json(
        report_path,
        {
            "format_version": FORMAT_VERSION,
            "config_hash": config_hash(conf),
            "images": n_img,
            "boxed": len(boxes),
            "dropped": sum(len(v["dropped"]) for v in landmarks.values()),
            "landmarks": landmarks,
        },
    )
    write_config(Path(out_dir), conf, name=f"{conf['output']}.config.yaml")
    logger.info("autobox: %d of %d images boxed, %s", len(boxes), n_img, out)
    return out


def evaluate(
    pred_csv: str | os.PathLike[str],
    gt_csv: str | os.PathLike[str],
    train_csv: str | os.PathLike[str],
    no_landmark_csv: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Mean IoU of estimated boxes against ground truth, versus the whole image as the box.

    Returns:
        ``images``, ``gt_images`` (images with a GT box), ``mean_iou`` (GT images; an image
        without an estimate counts 0), ``mean_iou_boxed`` (GT images that got a box),
        ``whole_image_iou`` (baseline on all GT images), ``coverage`` (GT images boxed),
        ``noise_images`` and ``noise_rejected`` (fraction of no-landmark images given no box).
    """
    pred = {k: v[0] for k, v in read_boxes_csv(pred_csv).items()}
    gt = {k: v[0] for k, v in read_boxes_csv(gt_csv).items()}
    with open(train_csv, newline="", encoding="utf-8") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    noise: list[str] = []
    if no_landmark_csv is not None:
        with open(no_landmark_csv, newline="", encoding="utf-8") as fh:
            noise = [row["id"] for row in csv.DictReader(fh)]
    gt_ids = [k for k in ids if k in gt]
    g = np.array([[gt[k].ymin, gt[k].xmin, gt[k].ymax, gt[k].xmax] for k in gt_ids])
    has = np.array([k in pred for k in gt_ids])
    p = np.array(
        [
            [pred[k].ymin, pred[k].xmin, pred[k].ymax, pred[k].xmax]
            if k in pred
            else [0.0, 0.0, 0.0, 0.0]
            for k in gt_ids
        ]
    )
    v = np.where(has, box_iou(p, g), 0.0)
    whole = box_iou(np.tile([0.0, 0.0, 1.0, 1.0], (len(gt_ids), 1)), g)
    return {
        "images": len(ids),
        "gt_images": len(gt_ids),
        "mean_iou": float(v.mean()),
        "mean_iou_boxed": float(v[has].mean()) if has.any() else None,
        "whole_image_iou": float(whole.mean()),
        "coverage": float(has.mean()),
        "noise_images": len(noise),
        "noise_rejected": float(np.mean([k not in pred for k in noise])) if noise else None,
    }
