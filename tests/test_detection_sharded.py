"""Detector inference on the executor: serial and Ray give the same boxes as one plain run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import export_tf1_detector

from detection import inference
from detection.sharded import detect_stage, merge_boxes
from gldboxes.boxes import read_boxes_csv
from gldboxes.executor import make_executor

BOX = (0.1, 0.2, 0.6, 0.7)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TF1 graph with the authors' tensor names: one box, score = mean brightness."""
    return export_tf1_detector(tmp_path_factory.mktemp("tf1") / "model", BOX)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for k in range(7):
        p = root / f"img{k}.png"
        Image.fromarray(np.full((24 + k, 30, 3), 30 * k, np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.slow
def test_serial_matches_plain_run(model: Path, images: list[Path], tmp_path: Path) -> None:
    plain = read_boxes_csv(inference.main(model, images, tmp_path / "plain.csv", threshold=0.1))
    stage, shards = detect_stage(model, images, threshold=0.1, shard_size=3)
    assert len(shards) == 3
    report = make_executor("serial", work_dir=tmp_path).run(stage, shards, tmp_path / "shards")
    assert not report.failed
    merged = read_boxes_csv(merge_boxes(tmp_path / "shards", shards, tmp_path / "merged.csv"))
    assert merged == plain
    assert set(merged) == {f"img{k}" for k in range(1, 7)}  # img0 is black: score 0 < 0.1
    assert merged["img3"][0].score == pytest.approx(90 / 255, abs=1e-6)
    # A rerun skips every finished shard.
    again = make_executor("serial", work_dir=tmp_path).run(stage, shards, tmp_path / "shards")
    assert len(again.skipped) == len(shards) and not again.done


@pytest.mark.slow
@pytest.mark.server
def test_ray_matches_serial(model: Path, images: list[Path], tmp_path: Path) -> None:
    stage, shards = detect_stage(model, images, threshold=0.0, shard_size=4)
    make_executor("serial", work_dir=tmp_path).run(stage, shards, tmp_path / "serial")
    ray_exec = make_executor("ray", num_cpus=2, task_cpus=0.5, work_dir=tmp_path / "work")
    try:
        ray_exec.run(stage, shards, tmp_path / "ray")
    finally:
        ray_exec.shutdown()
    for shard in shards:
        a = (tmp_path / "serial" / shard.name / "boxes.csv").read_bytes()
        b = (tmp_path / "ray" / shard.name / "boxes.csv").read_bytes()
        assert a == b


def test_duplicate_names_rejected(model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="not unique"):
        detect_stage(model, [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"])


@pytest.mark.slow
def test_cli_engine_serial(model: Path, images: list[Path], tmp_path: Path) -> None:
    from gldboxes.cli.main import main as cli_main

    out = tmp_path / "boxes.csv"
    args = ["-q", "detect", "boxes", "--model", str(model), "--images", str(images[0].parent)]
    assert (
        cli_main(
            [
                *args,
                "--out",
                str(out),
                "--threshold",
                "0.1",
                "--engine",
                "serial",
                "--shard-size",
                "2",
            ]
        )
        == 0
    )
    plain = inference.main(model, images, tmp_path / "plain.csv", threshold=0.1)
    assert read_boxes_csv(out) == read_boxes_csv(plain)
