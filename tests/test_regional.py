"""Detect-to-Retrieve: regional kernels against the paper's equations, regional search against
brute force, the runner's regional runs and the ablation command on the tiny synthetic world."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from gldboxes.boxes import Box
from gldboxes.executor import read_done
from retrieval.index.aggregation import (
    KERNEL_SIMILARITY,
    QUERY_KERNEL,
    REGIONAL_KERNELS,
    AggregatedBatch,
    AggregatedImage,
    aggregate,
    aggregate_many,
    similarity,
)
from retrieval.index.inverted_file import (
    FORMAT_VERSION_REGIONAL,
    FORMAT_VERSION_REGIONAL_FLOOR,
    REGION_NORM_FLOOR,
    InvertedFile,
)

# --------------------------------------------------------------------------- paper references
# Teichmann et al., CVPR 2019, section 4. X^(r) are the descriptors of region r (r = 0 the whole
# image), X_c^(r) those assigned to visual word c, q(x) the nearest word.
#   V(X_c^(r)) = sum_{x in X_c^(r)} (x - q(x))                       residual sum of a word
#   V(X^(r))   = [V(X_1^(r)), ..., V(X_K^(r))]                        VLAD of a region
#   R-VLAD:        V_R(X) = sum_r V(X^(r)) / ||V(X^(r))||, then L2-normalised (eqs. 5-6)
#   R-ASMK:        V_R(X_c) = sum_r V(X_c^(r)) / ||V(X^(r))||, each word L2-normalised (eq. 7)
#   R-ASMK*:       the sign bits of V_R(X_c)                          (eq. 8)
#   Naive-R-ASMK:  sum_r V(X_c^(r)) / ||V(X_c^(r))||, each word L2-normalised; * = sign bits
#   kernel:        K(X, Y) = sum_c sigma_alpha(V(X_c)^T V(Y_c)), no 1/sqrt(|W||W|) (eq. 9)


def _nearest(x: np.ndarray, cb: np.ndarray) -> int:
    return int(np.argmin([float(np.sum((x.astype(np.float64) - c) ** 2)) for c in cb]))


def _word_sums(region: np.ndarray, cb: np.ndarray) -> dict[int, np.ndarray]:
    sums: dict[int, np.ndarray] = {}
    for x in region:
        c = _nearest(x, cb)
        sums[c] = sums.get(c, np.zeros(cb.shape[1])) + (x.astype(np.float64) - cb[c])
    return {c: v for c, v in sums.items() if np.linalg.norm(v) > 1e-6}


def paper_reference(regions: list[np.ndarray], cb: np.ndarray, kernel: str) -> AggregatedImage:
    """A regional kernel straight from the equations above, one loop per descriptor."""
    acc: dict[int, np.ndarray] = {}
    for region in regions:
        sums = _word_sums(region, cb)
        total = math.sqrt(sum(float(v @ v) for v in sums.values()))
        for c, v in sums.items():
            w = v / np.linalg.norm(v) if kernel.startswith("naive") else v / total
            acc[c] = acc.get(c, np.zeros(cb.shape[1])) + w
    acc = {c: v for c, v in acc.items() if np.linalg.norm(v) > 1e-6}
    words = sorted(acc)
    if kernel == "r_vlad":
        total = math.sqrt(sum(float(v @ v) for v in acc.values()))
        rows = [acc[c] / total for c in words]
    else:
        rows = [acc[c] / np.linalg.norm(acc[c]) for c in words]
    if kernel.endswith("_star"):
        bits = [[int(b) for b in r > 0] for r in rows]
        packed = [
            [sum(row[j + t] << (7 - t) for t in range(8)) for j in range(0, len(row), 8)]
            for row in bits
        ]
        data: np.ndarray = np.array(packed, np.uint8).reshape(len(words), cb.shape[1] // 8)
    else:
        data = np.array(rows, np.float32).reshape(len(words), cb.shape[1])
    return AggregatedImage(np.array(words, np.uint32), data)


def paper_kernel(q: AggregatedImage, x: AggregatedImage, alpha: float, tau: float) -> float:
    """eq. 9 without normalisation, word by word (binary: u = 1 - 2 h / D)."""
    if q.n_words == 0 or x.n_words == 0:
        return -1.0
    total = 0.0
    for i, c in enumerate(q.words.tolist()):
        if c not in x.words.tolist():
            continue
        j = x.words.tolist().index(c)
        if q.binary:
            h = int(np.sum(np.unpackbits(q.data[i]) != np.unpackbits(x.data[j])))
            u = 1.0 - 2.0 * h / q.dim
        else:
            u = float(np.dot(q.data[i].astype(np.float64), x.data[j].astype(np.float64)))
        if u > tau:
            total += math.copysign(abs(u) ** alpha, u)
    return total


def _regions(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """An image of n descriptors and overlapping regions of very different sizes (one empty)."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, [x, x[: n // 5], x[n // 3 :], x[n // 2 : n // 2 + 3], x[:0]]


REGIONAL = sorted(REGIONAL_KERNELS)


class TestRegionalKernels:
    @pytest.mark.parametrize("kernel", REGIONAL)
    @pytest.mark.parametrize(("n", "k", "d"), [(40, 6, 8), (90, 12, 16), (150, 24, 32)])
    def test_matches_paper_equations(self, kernel: str, n: int, k: int, d: int) -> None:
        rng = np.random.default_rng(n + k + d)
        cb = rng.standard_normal((k, d)).astype(np.float32)
        x, regions = _regions(rng, n, d)
        got = aggregate(x, cb, kernel, regions=regions)
        ref = paper_reference(regions, cb, kernel)
        np.testing.assert_array_equal(got.words, ref.words)
        if kernel.endswith("_star"):
            np.testing.assert_array_equal(got.data, ref.data)
        else:
            np.testing.assert_allclose(got.data, ref.data, rtol=1e-5, atol=1e-6)
        # the asymmetric kernel of eq. 9: a single-region query against the regional image
        query = aggregate(x[: n // 2] + 0.1, cb, QUERY_KERNEL[kernel])
        params = KERNEL_SIMILARITY[kernel]
        assert params["normalize"] is False
        want = paper_kernel(query, ref, float(params["alpha"]), float(params["tau"]))
        assert similarity(query, got, **params) == pytest.approx(want, rel=1e-6, abs=1e-9)

    @pytest.mark.parametrize("kernel", REGIONAL)
    def test_one_region_equals_single_image_kernel(self, kernel: str) -> None:
        rng = np.random.default_rng(11)
        cb = rng.standard_normal((20, 16)).astype(np.float32)
        x = rng.standard_normal((120, 16)).astype(np.float32)
        single = aggregate(x, cb, QUERY_KERNEL[kernel])
        for regions in (None, [x]):
            reg = aggregate(x, cb, kernel, regions=regions)
            np.testing.assert_array_equal(reg.words, single.words)
            if reg.binary:
                np.testing.assert_array_equal(reg.data, single.data)
            else:
                np.testing.assert_allclose(reg.data, single.data, rtol=1e-5, atol=1e-6)

    def test_naive_differs_from_r_asmk(self) -> None:
        """A word hit by one stray descriptor of a small region weighs fully in Naive-R-ASMK."""
        rng = np.random.default_rng(12)
        cb = rng.standard_normal((8, 16)).astype(np.float32)
        x, regions = _regions(rng, 200, 16)
        naive = aggregate(x, cb, "naive_r_asmk", regions=regions)
        r = aggregate(x, cb, "r_asmk", regions=regions)
        np.testing.assert_array_equal(naive.words, r.words)
        assert np.abs(naive.data - r.data).max() > 1e-2

    def test_batch_equals_single(self) -> None:
        rng = np.random.default_rng(13)
        cb = rng.standard_normal((16, 8)).astype(np.float32)
        imgs = [_regions(rng, n, 8) for n in (30, 5, 60)]
        for kernel in ("naive_r_asmk", "naive_r_asmk_star"):
            batch = aggregate_many([i[0] for i in imgs], cb, kernel, regions=[i[1] for i in imgs])
            for j, (x, regs) in enumerate(imgs):
                one = aggregate(x, cb, kernel, regions=regs)
                np.testing.assert_array_equal(batch.image(j).words, one.words)
                np.testing.assert_array_equal(batch.image(j).data, one.data)


# --------------------------------------------------------------------------- regional search


def _d2r_world(
    seed: int, n_images: int = 12, n_queries: int = 4
) -> tuple[list[list[np.ndarray]], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    d = 32
    cb = rng.standard_normal((24, d)).astype(np.float32)
    base = rng.standard_normal((60, d)).astype(np.float32)
    images = []
    for i in range(n_images):
        x = rng.standard_normal((int(rng.integers(0, 80)), d)).astype(np.float32)
        if i % 3 == 0:  # shares content with the queries
            x = np.concatenate([x, base[: 30 + i] + 0.2 * rng.standard_normal((30 + i, d))])
        x = x.astype(np.float32)
        n = x.shape[0]
        regs = [x] + [x[a:b] for a, b in rng.integers(0, max(n, 1), (int(rng.integers(0, 4)), 2))]
        images.append(regs)
    images[5] = [images[5][0][:0]]  # an image without features
    images[7] = [images[7][0][:0], images[7][0][:0]]  # regions, all empty
    queries = [
        (base[: 40 - 5 * q] + 0.1 * rng.standard_normal((40 - 5 * q, d))).astype(np.float32)
        for q in range(n_queries)
    ]
    queries.append(base[:0])  # a query without features
    return images, queries, cb


def brute_pool(
    images: list[list[np.ndarray]],
    queries: list[np.ndarray],
    cb: np.ndarray,
    pooling: str,
    rho: float = 0.0,
) -> np.ndarray:
    """Eq. 3 (max) / eq. 4 (mean over regions with words) from one similarity per pair.

    Each region's similarity is the unnormalised kernel divided by
    ``sqrt(|W_q| max(|W_region|, rho |W_region 0|))`` (plain ASMK when ``rho = 0``).
    """
    params = {**KERNEL_SIMILARITY["asmk_star"], "normalize": False}
    out = np.zeros((len(queries), len(images)))
    for qi, qx in enumerate(queries):
        qa = aggregate(qx, cb, "asmk_star")
        for i, regs in enumerate(images):
            aggs = [aggregate(r, cb, "asmk_star") for r in regs]
            s = []
            for a in aggs:
                if a.n_words == 0 or qa.n_words == 0:
                    s.append(-1.0)
                    continue
                norm = math.sqrt(qa.n_words * max(a.n_words, rho * aggs[0].n_words))
                s.append(similarity(qa, a, **params) / norm)
            if qa.n_words == 0:
                out[qi, i] = -1.0
            elif pooling == "max":
                out[qi, i] = max(s)
            else:
                ok = [v for v, a in zip(s, aggs, strict=True) if a.n_words]
                out[qi, i] = float(np.mean(ok)) if ok else -1.0
    return out


def _d2r_index(
    images: list[list[np.ndarray]], cb: np.ndarray, pooling: str, rho: float = 0.0
) -> tuple[InvertedFile, AggregatedBatch]:
    flat = [r for regs in images for r in regs]
    owner = np.repeat(np.arange(len(images)), [len(r) for r in images])
    batch = aggregate_many(flat, cb, "asmk_star")
    ivf = InvertedFile.build(
        batch, cb.shape[0], "asmk_star", item_image=owner, pooling=pooling, region_norm_floor=rho
    )
    return ivf, batch


class TestRegionalSearch:
    @pytest.mark.parametrize("pooling", ["max", "avg"])
    def test_matches_bruteforce(self, pooling: str) -> None:
        images, queries, cb = _d2r_world(0)
        ivf, _ = _d2r_index(images, cb, pooling)
        q = aggregate_many(queries, cb, "asmk_star")
        want = brute_pool(images, queries, cb, pooling)
        got = ivf.scores(q)
        assert got.shape == (len(queries), len(images))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert got[:, 5].tolist() == [-1.0] * len(queries)
        assert got[:, 7].tolist() == [-1.0] * len(queries)
        assert got[-1].tolist() == [-1.0] * len(images)
        ids, sc = ivf.search(q, 4)
        order = np.lexsort((np.arange(len(images))[None].repeat(len(queries), 0), -want), axis=1)
        np.testing.assert_array_equal(ids, order[:, :4])
        np.testing.assert_allclose(sc, np.take_along_axis(want, order[:, :4], 1))

    def test_max_pooling_finds_small_region(self) -> None:
        """A landmark in a small region of a cluttered image: max pooling beats the whole image."""
        rng = np.random.default_rng(3)
        d = 32
        cb = rng.standard_normal((64, d)).astype(np.float32)
        land = rng.standard_normal((25, d)).astype(np.float32)
        clutter = rng.standard_normal((400, d)).astype(np.float32)
        x = np.concatenate([clutter, land + 0.05 * rng.standard_normal(land.shape)]).astype(
            np.float32
        )
        images = [[x, x[400:]], [rng.standard_normal((60, d)).astype(np.float32)]]
        q = aggregate_many([land], cb, "asmk_star")
        whole = InvertedFile.build(
            aggregate_many([i[0] for i in images], cb, "asmk_star"), cb.shape[0], "asmk_star"
        ).scores(q)
        reg = _d2r_index(images, cb, "max")[0].scores(q)
        assert reg[0, 0] > whole[0, 0] + 0.2
        assert reg[0, 1] == pytest.approx(whole[0, 1])

    def test_stats_and_files(self, tmp_path: Path) -> None:
        images, queries, cb = _d2r_world(1)
        ivf, batch = _d2r_index(images, cb, "avg")
        st = ivf.stats()
        assert st["images"] == len(images) and st["items"] == batch.n_images
        assert st["items_per_image"] == pytest.approx(batch.n_images / len(images))
        back = InvertedFile.load(ivf.save(tmp_path / "idx"))
        assert back.regional and back.pooling == "avg" and back.n_images == len(images)
        header = json.loads((tmp_path / "idx" / "header.json").read_text())
        assert header["format_version"] == FORMAT_VERSION_REGIONAL  # rho = 0: plain ASMK
        assert header["region_norm_floor"] == 0.0
        q = aggregate_many(queries, cb, "asmk_star")
        np.testing.assert_array_equal(back.scores(q), ivf.scores(q))
        (tmp_path / "idx" / "item_image.npy").unlink()
        with pytest.raises(ValueError, match=r"item_image\.npy is missing"):
            InvertedFile.load(tmp_path / "idx")

    def test_exception(self) -> None:
        images, _, cb = _d2r_world(2)
        flat = [r for regs in images for r in regs]
        batch = aggregate_many(flat, cb, "asmk_star")
        owner = np.repeat(np.arange(len(images)), [len(r) for r in images])
        with pytest.raises(ValueError, match="go together"):
            InvertedFile.build(batch, cb.shape[0], "asmk_star", item_image=owner)
        with pytest.raises(ValueError, match="pooling must be"):
            InvertedFile.build(batch, 24, "asmk_star", item_image=owner, pooling="sum")
        with pytest.raises(ValueError, match="non-decreasing"):
            InvertedFile.build(batch, 24, "asmk_star", item_image=owner[::-1], pooling="max")
        with pytest.raises(ValueError, match="one image per item"):
            InvertedFile.build(batch, 24, "asmk_star", item_image=owner[1:], pooling="max")


def _tiny_regions_world(seed: int) -> tuple[list[list[np.ndarray]], np.ndarray, np.ndarray]:
    """Images with many small random regions (generic proposals) besides the whole image."""
    rng = np.random.default_rng(seed)
    d = 32
    cb = rng.standard_normal((48, d)).astype(np.float32)
    base = rng.standard_normal((50, d)).astype(np.float32)
    images = []
    for i in range(10):
        x = rng.standard_normal((int(rng.integers(40, 200)), d)).astype(np.float32)
        if i % 2 == 0:
            x = np.concatenate([x, base[:20] + 0.2 * rng.standard_normal((20, d))])
        x = x.astype(np.float32)
        n = x.shape[0]
        cuts = [np.sort(rng.integers(0, n, 2)) for _ in range(int(rng.integers(0, 8)))]
        images.append([x] + [x[a : a + max(b - a, 1)] for a, b in cuts])
    images[3] = [images[3][0][:0], images[3][0][:5]]  # whole image (region 0) without words
    q = (base[:30] + 0.1 * rng.standard_normal((30, d))).astype(np.float32)
    return images, cb, q


class TestRegionNormFloor:
    """``score = sum sigma / sqrt(|W_q| max(|W_item|, rho |W_image|))`` for regional items."""

    @pytest.mark.parametrize("rho", [0.0, 0.1, REGION_NORM_FLOOR, 1.0])
    @pytest.mark.parametrize("pooling", ["max", "avg"])
    def test_matches_reference(self, rho: float, pooling: str) -> None:
        images, cb, q = _tiny_regions_world(rho > 0.2)
        queries = [q, q[:7], q[:0]]
        ivf, _ = _d2r_index(images, cb, pooling, rho)
        qb = aggregate_many(queries, cb, "asmk_star")
        want = brute_pool(images, queries, cb, pooling, rho)
        np.testing.assert_allclose(ivf.scores(qb), want, rtol=1e-12, atol=1e-12)
        a, b = ivf.item_scores(qb, backend="numba"), ivf.item_scores(qb, backend="numpy")
        np.testing.assert_array_equal(a, b)  # bit for bit
        if rho == 0.0:  # the floor off is exactly the old scoring
            plain = InvertedFile(
                **{k: getattr(ivf, k) for k in ("offsets", "image_ids", "data", "words_per_image")},
                dim=ivf.dim,
                kernel=ivf.kernel,
                item_image=ivf.item_image,
                pooling=pooling,
            )
            np.testing.assert_array_equal(plain.scores(qb), ivf.scores(qb))

    def test_floor_limits_small_regions(self) -> None:
        """A 3-word region sharing its words with the query beats its image without the floor
        and is scored like a 0.25-of-the-image region with it; the whole image never changes."""
        images, cb, q = _tiny_regions_world(0)
        qb = aggregate_many([q], cb, "asmk_star")
        plain = _d2r_index(images, cb, "max", 0.0)[0]
        floored = _d2r_index(images, cb, "max", REGION_NORM_FLOOR)[0]
        p, f = plain.item_scores(qb), floored.item_scores(qb)
        words = np.asarray(plain.words_per_image, np.float64)
        ii = np.asarray(plain.item_image, np.int64)
        first = np.searchsorted(ii, ii)  # each item's region 0
        whole = first == np.arange(ii.size)
        np.testing.assert_array_equal(p[:, whole], f[:, whole])
        small = words < REGION_NORM_FLOOR * words[first]
        assert small.any()
        has = p > 0
        floor = np.maximum(words, REGION_NORM_FLOOR * words[first])
        ratio = np.sqrt(np.divide(words, floor, out=np.ones_like(words), where=floor > 0))
        np.testing.assert_allclose(f[has], (p * ratio[None, :])[has], rtol=1e-12)
        assert np.all(f[:, small & has[0]] < p[:, small & has[0]])

    def test_default_header_and_old_versions(self, tmp_path: Path) -> None:
        images, cb, q = _tiny_regions_world(1)
        flat = [r for regs in images for r in regs]
        owner = np.repeat(np.arange(len(images)), [len(r) for r in images])
        batch = aggregate_many(flat, cb, "asmk_star")
        ivf = InvertedFile.build(batch, cb.shape[0], "asmk_star", item_image=owner, pooling="max")
        assert ivf.region_norm_floor == REGION_NORM_FLOOR  # the build default
        single = InvertedFile.build(batch, cb.shape[0], "asmk_star")
        assert single.region_norm_floor == 0.0
        back = InvertedFile.load(ivf.save(tmp_path / "idx"))
        header = json.loads((tmp_path / "idx" / "header.json").read_text())
        assert header["format_version"] == FORMAT_VERSION_REGIONAL_FLOOR
        assert header["region_norm_floor"] == REGION_NORM_FLOOR
        assert back.region_norm_floor == REGION_NORM_FLOOR
        qb = aggregate_many([q], cb, "asmk_star")
        np.testing.assert_array_equal(back.scores(qb), ivf.scores(qb))
        # an index written before the floor (version 2, no key) loads with plain ASMK scoring
        header["format_version"] = FORMAT_VERSION_REGIONAL
        del header["region_norm_floor"]
        (tmp_path / "idx" / "header.json").write_text(json.dumps(header))
        old = InvertedFile.load(tmp_path / "idx")
        assert old.region_norm_floor == 0.0
        np.testing.assert_array_equal(
            old.scores(qb), _d2r_index(images, cb, "max", 0.0)[0].scores(qb)
        )

    def test_exception(self) -> None:
        images, cb, _ = _tiny_regions_world(2)
        flat = [r for regs in images for r in regs]
        owner = np.repeat(np.arange(len(images)), [len(r) for r in images])
        batch = aggregate_many(flat, cb, "asmk_star")
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="region_norm_floor"):
                InvertedFile.build(
                    batch, 48, "asmk_star", item_image=owner, pooling="max", region_norm_floor=bad
                )
        ivf = InvertedFile.build(batch, 48, "asmk_star")
        with pytest.raises(ValueError, match="regional search only"):
            InvertedFile(
                **{k: getattr(ivf, k) for k in ("offsets", "image_ids", "data", "words_per_image")},
                dim=ivf.dim,
                kernel=ivf.kernel,
                region_norm_floor=0.5,
            )


# --------------------------------------------------------------------------- engine + CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


CONF = {"codebook": {"size": 128, "niter": 8}}


class TestEngineConf:
    def test_exception(self) -> None:
        from retrieval.runner.conf import resolve_conf

        with pytest.raises(ValueError, match="region_features"):
            resolve_conf(region_features="crop")
        with pytest.raises(ValueError, match="regional_search"):
            resolve_conf(regional_search="sum", regions="gt")
        with pytest.raises(ValueError, match="needs regions"):
            resolve_conf(regional_search="max")
        with pytest.raises(ValueError, match="single-image kernel"):
            resolve_conf(regional_search="max", regions="gt", kernel="r_asmk_star")
        with pytest.raises(ValueError, match="unknown regions preset"):
            resolve_conf(regions="d2r-0.9")
        with pytest.raises(ValueError, match="unknown verification"):
            resolve_conf(verification={"thresh": 3})

    def test_assign_mode_matches_regions_module(self, tmp_path: Path) -> None:
        from retrieval.regions import assign_features_to_regions
        from retrieval.runner.driver import regional_descriptor_lists

        rng = np.random.default_rng(0)
        kp = rng.uniform(0, [200, 100], (50, 2)).astype(np.float32)
        desc = rng.standard_normal((50, 8)).astype(np.float32)
        with h5py.File(tmp_path / "f.h5", "w") as f:
            g = f.create_group("a")
            g["keypoints"], g["descriptors"] = kp, desc
            g.attrs["image_size"] = np.array([200, 100])
        boxes = [Box(0, 0, 1, 1, 1.0), Box(0.1, 0.2, 0.6, 0.5, 0.9)]
        got = regional_descriptor_lists(
            {"region_features": "assign"}, ["a"], tmp_path / "f.h5", {"a": boxes}
        )
        idx = assign_features_to_regions(kp, boxes, 200, 100)
        assert len(got[0]) == 2 and 0 < len(idx[1]) < 50
        for arr, i in zip(got[0], idx, strict=True):
            np.testing.assert_array_equal(arr, desc[i])
        x0, y0, x1, y1 = boxes[1].to_pixels(200, 100)
        inside = (kp[:, 0] >= x0) & (kp[:, 0] < x1) & (kp[:, 1] >= y0) & (kp[:, 1] < y1)
        assert int(inside.sum()) == len(got[0][1])


@pytest.mark.slow
class TestEngineRegional:
    def test_regional_runs(self, world: Path, out_dir: Path) -> None:
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.regions import read_regions_csv
        from retrieval.runner.run import run

        ds = RevisitedDataset.load(world / "retrieval")
        cbi = world / "train" / "images"
        base = run(world / "retrieval", out_dir, {**CONF}, codebook_images=cbi)
        cb = base.codebook
        r = run(
            world / "retrieval",
            out_dir,
            {**CONF, "kernel": "r_asmk_star", "regions": "gt"},
            codebook_path=cb,
        )
        assert r.regions is not None
        regions = read_regions_csv(r.regions)
        n_regions = sum(len(v) for v in regions.values())
        assert n_regions > ds.n_db  # most database images have a landmark box
        assert r.index_stats["items"] == ds.n_db
        assert "r_asmk_star-k128-rootsift-n1000-gt-ra-" in r.index.name
        d2r = run(
            world / "retrieval",
            out_dir,
            {
                **CONF,
                "regions": "gt",
                "regional_search": "max",
                "region_features": "reextract",
                "verification": {"top_n": 20, "max_distance": 0.5},
            },
            codebook_path=cb,
        )
        assert d2r.index_stats["items"] == n_regions
        assert d2r.index.name.startswith("d2r_max-asmk_star-k128-rootsift-n1000-gt-rx-")
        ranks = np.load(d2r.ranks)
        assert ranks.shape == (ds.n_db, ds.n_queries)
        assert sorted(ranks[:, 0].tolist()) == list(range(ds.n_db))
        scores = np.load(d2r.ranks.parent / "scores.npy")
        assert np.all(np.diff(scores, axis=0) <= 0)
        # the re-extracted crops, in shards paired with the images' shards: keys id/region_j,
        # keypoints inside the crop, their time recorded
        assert d2r.regions is not None and d2r.db_features is not None
        crops = d2r.db_features.paths[0].parents[2] / f"synth-db-{d2r.regions.stem}.shards"
        name = next(n for n, b in regions.items() if len(b) > 1)
        n_crops, seen = 0, False
        for shard in sorted(crops.glob("shard-*")):
            n_crops += read_done(shard)["counts"]["images"]
            with h5py.File(shard / "features.h5", "r") as f:
                if f"{name}/region_1" not in f:
                    continue
                seen = True
                g = f[f"{name}/region_1"]
                kp = g["keypoints"][()]
                x0, y0, x1, y1 = g.attrs["bbx"]
                assert kp.shape[0] > 0
                inside = (kp[:, 0] >= x0) & (kp[:, 0] <= x1) & (kp[:, 1] >= y0) & (kp[:, 1] <= y1)
                assert np.all(inside)
        assert seen and n_crops == n_regions - ds.n_db
        assert d2r.seconds["features-regions"] > 0
        # verification: each protocol's head re-ranked, the tail untouched
        v = d2r.verification
        assert v["seconds_per_query"] > 0 and v["pairs"] >= 20 * ds.n_queries
        gv_dir = v["metrics_path"].parent
        for p in ("easy", "medium", "hard"):
            new = np.load(gv_dir / f"ranks_{p}.npy")
            assert new.shape == ranks.shape
            for q in range(ds.n_queries):
                assert sorted(new[:, q].tolist()) == list(range(ds.n_db))
            np.testing.assert_array_equal(new[40:], ranks[40:])
        assert v["results"]["medium"].map >= 0.5
        # every first-stage method is well above chance on this world
        for res in (base, r, d2r):
            assert res.results["medium"].map > 0.5, res.index.name

    def test_verification_reads_deep_enough_for_every_protocol(
        self, world: Path, out_dir: Path, tmp_path: Path
    ) -> None:
        """Easy's head skips junk + hard: with them all ranked first it lies past
        top_n + |junk| + |easy| (a fresh ``make demo`` once failed on exactly this)."""
        from gldboxes.executor import SerialExecutor
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.evaluation.evaluate import evaluate_protocols
        from retrieval.runner.conf import resolve_conf, verification_conf
        from retrieval.runner.run import run
        from retrieval.runner.shards import verify_sharded

        ds = RevisitedDataset.load(world / "retrieval")
        base = run(
            world / "retrieval", out_dir, {**CONF}, codebook_images=world / "train" / "images"
        )
        cols = []
        for g in ds.gnd:
            first = [*g["junk"], *g["hard"], *g["easy"]]
            cols.append(first + [i for i in range(ds.n_db) if i not in set(first)])
        ranks_dir = tmp_path / "results" / "adversarial"
        ranks_dir.mkdir(parents=True)
        np.save(ranks_dir / "ranks.npy", np.array(cols, dtype=np.int64).T)
        assert base.query_features is not None and base.db_features is not None
        vc, top_n, _ = verification_conf(
            resolve_conf({**CONF, "verification": {"top_n": 2, "max_distance": 0.5}})
        )
        paths, _, _ = verify_sharded(
            SerialExecutor(progress=False),
            ds.root,
            ranks_dir / "ranks.npy",
            base.query_features,
            base.db_features,
            tmp_path / "gv",
            top_n=top_n,
            verification=dataclasses.asdict(vc),
        )
        assert set(paths) == {"easy", "medium", "hard"}
        easy = evaluate_protocols(np.load(paths["easy"]), ds.gnd, n_db=ds.n_db, protocols=["easy"])
        assert easy["easy"].map > 0.5  # the easy positives were verified

    def test_ablation_cli(
        self, world: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from gldboxes.cli.main import main as cli_main

        args = [
            "retrieval", "ablation", "--dataset", str(world / "retrieval"), "--out", str(out_dir),
            "--codebook-size", "128", "--codebook-images", str(world / "train" / "images"),
            "--methods", "asmk_star,r_asmk_star,naive_r_asmk_star,d2r_max,d2r_avg",
            "--boxes", str(world / "retrieval" / "boxes_gt.csv"), "--thresholds", "0.5",
            "--rmac-levels", "1", "--ss", "",
        ]  # fmt: skip
        assert cli_main(args) == 0
        text = capsys.readouterr().out
        assert "| R-ASMK* |" in text and "Ground-truth boxes" in text
        folder = out_dir / "ablation"
        rows = list(csv.DictReader((folder / "ablation.csv").open()))
        # baseline + 4 regional methods x (detector 0.5, rmac L1, gt)
        assert len(rows) == 1 + 4 * 3
        by = {(r["method"], r["source"]): r for r in rows}
        assert float(by[("asmk_star", "whole")]["items_rel"]) == 1.0
        assert float(by[("r_asmk_star", "gt")]["items_rel"]) == 1.0
        assert float(by[("d2r_max", "rmac")]["items_rel"]) > 1.5
        # the GT boxes file used as a detector (no scores = 1.0) gives the same regions as gt
        assert (
            by[("r_asmk_star", "detector")]["medium_map"] == by[("r_asmk_star", "gt")]["medium_map"]
        )
        png = (folder / "ablation.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert "Medium / Hard" in (folder / "ablation.md").read_text()
