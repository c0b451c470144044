"""Pretrained initialisation from local files: Keras ImageNet .h5 (backbone) and Model Garden
checkpoints (backbone or all), written here in the real formats at tiny sizes.

The training tests run tiny_cpu for one or two steps (~2 minutes in all on 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tiny_models import keras_mobilenet_v2_h5 as _keras_h5
from tiny_models import randomise_weights as _randomise
from tiny_models import tiny_world_records

from detection import configs, init, train
from gldboxes.cli.main import main as cli_main

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _mg_mobilenet(scale: float) -> Any:
    import tf_keras
    from official.vision.modeling.backbones import mobilenet

    return mobilenet.MobileNet(
        model_id="MobileNetV2",
        filter_size_scale=scale,
        input_specs=tf_keras.layers.InputSpec(shape=[None, 64, 64, 3]),
    )


def _coco_checkpoint(out_dir: Path, num_classes: int) -> Path:
    """A Model Garden checkpoint of a tiny_cpu RetinaNet trained for ``num_classes`` (trainer
    layout: ``model`` plus ``backbone``/``decoder``/``head`` at the root)."""
    import tensorflow as tf
    from official.core import task_factory

    params = configs.build_experiment(configs.get_conf("tiny_cpu"), None)
    params.task.model.num_classes = num_classes
    model = task_factory.get_task(params.task).build_model()
    _randomise(model.weights, 7)
    prefix = out_dir / "coco" / "ckpt-7"
    tf.train.Checkpoint(model=model, **model.checkpoint_items).write(str(prefix))
    return prefix


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_world_records(tmp_path_factory.mktemp("init"), train_per_landmark=2)[1]


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, np.ndarray]]:
    """Every variable of the model (by checkpoint key) right after initialisation, i.e.
    before the first training step."""
    taken: list[dict[str, np.ndarray]] = []
    original = init.initialize_model

    def spy(model: Any, source: str, modules: str) -> dict[str, Any]:
        report = original(model, source, modules)
        items = dict(model.checkpoint_items)
        taken.append({k: v.numpy() for k, v in init.checkpoint_keys(items)})
        taken[-1]["__report__"] = report  # type: ignore[assignment]
        return report

    monkeypatch.setattr(init, "initialize_model", spy)
    return taken


@pytest.mark.slow
class TestKerasH5:
    def test_real_case_cli_backbone(
        self, recs: Path, tmp_path: Path, snapshots: list[dict[str, Any]]
    ) -> None:
        h5, keras_values = _keras_h5(tmp_path, 0.35, seed=1)  # tiny_cpu: MobileNetV2 x0.35
        rc = cli_main(
            [
                "-q",
                "detect",
                "train",
                "--records",
                str(recs),
                "--runs",
                str(tmp_path / "runs"),
                "--conf",
                "tiny_cpu",
                "--steps",
                "1",
                "--init-checkpoint",
                str(h5),
                "--init-modules",
                "backbone",
            ]
        )
        assert rc == 0
        assert len(snapshots) == 1
        snap = snapshots[0]
        backbone = [v for k, v in snap.items() if k.startswith("backbone/")]
        assert len(backbone) == len(keras_values) == 260
        # Every Keras array (random, so distinct) is one backbone variable, exactly.
        assert {v.tobytes() for v in backbone} == {v.tobytes() for v in keras_values}
        others = [v for k, v in snap.items() if k.startswith(("head/", "decoder/"))]
        keras_bytes = {v.tobytes() for v in keras_values}
        assert others and not any(v.tobytes() in keras_bytes for v in others)

    def test_resnet50_bias_and_epsilon_folded(self, tmp_path: Path) -> None:
        import tf_keras
        from official.vision.modeling.backbones import resnet

        net = tf_keras.applications.ResNet50(
            weights=None, include_top=False, input_shape=(64, 64, 3)
        )
        _randomise(net.weights, 3)
        path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
        net.save_weights(str(path))
        bb = resnet.ResNet(
            model_id=50,
            input_specs=tf_keras.layers.InputSpec(shape=[None, 64, 64, 3]),
            norm_epsilon=1e-3,
        )
        assigned = init.load_keras_h5(bb, path)
        assert len(assigned) == len(bb.weights) == 53 * 5
        # Reference: the affine map of Keras' conv bias + batch-norm equals Model Garden's
        # batch-norm alone (no bias) after folding, for every unit.
        layers = {layer.name: layer for layer in net.layers}
        bns = [layer for layer in init._leaf_layers(bb) if hasattr(layer, "moving_mean")]
        names = sorted(
            (n[: -len("_bn")] for n in layers if n.endswith("_bn")),
            key=lambda n: [int(t) for t in n.replace("conv", "").replace("block", "").split("_")],
        )
        assert len(names) == len(bns) == 53
        for name, bn in zip(names, bns, strict=True):
            bias = layers[f"{name}_conv"].bias.numpy().astype(np.float64)
            kbn = layers[f"{name}_bn"]
            g, b, m, v = (w.numpy().astype(np.float64) for w in kbn.weights)
            scale = g / np.sqrt(v + kbn.epsilon)
            shift = b + scale * (bias - m)
            g2, b2, m2, v2 = (w.numpy().astype(np.float64) for w in bn.weights)
            scale2 = g2 / np.sqrt(v2 + bn.epsilon)
            np.testing.assert_allclose(scale2, scale, rtol=1e-5)
            np.testing.assert_allclose(b2 - scale2 * m2, shift, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(bb.weights[0].numpy(), layers["conv1_conv"].kernel.numpy())


@pytest.mark.slow
class TestModelGardenCheckpoint:
    @pytest.mark.parametrize("modules", ["backbone", "all"])
    def test_real_case(
        self, modules: str, recs: Path, tmp_path: Path, snapshots: list[dict[str, Any]]
    ) -> None:
        import tensorflow as tf

        prefix = _coco_checkpoint(tmp_path, num_classes=5)  # "COCO": other class count
        conf = configs.get_conf("tiny_cpu", init_checkpoint_modules=modules)
        train.main(conf, recs, tmp_path / "runs", steps=1, init_checkpoint=str(prefix))
        assert len(snapshots) == 1
        snap = snapshots[0]
        report = snap.pop("__report__")
        reader = tf.train.load_checkpoint(str(prefix))
        same = {k: np.array_equal(v, reader.get_tensor(k)) for k, v in snap.items()}
        assert same and all(ok for k, ok in same.items() if k.startswith("backbone/"))
        head = {k: ok for k, ok in same.items() if not k.startswith("backbone/")}
        if modules == "backbone":
            assert head and not any(head.values())
            assert report["skipped"] == []
        else:
            # Only the class logits (last axis: anchors x classes) keep their fresh init.
            assert report["skipped"] and all("classifier" in k for k in report["skipped"])
            assert all(ok for k, ok in head.items() if k not in report["skipped"])
            assert not any(head[k] for k in report["skipped"])

    def test_resumed_run_keeps_its_weights(
        self, recs: Path, tmp_path: Path, snapshots: list[dict[str, Any]]
    ) -> None:
        prefix = _coco_checkpoint(tmp_path, num_classes=2)
        conf = configs.get_conf("tiny_cpu")
        train.main(conf, recs, tmp_path / "runs", steps=1)  # scratch; writes ckpt-1
        train.main(conf, recs, tmp_path / "runs", steps=2, init_checkpoint=str(prefix))
        assert snapshots == []  # the run's own checkpoint wins over --init-checkpoint


class TestExceptions:
    def _one_line(self, exc: pytest.ExceptionInfo[ValueError]) -> None:
        assert "\n" not in str(exc.value)

    def test_missing_files(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="no such Keras weights file") as exc:
            init.resolve_init_source(str(tmp_path / "nope_no_top.h5"), tmp_path)
        self._one_line(exc)
        with pytest.raises(ValueError, match="no such file, folder or checkpoint") as exc:
            init.resolve_init_source(str(tmp_path / "ckpt-3"), tmp_path)
        self._one_line(exc)
        assert init.resolve_init_source("none", tmp_path) is None

    def test_cli_exit_2(
        self, recs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        base = ["-q", "detect", "train", "--records", str(recs), "--runs", str(tmp_path)]
        missing = str(tmp_path / "mobilenet_v2_weights_no_top.h5")
        assert cli_main([*base, "--steps", "1", "--init-checkpoint", missing]) == 2
        err = capsys.readouterr().err.strip()
        assert "no such Keras weights file" in err and "\n" not in err
        h5, _ = _keras_h5(tmp_path, 0.35, seed=4)
        argv = [*base, "--steps", "1", "--init-checkpoint", str(h5), "--init-modules", "all"]
        assert cli_main(argv) == 2
        assert "holds a backbone only" in capsys.readouterr().err

    def test_gs_path_offline(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(init, "_gcs_reachable", lambda timeout=3.0: False)
        spec = "gs://cloud-tpu-checkpoints/vision-2.0/resnet50_imagenet/ckpt-28080"
        with pytest.raises(ValueError, match="Google Cloud Storage is unreachable") as exc:
            init.resolve_init_source(spec, tmp_path)
        self._one_line(exc)

    def test_modules(self) -> None:
        with pytest.raises(ValueError, match="holds a backbone only"):
            init.check_init_modules("/w/x_no_top.h5", "all")
        with pytest.raises(ValueError, match="--init-modules must be one of"):
            init.check_init_modules("/w/ckpt-1", "head")

    def test_h5_of_another_width(self, tmp_path: Path) -> None:
        h5, _ = _keras_h5(tmp_path, 0.5, seed=2)
        with pytest.raises(
            ValueError,
            match=r"Keras layer 'block_1_project' \(1, 1, 48, 16\) does not fit backbone",
        ) as exc:
            init.load_keras_h5(_mg_mobilenet(0.35), h5)
        self._one_line(exc)

    def test_not_keras_h5(self, tmp_path: Path) -> None:
        import h5py

        path = tmp_path / "x.weights.h5"
        with h5py.File(path, "w") as fh:
            fh.create_group("layers")
        with pytest.raises(ValueError, match="no 'layer_names'"):
            init.read_keras_h5(path)

    def test_checkpoint_layouts(self, tmp_path: Path) -> None:
        import tensorflow as tf
        import tf_keras

        wide = _mg_mobilenet(0.5)
        tf.train.Checkpoint(backbone=wide).write(str(tmp_path / "wide" / "ckpt-1"))
        tiny = _mg_mobilenet(0.35)
        with pytest.raises(ValueError, match=r"variable backbone/\S+ has shape") as exc:
            init.load_checkpoint(
                SimpleNamespace(backbone=tiny), str(tmp_path / "wide/ckpt-1"), "backbone"
            )
        self._one_line(exc)

        tf.train.Checkpoint(backbone=tiny).write(str(tmp_path / "bb" / "ckpt-1"))
        head = tf_keras.layers.Dense(3)
        head.build((None, 4))
        model = SimpleNamespace(backbone=tiny, checkpoint_items={"backbone": tiny, "head": head})
        with pytest.raises(ValueError, match=r"variable head/kernel/\.ATTRIBUTES\S* is missing"):
            init.load_checkpoint(model, str(tmp_path / "bb/ckpt-1"), "all")
        assert init.load_checkpoint(model, str(tmp_path / "bb/ckpt-1"), "backbone")[0]

        odapi = tf.train.Checkpoint(
            model=tf.train.Checkpoint(_feature_extractor=tf.Variable(tf.zeros([3])))
        )
        odapi.write(str(tmp_path / "odapi" / "ckpt-0"))
        with pytest.raises(ValueError, match="not a Model Garden checkpoint") as exc:
            init.load_checkpoint(model, str(tmp_path / "odapi/ckpt-0"), "backbone")
        self._one_line(exc)
