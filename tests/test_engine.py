"""The retrieval pipeline end to end on the tiny synthetic world, and its CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gldboxes.cli.main import main as cli_main
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.evaluate import evaluate_protocols
from retrieval.runner.conf import resolve_conf
from retrieval.runner.run import run


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


def random_medium_map(ds: RevisitedDataset, trials: int = 20) -> float:
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(trials):
        ranks = np.stack([rng.permutation(ds.n_db) for _ in range(ds.n_queries)], axis=1)
        maps.append(evaluate_protocols(ranks, ds.gnd, n_db=ds.n_db)["medium"].map)
    return float(np.mean(maps))


@pytest.mark.slow
class TestRun:
    def test_real_case(self, world: Path, tmp_path: Path) -> None:
        ds = RevisitedDataset.load(world / "retrieval")
        out = tmp_path / "out"
        conf = {"codebook": {"size": 256, "niter": 10}}
        res = {
            k: run(
                world / "retrieval",
                out,
                {**conf, "kernel": k},
                codebook_images=world / "train" / "images",
            )
            for k in ("asmk_star", "vlad")
        }
        star = res["asmk_star"]
        assert star.ranks.parent.name.startswith("asmk_star-k256-rootsift-n1000-images-")
        ranks = np.load(star.ranks)
        assert ranks.shape == (ds.n_db, ds.n_queries)
        assert sorted(ranks[:, 0].tolist()) == list(range(ds.n_db))
        medium = star.results["medium"].map
        rnd = random_medium_map(ds)
        assert medium > rnd + 0.3, (medium, rnd)
        assert medium >= res["vlad"].results["medium"].map - 0.02
        metrics = json.loads(star.metrics_path.read_text())
        assert metrics["metrics"]["medium"]["mAP"] == pytest.approx(medium)
        assert (star.codebook.parent / "codebook.json").exists()
        assert star.index_stats["bytes_per_image"] > 0
        # a rerun skips every stage (nothing rewritten)
        stamps = {
            p: os.stat(p).st_mtime_ns
            for p in (
                star.ranks,
                star.codebook,
                star.index / "sharded.json",
                star.index / "part-00000" / "index" / "data.npy",
                star.db_features.paths[0],
            )
        }
        again = run(
            world / "retrieval",
            out,
            {**conf, "kernel": "asmk_star"},
            codebook_images=world / "train" / "images",
        )
        assert again.results["medium"].map == medium
        assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    def test_cli(self, world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        args = [
            "retrieval",
            "run",
            "--dataset",
            str(world / "retrieval"),
            "--out",
            str(tmp_path),
            "--kernel",
            "asmk",
            "--codebook-size",
            "128",
            "--codebook-images",
            str(world / "train" / "images"),
        ]
        assert cli_main(args) == 0
        text = capsys.readouterr().out
        assert "| method | E mAP" in text and "asmk-k128-rootsift-n1000" in text
        idx = next((tmp_path / "index").iterdir())
        cb = next((tmp_path / "codebooks").iterdir()) / "codebook.npy"
        assert (
            cli_main(
                [
                    "retrieval",
                    "search",
                    "--dataset",
                    str(world / "retrieval"),
                    "--out",
                    str(tmp_path),
                    "--kernel",
                    "asmk",
                    "--codebook",
                    str(cb),
                ]
            )
            == 0
        )
        assert str(idx.name) in capsys.readouterr().out
        ranks = next((tmp_path / "results").iterdir()) / "ranks.npy"
        assert (
            cli_main(
                [
                    "retrieval",
                    "evaluate",
                    "--gnd",
                    str(world / "retrieval" / "gnd_synth.pkl"),
                    "--ranks",
                    str(ranks),
                ]
            )
            == 0
        )


class TestConf:
    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="unknown kernel"):
            resolve_conf(kernel="bow")
        with pytest.raises(ValueError, match="unknown retrieval option"):
            resolve_conf({"codebok": 3})
        with pytest.raises(ValueError, match="features preset"):
            resolve_conf(features="surf")
        assert resolve_conf(codebook={"size": 64})["codebook"]["niter"] == 20

    def test_missing_dataset(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            run(tmp_path / "nope", tmp_path / "out")
        assert (
            cli_main(
                ["retrieval", "run", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path)]
            )
            == 2
        )
