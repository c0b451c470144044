"""Campaign config, snapshot parsing, validation, decisions, filtering and agreement (no server)."""

from __future__ import annotations

import csv
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from annotation.config import (
    NO_LANDMARK_CHOICE,
    box_to_rect_value,
    labeling_config,
    rect_value_to_edges,
)
from annotation.export import load_snapshot, parse_snapshot, progress, progress_rates
from annotation.quality import (
    agreement,
    decide,
    filter_boxes,
    filter_campaign,
    gold_accuracy,
    gold_weights,
    validate,
    validation_report,
)
from gldboxes.boxes import box_iou, read_boxes_csv
from gldboxes.io import write_json

W, H = 400, 300


def _rect(y0: float, x0: float, y1: float, x1: float) -> dict[str, Any]:
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": box_to_rect_value(y0, x0, y1, x1),
    }


FLAG = {
    "from_name": "flag",
    "to_name": "image",
    "type": "choices",
    "value": {"choices": [NO_LANDMARK_CHOICE]},
}
PRED = (0.2, 0.2, 0.6, 0.6)


def _task(
    tid: int,
    anns: list[tuple[int, list[dict[str, Any]], bool]],
    *,
    gold: dict[str, Any] | None = None,
    overlap: bool = False,
) -> dict[str, Any]:
    return {
        "id": tid,
        "data": {
            "image": f"/data/local-files/?d=i{tid}.jpg",
            "gld_id": f"img{tid}",
            "width": W,
            "height": H,
            "overlap": overlap,
            "gold": gold,
        },
        "predictions": [{"model_version": "m1", "score": 0.9, "result": [_rect(*PRED)]}],
        "annotations": [
            {
                "id": 100 * tid + k,
                "completed_by": who,
                "result": res,
                "was_cancelled": cancelled,
                "lead_time": 2.0 + k,
            }
            for k, (who, res, cancelled) in enumerate(anns)
        ],
    }


SHIFTED = (0.25, 0.2, 0.65, 0.6)  # IoU with PRED: 0.35 * 0.4 / (2 * 0.16 - 0.14) = 7/9


def snapshot() -> dict[str, Any]:
    """Two raters (ids 2, 3) over ten tasks covering every case of the issue."""
    tasks = [
        _task(
            1,
            [(2, [_rect(*PRED)], False), (3, [_rect(*SHIFTED)], False)],
            gold={"box": "0.2 0.2 0.6 0.6", "no_landmark": False},
            overlap=True,
        ),
        _task(2, [(2, [_rect(*PRED)], False), (3, [_rect(*PRED)], False)], overlap=True),
        _task(3, [(2, [_rect(*PRED), _rect(0.7, 0.7, 0.9, 0.9)], False)]),  # two boxes
        _task(4, [(2, [_rect(*PRED), FLAG], False)]),  # box and flag
        _task(5, [(2, [], False)]),  # empty
        _task(6, [(2, [_rect(0.1, -0.1, 0.5, 0.4)], False)]),  # leaves the image on the left
        _task(7, [(2, [_rect(0.5, 0.5, 0.505, 0.6)], False)]),  # tiny
        _task(8, [(2, [FLAG], False)]),  # no prominent landmark
        _task(9, [(2, [_rect(0.0, 0.0, 0.3, 0.3)], False), (3, [FLAG], False)]),  # conflict
        _task(10, [(3, [], True)]),  # skipped
        _task(11, []),  # not annotated yet
    ]
    return {
        "format_version": 1,
        "source": "label-studio",
        "project_id": 1,
        "users": {"2": "r1@x.org", "3": "r2@x.org"},
        "tasks": tasks,
    }


class TestConfig:
    def test_smoke(self) -> None:
        root = ET.fromstring(labeling_config())
        rect = root.find("RectangleLabels")
        assert rect is not None and rect.get("name") == "box" and rect.get("toName") == "image"
        labels = [lab.get("value") for lab in rect.findall("Label")]
        assert labels == ["landmark"]
        assert rect.find("Label").get("maxUsages") == "1"  # type: ignore[union-attr]
        choices = root.find("Choices")
        assert [c.get("value") for c in choices.findall("Choice")] == [NO_LANDMARK_CHOICE]  # type: ignore[union-attr]

    def test_instructions_escaped(self) -> None:
        xml = labeling_config('Box the "main" <landmark> & nothing else')
        headers = [h.get("value") for h in ET.fromstring(xml).findall("Header")]
        assert 'Box the "main" <landmark> & nothing else' in headers

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="instructions"):
            labeling_config("  ")
        with pytest.raises(ValueError, match="rotated"):
            rect_value_to_edges({"x": 1, "y": 1, "width": 2, "height": 2, "rotation": 30})
        with pytest.raises(ValueError, match="numeric"):
            rect_value_to_edges({"x": 1, "y": 1})

    def test_round_trip(self) -> None:
        rng = np.random.default_rng(0)
        for _ in range(50):
            y0, x0 = rng.uniform(0, 0.5, 2)
            y1, x1 = y0 + rng.uniform(0.01, 0.5), x0 + rng.uniform(0.01, 0.5)
            v = box_to_rect_value(y0, x0, y1, x1)
            assert v["x"] == pytest.approx(100 * x0) and v["height"] == pytest.approx(
                100 * (y1 - y0)
            )
            np.testing.assert_allclose(rect_value_to_edges(v), (y0, x0, y1, x1), atol=1e-12)


def _iou_reference(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Pixel-free IoU by the definition, one pair at a time."""
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_iou_matches_reference() -> None:
    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 0.6, (200, 2, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.0, 0.4, (200, 2, 2))], axis=2)
    a, b = boxes[:, 0], boxes[:, 1]
    fast = box_iou(a, b)
    slow = [_iou_reference(tuple(x), tuple(y)) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert box_iou(np.array(PRED), np.array(SHIFTED)) == pytest.approx(7 / 9)


class TestQuality:
    def test_parse_and_progress(self) -> None:
        tasks, anns = parse_snapshot(snapshot())
        assert [t.task_id for t in tasks] == list(range(1, 12))
        assert tasks[0].prediction == pytest.approx(PRED) and tasks[0].prediction_version == "m1"
        assert {a.rater for a in anns} == {"r1@x.org", "r2@x.org"}
        prog = progress(tasks, anns)
        assert prog["tasks"] == 11 and prog["annotations"] == 13
        assert prog["tasks_started"] == 9  # 1-9; 10 only skipped, 11 untouched
        assert prog["tasks_done"] == 9  # 1 and 2 need and have two raters
        assert prog["raters"]["r1@x.org"] == {
            "submitted": 9,
            "skipped": 0,
            "boxes": 7,
            "no_landmark": 2,
            "median_lead_time": 2.0,
        }
        assert prog["raters"]["r2@x.org"] == {
            "submitted": 3,
            "skipped": 1,
            "boxes": 2,
            "no_landmark": 1,
            "median_lead_time": 3.0,
        }

    def test_validation_report(self) -> None:
        tasks, anns = parse_snapshot(snapshot())
        issues = validate(anns)
        found = sorted((i.kind, i.task_id) for i in issues)
        assert found == [
            ("box_and_flag", 4),
            ("empty", 5),
            ("outside_image", 6),
            ("tiny_box", 7),
            ("two_boxes", 3),
        ]
        rep = validation_report(tasks, anns, issues)
        assert rep["counts"] == {
            "box_and_flag": 1,
            "empty": 1,
            "outside_image": 1,
            "tiny_box": 1,
            "two_boxes": 1,
        }
        assert rep["skipped"] == 1 and rep["annotations_with_issues"] == 5

    def test_decide_and_filter(self, tmp_path: Path) -> None:
        tasks, anns = parse_snapshot(snapshot())
        dec = decide(tasks, anns, validate(anns))
        status = {k: d.status for k, d in dec.items()}
        assert status == {
            "img1": "box",
            "img2": "box",
            "img3": "invalid",
            "img4": "invalid",
            "img5": "invalid",
            "img6": "box",
            "img7": "invalid",
            "img8": "no_landmark",
            "img9": "conflict",
            "img10": "skipped",
            "img11": "unannotated",
        }
        boxes_csv, removed_csv = filter_boxes(dec, tmp_path / "b.csv", tmp_path / "r.csv")
        boxes = read_boxes_csv(boxes_csv)
        assert sorted(boxes) == ["img1", "img2", "img6"]
        b1 = boxes["img1"][0]  # mean of the two raters' boxes
        np.testing.assert_allclose([b1.ymin, b1.xmin, b1.ymax, b1.xmax], [0.225, 0.2, 0.625, 0.6])
        b6 = boxes["img6"][0]  # clipped at the left border
        np.testing.assert_allclose([b6.ymin, b6.xmin, b6.ymax, b6.xmax], [0.1, 0.0, 0.5, 0.4])
        with open(removed_csv, newline="") as fh:
            rows = {r["id"]: (r["status"], r["reason"]) for r in csv.DictReader(fh)}
        assert set(rows) == {f"img{i}" for i in (3, 4, 5, 7, 8, 9, 10, 11)}  # nothing silent
        assert rows["img3"] == ("invalid", "r1@x.org: two_boxes")
        assert rows["img8"][0] == "no_landmark" and "r1@x.org" in rows["img8"][1]
        assert rows["img9"][0] == "conflict"

    def test_agreement(self) -> None:
        tasks, anns = parse_snapshot(snapshot())
        rep = agreement(tasks, anns, validate(anns))
        ov = rep["overlap"]
        assert (ov["pairs"], ov["both_box"], ov["both_flag"], ov["box_vs_flag"]) == (3, 2, 0, 1)
        assert ov["mean_iou"] == pytest.approx((7 / 9 + 1.0) / 2)
        assert ov["agree"] == 1.0
        assert rep["gold"] == {
            "r1@x.org": {"answered": 1, "correct": 1, "accuracy": 1.0, "mean_iou": 1.0},
            "r2@x.org": {
                "answered": 1,
                "correct": 1,
                "accuracy": 1.0,
                "mean_iou": pytest.approx(7 / 9),
            },
        }
        pre = rep["preannotation"]
        # r1: kept 1, 2; moved 6, 9; deleted 8.  r2: kept 2; moved 1; deleted 9.
        assert pre["per_rater"] == {
            "r1@x.org": {"kept": 2, "moved": 2, "deleted": 1},
            "r2@x.org": {"kept": 1, "moved": 1, "deleted": 1},
        }
        assert (pre["kept"], pre["moved"], pre["deleted"], pre["annotations"]) == (3, 3, 2, 8)

    def test_load_snapshot(self, tmp_path: Path) -> None:
        write_json(tmp_path / "s.json", snapshot())
        assert len(load_snapshot(tmp_path / "s.json")["tasks"]) == 11
        write_json(tmp_path / "bare.json", snapshot()["tasks"])
        _, anns = parse_snapshot(load_snapshot(tmp_path / "bare.json"))
        assert anns[0].rater == "user2"  # no users table in a bare export
        write_json(tmp_path / "bad.json", {"tasks": 3})
        with pytest.raises(ValueError, match=r"bad\.json"):
            load_snapshot(tmp_path / "bad.json")
        snap = snapshot()
        snap["tasks"][0]["predictions"] = [7]
        with pytest.raises(ValueError, match="only_id"):
            parse_snapshot(snap)


def test_every_annotation_accounted_for() -> None:
    """Each image lands in exactly one place: boxes CSV or removed with a status."""
    tasks, anns = parse_snapshot(snapshot())
    dec = decide(tasks, anns, validate(anns))
    assert sorted(dec) == sorted(t.image_id for t in tasks)
    kinds = {d.status for d in dec.values()}
    assert kinds <= {"box", "no_landmark", "conflict", "invalid", "skipped", "unannotated"}
    assert all(d.reason for d in dec.values())
    assert (
        list(itertools.chain.from_iterable([[d.box] for d in dec.values() if d.status != "box"]))
        == [None] * 8
    )


FAR = (0.6, 0.6, 0.9, 0.9)  # IoU 0 with PRED


def gold_snapshot() -> dict[str, Any]:
    """:func:`snapshot` where r2 fails one of two gold tasks (accuracy 0.5) and alone boxes img13.

    r2's boxes: img1 FAR (wrong on gold), img2 PRED, img12 SHIFTED (right on gold, IoU 7/9),
    img13 FAR (r2 only); r2 also flags img9 and skips img10.
    """
    snap = snapshot()
    snap["tasks"][0]["annotations"][1]["result"] = [_rect(*FAR)]
    snap["tasks"] += [
        _task(
            12,
            [(2, [_rect(*PRED)], False), (3, [_rect(*SHIFTED)], False)],
            gold={"box": "0.2 0.2 0.6 0.6", "no_landmark": False},
            overlap=True,
        ),
        _task(13, [(3, [_rect(*FAR)], False)]),
    ]
    return snap


class TestGoldFilter:
    def test_gold_accuracy(self) -> None:
        tasks, anns = parse_snapshot(gold_snapshot())
        gold = gold_accuracy(tasks, anns, validate(anns))
        assert gold == {
            "r1@x.org": {"answered": 2, "correct": 2, "accuracy": 1.0, "mean_iou": 1.0},
            "r2@x.org": {
                "answered": 2,
                "correct": 1,
                "accuracy": 0.5,
                "mean_iou": pytest.approx(7 / 18),
            },
        }
        assert agreement(tasks, anns, validate(anns))["gold"] == gold  # one source
        assert gold_weights(gold, min_accuracy=0.7) == {"r1@x.org": 1.0, "r2@x.org": 0.0}
        assert gold_weights(gold, min_accuracy=0.7, policy="weight") == {
            "r1@x.org": 1.0,
            "r2@x.org": pytest.approx(0.5 / 0.7),
        }
        assert gold_weights(gold, min_accuracy=0.5) == {"r1@x.org": 1.0, "r2@x.org": 1.0}
        assert gold_weights(gold, min_answered=3) == {}  # two answers each: not judged yet

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="gold policy"):
            gold_weights({}, policy="average")
        with pytest.raises(ValueError, match="min gold accuracy"):
            gold_weights({}, min_accuracy=1.5)
        with pytest.raises(ValueError, match="min gold answers"):
            gold_weights({}, min_answered=0)

    def test_drop(self, tmp_path: Path) -> None:
        tasks, anns = parse_snapshot(gold_snapshot())
        res = filter_campaign(tasks, anns, tmp_path / "s")
        boxes = {k: _edges(v[0]) for k, v in read_boxes_csv(res["boxes"]).items()}
        # r2 dropped: every box is r1's alone (img9: r2's flag no longer conflicts)
        assert boxes == {
            "img1": pytest.approx(PRED),
            "img2": pytest.approx(PRED),
            "img6": pytest.approx((0.1, 0.0, 0.5, 0.4)),
            "img9": pytest.approx((0.0, 0.0, 0.3, 0.3)),
            "img12": pytest.approx(PRED),
        }
        g = res["gold_filter"]
        assert g["raters_dropped"] == [
            {"rater": "r2@x.org", "accuracy": 0.5, "answered": 2, "weight": 0.0}
        ]
        assert (g["raters_judged"], g["boxes_dropped"], g["images_affected"]) == (2, 4, 5)
        assert (g["raters_downweighted"], g["boxes_downweighted"]) == ([], 0)
        with open(res["removed"], newline="") as fh:
            rows = {r["id"]: (r["status"], r["reason"]) for r in csv.DictReader(fh)}
        assert rows["img13"] == ("gold_failed", "only raters below the gold threshold: r2@x.org")
        summary = json.loads(Path(res["summary"]).read_text())
        assert summary["statuses"]["gold_failed"] == 1 and summary["images"] == 13
        assert summary["gold_filter"] == g

        kept = filter_campaign(tasks, anns, tmp_path / "all", min_gold_accuracy=0.5)
        assert kept["gold_filter"]["raters_dropped"] == []
        assert kept["statuses"]["conflict"] == 2  # img1 (PRED vs FAR) and img9 come back
        early = filter_campaign(tasks, anns, tmp_path / "early", min_gold_answers=3)
        assert early["gold_filter"]["raters_judged"] == 0 and early["statuses"] == kept["statuses"]

    def test_weight(self, tmp_path: Path) -> None:
        tasks, anns = parse_snapshot(gold_snapshot())
        res = filter_campaign(tasks, anns, tmp_path / "w", gold_policy="weight")
        boxes = {k: _edges(v[0]) for k, v in read_boxes_csv(res["boxes"]).items()}
        w = 0.5 / 0.7
        expect12 = (np.array(PRED) + w * np.array(SHIFTED)) / (1 + w)
        np.testing.assert_allclose(boxes["img12"], expect12, atol=1e-12)
        np.testing.assert_allclose(boxes["img13"], FAR, atol=1e-12)  # alone, still counted
        assert "img1" not in boxes  # PRED vs FAR: a conflict again
        g = res["gold_filter"]
        assert g["raters_dropped"] == [] and g["boxes_dropped"] == 0
        assert [r["rater"] for r in g["raters_downweighted"]] == ["r2@x.org"]
        assert g["raters_downweighted"][0]["weight"] == pytest.approx(w)
        assert (g["boxes_downweighted"], g["images_affected"]) == (4, 5)

    def test_cli(self, tmp_path: Path) -> None:
        from gldboxes.cli.main import main as cli_main

        write_json(tmp_path / "snap.json", gold_snapshot())
        args = ["annotate", "filter", "--snapshot", str(tmp_path / "snap.json")]
        assert cli_main([*args, "--out", str(tmp_path / "o")]) == 0
        boxes = read_boxes_csv(tmp_path / "o" / "snap-boxes.csv")
        assert _edges(boxes["img1"][0]) == pytest.approx(PRED)
        assert cli_main([*args, "--out", str(tmp_path), "--min-gold-accuracy", "1.5"]) == 2


def _edges(b: Any) -> tuple[float, float, float, float]:
    return (b.ymin, b.xmin, b.ymax, b.xmax)


def test_progress_rates() -> None:
    first = {
        "tasks": 10,
        "tasks_done": 2,
        "raters": {"a": {"boxes": 1, "submitted": 2}},
    }
    cur = {
        "tasks": 10,
        "tasks_done": 6,
        "raters": {"a": {"boxes": 4, "submitted": 5}, "b": {"boxes": 2, "submitted": 2}},
    }
    r = progress_rates(first, cur, 1800.0)  # half an hour
    assert r["tasks_per_hour"] == 8.0 and r["eta_s"] == pytest.approx(4 / 8 * 3600)
    assert r["raters"] == {
        "a": {"boxes": 4, "submitted": 5, "boxes_per_hour": 6.0, "submitted_per_hour": 6.0},
        "b": {"boxes": 2, "submitted": 2, "boxes_per_hour": 4.0, "submitted_per_hour": 4.0},
    }
    still = progress_rates(first, first, 0.0)  # the first line of a watch
    assert still["eta_s"] is None and still["raters"]["a"]["boxes_per_hour"] == 0.0
    done = progress_rates(first, {**cur, "tasks_done": 10}, 60.0)
    assert done["eta_s"] == 0.0
    with pytest.raises(ValueError, match="negative"):
        progress_rates(first, cur, -1.0)
