"""Automatic box estimation (Gordo et al.): medians, diffusion, ratio test, the synthetic world."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from annotation import autobox


class TestGeometricMedian:
    def test_matches_reference(self) -> None:
        rng = np.random.default_rng(0)
        sets = [rng.normal(size=(m, 4)) for m in (1, 2, 3, 5, 8)]
        pts = np.zeros((len(sets), 8, 4))
        mask = np.zeros((len(sets), 8), bool)
        for k, s in enumerate(sets):
            pts[k, : len(s)] = s
            mask[k, : len(s)] = True
        pts[~mask] = 1e6  # padding must be ignored
        fast = autobox.geometric_median(pts, mask, iters=2000, eps=1e-12)
        for k, s in enumerate(sets):
            ref = autobox.geometric_median_reference(s)
            cost = lambda y, s=s: np.linalg.norm(s - y, axis=1).sum()  # noqa: E731
            assert cost(fast[k]) <= cost(ref) + 1e-6
        np.testing.assert_allclose(fast[0], sets[0][0])
        # robust: one outlier among five points barely moves it
        robust = autobox.geometric_median(
            np.array([[[0.0] * 4] * 4 + [[100.0] * 4]]), np.ones((1, 5), bool)
        )
        assert np.abs(robust).max() < 1e-6

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            autobox.geometric_median(np.zeros((1, 2, 4)), np.zeros((1, 2), bool))


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def test_diffusion_reaches_consistent_boxes() -> None:
    """Five views related by known affines, one box far off: the robust median restores it."""
    w, h = 400.0, 300.0
    sizes = np.tile([w, h], (5, 1))
    from0 = [
        np.array([[1.0, 0, 0], [0, 1.0, 0]]),
        np.array([[1.2, 0, 20.0], [0, 1.2, -10.0]]),
        np.array([[0.8, 0, 50.0], [0, 0.8, 30.0]]),
        np.array([[1.1, 0, -30.0], [0, 0.9, 20]]),
        np.array([[0.9, 0, 40.0], [0, 1.1, -20.0]]),
    ]
    base = np.array([0.2, 0.2, 0.6, 0.5])
    truth = np.zeros((5, 4))
    for k, a in enumerate(from0):
        x0, y0 = a @ [base[1] * w, base[0] * h, 1]
        x1, y1 = a @ [base[3] * w, base[2] * h, 1]
        truth[k] = [y0 / h, x0 / w, y1 / h, x1 / w]
    src, dst, mats = [], [], []
    for i in range(5):
        for j in range(5):
            if i != j:  # image i -> image j
                src.append(i)
                dst.append(j)
                mats.append((_h(from0[j]) @ np.linalg.inv(_h(from0[i])))[:2])
    src_a, dst_a, mats_a = np.array(src), np.array(dst), np.array(mats)
    init = truth.copy()
    init[2] = [0.05, 0.05, 0.95, 0.95]  # one image starts far off
    out, iters = autobox.diffuse_boxes(
        init, src_a, dst_a, mats_a, sizes, step=0.1, tol=1e-8, max_iter=3000
    )
    assert 1 < iters < 3000
    np.testing.assert_allclose(out, truth, atol=1e-5)
    # consistent boxes are a fixed point
    same, it1 = autobox.diffuse_boxes(truth, src_a, dst_a, mats_a, sizes, step=0.1, tol=1e-9)
    np.testing.assert_allclose(same, truth, atol=1e-9)
    assert it1 == 1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.mark.slow
def test_autobox_on_synthetic_world(world: Path, tmp_path: Path) -> None:
    """Three landmarks of the tiny world (~6 s): better than the whole image, noise rejected."""
    train = world / "train"
    with open(train / "train.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["landmark_id"] in {"0", "1", "2"}]
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["id", "url", "landmark_id"])
        wr.writeheader()
        wr.writerows(rows)
    conf = autobox.confs["gordo-rootsift"]
    out = autobox.main(conf, split, tmp_path / "out", image_root=train)
    assert out.name == "autobox-rootsift-r0.8-i15.csv"
    res = autobox.evaluate(out, train / "boxes.csv", split, train / "no_landmark.csv")
    assert res["images"] == 24
    assert res["mean_iou"] > res["whole_image_iou"] + 0.08
    assert res["mean_iou"] > 0.45
    noise = {r["id"] for r in csv.DictReader(open(train / "no_landmark.csv"))}
    boxed = {r["id"] for r in csv.DictReader(open(out))}
    assert not (noise & boxed)  # every no-landmark image of these landmarks is rejected
    assert res["coverage"] >= 0.9
    mtime = out.stat().st_mtime_ns
    assert autobox.main(conf, split, tmp_path / "out", image_root=train) == out  # skipped
    assert out.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_autobox_scores_rank_evidence(world: Path, tmp_path: Path) -> None:
    """Scores follow the verified evidence (~2 s): an image of landmark 0 and three downscaled
    copies of it (fewer keypoints, so fewer inliers with every view) rank original > 1/2 > 1/3
    > 1/4, and each score is agreeing inliers / (agreeing inliers + 300) from the report."""
    import json

    import cv2

    train = world / "train"
    with open(train / "train.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["landmark_id"] == "0"]
    strong = rows[3]
    img = cv2.imread(str(train / strong["url"]))
    weak = []
    for f in (0.5, 0.35, 0.25):
        path = tmp_path / f"weak-{f}.jpg"
        cv2.imwrite(str(path), cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA))
        rows.append({"id": f"weak-{f}", "url": str(path), "landmark_id": "0"})
        weak.append(f"weak-{f}")
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["id", "url", "landmark_id"])
        wr.writeheader()
        wr.writerows(rows)
    conf = autobox.confs["gordo-rootsift"]
    out = autobox.main(conf, split, tmp_path / "out", image_root=train)
    with open(out, newline="") as fh:
        score = {r["id"]: float(r["score"]) for r in csv.DictReader(fh)}
    assert len(score) == len(rows)  # every view, and every copy, is boxed
    order = [strong["id"], *weak]
    ranked = [score[k] for k in order]
    assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == 4, ranked
    assert score[weak[-1]] < min(v for k, v in score.items() if not k.startswith("weak"))
    assert all(0.0 < v < 1.0 for v in score.values())
    evidence = json.loads(out.with_suffix(".json").read_text())["landmarks"]["0"]["evidence"]
    for key, v in score.items():
        assert v == pytest.approx(evidence[key] / (evidence[key] + conf["score_inliers"]))
