"""Evaluation during training (``detect train --eval-every``) and the paper's fine-tuning presets.

The AP@0.5 written to TensorBoard must be the one in the history file, and the same number
``detect eval`` computes from the saved checkpoint. The paper presets run two steps at 128 px.
~2.5 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import keras_mobilenet_v2_h5, tiny_world_records

from detection import configs, evaluate, train
from gldboxes.cli.main import build_parser
from gldboxes.cli.main import main as cli_main

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAPER = ("frcnn_resnet50_paper", "ssd_mobilenetv2_paper")
# The README's "Evaluation during training" command, run here on this module's tiny world.
README_ARGS = "--conf tiny_cpu --batch-size 2 --steps 5 --eval-every 2"


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_world_records(tmp_path_factory.mktemp("train_eval"), train_per_landmark=4)[1]


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar summary in the event files under ``log_dir``."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    for f in files:
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else tf.make_ndarray(v.tensor)
                out.setdefault(v.tag, {})[int(event.step)] = float(value)
    return out


class TestEvalEvery:
    def test_exception(self, recs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        conf = configs.get_conf("tiny_cpu")
        with pytest.raises(ValueError, match=r"eval_every must be >= 0.*-1"):
            train.main(conf, recs, tmp_path, steps=2, eval_every=-1)
        with pytest.raises(ValueError, match=r"records-synth.*split 'test'.*empty or absent"):
            train.main(conf, recs, tmp_path, steps=2, eval_every=2, eval_split="test")
        argv = ["detect", "train", "--records", str(recs), "--runs", str(tmp_path)]
        assert cli_main([*argv, "--eval-every", "2", "--eval-records", str(tmp_path)]) == 2
        assert "records.json" in capsys.readouterr().err
        assert not list(tmp_path.rglob("ckpt-*")), "nothing may be trained before the checks"

    @pytest.mark.slow
    def test_real_case(self, recs: Path, tmp_path: Path) -> None:
        import tensorflow as tf

        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        assert README_ARGS in " ".join(readme.split()), "the README command changed"
        argv = ["-q", "detect", "train", "--records", str(recs), "--runs", str(tmp_path)]
        assert cli_main([*argv, *README_ARGS.split()]) == 0
        run = tmp_path / "detector-tiny_cpu-128"
        hist = train.load_eval_history(run)
        assert [e["step"] for e in hist["evals"]] == [2, 4, 5]  # every 2 steps and the last
        assert hist["every"] == 2 and hist["split"] == "val"
        ap50 = {e["step"]: e["ap50"] for e in hist["evals"]}
        assert all(0.0 <= v <= 1.0 for v in ap50.values())

        # TensorBoard: one eval/AP50 point per evaluation, the history's values.
        scalars = _scalars(run / "validation")
        assert sorted(scalars["eval/AP50"]) == [2, 4, 5]
        for step, value in scalars["eval/AP50"].items():
            assert value == pytest.approx(ap50[step], rel=1e-6, abs=1e-7)
        for e in hist["evals"]:
            assert scalars["eval/AP"][e["step"]] == pytest.approx(e["ap"], rel=1e-6, abs=1e-7)
            assert scalars["eval/validation_loss"][e["step"]] == pytest.approx(
                e["validation_loss"], rel=1e-6
            )
        with open(run / "eval_history.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["step"]) for r in rows] == [2, 4, 5]
        assert [float(r["ap50"]) for r in rows] == [ap50[2], ap50[4], ap50[5]]

        # The in-training number is detect eval's number for the saved checkpoint.
        metrics = json.loads((run / "eval" / "val-step4.json").read_text())
        assert metrics["ap50"] == ap50[4] and metrics["checkpoint"].endswith("ckpt-4")
        again = evaluate.load_metrics(
            evaluate.main(run, recs, checkpoint=str(run / "ckpt-4"), overwrite=True)
        )
        assert again["ap50"] == pytest.approx(ap50[4], abs=1e-6)

        # The best checkpoint is kept beside the run, loadable by TF.
        best_step = max(ap50, key=lambda s: (ap50[s], -s))
        assert hist["best"]["step"] == best_step and hist["best"]["ap50"] == ap50[best_step]
        assert tf.train.latest_checkpoint(str(run / "best")) == str(
            run / "best" / f"ckpt-{best_step}"
        )
        done = json.loads((run / "train.json").read_text())
        assert done["steps"] == 5 and done["best"] == hist["best"]

        # Resuming to step 7 adds evaluations 6 and 7 and keeps the earlier ones.
        assert cli_main([*argv, *README_ARGS.replace("--steps 5", "--steps 7").split()]) == 0
        hist2 = train.load_eval_history(run)
        assert [e["step"] for e in hist2["evals"]] == [2, 4, 5, 6, 7]
        assert hist2["evals"][:3] == hist["evals"]
        assert sorted(_scalars(run / "validation")["eval/AP50"]) == [2, 4, 5, 6, 7]


class TestPaperPresets:
    @pytest.mark.parametrize("name", PAPER)
    def test_smoke(self, name: str) -> None:
        conf = configs.get_conf(name)
        assert conf["requires_init_checkpoint"] and conf["eval_every"] > 0
        assert conf["train_steps"] % conf["eval_every"] == 0
        params = configs.build_experiment(conf, None)
        opt = params.trainer.optimizer_config
        if name == "ssd_mobilenetv2_paper":  # OD API ssd_mobilenet_v2_coco.config
            assert params.task.train_data.global_batch_size == 24
            assert opt.optimizer.type == "rmsprop"
            assert (opt.optimizer.rmsprop.rho, opt.optimizer.rmsprop.epsilon) == (0.9, 1.0)
            assert opt.learning_rate.exponential.initial_learning_rate == 0.004
            assert opt.learning_rate.exponential.decay_rate == 0.95
        else:  # OD API faster_rcnn_resnet50_coco.config, batch 1 -> 8
            assert params.task.train_data.global_batch_size == 8
            assert opt.optimizer.type == "sgd" and opt.optimizer.sgd.momentum == 0.9
            assert opt.learning_rate.constant.learning_rate == pytest.approx(8 * 0.0003)
        args = build_parser().parse_args(["detect", "train", "--records", "r", "--runs", "r"])
        assert args.conf == "tiny_cpu"  # the default stays the CPU preset
        args = build_parser().parse_args(
            ["detect", "train", "--records", "r", "--runs", "r", "--conf", name]
        )
        assert args.conf == name and args.eval_every is None  # None: the preset's

    def test_exception(self, recs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        for name in PAPER:
            with pytest.raises(ValueError, match=r"pretrained detector: pass --init-checkpoint"):
                train.main(configs.get_conf(name, input_size=128), recs, tmp_path, steps=1)
        argv = ["detect", "train", "--records", str(recs), "--runs", str(tmp_path)]
        assert cli_main([*argv, "--conf", "ssd_mobilenetv2_paper"]) == 2
        assert "--init-checkpoint" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())

    @pytest.mark.slow
    @pytest.mark.parametrize("name", PAPER)
    def test_real_case(self, name: str, recs: Path, tmp_path: Path) -> None:
        # The GPU protocol at 128 px, batch 2, 2 steps. The SSD starts from a Keras ImageNet
        # .h5 written here (random values, the real format) and evaluates as its preset says;
        # Faster R-CNN (slow on CPU) starts from scratch with evaluation switched off (0).
        conf = configs.get_conf(name, input_size=128, train_batch_size=2)
        ssd = name == "ssd_mobilenetv2_paper"
        init = str(keras_mobilenet_v2_h5(tmp_path, 1.0, seed=5)[0]) if ssd else "none"
        run = train.main(
            conf,
            recs,
            tmp_path / "runs",
            steps=2,
            init_checkpoint=init,
            eval_every=None if ssd else 0,
        )
        assert run.name == conf["output"] and run.name.endswith("_paper-128")
        done = json.loads((run / "train.json").read_text())
        assert done["steps"] == 2 and np.isfinite(done["last_losses"]["total_loss"])
        used = train.load_run_conf(run)
        assert used["resolved_init_checkpoint"] == (init if ssd else None)
        if not ssd:
            assert done["best"] is None and not (run / "eval_history.json").exists()
            return
        # The preset evaluates every 10000 steps and at the last: here once, at step 2.
        hist = train.load_eval_history(run)
        assert [e["step"] for e in hist["evals"]] == [2]
        assert 0.0 <= hist["evals"][0]["ap50"] <= 1.0
        assert hist["best"]["step"] == 2 and done["best"] == hist["best"]
