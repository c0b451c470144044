"""Search that scales: sparse top-k and full ranking, threads, delta-encoded ids, old files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.index._kernels import decode_ids
from retrieval.index.aggregation import AggregatedBatch, aggregate_many, similarity
from retrieval.index.inverted_file import (
    FORMAT_VERSION,
    InvertedFile,
    decode_posting_ids,
    encode_posting_ids,
)


def _world(
    seed: int, n_db: int = 80, n_q: int = 8, k: int = 40, d: int = 32
) -> tuple[AggregatedBatch, AggregatedBatch, int]:
    """Landmark-like images with exact duplicates, images and a query without descriptors."""
    rng = np.random.default_rng(seed)
    cb = rng.standard_normal((k, d)).astype(np.float32)
    protos = rng.standard_normal((4, 30, d)).astype(np.float32)

    def img() -> np.ndarray:
        p = protos[rng.integers(4)]
        n = int(rng.integers(0, 25))
        return (p[rng.permutation(30)[:n]] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)

    db = [img() for _ in range(n_db)]
    db[5] = db[2].copy()  # duplicates: equal scores, ties by id
    db[9] = db[2].copy()
    db[11] = db[11][:0]  # images without words score -1
    db[12] = db[12][:0]
    qs = [img() for _ in range(n_q)]
    qs[1] = qs[1][:0]  # a query without words: every image -1, ids in order
    return aggregate_many(db, cb, "asmk_star"), aggregate_many(qs, cb, "asmk_star"), k


def dense_reference(db: AggregatedBatch, q: AggregatedBatch, **params: float) -> np.ndarray:
    """The score of every (query, image) pair by ``similarity``, one pair at a time."""
    return np.array(
        [
            [similarity(q.image(i), db.image(j), **params) for j in range(db.n_images)]  # type: ignore[arg-type]
            for i in range(q.n_images)
        ]
    )


def stable_order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


class TestRanking:
    @pytest.mark.parametrize(
        ("alpha", "tau", "normalize"),
        [(3.0, 0.0, True), (3.0, -np.inf, True), (2.0, 0.3, False), (1.0, -np.inf, False)],
    )
    def test_top_k_and_full_ranking_equal_dense_reference(
        self, alpha: float, tau: float, normalize: bool
    ) -> None:
        """Top-k for every k and the full ranking: the ids and scores of a stable argsort of
        the dense score matrix, with ties, negative scores (tau = -inf), images and a query
        without words, and unnormalised sums."""
        db, q, k = _world(1)
        ivf = InvertedFile.build(db, k, "asmk_star", alpha=alpha, tau=tau, normalize=normalize)
        ref = dense_reference(db, q, alpha=alpha, tau=tau, normalize=normalize)
        order = stable_order(ref)
        assert np.count_nonzero(ref > 0) > 100 and np.count_nonzero(ref == 0) > 20
        if np.isneginf(tau):
            assert np.count_nonzero((ref < 0) & (ref > -1)) > 10  # touched, below untouched
        assert np.all(ref[1] == -1.0) and np.all(ref[:, 11] == -1.0)
        for kk in (None, 1, 2, 7, 40, 79, 80, 500):
            ids, sc = ivf.search(q, kk, num_threads=2, batch_size=3)
            want = order if kk is None else order[:, :kk]
            np.testing.assert_array_equal(ids, want)
            np.testing.assert_array_equal(sc, np.take_along_axis(ref, want, axis=1))
            dense = ivf.search(q, kk, backend="numpy", num_threads=1)  # the dense path
            np.testing.assert_array_equal(dense[0], want)
            np.testing.assert_array_equal(dense[1], sc)
        ids, _ = ivf.search(q, 5)
        np.testing.assert_array_equal(ids[1], np.arange(5))  # the empty query
        for row in ivf.search(q)[0]:  # the duplicates 2, 5, 9: ties by ascending id
            pos = [int(np.flatnonzero(row == j)[0]) for j in (2, 5, 9)]
            assert pos == sorted(pos)

    def test_larger_index_full_ranking_byte_identical(self) -> None:
        """600 images, 64 queries: the full ranking of the sparse path is byte for byte the
        ranking of the dense path (the pre-existing one: dense scores + radix sort)."""
        db, q, k = _world(2, n_db=600, n_q=64, k=64)
        ivf = InvertedFile.build(db, k, "asmk_star")
        dense = ivf.scores(q)
        want = stable_order(dense)
        ids, sc = ivf.search(q)
        assert ids.tobytes() == want.tobytes() and ids.dtype == np.int64
        assert sc.tobytes() == np.take_along_axis(dense, want, axis=1).tobytes()
        for kk in (1, 10, 100):
            np.testing.assert_array_equal(ivf.search(q, kk)[0], want[:, :kk])

    def test_near_ties_in_the_last_bits(self) -> None:
        """D = 100, alpha 1, no normalisation: sums of u = 1 - h/50 that are equal on paper but
        rounded apart in the last bits, in runs of more than 32 scores sharing their upper 32
        bits (the radix sort's fix-up passes): the order of a stable argsort, id for id."""
        rng = np.random.default_rng(9)
        n, k, d = 3000, 6, 100
        per = rng.integers(1, 5, n)
        words = np.concatenate([np.sort(rng.choice(k, c, replace=False)) for c in per])
        offsets = np.r_[0, np.cumsum(per)].astype(np.int64)
        bits = rng.integers(0, 256, (words.size, 13), dtype=np.uint8)
        bits[:, 12] &= 0xF0  # D = 100: the last 4 bits are padding
        db = AggregatedBatch(offsets=offsets, words=words.astype(np.uint32), data=bits, dim=d)
        q = AggregatedBatch(
            offsets=np.array([0, k, 2 * k], np.int64),
            words=np.tile(np.arange(k, dtype=np.uint32), 2),
            data=bits[: 2 * k] ^ np.uint8(0),
            dim=d,
        )
        ivf = InvertedFile.build(db, k, "asmk_star", alpha=1.0, tau=-np.inf, normalize=False)
        dense = ivf.scores(q)
        row = np.sort(dense[0])
        upper = row.view(np.uint64) >> np.uint64(32)
        same = np.flatnonzero(upper[1:] == upper[:-1])
        assert np.count_nonzero(row[1:][same] != row[:-1][same]) > 50  # near ties exist
        _, run_len = np.unique(upper, return_counts=True)
        assert run_len.max() > 32
        want = stable_order(dense)
        ids, sc = ivf.search(q)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(sc, np.take_along_axis(dense, want, axis=1))
        np.testing.assert_array_equal(ivf.search(q, 500)[0], want[:, :500])

    def test_thread_count_does_not_change_results(self) -> None:
        db, q, k = _world(3, n_db=300, n_q=37, k=48)
        ivf = InvertedFile.build(db, k, "asmk_star")
        base_ids, base_sc = ivf.search(q, 25, num_threads=1, batch_size=64)
        assert np.count_nonzero(base_sc > 0) > 500
        for threads in (2, 3, 8):
            for batch in (1, 4, 64):
                for backend in ("numba", "numpy"):
                    ids, sc = ivf.search(
                        q, 25, num_threads=threads, batch_size=batch, backend=backend
                    )
                    np.testing.assert_array_equal(ids, base_ids)
                    np.testing.assert_array_equal(sc, base_sc)
        full1 = ivf.search(q, num_threads=1)[0]
        np.testing.assert_array_equal(ivf.search(q, num_threads=4, batch_size=2)[0], full1)

    def test_exception(self) -> None:
        db, q, k = _world(4)
        ivf = InvertedFile.build(db, k, "asmk_star")
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            ivf.search(q, 3, num_threads=0)
        with pytest.raises(ValueError, match="k must be >= 1"):
            ivf.search(q, 0)
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            ivf.search(q, 3, batch_size=0)


class TestIdEncoding:
    def test_roundtrip_every_width(self) -> None:
        """Gaps under 256, under 65536 and above: 1, 2 and 4 bytes a posting by word; the
        compiled and numpy decoders give the ids back."""
        rng = np.random.default_rng(5)
        lists = [
            np.sort(rng.choice(200, 50, replace=False)),  # gaps < 256: 1 byte
            np.array([0, 300, 70_000]),  # 4 bytes
            np.array([], np.int64),
            np.array([2**32 - 1]),  # the largest id, alone: 4 bytes
            np.array([7, 7, 1_000]),  # equal ids (gap 0) allowed; 2 bytes
        ]
        offsets = np.r_[0, np.cumsum([len(x) for x in lists])].astype(np.int64)
        ids = np.concatenate(lists).astype(np.uint32)
        id_offsets, stream = encode_posting_ids(offsets, ids)
        np.testing.assert_array_equal(np.diff(id_offsets), [50, 12, 0, 4, 6])
        assert stream.dtype == np.uint8 and stream.size == 72
        out = np.empty(ids.size, np.uint32)
        decode_ids(offsets, id_offsets, stream, out)
        np.testing.assert_array_equal(out, ids)
        words = np.array([4, 0, 3, 2, 1, 4])
        want = np.concatenate([lists[w] for w in words]).astype(np.int64)
        np.testing.assert_array_equal(decode_posting_ids(offsets, id_offsets, stream, words), want)

    def test_exception(self) -> None:
        offsets = np.array([0, 3], np.int64)
        with pytest.raises(ValueError, match="ascending within each word"):
            encode_posting_ids(offsets, np.array([1, 5, 4], np.uint32))
        with pytest.raises(ValueError, match="one per posting"):
            encode_posting_ids(offsets, np.array([1, 5], np.uint32))
        with pytest.raises(ValueError, match=r"\[0, 2\^32\)"):
            encode_posting_ids(offsets, np.array([-1, 5, 6]))
        db, _, k = _world(6)
        ivf = InvertedFile.build(db, k, "asmk_star")
        bad = np.array(ivf.id_offsets)
        bad[1:] += 1  # one byte too many for word 0
        with pytest.raises(ValueError, match="id_offsets"):
            InvertedFile(
                offsets=ivf.offsets,
                id_offsets=bad,
                id_stream=np.r_[ivf.id_stream, np.uint8(0)],
                data=ivf.data,
                words_per_image=ivf.words_per_image,
                dim=ivf.dim,
                kernel=ivf.kernel,
            )

    def test_bytes_per_image_smaller_than_uint32_ids(self) -> None:
        """100,000 images x 30 of 2,048 words: 1-2 bytes an id instead of 4, and the stats say
        so; the same index from the decoded ids is array for array the same."""
        rng = np.random.default_rng(7)
        n, k, per = 100_000, 2048, 30
        words = rng.integers(0, k, n * per)  # image i owns words[per i : per (i + 1)]
        img = np.repeat(np.arange(n, dtype=np.uint32), per)
        order = np.argsort(words, kind="stable")
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(np.bincount(words, minlength=k), out=offsets[1:])
        data = rng.integers(0, 256, (n * per, 2), dtype=np.uint8)
        ivf = InvertedFile(
            offsets=offsets,
            image_ids=img[order],
            data=data,
            words_per_image=np.full(n, per, np.uint32),
            dim=16,
            kernel="asmk_star",
        )
        before = offsets.nbytes + 4 * n * per + data.nbytes + 4 * n  # uint32 ids
        st = ivf.stats()
        assert st["bytes"] == ivf.nbytes and st["bytes_per_image"] == ivf.nbytes / n
        id_bytes = ivf.id_stream.nbytes
        assert n * per <= id_bytes <= 2 * n * per  # gaps ~68 on average: 1 byte mostly
        assert st["bytes_per_image"] < before / n - 2 * per * 0.5
        np.testing.assert_array_equal(ivf.image_ids, img[order])


class TestFiles:
    def test_old_format_loads_and_searches_the_same(self, tmp_path: Path) -> None:
        """A version-1 folder (absolute uint32 image_ids.npy), written here with numpy, loads
        and ranks like the index it came from; saving writes the current version."""
        db, q, k = _world(8, n_db=120)
        ivf = InvertedFile.build(db, k, "asmk_star", meta={"config_hash": "abc"})
        old = tmp_path / "old"
        old.mkdir()
        arrays: dict[str, np.ndarray] = {
            "offsets": np.asarray(ivf.offsets, np.int64),
            "image_ids": np.asarray(ivf.image_ids, np.uint32),
            "data": np.asarray(ivf.data),
            "words_per_image": np.asarray(ivf.words_per_image, np.uint32),
        }
        for name, a in arrays.items():
            np.save(old / f"{name}.npy", a, allow_pickle=False)
        header = {
            "format": "gldboxes.inverted_file",
            "format_version": 1,
            "pooling": None,
            "region_norm_floor": None,
            "n_items": ivf.n_items,
            "kernel": "asmk_star",
            "dim": ivf.dim,
            "binary": True,
            "alpha": 3.0,
            "tau": 0.0,
            "tau_is_neg_inf": False,
            "normalize": True,
            "n_images": ivf.n_images,
            "codebook_size": k,
            "arrays": {
                n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()
            },
            "meta": {"config_hash": "abc"},
        }
        (old / "header.json").write_text(json.dumps(header))
        for mmap in (True, False):
            back = InvertedFile.load(old, mmap=mmap)
            assert back.meta == {"config_hash": "abc"}
            np.testing.assert_array_equal(back.image_ids, arrays["image_ids"])
            np.testing.assert_array_equal(back.id_stream, ivf.id_stream)
            for kk in (None, 10):
                got, want = back.search(q, kk), ivf.search(q, kk)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
        new = back.save(tmp_path / "new")
        assert json.loads((new / "header.json").read_text())["format_version"] == FORMAT_VERSION
        assert not (new / "image_ids.npy").exists()
        assert isinstance(InvertedFile.load(new).id_stream, np.memmap)
