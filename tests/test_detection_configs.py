"""Detector presets -> Model Garden experiment configs; init checkpoints from paths and URLs."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from detection import configs
from detection.records import RecordsInfo

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _records(tmp_path: Path) -> RecordsInfo:
    return RecordsInfo(
        root=tmp_path,
        splits={"train": 40, "val": 10},
        positives={"train": 38, "val": 9},
        patterns={s: str(tmp_path / f"{s}-*.tfrecord") for s in ("train", "val")},
    )


class TestPresets:
    def test_every_key_documented_and_shared(self) -> None:
        keys = set(configs.confs["tiny_cpu"])
        for name, conf in configs.confs.items():
            # Same keys in every preset (num_proposals is Faster R-CNN only).
            assert set(conf) - {"num_proposals"} == keys, name
            assert conf["output"].startswith(f"detector-{name}")
        src = Path(configs.__file__).read_text()
        for key in keys:
            assert f'"{key}": ' in src

    @pytest.mark.parametrize("name", list(configs.confs))
    def test_experiment(self, name: str, tmp_path: Path) -> None:
        from official.vision.configs import maskrcnn, retinanet

        conf = configs.get_conf(name)
        exp = configs.build_experiment(conf, _records(tmp_path), init_checkpoint="/ck/ckpt-1")
        task = exp.task
        assert task.model.num_classes == 2  # background + landmark
        assert task.model.input_size == [*conf["input_size"], 3]
        assert task.train_data.input_path.endswith("train-*.tfrecord")
        assert task.validation_data.input_path.endswith("val-*.tfrecord")
        assert task.train_data.global_batch_size == conf["train_batch_size"]
        assert task.train_data.seed == conf["seed"]
        assert task.init_checkpoint == "/ck/ckpt-1"
        assert task.model.norm_activation.norm_momentum == conf["norm_momentum"]
        assert exp.trainer.train_steps == conf["train_steps"]
        assert exp.trainer.validation_steps == -1
        assert exp.runtime.mixed_precision_dtype == "float32"
        assert task.train_data.dtype == "float32"
        assert exp.trainer.optimizer_config.optimizer.type == conf["optimizer"]["type"]
        if conf["family"] == "maskrcnn":
            assert isinstance(task, maskrcnn.MaskRCNNTask)
            assert task.model.include_mask is False and task.model.mask_head is None
            assert task.model.backbone.resnet.model_id == 50
        else:
            assert isinstance(task, retinanet.RetinaNetTask)
            assert task.model.backbone.type == "mobilenet"
            assert task.model.backbone.mobilenet.model_id == "MobileNetV2"
            assert task.model.head.use_separable_conv is True

    def test_tiny_cpu_short_run_settings(self) -> None:
        # STACK.md: from-scratch CPU runs need momentum 0.9 and Adam 1e-3; no gs:// init.
        tiny = configs.confs["tiny_cpu"]
        assert tiny["norm_momentum"] == 0.9
        assert tiny["optimizer"]["type"] == "adam"
        assert tiny["optimizer"]["learning_rate"] == 1e-3
        assert tiny["init_checkpoint"] is None

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="unknown detector preset 'ssd'"):
            configs.get_conf("ssd")
        with pytest.raises(ValueError, match="unknown detector config key 'lr'"):
            configs.get_conf("tiny_cpu", lr=1.0)
        bad = configs.get_conf("tiny_cpu")
        bad["backbone"] = {"type": "vgg"}
        with pytest.raises(ValueError, match="backbone type must be mobilenet or resnet"):
            configs.build_experiment(bad, _records(tmp_path))
        bad = configs.get_conf("tiny_cpu")
        bad["optimizer"]["schedule"] = "exp"
        with pytest.raises(ValueError, match=r"constant, cosine or exponential, got 'exp'"):
            configs.build_experiment(bad, _records(tmp_path))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tensorflow as tf

    d = tmp_path_factory.mktemp("ck")
    ck = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    ck.save(str(d / "ckpt"))  # ckpt-1
    ck.save(str(d / "ckpt"))  # ckpt-2
    return d


class TestInitCheckpoint:
    def test_paths(self, ckpt_dir: Path, tmp_path: Path) -> None:
        assert configs.resolve_init_checkpoint(None, tmp_path) is None
        assert configs.resolve_init_checkpoint(str(ckpt_dir), tmp_path) == str(ckpt_dir / "ckpt-2")
        one = str(ckpt_dir / "ckpt-1")
        assert configs.resolve_init_checkpoint(one, tmp_path) == one
        gs = "gs://bucket/resnet50_imagenet/ckpt-28080"
        assert configs.resolve_init_checkpoint(gs, tmp_path) == gs

    def test_url_to_tarball(self, ckpt_dir: Path, tmp_path: Path) -> None:
        import tensorflow as tf

        tgz = tmp_path / "pretrained.tar.gz"
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(ckpt_dir, arcname="pretrained")
        cache = tmp_path / "cache"
        got = configs.resolve_init_checkpoint(tgz.as_uri(), cache)
        assert got == str(cache / "pretrained-unpacked" / "pretrained" / "ckpt-2")
        v = tf.Variable([0.0, 0.0])
        tf.train.Checkpoint(v=v).read(got).assert_existing_objects_matched()
        assert v.numpy().tolist() == [1.0, 2.0]
        # Second call: served from the cache.
        assert configs.resolve_init_checkpoint(tgz.as_uri(), cache) == got

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            configs.resolve_init_checkpoint(str(tmp_path), tmp_path)
        with pytest.raises(FileNotFoundError, match="not a checkpoint prefix"):
            configs.resolve_init_checkpoint(str(tmp_path / "ckpt-9"), tmp_path)
        plain = tmp_path / "x.bin"
        plain.write_bytes(b"nope")
        with pytest.raises(ValueError, match=r"expected a \.tar"):
            configs.resolve_init_checkpoint(plain.as_uri(), tmp_path / "c")


class TestCli:
    def test_help_lists_steps(self, capsys: pytest.CaptureFixture[str]) -> None:
        from gldboxes.cli.main import main

        with pytest.raises(SystemExit) as exc:
            main(["detect", "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for step in ("records", "train", "eval", "export", "boxes"):
            assert step in out

    def test_errors_exit_2(self, tmp_path: Path) -> None:
        from gldboxes.cli.main import main

        assert main(["-q", "detect", "eval", "--run", str(tmp_path)]) == 2  # no --records
        assert (
            main(
                [
                    "-q",
                    "detect",
                    "boxes",
                    "--model",
                    str(tmp_path),
                    "--images",
                    str(tmp_path / "none"),
                    "--out",
                    str(tmp_path / "o.csv"),
                ]
            )
            == 2
        )
