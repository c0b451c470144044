"""Compiled kernels (retrieval/_kernels.py) against their numpy references, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import retrieval.aggregation as agg
from retrieval.aggregation import KERNELS, aggregate_many, similarity
from retrieval.inverted_file import InvertedFile, top_k


def _images(
    rng: np.random.Generator, n: int, d: int, protos: np.ndarray, most: int = 60
) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        p = protos[rng.integers(protos.shape[0])]
        m = int(rng.integers(0, most))
        x = p[rng.integers(0, p.shape[0], m)] + 0.4 * rng.standard_normal((m, d))
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("d", [8, 24, 64, 128, 256])
@pytest.mark.parametrize("kernel", ["asmk_star", "r_asmk_star", "naive_r_asmk_star"])
def test_binary_scores_equal_numpy_reference(kernel: str, d: int) -> None:
    """Every lane width (uint8 at D=8/24, uint64 x1/x2/x4) gives the numpy path's numbers."""
    rng = np.random.default_rng(d)
    k = 32
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((4, 30, d)).astype(np.float32)
    db = aggregate_many(_images(rng, 80, d, protos), cb, kernel)
    q = aggregate_many(_images(rng, 7, d, protos), cb, "asmk_star")
    ivf = InvertedFile.build(db, k, kernel)
    fast = ivf.scores(q, backend="numba")
    ref = ivf.scores(q, backend="numpy")
    np.testing.assert_array_equal(fast, ref)
    # ... and similarity() itself, pair by pair, for a few queries
    for i in range(3):
        for j in range(0, 80, 7):
            want = similarity(
                q.image(i), db.image(j), alpha=ivf.alpha, tau=ivf.tau, normalize=ivf.normalize
            )
            assert fast[i, j] == want
    assert np.count_nonzero(fast > 0) > 20  # the test compares real matches, not only zeros


def test_scores_from_memmapped_index_and_regional_pooling(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    d, k = 32, 24
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((3, 30, d)).astype(np.float32)
    items = aggregate_many(_images(rng, 50, d, protos), cb, "asmk_star")
    item_image = np.repeat(np.arange(20), np.r_[np.full(10, 3), np.full(10, 2)])
    q = aggregate_many(_images(rng, 5, d, protos), cb, "asmk_star")
    for pooling in ("max", "avg"):
        ivf = InvertedFile.build(items, k, "asmk_star", item_image=item_image, pooling=pooling)
        back = InvertedFile.load(ivf.save(tmp_path / pooling))  # read-only memory maps
        fast = back.scores(q)
        np.testing.assert_array_equal(fast, ivf.scores(q, backend="numpy"))
        ids, sc = back.search(q, 5)
        np.testing.assert_array_equal(ids, top_k(fast, 5))
        np.testing.assert_array_equal(sc, np.take_along_axis(fast, ids, axis=1))


def test_unknown_backend() -> None:
    rng = np.random.default_rng(0)
    cb = rng.standard_normal((4, 8)).astype(np.float32)
    b = aggregate_many([rng.standard_normal((5, 8)).astype(np.float32)], cb, "asmk_star")
    ivf = InvertedFile.build(b, 4, "asmk_star")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ivf.scores(b, backend="gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        aggregate_many([np.zeros((1, 8), np.float32)], cb, "asmk", backend="gpu")


@pytest.mark.parametrize("kernel", KERNELS)
def test_aggregation_equals_numpy_reference(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled residual sums == the sparse-product reference, across chunk boundaries."""
    rng = np.random.default_rng(3)
    d, k = 16, 20
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((3, 30, d)).astype(np.float32)
    imgs = _images(rng, 25, d, protos, most=90)
    regions = None
    if kernel in agg.REGIONAL_KERNELS:
        regions = [[x, x[: len(x) // 2], x[len(x) // 3 :]] for x in imgs]
    ref = aggregate_many(imgs, cb, kernel, regions=regions, backend="numpy")
    monkeypatch.setattr(agg, "_ASSIGN_CHUNK", 100)  # several chunks, some of one image
    for backend in ("numba", "numpy"):
        got = aggregate_many(imgs, cb, kernel, regions=regions, backend=backend)
        np.testing.assert_array_equal(got.offsets, ref.offsets)
        np.testing.assert_array_equal(got.words, ref.words)
        np.testing.assert_array_equal(got.data, ref.data)
    assert ref.words.size > 100


def test_nearest_word_matches_exhaustive_argmin() -> None:
    """Blocked GEMM with the norms riding along == argmin of full distances, across blocks."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((700, 12)).astype(np.float32)
    cb = rng.standard_normal((300, 12)).astype(np.float32)
    dist = ((x[:, None, :].astype(np.float64) - cb[None].astype(np.float64)) ** 2).sum(-1)
    want = dist.argmin(1)
    for block in (64, 300, 4096):  # several codeword blocks, exactly one, one larger
        got = agg._nearest_word(x, cb, block=block)
        # float32 rounding may only swap near-ties: the chosen word is as near as the best
        same = got == want
        assert same.mean() > 0.99
        np.testing.assert_allclose(
            dist[np.arange(700), got], dist[np.arange(700), want], rtol=1e-5, atol=1e-5
        )
    ties = np.repeat(cb[:1], 2, axis=0)  # two identical codewords: the first wins
    assert agg._nearest_word(cb[:1] + 0.01, np.concatenate([ties, cb[1:]]), block=1)[0] == 0


def test_radix_ranking_equals_stable_argsort() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        s = np.round(rng.standard_normal((4, n)), int(rng.integers(0, 3)))
        s[rng.random(s.shape) < 0.3] = 0.0
        s[rng.random(s.shape) < 0.05] = -0.0  # equal to 0.0 for the comparison sort
        s[rng.random(s.shape) < 0.1] = -1.0
        s[rng.random(s.shape) < 0.02] = np.inf
        s[rng.random(s.shape) < 0.02] = -np.inf
        np.testing.assert_array_equal(top_k(s), np.argsort(-s, axis=1, kind="stable"))
    nan = np.array([[0.5, np.nan, 0.5, 1.0]])
    np.testing.assert_array_equal(top_k(nan), np.argsort(-nan, axis=1, kind="stable"))
