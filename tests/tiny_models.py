"""Test helper: tiny models with the tensor names of the authors' released SavedModels."""

from __future__ import annotations

from pathlib import Path


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
