"""Tests of retrieval.verification: matching, affine RANSAC, pair verification, re-ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.evaluate import evaluate_protocols
from retrieval.verification import (
    Features,
    VerificationConf,
    estimate_affine_ransac,
    estimate_affine_ransac_naive,
    match_descriptors,
    match_descriptors_naive,
    ransac_samples,
    read_features_h5,
    rerank,
    rerank_revisited,
    verify_pair,
    verify_pair_naive,
)

A_TRUE = np.array([[1.1, 0.2, 30.0], [-0.15, 0.9, -20.0]])


def _affine(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    return p @ a[:, :2].T + a[:, 2]


def _correspondences(
    rng: np.random.Generator,
    k: int,
    outlier_frac: float,
    a: np.ndarray = A_TRUE,
    noise: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (K, 2), their affine images with noise, outliers moved >= 50 px away; truth mask."""
    p1 = rng.uniform(0, 640, (k, 2))
    p2 = _affine(p1, a) + rng.normal(0, noise, (k, 2))
    out = np.zeros(k, dtype=bool)
    out[rng.permutation(k)[: round(outlier_frac * k)]] = True
    shift = rng.uniform(50, 300, (int(out.sum()), 2)) * rng.choice([-1, 1], (int(out.sum()), 2))
    p2[out] += shift
    return p1, p2, ~out


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _image_pair(
    rng: np.random.Generator,
    n_shared: int,
    n_extra: int = 100,
    d: int = 32,
    a: np.ndarray = A_TRUE,
) -> tuple[Features, Features]:
    """Two images sharing ``n_shared`` features related by ``a`` (descriptor noise ~0.1)."""
    kp1 = rng.uniform(0, 640, (n_shared + n_extra, 2))
    d1 = _unit(rng, n_shared + n_extra, d)
    kp2 = np.concatenate(
        [
            _affine(kp1[:n_shared], a) + rng.normal(0, 0.5, (n_shared, 2)),
            rng.uniform(0, 640, (n_extra, 2)),
        ]
    )
    d2 = d1[:n_shared] + 0.02 * rng.standard_normal((n_shared, d)).astype(np.float32)
    d2 = np.concatenate([d2 / np.linalg.norm(d2, axis=1, keepdims=True), _unit(rng, n_extra, d)])
    perm = rng.permutation(len(kp2))
    return Features(kp1, d1), Features(kp2[perm], d2[perm])


class TestRansacSamples:
    def test_smoke(self) -> None:
        s = ransac_samples(10, 5000, seed=3)
        assert s.shape == (5000, 3) and s.dtype == np.int64
        assert s.min() == 0 and s.max() == 9
        srt = np.sort(s, axis=1)
        assert (srt[:, 1:] != srt[:, :-1]).all()  # three distinct indices a sample
        # every index is used about equally (uniform sampling without replacement in a row)
        counts = np.bincount(s.ravel(), minlength=10)
        assert counts.min() > 0.9 * 1500 and counts.max() < 1.1 * 1500

    def test_three_points(self) -> None:
        s = ransac_samples(3, 200, seed=0)
        assert (np.sort(s, axis=1) == [0, 1, 2]).all()

    def test_seeded(self) -> None:
        np.testing.assert_array_equal(ransac_samples(50, 100, 7), ransac_samples(50, 100, 7))
        assert not np.array_equal(ransac_samples(50, 100, 7), ransac_samples(50, 100, 8))

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="at least 3"):
            ransac_samples(2, 10, 0)


class TestEstimateAffine:
    @pytest.mark.parametrize(("k", "outlier_frac"), [(20, 0.0), (200, 0.4), (500, 0.7)])
    def test_recovers_known_affine(self, k: int, outlier_frac: float) -> None:
        rng = np.random.default_rng(k)
        p1, p2, truth = _correspondences(rng, k, outlier_frac)
        res = estimate_affine_ransac(p1, p2, threshold=10.0, trials=1000, seed=0)
        assert res.ok
        assert res.matrix.shape == (2, 3) and res.inliers.shape == (k,)
        # outliers are >= 50 px off, inliers within ~2 px: the inlier set is exact
        np.testing.assert_array_equal(res.inliers, truth)
        np.testing.assert_allclose(res.matrix[:, :2], A_TRUE[:, :2], atol=0.01)
        np.testing.assert_allclose(res.matrix[:, 2], A_TRUE[:, 2], atol=1.5)

    def test_same_seed_same_result(self) -> None:
        rng = np.random.default_rng(1)
        p1, p2, _ = _correspondences(rng, 300, 0.85)
        r1 = estimate_affine_ransac(p1, p2, seed=5)
        r2 = estimate_affine_ransac(p1, p2, seed=5)
        np.testing.assert_array_equal(r1.matrix, r2.matrix)
        np.testing.assert_array_equal(r1.inliers, r2.inliers)

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_matches_naive_reference(self, seed: int) -> None:
        """Same samples: the vectorised and the plain-loop RANSAC pick the same model."""
        rng = np.random.default_rng(100 + seed)
        k = int(rng.integers(5, 400))
        p1, p2, _ = _correspondences(rng, k, float(rng.uniform(0.2, 0.95)))
        p2[: k // 4] = rng.uniform(0, 640, (k // 4, 2))  # plus uniform clutter
        fast = estimate_affine_ransac(p1, p2, trials=300, seed=seed)
        slow = estimate_affine_ransac_naive(p1, p2, trials=300, seed=seed)
        assert fast.ok == slow.ok
        np.testing.assert_array_equal(fast.inliers, slow.inliers)
        np.testing.assert_allclose(fast.matrix, slow.matrix, rtol=1e-9, atol=1e-9)

    def test_agrees_with_opencv(self) -> None:
        """An independent implementation finds the same inliers on a clean problem."""
        import cv2

        rng = np.random.default_rng(4)
        p1, p2, truth = _correspondences(rng, 150, 0.5)
        _, mask = cv2.estimateAffine2D(
            p1, p2, ransacReprojThreshold=10.0, maxIters=2000, confidence=0.999, refineIters=0
        )
        res = estimate_affine_ransac(p1, p2)
        np.testing.assert_array_equal(mask.ravel().astype(bool), truth)
        np.testing.assert_array_equal(res.inliers, truth)

    def test_too_few_and_degenerate(self) -> None:
        p = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        res = estimate_affine_ransac(p, p, min_matches=4)
        assert not res.ok and res.num_inliers == 0 and res.inliers.shape == (3,)
        assert estimate_affine_ransac(p, p, min_matches=3).num_inliers == 3
        line = np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1)  # collinear
        res = estimate_affine_ransac(line, line + 1)
        assert not res.ok and res.num_inliers == 0
        empty = estimate_affine_ransac(np.zeros((0, 2)), np.zeros((0, 2)))
        assert not empty.ok and empty.inliers.shape == (0,)

    def test_rejects_collapsing_model(self) -> None:
        """Many points matched to one point: the collapse is refused unless max_scale=None."""
        rng = np.random.default_rng(5)
        p1 = rng.uniform(0, 640, (60, 2))
        p2 = np.tile([[100.0, 100.0]], (60, 1)) + rng.normal(0, 1, (60, 2))
        p2[:10] = rng.uniform(0, 640, (10, 2))
        assert estimate_affine_ransac(p1, p2, max_scale=None).num_inliers >= 50
        assert estimate_affine_ransac(p1, p2).num_inliers <= 10

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"\(K, 2\)"):
            estimate_affine_ransac(np.zeros((5, 2)), np.zeros((4, 2)))
        with pytest.raises(ValueError, match="non-finite"):
            estimate_affine_ransac(np.full((5, 2), np.nan), np.zeros((5, 2)))
        with pytest.raises(ValueError, match="trials"):
            estimate_affine_ransac(np.zeros((5, 2)), np.zeros((5, 2)), trials=0)


def _brute_matches(d1: np.ndarray, d2: np.ndarray, max_distance: float) -> np.ndarray:
    out = []
    for i in range(len(d1)):
        dist = np.sqrt(((d1[i].astype(np.float64) - d2.astype(np.float64)) ** 2).sum(1))
        j = int(np.argmin(dist))
        if dist[j] < max_distance:
            out.append((i, j))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class TestMatchDescriptors:
    def test_matches_brute_force(self) -> None:
        rng = np.random.default_rng(0)
        d2 = _unit(rng, 300, 16)
        d1 = np.concatenate(
            [d2[:80] + 0.1 * rng.standard_normal((80, 16)).astype(np.float32), _unit(rng, 120, 16)]
        )
        d1[:80] /= np.linalg.norm(d1[:80], axis=1, keepdims=True)
        for md in (0.5, 0.9, 1.2):
            ref = _brute_matches(d1, d2, md)
            np.testing.assert_array_equal(match_descriptors(d1, d2, max_distance=md), ref)
            np.testing.assert_array_equal(match_descriptors_naive(d1, d2, max_distance=md), ref)
        m = match_descriptors(d1, d2, max_distance=0.9)
        assert (m[:80, 1] == np.arange(80)).all() and len(m) >= 80

    def test_empty_and_exception(self) -> None:
        assert match_descriptors(np.zeros((0, 8)), np.ones((3, 8))).shape == (0, 2)
        assert match_descriptors(np.ones((3, 8)), np.zeros((0, 8))).shape == (0, 2)
        with pytest.raises(ValueError, match=r"\(N, D\)"):
            match_descriptors(np.zeros((3, 8)), np.zeros((3, 4)))


class TestVerifyPair:
    def test_real_case_synthetic_pair(self) -> None:
        rng = np.random.default_rng(0)
        f1, f2 = _image_pair(rng, n_shared=60)
        res = verify_pair(f1, f2)
        assert res.num_inliers == 60
        inl = res.matches[res.affine.inliers]
        assert (inl[:, 0] < 60).all()  # the shared features, and only those
        np.testing.assert_allclose(res.affine.matrix[:, :2], A_TRUE[:, :2], atol=0.01)
        naive = verify_pair_naive(f1, f2)
        np.testing.assert_array_equal(naive.matches, res.matches)
        np.testing.assert_array_equal(naive.affine.inliers, res.affine.inliers)

    def test_unrelated_pair(self) -> None:
        rng = np.random.default_rng(1)
        f1, _ = _image_pair(rng, n_shared=0, n_extra=200)
        f2, _ = _image_pair(rng, n_shared=0, n_extra=200)
        res = verify_pair(f1, f2)
        # a few chance 1-NN matches under 0.9; any 3 of them fit an affine exactly
        assert len(res.matches) <= 10 and res.num_inliers <= 4

    def test_overrides_and_exception(self) -> None:
        rng = np.random.default_rng(2)
        f1, f2 = _image_pair(rng, n_shared=30)
        n = len(verify_pair(f1, f2).matches)
        assert verify_pair(f1, f2, threshold=10.0, min_matches=n).num_inliers == 30
        assert verify_pair(f1, f2, VerificationConf(min_matches=n + 1)).num_inliers == 0
        with pytest.raises(ValueError, match="unknown verification setting"):
            verify_pair(f1, f2, thresold=3.0)


class TestRerank:
    def _db(self) -> tuple[Features, dict[str, Features]]:
        rng = np.random.default_rng(3)
        q, _ = _image_pair(rng, n_shared=0, n_extra=150)
        db: dict[str, Features] = {}
        # image "s<n>" shares n features with the query; "u<i>" shares none
        for name, n in [("u0", 0), ("s10", 10), ("u1", 0), ("s40", 40), ("s25", 25), ("u2", 0)]:
            k = len(q.keypoints)
            idx = rng.permutation(k)[:n]
            kp = np.concatenate([_affine(q.keypoints[idx], A_TRUE), rng.uniform(0, 640, (50, 2))])
            de = np.concatenate([q.descriptors[idx], _unit(rng, 50, q.descriptors.shape[1])])
            db[name] = Features(kp, de)
        return q, db

    def test_order_by_inliers_then_score(self) -> None:
        q, db = self._db()
        short = ["u0", "s10", "u1", "s40", "s25", "u2"]
        res = rerank(q, db, short, scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], top_n=5)
        assert res.ids == ["s40", "s25", "s10", "u0", "u1", "u2"]
        np.testing.assert_array_equal(res.inliers, [40, 25, 10, 0, 0])
        assert [short[o] for o in res.order] == res.ids
        # scores break ties among unverified images: u1 above u0 when it scores higher
        res2 = rerank(q, db, short, scores=[0.1, 0.8, 0.7, 0.6, 0.5, 0.4], top_n=5)
        assert res2.ids[3:] == ["u1", "u0", "u2"]

    def test_top_n_limits_and_cache(self) -> None:
        q, db = self._db()
        short = ["u0", "s10", "u1", "s40", "s25", "u2"]
        res = rerank(q, db, short, top_n=3)
        assert res.ids == ["s10", "u0", "u1", "s40", "s25", "u2"]
        cache = {"u1": 999}  # a cached pair is not recomputed
        res = rerank(q, db, short, top_n=3, cache=cache)
        assert res.ids[0] == "u1" and cache["s10"] == 10 and "s40" not in cache

    def test_parallel_equals_serial(self) -> None:
        q, db = self._db()
        short = list(db)
        a = rerank(q, db, short, num_workers=1)
        b = rerank(q, db, short, num_workers=4)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.inliers, b.inliers)

    def test_exception(self) -> None:
        q, db = self._db()
        with pytest.raises(ValueError, match="no features"):
            rerank(q, db, ["u0", "nope"])
        with pytest.raises(ValueError, match="scores has shape"):
            rerank(q, db, ["u0", "u1"], scores=[1.0])


class TestRerankRevisited:
    def test_real_case_one_pass_all_protocols(self) -> None:
        """Positives ranked last move up; junk is skipped per protocol; pairs run once."""
        rng = np.random.default_rng(7)
        n_db = 8
        queries, db = [], {}
        for _ in range(2):
            q, _ = _image_pair(rng, n_shared=0, n_extra=120)
            queries.append(q)
        # query 0: 0,1 easy (30 shared features), 2 hard (12), 3 junk (20); others unrelated
        # query 1: 4 easy, 5 hard; 6 junk
        shared = {
            (0, 0): 30,
            (0, 1): 30,
            (0, 2): 12,
            (0, 3): 20,
            (1, 4): 30,
            (1, 5): 12,
            (1, 6): 20,
        }
        for d in range(n_db):
            kps, des = [rng.uniform(0, 640, (40, 2))], [_unit(rng, 40, 32)]
            for (qi, di), n in shared.items():
                if di == d:
                    idx = rng.permutation(120)[:n]
                    kps.append(_affine(queries[qi].keypoints[idx], A_TRUE))
                    des.append(queries[qi].descriptors[idx])
            db[d] = Features(np.concatenate(kps), np.concatenate(des))
        gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [5], "junk": [6]}]
        ranks = np.array([[7, 3, 2, 6, 1, 5, 0, 4], [0, 1, 2, 3, 7, 6, 5, 4]]).T
        before = evaluate_protocols(ranks, gnd)
        res = rerank_revisited(ranks, gnd, queries, db, top_n=5, num_workers=2)
        after = evaluate_protocols(res.ranks["medium"], gnd, protocols=["medium"])
        assert after["medium"].map > before["medium"].map + 0.2
        # query 0; heads are the first 5 non-junk, re-ranked, then the rest in original order
        # medium (junk 3): head 7,2,6,1,5 -> 1 (30 inliers), 2 (12), then 7,6,5; rest 3,0,4
        assert res.ranks["medium"][:, 0].tolist() == [1, 2, 7, 6, 5, 3, 0, 4]
        # hard (junk 3 + easy 0,1): head 7,2,6,5,4 -> 2 first
        assert res.ranks["hard"][:, 0].tolist() == [2, 7, 6, 5, 4, 3, 1, 0]
        # easy (junk 3 + hard 2): head 7,6,1,5,0 -> 1 and 0 tie at 30: first-stage order
        assert res.ranks["easy"][:, 0].tolist() == [1, 0, 7, 6, 5, 3, 2, 4]
        # query 1: no positive in its heads and no inliers: the order is kept
        np.testing.assert_array_equal(res.ranks["medium"][:, 1], ranks[:, 1])
        # one pass: the union of the protocols' heads, each pair once; 3 (junk in every
        # protocol) is never verified
        assert {d for q, d in res.inliers if q == 0} == {7, 2, 6, 1, 5, 4, 0}
        assert res.pairs == len(res.inliers) == 7 + 5  # query 1: 0,1,2,3,7 in every head
        assert res.inliers[(0, 1)] == 30 and res.inliers[(0, 2)] == 12
        assert res.seconds_per_query > 0
        for p in ("easy", "medium", "hard"):
            assert sorted(res.ranks[p][:, 1].tolist()) == list(range(n_db))

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="query features"):
            rerank_revisited(np.arange(3)[:, None], [{"easy": [], "hard": [], "junk": []}], [], {})
        f = Features(np.zeros((1, 2)), np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="no features for database"):
            rerank_revisited(
                np.arange(3)[:, None], [{"easy": [0], "hard": [], "junk": []}], [f], {0: f}
            )


def test_read_features_h5(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "feats.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for k in ("a", "b/region_1"):
            f.create_dataset(f"{k}/keypoints", data=rng.uniform(0, 9, (5, 2)).astype(np.float32))
            f.create_dataset(f"{k}/descriptors", data=rng.random((5, 8)).astype(np.float32))
        f.create_dataset("c/keypoints", data=np.zeros((1, 2)))
    got = read_features_h5(path, ["a", "b/region_1", "a"])
    assert list(got) == ["a", "b/region_1"]
    assert got["a"].keypoints.shape == (5, 2) and got["a"].descriptors.dtype == np.float32
    with pytest.raises(ValueError, match="no features for id 'zz'"):
        read_features_h5(path, ["zz"])
    with pytest.raises(ValueError, match="lacks"):
        read_features_h5(path, ["c"])


def _rootsift(path: Path, n: int = 1000, side: int = 640) -> Features:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert img is not None, path
    s = min(1.0, side / max(img.shape))
    img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    sift = cv2.SIFT_create(nfeatures=n)  # type: ignore[attr-defined]
    kp, des = sift.detectAndCompute(img, None)
    des = np.sqrt(des / (des.sum(axis=1, keepdims=True) + 1e-7))
    return Features(np.array([k.pt for k in kp]) / s, des.astype(np.float32))


@pytest.mark.slow
def test_real_case_landmark_photos(shared_data: Path) -> None:
    """Two Sacre-Coeur views verify; Sacre-Coeur against Toronto does not (RootSIFT)."""
    root = shared_data / "landmark_photos" / "roma_assets"
    a = _rootsift(root / "sacre_coeur_A.jpg")
    b = _rootsift(root / "sacre_coeur_B.jpg")
    t = _rootsift(root / "toronto_A.jpg")
    # RootSIFT distances are smaller than DELF's: 0.9 would accept every 1-NN
    conf = VerificationConf(max_distance=0.45)
    same = verify_pair(a, b, conf).num_inliers
    other = max(verify_pair(a, t, conf).num_inliers, verify_pair(b, t, conf).num_inliers)
    assert same >= 20
    assert other <= 15
    assert same >= 2 * other


def _brute_rule(
    d1: np.ndarray, d2: np.ndarray, max_distance: float | None, ratio: float | None, mutual: bool
) -> np.ndarray:
    """Obviously-correct matching: the full distance matrix, then the rules one by one."""
    dist = np.sqrt(((d1[:, None, :].astype(np.float64) - d2[None, :, :]) ** 2).sum(axis=2))
    out = []
    for i in range(d1.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        j = int(order[0])
        first = dist[i, j]
        second = dist[i, order[1]] if d2.shape[0] > 1 else np.inf
        if max_distance is not None and not first < max_distance:
            continue
        if ratio is not None and not first < ratio * second:
            continue
        if mutual and int(np.argmin(dist[:, j])) != i:
            continue
        out.append((i, j))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class TestMatchingRules:
    @pytest.mark.parametrize(
        ("max_distance", "ratio", "mutual"),
        [
            (None, 0.8, False),
            (None, 0.8, True),
            (0.9, None, True),
            (0.7, 0.9, True),
            (None, None, False),
        ],
    )
    def test_matches_brute_force(
        self, max_distance: float | None, ratio: float | None, mutual: bool
    ) -> None:
        rng = np.random.default_rng(1)
        d2 = _unit(rng, 200, 16)
        d1 = d2[:60] + 0.15 * rng.standard_normal((60, 16)).astype(np.float32)
        d1 = np.concatenate([d1 / np.linalg.norm(d1, axis=1, keepdims=True), _unit(rng, 90, 16)])
        ref = _brute_rule(d1, d2, max_distance, ratio, mutual)
        kw = {"max_distance": max_distance, "ratio": ratio, "mutual": mutual}
        np.testing.assert_array_equal(match_descriptors(d1, d2, **kw), ref)
        np.testing.assert_array_equal(match_descriptors_naive(d1, d2, **kw), ref)
        if ratio is not None or mutual:  # the rules only ever remove 1-NN matches
            assert len(ref) < len(_brute_rule(d1, d2, max_distance, None, False))
        if ratio is not None:  # ... and the ratio test keeps the true ones here
            assert (ref[:, 0] < 60).mean() > 0.9

    def test_ratio_rejects_ambiguous_and_mutual_rejects_many_to_one(self) -> None:
        d2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]], np.float32)
        # row 0: nearest d2[0] (0.1) but d2[2] is close too (ambiguous); row 1: clearly d2[1]
        d1 = np.array([[0.92, 0.39], [0.05, 1.0], [0.0, 0.98]], np.float32)
        assert match_descriptors(d1, d2, max_distance=None, ratio=0.8).tolist() == [[1, 1], [2, 1]]
        # rows 1 and 2 both pick d2[1]; only its own nearest (row 2) survives the mutual check
        m = match_descriptors(d1, d2, max_distance=None, ratio=0.8, mutual=True)
        assert m.tolist() == [[2, 1]]
        # a single candidate always passes the ratio test
        assert match_descriptors(d1[:1], d2[:1], max_distance=None, ratio=0.5).tolist() == [[0, 0]]


class TestVerificationConf:
    def test_exception(self) -> None:
        for bad in (
            {"ratio": 0.0},
            {"ratio": 1.5},
            {"max_distance": -1.0},
            {"threshold": 0.0},
            {"trials": 0},
            {"min_inliers": -1},
            {"max_scale": 1.0},
        ):
            with pytest.raises(ValueError, match="verification"):
                VerificationConf(**bad)  # type: ignore[arg-type]

    def test_feature_presets_carry_their_matching(self) -> None:
        """RootSIFT verifies with the ratio test + mutual NN and a minimum inlier count; DELF
        with the authors' absolute 0.8; run settings override the preset key by key."""
        from retrieval.runner.conf import resolve_conf, verification_conf

        sift, top_n, _ = verification_conf(resolve_conf(verification={}))
        assert (sift.max_distance, sift.ratio, sift.mutual, sift.min_inliers) == (
            None,
            0.8,
            True,
            10,
        )
        assert top_n == 100
        delf, _, _ = verification_conf(resolve_conf(features="delf", verification={}))
        assert (delf.max_distance, delf.ratio, delf.mutual) == (0.8, None, False)
        over, top_n, _ = verification_conf(
            resolve_conf(verification={"min_inliers": 4, "ratio": None, "top_n": 7})
        )
        assert (over.min_inliers, over.ratio, over.mutual, top_n) == (4, 0.8, True, 7)

    def test_threshold_scales_with_downscaled_images(self) -> None:
        """The RANSAC threshold is in pixels of the image at extraction size: a database image
        stored at 4x (scale 4) tolerates 4x the residual in its original pixels."""
        rng = np.random.default_rng(3)
        p1 = rng.uniform(0, 500, (40, 2))
        p2 = 4.0 * p1 + rng.normal(0, 12.0, (40, 2))  # ~17 px residuals in original pixels
        d = _unit(rng, 40, 16)
        q = Features(p1, d)
        conf = VerificationConf(max_distance=None, ratio=0.8, mutual=True, threshold=10.0)
        tight = verify_pair(q, Features(p2, d), conf).num_inliers
        scaled = verify_pair(q, Features(p2, d, 4.0), conf).num_inliers
        assert scaled >= 38 > tight


class TestUnverifiedKeepOrder:
    def test_below_min_inliers_keeps_first_stage_order(self) -> None:
        """Pairs under min_inliers are unverified: they keep their first-stage order, and only
        verified pairs move ahead of them (nothing moves down for lack of evidence)."""
        rng = np.random.default_rng(7)
        shared = {"a": 6, "b": 0, "c": 40, "d": 8, "e": 20, "f": 5}
        query = Features(rng.uniform(0, 640, (100, 2)), _unit(rng, 100, 32))
        db = {}
        for name, n in shared.items():
            # n of the query's features seen through A_TRUE, plus 60 unrelated ones
            kp = np.concatenate(
                [_affine(query.keypoints[:n], A_TRUE), rng.uniform(0, 640, (60, 2))]
            )
            db[name] = Features(kp, np.concatenate([query.descriptors[:n], _unit(rng, 60, 32)]))
        ids = list(shared)  # first-stage order a..f
        scores = np.linspace(0.9, 0.4, len(ids))
        gated = rerank(query, db, ids, scores, conf=VerificationConf(min_inliers=10))
        assert gated.ids == ["c", "e", "a", "b", "d", "f"]
        assert gated.inliers.tolist()[:2] == [40, 20] and gated.inliers[2:].max() == 0
        plain = rerank(query, db, ids, scores, conf=VerificationConf(min_inliers=0))
        assert plain.ids.index("a") > plain.ids.index("d")  # without the gate a drops below d


def test_real_case_landmark_photos_preset(shared_data: Path) -> None:
    """With the RootSIFT preset's matching, unrelated real photos stay below min_inliers and
    same-landmark views pass it (photos outside the retrieval benchmark)."""
    from retrieval.features import ImageItem, confs, extract_image, make_extractor

    fc = confs["rootsift"]
    conf = VerificationConf(**fc["verification"])
    extractor = make_extractor(fc)

    def feats(path: Path) -> Features:
        f, size = extract_image(extractor, ImageItem(path.stem, path), fc)
        scale = max(1.0, max(size) / fc["preprocessing"]["max_side"])
        return Features(f.keypoints.astype(np.float64), f.descriptors, scale)

    root = shared_data / "landmark_photos"
    a = feats(root / "roma_assets" / "sacre_coeur_A.jpg")
    b = feats(root / "roma_assets" / "sacre_coeur_B.jpg")
    c = feats(root / "lightglue_assets" / "sacre_coeur1.jpg")
    t = feats(root / "roma_assets" / "toronto_A.jpg")
    p = feats(root / "sklearn_china_summer_palace.jpg")
    same = [verify_pair(a, b, conf).num_inliers, verify_pair(a, c, conf).num_inliers]
    other = [verify_pair(x, y, conf).num_inliers for x, y in ((a, t), (b, t), (a, p), (t, p))]
    assert min(same) >= conf.min_inliers
    assert max(other) < conf.min_inliers


class TestReadFeaturesH5Validation:
    """read_features_h5 refuses malformed or damaged features with one ValueError naming the
    file and the id."""

    @staticmethod
    def _write(path: Path, kp: np.ndarray, desc: np.ndarray) -> Path:
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("ok/keypoints", data=np.zeros((2, 2), np.float32))
            f.create_dataset("ok/descriptors", data=np.ones((2, 8), np.float32))
            f.create_dataset("img/3/keypoints", data=kp)
            f.create_dataset("img/3/descriptors", data=desc)
        return path

    @pytest.mark.parametrize(
        ("case", "msg"),
        [
            ("kp_3_columns", r"keypoints must be \(N, 2\)"),
            ("kp_int", "keypoints must be a float"),
            ("kp_nan", "keypoints hold NaN or inf"),
            ("desc_bytes", "descriptors must be a float"),
            ("desc_int_strings", "descriptors must be a float"),
            ("desc_int", "descriptors must be a float"),
            ("desc_flat", r"descriptors must be \(N, D\)"),
            ("desc_inf", "descriptors hold NaN or inf"),
            ("count_mismatch", "5 keypoints but 4 descriptors"),
        ],
    )
    def test_exception(self, tmp_path: Path, case: str, msg: str) -> None:
        import re

        import h5py

        rng = np.random.default_rng(0)
        kp = rng.uniform(0, 50, (5, 2)).astype(np.float32)
        desc = rng.random((5, 8)).astype(np.float32)
        if case == "kp_3_columns":
            kp = np.zeros((5, 3), np.float32)
        elif case == "kp_int":
            kp = kp.astype(np.int32)
        elif case == "kp_nan":
            kp[0, 1] = np.nan
        elif case == "desc_bytes":
            desc = np.full((5, 8), b"0.25")
        elif case == "desc_int_strings":
            desc = np.array([str(i) for i in range(5)], dtype=h5py.string_dtype())
        elif case == "desc_int":
            desc = (desc * 255).astype(np.uint8)
        elif case == "desc_flat":
            desc = desc.ravel()
        elif case == "desc_inf":
            desc[4, 7] = -np.inf
        elif case == "count_mismatch":
            desc = desc[:4]
        path = self._write(tmp_path / f"{case}.h5", kp, desc)
        assert list(read_features_h5(path, ["ok"])) == ["ok"]
        with pytest.raises(ValueError, match=re.escape(f"{path}: image 'img/3': ") + msg):
            read_features_h5(path, ["ok", "img/3"])

    def test_damaged_and_missing_files(self, tmp_path: Path) -> None:
        import re

        rng = np.random.default_rng(1)
        path = self._write(
            tmp_path / "f.h5",
            rng.random((5, 2)).astype(np.float32),
            rng.random((5, 8)).astype(np.float32),
        )
        assert read_features_h5(path, ["img/3"])["img/3"].descriptors.shape == (5, 8)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ValueError, match=re.escape(f"{path}: damaged features file")) as err:
            read_features_h5(path, ["img/3"])
        assert "\n" not in str(err.value)
        with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
            read_features_h5(tmp_path / "nope.h5", ["a"])
