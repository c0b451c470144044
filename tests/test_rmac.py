"""Tests of retrieval.rmac: the R-MAC grid, exact/approximate max-pooling, AML, QE, the stage."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.regions import rmac_grid
from retrieval.rmac import (
    Whitening,
    aggregate_rmac,
    aml_localize,
    aml_localize_loop,
    aml_rerank,
    aml_windows,
    approx_max,
    integral_images,
    learn_whitening,
    map_descriptors,
    query_expansion,
    region_max_pool,
    region_max_pool_loop,
    resolve_conf,
    rmac_regions,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ----------------------------------------------------------------------------- region grid
def _paper_counts(width: int, height: int, levels: int) -> list[int]:
    """Regions per level as Tolias et al. describe them, derived independently of the code.

    Level l has l x (l + m - 1) square regions of side 2 min(W, H) / (l + 1); m (2..7, along the
    long side) is chosen so that consecutive level-1 regions overlap as close to 40% as possible;
    a square image has m = 1.
    """
    w, long = min(width, height), max(width, height)
    if long == w:
        m = 1
    else:
        best = None
        for cand in range(2, 8):
            step = (long - w) / (cand - 1)
            ovl = (w - step) / w
            if best is None or abs(ovl - 0.4) < best[0]:
                best = (abs(ovl - 0.4), cand)
        assert best is not None
        m = best[1]
    return [lev * (lev + m - 1) for lev in range(1, levels + 1)]


class TestRegionGrid:
    @pytest.mark.parametrize(
        ("width", "height", "expected"),
        [
            (600, 600, [1, 4, 9]),  # square: l x l
            (1024, 768, [2, 6, 12]),  # 4:3, m = 2
            (768, 1024, [2, 6, 12]),  # portrait 3:4
            (800, 400, [3, 8, 15]),  # 2:1, m = 3
            (1000, 250, [6, 14, 24]),  # 4:1 panorama: m = 6 gives exactly 40% overlap
        ],
    )
    def test_counts_per_level(self, width: int, height: int, expected: list[int]) -> None:
        assert _paper_counts(width, height, 3) == expected
        g = rmac_grid(width, height, 3)
        w = min(width, height)
        sides = [math.floor(2 * w / (lev + 1)) for lev in (1, 2, 3)]
        counts = [int(np.sum(g[:, 2] == s)) for s in sides]
        assert counts == expected
        assert len(g) == sum(expected)
        # square regions inside the image, the first at the origin, the last at the far corner
        assert np.all(g[:, 2] == g[:, 3])
        for s in sides:
            lev = g[g[:, 2] == s]
            assert lev[:, 0].min() == 0 and lev[:, 1].min() == 0
            assert (lev[:, 0] + s).max() == width and (lev[:, 1] + s).max() == height

    def test_extra_positions_follow_the_long_side(self) -> None:
        land = rmac_grid(1024, 768, 1)
        port = rmac_grid(768, 1024, 1)
        assert len(np.unique(land[:, 0])) == 2 and len(np.unique(land[:, 1])) == 1
        assert len(np.unique(port[:, 1])) == 2 and len(np.unique(port[:, 0])) == 1

    def test_rmac_regions_on_map_cells(self) -> None:
        # a 32 x 24 map (1024 x 768 image at stride 32) gives the same counts as the image
        r = rmac_regions(32, 24, 3)
        assert len(r) == 20
        assert r[:, 2].max() <= 32 and r[:, 3].max() <= 24
        assert np.all(r[:, 2] > r[:, 0]) and np.all(r[:, 3] > r[:, 1])

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="levels"):
            resolve_conf("tiny-rmac", levels=0)
        with pytest.raises(ValueError, match="unknown R-MAC preset"):
            resolve_conf("nope")
        with pytest.raises(ValueError, match="method"):
            resolve_conf("tiny-rmac", method="asmk")


# ----------------------------------------------------------------------------- pooling
def _random_boxes(rng: np.random.Generator, n: int, g: int, h: int, w: int) -> tuple:
    x0 = rng.integers(0, w, n)
    y0 = rng.integers(0, h, n)
    x1 = x0 + 1 + (rng.integers(0, 1 << 20, n) % (w - x0))
    y1 = y0 + 1 + (rng.integers(0, 1 << 20, n) % (h - y0))
    return rng.integers(0, g, n), np.stack([x0, y0, x1, y1], 1)


class TestRegionMaxPool:
    @pytest.mark.parametrize(("g", "h", "w", "c"), [(1, 7, 9, 5), (3, 12, 17, 16), (2, 1, 33, 4)])
    def test_matches_loop_reference(self, g: int, h: int, w: int, c: int) -> None:
        rng = np.random.default_rng(h * w)
        maps = rng.normal(size=(g, h, w, c)).astype(np.float32)
        img, boxes = _random_boxes(rng, 200, g, h, w)
        np.testing.assert_array_equal(
            region_max_pool(maps, img, boxes), region_max_pool_loop(maps, img, boxes)
        )

    def test_mac_and_regional_vectors(self) -> None:
        rng = np.random.default_rng(1)
        fmap = np.maximum(rng.normal(size=(24, 32, 8)), 0).astype(np.float32)
        mac, reg = map_descriptors(fmap, 3)
        exact = fmap.max(axis=(0, 1))
        np.testing.assert_allclose(mac, exact / np.linalg.norm(exact), rtol=1e-6)
        assert reg.shape == (20, 8)
        x0, y0, x1, y1 = rmac_regions(32, 24, 3)[5]
        v = fmap[y0:y1, x0:x1].max(axis=(0, 1))
        np.testing.assert_allclose(reg[5], v / np.linalg.norm(v), rtol=1e-6)

    def test_exception(self) -> None:
        maps = np.zeros((1, 4, 4, 2), np.float32)
        with pytest.raises(ValueError, match="empty or outside"):
            region_max_pool(maps, np.array([0]), np.array([[2, 0, 2, 3]]))
        with pytest.raises(ValueError, match="empty or outside"):
            region_max_pool(maps, np.array([0]), np.array([[0, 0, 5, 3]]))


# ----------------------------------------------------------------------------- AML
class TestApproxMax:
    @pytest.mark.parametrize("kind", ["relu_gauss", "uniform", "exponential"])
    def test_cosine_with_exact_max(self, kind: str) -> None:
        rng = np.random.default_rng(7)
        shape = (4, 15, 20, 256)
        if kind == "relu_gauss":
            maps = np.maximum(rng.normal(size=shape), 0)
        elif kind == "uniform":
            maps = rng.random(shape)
        else:
            maps = rng.exponential(size=shape)
        img, boxes = _random_boxes(rng, 300, 4, 15, 20)
        ii, scale = integral_images(maps, 10.0)
        approx = approx_max(ii, scale, img, boxes, 10.0)
        exact = region_max_pool_loop(maps, img, boxes)
        cos = (
            (approx * exact).sum(1) / np.linalg.norm(approx, axis=1) / np.linalg.norm(exact, axis=1)
        )
        assert cos.min() > 0.99, cos.min()
        # the generalised mean is bounded by max <= approx <= n^(1/alpha) max; values far below
        # the channel's image maximum (< ~5%) drown in the integral image's rounding
        n = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
        assert np.all(approx >= exact - 0.05 * scale[img])
        big = exact > 0.1 * scale[img]
        assert np.all(approx[big] >= exact[big] * (1 - 1e-3))
        assert np.all(approx <= exact * n**0.1 + 0.05 * scale[img])
        # and alpha matters: plain sum pooling (alpha = 1) is much further from the max
        ii1, sc1 = integral_images(maps, 1.0)
        a1 = approx_max(ii1, sc1, img, boxes, 1.0)
        cos1 = (a1 * exact).sum(1) / np.linalg.norm(a1, axis=1) / np.linalg.norm(exact, axis=1)
        assert cos1.mean() < cos.mean()

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="non-negative"):
            integral_images(-np.ones((1, 2, 2, 1)), 10.0)


class TestAMLLocalize:
    def test_windows_follow_the_grid_and_ratio(self) -> None:
        win = aml_windows(12, 16, 3, 0.75, 1.1)
        h = win[:, 3] - win[:, 1]
        w = win[:, 2] - win[:, 0]
        assert len(win) > 0
        assert np.all(win[:, 0] % 3 == 0) and np.all(win[:, 1] % 3 == 0)
        assert np.all((h - 2) % 3 == 0) and np.all((w - 2) % 3 == 0)
        assert np.all(np.abs(np.log(0.75 / (h / w))) <= np.log(1.1) + 1e-9)
        assert win[:, 2].max() <= 16 and win[:, 3].max() <= 12
        unfiltered = aml_windows(12, 16, 3, None, 1.1)
        # tops 0, 3, 6, ... and sizes 2, 5, 8, ... that fit: 10 row spans x 15 column spans

        def pairs(n: int) -> int:
            return sum(1 for t in range(0, n - 1, 3) for e in range(2, n + 1, 3) if t + e <= n)

        assert len(unfiltered) == pairs(12) * pairs(16) == 150

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_matches_loop_reference(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        maps = np.maximum(rng.normal(size=(3, 10 + seed, 13, 24)), 0)
        q = rng.random(24)
        qratio = [None, 0.7, 1.0, 1.4][seed]
        boxes, scores = aml_localize(maps, q, qratio=qratio)
        for g in range(3):
            b, s = aml_localize_loop(maps[g], q, qratio=qratio)
            np.testing.assert_array_equal(boxes[g], b)
            assert scores[g] == pytest.approx(s, abs=1e-9)

    def test_finds_a_planted_object(self) -> None:
        # The query's activations (channels 0-31) are pasted into maps whose background fires on
        # other channels (32-63); AML should find the pasted rectangle.
        rng = np.random.default_rng(3)
        truth = [(3, 4, 12, 10), (10, 2, 19, 8), (0, 9, 9, 15), (14, 11, 23, 17)]
        maps = np.zeros((4, 18, 24, 64))
        maps[..., 32:] = np.maximum(rng.normal(size=(4, 18, 24, 32)), 0)
        obj = np.maximum(rng.normal(size=(6, 9, 32)), 0) + 0.1
        query_mac = obj.max(axis=(0, 1))
        query = np.concatenate([query_mac, np.zeros(32)])
        for g, (x0, y0, x1, y1) in enumerate(truth):
            maps[g, y0:y1, x0:x1] = np.concatenate([obj, np.zeros((6, 9, 32))], axis=2)
        boxes, scores = aml_localize(maps, query, qratio=6 / 9)
        for b, t in zip(boxes, truth, strict=True):
            iw = max(0, min(b[2], t[2]) - max(b[0], t[0]))
            ih = max(0, min(b[3], t[3]) - max(b[1], t[1]))
            union = (b[2] - b[0]) * (b[3] - b[1]) + (t[2] - t[0]) * (t[3] - t[1]) - iw * ih
            assert iw * ih / union > 0.7, (b, t)
        assert np.all(scores > 0.95)
        ii, sc = integral_images(maps, 10.0)
        whole = approx_max(ii, sc, np.arange(4), np.tile([[0, 0, 24, 18]], (4, 1)), 10.0)
        whole_cos = (whole @ query) / np.linalg.norm(whole, axis=1) / np.linalg.norm(query)
        assert np.all(scores > whole_cos + 0.2)


class TestRerankAndQE:
    def test_window_vectors_are_rmac_of_the_crop(self) -> None:
        rng = np.random.default_rng(4)
        c = 16
        maps = [np.maximum(rng.normal(size=(9, 12, c)), 0).astype(np.float32) for _ in range(5)]
        maps.append(np.maximum(rng.normal(size=(12, 9, c)), 0).astype(np.float32))
        wh = learn_whitening(rng.normal(size=(300, c)))
        q_rmac = rng.normal(size=c).astype(np.float32)
        q_rmac /= np.linalg.norm(q_rmac)
        ids, scores, vecs, boxes = aml_rerank(
            q_rmac, rng.random(c), 1.0, np.arange(10, 16), maps, wh, levels=2
        )
        assert sorted(ids.tolist()) == list(range(10, 16))
        assert np.all(np.diff(scores) <= 0)
        for i, b in zip(ids - 10, boxes, strict=True):
            crop = maps[i][b[1] : b[3], b[0] : b[2]]
            _, reg = map_descriptors(crop, 2)
            ref = aggregate_rmac(reg, [len(reg)], wh)[0]
            np.testing.assert_allclose(vecs[list(ids - 10).index(i)], ref, atol=1e-5)
        np.testing.assert_allclose(scores, vecs @ q_rmac, atol=1e-6)

    def test_query_expansion_is_the_mean(self) -> None:
        rng = np.random.default_rng(5)
        q, top, cand = rng.normal(size=8), rng.normal(size=(7, 8)), rng.normal(size=(20, 8))
        ref = cand @ ((q + top[:5].sum(0)) / 6)
        np.testing.assert_allclose(query_expansion(q, top, cand, 5), ref)
        np.testing.assert_allclose(query_expansion(q, top, cand, 0), cand @ q)


# ----------------------------------------------------------------------------- whitening
class TestWhitening:
    def test_whitens_and_round_trips(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(6)
        mix = rng.normal(size=(10, 10))
        x = rng.normal(size=(4000, 10)) @ mix + 3.0
        wh = learn_whitening(x, dim=6)
        y = (x - wh.mean) @ wh.proj.T
        np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(6), atol=1e-3)
        path = wh.save(tmp_path / "w.npz")
        back = Whitening.load(path)
        np.testing.assert_array_equal(back.proj, wh.proj)
        assert back.meta["dim"] == 6 and back.meta["n_train"] == 4000

    def test_aggregate_matches_loop(self) -> None:
        rng = np.random.default_rng(8)
        reg = rng.normal(size=(12, 6)).astype(np.float32)
        reg /= np.linalg.norm(reg, axis=1, keepdims=True)
        wh = learn_whitening(rng.normal(size=(100, 6)))
        counts = [3, 5, 4]
        got = aggregate_rmac(reg, counts, wh)
        s = 0
        for i, n in enumerate(counts):
            v = (reg[s : s + n] - wh.mean) @ wh.proj.T
            v = (v / np.linalg.norm(v, axis=1, keepdims=True)).sum(0)
            np.testing.assert_allclose(got[i], v / np.linalg.norm(v), atol=1e-6)
            s += n

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="N >= 2"):
            learn_whitening(np.zeros((1, 4)))
        bad = tmp_path / "bad.npz"
        np.savez(
            bad,
            format_version=np.int64(99),
            kind=np.str_("pca_whitening"),
            mean=np.zeros(2),
            proj=np.zeros((2, 2)),
            eigvals=np.ones(2),
        )
        with pytest.raises(ValueError, match="format_version 99"):
            Whitening.load(bad)
        with pytest.raises(ValueError, match="do not split"):
            aggregate_rmac(np.zeros((3, 2)), [1, 1], None)


# ----------------------------------------------------------------------------- backbones
class TestBackbone:
    @pytest.mark.slow  # the first test to import TensorFlow (~6-20 s here)
    def test_tiny_and_weights_file(self, tmp_path: Path) -> None:
        from retrieval.rmac import build_backbone

        bb = build_backbone("tiny", None, seed=0)
        img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
        out = bb(img)
        assert out.shape == (1, 8, 12, 64) and out.min() >= 0
        path = tmp_path / "tiny.weights.h5"
        bb.model.save_weights(str(path))
        again = build_backbone("tiny", str(path), seed=123)
        np.testing.assert_allclose(again(img), out, rtol=1e-5, atol=1e-6)
        other = build_backbone("tiny", None, seed=1)
        assert not np.allclose(other(img), out)
        with pytest.raises(FileNotFoundError):
            build_backbone("tiny", str(tmp_path / "missing.weights.h5"))
        with pytest.raises(ValueError, match="no ImageNet weights"):
            build_backbone("tiny", "imagenet")

    @pytest.mark.slow
    @pytest.mark.parametrize(
        ("name", "cells", "channels"), [("resnet50", 2, 2048), ("vgg16", 4, 512)]
    )
    def test_keras_backbones_random_weights(self, name: str, cells: int, channels: int) -> None:
        from retrieval.rmac import build_backbone

        bb = build_backbone(name, None)
        img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
        out = bb(img)
        assert out.shape == (1, cells, cells * 3 // 2, channels) and out.min() >= 0
        mac, reg = map_descriptors(out[0], 3)
        assert reg.shape[1] == channels and np.isclose(np.linalg.norm(mac), 1.0)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.mark.slow
class TestRunRmac:
    def test_methods_on_the_synthetic_world(self, world: Path, tmp_path: Path) -> None:
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.evaluation.evaluate import evaluate_protocols
        from retrieval.rmac import run_rmac

        ds = RevisitedDataset.load(world / "retrieval")
        results = {}
        for method in ("rmac", "rmac+aml+qe"):
            conf = resolve_conf("tiny-rmac", method=method, max_side=160)
            res = run_rmac(
                world / "retrieval", tmp_path, conf, whitening_images=world / "train" / "images"
            )
            ranks = np.load(res.ranks)
            assert ranks.shape == (ds.n_db, ds.n_queries)
            assert np.all(np.sort(ranks, axis=0) == np.arange(ds.n_db)[:, None])
            meta = json.loads(res.metrics_path.read_text())
            assert meta["format_version"] == 1 and meta["method"] == method
            ev = evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)
            assert meta["metrics"]["medium"]["mAP"] == pytest.approx(ev["medium"].map)
            assert (res.folder / "config.yaml").exists()
            results[method] = res
        assert results["rmac+aml+qe"].timings["aml_s_per_query"] > 0
        assert results["rmac+aml+qe"].folder != results["rmac"].folder
        # a rerun is skipped: nothing is rewritten
        mtime = results["rmac"].ranks.stat().st_mtime_ns
        again = run_rmac(
            world / "retrieval",
            tmp_path,
            resolve_conf("tiny-rmac", method="rmac", max_side=160),
            whitening_images=world / "train" / "images",
        )
        assert again.ranks.stat().st_mtime_ns == mtime
        assert again.results["medium"].map == pytest.approx(results["rmac"].results["medium"].map)

    def test_learned_rmac_method(self, world: Path, tmp_path: Path) -> None:
        import copy

        from retrieval.rmac import learned as learned_rmac
        from retrieval.rmac import run_rmac

        conf = copy.deepcopy(learned_rmac.confs["tiny-cpu"])
        conf.update(steps=2, max_side=128)
        model = learned_rmac.main(conf, world / "train" / "train.csv", tmp_path / "models")
        res = run_rmac(
            world / "retrieval",
            tmp_path,
            resolve_conf("tiny-rmac", method="learned-rmac", model=str(model)),
        )
        ranks = np.load(res.ranks)
        assert ranks.shape[1] == len(
            json.loads((world / "retrieval" / "gnd_synth.json").read_text())["qimlist"]
        )
        assert 0.0 <= res.results["medium"].map <= 1.0
        with pytest.raises(ValueError, match="needs conf"):
            run_rmac(
                world / "retrieval", tmp_path, resolve_conf("tiny-rmac", method="learned-rmac")
            )

    def test_cli(self, world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        from gldboxes.cli.main import main

        rc = main(
            [
                "-q",
                "retrieval",
                "rmac",
                "--dataset",
                str(world / "retrieval"),
                "--out",
                str(tmp_path),
                "--method",
                "mac",
                "--preset",
                "tiny-rmac",
                "--max-side",
                "128",
                "--json",
            ]
        )
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out["mAP"]) == {"easy", "medium", "hard"}
        assert Path(out["ranks"]).exists()
        rc = main(
            [
                "-q",
                "retrieval",
                "rmac",
                "--dataset",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path),
                "--method",
                "rmac",
            ]
        )
        assert rc == 2


def _h5_content(path: Path) -> dict[str, object]:
    """Every attribute and array of an HDF5 file, by name (file bytes may differ)."""
    import h5py

    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        out.update({f"@{k}": str(v) for k, v in f.attrs.items()})

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()].tobytes()
            for k, v in getattr(obj, "attrs", {}).items():
                out[f"{name}@{k}"] = np.asarray(v).tobytes()

        f.visititems(visit)
    return out


@pytest.mark.slow
class TestRmacStages:
    def test_until_and_files_between_stages(self, world: Path, tmp_path: Path) -> None:
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.rmac import run_rmac
        from retrieval.rmac.stage import STAGES

        assert [n for n, _ in STAGES] == [
            "features",
            "whitening",
            "describe",
            "search",
            "aml",
            "evaluate",
        ]
        ds = RevisitedDataset.load(world / "retrieval")
        conf = resolve_conf("tiny-rmac", method="rmac+aml", max_side=128, aml={"rerank": 6})
        kw: dict[str, Any] = {"whitening_images": world / "train" / "images"}
        first = run_rmac(world / "retrieval", tmp_path, conf, until="search", **kw)
        assert first.folder is not None and first.ranks == first.folder / "search" / "ranks.npy"
        assert first.metrics_path is None and not (first.folder / "metrics.json").exists()
        assert not (first.folder / "ranks.npy").exists()
        # the search stage's ranking is the descriptors' cosine order
        assert first.descriptors is not None
        db = np.load(first.descriptors / "db.npy")
        q = np.load(first.descriptors / "query.npy")
        assert db.shape[0] == ds.n_db and q.shape[0] == ds.n_queries
        s0 = np.load(first.ranks)
        want = np.argsort(-(q @ db.T), axis=1, kind="stable").T
        np.testing.assert_array_equal(s0, want)
        # the per-image extraction ran on the (serial) executor and its shards were merged away
        assert set(first.features) == {"db", "query"}
        assert not list(first.features["db"].parent.glob("*.shards"))
        # resume: the remaining stages, AML re-ranks only the top 6 of the same ranking
        res = run_rmac(world / "retrieval", tmp_path, conf, **kw)
        assert res.ranks == res.folder / "ranks.npy"
        ranks = np.load(res.ranks)
        np.testing.assert_array_equal(ranks[6:], s0[6:])
        np.testing.assert_array_equal(np.sort(ranks[:6], axis=0), np.sort(s0[:6], axis=0))
        assert not np.array_equal(ranks[:6], s0[:6])
        assert res.timings["aml_rerank_n"] == 6.0
        with pytest.raises(ValueError, match="until"):
            run_rmac(world / "retrieval", tmp_path, conf, until="index", **kw)

    def test_sharded_extraction_equals_one_process(self, world: Path, tmp_path: Path) -> None:
        from gldboxes.executor import SerialExecutor
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.features.images import ImageItem
        from retrieval.rmac import extract

        ds = RevisitedDataset.load(world / "retrieval")
        items = [ImageItem(n, ds.image_path(n)) for n in ds.imlist[:7]]
        conf = resolve_conf("tiny-rmac", max_side=96)
        one = extract(conf, items, tmp_path / "one.h5", keep_maps=True)
        sharded = extract(
            conf,
            items,
            tmp_path / "sharded.h5",
            keep_maps=True,
            executor=SerialExecutor(progress=False),
            shard_size=3,
        )
        a, b = _h5_content(one), _h5_content(sharded)
        assert a == b
        assert sum(k.endswith("/maps") for k in a) == 7
        assert not (tmp_path / "sharded.shards").exists()


@pytest.mark.slow
@pytest.mark.server
def test_serial_and_ray_give_the_same_ranks(world: Path, tmp_path: Path) -> None:
    import ray  # the `ray` extra: a missing install fails, never skips

    from gldboxes.cli.main import main

    assert ray.__version__
    ranks: dict[str, object] = {}
    for engine in ("serial", "ray"):
        out = tmp_path / engine
        argv = ["-q", "retrieval", "rmac", "--dataset", str(world / "retrieval")]
        argv += ["--out", str(out), "--method", "rmac+aml", "--preset", "tiny-rmac"]
        argv += ["--max-side", "96", "--rerank", "5", "--shard-size", "4", "--json"]
        argv += ["--whitening-images", str(world / "train" / "images"), "--engine", engine]
        argv += ["--num-cpus", "2"] if engine == "ray" else []
        assert main(argv) == 0
        res = next((out / "rmac" / "results").iterdir())
        ranks[engine] = (res / "ranks.npy").read_bytes()
        feats = next((out / "rmac" / "features").iterdir())
        ranks[f"{engine}-db"] = _h5_content(feats / "synth-db.h5")
    assert ranks["serial"] == ranks["ray"]
    assert ranks["serial-db"] == ranks["ray-db"]
