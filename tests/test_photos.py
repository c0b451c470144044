"""Search your own photos from the CLI: index a folder, query it, the HTML report in headless
Chromium, and ground truth from a CSV scored with the Revisited protocol."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gldboxes.cli.main import main as cli_main
from retrieval.runner import photos
from retrieval.runner.report import MAX_LINES

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
RESULT = re.compile(r"^\s+(\d+)\s+(-?\d+\.\d{4})(?:\s+(\d+) inliers)?\s+(\S.*)$")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def indexed(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The world's database photos (no queries) in a folder, indexed from the CLI with a
    codebook trained on the training photos: ``(photo folder, index)``."""
    root = tmp_path_factory.mktemp("own")
    folder = root / "photos" / "trip"
    folder.mkdir(parents=True)
    for p in sorted((world / "retrieval" / "jpg").iterdir()):
        if "query" not in p.name:
            shutil.copyfile(p, folder / p.name)
    args = ["retrieval", "index", "--images", str(root / "photos"), "--out", str(root / "idx")]
    args += ["--codebook-images", str(world / "train" / "images"), "--codebook-size", "128"]
    assert cli_main(args) == 0
    return root / "photos", root / "idx"


def _results(text: str) -> list[tuple[int, float, int | None, str]]:
    out = []
    for line in text.splitlines():
        m = RESULT.match(line)
        if m:
            inl = None if m.group(3) is None else int(m.group(3))
            out.append((int(m.group(1)), float(m.group(2)), inl, m.group(4)))
    return out


def _require_browser() -> None:
    """Fail (never skip) when the browser stack is missing, naming what to install."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: install the Debian package `chromium`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the pip package `playwright` is missing (pip install -e .[dev])")


@pytest.mark.slow
class TestQuery:
    def test_smoke(
        self, world: Path, indexed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        folder, idx = indexed
        capsys.readouterr()
        q = world / "retrieval" / "jpg" / "lm001_query0.jpg"
        assert cli_main(["retrieval", "query", "--index", str(idx), str(q), "--top-k", "5"]) == 0
        res = _results(capsys.readouterr().out)
        assert [r[0] for r in res] == [1, 2, 3, 4, 5]
        scores = [r[1] for r in res]
        assert scores == sorted(scores, reverse=True) and all(r[2] is None for r in res)
        # the landmark's easy photos come first (lm001_000e, lm001_001e)
        assert {Path(r[3]).name for r in res[:2]} == {"lm001_000e.jpg", "lm001_001e.jpg"}
        ix = photos.PhotoIndex.load(idx)
        assert ix.n_photos == len(list((folder / "trip").iterdir()))
        assert res[0][1] == pytest.approx(float(ix.rank([q], 1)[1][0, 0]), abs=5e-5)
        args = ["retrieval", "query", "--index", str(idx), str(q), "--top-k", "5", "--json"]
        assert cli_main(args) == 0
        got = json.loads(capsys.readouterr().out)["queries"][0]["results"]
        assert [(e["rank"], round(e["score"], 4), e["path"]) for e in got] == [
            (r[0], r[1], str(Path(r[3]).resolve())) for r in res
        ]
        assert [e["id"] for e in got] == ix.rank([q], 5)[0][0].tolist()

    @pytest.mark.server
    def test_verify_and_html_in_chromium(
        self,
        world: Path,
        indexed: tuple[Path, Path],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        _require_browser()
        from PIL import Image
        from playwright.sync_api import sync_playwright

        _, idx = indexed
        q = world / "retrieval" / "jpg" / "lm002_query0.jpg"
        report = tmp_path / "report"
        capsys.readouterr()
        args = ["retrieval", "query", "--index", str(idx), str(q), "--top-k", "4", "--verify"]
        assert cli_main([*args, "--html", str(report)]) == 0
        res = _results(capsys.readouterr().out)
        assert len(res) == 4
        inliers = [r[2] for r in res]
        assert all(i is not None for i in inliers)
        assert inliers == sorted(inliers, reverse=True)  # type: ignore[type-var]
        assert Path(res[0][3]).name.startswith("lm002_") and inliers[0] >= 20  # type: ignore[operator]
        # self-contained: the page opens and draws everything without the index
        moved = tmp_path / "elsewhere"
        shutil.copytree(report, moved)
        shot = tmp_path / "report.png"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.goto((moved / "index.html").as_uri(), wait_until="load")
                n_cards = page.locator(".result-card").count()
                loaded = page.evaluate(
                    "[...document.images].map(i => i.complete && i.naturalWidth > 0 "
                    "&& i.src.startsWith('data:image/jpeg;base64,'))"
                )
                lines = page.evaluate(
                    "[...document.querySelectorAll('.result-card')].map("
                    "c => c.querySelectorAll('line').length)"
                )
                card_inliers = page.evaluate(
                    "[...document.querySelectorAll('.result-card')].map(c => +c.dataset.inliers)"
                )
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        assert n_cards == 4
        assert len(loaded) == 1 + 2 * 4 and all(loaded)  # query + (query, result) per card
        assert card_inliers == inliers
        assert lines == [min(int(i), MAX_LINES) for i in inliers]  # type: ignore[arg-type]
        img = np.asarray(Image.open(shot).convert("RGB"))
        assert img.shape[0] >= 600 and img.std() > 30  # not blank
        assert np.unique(img.reshape(-1, 3), axis=0).shape[0] > 2000  # photos were painted
        # green inlier lines were drawn
        green = (img[..., 1] > 200) & (img[..., 0] < 60) & (img[..., 2] > 80) & (img[..., 2] < 160)
        assert green.sum() > 500

    def test_ground_truth_csv(
        self,
        world: Path,
        indexed: tuple[Path, Path],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        _, idx = indexed
        ix = photos.PhotoIndex.load(idx)
        q = world / "retrieval" / "jpg" / "lm003_query0.jpg"
        ranked = [ix.path(int(i)) for i in ix.rank([q], 5)[0][0]]
        gt = tmp_path / "gt.csv"
        with open(gt, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["query", "positive", "kind"])
            # an easy positive at rank 3, a hard one at rank 5 and junk at rank 1
            w.writerow([os.path.relpath(q, tmp_path), ranked[2], "easy"])
            w.writerow([str(q), os.path.relpath(ranked[0], tmp_path), "junk"])
            w.writerow([str(q), str(_id(ix, ranked[4])), "hard"])
        capsys.readouterr()
        assert cli_main(["retrieval", "query", "--index", str(idx), "--gt", str(gt)]) == 0
        table = capsys.readouterr().out
        row = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
        # columns: method, E mAP, E mP@1,5,10, M mAP, ..., H mAP, ...
        e_map, m_map, h_map = float(row[1]), float(row[5]), float(row[9])
        # revisitop's AP (trapezoid: each positive at 0-based position r, the j-th found, adds
        # (j / r + (j + 1) / (r + 1)) / 2 / n_positives, j / 0 read as 1), by hand:
        # Easy: junk + hard ignored, the positive at position 1 -> (0 + 1/2) / 2
        assert e_map == pytest.approx(25.0)
        # Medium: junk ignored, positives at positions 1 and 3 -> ((0 + 1/2) + (1/3 + 2/4)) / 4
        assert m_map == pytest.approx(100 * (0.5 + 1 / 3 + 0.5) / 4, abs=0.01)
        # Hard: junk + easy ignored, the positive at position 2 -> (0 + 1/3) / 2
        assert h_map == pytest.approx(100 / 6, abs=0.01)
        res, ranks = photos.evaluate_gt(ix, gt)
        assert ranks.shape == (ix.n_photos, 1)
        assert res["medium"].map == pytest.approx((0.5 + 1 / 3 + 0.5) / 4)

    def test_regions_drawn(
        self,
        world: Path,
        indexed: tuple[Path, Path],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``--regions gt --region-boxes CSV``: each result's boxes of the CSV are drawn."""
        _, idx = indexed
        boxes = world / "retrieval" / "boxes_gt.csv"
        q = world / "retrieval" / "jpg" / "lm004_query0.jpg"
        args = ["retrieval", "query", "--index", str(idx), str(q), "--top-k", "6"]
        args += ["--regions", "gt", "--region-boxes", str(boxes), "--html", str(tmp_path)]
        capsys.readouterr()
        assert cli_main(args) == 0
        res = _results(capsys.readouterr().out)
        with open(boxes, newline="") as fh:
            ids = [row["id"] for row in csv.DictReader(fh)]
        want = sum(ids.count(Path(r[3]).stem) for r in res)
        html = (tmp_path / "index.html").read_text()
        assert len(res) == 6 and want >= 3  # the landmark's photos have their box
        assert html.count('<rect class="region"') == want

    def test_exception(self, world: Path, indexed: tuple[Path, Path], tmp_path: Path) -> None:
        _, idx = indexed
        assert cli_main(["retrieval", "query", "--index", str(idx)]) == 2
        assert cli_main(["retrieval", "query", "--index", str(tmp_path), "x.jpg"]) == 2
        missing = str(tmp_path / "none.jpg")
        assert cli_main(["retrieval", "query", "--index", str(idx), missing]) == 2
        bad = tmp_path / "gt.csv"
        bad.write_text(f"query,positive,kind\n{missing},{tmp_path / 'no.jpg'},easy\n")
        assert cli_main(["retrieval", "query", "--index", str(idx), "--gt", str(bad)]) == 2
        bad.write_text("query,positive,kind\na.jpg,0,medium\n")
        with pytest.raises(ValueError, match="kind 'medium'"):
            photos.read_gt_csv(bad, photos.PhotoIndex.load(idx))
        assert cli_main(["retrieval", "index", "--out", str(idx), "--remove", "9999"]) == 2
        assert cli_main(["retrieval", "index", "--out", str(tmp_path / "x")]) == 2


def _id(ix: photos.PhotoIndex, path: str) -> int:
    return next(int(im["id"]) for im in ix.header["images"] if im["path"] == path)


@pytest.mark.slow
def test_real_photos(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ten Sacre-Coeur photos among five of other places: a Sacre-Coeur photo from elsewhere
    finds all ten first (AP 100 from the ground-truth CSV), and only they verify."""
    photos_dir = shared_data / "landmark_photos"
    folder = tmp_path / "photos"
    folder.mkdir()
    sacre = sorted((photos_dir / "sacre_coeur_hloc").glob("*.jpg"))
    others = [
        *sorted((photos_dir / "lightglue_assets").glob("DSC_*.JPG")),
        *sorted((photos_dir / "roma_assets").glob("toronto_*.jpg")),
        photos_dir / "sklearn_china_summer_palace.jpg",
    ]
    for p in [*sacre, *others]:
        shutil.copyfile(p, folder / p.name)
    idx = tmp_path / "idx"
    args = ["retrieval", "index", "--images", str(folder), "--out", str(idx)]
    assert cli_main([*args, "--codebook-size", "256"]) == 0  # codebook: the photos themselves
    query = photos_dir / "lightglue_assets" / "sacre_coeur1.jpg"
    gt = tmp_path / "gt.csv"
    gt.write_text(
        "query,positive\n" + "".join(f"{query},{folder / p.name}\n" for p in sacre), "utf-8"
    )
    capsys.readouterr()
    assert cli_main(["retrieval", "query", "--index", str(idx), "--gt", str(gt)]) == 0
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[-1].split("|")[1:-1]]
    assert float(row[1]) == 100.0 and float(row[5]) == 100.0  # Easy and Medium mAP
    args = ["retrieval", "query", "--index", str(idx), str(query), "--top-k", "15", "--verify"]
    assert cli_main(args) == 0
    res = _results(capsys.readouterr().out)
    inliers = {Path(r[3]).name: r[2] for r in res}
    assert len(inliers) == 15
    assert all(inliers[p.name] == 0 for p in others), inliers
    assert sum(inliers[p.name] >= 10 for p in sacre) >= 8, inliers  # type: ignore[operator]
