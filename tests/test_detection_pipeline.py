"""End to end on the synthetic world: records -> train tiny_cpu (with a resume) -> AP@0.5 ->
export -> boxes in a new process -> box-format readers -> the retrieval region source.

One module-scoped pipeline (~3-4 minutes on 2 busy cores) backs every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from detection import configs, evaluate, export, records, train
from gldboxes.boxes import read_boxes_csv
from gldboxes.cli.main import main as cli_main
from gldboxes.synth import confs as synth_confs
from gldboxes.synth import generate_world

pytestmark = pytest.mark.slow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = 400  # tiny_cpu: ~1 minute of training on 2 cores
FIRST_LEG = 100  # train this far, stop, then resume to STEPS


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("pipe")
    # 6 landmarks x 10 images (one or two without a landmark): 45 train / 15 val.
    world = generate_world(tmp / "world", replace(synth_confs["tiny"], train_per_landmark=10))
    rc = cli_main(
        [
            "-q",
            "detect",
            "records",
            "--boxes",
            str(world / "train/boxes.csv"),
            "--images",
            str(world / "train"),
            "--images-csv",
            str(world / "train/train.csv"),
            "--out",
            str(tmp / "records"),
            "--conf",
            "synth",
        ]
    )
    assert rc == 0
    recs = tmp / "records" / records.confs["synth"]["output"]
    conf = configs.get_conf("tiny_cpu")
    train.main(conf, recs, tmp / "runs", steps=FIRST_LEG)
    leg1 = json.loads((tmp / "runs" / conf["output"] / "train.json").read_text())
    run = train.main(conf, recs, tmp / "runs", steps=STEPS)
    init = evaluate.load_metrics(evaluate.main(run, recs, checkpoint="init"))
    final = evaluate.load_metrics(evaluate.main(run, recs))
    exported = export.main(run)
    done = json.loads((run / "train.json").read_text())
    print(  # shown with pytest -rP: the figures quoted in the detection report
        f"\ntiny_cpu on synthetic val ({final['n_images']} images): AP@0.5 untrained "
        f"{init['ap50']:.4f} -> trained {final['ap50']:.4f} (AP {final['coco']['AP']:.4f}) "
        f"after {STEPS} steps; train wall {leg1['seconds'] + done['seconds']:.1f} s"
    )
    return {
        "tmp": tmp,
        "world": world,
        "records": recs,
        "run": run,
        "leg1": leg1,
        "init": init,
        "final": final,
        "export": exported,
    }


@pytest.fixture(scope="module")
def detected(pipe: dict[str, Any]) -> dict[str, Any]:
    """``gldboxes detect boxes`` in a fresh process on the validation images (held out from
    training) and the retrieval images (database and queries)."""
    tmp, world, recs = pipe["tmp"], pipe["world"], pipe["records"]
    val_paths = (recs / "val_images.txt").read_text().split()
    db_paths = sorted(str(p) for p in (world / "retrieval" / "jpg").glob("*.jpg"))
    lst = tmp / "to_detect.txt"
    lst.write_text("\n".join(val_paths + db_paths) + "\n")
    out = tmp / "detected.csv"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gldboxes",
            "-q",
            "detect",
            "boxes",
            "--model",
            str(pipe["export"]),
            "--images",
            str(lst),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "csv": out,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "val_ids": [Path(p).stem for p in val_paths],
        "n_retrieval": len(db_paths),
    }


class TestTrain:
    def test_checkpoints_resume_and_logs(self, pipe: dict[str, Any]) -> None:
        run: Path = pipe["run"]
        assert pipe["leg1"]["steps"] == FIRST_LEG and pipe["leg1"]["resumed_from"] == 0
        done = json.loads((run / "train.json").read_text())
        assert done["steps"] == STEPS and done["resumed_from"] == FIRST_LEG
        assert done["last_losses"]["total_loss"] < 1.0  # ~1.8 at the start
        assert (run / f"ckpt-{STEPS}.index").is_file()
        assert list((run / "train").glob("events.out.tfevents.*"))  # TensorBoard
        written = (run / "detector.yaml").read_text()
        assert "seed: 0" in written and "tf-models-official" in written
        assert "train_steps: 400" in written
        assert (run / "params.yaml").is_file()

    def test_done_run_is_skipped(self, pipe: dict[str, Any]) -> None:
        done = pipe["run"] / "train.json"
        before = done.stat().st_mtime_ns
        train.main(configs.get_conf("tiny_cpu"), pipe["records"], pipe["run"].parent, steps=STEPS)
        assert done.stat().st_mtime_ns == before

    def test_ap50_rises_well_above_untrained(self, pipe: dict[str, Any]) -> None:
        init, final = pipe["init"], pipe["final"]
        assert init["n_images"] == final["n_images"] >= 12
        assert init["ap50"] < 0.1
        assert final["ap50"] >= 0.6
        assert final["ap50"] - init["ap50"] >= 0.5
        assert set(final["coco"]) >= {"AP", "AP50", "AP75", "ARmax100"}
        assert final["coco"]["AP"] <= final["ap50"]


class TestExportAndBoxes:
    def test_export_layout(self, pipe: dict[str, Any]) -> None:
        ex: Path = pipe["export"]
        assert (ex / "saved_model.pb").is_file() and (ex / "variables").is_dir()
        info = json.loads((ex / "detector.json").read_text())
        assert info["signature"]["inputs"]["inputs"]["dtype"] == "uint8"
        assert info["checkpoint"].endswith(f"ckpt-{STEPS}")
        # The model card: trained on the synthetic world only, AP@0.5 of `detect eval`.
        assert info["format_version"] == 2 and info["preset"] == "detector-tiny_cpu-128"
        assert info["input_size"] == [128, 128] and info["training"]["steps"] == STEPS
        data = info["training_data"]
        assert data["records"] == str(pipe["records"]) and data["split"] == "train"
        assert data["synthetic_world"] is True and data["worlds"] == [str(pipe["world"])]
        assert data["n_images"] == records.load_records_info(pipe["records"]).splits["train"]
        assert info["validation"]["ap50"] == pytest.approx(pipe["final"]["ap50"])
        assert info["fit_for"] == "synthetic_world"
        assert info["warning"] == "trained on the synthetic world only; not for real photos"

    def test_new_process_detects_held_out_images(
        self, pipe: dict[str, Any], detected: dict[str, Any]
    ) -> None:
        boxes = read_boxes_csv(detected["csv"])
        assert "images/s" in detected["stdout"]
        assert "not for real photos" not in detected["stderr"]  # all synthetic: quiet
        stats = json.loads(Path(str(detected["csv"]) + ".json").read_text())
        assert stats["n_images"] == len(detected["val_ids"]) + detected["n_retrieval"]
        assert stats["n_bad"] == 0 and stats["images_per_second"] > 0
        assert all(b.score is not None and 0 <= b.score <= 1 for v in boxes.values() for b in v)
        res = evaluate.evaluate_boxes(
            detected["csv"], pipe["records"] / "val_boxes.csv", image_ids=detected["val_ids"]
        )
        # The exported model scores like the checkpoint did in Model Garden's evaluator.
        assert res["ap"] >= pipe["init"]["ap50"] + 0.5
        assert abs(res["ap"] - pipe["final"]["ap50"]) < 0.15

    def test_eval_cli_on_boxes_file(
        self, pipe: dict[str, Any], detected: dict[str, Any], capsys: pytest.CaptureFixture[str]
    ) -> None:
        rc = cli_main(
            [
                "-q",
                "detect",
                "eval",
                "--boxes",
                str(detected["csv"]),
                "--gt",
                str(pipe["records"] / "val_boxes.csv"),
                "--ids",
                str(pipe["records"] / "val_images.txt"),
            ]
        )
        assert rc == 0
        res = json.loads(capsys.readouterr().out)
        assert res["n_images"] == len(detected["val_ids"])
        assert res["ap"] == pytest.approx(res["coco"]["AP50"], abs=1e-9)

    def test_boxes_feed_the_retrieval_region_source(
        self, pipe: dict[str, Any], detected: dict[str, Any]
    ) -> None:
        from retrieval import regions
        from retrieval.evaluation.datasets import RevisitedDataset

        db = RevisitedDataset.load(pipe["world"] / "retrieval").imlist
        out = regions.main(
            regions.confs["d2r-0.1"],
            pipe["world"] / "retrieval",
            pipe["tmp"] / "regions",
            boxes=detected["csv"],
        )
        got = regions.read_regions_csv(out)
        boxes = read_boxes_csv(detected["csv"])
        assert sorted(got) == sorted(db)  # the database images (queries are not indexed)
        for name, regs in got.items():
            kept = [b for b in boxes.get(name, []) if b.score is not None and b.score >= 0.1]
            assert len(regs) == 1 + len(kept)
        assert sum(len(r) - 1 for r in got.values()) > 0  # some landmarks were found
