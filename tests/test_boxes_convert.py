"""COCO instances files, Label Studio exports and ``gldboxes boxes convert``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gldboxes.box_formats import (
    COCO_CATEGORY,
    coco_instances,
    label_studio_image_id,
    read_coco_json,
    read_label_studio_json,
    write_coco_json,
)
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.synth import confs
from gldboxes.synth import main as synth_main

TOL = 1e-6
LS_FIXTURES = Path("format_fixtures") / "label_studio"
COCO_RESULTS = (
    Path("format_fixtures") / "coco_results_cocoapi" / "instances_val2014_fakebbox100_results.json"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic world (~2 s): 47 training boxes over 320x240 JPEGs."""
    return synth_main(confs["tiny"], tmp_path_factory.mktemp("world") / "w")


def assert_same_boxes(got: dict[str, list[Box]], want: dict[str, list[Box]]) -> None:
    assert sorted(got) == sorted(want)
    for key, boxes in want.items():
        assert len(got[key]) == len(boxes), key
        for g, w in zip(got[key], boxes, strict=True):
            assert max(abs(u - v) for u, v in zip(g.to_tf_od(), w.to_tf_od(), strict=True)) <= TOL
            assert (g.score is None) == (w.score is None)
            if w.score is not None:
                assert g.score == pytest.approx(w.score, abs=TOL)


def convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gldboxes", "boxes", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one log line of an expected error (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def ls_task(task_id: int, data: dict[str, Any], *annotations: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "data": data, "annotations": list(annotations), "predictions": []}


def ls_rect(x: float, y: float, w: float, h: float, **extra: Any) -> dict[str, Any]:
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["l"]}
    return {
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": 400,
        "original_height": 300,
        "value": value,
        **extra,
    }


class TestCocoFile:
    def test_round_trip_world(self, world: Path, tmp_path: Path) -> None:
        gt = read_boxes_csv(world / "train" / "boxes.csv")
        assert len(gt) > 40
        out = write_coco_json(tmp_path / "b.json", gt, images=world / "train" / "images")
        data = json.loads(out.read_text())
        assert data["categories"] == [COCO_CATEGORY]
        assert len(data["images"]) == len(gt)
        assert len({img["id"] for img in data["images"]}) == len(gt)
        by_id = {img["id"]: img for img in data["images"]}
        for img in data["images"]:
            with Image.open(world / "train" / "images" / img["file_name"]) as im:
                assert (img["width"], img["height"]) == im.size == (320, 240)
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            img = by_id[ann["image_id"]]
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1 and "score" not in ann
            assert ann["area"] == pytest.approx(w * h)
            assert 0 <= x and x + w <= img["width"] + 1e-9 and y + h <= img["height"] + 1e-9
            ref = gt[Path(img["file_name"]).stem][0].to_coco(img["width"], img["height"])
            assert ann["bbox"] == pytest.approx(ref, abs=1e-9)
        assert_same_boxes(read_coco_json(out), gt)

    def test_scores_size_map_and_empty_image(self, tmp_path: Path) -> None:
        dets = {
            "b": [Box(0.1, 0.2, 0.5, 0.9, 0.75), Box(0.0, 0.0, 1.0, 1.0, 0.125)],
            "a": [],
        }
        data = coco_instances(dets, sizes={"a": (640, 480), "b": (100, 50)})
        assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
            ("a.jpg", 640, 480),
            ("b.jpg", 100, 50),
        ]
        assert data["annotations"][0]["bbox"] == pytest.approx([20.0, 5.0, 70.0, 20.0])
        assert [a["score"] for a in data["annotations"]] == [0.75, 0.125]
        out = write_coco_json(tmp_path / "d.json", dets, sizes={"a": (640, 480), "b": (100, 50)})
        assert_same_boxes(read_coco_json(out), dets)

    def test_pycocotools_reads_and_scores_it(self, world: Path, tmp_path: Path) -> None:
        coco_mod = pytest.importorskip("pycocotools.coco")
        cocoeval = pytest.importorskip("pycocotools.cocoeval")
        gt = read_boxes_csv(world / "train" / "boxes.csv")
        images = world / "train" / "images"
        gt_file = write_coco_json(tmp_path / "gt.json", gt, images=images)
        dets = {k: [Box(*b.to_tf_od(), score=0.9) for b in v] for k, v in gt.items()}
        det_file = write_coco_json(tmp_path / "det.json", dets, images=images)
        coco_gt = coco_mod.COCO(str(gt_file))
        assert len(coco_gt.getAnnIds()) == len(gt) and coco_gt.loadCats(1)[0]["name"] == "landmark"
        coco_dt = coco_gt.loadRes(json.loads(det_file.read_text())["annotations"])
        ev = cocoeval.COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # detections equal to the ground truth

    def test_real_results_fixture(self, shared_data: Path, tmp_path: Path) -> None:
        real = json.loads((shared_data / COCO_RESULTS).read_text())
        ours = coco_instances({"x": [Box(0.1, 0.2, 0.3, 0.4, 0.5)]}, sizes={"x": (640, 480)})
        ann = ours["annotations"][0]
        for entry in real[:50]:
            assert set(entry) <= set(ann)
            for key in entry:
                assert type(ann[key]) is type(entry[key]) or {type(ann[key]), type(entry[key])} <= {
                    int,
                    float,
                }
            assert len(entry["bbox"]) == len(ann["bbox"]) == 4
        with pytest.raises(ValueError, match="detection results list has no image sizes"):
            read_coco_json(shared_data / COCO_RESULTS)

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="no image size for 1 of 1 image ids"):
            coco_instances({"a": [Box(0.1, 0.1, 0.2, 0.2)]})
        (tmp_path / "imgs").mkdir()
        with pytest.raises(ValueError, match=r"under .*imgs; first is 'a'"):
            coco_instances({"a": []}, images=tmp_path / "imgs")
        (tmp_path / "imgs" / "a.jpg").write_bytes(b"not a jpeg")
        with pytest.raises(ValueError, match=r"a\.jpg: not a readable image"):
            coco_instances({"a": []}, images=tmp_path / "imgs")
        good = coco_instances({"a": [Box(0.1, 0.1, 0.2, 0.2)]}, sizes={"a": (10, 10)})
        cases = {
            "not-json": "not valid JSON",
            json.dumps({"images": []}): "not a COCO instances file",
            json.dumps({**good, "annotations": [{**good["annotations"][0], "image_id": 9}]}): (
                r"annotations\[0\]: image_id 9 is not in 'images'"
            ),
            json.dumps(
                {**good, "annotations": [{**good["annotations"][0], "bbox": [1, 1, 0, 2]}]}
            ): ("non-positive width or height"),
            json.dumps({**good, "images": [{**good["images"][0], "width": "10"}]}): (
                r"images\[0\]: 'width' must be a number"
            ),
            json.dumps({**good, "images": [{**good["images"][0], "file_name": ""}]}): (
                r"images\[0\]: empty image id"
            ),
            json.dumps({**good, "images": [{**good["images"][0], "file_name": 7}]}): (
                r"images\[0\]: 'file_name' must be a string"
            ),
            json.dumps({**good, "images": good["images"] * 2}): (
                r"images\[1\]: image id 1 is repeated"
            ),
        }
        for i, (text, message) in enumerate(cases.items()):
            path = tmp_path / f"bad{i}.json"
            path.write_text(text)
            with pytest.raises(ValueError, match=message) as info:
                read_coco_json(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value)


class TestLabelStudio:
    def test_smoke(self, tmp_path: Path) -> None:
        tasks = [
            ls_task(
                1,
                {"image": "/data/local-files/?d=photos/abc123.jpg", "gld_id": "id1"},
                {"result": [ls_rect(10, 20, 30, 40, score=0.5)]},
                {"was_cancelled": True, "result": [ls_rect(0, 0, 50, 50)]},
            ),
            ls_task(
                2,
                {"image": "/data/local-files/?d=photos%2Fdef456.png"},
                {
                    "result": [
                        {"type": "choices", "value": {"choices": ["x"]}},
                        ls_rect(0, 0, 100, 100),
                    ]
                },
            ),
            ls_task(3, {"image": "https://host/upload/3/ghi.jpg?x=1"}),
        ]
        path = tmp_path / "export.json"
        path.write_text(json.dumps(tasks))
        got = read_label_studio_json(path)
        assert_same_boxes(
            got,
            {"id1": [Box(0.2, 0.1, 0.6, 0.4, 0.5)], "def456": [Box(0.0, 0.0, 1.0, 1.0)], "ghi": []},
        )
        # our snapshot envelope reads the same
        (tmp_path / "snap.json").write_text(json.dumps({"format_version": 1, "tasks": tasks}))
        assert_same_boxes(read_label_studio_json(tmp_path / "snap.json"), got)

    def test_image_id(self) -> None:
        assert label_studio_image_id({"image": "/data/upload/29/example.png"}) == "example"
        with pytest.raises(ValueError, match="neither 'gld_id' nor an 'image' URL"):
            label_studio_image_id({"text": "x"})
        with pytest.raises(ValueError, match="not a safe file name"):
            label_studio_image_id({"gld_id": "../x"})

    def test_real_case(self, shared_data: Path, tmp_path: Path) -> None:
        """Real Label Studio exports (its own test data): axis-aligned and rotated rectangles."""
        src = shared_data / LS_FIXTURES / "test_export_yolo__data.json"
        proc = convert(
            "--from", "label_studio", "--to", "gld", "--in", src, "--out", tmp_path / "a.csv"
        )
        assert proc.returncode == 0, proc.stderr
        got = read_boxes_csv(tmp_path / "a.csv")
        want: dict[str, list[Box]] = {}
        for task in json.loads(src.read_text()):
            key = task["data"]["image"].strip("/")
            for ann in task["annotations"]:
                for res in ann["result"]:
                    v = res["value"]
                    want.setdefault(key, []).append(
                        Box(
                            v["y"] / 100,
                            v["x"] / 100,
                            (v["y"] + v["height"]) / 100,
                            (v["x"] + v["width"]) / 100,
                        )
                    )
        assert sum(map(len, want.values())) == 6
        assert_same_boxes(got, want)

        obb = shared_data / LS_FIXTURES / "test_export_yolo__data_obb.json"
        rotated = read_label_studio_json(obb)
        assert {k: len(v) for k, v in rotated.items()} == {"image1": 23, "image2": 1, "image3": 1}
        first = json.loads(obb.read_text())[0]["annotations"][0]["result"][0]["value"]
        box = rotated["image1"][0]  # encloses the rectangle rotated about its top-left corner
        x0, y0 = first["x"] / 100, first["y"] / 100
        assert box.xmin - TOL <= x0 <= box.xmax + TOL and box.ymin - TOL <= y0 <= box.ymax + TOL
        assert box.area > first["width"] * first["height"] / 1e4

        # an annotator dragged a box past the border: a one-line error, or clipped with --clip
        csv_export = shared_data / LS_FIXTURES / "test_export_csv__csv_test.json"
        line = error_line(
            convert(
                "--from",
                "label_studio",
                "--to",
                "gld",
                "--in",
                csv_export,
                "--out",
                tmp_path / "c.csv",
            )
        )
        assert str(csv_export) in line and "not inside [0, 1]" in line
        ok = convert(
            "--from",
            "label_studio",
            "--to",
            "gld",
            "--in",
            csv_export,
            "--out",
            tmp_path / "c.csv",
            "--clip",
        )
        assert ok.returncode == 0, ok.stderr
        assert all(
            0 <= v <= 1
            for bs in read_boxes_csv(tmp_path / "c.csv").values()
            for b in bs
            for v in b.to_tf_od()
        )

    def test_exception(self, tmp_path: Path) -> None:
        cases = {
            json.dumps({"no": "tasks"}): "not a Label Studio JSON export",
            json.dumps([{"id": 4}]): "task 4: expected an object with a 'data' object",
            json.dumps([ls_task(5, {"image": "a.jpg"}, {"result": [ls_rect(10, 10, -1, 5)]})]): (
                "task 5: .*non-positive width or height"
            ),
        }
        for i, (text, message) in enumerate(cases.items()):
            path = tmp_path / f"bad{i}.json"
            path.write_text(text)
            with pytest.raises(ValueError, match=message) as info:
                read_label_studio_json(path)
            assert str(path) in str(info.value)


class TestConvertCommand:
    def test_gld_coco_gld(self, world: Path, tmp_path: Path) -> None:
        boxes_csv = world / "train" / "boxes.csv"
        images = world / "train" / "images"
        proc = convert(
            "--from",
            "gld",
            "--to",
            "coco",
            "--in",
            boxes_csv,
            "--images",
            images,
            "--out",
            tmp_path / "b.json",
        )
        assert proc.returncode == 0, proc.stderr
        assert "47 boxes of 47 images (gld -> coco)" in proc.stdout
        proc = convert(
            "--from",
            "coco",
            "--to",
            "gld",
            "--in",
            tmp_path / "b.json",
            "--out",
            tmp_path / "b.csv",
        )
        assert proc.returncode == 0, proc.stderr
        assert_same_boxes(read_boxes_csv(tmp_path / "b.csv"), read_boxes_csv(boxes_csv))

    def test_detections_keep_scores(self, tmp_path: Path) -> None:
        (tmp_path / "imgs" / "sub").mkdir(parents=True)
        Image.new("RGB", (64, 48)).save(tmp_path / "imgs" / "sub" / "q1.jpg")
        dets = {"q1": [Box(0.25, 0.5, 0.75, 1.0, 0.9), Box(0.0, 0.0, 0.5, 0.5, 0.1)]}
        write_boxes_csv(tmp_path / "d.csv", dets)
        proc = convert(
            "--from",
            "gld",
            "--to",
            "coco",
            "--in",
            tmp_path / "d.csv",
            "--images",
            tmp_path / "imgs",
            "--out",
            tmp_path / "d.json",
        )
        assert proc.returncode == 0, proc.stderr
        data = json.loads((tmp_path / "d.json").read_text())
        assert data["images"] == [{"id": 1, "file_name": "sub/q1.jpg", "width": 64, "height": 48}]
        assert data["annotations"][0]["bbox"] == pytest.approx([32.0, 12.0, 32.0, 24.0])
        assert (
            convert(
                "--from",
                "coco",
                "--to",
                "gld",
                "--in",
                tmp_path / "d.json",
                "--out",
                tmp_path / "e.csv",
            ).returncode
            == 0
        )
        assert_same_boxes(read_boxes_csv(tmp_path / "e.csv"), dets)

    def test_exception(self, tmp_path: Path) -> None:
        csv_path = tmp_path / "b.csv"
        write_boxes_csv(csv_path, {"a": [Box(0.1, 0.1, 0.2, 0.2)]})
        out = tmp_path / "o.json"
        line = error_line(convert("--from", "gld", "--to", "coco", "--in", csv_path, "--out", out))
        assert "--to coco needs --images" in line
        line = error_line(
            convert(
                "--from",
                "gld",
                "--to",
                "coco",
                "--in",
                csv_path,
                "--images",
                tmp_path / "none",
                "--out",
                out,
            )
        )
        assert "images folder not found" in line and "none" in line
        (tmp_path / "imgs").mkdir()
        line = error_line(
            convert(
                "--from",
                "gld",
                "--to",
                "coco",
                "--in",
                csv_path,
                "--images",
                tmp_path / "imgs",
                "--out",
                out,
            )
        )
        assert "no image size for 1 of 1 image ids" in line
        line = error_line(
            convert(
                "--from", "coco", "--to", "gld", "--in", tmp_path / "missing.json", "--out", out
            )
        )
        assert "missing.json" in line
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2")
        line = error_line(convert("--from", "coco", "--to", "gld", "--in", bad, "--out", out))
        assert str(bad) in line and "not valid JSON" in line
        bad_csv = tmp_path / "bad.csv"
        bad_csv.write_text("id,box\na,0.5 0.5 0.1 0.1\n")
        line = error_line(
            convert(
                "--from", "gld", "--to", "coco", "--in", bad_csv, "--images", tmp_path, "--out", out
            )
        )
        assert f"{bad_csv}:2" in line
        proc = convert("--from", "fiftyone", "--to", "gld", "--in", csv_path, "--out", out)
        assert proc.returncode == 2 and "invalid choice" in proc.stderr
        assert not out.exists()
