"""An index of own photos that grows: adds as new parts, tombstones, compaction, resumability.

The contract (retrieval.runner.photos): after any adds and removals, and after compaction, the
scores
and rankings equal those of a fresh index of the final photos, exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import features as features_stage
from retrieval.index.aggregation import AggregatedBatch
from retrieval.index.inverted_file import InvertedFile
from retrieval.runner import driver, photos
from retrieval.runner.conf import resolve_conf


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def codebook(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cb")
    conf = resolve_conf(codebook={"size": 64, "niter": 5})
    h5, name = driver.extract_folder(conf, world / "train" / "images", out)
    return driver.build_codebook(conf, h5, name, out)


def _db_photos(world: Path) -> list[Path]:
    return sorted(p for p in (world / "retrieval" / "jpg").iterdir() if "query" not in p.name)


def _copy(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)


def _ranking(idx: photos.PhotoIndex, queries: list[Path]) -> tuple[list[list[str]], np.ndarray]:
    ids, scores, _ = idx.rank(queries)
    return [[Path(idx.path(int(i))).name for i in row] for row in ids], scores


def fresh_id(idx: photos.PhotoIndex, photo: Path) -> int:
    return next(im["id"] for im in idx.header["images"] if Path(im["path"]).name == photo.name)


# ------------------------------------------------------------------------------ select_images
def _batch(rng: np.random.Generator, n: int, k: int, dim: int, binary: bool) -> AggregatedBatch:
    counts = rng.integers(0, 6, n)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    words = np.concatenate(
        [np.sort(rng.choice(k, c, replace=False)) for c in counts] or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    if binary:
        data = rng.integers(0, 256, (words.size, dim // 8), dtype=np.uint8)
    else:
        data = rng.standard_normal((words.size, dim)).astype(np.float32)
    return AggregatedBatch(offsets, words, data, dim)


def _subset(b: AggregatedBatch, rows: np.ndarray) -> AggregatedBatch:
    spans = [np.arange(b.offsets[i], b.offsets[i + 1]) for i in rows]
    idx = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    counts = np.diff(b.offsets)[rows]
    return AggregatedBatch(
        np.r_[0, np.cumsum(counts)].astype(np.int64), b.words[idx], b.data[idx], b.dim
    )


class TestSelectImages:
    @pytest.mark.parametrize("kernel", ["asmk_star", "asmk"])
    def test_equals_build_on_the_kept_images(self, kernel: str) -> None:
        rng = np.random.default_rng(0)
        b = _batch(rng, 40, 16, 16, kernel == "asmk_star")
        keep = rng.random(40) < 0.6
        full = InvertedFile.build(b, 16, kernel).select_images(keep)
        ref = InvertedFile.build(_subset(b, np.flatnonzero(keep)), 16, kernel)
        for a in ("offsets", "image_ids", "data", "words_per_image"):
            assert np.array_equal(getattr(full, a), getattr(ref, a)), a
        q = _batch(rng, 3, 16, 16, kernel == "asmk_star")
        assert np.array_equal(full.scores(q), ref.scores(q))

    def test_regional_items_follow_their_image(self) -> None:
        rng = np.random.default_rng(1)
        owner = np.repeat(np.arange(12), rng.integers(1, 4, 12))
        b = _batch(rng, owner.size, 16, 16, True)
        keep = np.zeros(12, bool)
        keep[[0, 3, 4, 9, 11]] = True
        ivf = InvertedFile.build(b, 16, "asmk_star", item_image=owner, pooling="max")
        got = ivf.select_images(keep)
        rows = np.flatnonzero(keep[owner])
        new_owner = (np.cumsum(keep) - 1)[owner[rows]]
        ref = InvertedFile.build(
            _subset(b, rows), 16, "asmk_star", item_image=new_owner, pooling="max"
        )
        assert got.n_images == 5 and got.n_items == rows.size
        assert np.array_equal(got.item_image, ref.item_image)
        q = _batch(rng, 2, 16, 16, True)
        assert np.array_equal(got.scores(q), ref.scores(q))
        assert np.array_equal(got.scores(q), ivf.scores(q)[:, keep])

    def test_exception(self) -> None:
        b = _batch(np.random.default_rng(2), 5, 8, 16, True)
        with pytest.raises(ValueError, match="keep must be bool"):
            InvertedFile.build(b, 8, "asmk_star").select_images(np.ones(4, bool))


# ------------------------------------------------------------------------------ growing index
REGIONAL = {"regions": "gt", "regional_search": "max"}


@pytest.mark.slow
class TestGrowingIndex:
    @pytest.mark.parametrize("extra", [{}, REGIONAL], ids=["asmk_star", "d2r_max"])
    def test_add_remove_compact_equal_a_fresh_build(
        self, world: Path, codebook: Path, tmp_path: Path, extra: dict[str, Any]
    ) -> None:
        files = _db_photos(world)
        conf = dict(extra)
        if extra:  # the world's boxes, and the same boxes for the copy made below
            text = (world / "retrieval" / "boxes_gt.csv").read_text()
            stem = files[25].stem
            copy = [
                ln.replace(stem, "aa_copy", 1) for ln in text.splitlines() if ln.startswith(stem)
            ]
            assert copy
            (tmp_path / "boxes.csv").write_text(text + "\n".join(copy) + "\n")
            conf["region_boxes"] = str(tmp_path / "boxes.csv")
        folder, idx_dir = tmp_path / "photos", tmp_path / "idx"
        # the later photos first: ids (add order) differ from a fresh build's (name order)
        _copy(files[20:], folder)
        photos.main(conf, folder, idx_dir, codebook=codebook)
        _copy(files[:20], folder)  # new photos: a second run adds them as a new part
        # and a copy of an indexed photo: its scores tie with it, ranked by name, not by id
        shutil.copyfile(files[25], folder / "aa_copy.jpg")
        photos.main(conf, folder, idx_dir)
        h = photos.PhotoIndex.load(idx_dir).header
        n = len(files)
        assert [p["n_images"] for p in h["parts"]] == [n - 20, 21]
        assert [h["images"][i]["path"] for i in (n - 20, n - 19)] == [
            str((folder / name).resolve()) for name in ("aa_copy.jpg", files[0].name)
        ]
        gone = [files[22], files[5], files[40]]  # ids 2, n - 14, 20
        removed = photos.remove(idx_dir, [str(folder / gone[0].name), str(n - 14)])
        removed += photos.remove(idx_dir, [str(folder / gone[2].name)])
        assert removed == [2, n - 14, 20]
        assert photos.remove(idx_dir, [str(folder / gone[0].name), "2"]) == []  # a no-op
        photos.main(conf, folder, idx_dir)  # removed photos stay out of a rerun
        assert len(photos.PhotoIndex.load(idx_dir).header["parts"]) == 2
        with pytest.raises(ValueError, match="no such photo"):
            photos.remove(idx_dir, [str(folder / "never-indexed.jpg")])

        final = [f for f in files if f not in gone]
        _copy(final, tmp_path / "fresh")
        shutil.copyfile(files[25], tmp_path / "fresh" / "aa_copy.jpg")
        photos.main(conf, tmp_path / "fresh", tmp_path / "fresh-idx", codebook=codebook)
        fresh = photos.PhotoIndex.load(tmp_path / "fresh-idx")
        queries = [*sorted((world / "retrieval" / "jpg").glob("*query*"))[:4], gone[1]]
        want_names, want_scores = _ranking(fresh, queries)
        assert fresh.n_photos == len(final) + 1 == len(want_names[0])

        grown = photos.PhotoIndex.load(idx_dir)
        names, scores = _ranking(grown, queries)
        assert names == want_names
        assert np.array_equal(scores, want_scores)  # bit for bit
        assert not {g.name for g in gone} & {n for row in names for n in row}
        # the copy ties with its photo and comes first (by name; its id is higher here)
        for row, sc in zip(names, scores, strict=True):
            i = row.index("aa_copy.jpg")
            assert row[i + 1] == files[25].name and sc[i] == sc[i + 1]
        assert want_scores[0, 0] > 0.02 and names[0][0].startswith(queries[0].name[:5])

        photos.compact(idx_dir)
        small = photos.PhotoIndex.load(idx_dir)
        assert len(small.header["parts"]) == 1 and small.header["tombstones"] == []
        assert sorted(p.name for p in (idx_dir / "parts").iterdir()) == (
            ["part-00002", "part-00002.regions.csv"] if extra else ["part-00002"]
        )
        names, scores = _ranking(small, queries)
        assert names == want_names and np.array_equal(scores, want_scores)
        # ids renumbered in add order, tombstones dropped
        assert [Path(small.path(i)).name for i in range(3)] == [files[j].name for j in (20, 21, 23)]
        if extra:
            a = InvertedFile.load(idx_dir / "parts" / "part-00002")
            assert a.n_items > a.n_images  # regions indexed as their own items
            assert small.regions_of([2]) == fresh.regions_of([fresh_id(fresh, files[23])])
            # the report draws each result's regions but region 0 (the whole photo)
            from retrieval.runner.report import write_report

            res = small.query(queries[:1], 3)
            html = write_report(res, tmp_path / "report").read_text()
            n_regions = sum(len(r) - 1 for r in res[0].regions)
            assert n_regions > 0 and html.count('<rect class="region"') == n_regions

    def test_killed_run_extracts_only_the_rest(
        self, world: Path, codebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        files = _db_photos(world)[:40]
        _copy(files, tmp_path / "photos")
        real = features_stage.extract_image
        calls: list[str] = []

        def killed_after_35(extractor: Any, item: Any, conf: Any) -> Any:
            if len(calls) == 35:
                raise KeyboardInterrupt  # a Ctrl-C in the middle of the extraction
            calls.append(item.name)
            return real(extractor, item, conf)

        monkeypatch.setattr(features_stage, "extract_image", killed_after_35)
        with pytest.raises(KeyboardInterrupt):
            photos.main({}, tmp_path / "photos", tmp_path / "idx", codebook=codebook)
        assert not (tmp_path / "idx" / photos.HEADER_NAME).exists()
        done = list(calls)
        calls.clear()
        monkeypatch.setattr(
            features_stage, "extract_image", lambda *a: calls.append("") or real(*a)
        )
        photos.main({}, tmp_path / "photos", tmp_path / "idx", codebook=codebook)
        # the images finished before the kill were committed: only the rest is extracted
        assert len(done) == 35 and len(calls) == 40 - 35
        assert photos.PhotoIndex.load(tmp_path / "idx").n_photos == 40
        calls.clear()
        photos.main({}, tmp_path / "photos", tmp_path / "idx")  # nothing new: nothing done
        assert calls == [] and len(photos.PhotoIndex.load(tmp_path / "idx").header["parts"]) == 1

    def test_exception(self, world: Path, codebook: Path, tmp_path: Path) -> None:
        folder = tmp_path / "photos"
        _copy(_db_photos(world)[:3], folder)
        photos.main({}, folder, tmp_path / "idx", codebook=codebook)
        with pytest.raises(ValueError, match="kernel='asmk_star'"):
            photos.main({"kernel": "vlad"}, folder, tmp_path / "idx")
        with pytest.raises(FileNotFoundError, match="photo index not found"):
            photos.PhotoIndex.load(tmp_path / "nothing")
        with pytest.raises(ValueError, match="no images"):
            (tmp_path / "empty").mkdir()
            photos.main({}, tmp_path / "empty", tmp_path / "idx2", codebook=codebook)
