"""Batch inference: the authors' TF1 SavedModel layout, the boxes CSV, bad images, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection import inference
from gldboxes.boxes import Box, read_boxes_csv

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The fake TF1 detector: two fixed boxes (normalised) + one all-zero padding row; the first
# box scores the image's mean brightness, the second half of it; classes are 1.
BOX_A = (0.1, 0.2, 0.6, 0.7)
BOX_B = (0.3, 0.05, 0.9, 0.5)


@pytest.fixture(scope="module")
def tf1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TF1 graph exported with the D2R tensor names, plus an OD-API-like signature
    whose input key is ``inputs`` (the loader must still use the tensor names)."""
    import tensorflow as tf

    out = tmp_path_factory.mktemp("tf1") / "d2r_like"
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.uint8, [None, None, None, 3], name="input_images")
        mean = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2, 3]) / 255.0
        n = tf.shape(x)[0]
        base = tf.constant([BOX_A, BOX_B, (0.0, 0.0, 0.0, 0.0)], tf.float32)
        boxes = tf.tile(base[None], [n, 1, 1], name="detection_boxes")
        scores = tf.stack([mean, mean / 2, tf.zeros_like(mean)], axis=1, name="detection_scores")
        classes = tf.ones([n, 3], tf.float32, name="detection_classes")
        sig = tf.compat.v1.saved_model.predict_signature_def(
            inputs={"inputs": x},
            outputs={
                "detection_boxes": boxes,
                "detection_scores": scores,
                "detection_classes": classes,
            },
        )
        with tf.compat.v1.Session(graph=g) as sess:
            builder = tf.compat.v1.saved_model.Builder(str(out))
            builder.add_meta_graph_and_variables(
                sess, [tf.saved_model.SERVING], signature_def_map={"serving_default": sig}
            )
            builder.save()
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """Images of several sizes and formats with known mean brightness, and a corrupt one."""
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub").mkdir()
    means: dict[str, float] = {}
    for k, (h, w, ext) in enumerate(
        [(40, 60, "png"), (75, 31, "png"), (20, 20, "bmp"), (64, 48, "webp"), (33, 90, "gif")]
    ):
        value = 40 + 40 * k  # grey levels 40..200: exact in every format (lossless, palette)
        path = root / "sub" / f"im{k}.{ext}" if ext == "gif" else root / f"im{k}.{ext}"
        pil = Image.fromarray(np.full((h, w, 3), value, np.uint8))
        if ext == "webp":
            pil.save(path, lossless=True)
        else:
            pil.save(path)
        means[f"im{k}"] = value / 255.0
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root, means


class TestTF1Loader:
    def test_real_case(self, tf1_model: Path) -> None:
        det = inference.load_detector(tf1_model)
        assert det.layout == "tf1"
        img = np.full((30, 50, 3), 102, np.uint8)
        d = det(img)
        # Padding row dropped, boxes untouched (already normalised), sorted by score.
        np.testing.assert_allclose(d.boxes, [BOX_A, BOX_B], atol=1e-7)
        np.testing.assert_allclose(d.scores, [0.4, 0.2], atol=1e-6)
        assert d.classes.tolist() == [1, 1]
        boxes = inference.to_boxes(d, threshold=0.3)
        y0, x0, y1, x1 = (float(v) for v in d.boxes[0])
        assert boxes == [Box(y0, x0, y1, x1, float(d.scores[0]))]

    def test_exception(self, tmp_path: Path, tf1_model: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"no saved_model\.pb"):
            inference.load_detector(tmp_path)
        det = inference.load_detector(tf1_model)
        with pytest.raises(ValueError, match=r"expected a \(H, W, 3\) uint8 image"):
            det(np.zeros((4, 4), np.uint8))


class TestBoxesFile:
    def test_folder_to_csv(
        self, tf1_model: Path, images: tuple[Path, dict[str, float]], tmp_path: Path
    ) -> None:
        root, means = images
        out = inference.main(tf1_model, root, tmp_path / "boxes.csv", threshold=0.1)
        got = read_boxes_csv(out)
        # BOX_B (score mean/2) passes 0.1 only when the mean is >= 0.2.
        for image_id, m in means.items():
            want = [BOX_A] + ([BOX_B] if m / 2 >= 0.1 else [])
            np.testing.assert_allclose(
                [(b.ymin, b.xmin, b.ymax, b.xmax) for b in got[image_id]], want, atol=1e-7
            )
            assert got[image_id][0].score == pytest.approx(m, abs=1e-6)
        assert "broken" not in got
        bad = (tmp_path / "boxes.bad.csv").read_text().splitlines()
        assert len(bad) == 2 and bad[1].startswith("broken,") and "not a readable" in bad[1]
        stats = json.loads((tmp_path / "boxes.csv.json").read_text())
        assert stats["n_images"] == 6 and stats["n_bad"] == 1 and stats["layout"] == "tf1"
        assert stats["images_per_second"] > 0
        assert not (tmp_path / "boxes.csv.progress.jsonl").exists()

    def test_resume_skips_done_images(
        self, tf1_model: Path, images: tuple[Path, dict[str, float]], tmp_path: Path
    ) -> None:
        root, _ = images
        paths = sorted(root.glob("*.png"))
        out = tmp_path / "b.csv"
        journal = tmp_path / "b.csv.progress.jsonl"
        # An interrupted run: header, one finished image with a marker box, a torn line.
        journal.write_text(
            json.dumps({"threshold": 0.0, "model": "x"})
            + "\n"
            + json.dumps({"id": paths[0].stem, "boxes": [[0.5, 0.5, 0.75, 0.75, 0.123]]})
            + "\n"
            + '{"id": "im1", "bo'
        )
        inference.main(tf1_model, paths, out)
        got = read_boxes_csv(out)
        assert [b.score for b in got[paths[0].stem]] == [0.123]  # not recomputed
        assert len(got[paths[1].stem]) == 2  # recomputed after the torn line
        stats = json.loads((tmp_path / "b.csv.json").read_text())
        assert stats["n_detected_this_run"] == 1
        # Done: a second call is skipped and leaves the file alone.
        before = out.stat().st_mtime_ns
        inference.main(tf1_model, paths, out)
        assert out.stat().st_mtime_ns == before

    def test_exception(self, tf1_model: Path, tmp_path: Path) -> None:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        for d in (a, b):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "same.png")
        with pytest.raises(ValueError, match="two images share the id 'same'"):
            inference.main(tf1_model, tmp_path, tmp_path / "x.csv")
        journal = tmp_path / "y.csv.progress.jsonl"
        journal.write_text(json.dumps({"threshold": 0.5}) + "\n")
        with pytest.raises(ValueError, match=r"journal written with threshold 0\.5"):
            inference.main(tf1_model, [a / "same.png"], tmp_path / "y.csv", threshold=0.1)
