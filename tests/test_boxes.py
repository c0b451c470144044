"""Box model, box-format conversions (property tests), boxes CSV files and official readers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gldboxes.boxes import (
    BOX_FORMATS,
    Box,
    array_to_boxes,
    boxes_from_label_studio_results,
    boxes_to_array,
    convert_boxes,
    read_boxes_csv,
    read_gld_boxes_csv,
    read_official_boxes,
    validate_boxes,
    write_boxes_csv,
)

TOL = 1e-6
MIN_EXTENT = 1e-4  # boxes at least 1/10000 of the image on each side

# Per-test settings (a global profile would leak into other modules' hypothesis tests).
prop = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_boxes(draw: st.DrawFn) -> Box:
    ymin = draw(st.floats(0.0, 1.0 - MIN_EXTENT))
    xmin = draw(st.floats(0.0, 1.0 - MIN_EXTENT))
    ymax = draw(st.floats(ymin + MIN_EXTENT, 1.0))
    xmax = draw(st.floats(xmin + MIN_EXTENT, 1.0))
    return Box(ymin, xmin, ymax, xmax)


sizes = st.integers(1, 20000)


@st.composite
def invalid_edges(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """(ymin, xmin, ymax, xmax) that is outside [0, 1], unordered, degenerate or not finite."""
    good = draw(valid_boxes())
    edges = [good.ymin, good.xmin, good.ymax, good.xmax]
    kind = draw(st.sampled_from(["outside", "swap", "degenerate", "nonfinite"]))
    i = draw(st.integers(0, 3))
    if kind == "outside":
        edges[i] = draw(st.one_of(st.floats(-1e3, -1e-6), st.floats(1 + 1e-6, 1e3)))
    elif kind == "swap":
        if i % 2 == 0:
            edges[0], edges[2] = edges[2], edges[0]
        else:
            edges[1], edges[3] = edges[3], edges[1]
    elif kind == "degenerate":
        if i % 2 == 0:
            edges[2] = edges[0]
        else:
            edges[3] = edges[1]
    else:
        edges[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return edges[0], edges[1], edges[2], edges[3]


def close(a: Box, b: Box, tol: float = TOL) -> bool:
    return all(abs(u - v) <= tol for u, v in zip(a.to_tf_od(), b.to_tf_od(), strict=True))


class TestRoundTrips:
    @prop
    @given(valid_boxes())
    def test_string_and_tf_od(self, box: Box) -> None:
        assert Box.from_string(box.to_string()) == box  # repr keeps every bit
        assert Box.from_tf_od(box.to_tf_od()) == box

    @prop
    @given(valid_boxes())
    def test_fiftyone(self, box: Box) -> None:
        rel = box.to_fiftyone()
        assert rel[2] > 0 and rel[3] > 0
        assert close(Box.from_fiftyone(rel), box)

    @prop
    @given(valid_boxes(), sizes, sizes)
    def test_coco(self, box: Box, width: int, height: int) -> None:
        x, y, w, h = box.to_coco(width, height)
        assert 0 <= x <= width and 0 <= y <= height
        assert x + w <= width * (1 + 1e-12) and y + h <= height * (1 + 1e-12)
        assert close(Box.from_coco([x, y, w, h], width, height), box)

    @prop
    @given(valid_boxes(), sizes, sizes)
    def test_label_studio(self, box: Box, width: int, height: int) -> None:
        value = box.to_label_studio(width, height)
        assert value["rotation"] == 0.0
        assert value["original_width"] == width
        assert close(Box.from_label_studio(value), box)
        # a full turn is no rotation: same box, with or without the image size
        turned = {**value, "rotation": 360.0}
        assert close(Box.from_label_studio(turned), box)

    @prop
    @given(valid_boxes(), sizes, sizes, st.sampled_from(BOX_FORMATS), st.sampled_from(BOX_FORMATS))
    def test_array_matches_scalar(
        self, box: Box, width: int, height: int, src: str, dst: str
    ) -> None:
        scalar = {
            "gld": list(box.to_tf_od()),
            "tf_od": list(box.to_tf_od()),
            "fiftyone": box.to_fiftyone(),
            "coco": box.to_coco(width, height),
            "label_studio": [box.to_label_studio()[k] for k in ("x", "y", "width", "height")],
        }
        got = convert_boxes(np.array([scalar[src]]), src, dst, width=width, height=height)
        scale = max(width, height) if dst == "coco" else (100 if dst == "label_studio" else 1)
        np.testing.assert_allclose(got[0], scalar[dst], rtol=0, atol=TOL * scale)
        back = convert_boxes(got, dst, "gld", width=width, height=height)
        np.testing.assert_allclose(back[0], box.to_tf_od(), rtol=0, atol=TOL)

    def test_array_many_boxes_per_image_sizes(self) -> None:
        rng = np.random.default_rng(0)
        y0, x0 = rng.uniform(0, 0.5, (2, 1000))
        g = np.stack(
            [y0, x0, y0 + rng.uniform(0.01, 0.5, 1000), x0 + rng.uniform(0.01, 0.5, 1000)], axis=1
        )
        w, h = rng.integers(10, 5000, (2, 1000))
        coco = convert_boxes(g, "gld", "coco", width=w, height=h)
        ref = np.array([Box(*r).to_coco(int(a), int(b)) for r, a, b in zip(g, w, h, strict=True)])
        np.testing.assert_allclose(coco, ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(
            convert_boxes(coco, "coco", "gld", width=w, height=h), g, rtol=0, atol=1e-12
        )
        assert array_to_boxes(g)[7] == Box(*g[7])
        np.testing.assert_array_equal(boxes_to_array(array_to_boxes(g)), g)


class TestRejection:
    @prop
    @given(invalid_edges())
    def test_every_format_rejects(self, edges: tuple[float, float, float, float]) -> None:
        y0, x0, y1, x1 = edges
        with pytest.raises(ValueError):
            Box(y0, x0, y1, x1)
        with pytest.raises(ValueError):
            Box.from_tf_od(edges)
        with pytest.raises(ValueError):
            Box.from_fiftyone([x0, y0, x1 - x0, y1 - y0])
        with pytest.raises(ValueError):
            Box.from_coco([x0 * 640, y0 * 480, (x1 - x0) * 640, (y1 - y0) * 480], 640, 480)
        with pytest.raises(ValueError):
            Box.from_label_studio(
                {
                    "x": x0 * 100,
                    "y": y0 * 100,
                    "width": (x1 - x0) * 100,
                    "height": (y1 - y0) * 100,
                    "rotation": 0,
                }
            )
        with pytest.raises(ValueError):
            validate_boxes(np.array([[0.1, 0.1, 0.5, 0.5], edges]))
        with pytest.raises(ValueError):
            convert_boxes(np.array([edges]), "gld", "fiftyone")

    def test_messages_name_the_problem(self) -> None:
        with pytest.raises(ValueError, match="not inside"):
            Box.from_coco([600, 10, 100, 10], 640, 480)
        with pytest.raises(ValueError, match="non-positive width or height"):
            Box.from_fiftyone([0.1, 0.1, 0.0, 0.2])
        with pytest.raises(ValueError, match="positive image size"):
            Box.from_coco([1, 1, 2, 2], 0, 480)
        with pytest.raises(ValueError, match="4 numbers"):
            Box.from_tf_od([0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="row 1"):
            validate_boxes(np.array([[0.1, 0.1, 0.5, 0.5], [0.5, 0.1, 0.4, 0.5]]))
        with pytest.raises(ValueError, match="unknown box format"):
            convert_boxes(np.zeros((1, 4)), "yolo", "gld")
        with pytest.raises(ValueError, match="width and height"):
            convert_boxes(np.array([[0.1, 0.1, 0.5, 0.5]]), "gld", "coco")
        with pytest.raises(ValueError, match="lacks 'height'"):
            Box.from_label_studio({"x": 1, "y": 1, "width": 3})

    def test_clip_and_float_noise(self) -> None:
        # COCO boxes touching the border: x + w == width exactly, division noise is snapped
        b = Box.from_coco([0.1 * 3, 0.7 * 7, 3 - 0.1 * 3, 7 - 0.7 * 7], 3, 7)
        assert b.xmax == 1.0 and b.ymax == 1.0
        with pytest.raises(ValueError, match="not inside"):
            Box.from_coco([-5, 0, 50, 50], 100, 100)
        assert Box.from_coco([-5, 0, 50, 50], 100, 100, clip=True) == Box(0.0, 0.0, 0.5, 0.45)


class TestLabelStudioRotation:
    def test_quarter_and_half_turns(self) -> None:
        # 200x100 image; top-left (100, 20) px, 20x20 px; rotated about the top-left corner
        value = {"x": 50.0, "y": 20.0, "width": 10.0, "height": 20.0}
        b90 = Box.from_label_studio({**value, "rotation": 90}, 200, 100)
        assert close(b90, Box(0.2, 0.4, 0.4, 0.5), 1e-12)
        b180 = Box.from_label_studio({**value, "rotation": 180}, 200, 100)
        assert close(b180, Box(0.0, 0.4, 0.2, 0.5), 1e-12)
        b45 = Box.from_label_studio({**value, "rotation": 45}, 200, 100)
        r = 20 / math.sqrt(2)
        assert close(b45, Box(0.2, (100 - r) / 200, (20 + 2 * r) / 100, (100 + r) / 200), 1e-12)

    def test_rotation_needs_size_and_clips(self) -> None:
        with pytest.raises(ValueError, match="original_width"):
            Box.from_label_studio({"x": 50, "y": 20, "width": 10, "height": 20, "rotation": 30})
        # rotated past the top edge: enclosing box clipped to the image
        b = Box.from_label_studio(
            {"x": 50, "y": 1, "width": 10, "height": 20, "rotation": 270}, 200, 100
        )
        assert b.ymin == 0.0 and b.xmin == pytest.approx(0.5) and b.xmax == pytest.approx(0.6)

    @prop
    @given(valid_boxes(), sizes, sizes, st.floats(-720, 720))
    def test_enclosing_box_contains_corners(
        self, box: Box, width: int, height: int, rotation: float
    ) -> None:
        value = {**box.to_label_studio(), "rotation": rotation}
        try:
            out = Box.from_label_studio(value, width, height)
        except ValueError:
            # rotated entirely out of the image: nothing left after clipping
            return
        theta = math.radians(rotation)
        px, py = box.xmin * width, box.ymin * height
        pw, ph = (box.xmax - box.xmin) * width, (box.ymax - box.ymin) * height
        for cx, cy in ((0, 0), (pw, 0), (pw, ph), (0, ph)):
            x = (px + cx * math.cos(theta) - cy * math.sin(theta)) / width
            y = (py + cx * math.sin(theta) + cy * math.cos(theta)) / height
            assert out.xmin - 1e-9 <= min(max(x, 0), 1) <= out.xmax + 1e-9
            assert out.ymin - 1e-9 <= min(max(y, 0), 1) <= out.ymax + 1e-9


class TestLabelStudioRealExports:
    def _results(self, path: Path) -> list[list[dict]]:
        tasks = json.loads(path.read_text())
        return [a["result"] for t in tasks for a in t["annotations"]]

    def test_axis_aligned_export(self, shared_data: Path) -> None:
        path = shared_data / "format_fixtures/label_studio/test_export_yolo__data.json"
        for results in self._results(path):
            boxes = boxes_from_label_studio_results(results)
            rects = [r for r in results if r["type"] == "rectanglelabels"]
            assert len(boxes) == len(rects) > 0
            for b, r in zip(boxes, rects, strict=True):
                v = r["value"]
                assert b.xmin == pytest.approx(v["x"] / 100, abs=1e-12)
                assert b.ymax == pytest.approx((v["y"] + v["height"]) / 100, abs=1e-12)
                back = b.to_label_studio(r["original_width"], r["original_height"])
                for k in ("x", "y", "width", "height"):
                    assert back[k] == pytest.approx(v[k], abs=1e-9)

    def test_box_past_the_border(self, shared_data: Path) -> None:
        path = shared_data / "format_fixtures/label_studio/test_export_csv__csv_test.json"
        first, second = self._results(path)
        (b,) = boxes_from_label_studio_results(first)
        assert close(
            b,
            Box(0.11690682128240109, 0.04857412088705009, 0.8345068212824011, 0.9736741208870501),
            1e-12,
        )
        # y 57.39% + height 44.18% = 101.57%: a real export that leaves the image
        with pytest.raises(ValueError, match="not inside"):
            boxes_from_label_studio_results(second)
        clipped = boxes_from_label_studio_results(second, clip=True)
        assert len(clipped) == 2 and clipped[0].ymax == 1.0
        assert clipped[0].ymin == pytest.approx(0.5739)

    def test_rotated_export_matches_label_studio_converter(self, shared_data: Path) -> None:
        import label_studio_sdk.converter.utils as utils  # the `annotation` extra

        path = shared_data / "format_fixtures/label_studio/test_export_yolo__data_obb.json"
        n = 0
        for results in self._results(path):
            boxes = boxes_from_label_studio_results(results)
            for b, r in zip(boxes, results, strict=True):
                label = {
                    **r["value"],
                    "original_width": r["original_width"],
                    "original_height": r["original_height"],
                }
                corners = np.array(utils.convert_annotation_to_yolo_obb(label))  # (4, 2) x, y
                lo = np.clip(corners.min(axis=0), 0, 1)
                hi = np.clip(corners.max(axis=0), 0, 1)
                assert close(b, Box(lo[1], lo[0], hi[1], hi[0]), 1e-9)
                n += 1
        assert n == 25


class TestCsvFiles:
    def test_boxes_csv_round_trip(self, tmp_path: Path) -> None:
        boxes = {
            "b": [Box(0.1, 0.2, 0.3, 0.4, 0.9), Box(0.5, 0.5, 0.6, 0.7, 0.1)],
            "a": [Box(0.0, 0.0, 1.0, 1.0, 0.5)],
        }
        path = write_boxes_csv(tmp_path / "det.csv", boxes)
        assert path.read_text().splitlines()[0] == "id,box,score"
        assert read_boxes_csv(path) == boxes

    def test_official_layout(self, tmp_path: Path) -> None:
        (tmp_path / "boxes_split1.csv").write_text(
            "id,box\n"
            "6e158a47eb2ca3f6,0.20 0.15 0.90 0.80\n"
            "202cd79556f30760,0.0 0.0 1.0 1.0\n"
            "202cd79556f30760,0.1 0.1 0.2 0.2\n"  # repeated id: boxes accumulate
            "3ad87684c99c06e1,0.1 0.1 0.5 0.5 0.6 0.6 0.9 0.9\n"  # two boxes in one field
        )
        (tmp_path / "boxes_split2.csv").write_text("id,box\nffff000011112222,0.5 0.25 0.75 1\n")
        got = read_official_boxes(tmp_path)
        assert set(got) == {"train", "val"}
        tr = got["train"]
        assert tr["6e158a47eb2ca3f6"] == [Box(0.20, 0.15, 0.90, 0.80)]
        assert len(tr["202cd79556f30760"]) == 2 and len(tr["3ad87684c99c06e1"]) == 2
        assert tr["3ad87684c99c06e1"][1] == Box(0.6, 0.6, 0.9, 0.9)
        assert got["val"]["ffff000011112222"][0].xmax == 1.0

    @pytest.mark.parametrize(
        ("row", "message"),
        [
            ("a,0.1 0.2 0.3", "4 numbers per box"),
            ("a,0.1 0.2 0.3 x", "non-number"),
            ("a,0.5 0.2 0.3 0.4", "degenerate or unordered"),
            ("a,0.1 0.2 0.3 1.5", "not inside"),
        ],
    )
    def test_official_errors_name_file_and_line(
        self, tmp_path: Path, row: str, message: str
    ) -> None:
        path = tmp_path / "boxes_split1.csv"
        path.write_text(f"id,box\nok,0.1 0.1 0.2 0.2\n{row}\n")
        with pytest.raises(ValueError, match=rf"boxes_split1\.csv:3: .*{message}"):
            read_gld_boxes_csv(path)

    def test_official_missing(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"boxes_split1\.csv"):
            read_official_boxes(tmp_path)
        (tmp_path / "boxes_split1.csv").write_text("image,bbox\n")
        with pytest.raises(ValueError, match="expected header 'id,box'"):
            read_gld_boxes_csv(tmp_path / "boxes_split1.csv")


class TestBoxesCsvValidation:
    """``read_boxes_csv`` rejects bad rows as ``FILE:LINE: what is wrong``."""

    @pytest.mark.parametrize(
        ("row", "message"),
        [
            (",0.1 0.1 0.2 0.2", "empty image id"),
            ("   ,0.1 0.1 0.2 0.2", "empty image id"),
            ("../../etc/passwd,0.1 0.1 0.2 0.2", "not a safe file name"),
            ("a\\b,0.1 0.1 0.2 0.2", "not a safe file name"),
            ("a\x01b,0.1 0.1 0.2 0.2", "non-printable"),
            ("only-an-id", "shorter row"),
            ("a,0.1 0.1 0.2", "4 numbers"),
            ("a,0.1 0.1 0.2 0.2,high", "could not convert"),
        ],
    )
    def test_exception(self, tmp_path: Path, row: str, message: str) -> None:
        path = tmp_path / "det.csv"
        path.write_text(f"id,box,score\nok,0.1 0.1 0.2 0.2,0.5\n{row}\n")
        with pytest.raises(ValueError, match=rf"det\.csv:3: .*{message}"):
            read_boxes_csv(path)

    def test_line_counts_blank_lines_and_header(self, tmp_path: Path) -> None:
        path = tmp_path / "det.csv"
        path.write_text("id,box\nok,0.1 0.1 0.2 0.2\n\n,0.1 0.1 0.2 0.2\n")
        with pytest.raises(ValueError, match=r"det\.csv:4: empty image id"):
            read_boxes_csv(path)
        path.write_text("")
        with pytest.raises(ValueError, match=r"det\.csv:1: expected header"):
            read_boxes_csv(path)

    def test_printable_unicode_ids_are_fine(self, tmp_path: Path) -> None:
        path = tmp_path / "det.csv"
        path.write_text("id,box\ncafé-1,0.1 0.1 0.2 0.2\n", encoding="utf-8")
        assert list(read_boxes_csv(path)) == ["café-1"]

    def test_official_reader_rejects_unsafe_ids(self, tmp_path: Path) -> None:
        path = tmp_path / "boxes_split1.csv"
        path.write_text("id,box\nok,0.1 0.1 0.2 0.2\n../x,0.1 0.1 0.2 0.2\n")
        with pytest.raises(ValueError, match=r"boxes_split1\.csv:3: image id '\.\./x' is not a"):
            read_gld_boxes_csv(path)
