"""Every detector preset runs for real: train (CLI subprocess for the GPU presets), AP@0.5
evaluation, SavedModel export and inference, on the tiny synthetic world.

The GPU presets keep their architecture and code path; only the batch, the number of steps
and, for Faster R-CNN, ``--input-size`` (a multiple of ``2**max_level``) shrink.
``ssd_mobilenetv2`` runs at its default 384x384: the issue's command (it crashed at 320).
~3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import tiny_world_records

from detection import configs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY_SIZE = 128  # a multiple of 2**max_level for every preset (max_level <= 7)
# Input size each preset trains at here (None: the preset's own).
SIZES: dict[str, int | None] = {"tiny_cpu": None, "ssd_mobilenetv2": None, "frcnn_resnet50": 128}
STEPS = 2
EXIT_TIMEOUT = 20.0  # seconds between printing the run folder and the process exiting


class TestInputSize:
    @pytest.mark.parametrize("name", list(configs.confs))
    def test_smoke(self, name: str) -> None:
        conf = configs.confs[name]
        stride = 2 ** conf["max_level"]
        assert all(side % stride == 0 for side in conf["input_size"]), name
        assert conf["output"].endswith(f"-{conf['input_size'][0]}")
        configs.check_input_size(conf)

    def test_ssd_mobilenetv2_uses_model_gardens_mobile_size(self) -> None:
        # Model Garden's mobile RetinaNet (levels 3-7) trains at 384; 320 pads to 384.
        assert configs.confs["ssd_mobilenetv2"]["input_size"] == [384, 384]
        assert configs.confs["ssd_mobilenetv2"]["max_level"] == 7

    def test_override_renames_the_run(self) -> None:
        conf = configs.get_conf("ssd_mobilenetv2", input_size=TINY_SIZE)
        assert conf["input_size"] == [TINY_SIZE, TINY_SIZE]
        assert conf["output"] == "detector-ssd_mobilenetv2-128"
        conf = configs.get_conf("frcnn_resnet50", input_size=[128, 256])
        assert conf["output"] == "detector-frcnn_resnet50-128x256"
        assert configs.get_conf("tiny_cpu", input_size=None)["output"] == "detector-tiny_cpu-128"

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"multiples of 2\*\*max_level = 128.*384 or 512"):
            configs.get_conf("ssd_mobilenetv2", input_size=[448, 448])
        with pytest.raises(ValueError, match=r"= 128.*try 128 or 256"):
            configs.get_conf("ssd_mobilenetv2", input_size=64)
        bad = configs.get_conf("ssd_mobilenetv2")
        bad["input_size"] = [320, 320]  # the old preset: Model Garden would feed 384
        with pytest.raises(ValueError, match=r"\[320, 320\].*= 128") as err:
            configs.build_experiment(bad, None)
        assert "\n" not in str(err.value)


def _cli_train(
    name: str, recs: Path, runs: Path, *, input_size: int | None, steps: int
) -> dict[str, Any]:
    """``gldboxes detect train`` in a subprocess; seconds from its result line to its exit."""
    cmd = [
        sys.executable,
        "-m",
        "gldboxes",
        "-q",
        "detect",
        "train",
        "--records",
        str(recs),
        "--runs",
        str(runs),
        "--conf",
        name,
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--init-checkpoint",
        "none",  # frcnn_resnet50's default is a gs:// ImageNet checkpoint
    ]
    if input_size is not None:
        cmd += ["--input-size", str(input_size)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TQDM_DISABLE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    printed: float | None = None
    lines = []
    for line in proc.stdout:  # the run folder is the last line train prints
        lines.append(line)
        if line.strip().startswith(str(runs)):
            printed = time.monotonic()
    try:
        _, err = proc.communicate(timeout=EXIT_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"detect train --conf {name} did not exit: {err[-2000:]}")
    exited = time.monotonic()
    assert proc.returncode == 0, err[-3000:]
    assert printed is not None, "".join(lines)[-2000:]
    return {"run": Path(lines[-1].strip()) if printed else None, "linger": exited - printed}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("presets")
    world_dir, recs = tiny_world_records(tmp, train_per_landmark=10)
    return {"tmp": tmp, "world": world_dir, "records": recs}


@pytest.mark.slow
class TestEveryPresetRuns:
    @pytest.mark.parametrize("name", ["tiny_cpu", "ssd_mobilenetv2", "frcnn_resnet50"])
    def test_real_case(self, name: str, world: dict[str, Path]) -> None:
        from detection import evaluate, export, train
        from detection.inference import load_detector

        runs = world["tmp"] / "runs"
        if name == "tiny_cpu":  # in-process (the pipeline test drives it at length)
            conf = configs.get_conf(name, train_batch_size=2)
            run = train.main(conf, world["records"], runs, steps=STEPS)
        else:  # the CLI the README shows, as a user runs it; it must exit promptly
            got = _cli_train(name, world["records"], runs, input_size=SIZES[name], steps=STEPS)
            run = got["run"]
            assert got["linger"] < EXIT_TIMEOUT, f"{name}: exited {got['linger']:.1f} s late"
        conf = train.load_run_conf(run)
        side = SIZES[name] or configs.confs[name]["input_size"][0]
        assert conf["input_size"] == [side, side]
        assert run.name == f"detector-{name}-{side}"
        done = json.loads((run / "train.json").read_text())
        assert done["steps"] == STEPS and (run / f"ckpt-{STEPS}.index").is_file()
        assert np.isfinite(done["last_losses"]["total_loss"])

        metrics = evaluate.load_metrics(evaluate.main(run, world["records"]))
        assert metrics["n_images"] == 15 and 0.0 <= metrics["ap50"] <= 1.0

        exported = export.main(run)
        assert json.loads((exported / "detector.json").read_text())["input_size"] == [side, side]
        detector = load_detector(exported)
        rgb = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        det = detector(rgb)
        assert det.boxes.shape[1] == 4 and len(det.scores) <= conf["max_detections"]
        assert np.all(np.diff(det.scores) <= 0)
