"""The compiled verification (numba) against its numpy twin and the naive reference.

Same seeded problems, same answers: matches, RANSAC winners, inlier masks, re-rankings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from retrieval.verification import (
    Features,
    QueryMatcher,
    VerificationConf,
    estimate_affine_ransac,
    estimate_affine_ransac_naive,
    match_descriptors,
    match_descriptors_naive,
    rerank,
    verify_many,
    verify_pair,
    verify_pair_naive,
    verify_query,
)
from retrieval.verification import _kernels as kernels
from retrieval.verification.ransac import _MIN_DET, _fit_triplets, ransac_samples

A_TRUE = np.array([[1.1, 0.2, 30.0], [-0.15, 0.9, -20.0]])


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pair(
    rng: np.random.Generator, n: int, m: int, shared: int, d: int = 32
) -> tuple[Features, Features]:
    """Image 1 with ``n`` features, image 2 with ``m``; ``shared`` of them seen through A_TRUE
    with descriptor noise, the rest random."""
    kp1 = rng.uniform(0, 800, (n, 2))
    d1 = _unit(rng, n, d)
    kp2 = rng.uniform(0, 800, (m, 2))
    d2 = _unit(rng, m, d)
    kp2[:shared] = kp1[:shared] @ A_TRUE[:, :2].T + A_TRUE[:, 2] + rng.normal(0, 1, (shared, 2))
    d2[:shared] = d1[:shared] + 0.2 * rng.standard_normal((shared, d)).astype(np.float32)
    d2[:shared] /= np.linalg.norm(d2[:shared], axis=1, keepdims=True)
    perm = rng.permutation(m)
    return Features(kp1, d1), Features(kp2[perm], d2[perm])


def _brute_rule(
    d1: np.ndarray, d2: np.ndarray, max_distance: float | None, ratio: float | None, mutual: bool
) -> np.ndarray:
    """The full float64 distance matrix, then the rules one by one (ties: lowest index)."""
    dist = np.sqrt(((d1[:, None, :].astype(np.float64) - d2[None, :, :]) ** 2).sum(axis=2))
    out = []
    for i in range(d1.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        j = int(order[0])
        second = dist[i, order[1]] if d2.shape[0] > 1 else np.inf
        if max_distance is not None and not dist[i, j] < max_distance:
            continue
        if ratio is not None and not dist[i, j] < ratio * second:
            continue
        if mutual and int(np.argmin(dist[:, j])) != i:
            continue
        out.append((i, j))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


RULES = [
    (None, 0.8, True),  # the RootSIFT preset
    (0.9, None, False),  # the paper's DELF rule
    (None, 0.8, False),
    (1.1, None, True),
    (0.9, 0.9, True),
    (None, None, False),
]


class TestNearestTwo:
    def test_real_case_against_argsort(self) -> None:
        rng = np.random.default_rng(0)
        dist_t = rng.random((70, 50)).astype(np.float32)  # (M, N)
        dist_t[10, :] = dist_t[3, :]  # exact ties between rows 3 and 10: 3 wins
        nn1, nn2 = kernels.nearest_two(dist_t, True)
        order = np.argsort(dist_t, axis=0, kind="stable")
        np.testing.assert_array_equal(nn1, order[0])
        np.testing.assert_array_equal(nn2, order[1])
        one, none = kernels.nearest_two(dist_t, False)
        np.testing.assert_array_equal(one, order[0])
        assert (none == -1).all()

    def test_single_row_has_no_second(self) -> None:
        nn1, nn2 = kernels.nearest_two(np.ones((1, 4), np.float32), True)
        assert nn1.tolist() == [0, 0, 0, 0] and nn2.tolist() == [-1, -1, -1, -1]

    def test_is_row_min(self) -> None:
        row = np.array([3.0, 1.0, 2.0, 1.0, 5.0], np.float32)
        assert [kernels.is_row_min(row, i) for i in range(5)] == [False, True, False, False, False]


class TestMatchingBackends:
    @pytest.mark.parametrize(("max_distance", "ratio", "mutual"), RULES)
    def test_same_as_brute_force_and_numpy(
        self, max_distance: float | None, ratio: float | None, mutual: bool
    ) -> None:
        rng = np.random.default_rng(11)
        for n, m, shared in [(150, 220, 60), (40, 9, 5), (7, 300, 7)]:
            f1, f2 = _pair(rng, n, m, shared)
            kw: dict[str, Any] = {"max_distance": max_distance, "ratio": ratio, "mutual": mutual}
            ref = _brute_rule(f1.descriptors, f2.descriptors, max_distance, ratio, mutual)
            fast = match_descriptors(f1.descriptors, f2.descriptors, **kw)
            np.testing.assert_array_equal(fast, ref)
            twin = match_descriptors(f1.descriptors, f2.descriptors, backend="numpy", **kw)
            np.testing.assert_array_equal(twin, ref)
            assert len(ref) > 0

    def test_duplicates_go_to_the_lowest_index(self) -> None:
        d2 = np.repeat(np.eye(4, dtype=np.float32), 2, axis=0)  # rows 2k and 2k+1 equal
        d1 = np.eye(4, dtype=np.float32) + 0.01
        m = match_descriptors(d1, d2, max_distance=1.0)
        assert m[:, 1].tolist() == [0, 2, 4, 6]
        assert len(match_descriptors(d1, d2, max_distance=None, ratio=0.8)) == 0  # ambiguous
        np.testing.assert_array_equal(m, _brute_rule(d1, d2, 1.0, None, False))

    def test_query_matcher_reuses_its_buffer(self) -> None:
        """One matcher, candidates of growing and shrinking sizes: each as a fresh match."""
        rng = np.random.default_rng(2)
        q = _unit(rng, 120, 16)
        matcher = QueryMatcher(q, max_distance=None, ratio=0.9, mutual=True)
        for m in (50, 300, 20, 300, 1):
            d = _unit(rng, m, 16)
            np.testing.assert_array_equal(matcher.match(d), _brute_rule(q, d, None, 0.9, True))
            np.testing.assert_array_equal(
                matcher.match(d),
                match_descriptors_naive(q, d, max_distance=None, ratio=0.9, mutual=True),
            )
        assert matcher.buffer.size == 120 * 300  # grown once, to the largest candidate
        given = np.full(120 * 50, np.nan, np.float32)
        shared = QueryMatcher(q, max_distance=None, ratio=0.9, mutual=True, buffer=given)
        d = _unit(rng, 50, 16)
        np.testing.assert_array_equal(shared.match(d), _brute_rule(q, d, None, 0.9, True))
        assert shared.buffer is given and np.isfinite(given).all()  # used in place

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="unknown backend 'cuda'"):
            match_descriptors(np.zeros((3, 4)), np.zeros((3, 4)), backend="cuda")
        with pytest.raises(ValueError, match=r"\(N, D\)"):
            QueryMatcher(np.zeros(5))
        with pytest.raises(ValueError, match=r"\(N, D\)"):
            QueryMatcher(np.zeros((3, 4))).match(np.zeros((3, 5)))


class TestRansacBackends:
    @pytest.mark.parametrize("seed", range(8))
    def test_same_winner_as_numpy(self, seed: int) -> None:
        """The compiled loop picks the trial numpy's argmax picks, with the same count."""
        rng = np.random.default_rng(200 + seed)
        k = int(rng.integers(3, 500))
        p1 = rng.uniform(0, 640, (k, 2))
        p2 = p1 @ A_TRUE[:, :2].T + A_TRUE[:, 2] + rng.normal(0, 2, (k, 2))
        out = rng.random(k) < rng.uniform(0.2, 0.95)
        p2[out] = rng.uniform(0, 640, (int(out.sum()), 2))
        p1[: k // 10] = p1[0]  # repeated points: degenerate samples
        samples = ransac_samples(k, 400, seed)
        models, valid = _fit_triplets(p1, p2, samples, 10.0)
        pred = np.einsum("kc,tcd->tkd", np.c_[p1, np.ones(k)], models)
        counts = (((pred - p2) ** 2).sum(axis=2) < 100.0).sum(axis=1)
        counts[~valid] = -1
        t, n = kernels.ransac_best(p1, p2, samples, 100.0, _MIN_DET, 0.01, 100.0)
        if counts.max() < 0:
            assert (t, n) == (-1, -1)
        else:
            assert (t, n) == (int(np.argmax(counts)), int(counts.max()))

    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("max_scale", [10.0, None])
    def test_same_result_all_implementations(self, seed: int, max_scale: float | None) -> None:
        rng = np.random.default_rng(300 + seed)
        k = int(rng.integers(4, 300))
        p1 = rng.uniform(0, 640, (k, 2))
        p2 = p1 @ A_TRUE[:, :2].T + A_TRUE[:, 2] + rng.normal(0, 1, (k, 2))
        out = rng.random(k) < rng.uniform(0.1, 0.9)
        p2[out] = rng.uniform(0, 640, (int(out.sum()), 2))
        kw = {"trials": 300, "seed": seed, "max_scale": max_scale}
        fast = estimate_affine_ransac(p1, p2, **kw)  # type: ignore[arg-type]
        twin = estimate_affine_ransac(p1, p2, backend="numpy", **kw)  # type: ignore[arg-type]
        slow = estimate_affine_ransac_naive(p1, p2, **kw)  # type: ignore[arg-type]
        for other in (twin, slow):
            assert fast.ok == other.ok
            np.testing.assert_array_equal(fast.inliers, other.inliers)
            np.testing.assert_allclose(fast.matrix, other.matrix, rtol=1e-9, atol=1e-9)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="unknown backend"):
            estimate_affine_ransac(np.zeros((5, 2)), np.zeros((5, 2)), backend="opencv")


class TestBatchedQuery:
    def _data(self) -> tuple[Features, list[Features], VerificationConf]:
        rng = np.random.default_rng(5)
        q, _ = _pair(rng, 200, 10, 0)
        cands = []
        for shared in (0, 40, 12, 0, 80, 25):
            _, d = _pair(rng, 200, 150, shared)
            # the shared features are the query's own, seen through A_TRUE
            d.descriptors[:shared] = q.descriptors[:shared]
            kp = q.keypoints[:shared] @ A_TRUE[:, :2].T + A_TRUE[:, 2]
            d.keypoints[:shared] = kp
            cands.append(Features(d.keypoints, d.descriptors, 1.5 if shared == 12 else 1.0))
        conf = VerificationConf(max_distance=None, ratio=0.8, mutual=True, min_inliers=10)
        return q, cands, conf

    def test_real_case_query_equals_pairs(self) -> None:
        q, cands, conf = self._data()
        batched = verify_query(q, cands, conf)
        # the shared features, and only those, are inliers (the threshold of the 3rd image,
        # scale 1.5, is 15 px); unrelated images have 1-2 chance matches, too few for a model
        assert [r.num_inliers for r in batched] == [0, 40, 12, 0, 80, 25]
        for r, d in zip(batched, cands, strict=True):
            for other in (verify_pair(q, d, conf, backend="numpy"), verify_pair_naive(q, d, conf)):
                np.testing.assert_array_equal(r.matches, other.matches)
                np.testing.assert_array_equal(r.affine.inliers, other.affine.inliers)
        assert [r.num_inliers for r in verify_query(q, cands, conf, backend="numpy")] == [
            r.num_inliers for r in batched
        ]

    def test_threads_and_backends_give_the_same_counts(self) -> None:
        q, cands, conf = self._data()
        q2, cands2, _ = self._data()
        pairs = [(q, d) for d in cands] + [(q2, d) for d in cands2[::-1]]
        serial = verify_many(pairs, conf, 1)
        assert serial[:6] == [0, 40, 12, 0, 80, 25]  # 0 below min_inliers (10)
        assert verify_many(pairs, conf, 3) == serial
        assert verify_many(pairs, conf, 2, backend="numpy") == serial
        ids = [str(i) for i in range(6)]
        a = rerank(q, dict(zip(ids, cands, strict=True)), ids, conf=conf, num_workers=2)
        b = rerank(
            q, dict(zip(ids, cands, strict=True)), ids, conf=conf, num_workers=1, backend="numpy"
        )
        assert a.ids == b.ids == ["4", "1", "5", "2", "0", "3"]

    def test_serial_run_restores_the_callers_openmp_threads(self) -> None:
        import faiss

        q, cands, conf = self._data()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(2)
        try:
            assert verify_many([(q, d) for d in cands], conf, 1)[1] == 40
            assert faiss.omp_get_max_threads() == 2
        finally:
            faiss.omp_set_num_threads(before)

    def test_exception(self) -> None:
        q, cands, conf = self._data()
        with pytest.raises(ValueError, match="unknown backend"):
            verify_query(q, cands, conf, backend="gpu")
        with pytest.raises(ValueError, match="unknown backend"):
            verify_many([(q, cands[0])], conf, backend="gpu")
