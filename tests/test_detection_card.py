"""Model cards of detector exports: what a detector was trained on, and the warning a
synthetic-only detector gives on images that are not from the synthetic world.

Fast: a minimal synthetic world, real TFRecords of a few images, a fake run folder, the TF1 test
detector of ``tiny_models`` (with a card written beside it) and a stubbed SavedModel writer for
``export.main``; the real trained export is checked in ``test_detection_pipeline`` (slow).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_models import export_tf1_detector

from detection import card, configs, export, inference, records
from detection.images import list_images
from detection.sharded import detect_stage, merge_boxes
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.cli.main import main as cli_main
from gldboxes.executor import make_executor
from gldboxes.io import read_json, write_config, write_json
from gldboxes.synth import WORLD_KIND, confs, generate_world

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BOX = (0.25, 0.25, 0.75, 0.75)  # the TF1 test detector's one box: centred, like the toy's
STEP = 7


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal synthetic world: 4 training images, 6 retrieval images (under a second)."""
    conf = replace(
        confs["tiny"],
        size=128,
        texture_size=64,
        landmarks=1,
        easy_per_landmark=1,
        hard_per_landmark=1,
        junk_per_landmark=1,
        distractors=2,
        train_landmarks=1,
        train_per_landmark=4,
        no_landmark_fraction=0.0,
    )
    return generate_world(tmp_path_factory.mktemp("synth") / "world", conf)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of ordinary photos (seeded smooth colour images, JPEG) outside any world."""
    root = tmp_path_factory.mktemp("holiday") / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        coarse = rng.integers(0, 256, size=(4, 5, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((100, 80), Image.Resampling.BICUBIC)
        img.save(root / f"IMG_{k:04d}.jpg", quality=90)
    return root


def _train_images(world: Path) -> list[Path]:
    return sorted((world / "train" / "images").rglob("*.jpg"))


def _records(out: Path, images: list[Path]) -> Path:
    """Real TFRecords (all in the train split) of ``images``, one centred box each."""
    flat = out / "images"
    flat.mkdir(parents=True)
    boxes = {}
    for p in images:
        (flat / p.name).symlink_to(p)
        boxes[p.stem] = [Box(*BOX)]
    write_boxes_csv(out / "boxes.csv", boxes)
    split = out / "split.csv"
    split.write_text("id,split\n" + "".join(f"{p.stem},train\n" for p in images))
    return records.main(records.confs["synth"], out / "boxes.csv", flat, out, split_csv=split)


def _run(root: Path, recs: Path | None, ap50: float | None = 0.25) -> Path:
    """A training run folder as ``detection.train`` leaves it (detector.yaml, a checkpoint
    index, the checkpoint state) with ``eval/val-step7.json`` when ``ap50`` is given."""
    run = root / "run"
    conf = configs.get_conf("tiny_cpu")
    write_config(
        run, {**conf, "records": None if recs is None else str(recs)}, name="detector.yaml"
    )
    (run / f"ckpt-{STEP}.index").write_bytes(b"")
    (run / "checkpoint").write_text(
        f'model_checkpoint_path: "ckpt-{STEP}"\nall_model_checkpoint_paths: "ckpt-{STEP}"\n'
    )
    if ap50 is not None:
        write_json(
            run / "eval" / f"val-step{STEP}.json",
            {
                "format_version": 1,
                "split": "val",
                "checkpoint": str(run / f"ckpt-{STEP}"),
                "n_images": 2,
                "ap50": ap50,
                "coco": {"AP": ap50 / 2, "AP50": ap50},
            },
        )
    return run


@pytest.fixture(scope="module")
def synth_records(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _records(tmp_path_factory.mktemp("rec_synth"), _train_images(world))


@pytest.fixture(scope="module")
def photo_records(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _records(tmp_path_factory.mktemp("rec_photos"), sorted(photos.glob("*.jpg")))


def _card_for(recs: Path | None, tmp: Path) -> dict[str, Any]:
    run = _run(tmp, recs)
    conf = {**configs.get_conf("tiny_cpu"), "records": None if recs is None else str(recs)}
    return card.build_model_card(
        conf, checkpoint=str(run / f"ckpt-{STEP}"), run_dir=run, signature=export.SIGNATURE
    )


class TestSyntheticWorld:
    def test_smoke(self, world: Path) -> None:
        assert read_json(world / "world.json")["kind"] == WORLD_KIND
        assert card.is_synthetic_world(world)
        paths = [*_train_images(world), *sorted((world / "retrieval" / "jpg").glob("*.jpg"))]
        check = card.check_synthetic_world(paths)
        assert check.n_images == len(paths) == 10
        assert check.all_synthetic and check.worlds == (world,)

    def test_real_case(self, world: Path, photos: Path, tmp_path: Path) -> None:
        stray = tmp_path / "stray.jpg"  # beside a world but not in its train/ or retrieval/
        shutil.copy(_train_images(world)[0], stray)
        shutil.copy(world / "world.json", tmp_path / "world.json")
        link = tmp_path / "linked"  # the world's images through a symbolic link
        link.symlink_to(world / "retrieval" / "jpg")
        lost = photos / "gone.jpg"
        check = card.check_synthetic_world(
            [*sorted(photos.glob("*.jpg")), stray, *sorted(link.glob("*.jpg")), lost]
        )
        assert check.outside == (*sorted(photos.glob("*.jpg")), stray)
        assert check.missing == (lost,)
        assert check.worlds == (world,) and not check.all_synthetic
        assert card.check_synthetic_world([]).all_synthetic is False

    def test_legacy_and_foreign_manifests(self, world: Path, tmp_path: Path) -> None:
        manifest = read_json(world / "world.json")
        old = tmp_path / "old"  # a world written before world.json carried "kind"
        write_json(old / "world.json", {k: v for k, v in manifest.items() if k != "kind"})
        assert card.is_synthetic_world(old)
        other = tmp_path / "other"
        write_json(other / "world.json", {**manifest, "kind": "somebody.else"})
        assert not card.is_synthetic_world(other)
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "world.json").write_text("{not json")
        assert not card.is_synthetic_world(broken)
        assert not card.is_synthetic_world(tmp_path / "absent")


class TestModelCard:
    def test_synthetic_only(self, synth_records: Path, world: Path, tmp_path: Path) -> None:
        got = _card_for(synth_records, tmp_path)
        assert got["format_version"] == card.CARD_VERSION == 2
        assert got["preset"] == "detector-tiny_cpu-128" and got["family"] == "retinanet"
        assert got["input_size"] == [128, 128]
        assert got["checkpoint"].endswith(f"ckpt-{STEP}")
        assert got["signature"] == export.SIGNATURE
        assert got["training"]["steps"] == STEP and got["training"]["seed"] == 0
        data = got["training_data"]
        assert data["records"] == str(synth_records) and data["split"] == "train"
        assert data["n_images"] == data["n_with_boxes"] == 4
        assert data["synthetic_world"] is True and data["worlds"] == [str(world)]
        # AP@0.5 found beside the run (gldboxes detect eval on val of the same checkpoint).
        assert got["validation"]["ap50"] == 0.25 and got["validation"]["split"] == "val"
        assert got["validation"]["coco_ap"] == 0.125 and got["validation"]["n_images"] == 2
        assert got["fit_for"] == "synthetic_world"
        assert got["warning"] == "trained on the synthetic world only; not for real photos"

    def test_real_photos_and_unknown(self, photo_records: Path, tmp_path: Path) -> None:
        real = _card_for(photo_records, tmp_path / "a")
        assert real["training_data"]["synthetic_world"] is False
        assert real["fit_for"] == "real_photos" and real["warning"] is None
        gone = _card_for(tmp_path / "no-such-records", tmp_path / "b")
        assert gone["training_data"]["synthetic_world"] is None
        assert gone["fit_for"] == "unknown" and gone["warning"] is None
        rand = card.build_model_card(configs.get_conf("tiny_cpu"), checkpoint=None)
        assert rand["fit_for"] == "none" and rand["training_data"] is None
        assert rand["training"]["steps"] == 0 and rand["validation"] is None

    def test_read_write(self, synth_records: Path, tmp_path: Path) -> None:
        got = _card_for(synth_records, tmp_path)
        out = tmp_path / "export"
        assert card.read_model_card(out) is None  # no folder, no card
        path = card.write_model_card(out, got)
        assert path == out / "detector.json"
        assert card.read_model_card(out) == got
        assert [p.name for p in out.iterdir()] == ["detector.json"]  # no temporary left

    def test_older_export_without_card_fields(self, tmp_path: Path) -> None:
        v1 = {k: v for k, v in _card_for(None, tmp_path).items() if k not in card._CARD_KEYS}
        write_json(tmp_path / "detector.json", {**v1, "format_version": 1})
        got = card.read_model_card(tmp_path)
        assert got is not None and got["format_version"] == 1
        assert got["fit_for"] == "unknown" and got["warning"] is None
        assert got["training_data"] is None and got["preset"] == "detector-tiny_cpu-128"

    def test_exception(self, synth_records: Path, tmp_path: Path) -> None:
        conf = configs.get_conf("tiny_cpu")
        other = {"ap50": 0.5, "checkpoint": "/runs/x/ckpt-99", "split": "val"}
        with pytest.raises(ValueError, match=r"metrics are of checkpoint /runs/x/ckpt-99"):
            card.build_model_card(conf, checkpoint="/runs/x/ckpt-7", validation=other)
        with pytest.raises(ValueError, match=r"have no 'ap50'"):
            card.build_model_card(conf, checkpoint="/runs/x/ckpt-7", validation={"split": "v"})
        with pytest.raises(ValueError, match=r"lacks \['family'\]"):
            card.build_model_card({k: v for k, v in conf.items() if k != "family"}, checkpoint=None)
        good = _card_for(synth_records, tmp_path)
        with pytest.raises(ValueError, match=r"fit_for 'cars'"):
            card.write_model_card(tmp_path, {**good, "fit_for": "cars"})
        with pytest.raises(ValueError, match=r"missing \['warning'\]"):
            card.write_model_card(tmp_path, {k: v for k, v in good.items() if k != "warning"})
        write_json(tmp_path / "detector.json", {**good, "format_version": 9})
        with pytest.raises(ValueError, match=r"format_version 9, expected 1 or 2"):
            card.read_model_card(tmp_path)
        write_json(tmp_path / "detector.json", [1, 2])
        with pytest.raises(ValueError, match="expected a JSON object"):
            card.read_model_card(tmp_path)


class TestExportWritesCard:
    """``export.main`` on a run folder, with the SavedModel writer stubbed out."""

    @pytest.fixture
    def stub(self, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []

        def fake_export(params: Any, conf: Any, ckpt_path: Any, out: Path, tf: Any) -> None:
            calls.append({"checkpoint_path": ckpt_path, "export_dir": out})
            Path(out, "saved_model.pb").write_bytes(b"stub")

        monkeypatch.setattr(export, "_export_lean", fake_export)
        return calls

    def test_card_beside_export(
        self, stub: list[dict[str, Any]], synth_records: Path, tmp_path: Path
    ) -> None:
        run = _run(tmp_path, synth_records, ap50=0.3)
        out = export.main(run)
        assert out == run / f"export-step{STEP}" and len(stub) == 1
        got = json.loads((out / "detector.json").read_text())
        assert got["format_version"] == 2 and got["layout"] == "model_garden"
        assert got["training"]["steps"] == STEP
        assert got["training_data"]["synthetic_world"] is True
        assert got["validation"]["ap50"] == 0.3
        assert got["fit_for"] == "synthetic_world" and "not for real photos" in got["warning"]
        assert card.read_model_card(out) == got
        export.main(run)  # done: skipped
        assert len(stub) == 1
        # The pipeline passes the metrics it computed; another checkpoint's are refused
        # before anything is exported.
        with pytest.raises(ValueError, match="metrics are of checkpoint"):
            export.main(run, tmp_path / "x", validation={"ap50": 0.9, "checkpoint": "r/ckpt-1"})
        assert len(stub) == 1 and not (tmp_path / "x").exists()

    def test_older_export_gets_a_card(
        self, stub: list[dict[str, Any]], photo_records: Path, tmp_path: Path
    ) -> None:
        run = _run(tmp_path, photo_records, ap50=None)
        out = run / f"export-step{STEP}"
        out.mkdir()
        (out / "saved_model.pb").write_bytes(b"old model")
        v1 = {"format_version": 1, "layout": "model_garden", "preset": "detector-tiny_cpu-128"}
        write_json(out / "detector.json", {**v1, "checkpoint": str(run / f"ckpt-{STEP}")})
        assert export.main(run, validation={"ap50": 0.4, "split": "val"}) == out
        assert not stub and (out / "saved_model.pb").read_bytes() == b"old model"
        got = card.read_model_card(out)
        assert got is not None and got["format_version"] == 2
        assert got["fit_for"] == "real_photos" and got["validation"]["ap50"] == 0.4


@pytest.fixture(scope="module")
def tf1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TF1 test detector (one centred box per image), without a card."""
    return export_tf1_detector(tmp_path_factory.mktemp("tf1") / "model", BOX)


@pytest.fixture(scope="module")
def synthetic_model(
    tf1_model: Path, synth_records: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The same detector with the card of a model trained on the synthetic world only."""
    out = tmp_path_factory.mktemp("synthetic_model") / "export"
    shutil.copytree(tf1_model, out)
    got = _card_for(synth_records, tmp_path_factory.mktemp("run"))
    card.write_model_card(out, {**got, "layout": "tf1"})
    return out


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings of our packages (TensorFlow's own loggers may chatter while loading)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("detection", "gldboxes")
    ]


class TestDomainWarning:
    def test_synthetic_model_on_photos(
        self,
        synthetic_model: Path,
        photos: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        out = inference.main(synthetic_model, photos, tmp_path / "boxes.csv")
        (line,) = _warnings(caplog)
        assert "\n" not in line and str(synthetic_model) in line
        assert "trained on the synthetic world only; not for real photos" in line
        assert f"3 of 3 images here are not from a synthetic world (e.g. {photos}" in line
        stats = json.loads(Path(f"{out}.json").read_text())
        assert stats["domain_warning"] == line
        assert len(read_boxes_csv(out)) == 3  # it warns, it does not refuse

    def test_quiet_on_the_synthetic_world(
        self,
        synthetic_model: Path,
        world: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        listing = tmp_path / "train.txt"  # a text list, as the demo's validation images
        listing.write_text("".join(f"{p}\n" for p in _train_images(world)))
        inference.main(synthetic_model, world / "retrieval" / "jpg", tmp_path / "db.csv")
        inference.main(synthetic_model, listing, tmp_path / "train.csv")
        assert _warnings(caplog) == []
        assert json.loads((tmp_path / "db.csv.json").read_text())["domain_warning"] is None

    def test_cli_stderr(
        self,
        synthetic_model: Path,
        photos: Path,
        world: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        def boxes(images: Path, out: str) -> str:
            argv = ["-q", "detect", "boxes", "--model", str(synthetic_model)]
            rc = cli_main([*argv, "--images", str(images), "--out", str(tmp_path / out)])
            assert rc == 0
            return capsys.readouterr().err

        err = boxes(photos, "photos.csv")
        lines = [ln for ln in err.splitlines() if "not for real photos" in ln]
        assert len(lines) == 1 and "detection.card WARNING" in lines[0]
        assert "not for real photos" not in boxes(world / "retrieval" / "jpg", "world.csv")

    def test_models_without_a_card(
        self,
        tf1_model: Path,
        synthetic_model: Path,
        photos: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        assert card.read_model_card(tf1_model) is None
        out = inference.main(tf1_model, photos, tmp_path / "none.csv")
        assert len(read_boxes_csv(out)) == 3
        old = tmp_path / "old_export"  # an export from before cards: loads, no warning
        shutil.copytree(synthetic_model, old)
        v1 = {k: v for k, v in read_json(old / "detector.json").items() if k not in card._CARD_KEYS}
        write_json(old / "detector.json", {**v1, "format_version": 1})
        assert inference.load_detector(old).layout == "tf1"
        inference.main(old, photos, tmp_path / "old.csv")
        assert _warnings(caplog) == []

    def test_sharded_stage_warns_once(
        self,
        synthetic_model: Path,
        photos: Path,
        world: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        paths = sorted(photos.glob("*.jpg"))
        stage, shards = detect_stage(synthetic_model, paths, shard_size=1)
        make_executor("serial", work_dir=tmp_path).run(stage, shards, tmp_path / "shards")
        merged = read_boxes_csv(merge_boxes(tmp_path / "shards", shards, tmp_path / "m.csv"))
        assert len(merged) == 3 and len(shards) == 3
        assert len([m for m in _warnings(caplog) if "not for real photos" in m]) == 1
        caplog.clear()
        detect_stage(synthetic_model, _train_images(world))
        assert _warnings(caplog) == []

    def test_real_photos(
        self,
        synthetic_model: Path,
        shared_data: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        folder = shared_data / "landmark_photos" / "sacre_coeur_hloc"
        msg = card.warn_if_unfit(synthetic_model, list_images(folder))
        assert msg is not None and _warnings(caplog) == [msg]
        assert "of 10 images here are not from a synthetic world" in msg
