"""Kernels (VLAD, ASMK, ASMK*, regional) and similarity against slow loop references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from retrieval.index.aggregation import (
    KERNEL_SIMILARITY,
    KERNELS,
    ZERO_NORM,
    AggregatedBatch,
    AggregatedImage,
    aggregate,
    aggregate_many,
    assign,
    pack_signs,
    packed_width,
    selectivity,
    similarity,
)

# ---------------------------------------------------------------- slow, obviously-correct refs


def ref_assign(x: np.ndarray, cb: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((x.shape[0], m), np.int64)
    for i in range(x.shape[0]):
        d = [float(np.sum((x[i].astype(np.float64) - c) ** 2)) for c in cb.astype(np.float64)]
        out[i] = np.argsort(d, kind="stable")[:m]
    return out


def ref_residual_sums(x: np.ndarray, cb: np.ndarray, m: int) -> dict[int, np.ndarray]:
    sums: dict[int, np.ndarray] = {}
    for i, ws in enumerate(ref_assign(x, cb, m)):
        for w in ws:
            sums.setdefault(int(w), np.zeros(cb.shape[1]))
            sums[int(w)] += x[i].astype(np.float64) - cb[w]
    return {w: s for w, s in sums.items() if np.linalg.norm(s) > ZERO_NORM}


def ref_pack(bits: np.ndarray) -> np.ndarray:
    """MSB-first packing of a (D,) 0/1 vector, one byte at a time; bits past D are 0."""
    out = []
    for j in range(0, bits.size, 8):
        out.append(sum(int(bits[j + t]) << (7 - t) for t in range(8) if j + t < bits.size))
    return np.array(out, np.uint8)


def ref_vlad_words(x: np.ndarray, cb: np.ndarray, m: int) -> dict[int, np.ndarray]:
    sums = ref_residual_sums(x, cb, m)
    tot = math.sqrt(sum(float(np.sum(s**2)) for s in sums.values()))
    return {w: s / tot for w, s in sums.items()}


def ref_aggregate(x: np.ndarray, cb: np.ndarray, kernel: str, m: int = 1) -> AggregatedImage:
    if kernel == "vlad":
        d = ref_vlad_words(x, cb, m)
    else:
        d = {w: s / np.linalg.norm(s) for w, s in ref_residual_sums(x, cb, m).items()}
    words = sorted(d)
    if kernel == "asmk_star":
        data: np.ndarray = np.array([ref_pack(d[w] > 0) for w in words], np.uint8)
        data = data.reshape(len(words), math.ceil(cb.shape[1] / 8))
    else:
        data = np.array([d[w] for w in words], np.float32).reshape(len(words), cb.shape[1])
    return AggregatedImage(np.array(words, np.uint32), data, dim=cb.shape[1])


def ref_regional(regions: list[np.ndarray], cb: np.ndarray, kernel: str) -> AggregatedImage:
    acc: dict[int, np.ndarray] = {}
    for r in regions:
        for w, v in ref_vlad_words(r, cb, 1).items():
            acc[w] = acc.get(w, np.zeros(cb.shape[1])) + v / len(regions)
    acc = {w: v for w, v in acc.items() if np.linalg.norm(v) > ZERO_NORM}
    words = sorted(acc)
    if kernel == "r_vlad":
        tot = math.sqrt(sum(float(np.sum(v**2)) for v in acc.values()))
        rows = [acc[w] / tot for w in words]
    else:
        rows = [acc[w] / np.linalg.norm(acc[w]) for w in words]
    if kernel == "r_asmk_star":
        data: np.ndarray = np.array([ref_pack(r > 0) for r in rows], np.uint8)
        data = data.reshape(len(words), math.ceil(cb.shape[1] / 8))
    else:
        data = np.array(rows, np.float32).reshape(len(words), cb.shape[1])
    return AggregatedImage(np.array(words, np.uint32), data, dim=cb.shape[1])


def ref_similarity(
    a: AggregatedImage, b: AggregatedImage, alpha: float, tau: float, normalize: bool
) -> float:
    if a.n_words == 0 or b.n_words == 0:
        return -1.0
    total = 0.0
    for i, w in enumerate(a.words):
        hits = np.nonzero(b.words == w)[0]
        if not hits.size:
            continue
        j = hits[0]
        if a.binary:
            # the D sign bits only (the padding of the last byte is not a descriptor bit)
            ba = np.unpackbits(a.data[i], count=a.dim)
            bb = np.unpackbits(b.data[j], count=b.dim)
            h = int(sum(int(p != q) for p, q in zip(ba, bb, strict=True)))
            u = 1.0 - 2.0 * h / a.dim
        else:
            u = float(sum(float(p) * float(q) for p, q in zip(a.data[i], b.data[j], strict=True)))
        if u > tau:
            total += math.copysign(abs(u) ** alpha, u)
    if normalize:
        total /= math.sqrt(a.n_words * b.n_words)
    return total


def _data(rng: np.random.Generator, n: int, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    cb = rng.standard_normal((k, d)).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, cb


# ---------------------------------------------------------------- tests


class TestAssign:
    @pytest.mark.parametrize("m", [1, 3])
    def test_matches_bruteforce(self, m: int) -> None:
        rng = np.random.default_rng(0)
        x, cb = _data(rng, 60, 17, 12)
        np.testing.assert_array_equal(assign(x, cb, m), ref_assign(x, cb, m))

    def test_exception(self) -> None:
        x, cb = _data(np.random.default_rng(1), 5, 4, 8)
        with pytest.raises(ValueError, match="descriptors must be"):
            assign(x[:, :4], cb)
        with pytest.raises(ValueError, match="num_assignments"):
            assign(x, cb, 5)


class TestAggregate:
    @pytest.mark.parametrize(
        ("kernel", "n", "k", "d", "m"),
        [
            (kern, n, k, d, m)
            for kern, (n, k, d), m in itertools.product(
                ("vlad", "asmk", "asmk_star"),
                [
                    (0, 4, 8),
                    (1, 4, 8),
                    (7, 1, 16),
                    (50, 5, 16),
                    (200, 64, 64),
                    (120, 32, 128),
                    # D not a multiple of 8 (the last byte of binary words zero-padded)
                    (30, 5, 1),
                    (30, 5, 2),
                    (40, 6, 3),
                    (40, 6, 7),
                    (60, 8, 13),
                    (60, 8, 100),
                ],
                (1, 2),
            )
            if not (k == 1 and m == 2)
        ],
    )
    def test_matches_loop_reference(self, kernel: str, n: int, k: int, d: int, m: int) -> None:
        rng = np.random.default_rng(n * 1000 + k * 10 + d + m)
        x, cb = _data(rng, n, k, d)
        got = aggregate(x, cb, kernel, num_assignments=m)
        ref = ref_aggregate(x, cb, kernel, m)
        np.testing.assert_array_equal(got.words, ref.words)
        assert got.words.dtype == np.uint32
        assert got.dim == d
        if kernel == "asmk_star":
            assert got.data.dtype == np.uint8 and got.data.shape == (ref.n_words, -(-d // 8))
            np.testing.assert_array_equal(got.data, ref.data)
        else:
            assert got.data.dtype == np.float32
            np.testing.assert_allclose(got.data, ref.data, rtol=1e-5, atol=1e-6)

    def test_zero_residual_word_dropped(self) -> None:
        cb = np.eye(8, dtype=np.float32)
        x = np.stack([cb[2], cb[5] + 0.1]).astype(np.float32)  # word 2 residual is exactly 0
        for kernel in ("vlad", "asmk", "asmk_star"):
            a = aggregate(x, cb, kernel)
            assert a.words.tolist() == [5]
        # two descriptors cancelling each other in one word
        y = np.stack([cb[3] + 0.2 * cb[0], cb[3] - 0.2 * cb[0], cb[1] + 0.3]).astype(np.float32)
        assert aggregate(y, cb, "asmk").words.tolist() == [1]

    def test_asmk_words_unit_norm_vlad_global_norm(self) -> None:
        x, cb = _data(np.random.default_rng(3), 300, 20, 32)
        a = aggregate(x, cb, "asmk")
        np.testing.assert_allclose(np.linalg.norm(a.data, axis=1), 1.0, rtol=1e-5)
        v = aggregate(x, cb, "vlad")
        assert abs(float(np.sum(v.data.astype(np.float64) ** 2)) - 1.0) < 1e-5

    def test_batch_equals_single(self) -> None:
        rng = np.random.default_rng(4)
        cb = rng.standard_normal((32, 16)).astype(np.float32)
        imgs = [rng.standard_normal((int(c), 16)).astype(np.float32) for c in (0, 5, 40, 1, 0, 77)]
        for kernel in KERNELS:
            batch = aggregate_many(imgs, cb, kernel)
            assert batch.n_images == len(imgs)
            for i, x in enumerate(imgs):
                one = aggregate(x, cb, kernel)
                np.testing.assert_array_equal(batch.image(i).words, one.words)
                np.testing.assert_array_equal(batch.image(i).data, one.data)

    def test_chunked_assignment_same_result(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import retrieval.index.aggregation as agg

        rng = np.random.default_rng(5)
        cb = rng.standard_normal((16, 8)).astype(np.float32)
        imgs = [rng.standard_normal((int(c), 8)).astype(np.float32) for c in (30, 3, 50, 9)]
        full = aggregate_many(imgs, cb, "asmk")
        monkeypatch.setattr(agg, "_ASSIGN_CHUNK", 7)  # smaller than an image: split on images
        small = aggregate_many(imgs, cb, "asmk")
        np.testing.assert_array_equal(full.offsets, small.offsets)
        np.testing.assert_array_equal(full.words, small.words)
        np.testing.assert_allclose(full.data, small.data, rtol=1e-6)

    @pytest.mark.parametrize("d", [16, 3, 13])
    @pytest.mark.parametrize("kernel", ["r_vlad", "r_asmk", "r_asmk_star"])
    def test_regional_matches_loop_reference(self, kernel: str, d: int) -> None:
        rng = np.random.default_rng(6 + d)
        x, cb = _data(rng, 80, 12, d)
        regions = [x, x[:30], x[50:], x[:0]]
        got = aggregate(x, cb, kernel, regions=regions)
        ref = ref_regional(regions, cb, kernel)
        np.testing.assert_array_equal(got.words, ref.words)
        if kernel == "r_asmk_star":
            np.testing.assert_array_equal(got.data, ref.data)
        else:
            np.testing.assert_allclose(got.data, ref.data, rtol=1e-5, atol=1e-6)

    def test_single_region_equals_global_kernel(self) -> None:
        x, cb = _data(np.random.default_rng(7), 100, 16, 16)
        for reg, glob in (("r_asmk", "asmk"), ("r_asmk_star", "asmk_star"), ("r_vlad", "vlad")):
            a, b = aggregate(x, cb, reg), aggregate(x, cb, glob)
            np.testing.assert_array_equal(a.words, b.words)
            np.testing.assert_allclose(a.data.astype(np.float64), b.data, rtol=1e-5, atol=1e-6)

    def test_exception(self) -> None:
        x, cb = _data(np.random.default_rng(8), 10, 4, 12)
        with pytest.raises(ValueError, match="unknown kernel"):
            aggregate(x, cb, "bow")
        with pytest.raises(ValueError, match=r"D >= 1"):
            aggregate(x[:, :0], cb[:, :0], "asmk_star")
        with pytest.raises(ValueError, match="not regional"):
            aggregate(x, cb, "asmk", regions=[x])
        with pytest.raises(ValueError, match=r"\(N, 12\)"):
            aggregate(x[:, :5], cb, "asmk")
        bad = x.copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            aggregate(bad, cb, "vlad")


class TestPackSigns:
    @pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 9, 13, 100, 128])
    def test_matches_packbits_and_loop(self, d: int) -> None:
        r = np.random.default_rng(d).standard_normal((20, d)).astype(np.float32)
        r[0] = 0.0  # zero is not > 0
        got = pack_signs(r)
        assert got.dtype == np.uint8 and got.shape == (20, packed_width(d))
        np.testing.assert_array_equal(got, np.packbits(r > 0, axis=1, bitorder="big"))
        np.testing.assert_array_equal(got, np.stack([ref_pack(row > 0) for row in r]))
        np.testing.assert_array_equal(np.unpackbits(got, axis=1, count=d), r > 0)
        assert not np.any(np.unpackbits(got, axis=1)[:, d:])  # zero padding

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="D >= 1"):
            pack_signs(np.zeros((3, 0), np.float32))
        with pytest.raises(ValueError, match="D >= 1"):
            pack_signs(np.zeros(3, np.float32))
        with pytest.raises(ValueError, match=">= 1"):
            packed_width(0)


class TestAggregatedImage:
    def test_construct_from_arrays(self) -> None:
        a = AggregatedImage(np.array([1, 5, 9]), np.ones((3, 4), np.float64))
        assert a.words.dtype == np.uint32 and a.data.dtype == np.float32
        assert (a.n_words, a.dim, a.binary) == (3, 4, False)
        b = AggregatedImage(np.array([2]), np.zeros((1, 16), np.uint8))
        assert (b.dim, b.binary) == (128, True)
        c = AggregatedImage(np.array([2]), np.array([[0xFF, 0b11100000]], np.uint8), dim=11)
        assert (c.dim, c.binary) == (11, True)
        assert AggregatedImage(np.array([2]), np.ones((1, 4)), dim=4).dim == 4

    def test_dim_exception(self) -> None:
        bits = np.array([[0b11000000]], np.uint8)
        with pytest.raises(ValueError, match="padding bits after bit D=2"):
            AggregatedImage(np.array([0]), bits | 1, dim=2)
        with pytest.raises(ValueError, match="need 2 bytes a row"):
            AggregatedImage(np.array([0]), bits, dim=9)
        with pytest.raises(ValueError, match=r"\(n_words, 5\)"):
            AggregatedImage(np.array([0]), np.ones((1, 4)), dim=5)
        with pytest.raises(ValueError, match="padding bits"):
            AggregatedBatch(np.array([0, 1]), np.array([0], np.uint32), bits | 0b100000, 2)
        with pytest.raises(ValueError, match="need 1 bytes a row"):
            AggregatedBatch(
                np.array([0, 1]), np.array([0], np.uint32), np.zeros((1, 2), np.uint8), 3
            )
        with pytest.raises(ValueError, match=r"\(n_rows, 3\)"):
            AggregatedBatch(np.array([0, 1]), np.array([0], np.uint32), np.ones((1, 4)), 3)
        with pytest.raises(ValueError, match="integer >= 1"):
            AggregatedBatch(np.array([0, 1]), np.array([0], np.uint32), bits, 0)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="sorted and unique"):
            AggregatedImage(np.array([3, 1]), np.ones((2, 4)))
        with pytest.raises(ValueError, match="sorted and unique"):
            AggregatedImage(np.array([1, 1]), np.ones((2, 4)))
        with pytest.raises(ValueError, match="n_words=2"):
            AggregatedImage(np.array([1, 2]), np.ones((3, 4)))
        with pytest.raises(ValueError, match=r"float .* or uint8"):
            AggregatedImage(np.array([1]), np.ones((1, 4), np.int32))

    def test_batch_roundtrip(self) -> None:
        ims = [
            AggregatedImage(np.array([0, 4]), np.ones((2, 8))),
            AggregatedImage(np.zeros(0, np.uint32), np.zeros((0, 8))),
            AggregatedImage(np.array([7]), np.full((1, 8), 2.0)),
        ]
        b = AggregatedBatch.from_images(ims)
        assert b.offsets.tolist() == [0, 2, 2, 3]
        c = AggregatedBatch.concatenate([b, b])
        assert c.n_images == 6 and c.image(5).words.tolist() == [7]


class TestSimilarity:
    def test_selectivity_values(self) -> None:
        u = np.array([-0.5, 0.0, 0.5, 1.0])
        np.testing.assert_allclose(selectivity(u, 3.0, 0.0), [0.0, 0.0, 0.125, 1.0])
        np.testing.assert_allclose(selectivity(u, 3.0, -np.inf), [-0.125, 0.0, 0.125, 1.0])
        np.testing.assert_allclose(selectivity(u, 1.0, 0.4), [0.0, 0.0, 0.5, 1.0])

    @pytest.mark.parametrize("kernel", KERNELS)
    @pytest.mark.parametrize(
        ("d", "k"),
        [(8, 3), (16, 10), (64, 32), (128, 64), (1, 3), (2, 4), (3, 4), (7, 5), (13, 8), (100, 16)],
    )
    def test_matches_loop_reference(self, kernel: str, d: int, k: int) -> None:
        rng = np.random.default_rng(d + k)
        cb = rng.standard_normal((k, d)).astype(np.float32)
        base = rng.standard_normal((60, d)).astype(np.float32)
        a = aggregate(base, cb, kernel)
        b = aggregate(base + 0.3 * rng.standard_normal(base.shape).astype(np.float32), cb, kernel)
        for params in (
            KERNEL_SIMILARITY[kernel],
            {"alpha": 3.0, "tau": 0.0, "normalize": True},
            {"alpha": 2.0, "tau": -0.2, "normalize": False},
        ):
            got = similarity(a, b, **params)
            ref = ref_similarity(
                a, b, float(params["alpha"]), float(params["tau"]), bool(params["normalize"])
            )
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)

    def test_self_similarity_is_one(self) -> None:
        x, cb = _data(np.random.default_rng(9), 100, 16, 32)
        for kernel in ("vlad", "asmk", "asmk_star"):
            a = aggregate(x, cb, kernel)
            assert similarity(a, a, **KERNEL_SIMILARITY[kernel]) == pytest.approx(1.0, abs=1e-6)

    def test_empty_scores_minus_one(self) -> None:
        x, cb = _data(np.random.default_rng(10), 20, 4, 16)
        a, e = aggregate(x, cb, "asmk_star"), aggregate(x[:0], cb, "asmk_star")
        assert similarity(a, e) == -1.0 and similarity(e, a) == -1.0 and similarity(e, e) == -1.0

    def test_hamming_known_value(self) -> None:
        a = AggregatedImage(np.array([3]), np.array([[0b11110000, 0]], np.uint8))
        b = AggregatedImage(np.array([3]), np.array([[0b11000000, 1]], np.uint8))
        # h = 3 of D = 16: u = 1 - 6/16 = 0.625
        assert similarity(a, b, alpha=1.0, tau=-1.0, normalize=False) == pytest.approx(0.625)
        assert similarity(a, b) == pytest.approx(0.625**3)

    def test_hamming_over_true_dimension(self) -> None:
        """Padding bits agree but are not descriptor bits: u = 1 - 2h/D with the true D."""
        a = AggregatedImage(np.array([3]), np.array([[0b11000000]], np.uint8), dim=3)
        b = AggregatedImage(np.array([3]), np.array([[0b10000000]], np.uint8), dim=3)
        # h = 1 of D = 3: u = 1/3 (over 8 padded bits it would be 1 - 2/8 = 0.75)
        assert similarity(a, b, alpha=1.0, tau=-1.0, normalize=False) == 1.0 - 2.0 / 3.0
        c = AggregatedImage(np.array([3]), np.array([[0b10000000]], np.uint8), dim=2)
        d = AggregatedImage(np.array([3]), np.array([[0b01000000]], np.uint8), dim=2)
        assert similarity(c, d, alpha=1.0, tau=-np.inf, normalize=False) == -1.0  # opposite
        assert similarity(c, d) == 0.0  # below tau = 0: no contribution
        with pytest.raises(ValueError, match="dimensions differ"):
            similarity(a, c)

    def test_exception(self) -> None:
        a = AggregatedImage(np.array([1]), np.ones((1, 8), np.float32))
        b = AggregatedImage(np.array([1]), np.ones((1, 1), np.uint8))
        with pytest.raises(ValueError, match="binary"):
            similarity(a, b)
