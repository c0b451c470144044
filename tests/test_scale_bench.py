"""benchmarks/scale.py at a tiny size: its generator, part merge and printed / JSON figures."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from retrieval.index.aggregation import AggregatedBatch
from retrieval.index.inverted_file import InvertedFile, top_k

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


scale = _load()
HAS_ASMK = importlib.util.find_spec("asmk") is not None


class TestGenerator:
    def test_distinct_words_match_target(self) -> None:
        model = scale.WordModel.make(4096, 0.5, 0, 200)
        ipi, off, words, data = scale.generate(model, scale.uniform_words(150, 150), 0, 3, 400)
        counts = np.diff(off)
        assert ipi.tolist() == [1] * 400
        # draws are set so the *expected* distinct count is the target (duplicates removed)
        assert abs(counts.mean() - 150) < 2.0
        assert data.shape == (words.size, 16) and data.dtype == np.uint8
        for i in (0, 199, 399):  # sorted, distinct, in range: a valid AggregatedBatch row set
            w = words[off[i] : off[i + 1]]
            assert np.all(np.diff(w.astype(np.int64)) > 0) and w.max() < 4096
        AggregatedBatch(offsets=off, words=words, data=data, dim=128)

    def test_seeded_per_block(self) -> None:
        model = scale.WordModel.make(2048, 0.5, 0, 60)
        a = scale.generate(model, scale.uniform_words(20, 60), 5, 1, 100)
        b = scale.generate(model, scale.uniform_words(20, 60), 5, 1, 100)
        c = scale.generate(model, scale.uniform_words(20, 60), 5, 2, 100)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not np.array_equal(a[2][:50], c[2][:50])

    def test_zipf_head_is_frequent(self) -> None:
        model = scale.WordModel.make(4096, 1.0, 0, 100)
        w = model.sample(np.random.default_rng(0), 200_000)
        freq = np.bincount(w, minlength=4096)
        # rank 1 vs rank 10: 10x under s=1 (sampling noise well under 10%)
        assert 8.5 < freq[model.perm[0]] / freq[model.perm[9]] < 11.5
        assert model.imbalance > 50

    def test_profile_copies_real_images(self) -> None:
        ipi = np.array([1, 3, 2])
        wpi = np.array([10, 7, 8, 9, 4, 5])
        got_ipi, targets = scale.profile_words(ipi, wpi)(np.random.default_rng(1), 50)
        start = np.r_[0, np.cumsum(got_ipi)[:-1]]
        rows = {1: [10], 3: [7, 8, 9], 2: [4, 5]}
        for n_items, s in zip(got_ipi.tolist(), start.tolist(), strict=True):
            assert targets[s : s + n_items].tolist() == rows[n_items]

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="max_words"):
            scale.WordModel.make(100, 0.5, 0, 100)


class TestMergeTop:
    def test_equals_one_index_with_ties(self) -> None:
        rng = np.random.default_rng(0)
        s = rng.integers(0, 4, (5, 30)).astype(np.float64)  # many ties
        starts = [0, 7, 19]
        parts = [s[:, a:b] for a, b in zip(starts, [7, 19, 30], strict=True)]
        for k in (4, None):
            res = []
            for p in parts:
                ids = top_k(p, k)
                res.append((ids, np.take_along_axis(p, ids, 1)))
            ids, sc = scale.merge_top(res, starts, k)
            want = top_k(s, k)
            assert np.array_equal(ids, want)
            assert np.array_equal(sc, np.take_along_axis(s, want, 1))

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="parts"):
            scale.merge_top([], [0], 3)


def _fake_real_index(path: Path) -> Path:
    """A tiny regional index saved like the real runs' (items per image 1-3)."""
    rng = np.random.default_rng(0)
    ipi = np.array([1, 3, 2, 2])
    counts = rng.integers(5, 30, int(ipi.sum()))
    words = np.concatenate([np.sort(rng.choice(1024, c, replace=False)) for c in counts])
    off = np.r_[0, np.cumsum(counts)].astype(np.int64)
    data = rng.integers(0, 256, (words.size, 16), dtype=np.uint8)
    batch = AggregatedBatch(offsets=off, words=words.astype(np.uint32), data=data, dim=128)
    ivf = InvertedFile.build(
        batch, 1024, "asmk_star", item_image=np.repeat(np.arange(4), ipi), pooling="max"
    )
    return ivf.save(path / "d2r_max-fake")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs over the same 3,000 images: 3 index parts (+ asmk, + an R1M profile), 1 part."""
    tmp = tmp_path_factory.mktemp("scale")
    real = _fake_real_index(tmp)
    common = ["--sizes", "3000", "--queries", "8", "--full-queries", "3", "--words", "20,60"]
    common += ["--codebook-size", "2048", "--block", "1000", "--tmp", str(tmp / "scratch")]
    extra = ["--asmk"] if HAS_ASMK else []  # installed by `make test` (scripts/peers.sh)
    printed = io.StringIO()
    argv = [*common, *extra, "--part-images", "1000", "--json", str(tmp / "parts.json")]
    with contextlib.redirect_stdout(printed):
        code = scale.main([*argv, "--r1m", str(real), "--r1m-images", "2000"])
    assert code == 0
    assert scale.main([*common, "--part-images", "3000", "--json", str(tmp / "one.json")]) == 0
    return {
        "scratch": tmp / "scratch",
        "printed": printed.getvalue(),
        "parts": json.loads((tmp / "parts.json").read_text()),
        "one": json.loads((tmp / "one.json").read_text()),
    }


@pytest.mark.slow
class TestScaleRun:
    def test_real_case(self, runs: dict[str, Any]) -> None:
        ours = runs["parts"]["sizes"]["3000"]["ours"]
        one = runs["one"]["sizes"]["3000"]["ours"]
        assert len(ours["parts"]) == 3 and len(one["parts"]) == 1
        # three parts, merged, rank exactly as the one index (the same generated images)
        assert ours["top100_sha1"] == one["top100_sha1"]
        assert ours["postings"] == one["postings"]
        assert ours["planted_rank1"] == 1.0
        assert 36 < ours["postings"] / 3000 < 44  # targets uniform in 20..60
        # a posting holds at least its 16 signature bytes; arrays as stats() counts them
        assert ours["bytes_disk"] >= 16 * ours["postings"] + 4 * 3000
        assert ours["bytes_memory"] >= 16 * ours["postings"]
        assert ours["open_s"] > 0 and ours["build_s"] > 0 and ours["peak_build"] > 10e6
        rows = ours["latency"]
        assert {r["k"] for r in rows} == {100, None}
        assert all(r["single_ms"] > 0 and r["batched_ms"] > 0 for r in rows)
        assert {r["queries"] for r in rows} == {8, 3}
        assert not any(runs["scratch"].iterdir())  # scratch removed

    def test_printed_table(self, runs: dict[str, Any]) -> None:
        out = runs["printed"]
        assert "### 3,000 images" in out and "3 part(s)" in out
        assert "| planted copy at rank 1 | 100% |" in out
        names = ["index build (s)", "bytes per image on disk", "index open", "peak RSS, search"]
        names += ["query top-100, batched, 1 thread(s)", "query full ranking, one at a time"]
        for name in names:
            assert f"| {name}" in out
        assert "### R1M index size: 2,000 synthetic images" in out and "| d2r_max-fake |" in out

    def test_r1m_profile(self, runs: dict[str, Any]) -> None:
        r = runs["parts"]["r1m"]["d2r_max-fake"]
        assert r["images"] == 2000 and r["real_items_per_image"] == 2.0
        assert abs(r["items_per_image"] - 2.0) < 0.1  # images copy 1, 3 or 2 items
        assert abs(r["words_per_item"] - r["real_words_per_item"]) < 0.1 * r["real_words_per_item"]
        # the measured bytes: every posting's signature and id, and an item_image array
        assert r["bytes_disk"] >= 16 * r["postings"] + 8 * r["items"]

    def test_asmk_peer(self, runs: dict[str, Any]) -> None:
        if not HAS_ASMK:
            pytest.fail("the asmk peer is not installed: run `make test` (scripts/peers.sh)")
        peer = runs["parts"]["sizes"]["3000"]["asmk"]
        assert peer["same_scores"] == 1.0  # same top-100 scores as ours, query for query
        assert peer["planted_rank1"] == 1.0
        assert peer["postings"] == runs["parts"]["sizes"]["3000"]["ours"]["postings"]
