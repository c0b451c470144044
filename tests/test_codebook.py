"""Codebook: seeded k-means, descriptor sampling, .npy + sidecar files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from retrieval.features.codebook import load_codebook, main, sample_descriptors, train_codebook


def _clusters(seed: int, k: int = 8, d: int = 16, per: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = 10.0 * rng.standard_normal((k, d)).astype(np.float32)
    x = np.repeat(centres, per, axis=0) + 0.1 * rng.standard_normal((k * per, d))
    return x.astype(np.float32), centres


def _features(path: Path, counts: list[int], d: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    with h5py.File(path, "w") as f:
        for i, c in enumerate(counts):
            a = rng.standard_normal((c, d)).astype(np.float32)
            f.create_group(f"img{i:03d}").create_dataset("descriptors", data=a)
            arrays.append(a)
    return arrays


class TestTrain:
    def test_recovers_separated_clusters(self) -> None:
        x, centres = _clusters(0, k=4, per=200)
        cb = train_codebook(x, 16, seed=0, niter=20)
        assert cb.shape == (16, 16) and cb.dtype == np.float32
        # every true centre has a centroid within the noise level, every centroid sits in one
        # of the clusters (no centroid stranded between them)
        dist = np.linalg.norm(centres[:, None] - cb[None], axis=2).min(axis=1)
        assert dist.max() < 0.2
        assert np.linalg.norm(cb[:, None] - centres[None], axis=2).min(axis=1).max() < 1.0
        assert train_codebook(x, 16, seed=0, niter=20, nredo=2).shape == (16, 16)

    def test_seeded(self) -> None:
        x = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
        a = train_codebook(x, 16, seed=3, niter=5)
        np.testing.assert_array_equal(a, train_codebook(x, 16, seed=3, niter=5))
        assert not np.array_equal(a, train_codebook(x, 16, seed=4, niter=5))

    def test_exception(self) -> None:
        x = np.zeros((5, 4), np.float32)
        with pytest.raises(ValueError, match="at least 8 training descriptors"):
            train_codebook(x, 8)
        with pytest.raises(ValueError, match="NaN"):
            train_codebook(np.full((10, 4), np.nan, np.float32), 2)


class TestFiles:
    def test_sample_matches_reference(self, tmp_path: Path) -> None:
        arrays = _features(tmp_path / "f.h5", [5, 0, 12, 3])
        full = np.concatenate(arrays)  # h5 keys are sorted: img000, img001, ...
        s, total = sample_descriptors(tmp_path / "f.h5", 7, seed=2)
        assert total == 20 and s.shape == (7, 16)
        pick = np.sort(np.random.default_rng(2).choice(20, size=7, replace=False))
        np.testing.assert_array_equal(s, full[pick])
        allx, _ = sample_descriptors(tmp_path / "f.h5", 0, seed=2)
        np.testing.assert_array_equal(allx, full)

    def test_sample_rows_grouped_by_item(self) -> None:
        from retrieval.features.codebook import sample_rows

        rng = np.random.default_rng(3)
        for _ in range(50):
            counts = rng.integers(0, 9, int(rng.integers(1, 20)))
            m, seed = int(rng.integers(0, 60)), int(rng.integers(100))
            items, bounds, rows = sample_rows(counts, m, seed)
            total = int(counts.sum())
            want = np.arange(total)
            if m and total > m:
                want = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False))
            offs = np.r_[0, np.cumsum(counts)]
            got = np.concatenate(
                [
                    offs[i] + rows[a:b]
                    for i, a, b in zip(items, bounds[:-1], bounds[1:], strict=True)
                ]
                or [np.zeros(0, np.int64)]
            )
            np.testing.assert_array_equal(got, want)
            assert np.all(np.diff(items) > 0) and np.all(np.diff(bounds) > 0)

    def test_main_writes_and_skips(self, tmp_path: Path) -> None:
        _features(tmp_path / "train.h5", [40] * 10)
        conf = {"size": 16, "niter": 5, "seed": 0, "max_descriptors": 300}
        npy = main(conf, tmp_path / "train.h5", tmp_path / "cb", training_set="paris")
        meta = json.loads(npy.with_suffix(".json").read_text())
        assert meta["training_set"] == "paris" and meta["n_training_descriptors"] == 300
        assert meta["format_version"] == 1 and (meta["size"], meta["dim"]) == (16, 16)
        assert (tmp_path / "cb" / "config.yaml").exists()
        cb = load_codebook(tmp_path / "cb")
        assert cb.shape == (16, 16)
        t0 = os.stat(npy).st_mtime_ns
        main(conf, tmp_path / "train.h5", tmp_path / "cb")
        assert os.stat(npy).st_mtime_ns == t0
        main(conf, tmp_path / "train.h5", tmp_path / "cb", overwrite=True)
        assert os.stat(npy).st_mtime_ns != t0

    def test_load_exception(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_codebook(tmp_path / "none.npy")
        np.save(tmp_path / "codebook.npy", np.zeros((4, 8), np.float32))
        (tmp_path / "codebook.json").write_text(
            json.dumps({"format_version": 1, "size": 5, "dim": 8})
        )
        with pytest.raises(ValueError, match="does not match its sidecar"):
            load_codebook(tmp_path / "codebook.npy")
        (tmp_path / "bad.npy").write_bytes(b"garbage")
        with pytest.raises(ValueError, match="unreadable codebook"):
            load_codebook(tmp_path / "bad.npy")


class TestTrainingSet:
    def test_too_few_descriptors_per_word_warns(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        _features(tmp_path / "few.h5", [50] * 4)  # 200 descriptors
        with caplog.at_level("WARNING", logger="retrieval.features.codebook"):
            main({"size": 16, "niter": 2}, tmp_path / "few.h5", tmp_path / "cb16")
        assert "12.5 per word" in caplog.text and "--codebook-images" in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING", logger="retrieval.features.codebook"):
            main({"size": 4, "niter": 2}, tmp_path / "few.h5", tmp_path / "cb4")  # 50 per word
        assert "per word" not in caplog.text
        meta = json.loads((tmp_path / "cb16" / "codebook.json").read_text())
        assert meta["descriptors_per_word"] == 12.5

    def test_several_files_pool_into_one_training_set(self, tmp_path: Path) -> None:
        a = _features(tmp_path / "a.h5", [30, 20], seed=1)
        b = _features(tmp_path / "b.h5", [40], seed=2)
        x, total = sample_descriptors([tmp_path / "a.h5", tmp_path / "b.h5"], 0, 0)
        assert total == 90
        np.testing.assert_array_equal(x, np.concatenate([*a, *b]))
        npy = main({"size": 4, "niter": 2}, [tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "cb")
        meta = json.loads(npy.with_suffix(".json").read_text())
        assert meta["training_set"] == "a.h5+b.h5" and meta["n_training_descriptors"] == 90
