"""AP@IoU of detector boxes: NumPy implementation against pycocotools and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detection.evaluate import average_precision, coco_metrics, evaluate_boxes
from gldboxes.boxes import Box, pairwise_iou, read_boxes_csv, write_boxes_csv


def _iou_reference(a: Box, b: Box) -> float:
    """Slow, obviously-correct IoU of two boxes."""
    ih = max(0.0, min(a.ymax, b.ymax) - max(a.ymin, b.ymin))
    iw = max(0.0, min(a.xmax, b.xmax) - max(a.xmin, b.xmin))
    inter = ih * iw
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def _random_box(rng: np.random.Generator, score: float | None = None) -> Box:
    y = np.sort(rng.uniform(0, 1, 2))
    x = np.sort(rng.uniform(0, 1, 2))
    return Box(
        float(y[0]),
        float(x[0]),
        float(y[1]) + 1e-6 * (y[1] == y[0]),
        float(x[1]) + 1e-6 * (x[1] == x[0]),
        score,
    )


def _jitter(rng: np.random.Generator, b: Box, amount: float, score: float) -> Box:
    d = rng.uniform(-amount, amount, 4)
    y0, x0 = max(0.0, b.ymin + d[0]), max(0.0, b.xmin + d[1])
    y1, x1 = min(1.0, b.ymax + d[2]), min(1.0, b.xmax + d[3])
    if y1 <= y0 or x1 <= x0:
        return Box(b.ymin, b.xmin, b.ymax, b.xmax, score)
    return Box(y0, x0, y1, x1, score)


def _random_world(
    seed: int, n_images: int = 30
) -> tuple[dict[str, list[Box]], dict[str, list[Box]], list[str]]:
    """Ground truth with 0-3 boxes per image, detections near (or away from) them."""
    rng = np.random.default_rng(seed)
    gt: dict[str, list[Box]] = {}
    pred: dict[str, list[Box]] = {}
    ids = [f"img{k:03d}" for k in range(n_images)]
    for i in ids:
        g = [_random_box(rng) for _ in range(int(rng.integers(0, 4)))]
        if g:
            gt[i] = g
        dets = [
            _jitter(rng, b, 0.08, float(rng.uniform()))
            for b in g
            for _ in range(int(rng.integers(0, 3)))
        ]
        dets += [_random_box(rng, float(rng.uniform())) for _ in range(int(rng.integers(0, 3)))]
        if dets:
            pred[i] = dets
    return pred, gt, ids


class TestBoxIou:
    def test_real_case(self) -> None:
        rng = np.random.default_rng(0)
        a = [_random_box(rng) for _ in range(7)]
        b = [_random_box(rng) for _ in range(5)]
        fast = pairwise_iou(
            np.array([[x.ymin, x.xmin, x.ymax, x.xmax] for x in a]),
            np.array([[x.ymin, x.xmin, x.ymax, x.xmax] for x in b]),
        )
        slow = np.array([[_iou_reference(x, y) for y in b] for x in a])
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)

    def test_smoke(self) -> None:
        # Half-overlapping unit squares: intersection 0.5, union 1.5.
        iou = pairwise_iou(np.array([[0, 0, 1, 1]]), np.array([[0, 0.5, 1, 1.5]]))
        assert iou.shape == (1, 1)
        assert iou[0, 0] == pytest.approx(1 / 3)
        assert pairwise_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


class TestAveragePrecision:
    def test_hand_worked(self) -> None:
        # One hit at the top score, one false positive, one missed box: precision 1 up to
        # recall 0.5, then nothing; 51 of COCO's 101 recall points see precision 1.
        gt = {"a": [Box(0.1, 0.1, 0.5, 0.5)], "b": [Box(0.2, 0.2, 0.9, 0.9)]}
        pred = {"a": [Box(0.1, 0.1, 0.5, 0.5, 0.9)], "b": [Box(0.0, 0.0, 0.1, 0.1, 0.8)]}
        assert average_precision(pred, gt) == pytest.approx(51 / 101, abs=1e-12)
        assert coco_metrics(pred, gt)["AP50"] == pytest.approx(51 / 101, abs=1e-12)

    def test_false_positive_on_negative_image_counts(self) -> None:
        gt = {"a": [Box(0.1, 0.1, 0.5, 0.5)]}
        pred = {"a": [Box(0.1, 0.1, 0.5, 0.5, 0.5)], "neg": [Box(0.1, 0.1, 0.2, 0.2, 0.9)]}
        # A higher-scoring FP on the negative image first: precision at recall 1 is 1/2.
        assert average_precision(pred, gt, ["a", "neg"]) == pytest.approx(0.5, abs=1e-12)
        # Leaving the negative image out of the evaluated ids ignores its detection.
        assert average_precision(pred, gt, ["a"]) == pytest.approx(1.0, abs=1e-12)

    def test_duplicate_detection_is_false_positive(self) -> None:
        gt = {"a": [Box(0.1, 0.1, 0.5, 0.5)]}
        pred = {"a": [Box(0.1, 0.1, 0.5, 0.5, 0.9), Box(0.1, 0.1, 0.5, 0.51, 0.8)]}
        assert average_precision(pred, gt) == pytest.approx(1.0)
        fp_first = {"a": [Box(0.1, 0.1, 0.5, 0.51, 0.95), Box(0.6, 0.6, 0.7, 0.7, 0.99)]}
        assert average_precision(fp_first, gt) == pytest.approx(0.5)

    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("iou", [0.5, 0.75])
    def test_matches_pycocotools(self, seed: int, iou: float) -> None:
        from pycocotools.coco import COCO  # noqa: F401 - the reference must be importable

        pred, gt, ids = _random_world(seed)
        ours = average_precision(pred, gt, ids, iou_threshold=iou)
        ref = coco_metrics(pred, gt, ids)["AP50" if iou == 0.5 else "AP75"]
        assert 0.0 < ours < 1.0
        assert ours == pytest.approx(ref, abs=1e-9)

    def test_max_dets_keeps_best_per_image(self) -> None:
        gt = {"a": [Box(0.1, 0.1, 0.5, 0.5)]}
        pred = {"a": [Box(0.6, 0.6, 0.9, 0.9, 0.9), Box(0.1, 0.1, 0.5, 0.5, 0.1)]}
        assert average_precision(pred, gt, max_dets=1) == 0.0
        assert average_precision(pred, gt, max_dets=2) == pytest.approx(0.5)

    def test_exception(self) -> None:
        assert math.isnan(average_precision({"a": [Box(0, 0, 1, 1, 0.5)]}, {}))
        assert average_precision({}, {"a": [Box(0, 0, 1, 1)]}) == 0.0


class TestEvaluateBoxes:
    def test_real_case(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        pred, gt, ids = _random_world(11)
        pcsv = write_boxes_csv(tmp_path / "pred.csv", pred, with_score=True)
        gcsv = write_boxes_csv(tmp_path / "gt.csv", gt, with_score=False)
        assert read_boxes_csv(pcsv).keys() == pred.keys()
        res = evaluate_boxes(pcsv, gcsv, image_ids=ids)
        assert res["ap"] == pytest.approx(average_precision(pred, gt, ids), abs=1e-12)
        assert res["coco"]["AP50"] == pytest.approx(res["ap"], abs=1e-9)
        assert res["n_ground_truth"] == sum(len(v) for v in gt.values())
        assert "APs" not in res["coco"]  # no image sizes: no area ranges
        # A score floor removes detections and can only change AP.
        strict = evaluate_boxes(pcsv, gcsv, image_ids=ids, min_score=0.5)
        assert strict["n_detections"] < res["n_detections"]
