"""Word assignment (exact / HNSW), its cache beside the codebook, and parallel aggregation."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.features.codebook import (
    WORD_INDEX_FORMAT,
    load_word_index,
    word_assignment,
    word_index_paths,
)
from retrieval.index import aggregation as agg
from retrieval.index import assignment as asg
from retrieval.index import regional
from retrieval.index.aggregation import KERNELS, REGIONAL_KERNELS, aggregate, aggregate_many
from retrieval.index.assignment import WordIndex, assign, word_index


def _clustered(
    seed: int, n: int, d: int = 128, k: int = 2048, centres: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors around ``centres`` anisotropic cluster centres (clumped like RootSIFT, not
    uniform) and a codebook of ``k`` other draws of the same distribution (k-means' start)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32) * 3
    scale = rng.uniform(0.3, 1.0, (centres, d)).astype(np.float32)
    lab = rng.integers(0, centres, n + k)
    noise = rng.standard_normal((n + k, d)).astype(np.float32) * scale[lab]
    x = (c[lab] + noise).astype(np.float32)
    return x[k:], np.ascontiguousarray(x[:k])


def _images(rng: np.random.Generator, x: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Split rows of ``x`` into images of 0..2*mean rows (some empty)."""
    cuts = np.sort(rng.integers(0, x.shape[0], n_images - 1))
    return np.split(x, cuts)


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray]:
    return _clustered(0, 12000)


class TestHnsw:
    def test_smoke(self, problem: tuple[np.ndarray, np.ndarray]) -> None:
        x, cb = problem
        wi = word_index(cb)
        assert (wi.codebook_size, wi.dim) == cb.shape and "hnsw" in repr(wi)
        ids = assign(x[:10], cb, assignment=wi)
        assert ids.shape == (10, 1) and ids.dtype == np.int64
        assert assign(x[:0], cb, assignment=wi).shape == (0, 1)
        assert wi.search(x[:5], 3).shape == (5, 3)

    def test_agrees_with_exact(self, problem: tuple[np.ndarray, np.ndarray]) -> None:
        """HNSW picks the exact nearest word for >= 95% of descriptors, and where it does not,
        a word barely farther (the nearest found is within 10% of the true distance for 99%)."""
        x, cb = problem
        exact = assign(x, cb)[:, 0]
        wi = WordIndex.build(cb)
        assert (wi.m, wi.ef_construction, wi.ef_search) == (32, 128, 32)  # the defaults
        approx = assign(x, cb, assignment=wi)[:, 0]
        agree = float(np.mean(approx == exact))
        assert agree >= 0.95, agree
        d_ex = ((x - cb[exact]) ** 2).sum(1)
        d_ap = ((x - cb[approx]) ** 2).sum(1)
        assert np.all(d_ap >= d_ex - 1e-3)  # never nearer than the exact nearest
        assert np.mean(d_ap <= 1.1 * d_ex) >= 0.99
        # a narrow beam agrees less: the parameter reaches faiss
        wi.ef_search = 1
        narrow = wi.search(x)[:, 0]
        assert float(np.mean(narrow == exact)) < agree

    def test_build_is_deterministic(self, problem: tuple[np.ndarray, np.ndarray]) -> None:
        import faiss

        _, cb = problem
        a, b = WordIndex.build(cb[:800]), WordIndex.build(cb[:800])
        np.testing.assert_array_equal(
            faiss.serialize_index(a.index), faiss.serialize_index(b.index)
        )

    def test_string_is_memoised_per_codebook(self, problem: tuple[np.ndarray, np.ndarray]) -> None:
        _, cb = problem
        assert word_index(cb) is word_index(cb.copy())
        assert word_index(cb) is not word_index(cb[:50])

    def test_exception(self, problem: tuple[np.ndarray, np.ndarray]) -> None:
        x, cb = problem
        with pytest.raises(ValueError, match="unknown assignment"):
            assign(x[:3], cb, assignment="ivf")
        with pytest.raises(ValueError, match="holds K=50"):
            assign(x[:3], cb, assignment=word_index(cb[:50]))
        with pytest.raises(ValueError, match="descriptors must be"):
            word_index(cb).search(x[:3, :4])
        with pytest.raises(ValueError, match="unknown HNSW parameters"):
            word_index(cb, efsearch=3)
        with pytest.raises(ValueError, match="ef_search"):
            WordIndex(word_index(cb).index, fingerprint="", m=32, ef_construction=1, ef_search=0)
        with pytest.raises(ValueError, match="threads"):
            aggregate_many([x[:3]], cb, "asmk", threads=0)


class TestAggregationWithHnsw:
    @pytest.mark.parametrize("kernel", ["asmk_star", "r_asmk"])
    def test_equals_exact_aggregation_of_the_hnsw_words(
        self, kernel: str, problem: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``assignment=`` reaches every chunk: aggregating with the HNSW index equals exact
        aggregation whose nearest-word search is replaced by the HNSW search."""
        x, cb = problem
        wi = WordIndex.build(cb, ef_search=1)  # a narrow beam: often not the nearest word
        imgs = _images(np.random.default_rng(1), x[:3000], 40)
        regions = [[a, a[: len(a) // 2]] for a in imgs] if kernel in REGIONAL_KERNELS else None
        monkeypatch.setattr(agg, "_ASSIGN_CHUNK", 500)
        got = aggregate_many(imgs, cb, kernel, regions=regions, assignment=wi)
        exact = aggregate_many(imgs, cb, kernel, regions=regions)
        monkeypatch.setattr(asg, "nearest_word", lambda xx, c: wi.search(xx)[:, 0])
        want = aggregate_many(imgs, cb, kernel, regions=regions)
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.words, want.words)
        np.testing.assert_array_equal(got.data, want.data)
        assert not np.array_equal(got.data, exact.data)  # the approximation shows
        # the string form builds the same graph (with the default beam)
        one = aggregate(imgs[3], cb, kernel, assignment="hnsw")
        monkeypatch.setattr(asg, "nearest_word", lambda xx, c: word_index(cb).search(xx)[:, 0])
        np.testing.assert_array_equal(one.words, aggregate(imgs[3], cb, kernel).words)


class TestThreads:
    @pytest.mark.parametrize(
        ("kernel", "assignment"),
        [
            ("vlad", "exact"),
            ("asmk", "exact"),
            ("asmk_star", "exact"),
            ("r_asmk_star", "exact"),
            ("naive_r_asmk", "exact"),
            ("asmk_star", "hnsw"),
            ("r_asmk", "hnsw"),
        ],
    )
    def test_bit_identical_for_any_thread_count(
        self,
        kernel: str,
        assignment: str,
        problem: tuple[np.ndarray, np.ndarray],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        x, cb = problem
        imgs = _images(np.random.default_rng(2), x[:4000], 50)
        regions = None
        if kernel in REGIONAL_KERNELS:
            regions = [[a, a[: len(a) // 2], a[len(a) // 3 :]] for a in imgs]
        monkeypatch.setattr(agg, "_ASSIGN_CHUNK", 300)  # ~15-40 chunks
        seen: list[str] = []
        inner_images, inner_regions = agg._aggregate_images, regional.aggregate_regions_chunk

        def spy_images(*a: object, **k: object) -> agg.AggregatedBatch:
            seen.append(threading.current_thread().name)
            return inner_images(*a, **k)  # type: ignore[arg-type]

        def spy_regions(*a: object, **k: object) -> agg.AggregatedBatch:
            seen.append(threading.current_thread().name)
            return inner_regions(*a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(agg, "_aggregate_images", spy_images)
        monkeypatch.setattr(regional, "aggregate_regions_chunk", spy_regions)
        ref = aggregate_many(imgs, cb, kernel, regions=regions, assignment=assignment, threads=1)
        assert len(seen) > 10 and set(seen) == {threading.main_thread().name}
        for t in (2, 3):
            seen.clear()
            got = aggregate_many(
                imgs, cb, kernel, regions=regions, assignment=assignment, threads=t
            )
            assert threading.main_thread().name not in seen  # the chunks ran in the pool
            np.testing.assert_array_equal(got.offsets, ref.offsets)
            np.testing.assert_array_equal(got.words, ref.words)
            assert got.data.dtype == ref.data.dtype
            np.testing.assert_array_equal(got.data.view(np.uint8), ref.data.view(np.uint8))
        # and the same as one chunk of everything (the numpy reference, serial)
        monkeypatch.setattr(agg, "_ASSIGN_CHUNK", 10**9)
        whole = aggregate_many(
            imgs, cb, kernel, regions=regions, assignment=assignment, backend="numpy"
        )
        np.testing.assert_array_equal(whole.words, ref.words)
        if ref.binary:
            np.testing.assert_array_equal(whole.data, ref.data)
        else:
            np.testing.assert_allclose(whole.data, ref.data, rtol=0, atol=1e-6)
        assert kernel in KERNELS and ref.words.size > 1000


class TestCache:
    def _codebook(self, folder: Path, cb: np.ndarray) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "codebook.npy", cb)
        (folder / "codebook.json").write_text(
            json.dumps({"format_version": 1, "size": cb.shape[0], "dim": cb.shape[1]})
        )
        return folder / "codebook.npy"

    def test_written_tagged_and_reloaded(
        self,
        tmp_path: Path,
        problem: tuple[np.ndarray, np.ndarray],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        x, cb = problem
        npy = self._codebook(tmp_path / "cb", cb)
        built = load_word_index(tmp_path / "cb")
        graph, header = word_index_paths(npy)
        assert graph.name == "codebook.hnsw-m32-efc128.faiss" and graph.stat().st_size > 0
        head = json.loads(header.read_text())
        assert head["format"] == WORD_INDEX_FORMAT and head["format_version"] == 1
        assert (head["size"], head["dim"], head["m"]) == (2048, 128, 32)
        assert head["codebook_sha1"] == asg.codebook_fingerprint(cb)

        def no_build(*a: object, **k: object) -> WordIndex:
            raise AssertionError("rebuilt instead of read from the cache")

        monkeypatch.setattr(WordIndex, "build", no_build)
        loaded = load_word_index(npy, ef_search=32)
        assert loaded.ef_search == 32 and loaded.fingerprint == built.fingerprint
        loaded.ef_search = built.ef_search
        np.testing.assert_array_equal(loaded.search(x[:2000]), built.search(x[:2000]))
        got = word_assignment(npy, "hnsw")
        assert isinstance(got, WordIndex)
        assert word_assignment(npy, "exact") == "exact"
        with pytest.raises(ValueError, match="unknown assignment"):
            word_assignment(npy, "ivf")

    def test_stale_cache_rebuilt(
        self, tmp_path: Path, problem: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, cb = problem
        npy = self._codebook(tmp_path / "cb", cb)
        load_word_index(npy)
        _, header = word_index_paths(npy)
        self._codebook(tmp_path / "cb", cb[::-1].copy())  # retrained: same shape, new words
        wi = load_word_index(npy)
        assert json.loads(header.read_text())["codebook_sha1"] == wi.fingerprint
        assert wi.fingerprint == asg.codebook_fingerprint(cb[::-1])
        ids = wi.search(x[:500])[:, 0]
        assert np.mean(ids == assign(x[:500], cb[::-1])[:, 0]) >= 0.95

    def test_exception(self, tmp_path: Path, problem: tuple[np.ndarray, np.ndarray]) -> None:
        _, cb = problem
        npy = self._codebook(tmp_path / "cb", cb)
        load_word_index(npy)
        graph, header = word_index_paths(npy)
        head = json.loads(header.read_text())
        header.write_text(json.dumps({**head, "format": "something-else"}))
        with pytest.raises(ValueError, match="not a gldboxes word index header"):
            load_word_index(npy)
        header.write_text(json.dumps(head))
        graph.write_bytes(b"x" * head["bytes"])  # same size, garbage
        with pytest.raises(ValueError, match="unreadable faiss index"):
            load_word_index(npy)
        with pytest.raises(FileNotFoundError):
            load_word_index(tmp_path / "none")


@pytest.mark.slow
def test_run_with_hnsw_assignment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``retrieval run --assignment hnsw`` end to end on the tiny world: its own index folder
    (``-hnsw``), the graph cached beside the codebook, and the exact run's retrieval quality
    (the graph gives nearly every descriptor its exact word)."""
    from gldboxes.cli.main import main
    from gldboxes.synth import confs, generate_world

    world = generate_world(tmp_path / "w", confs["tiny"])
    base = ["-q", "retrieval", "run", "--dataset", str(world / "retrieval"), "--out"]
    base += [str(tmp_path / "out"), "--codebook-images", str(world / "train" / "images")]
    base += ["--codebook-size", "128", "--json"]
    got = {}
    for how in ("exact", "hnsw"):
        assert main([*base, "--assignment", how]) == 0
        got[how] = json.loads(capsys.readouterr().out)
    assert got["hnsw"]["index"].endswith("-synth") and "-hnsw-" in got["hnsw"]["index"]
    assert "-hnsw-" not in got["exact"]["index"]
    (cb,) = (tmp_path / "out" / "codebooks").glob("*/codebook.npy")
    graph, header = word_index_paths(cb)
    assert graph.exists() and header.exists()
    for p in ("easy", "medium", "hard"):
        assert got["hnsw"]["mAP"][p] >= got["exact"]["mAP"][p] - 0.02, p
    assert got["exact"]["mAP"]["medium"] > 0.9
