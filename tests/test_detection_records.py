"""TF detection records: image lookup/decoding, splits, the tf.Example layout, negatives, errors."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from detection import records
from detection.images import list_images, read_image_rgb, resolve_image_path
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _draw(rng: np.random.Generator, h: int, w: int, box: Box | None) -> np.ndarray:
    """An RGB image with a textured rectangle where ``box`` is."""
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box.to_pixels(w, h)
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (250, 200, 40), -1)
        cv2.putText(img, "LM", (x0 + 2, y1 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (10, 10, 200), 2)
    return img


@pytest.fixture(scope="module")
def gld(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A GLD-like folder: JPEG (GLD layout), PNG and WebP (flat), an EXIF-rotated JPEG, a
    negative, a corrupt file, a missing file; train.csv + boxes.csv."""
    root = tmp_path_factory.mktemp("gld")
    rng = np.random.default_rng(0)
    boxes: dict[str, list[Box]] = {}
    rows: list[tuple[str, str]] = []
    pixels: dict[str, np.ndarray] = {}
    for k in range(12):
        image_id = f"{k:x}{k:x}{k:x}0123456789ab"[:16]
        box = Box(0.1 + 0.02 * k, 0.2, 0.7, 0.6 + 0.02 * k)
        boxes[image_id] = [box]
        img = _draw(rng, 60 + k, 80, box)
        pixels[image_id] = img
        if k < 8:  # GLD layout, JPEG
            rel = f"images/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel, quality=95)
            rows.append((image_id, rel))
        elif k < 10:  # flat PNG, found by extension
            Image.fromarray(img).save(root / f"{image_id}.png")
            rows.append((image_id, ""))
        else:  # flat WebP (lossless), must be re-encoded for TF
            Image.fromarray(img).save(root / f"{image_id}.webp", lossless=True)
            rows.append((image_id, ""))
    # Two boxes in one image.
    two = rows[0][0]
    boxes[two].append(Box(0.0, 0.0, 0.2, 0.15))
    # A negative (no box row) and an EXIF-rotated JPEG stored sideways.
    neg = "ffff000000000001"
    Image.fromarray(_draw(rng, 50, 70, None)).save(root / f"{neg}.jpg")
    rows.append((neg, ""))
    rot = "eeee000000000002"
    upright = _draw(rng, 40, 90, Box(0.1, 0.1, 0.5, 0.9))
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # turned left; EXIF turns it back
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(root / f"{rot}.jpg", exif=exif.tobytes(), quality=98)
    boxes[rot] = [Box(0.1, 0.1, 0.5, 0.9)]
    rows.append((rot, ""))
    # A corrupt file and a missing one, both with boxes.
    bad = "dddd000000000003"
    (root / f"{bad}.jpg").write_bytes(b"not a jpeg at all")
    boxes[bad] = [Box(0.1, 0.1, 0.5, 0.5)]
    rows.append((bad, ""))
    missing = "cccc000000000004"
    boxes[missing] = [Box(0.1, 0.1, 0.5, 0.5)]
    rows.append((missing, ""))
    write_boxes_csv(root / "boxes.csv", boxes)
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "url", "landmark_id"])
        w.writerows([(i, u, 0) for i, u in rows])
    return {
        "root": root,
        "boxes": boxes,
        "pixels": pixels,
        "neg": neg,
        "rot": rot,
        "bad": bad,
        "missing": missing,
        "two": two,
        "upright": upright,
    }


def _parse(path: Path) -> list[dict[str, Any]]:
    import tensorflow as tf

    out = []
    for raw in tf.data.TFRecordDataset(str(path)):
        ex = tf.train.Example.FromString(raw.numpy())
        f = ex.features.feature
        out.append(
            {
                k: (
                    list(v.bytes_list.value) or list(v.float_list.value) or list(v.int64_list.value)
                )
                for k, v in f.items()
            }
        )
    return out


class TestImages:
    def test_resolve(self, gld: dict[str, Any]) -> None:
        root = gld["root"]
        first = next(iter(gld["pixels"]))
        p = resolve_image_path(root, first)
        assert p is not None and p.parts[-4:-1] == (first[0], first[1], first[2])
        assert resolve_image_path(root, gld["neg"]) == root / f"{gld['neg']}.jpg"
        assert resolve_image_path(root, gld["missing"]) is None

    def test_exif_orientation_applied(self, gld: dict[str, Any]) -> None:
        rgb = read_image_rgb(gld["root"] / f"{gld['rot']}.jpg")
        assert rgb.shape == gld["upright"].shape

        # Compare smoothed pixels (JPEG chroma noise on the random background is large);
        # the stored, un-rotated orientation flipped 180 degrees is far off.
        def smooth(a: np.ndarray) -> np.ndarray:
            return cv2.blur(a, (7, 7)).astype(float)

        right = np.abs(smooth(rgb) - smooth(gld["upright"])).mean()
        wrong = np.abs(smooth(rgb[::-1, ::-1]) - smooth(gld["upright"])).mean()
        assert right < 5 and wrong > 4 * right

    def test_exception(self, gld: dict[str, Any], tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"dddd000000000003\.jpg: not a readable image"):
            read_image_rgb(gld["root"] / f"{gld['bad']}.jpg")
        with pytest.raises(FileNotFoundError, match="image source not found"):
            list_images(tmp_path / "nope")

    def test_list_images(self, gld: dict[str, Any], tmp_path: Path) -> None:
        found = list_images(gld["root"])
        assert len(found) == 15  # 12 drawn + negative + rotated + corrupt; none for missing
        lst = tmp_path / "list.txt"
        lst.write_text("# comment\n\n" + "\n".join(str(p) for p in found[:3]) + "\nrel.jpg\n")
        assert list_images(lst) == [*found[:3], tmp_path / "rel.jpg"]


class TestSplits:
    def test_exact_fraction_and_stable(self) -> None:
        ids = [f"{k:016x}" for k in range(200)]
        a = records.assign_splits(ids, 0.1, seed=0)
        assert sum(v == "val" for v in a.values()) == 20
        assert a == records.assign_splits(list(reversed(ids)), 0.1, seed=0)
        b = records.assign_splits(ids, 0.1, seed=1)
        assert a != b
        # Adding images keeps most earlier assignments (hash order, not position).
        more = records.assign_splits([*ids, *(f"x{k}" for k in range(20))], 0.1, seed=0)
        assert sum(a[i] == more[i] for i in ids) >= 190

    def test_split_folder(self, tmp_path: Path) -> None:
        # The layout ``gldboxes split`` writes: train.csv / val.csv with id,landmark_id.
        (tmp_path / "train.csv").write_text("id,landmark_id\na,1\nb,1\n")
        (tmp_path / "val.csv").write_text("id,landmark_id\nc,1\n")
        (tmp_path / "train_pool.csv").write_text("id,landmark_id\nz,1\n")  # ignored
        assert records.read_split(tmp_path) == {"a": "train", "b": "train", "c": "val"}
        flat = tmp_path / "flat.csv"
        flat.write_text("id,split\na,val\n")
        assert records.read_split(flat) == {"a": "val"}

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="val_fraction must be in"):
            records.assign_splits(["a"], 1.0, seed=0)
        with pytest.raises(ValueError, match=r"no train/val/test\.csv split files"):
            records.read_split(tmp_path)
        (tmp_path / "train.csv").write_text("id\na\n")
        (tmp_path / "val.csv").write_text("id\na\n")
        with pytest.raises(ValueError, match=r"val\.csv: id 'a' is also in train\.csv"):
            records.read_split(tmp_path)
        with pytest.raises(FileNotFoundError, match="split file not found"):
            records.read_split(tmp_path / "nope.csv")


@pytest.fixture(scope="module")
def built(gld: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = dict(
        records.confs["synth"], output="recs", val_fraction=0.25, shards={"train": 2, "val": 1}
    )
    root = gld["root"]
    return records.main(
        conf,
        root / "boxes.csv",
        root,
        tmp_path_factory.mktemp("out"),
        images_csv=root / "train.csv",
    )


class TestRecords:
    def test_layout(self, built: Path, gld: dict[str, Any]) -> None:
        info = records.load_records_info(built)
        # 12 drawn + negative + rotated = 14 readable; corrupt and missing reported.
        assert sum(info.splits.values()) == 14
        # The split is made over all 16 listed ids before reading images.
        with open(gld["root"] / "train.csv") as fh:
            listed = [r["id"] for r in csv.DictReader(fh)]
        want_val = {
            i for i, s in records.assign_splits(listed, 0.25, seed=0).items() if s == "val"
        } - {gld["bad"], gld["missing"]}
        with open(built / "index.csv") as fh:
            got_val = {r["id"] for r in csv.DictReader(fh) if r["split"] == "val"}
        assert got_val == want_val and info.splits["val"] == len(want_val) >= 2
        assert sum(info.positives.values()) == 13
        assert sorted(p.name for p in built.glob("*.tfrecord")) == [
            "train-00000-of-00002.tfrecord",
            "train-00001-of-00002.tfrecord",
            "val-00000-of-00001.tfrecord",
        ]
        assert "id: 1" in (built / "label_map.pbtxt").read_text()
        assert "name: 'landmark'" in (built / "label_map.pbtxt").read_text()
        with open(built / "bad_images.csv") as fh:
            bad = {r["id"]: r["reason"] for r in csv.DictReader(fh)}
        assert set(bad) == {gld["bad"], gld["missing"]}
        assert "not a readable image" in bad[gld["bad"]]
        assert "no image file" in bad[gld["missing"]]

    def test_examples(self, built: Path, gld: dict[str, Any]) -> None:
        examples = [e for p in sorted(built.glob("*.tfrecord")) for e in _parse(p)]
        by_id = {e["image/filename"][0].decode(): e for e in examples}
        assert len(by_id) == 14
        sids = [int(e["image/source_id"][0]) for e in examples]
        assert len(set(sids)) == len(sids) and min(sids) >= 1  # numeric, unique
        for image_id, ex in by_id.items():
            want = gld["boxes"].get(image_id, [])
            assert ex.get("image/object/class/label", []) == [1] * len(want)
            if want:
                got = np.stack(
                    [ex[f"image/object/bbox/{k}"] for k in ("ymin", "xmin", "ymax", "xmax")], axis=1
                )
                np.testing.assert_allclose(
                    got, [[b.ymin, b.xmin, b.ymax, b.xmax] for b in want], atol=1e-6
                )
            rgb = np.asarray(Image.open(io.BytesIO(ex["image/encoded"][0])).convert("RGB"))
            assert rgb.shape[:2] == (ex["image/height"][0], ex["image/width"][0])
            if image_id in gld["pixels"]:
                assert rgb.shape == gld["pixels"][image_id].shape
        # Negative: kept, zero objects. Two-box image: two rows.
        assert by_id[gld["neg"]].get("image/object/class/label", []) == []
        assert len(by_id[gld["two"]]["image/object/class/label"]) == 2
        # WebP and EXIF-rotated images are re-encoded as upright JPEG; PNG is kept as is.
        webp_id = next(i for i in gld["pixels"] if (gld["root"] / f"{i}.webp").exists())
        assert by_id[webp_id]["image/format"] == [b"jpeg"]
        png_id = next(i for i in gld["pixels"] if (gld["root"] / f"{i}.png").exists())
        assert by_id[png_id]["image/format"] == [b"png"]
        assert by_id[png_id]["image/encoded"][0] == (gld["root"] / f"{png_id}.png").read_bytes()
        rot = by_id[gld["rot"]]
        assert (rot["image/height"][0], rot["image/width"][0]) == gld["upright"].shape[:2]

    def test_model_garden_decoder_reads_it(self, built: Path, gld: dict[str, Any]) -> None:
        import tensorflow as tf
        from official.vision.dataloaders import tf_example_decoder

        dec = tf_example_decoder.TfExampleDecoder()
        raw = next(iter(tf.data.TFRecordDataset(str(built / "val-00000-of-00001.tfrecord"))))
        out = dec.decode(raw)
        image_id = (
            tf.train.Example.FromString(raw.numpy())
            .features.feature["image/filename"]
            .bytes_list.value[0]
            .decode()
        )
        want = gld["boxes"].get(image_id, [])
        assert int(tf.strings.to_number(out["source_id"], tf.int64)) >= 1
        assert out["image"].shape[2] == 3
        np.testing.assert_allclose(
            out["groundtruth_boxes"].numpy(),
            np.array([[b.ymin, b.xmin, b.ymax, b.xmax] for b in want], np.float32).reshape(-1, 4),
            atol=1e-6,
        )
        assert out["groundtruth_classes"].numpy().tolist() == [1] * len(want)

    def test_split_files(self, built: Path) -> None:
        with open(built / "index.csv") as fh:
            index = list(csv.DictReader(fh))
        for split in ("train", "val"):
            ids = {r["id"] for r in index if r["split"] == split}
            gt = read_boxes_csv(built / f"{split}_boxes.csv")
            assert set(gt) <= ids and len(ids) - len(gt) <= 1  # the negative has no row
            listed = (built / f"{split}_images.txt").read_text().split()
            assert {Path(p).stem for p in listed} == ids

    def test_skip_when_done_and_split_csv(
        self, built: Path, gld: dict[str, Any], tmp_path: Path
    ) -> None:
        conf = dict(records.confs["synth"], output="recs")
        before = (built / "records.json").stat().st_mtime_ns
        again = records.main(conf, gld["root"] / "boxes.csv", gld["root"], built.parent)
        assert again == built and (built / "records.json").stat().st_mtime_ns == before
        split = tmp_path / "split.csv"
        chosen = list(gld["pixels"])[:5]
        split.write_text(
            "id,split\n"
            + "".join(f"{i},{'val' if k < 2 else 'train'}\n" for k, i in enumerate(chosen))
        )
        out = records.main(
            dict(conf, output="recs-split", include_negatives=False),
            gld["root"] / "boxes.csv",
            gld["root"],
            tmp_path,
            split_csv=split,
        )
        info = records.load_records_info(out)
        assert info.splits == {"train": 3, "val": 2}

    def test_exception(self, gld: dict[str, Any], tmp_path: Path) -> None:
        bad_split = tmp_path / "s.csv"
        bad_split.write_text("id,fold\nx,1\n")
        with pytest.raises(ValueError, match=r"s\.csv: expected a 'split' column"):
            records.main(
                dict(records.confs["synth"]),
                gld["root"] / "boxes.csv",
                gld["root"],
                tmp_path,
                split_csv=bad_split,
            )
        with pytest.raises(FileNotFoundError, match="not a records folder"):
            records.load_records_info(tmp_path)
