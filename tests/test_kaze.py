"""KAZE, the local feature added as a plug-in (one module + its line in FEATURE_PLUGINS)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gldboxes.cli.main import main as cli_main
from retrieval import features
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.features import kaze


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


def _textured(seed: int, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    for _ in range(40):
        y, x = rng.integers(0, size - 20, 2)
        h, w = rng.integers(6, 20, 2)
        img[y : y + h, x : x + w] = rng.integers(40, 255)
    return img


class TestRegistry:
    def test_preset_comes_from_the_plugin(self) -> None:
        assert "kaze" in features.confs and features.confs["kaze"] is kaze.confs["kaze"]
        assert features.output_name(features.confs["kaze"]) == "kaze-n1000"
        ext = features.make_extractor(features.confs["kaze"])
        assert isinstance(ext, kaze.KazeExtractor) and ext.dim == 64

    def test_unknown_model_names_every_choice(self) -> None:
        with pytest.raises(ValueError, match=r"unknown feature model 'surf'.*'kaze'"):
            features.make_extractor({"model": {"name": "surf"}})

    def test_bad_budget(self) -> None:
        with pytest.raises(ValueError, match="max_features must be >= 1"):
            kaze.KazeExtractor(max_features=0)


class TestExtractor:
    def test_descriptors(self) -> None:
        ext = kaze.KazeExtractor(max_features=50)
        xy, desc, scales, scores = ext(_textured(0))
        n = len(xy)
        assert 10 <= n <= 50
        assert desc.shape == (n, 64) and desc.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
        assert (np.diff(scores) <= 0).all() and (scales > 0).all()
        assert ((xy >= 0) & (xy < 160)).all()
        # the budget keeps the strongest: a smaller budget is a prefix of a larger one
        xy10, _, _, s10 = kaze.KazeExtractor(max_features=10)(_textured(0))
        np.testing.assert_array_equal(xy10, xy[:10])
        np.testing.assert_array_equal(s10, scores[:10])

    def test_flat_image_is_empty(self) -> None:
        xy, desc, scales, scores = kaze.KazeExtractor(max_features=10)(
            np.full((64, 64), 128, np.uint8)
        )
        assert xy.shape == (0, 2) and desc.shape == (0, 64) and scales.size == scores.size == 0

    def test_matches_a_shifted_copy(self) -> None:
        """Same content shifted by (7, 5) px: mutual 1-NN matches are mostly that shift."""
        img = _textured(1, 200)
        shifted = np.zeros_like(img)
        shifted[5:, 7:] = img[:-5, :-7]
        ext = kaze.KazeExtractor(max_features=200)
        a, da, _, _ = ext(img)
        b, db, _, _ = ext(shifted)
        sim = da @ db.T
        ab, ba = sim.argmax(1), sim.argmax(0)
        mutual = np.flatnonzero(ba[ab] == np.arange(len(a)))
        ok = np.linalg.norm(b[ab[mutual]] - a[mutual] - np.array([7, 5]), axis=1) < 1.5
        assert len(mutual) >= 20 and ok.mean() > 0.8, (len(mutual), ok.mean())


@pytest.mark.slow
def test_run_end_to_end(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gldboxes retrieval run --features kaze --verify``: 64-D features through the codebook,
    ASMK* (8-byte words), search, the Revisited metrics and spatial verification."""
    args = [
        "retrieval",
        "run",
        "--dataset",
        str(world / "retrieval"),
        "--out",
        str(tmp_path),
        "--features",
        "kaze",
        "--codebook-size",
        "128",
        "--codebook-images",
        str(world / "train" / "images"),
        "--verify",
    ]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "asmk_star-k128-kaze-n1000" in text
    feats = next((tmp_path / "features").glob("kaze-n1000*"))
    assert feats.exists()
    cb = np.load(next((tmp_path / "codebooks").iterdir()) / "codebook.npy")
    assert cb.shape == (128, 64)
    ds = RevisitedDataset.load(world / "retrieval")
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("metrics.json")]
    assert metrics, "no metrics written"
    maps = [m["metrics"]["medium"]["mAP"] for m in metrics]
    # far above a random ranking of the tiny world (~0.2 Medium mAP; see test_engine)
    assert min(maps) > 0.5, (maps, ds.n_db)
