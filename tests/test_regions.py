"""Tests of retrieval.regions: region sources, R-MAC grid, selective search, crops, the stage."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from gldboxes.boxes import Box, write_boxes_csv
from retrieval.evaluation.datasets import save_gnd
from retrieval.regions import (
    SS_MIN_SIZE,
    WHOLE_IMAGE,
    assign_features_to_regions,
    compute_regions,
    confs,
    crop_box,
    detector_boxes,
    main,
    read_regions_csv,
    regional_descriptors,
    rmac_boxes,
    rmac_grid,
    select_regions,
    selective_search_boxes,
)

SIZES = [
    (640, 480),
    (480, 640),
    (500, 500),
    (501, 500),
    (1024, 200),
    (200, 1024),
    (3000, 100),
    (37, 50),
    (1, 1),
    (2, 7),
    (1023, 767),
]


def _tolias_reference(width: int, height: int, levels: int) -> list[list[int]]:
    """A line-by-line transcription of Tolias et al.'s MATLAB ``rmac_regions`` (1-based idx)."""
    ovr = 0.4
    steps = [2, 3, 4, 5, 6, 7]
    w = min(width, height)
    errs = []
    for s in steps:
        b = (max(height, width) - w) / (s - 1)
        errs.append(abs((w**2 - w * b) / w**2 - ovr))
    idx = errs.index(min(errs)) + 1  # MATLAB's [~, idx] = min(...): first minimum, 1-based
    wd, hd = 0, 0
    if height < width:
        wd = idx
    elif height > width:
        hd = idx
    regions = []
    for lev in range(1, levels + 1):
        wl = math.floor(2 * w / (lev + 1))
        wl2 = math.floor(wl / 2 - 1)
        den = lev + wd - 1
        b = 0.0 if den == 0 else (width - wl) / den  # (W - wl) / 0 is NaN in MATLAB -> 0
        cen_w = [math.floor(wl2 + i * b) - wl2 for i in range(lev - 1 + wd + 1)]
        den = lev + hd - 1
        b = 0.0 if den == 0 else (height - wl) / den
        cen_h = [math.floor(wl2 + i * b) - wl2 for i in range(lev - 1 + hd + 1)]
        for i_ in cen_h:
            for j_ in cen_w:
                if min(wl, wl) == 0:
                    continue
                regions.append([j_, i_, wl, wl])
    return regions


def _m(width: int, height: int) -> int:
    """Regions along the long side at level 1: 1 when square, else the best of 2..7."""
    if width == height:
        return 1
    w, long = min(width, height), max(width, height)
    return min(range(2, 8), key=lambda m: abs(1 - (long - w) / (m - 1) / w - 0.4))


class TestRmacGrid:
    @pytest.mark.parametrize(("width", "height"), SIZES)
    @pytest.mark.parametrize("levels", [1, 2, 3])
    def test_matches_tolias_reference(self, width: int, height: int, levels: int) -> None:
        got = rmac_grid(width, height, levels)
        ref = np.array(_tolias_reference(width, height, levels), dtype=np.int64).reshape(-1, 4)
        np.testing.assert_array_equal(got, ref)

    @pytest.mark.parametrize(("width", "height"), [s for s in SIZES if min(s) >= 4])
    def test_counts_per_level(self, width: int, height: int) -> None:
        m = _m(width, height)
        for levels in (1, 2, 3):
            expect = sum(lev * (lev + m - 1) for lev in range(1, levels + 1))
            assert len(rmac_grid(width, height, levels)) == expect

    def test_known_counts(self) -> None:
        # R-MAC's familiar numbers: 4:3 -> 2 + 6 + 12 = 20 regions, square -> 1 + 4 + 9 = 14
        assert len(rmac_grid(640, 480, 3)) == 20
        assert len(rmac_grid(500, 500, 3)) == 14
        assert len(rmac_grid(1024, 200, 1)) == 7  # very elongated: 7 along the long side

    @pytest.mark.parametrize(("width", "height"), [(640, 480), (200, 1024), (777, 333)])
    def test_geometry(self, width: int, height: int) -> None:
        g = rmac_grid(width, height, 3)
        assert (g[:, 0] >= 0).all() and (g[:, 1] >= 0).all()
        assert (g[:, 0] + g[:, 2] <= width).all() and (g[:, 1] + g[:, 3] <= height).all()
        w = min(width, height)
        m = _m(width, height)
        start = 0
        for lev in range(1, 4):
            n = lev * (lev + m - 1)
            level = g[start : start + n]
            start += n
            assert (level[:, 2] == math.floor(2 * w / (lev + 1))).all()  # squares of this side
            # spread from border to border along both axes
            assert level[:, 0].min() == 0 and level[:, 1].min() == 0
            assert (level[:, 0] + level[:, 2]).max() >= width - 1
            assert (level[:, 1] + level[:, 3]).max() >= height - 1

    def test_overlap_near_40_percent_when_possible(self) -> None:
        # 1000 x 300: m = 4 gives neighbours offset by 233 px on 300 px squares: 22% overlap;
        # m = 5 gives 175 px: 41.7%, the closest to 40%
        g = rmac_grid(1000, 300, 1)
        assert len(g) == 5
        overlap = 1 - np.diff(g[:, 0]) / 300
        assert np.all(np.abs(overlap - 0.4) < 0.03)

    def test_boxes_normalised(self) -> None:
        boxes = rmac_boxes(640, 480, 2)
        g = rmac_grid(640, 480, 2)
        assert len(boxes) == len(g) == 8
        for b, (x, y, s, _) in zip(boxes, g, strict=True):
            assert b.xmin == pytest.approx(x / 640) and b.ymin == pytest.approx(y / 480)
            assert b.xmax == pytest.approx((x + s) / 640) and b.ymax == pytest.approx((y + s) / 480)
            assert b.score == 1.0

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="levels"):
            rmac_grid(10, 10, 0)
        with pytest.raises(ValueError, match="positive"):
            rmac_grid(0, 10, 1)


def _scene(seed: int = 0, width: int = 320, height: int = 240) -> np.ndarray:
    """A textured background with a few solid shapes (clear segments for selective search)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 110, (height, width, 3), dtype=np.uint8)
    cv2.rectangle(img, (20, 30), (120, 200), (200, 40, 40), -1)
    cv2.rectangle(img, (180, 20), (300, 90), (40, 200, 40), -1)
    cv2.circle(img, (230, 170), 45, (40, 40, 220), -1)
    return img


class TestSelectiveSearch:
    def test_contrib_present(self) -> None:
        """Catches a reinstall of the plain opencv wheel over the contrib one (no ximgproc)."""
        assert hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "segmentation")

    def test_smoke_and_reproducible(self) -> None:
        img = _scene()
        a = selective_search_boxes(img, top_n=10, max_side=160, seed=3)
        b = selective_search_boxes(img, top_n=10, max_side=160, seed=3)
        assert len(a) == 10
        assert a == b  # same seed, same proposals in the same order
        assert [x.score for x in a] == pytest.approx([1 / (1 + r) for r in range(10)])
        assert len({x.to_string() for x in a}) == 10  # duplicates removed
        for x in a:
            assert x.area >= 0.01 - 1e-9
        big = selective_search_boxes(img, top_n=5, max_side=160, min_area=0.2, seed=3)
        assert all(x.area >= 0.2 for x in big)

    def test_finds_the_shapes(self) -> None:
        """Some proposal covers each drawn shape tightly (IoU > 0.7) among the top 50."""
        img = _scene()
        props = selective_search_boxes(img, top_n=50, max_side=None, seed=0)
        h, w = img.shape[:2]
        shapes = [(20, 30, 121, 201), (180, 20, 301, 91), (185, 125, 276, 216)]  # x0 y0 x1 y1
        for x0, y0, x1, y1 in shapes:
            best = 0.0
            for p in props:
                px0, py0, px1, py1 = p.xmin * w, p.ymin * h, p.xmax * w, p.ymax * h
                iw = max(0.0, min(x1, px1) - max(x0, px0))
                ih = max(0.0, min(y1, py1) - max(y0, py0))
                inter = iw * ih
                union = (x1 - x0) * (y1 - y0) + (px1 - px0) * (py1 - py0) - inter
                best = max(best, inter / union)
            assert best > 0.7

    def test_grey_and_zero(self) -> None:
        grey = cv2.cvtColor(_scene(), cv2.COLOR_BGR2GRAY)
        assert len(selective_search_boxes(grey, top_n=2, max_side=128)) == 2
        assert selective_search_boxes(grey, top_n=0) == []

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="mode"):
            selective_search_boxes(_scene(), top_n=1, mode="slow")
        with pytest.raises(ValueError, match="top_n"):
            selective_search_boxes(_scene(), top_n=-1)
        with pytest.raises(ValueError, match="image"):
            selective_search_boxes(np.zeros((5, 5, 4), np.uint8), top_n=1)


class TestComputeRegions:
    def test_region_zero_is_whole_image(self) -> None:
        det = [Box(0.1, 0.1, 0.5, 0.5, 0.9)]
        for name, conf in confs.items():
            regs = compute_regions(conf, width=64, height=48, image=_scene(0, 64, 48), boxes=det)
            assert regs[0] == WHOLE_IMAGE, name

    def test_detector_threshold(self) -> None:
        det = [
            Box(0.1, 0.1, 0.5, 0.5, 0.2),
            Box(0.2, 0.2, 0.9, 0.9, 0.75),
            Box(0.0, 0.3, 0.6, 0.9, 0.5),
            Box(0.3, 0.3, 0.4, 0.4, 0.05),
        ]
        scores = {
            t: [b.score for b in compute_regions(confs[f"d2r-{t:g}"], boxes=det)[1:]]
            for t in (0.7, 0.5, 0.3, 0.1)
        }
        assert scores == {0.7: [0.75], 0.5: [0.75, 0.5], 0.3: [0.75, 0.5], 0.1: [0.75, 0.5, 0.2]}
        assert [b.score for b in detector_boxes(det, score_threshold=0.0, max_boxes=2)] == [
            0.75,
            0.5,
        ]
        assert compute_regions(confs["d2r-0.1"], boxes=None) == [WHOLE_IMAGE]

    def test_gt_rmac_whole(self) -> None:
        gt = [Box(0.1, 0.2, 0.6, 0.7)]
        regs = compute_regions(confs["gt"], boxes=gt)
        assert len(regs) == 2 and regs[1].to_string() == gt[0].to_string()
        assert regs[1].score == 1.0
        assert len(compute_regions(confs["rmacb-L3"], width=640, height=480)) == 1 + 20
        assert len(compute_regions(confs["rmacb-L1"], width=500, height=500)) == 2
        assert compute_regions(confs["whole"]) == [WHOLE_IMAGE]
        regs = compute_regions(confs["ss-5"], image=_scene())
        assert len(regs) == 6

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="width and height"):
            compute_regions(confs["rmacb-L1"])
        with pytest.raises(ValueError, match="needs the image"):
            compute_regions(confs["ss-1"])
        with pytest.raises(ValueError, match="unknown region source"):
            compute_regions({"source": "edgeboxes"})


class TestSelectRegions:
    """The cap (``max_regions``) and size filter (``min_size``) every source goes through."""

    @staticmethod
    def _reference(boxes: list[Box], min_size: float, cap: int | None) -> list[Box]:
        """Obviously correct: filter one by one, then repeatedly take the first best box."""
        left = [b for b in boxes if min(b.xmax - b.xmin, b.ymax - b.ymin) >= min_size - 1e-9]
        out = []
        while left and (cap is None or len(out) < cap):
            best = max(b.score if b.score is not None else 1.0 for b in left)
            first = next(b for b in left if (b.score if b.score is not None else 1.0) == best)
            out.append(first)
            left.remove(first)
        return out

    def test_matches_reference(self) -> None:
        rng = np.random.default_rng(0)
        for _ in range(50):
            n = int(rng.integers(0, 12))
            c = rng.uniform(0, 1, (n, 4))
            scores = rng.choice([0.2, 0.5, 0.9, None], n)  # ties and missing scores
            boxes = [
                Box(min(a, b), min(x, y), max(a, b), max(x, y), s)
                for (a, x, b, y), s in zip(c, scores, strict=True)
            ]
            for min_size in (0.0, 0.1, 0.3):
                for cap in (None, 0, 1, 3):
                    got = select_regions(boxes, min_size=min_size, max_regions=cap)
                    assert got == self._reference(boxes, min_size, cap)

    def test_every_source(self) -> None:
        """Region 0 stays; the filter and the cap apply to detector, gt, rmac, selective search."""
        det = [
            Box(0.0, 0.0, 0.9, 0.15, 0.95),  # a sliver: 0.15 wide
            Box(0.1, 0.1, 0.6, 0.6, 0.5),
            Box(0.2, 0.2, 0.9, 0.9, 0.8),
        ]
        extra = {"min_size": 0.2, "max_regions": 1}
        regs = compute_regions({**confs["d2r-0.1"], **extra}, boxes=det)
        assert regs == [WHOLE_IMAGE, det[2]]  # the sliver is dropped, then the best one
        regs = compute_regions({**confs["gt"], **extra}, boxes=det)
        assert len(regs) == 2 and regs[1].to_string() == det[1].to_string()  # file order
        assert compute_regions({**confs["gt"], "max_regions": 0}, boxes=det) == [WHOLE_IMAGE]
        grid = compute_regions(confs["rmacb-L3"], width=640, height=480)
        capped = compute_regions({**confs["rmacb-L3"], "max_regions": 4}, width=640, height=480)
        assert capped == grid[:5]  # equal scores: the grid's coarse-to-fine order
        assert compute_regions({**confs["rmacb-L3"], "min_size": 0.6}, width=640, height=480) == [
            WHOLE_IMAGE,
            *grid[1:3],
        ]  # only level 1 (2 squares of 480/640 = 0.75 x 1.0) spans 0.6 of both sides
        img = _scene()
        ss = compute_regions({**confs["ss-10"], "max_regions": 3}, image=img)
        assert len(ss) == 4 and ss[0] == WHOLE_IMAGE
        assert [b.score for b in ss[1:]] == sorted([b.score for b in ss[1:]], reverse=True)

    def test_selective_search_filters_before_top_n(self) -> None:
        img = _scene()
        boxes = selective_search_boxes(img, top_n=5, max_side=160, seed=0, min_size=0.3)
        assert len(boxes) == 5  # still top_n: the filter runs before the cut
        assert all(min(b.xmax - b.xmin, b.ymax - b.ymin) >= 0.3 - 1e-9 for b in boxes)
        assert [b.score for b in boxes] == pytest.approx([1 / (1 + r) for r in range(5)])
        raw = selective_search_boxes(img, top_n=200, max_side=160, seed=0)
        assert any(min(b.xmax - b.xmin, b.ymax - b.ymin) < 0.3 for b in raw)

    def test_preset_names(self) -> None:
        """Presets whose output changed are renamed (stale CSVs never match); others keep it."""
        assert confs["ss-5"]["output"] == f"regions-ss-5-s{SS_MIN_SIZE:g}"
        assert confs["ss-5"]["min_size"] == SS_MIN_SIZE > 0
        for name in ("rmacb-L1", "rmacb-L2", "rmacb-L3", "gt", "d2r-0.3"):
            assert confs[name]["output"] == f"regions-{name}"
            assert confs[name]["min_size"] == 0.0 and confs[name]["max_regions"] is None
        for name, conf in confs.items():
            if name != "whole":
                assert {"min_size", "max_regions"} <= set(conf), name

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="min_size"):
            select_regions([], min_size=1.5)
        with pytest.raises(ValueError, match="max_regions"):
            select_regions([], max_regions=-1)


class TestCropAndAssign:
    def test_crop_floor_ceil(self) -> None:
        img = np.arange(48 * 64).reshape(48, 64)
        box = Box(0.1, 0.2, 0.55, 0.61)  # y 4.8..26.4, x 12.8..39.04
        crop = crop_box(img, box)
        np.testing.assert_array_equal(crop, img[4:27, 12:40])
        assert crop_box(img, WHOLE_IMAGE).shape == (48, 64)
        rgb = np.zeros((10, 10, 3), np.uint8)
        assert crop_box(rgb, Box(0.0, 0.0, 0.01, 0.01)).shape == (1, 1, 3)
        with pytest.raises(ValueError, match="image"):
            crop_box(np.zeros(5), box)

    def test_assign_matches_reference(self) -> None:
        rng = np.random.default_rng(0)
        w, h = 64, 48
        kp = np.concatenate(
            [
                rng.uniform(0, [w, h], (300, 2)),
                np.array([[12.0, 4.0], [40.0, 27.0], [39.999, 26.999], [64, 48]]),
            ]
        )
        boxes = [
            WHOLE_IMAGE,
            Box(0.1, 0.2, 0.55, 0.61),
            Box(0.5, 0.5, 1.0, 1.0),
            Box(0.9, 0.9, 0.95, 0.95),
        ]
        got = assign_features_to_regions(kp, boxes, w, h)
        assert len(got) == len(boxes)
        for b, idx in zip(boxes, got, strict=True):
            x0, y0, x1, y1 = b.to_pixels(w, h)
            ref = [i for i, (x, y) in enumerate(kp) if x0 <= x < x1 and y0 <= y < y1]
            assert idx.tolist() == ref
        assert len(got[0]) == 303  # (64, 48) is outside the image
        # consistent with crop_box: the assigned keypoints fall inside the crop
        crop = crop_box(np.zeros((h, w)), boxes[1])
        x0, y0, _, _ = boxes[1].to_pixels(w, h)
        local = kp[got[1]] - [x0, y0]
        assert (local >= 0).all() and (local[:, 0] < crop.shape[1]).all()
        assert (local[:, 1] < crop.shape[0]).all()

    def test_regional_descriptors(self) -> None:
        rng = np.random.default_rng(1)
        kp = rng.uniform(0, [64, 48], (50, 2))
        desc = rng.random((50, 8)).astype(np.float32)
        boxes = [WHOLE_IMAGE, Box(0.0, 0.0, 0.5, 0.5)]
        regs = regional_descriptors(kp, desc, boxes, 64, 48)
        np.testing.assert_array_equal(regs[0], desc)
        inside = (kp[:, 0] < 32) & (kp[:, 1] < 24)
        np.testing.assert_array_equal(regs[1], desc[inside])
        assert regs[1].dtype == np.float32 and 0 < len(regs[1]) < 50
        with pytest.raises(ValueError, match="keypoints but descriptors"):
            regional_descriptors(kp, desc[:3], boxes, 64, 48)

    def test_assign_edge_cases(self) -> None:
        assert assign_features_to_regions(np.zeros((0, 2)), [WHOLE_IMAGE], 5, 5)[0].size == 0
        assert assign_features_to_regions(np.zeros((3, 2)), [], 5, 5) == []
        with pytest.raises(ValueError, match=r"\(N, 2\)"):
            assign_features_to_regions(np.zeros((3, 3)), [WHOLE_IMAGE], 5, 5)


def _tiny_dataset(root: Path) -> list[str]:
    names = ["db0", "db1", "db2", "q0"]
    (root / "jpg").mkdir(parents=True)
    for i, n in enumerate(names):
        size = (120, 160) if i % 2 == 0 else (160, 120)
        img = _scene(i, size[1], size[0])
        cv2.imwrite(str(root / "jpg" / f"{n}.jpg"), img)
    save_gnd(
        {
            "imlist": names[:3],
            "qimlist": ["q0"],
            "gnd": [{"bbx": [0, 0, 10, 10], "easy": [0], "hard": [1], "junk": [2]}],
        },
        root / "gnd_tiny.pkl",
    )
    write_boxes_csv(
        root / "boxes_gt.csv", {"db0": [Box(0.1, 0.1, 0.8, 0.9)], "db2": [Box(0.2, 0.3, 0.4, 0.5)]}
    )
    return names


class TestMain:
    def test_stage(self, tmp_path: Path) -> None:
        ds = tmp_path / "tiny"
        _tiny_dataset(ds)
        out = tmp_path / "regions"
        det = tmp_path / "det.csv"
        write_boxes_csv(
            det,
            {
                "db1": [Box(0.1, 0.1, 0.5, 0.5, 0.9), Box(0.2, 0.2, 0.3, 0.3, 0.2)],
                "other": [Box(0.1, 0.1, 0.5, 0.5, 0.9)],
            },
        )

        p = main(confs["d2r-0.5"], ds, out, boxes=det)
        assert p == out / "regions-d2r-0.5.csv" and (out / "regions-d2r-0.5.yaml").exists()
        regs = read_regions_csv(p)
        assert sorted(regs) == ["db0", "db1", "db2"]
        assert [len(v) for v in (regs["db0"], regs["db1"], regs["db2"])] == [1, 2, 1]
        assert regs["db1"][1].score == 0.9

        regs = read_regions_csv(main(confs["gt"], ds, out))
        assert [len(regs[k]) for k in ("db0", "db1", "db2")] == [2, 1, 2]

        regs = read_regions_csv(main(confs["rmacb-L2"], ds, out))
        assert len(regs["db0"]) == 1 + len(rmac_grid(160, 120, 2))
        assert len(regs["db1"]) == 1 + len(rmac_grid(120, 160, 2))
        assert regs["db1"][1].ymax == pytest.approx(120 / 160)  # portrait: square at the top

        ss = main(confs["ss-2"], ds, out)
        regs = read_regions_csv(ss)
        assert all(len(v) == 3 for v in regs.values())
        # processes give the same proposals as the serial run (seeded per image)
        par = main({**confs["ss-2"], "output": "ss-par"}, ds, out, num_workers=2)
        assert read_regions_csv(par) == regs

        # done outputs are skipped, overwrite recomputes
        ss.write_text("id,box,score\n")
        assert main(confs["ss-2"], ds, out) == ss and ss.read_text() == "id,box,score\n"
        main(confs["ss-2"], ds, out, overwrite=True)
        assert len(read_regions_csv(ss)) == 3

    def test_exception(self, tmp_path: Path) -> None:
        ds = tmp_path / "tiny"
        _tiny_dataset(ds)
        with pytest.raises(ValueError, match="needs a boxes file"):
            main(confs["d2r-0.1"], ds, tmp_path / "o")
        with pytest.raises(FileNotFoundError):
            main(confs["d2r-0.1"], ds, tmp_path / "o", boxes=tmp_path / "missing.csv")
        bad = tmp_path / "bad.csv"
        write_boxes_csv(bad, {"x": [Box(0.1, 0.1, 0.5, 0.5, 0.9)]})
        with pytest.raises(ValueError, match="none of its ids"):
            main(confs["d2r-0.1"], ds, tmp_path / "o", boxes=bad)
        with pytest.raises(ValueError, match="unknown region source"):
            main({"source": "x", "output": "x"}, ds, tmp_path / "o")
        # a regions file whose region 0 is not the whole image is refused
        write_boxes_csv(bad, {"x": [Box(0.1, 0.1, 0.5, 0.5, 0.9)]})
        with pytest.raises(ValueError, match="not the whole"):
            read_regions_csv(bad)


class TestSelectiveSearchCache:
    def test_presets_share_one_proposals_cache(self, tmp_path: Path) -> None:
        """ss-N presets read the first N of one cached proposal list: the same regions as
        computing each preset directly, computed once (serial and processes agree)."""
        import cv2

        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.regions import compute_regions

        ds = tmp_path / "tiny"
        _tiny_dataset(ds)
        out = tmp_path / "regions"
        two = read_regions_csv(main(confs["ss-2"], ds, out))
        caches = sorted(out.glob("ss-proposals-*.npz"))
        assert len(caches) == 1
        stamp = caches[0].stat().st_mtime_ns
        one = read_regions_csv(main(confs["ss-1"], ds, out))
        assert caches[0].stat().st_mtime_ns == stamp  # reused, not recomputed
        rds = RevisitedDataset.load(ds)
        for name in rds.imlist:
            img = cv2.imread(str(rds.image_path(name)), cv2.IMREAD_COLOR)
            for conf, got in ((confs["ss-1"], one), (confs["ss-2"], two)):
                direct = compute_regions(conf, image=img)
                assert len(got[name]) == len(direct)
                for g, d in zip(got[name], direct, strict=True):
                    assert (g.ymin, g.xmin, g.ymax, g.xmax, g.score) == pytest.approx(
                        (d.ymin, d.xmin, d.ymax, d.xmax, d.score)
                    )
        caches[0].unlink()
        par = main({**confs["ss-2"], "output": "ss-par"}, ds, out, num_workers=2)
        assert read_regions_csv(par) == two
        # more proposals than the cache keeps: computed directly, processes equal serial
        wide = {**confs["ss-2"], "top_n": 40}
        serial = read_regions_csv(main({**wide, "output": "ss-40"}, ds, out))
        assert serial == read_regions_csv(
            main({**wide, "output": "ss-40p"}, ds, out, num_workers=2)
        )
        assert all(len(serial[n]) >= len(two[n]) for n in two)


def test_selective_search_conf_builds_the_presets_and_any_n() -> None:
    """The ss-N presets and the ablation's other N come from one function (one naming)."""
    from retrieval.regions import selective_search_conf
    from retrieval.runner.ablation import confs as ablation_confs
    from retrieval.runner.ablation import grid

    assert confs["ss-5"] == selective_search_conf(5)
    c = {**ablation_confs["paper"], "ss": [3], "rmac_levels": [], "gt": False}
    cells = [x for x in grid({**c, "methods": ["d2r_max"]}) if x.source == "selective_search"]
    assert cells[0].engine["regions"] == selective_search_conf(3)
    assert selective_search_conf(3)["output"] == "regions-ss-3-s0.2"


class TestRegistry:
    """Region sources are objects in one registry; a new one is one RegionSource."""

    def test_builtin_sources(self) -> None:
        from retrieval.regions import region_sources

        assert {n: s.needs for n, s in region_sources.items()} == {
            "detector": "boxes",
            "rmac": "size",
            "selective_search": "pixels",
            "gt": "boxes",
            "whole": "nothing",
        }
        assert {c["source"] for c in confs.values()} == set(region_sources)

    def test_a_new_source_is_one_object(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A centre-crop source (the middle half of every image) registered at run time goes
        through the selection and ``main`` with nothing else changed."""
        from retrieval import regions

        def centre(conf: dict, *, width: int, height: int, **_: object) -> list[Box]:
            f = conf["fraction"] / 2
            return [Box(0.5 - f, 0.5 - f, 0.5 + f, 0.5 + f, 1.0)]

        src = regions.RegionSource(name="centre", needs="size", propose=centre)
        monkeypatch.setitem(regions.region_sources, "centre", src)
        conf = {"output": "regions-centre", "source": "centre", "fraction": 0.5}
        got = compute_regions(conf, width=40, height=30)
        assert got == [WHOLE_IMAGE, Box(0.25, 0.25, 0.75, 0.75, 1.0)]
        with pytest.raises(ValueError, match="'centre' source needs width and height"):
            compute_regions(conf)
        ds = tmp_path / "tiny"
        _tiny_dataset(ds)
        out = main(conf, ds, tmp_path / "o")
        rows = read_regions_csv(out)
        assert rows and all(v == got for v in rows.values())
