"""Inverted file: same scores and order as brute-force similarity, top-k ties, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import retrieval.index.inverted_file as ivf_mod
from retrieval.index.aggregation import (
    KERNEL_SIMILARITY,
    KERNELS,
    AggregatedBatch,
    AggregatedImage,
    aggregate_many,
    similarity,
)
from retrieval.index.inverted_file import InvertedFile, top_k


def _world(
    seed: int, kernel: str, n_db: int = 60, n_q: int = 9, k: int = 48, d: int = 16
) -> tuple[AggregatedBatch, AggregatedBatch, np.ndarray]:
    rng = np.random.default_rng(seed)
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((5, 40, d)).astype(np.float32)

    def img() -> np.ndarray:
        p = protos[rng.integers(5)]
        n = int(rng.integers(0, 40))
        return (p[rng.permutation(40)[:n]] + 0.4 * rng.standard_normal((n, d))).astype(np.float32)

    db = [img() for _ in range(n_db)]
    db[3] = db[7].copy()  # an exact duplicate: ties must be broken by image id
    qs = [img() for _ in range(n_q)]
    qs[0] = qs[0][:0]  # an empty query
    return aggregate_many(db, cb, kernel), aggregate_many(qs, cb, kernel), cb


def brute_scores(db: AggregatedBatch, q: AggregatedBatch, **params: object) -> np.ndarray:
    return np.array(
        [
            [
                similarity(q.image(i), db.image(j), **params)  # type: ignore[arg-type]
                for j in range(db.n_images)
            ]
            for i in range(q.n_images)
        ]
    )


def brute_order(scores: np.ndarray) -> np.ndarray:
    """Sort each row by (-score, image id) with Python's sort: the obvious reference."""
    rows = []
    for row in scores:
        vals = [float(v) for v in row]
        rows.append(sorted(range(len(vals)), key=lambda j: (-vals[j], j)))
    return np.array(rows)


class TestSearch:
    @pytest.mark.parametrize("kernel", KERNELS)
    def test_same_scores_same_order_as_bruteforce(self, kernel: str) -> None:
        db, q, cb = _world(1, kernel)
        ivf = InvertedFile.build(db, cb.shape[0], kernel)
        ref = brute_scores(db, q, **KERNEL_SIMILARITY[kernel])
        got = ivf.scores(q)
        np.testing.assert_array_equal(got, ref)
        ids, sc = ivf.search(q)
        np.testing.assert_array_equal(ids, brute_order(ref))
        np.testing.assert_array_equal(sc, np.take_along_axis(ref, ids, axis=1))
        assert np.all(got[0] == -1.0)  # the empty query

    @pytest.mark.parametrize(
        ("alpha", "tau", "normalize"), [(1.0, -np.inf, True), (2.0, 0.25, False)]
    )
    def test_parameters(self, alpha: float, tau: float, normalize: bool) -> None:
        db, q, cb = _world(2, "asmk_star")
        ivf = InvertedFile.build(
            db, cb.shape[0], "asmk_star", alpha=alpha, tau=tau, normalize=normalize
        )
        ref = brute_scores(db, q, alpha=alpha, tau=tau, normalize=normalize)
        np.testing.assert_array_equal(ivf.scores(q), ref)

    @pytest.mark.parametrize("d", [8, 24, 48, 64, 192, 320])
    def test_binary_lanes_and_table(self, d: int) -> None:
        """Binary search by popcount on 8- to 64-bit lanes and a selectivity table: the same
        numbers as the brute force, for every lane width and a non-integer alpha."""
        db, q, cb = _world(11, "asmk_star", d=d)
        for alpha, tau in ((3.0, 0.0), (2.5, -0.3)):
            ivf = InvertedFile.build(db, cb.shape[0], "asmk_star", alpha=alpha, tau=tau)
            ref = brute_scores(db, q, alpha=alpha, tau=tau, normalize=True)
            np.testing.assert_array_equal(ivf.scores(q), ref)
            np.testing.assert_array_equal(ivf.search(q, batch_size=1)[0], brute_order(ref))

    def test_scratch_buffers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Reused per-thread scratch: same numbers across calls of other sizes, across threads,
        and when buffers are too big to keep."""
        from concurrent.futures import ThreadPoolExecutor

        db, q, cb = _world(12, "asmk_star", d=128)
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star")
        ref = brute_scores(db, q, **KERNEL_SIMILARITY["asmk_star"])
        singles = [ivf.scores([im]) for im in q.images()]  # shrinking and growing buffers
        np.testing.assert_array_equal(np.concatenate(singles), ref)
        with ThreadPoolExecutor(4) as pool:
            for got in pool.map(lambda _: ivf.scores(q), range(16)):
                np.testing.assert_array_equal(got, ref)
        monkeypatch.setattr(ivf_mod, "_SCRATCH_KEEP", 64)
        np.testing.assert_array_equal(ivf.scores(q), ref)

    def test_duplicate_images_tie_by_id(self) -> None:
        db, q, cb = _world(3, "asmk_star")
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star")
        ids, _ = ivf.search(q)
        for row in ids[1:]:
            pos = {int(v): i for i, v in enumerate(row)}
            assert pos[3] + 1 == pos[7] or pos[3] < pos[7]

    def test_small_gather_chunks_and_batches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        db, q, cb = _world(4, "asmk")
        ivf = InvertedFile.build(db, cb.shape[0], "asmk")
        full = ivf.scores(q)
        monkeypatch.setattr(ivf_mod, "_GATHER_CHUNK", 5)
        np.testing.assert_array_equal(ivf.scores(q), full)
        ids1, _ = ivf.search(q, batch_size=1)
        ids9, _ = ivf.search(q, batch_size=9)
        np.testing.assert_array_equal(ids1, ids9)

    def test_list_of_images_as_queries(self) -> None:
        db, q, cb = _world(5, "asmk_star")
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star")
        np.testing.assert_array_equal(ivf.scores(q.images()), ivf.scores(q))

    def test_exception(self) -> None:
        db, _, cb = _world(6, "asmk_star")
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star")
        fq = AggregatedBatch.from_images([AggregatedImage(np.array([1]), np.ones((1, 16)))])
        with pytest.raises(ValueError, match="do not match the index"):
            ivf.scores(fq)
        with pytest.raises(ValueError, match="codebook_size"):
            InvertedFile.build(db, 4, "asmk_star")


class TestTopK:
    def test_partial_is_prefix_of_full(self) -> None:
        rng = np.random.default_rng(7)
        s = rng.integers(0, 4, size=(6, 50)).astype(np.float64)  # many ties
        full = top_k(s)
        np.testing.assert_array_equal(full, brute_order(s))
        for k in (1, 3, 10, 49, 50, 80):
            np.testing.assert_array_equal(top_k(s, k), full[:, : min(k, 50)])

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="k must be"):
            top_k(np.zeros((1, 5)), 0)
        with pytest.raises(ValueError, match="n_queries, n_images"):
            top_k(np.zeros(5), 2)


class TestFiles:
    def test_roundtrip_mmap(self, tmp_path: Path) -> None:
        db, q, cb = _world(8, "asmk_star")
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star", meta={"config_hash": "abc"})
        path = ivf.save(tmp_path / "idx")
        back = InvertedFile.load(path)
        assert isinstance(back.data, np.memmap)
        np.testing.assert_array_equal(back.scores(q), ivf.scores(q))
        assert back.meta["config_hash"] == "abc" and back.kernel == "asmk_star"
        vdb, _, vcb = _world(8, "vlad")
        vl = InvertedFile.build(vdb, vcb.shape[0], "vlad")
        assert np.isneginf(InvertedFile.load(vl.save(tmp_path / "v")).tau)

    def test_bytes_per_image(self) -> None:
        db, _, cb = _world(9, "asmk_star", d=128)
        ivf = InvertedFile.build(db, cb.shape[0], "asmk_star")
        n_post = int(db.words.size)
        # per word, its ids as the first id then the gaps, each in 1, 2 or 4 bytes (the width
        # holding the word's largest gap), worked out here the plain way
        owner = np.repeat(np.arange(db.n_images), np.diff(db.offsets))
        id_bytes = 0
        for w in range(cb.shape[0]):
            ids = sorted(int(i) for i in owner[db.words == w])
            gaps = [b - a for a, b in zip([0, *ids][:-1], ids, strict=True)]
            width = 1 if max(gaps, default=0) < 256 else 2 if max(gaps) < 65536 else 4
            id_bytes += width * len(ids)
        # 16 bytes of bits per posting, the ids, 8 per word offset (postings and id bytes),
        # 4 per image.
        expect = n_post * 16 + id_bytes + 2 * (cb.shape[0] + 1) * 8 + db.n_images * 4
        assert ivf.nbytes == expect == ivf.stats()["bytes"]
        assert ivf.bytes_per_image == pytest.approx(expect / db.n_images)
        # before the encoding: 4 bytes an id, one offsets array
        before = n_post * (16 + 4) + (cb.shape[0] + 1) * 8 + db.n_images * 4
        assert id_bytes == n_post  # 60 images: every gap fits a byte
        assert ivf.nbytes < before

    def test_wrong_version(self, tmp_path: Path) -> None:
        db, _, cb = _world(10, "asmk")
        path = InvertedFile.build(db, cb.shape[0], "asmk").save(tmp_path / "idx")
        h = json.loads((path / "header.json").read_text())
        h["format_version"] = 99
        (path / "header.json").write_text(json.dumps(h))
        with pytest.raises(ValueError, match="format_version 99"):
            InvertedFile.load(path)

    @pytest.mark.parametrize("mmap", [True, False])
    def test_truncated(self, tmp_path: Path, mmap: bool) -> None:
        db, _, cb = _world(11, "asmk")
        path = InvertedFile.build(db, cb.shape[0], "asmk").save(tmp_path / "idx")
        f = path / "data.npy"
        f.write_bytes(f.read_bytes()[:-100])
        with pytest.raises(ValueError, match=r"data\.npy"):
            InvertedFile.load(path, mmap=mmap)

    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            InvertedFile.load(tmp_path / "nothing")
        db, _, cb = _world(12, "asmk")
        path = InvertedFile.build(db, cb.shape[0], "asmk").save(tmp_path / "idx")
        (path / "id_stream.npy").unlink()
        with pytest.raises(ValueError, match=r"id_stream\.npy is missing"):
            InvertedFile.load(path)
