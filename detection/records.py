"""Boxes CSV + images -> sharded TFRecords in the TF detection ``tf.Example`` layout.

One class, ``landmark`` (label 1; 0 is the background). Each example holds::

    image/encoded, image/format, image/height, image/width, image/filename (our image id),
    image/source_id (a numeric string, as Model Garden's COCO evaluator needs),
    image/key/sha256, image/object/bbox/{xmin,ymin,xmax,ymax} (normalised to [0, 1]),
    image/object/class/label (1), image/object/class/text (b"landmark"),
    image/object/is_crowd (0)

Images with no box ("no prominent landmark") are written as negatives (zero objects) when
``include_negatives`` is set. Output folder ``OUT/<conf["output"]>/``::

    train-00000-of-0000N.tfrecord ...   val-00000-of-0000M.tfrecord ...
    label_map.pbtxt                      index.csv (source_id,id,split,n_boxes,width,height,path)
    <split>_boxes.csv                    the ground-truth boxes of each split (id,box)
    <split>_images.txt                   absolute image paths of each split (negatives included)
    bad_images.csv                       id,reason of images that could not be read
    records.json                         format_version, counts, shard patterns
    config.yaml                          the resolved configuration
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detection.images import encode_jpeg, needs_reencoding, read_image_rgb, resolve_image_path
from detection.tfcompat import import_tf
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.io import atomic_dir, read_json, write_config, write_json
from gldboxes.progress import tqdm

__all__ = [
    "FORMAT_VERSION",
    "LABEL_ID",
    "LABEL_NAME",
    "RecordsInfo",
    "assign_splits",
    "confs",
    "load_records_info",
    "main",
    "read_split",
    "write_label_map",
]

logger = logging.getLogger("detection.records")

FORMAT_VERSION = 1
LABEL_ID = 1  # the single foreground class; 0 is the background in Model Garden
LABEL_NAME = "landmark"
SPLIT_FILES = ("train", "val", "test")  # per-split CSV names read from a split folder

confs: dict[str, dict[str, Any]] = {
    # Google Landmark Boxes (~94k images): 10% held out for validation when no split is given.
    "gld": {
        "output": "records-gld-val10-neg",  # folder name under OUT, encodes the settings
        "val_fraction": 0.1,  # share of images for "val" when no split CSV is given
        "seed": 0,  # salt of the id hash that orders images for the split and the shards
        "include_negatives": True,  # keep images without a box as zero-object examples
        "shards": {"train": 32, "val": 4},  # TFRecord files per split
        "max_side": 1024,  # downscale larger images (JPEG re-encoded); None keeps originals
        "jpeg_quality": 95,  # quality of re-encoded images
    },
    # The synthetic world's tiny training set: a quarter held out, one shard each.
    "synth": {
        "output": "records-synth-val25-neg",
        "val_fraction": 0.25,
        "seed": 0,
        "include_negatives": True,
        "shards": {"train": 2, "val": 1},
        "max_side": None,
        "jpeg_quality": 95,
    },
}


@dataclass(frozen=True, slots=True)
class RecordsInfo:
    """What a records folder holds (read back from ``records.json``).

    Attributes:
        root: the records folder.
        splits: split name -> number of examples.
        positives: split name -> number of examples with at least one box.
        patterns: split name -> glob pattern of its TFRecord shards (absolute).
    """

    root: Path
    splits: dict[str, int]
    positives: dict[str, int]
    patterns: dict[str, str]

    def pattern(self, split: str) -> str:
        """Glob pattern of the shards of ``split``; ``ValueError`` when the split is absent."""
        if split not in self.patterns:
            raise ValueError(f"{self.root}: no split {split!r} (have {sorted(self.patterns)})")
        return self.patterns[split]


def load_records_info(root: str | os.PathLike[str]) -> RecordsInfo:
    """Read ``records.json`` of a records folder written by :func:`main`."""
    root = Path(root)
    path = root / "records.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a records folder (run `gldboxes detect records`)")
    meta = read_json(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    splits = {k: int(v) for k, v in meta["splits"].items()}
    return RecordsInfo(
        root=root,
        splits=splits,
        positives={k: int(v) for k, v in meta["positives"].items()},
        patterns={k: str(root / f"{k}-*.tfrecord") for k in splits},
    )


def _hash01(seed: int, image_id: str) -> float:
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic split: order ids by a salted hash; the first ``round(n * val_fraction)``
    go to ``val``, the rest to ``train``. Adding images later keeps most assignments."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(ids, key=lambda i: (_hash01(seed, i), i))
    n_val = round(len(order) * val_fraction)
    return {i: ("val" if k < n_val else "train") for k, i in enumerate(order)}


def write_label_map(path: str | os.PathLike[str]) -> Path:
    """Write the one-class label map in the Object Detection API ``.pbtxt`` format."""
    path = Path(path)
    path.write_text(f"item {{\n  id: {LABEL_ID}\n  name: '{LABEL_NAME}'\n}}\n", encoding="utf-8")
    return path


def _read_id_csv(path: Path, column: str | None = None) -> dict[str, str | None]:
    """``{id: value of column or None}`` from a CSV with an ``id`` column."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols:
            raise ValueError(f"{path}: expected an 'id' column, got {cols}")
        if column is not None and column not in cols:
            raise ValueError(f"{path}: expected a {column!r} column, got {cols}")
        out: dict[str, str | None] = {}
        for row in reader:
            out[row["id"]] = row.get(column) if column else (row.get("url") or row.get("path"))
    return out


def read_split(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{id: split}`` from a CSV ``id,split`` or from a folder of per-split CSVs with an ``id``
    column (``train.csv``, ``val.csv``, ``test.csv``; what ``gldboxes split`` writes).

    Raises:
        FileNotFoundError: nothing at ``path``. ValueError: no split files / columns.
    """
    src = Path(path)
    if src.is_dir():
        files = [src / f"{name}.csv" for name in SPLIT_FILES if (src / f"{name}.csv").is_file()]
        if not files:
            raise ValueError(f"{src}: no {'/'.join(SPLIT_FILES)}.csv split files")
        out: dict[str, str] = {}
        for f in files:
            for image_id in _read_id_csv(f):
                if out.setdefault(image_id, f.stem) != f.stem:
                    raise ValueError(f"{f}: id {image_id!r} is also in {out[image_id]}.csv")
        return out
    if not src.is_file():
        raise FileNotFoundError(f"split file not found: {src}")
    return {k: str(v) for k, v in _read_id_csv(src, "split").items()}


def _example(
    *,
    encoded: bytes,
    fmt: str,
    height: int,
    width: int,
    source_id: int,
    image_id: str,
    boxes: list[Box],
) -> Any:
    """A ``tf.train.Example`` in the TF detection layout (see the module docstring)."""
    import tensorflow as tf

    def _bytes(vals: list[bytes]) -> Any:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=vals))

    def _floats(vals: list[float]) -> Any:
        return tf.train.Feature(float_list=tf.train.FloatList(value=vals))

    def _ints(vals: list[int]) -> Any:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=vals))

    feature = {
        "image/encoded": _bytes([encoded]),
        "image/format": _bytes([fmt.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/filename": _bytes([image_id.encode()]),
        "image/source_id": _bytes([str(source_id).encode()]),
        "image/key/sha256": _bytes([hashlib.sha256(encoded).hexdigest().encode()]),
        "image/object/bbox/xmin": _floats([b.xmin for b in boxes]),
        "image/object/bbox/ymin": _floats([b.ymin for b in boxes]),
        "image/object/bbox/xmax": _floats([b.xmax for b in boxes]),
        "image/object/bbox/ymax": _floats([b.ymax for b in boxes]),
        "image/object/class/label": _ints([LABEL_ID] * len(boxes)),
        "image/object/class/text": _bytes([LABEL_NAME.encode()] * len(boxes)),
        "image/object/is_crowd": _ints([0] * len(boxes)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _load_image(path: Path, max_side: int | None, quality: int) -> tuple[bytes, str, int, int]:
    """(encoded bytes, format, height, width), re-encoding to JPEG only when needed."""
    data = path.read_bytes()
    try:
        rgb = read_image_rgb(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {str(exc).split(': ', 1)[-1]}") from exc
    h, w = rgb.shape[:2]
    if (max_side is None or max(h, w) <= max_side) and not needs_reencoding(data):
        fmt = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
        return data, fmt, h, w
    if max_side is not None and max(h, w) > max_side:
        import cv2

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
    return encode_jpeg(rgb, quality), "jpeg", h, w


def main(
    conf: Mapping[str, Any],
    boxes_csv: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    images_csv: str | os.PathLike[str] | None = None,
    split_csv: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a boxes CSV and its images into sharded TFRecords (see the module docstring).

    Args:
        conf: a preset of ``confs`` (or a dict with the same keys).
        boxes_csv: ground-truth boxes, ``id,box`` (Google Landmark Boxes format).
        image_dir: root of the images (GLD layout ``a/b/c/<id>.jpg``, flat ``<id>.<ext>``, or
            the relative paths of ``images_csv``).
        out_dir: parent folder; the records go to ``out_dir/conf["output"]``.
        images_csv: CSV with an ``id`` column (and optionally ``url``/``path`` relative to
            ``image_dir``) listing every image, boxed or not; without it only boxed ids are used.
        split_csv: CSV ``id,split``, or a folder of ``train.csv``/``val.csv`` (the output of
            ``gldboxes split``); ids not listed are left out. Without it a hashed split with
            ``conf["val_fraction"]`` is made.
        overwrite: rebuild even when ``records.json`` exists.

    Returns:
        The records folder.
    """
    out = Path(out_dir) / str(conf["output"])
    if (out / "records.json").is_file() and not overwrite:
        logger.info("records already written in %s", out)
        return out
    tf = import_tf()
    boxes = read_boxes_csv(boxes_csv)
    paths: dict[str, str | None] = {i: None for i in boxes}
    if images_csv is not None:
        listed = _read_id_csv(Path(images_csv))
        unknown = sorted(set(boxes) - set(listed))
        if unknown:
            logger.warning(
                "%d boxed ids are not in %s (kept): e.g. %s", len(unknown), images_csv, unknown[:3]
            )
        paths.update(listed)
    ids = sorted(paths)
    if not conf["include_negatives"]:
        ids = [i for i in ids if i in boxes]
    if split_csv is not None:
        split_of = {k: v for k, v in read_split(split_csv).items() if k in paths}
        ids = [i for i in ids if i in split_of]
    else:
        split_of = assign_splits(ids, float(conf["val_fraction"]), int(conf["seed"]))
    if not ids:
        raise ValueError(f"{boxes_csv}: no images to write (check images_csv/split_csv)")
    split_names = sorted(set(split_of[i] for i in ids))
    shards_conf: Mapping[str, int] = conf["shards"]
    n_shards = {s: max(1, int(shards_conf.get(s, 1))) for s in split_names}
    seed = int(conf["seed"])

    with atomic_dir(out) as tmp:
        writers = {
            s: [
                tf.io.TFRecordWriter(str(tmp / f"{s}-{k:05d}-of-{n_shards[s]:05d}.tfrecord"))
                for k in range(n_shards[s])
            ]
            for s in split_names
        }
        counts = dict.fromkeys(split_names, 0)
        positives = dict.fromkeys(split_names, 0)
        split_boxes: dict[str, dict[str, list[Box]]] = {s: {} for s in split_names}
        split_paths: dict[str, list[str]] = {s: [] for s in split_names}
        bad: list[tuple[str, str]] = []
        index_rows: list[list[Any]] = []
        # Shard by hash so each shard mixes positives and negatives, reproducibly.
        order = sorted(ids, key=lambda i: (_hash01(seed + 1, i), i))
        for source_id, image_id in enumerate(tqdm(order, desc="records", unit="img"), 1):
            path = resolve_image_path(image_dir, image_id, paths.get(image_id))
            if path is None:
                bad.append((image_id, f"no image file under {image_dir}"))
                continue
            try:
                encoded, fmt, h, w = _load_image(
                    path, conf.get("max_side"), int(conf.get("jpeg_quality", 95))
                )
            except ValueError as exc:
                bad.append((image_id, str(exc)))
                continue
            split = split_of[image_id]
            img_boxes = boxes.get(image_id, [])
            ex = _example(
                encoded=encoded,
                fmt=fmt,
                height=h,
                width=w,
                source_id=source_id,
                image_id=image_id,
                boxes=img_boxes,
            )
            writers[split][counts[split] % n_shards[split]].write(ex.SerializeToString())
            counts[split] += 1
            positives[split] += bool(img_boxes)
            if img_boxes:
                split_boxes[split][image_id] = img_boxes
            split_paths[split].append(str(path.resolve()))
            index_rows.append([source_id, image_id, split, len(img_boxes), w, h, str(path)])
        for ws in writers.values():
            for wr in ws:
                wr.close()
        if bad:
            logger.warning("%d images could not be read; see bad_images.csv", len(bad))
        with open(tmp / "bad_images.csv", "w", newline="", encoding="utf-8") as fh:
            wcsv = csv.writer(fh, lineterminator="\n")
            wcsv.writerow(["id", "reason"])
            wcsv.writerows(bad)
        with open(tmp / "index.csv", "w", newline="", encoding="utf-8") as fh:
            wcsv = csv.writer(fh, lineterminator="\n")
            wcsv.writerow(["source_id", "id", "split", "n_boxes", "width", "height", "path"])
            wcsv.writerows(index_rows)
        for s in split_names:
            write_boxes_csv(tmp / f"{s}_boxes.csv", split_boxes[s], with_score=False)
            (tmp / f"{s}_images.txt").write_text(
                "".join(f"{p}\n" for p in split_paths[s]), encoding="utf-8"
            )
        write_label_map(tmp / "label_map.pbtxt")
        write_config(tmp, conf)
        write_json(
            tmp / "records.json",
            {
                "format_version": FORMAT_VERSION,
                "label_map": {str(LABEL_ID): LABEL_NAME},
                "splits": counts,
                "positives": positives,
                "shards": n_shards,
                "bad_images": len(bad),
                "boxes_csv": os.fspath(boxes_csv),
                "image_dir": os.fspath(image_dir),
            },
        )
    logger.info("wrote %s: %s examples (%s with boxes)", out, counts, positives)
    return out
