"""Compiled kernels (retrieval/index/_kernels.py) against their numpy references, bit for bit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import retrieval.index.aggregation as agg
from retrieval.index.aggregation import KERNELS, AggregatedBatch, aggregate_many, similarity
from retrieval.index.assignment import nearest_word
from retrieval.index.inverted_file import InvertedFile, top_k

# The float kernel whose residual signs a binary kernel packs.
FLOAT_TWIN = {"asmk_star": "asmk", "r_asmk_star": "r_asmk", "naive_r_asmk_star": "naive_r_asmk"}


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


def _signs(batch: AggregatedBatch) -> list[tuple[list[int], list[list[bool]]]]:
    """Per image of a float batch: its words and the sign vectors ``residual > 0`` (length D)."""
    out = []
    for i in range(batch.n_images):
        im = batch.image(i)
        out.append(([int(w) for w in im.words], [[bool(v > 0) for v in row] for row in im.data]))
    return out


def py_hamming_similarity(
    q: tuple[list[int], list[list[bool]]],
    x: tuple[list[int], list[list[bool]]],
    dim: int,
    alpha: float,
    tau: float,
    normalize: bool,
) -> float:
    """Plain-python ASMK* similarity from unpacked sign vectors of length D: the Hamming
    distance ``h`` counts differing signs, ``u = 1 - 2h/D``, selectivity summed over the shared
    words in ascending order, divided by ``sqrt(|Wq| |Wx|)`` when ``normalize``."""
    (qw, qs), (xw, xs) = q, x
    if not qw or not xw:
        return -1.0
    xmap = dict(zip(xw, xs, strict=True))
    total = 0.0
    for w, sq in zip(qw, qs, strict=True):
        if w not in xmap:
            continue
        h = sum(1 for a, b in zip(sq, xmap[w], strict=True) if a != b)
        u = 1.0 - 2.0 * h / dim
        if u > tau:
            total += math.copysign(abs(u) ** alpha, u)
    if normalize:
        total /= math.sqrt(len(qw) * len(xw))
    return total


@pytest.mark.parametrize("d", [8, 24, 64, 128, 256, 1, 2, 3, 7, 13, 100])
@pytest.mark.parametrize("kernel", ["asmk_star", "r_asmk_star", "naive_r_asmk_star"])
def test_binary_scores_equal_numpy_reference(kernel: str, d: int) -> None:
    """Every lane width (uint8 at D=8/24/100, uint16 at D=13, uint64 x1/x2/x4) and every D,
    a multiple of 8 or not (the last byte zero-padded), gives the numpy path's numbers, those
    of similarity(), and those of a plain-python Hamming similarity over D sign bits."""
    rng = np.random.default_rng(d)
    k = 32
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((4, 30, d)).astype(np.float32)
    db_images, q_images = _images(rng, 80, d, protos), _images(rng, 7, d, protos)
    db = aggregate_many(db_images, cb, kernel)
    q = aggregate_many(q_images, cb, "asmk_star")
    assert db.dim == q.dim == d and db.data.shape[1] == q.data.shape[1] == -(-d // 8)
    # the packed bits are exactly np.packbits of the float twin's residual signs
    db_float = aggregate_many(db_images, cb, FLOAT_TWIN[kernel])
    q_float = aggregate_many(q_images, cb, "asmk")
    for packed, flt in ((db, db_float), (q, q_float)):
        np.testing.assert_array_equal(packed.words, flt.words)
        np.testing.assert_array_equal(
            packed.data, np.packbits(flt.data > 0, axis=1, bitorder="big")
        )
    ivf = InvertedFile.build(db, k, kernel)
    fast = ivf.scores(q, backend="numba")
    ref = ivf.scores(q, backend="numpy")
    np.testing.assert_array_equal(fast, ref)
    # ... and similarity() itself, pair by pair, for a few queries, and the python reference
    db_signs, q_signs = _signs(db_float), _signs(q_float)
    for i in range(3):
        for j in range(0, 80, 7):
            want = similarity(
                q.image(i), db.image(j), alpha=ivf.alpha, tau=ivf.tau, normalize=ivf.normalize
            )
            assert fast[i, j] == want
            py = py_hamming_similarity(
                q_signs[i], db_signs[j], d, ivf.alpha, ivf.tau, ivf.normalize
            )
            assert fast[i, j] == pytest.approx(py, rel=1e-12, abs=1e-15)
    assert np.count_nonzero(fast > 0) > 20  # the test compares real matches, not only zeros


@pytest.mark.parametrize("kernel", ["asmk_star", "r_asmk_star", "naive_r_asmk_star"])
def test_two_dimensional_descriptors_end_to_end(kernel: str, tmp_path: Path) -> None:
    """2-D descriptors (as in the asmk authors' tests): one packed byte a word, 6 zero padding
    bits. Scores and the full ranking equal the plain-python reference over the 2 true bits,
    before and after a save/load; the padded-bits reading (D = 8) would rank differently."""
    rng = np.random.default_rng(20)
    k, d = 6, 2
    angles = np.linspace(0.0, 2.0 * np.pi, k, endpoint=False)
    cb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    centres = 1.5 * rng.standard_normal((4, d))

    def image() -> np.ndarray:
        n = int(rng.integers(0, 25))
        c = centres[rng.integers(0, 4)]
        return (c + 0.7 * rng.standard_normal((n, d))).astype(np.float32)

    db_images, q_images = [image() for _ in range(40)], [image() for _ in range(6)]
    regions = None
    if kernel != "asmk_star":
        regions = [[x, x[: len(x) // 2], x[len(x) // 2 :]] for x in db_images]
    db = aggregate_many(db_images, cb, kernel, regions=regions)
    q = aggregate_many(q_images, cb, "asmk_star")
    assert db.data.shape[1] == 1 and not np.any(db.data & np.uint8(0b00111111))
    ivf = InvertedFile.build(db, k, kernel)
    back = InvertedFile.load(ivf.save(tmp_path / kernel))
    assert back.dim == 2 and back.header()["dim"] == 2
    db_signs = _signs(aggregate_many(db_images, cb, FLOAT_TWIN[kernel], regions=regions))
    q_signs = _signs(aggregate_many(q_images, cb, "asmk"))
    p = (ivf.alpha, ivf.tau, ivf.normalize)
    want = np.array([[py_hamming_similarity(a, b, d, *p) for b in db_signs] for a in q_signs])
    padded = np.array([[py_hamming_similarity(a, b, 8, *p) for b in db_signs] for a in q_signs])
    assert not np.array_equal(want, padded)  # the test tells the true D from the padded one
    assert np.count_nonzero(want > 0) > 20
    # u is 1, 0 or -1 here, so the reference is exact: compare the numbers and the order
    order = np.array([sorted(range(40), key=lambda j: (-row[j], j)) for row in want.tolist()])
    for index in (ivf, back):
        for backend in ("numba", "numpy"):
            np.testing.assert_array_equal(index.scores(q, backend=backend), want)
            ids, sc = index.search(q, backend=backend)
            np.testing.assert_array_equal(ids, order)
            np.testing.assert_array_equal(sc, np.take_along_axis(want, order, axis=1))
    # an index whose data do not fit its D is refused instead of scored wrongly
    with pytest.raises(ValueError, match="need 2 bytes a row"):
        dataclasses.replace(ivf, dim=9)
    with pytest.raises(ValueError, match="padding bits after bit D=2"):
        dataclasses.replace(ivf, data=ivf.data | np.uint8(1))


@pytest.mark.parametrize("d", [32, 13])
def test_scores_from_memmapped_index_and_regional_pooling(tmp_path: Path, d: int) -> None:
    rng = np.random.default_rng(1)
    k = 24
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((3, 30, d)).astype(np.float32)
    items = aggregate_many(_images(rng, 50, d, protos), cb, "asmk_star")
    item_image = np.repeat(np.arange(20), np.r_[np.full(10, 3), np.full(10, 2)])
    q = aggregate_many(_images(rng, 5, d, protos), cb, "asmk_star")
    for pooling in ("max", "avg"):
        ivf = InvertedFile.build(items, k, "asmk_star", item_image=item_image, pooling=pooling)
        back = InvertedFile.load(ivf.save(tmp_path / pooling))  # read-only memory maps
        assert back.dim == d
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


@pytest.mark.parametrize("d", [16, 13])
@pytest.mark.parametrize("kernel", KERNELS)
def test_aggregation_equals_numpy_reference(
    kernel: str, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled residual sums == the sparse-product reference, across chunk boundaries."""
    rng = np.random.default_rng(3)
    k = 20
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
        got = nearest_word(x, cb, block=block)
        # float32 rounding may only swap near-ties: the chosen word is as near as the best
        same = got == want
        assert same.mean() > 0.99
        np.testing.assert_allclose(
            dist[np.arange(700), got], dist[np.arange(700), want], rtol=1e-5, atol=1e-5
        )
    ties = np.repeat(cb[:1], 2, axis=0)  # two identical codewords: the first wins
    assert nearest_word(cb[:1] + 0.01, np.concatenate([ties, cb[1:]]), block=1)[0] == 0


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
