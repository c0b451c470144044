"""Test helper: tiny models with the tensor names of the authors' released SavedModels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def export_tf1_detector(out: Path, box: tuple[float, float, float, float]) -> Path:
    """A TF1 SavedModel with the D2R detector's tensor names (``input_images:0`` ->
    ``detection_boxes:0``, ``detection_scores:0``, ``detection_classes:0``): one box ``box``
    (normalised ymin, xmin, ymax, xmax) per image, scored by the image's mean brightness."""
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.uint8, [None, None, None, 3], name="input_images")
        mean = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2, 3]) / 255.0
        n = tf.shape(x)[0]
        tf.tile(tf.constant([box], tf.float32)[None], [n, 1, 1], name="detection_boxes")
        tf.identity(mean[:, None], name="detection_scores")
        tf.ones([n, 1], tf.float32, name="detection_classes")
        with tf.compat.v1.Session(graph=g) as sess:
            builder = tf.compat.v1.saved_model.Builder(str(out))
            builder.add_meta_graph_and_variables(sess, [tf.saved_model.SERVING])
            builder.save()
    return out


def tiny_world_records(tmp: Path, train_per_landmark: int) -> tuple[Path, Path]:
    """The tiny synthetic world under ``tmp/world`` (``train_per_landmark`` training images a
    landmark) and its detector TFRecords (``records.confs["synth"]``) under ``tmp/records``."""
    from dataclasses import replace

    from detection import records
    from gldboxes.synth import confs, generate_world

    world = generate_world(
        tmp / "world", replace(confs["tiny"], train_per_landmark=train_per_landmark)
    )
    out = records.main(
        records.confs["synth"],
        world / "train/boxes.csv",
        world / "train",
        tmp / "records",
        images_csv=world / "train/train.csv",
    )
    return world, out


def randomise_weights(weights: list[Any], seed: int) -> None:
    """Give every variable distinct values (positive where it is a variance)."""
    rng = np.random.default_rng(seed)
    for w in weights:
        value = rng.normal(0.0, 0.05, size=tuple(w.shape)).astype(np.float32)
        if "moving_variance" in w.name:
            value = np.abs(value) + 0.5
        w.assign(value)


def keras_mobilenet_v2_h5(out_dir: Path, alpha: float, seed: int) -> tuple[Path, list[np.ndarray]]:
    """Keras' own MobileNetV2 no_top weights file at width ``alpha`` (random values)."""
    import tf_keras

    net = tf_keras.applications.MobileNetV2(
        weights=None, include_top=False, alpha=alpha, input_shape=(96, 96, 3)
    )
    randomise_weights(net.weights, seed)
    path = out_dir / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_96_no_top.h5"
    net.save_weights(str(path))
    return path, [w.numpy() for w in net.weights]
