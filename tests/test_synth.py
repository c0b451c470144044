"""The synthetic landmark world: determinism, layout, ground truth, difficulty."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import pytest

from gldboxes.boxes import read_boxes_csv
from gldboxes.synth import confs, generate_world
from retrieval.evaluation.datasets import RevisitedDataset


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(tmp_path_factory.mktemp("w") / "world", confs["tiny"])


class TestSynth:
    def test_byte_identical_for_seed(self, world: Path, tmp_path: Path) -> None:
        again = generate_world(tmp_path / "again", replace(confs["tiny"], workers=2))
        assert _digest(world) == _digest(again)
        other = generate_world(tmp_path / "other", replace(confs["tiny"], seed=1))
        assert (
            _digest(world)["retrieval/gnd_synth.pkl"] != _digest(other)["retrieval/gnd_synth.pkl"]
            or _digest(world)["train/boxes.csv"] != _digest(other)["train/boxes.csv"]
        )

    def test_train_layout(self, world: Path) -> None:
        conf = confs["tiny"]
        with open(world / "train" / "train.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == conf.train_landmarks * conf.train_per_landmark
        assert {r["landmark_id"] for r in rows} == {str(i) for i in range(conf.train_landmarks)}
        for r in rows:
            assert len(r["id"]) == 16
            assert r["url"] == f"images/{r['id'][0]}/{r['id'][1]}/{r['id'][2]}/{r['id']}.jpg"
            assert (world / "train" / r["url"]).exists()
        boxes = read_boxes_csv(world / "train" / "boxes.csv")
        with open(world / "train" / "no_landmark.csv", newline="") as fh:
            no_lm = {r["id"] for r in csv.DictReader(fh)}
        assert set(boxes) | no_lm == {r["id"] for r in rows} and not set(boxes) & no_lm
        assert all(len(b) == 1 for b in boxes.values())

    def test_no_landmark_fraction(self, tmp_path: Path) -> None:
        conf = replace(
            confs["tiny"],
            train_landmarks=40,
            train_per_landmark=10,
            landmarks=1,
            distractors=0,
            easy_per_landmark=1,
            hard_per_landmark=0,
            junk_per_landmark=0,
            size=96,
            texture_size=64,
        )
        w = generate_world(tmp_path / "w", conf)
        with open(w / "train" / "no_landmark.csv", newline="") as fh:
            n = sum(1 for _ in csv.DictReader(fh))
        assert 0.04 <= n / 400 <= 0.13

    def test_retrieval_ground_truth(self, world: Path) -> None:
        conf = confs["tiny"]
        ds = RevisitedDataset.load(world / "retrieval")
        assert ds.name == "synth" and ds.n_queries == conf.landmarks
        per_lm = conf.easy_per_landmark + conf.hard_per_landmark + conf.junk_per_landmark
        assert ds.n_db == conf.landmarks * per_lm + conf.distractors
        assert not ds.missing_images()
        h, w = conf.shape
        for q, g in enumerate(ds.gnd):
            assert len(g["easy"]) == conf.easy_per_landmark
            assert len(g["hard"]) == conf.hard_per_landmark
            assert len(g["junk"]) == conf.junk_per_landmark
            x1, y1, x2, y2 = g["bbx"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            lm = ds.qimlist[q][:5]
            assert all(ds.imlist[i].startswith(lm) for i in g["easy"] + g["hard"] + g["junk"])
        img = cv2.imread(str(ds.query_paths()[0]))
        assert img.shape == (h, w, 3)

    def test_difficulty_is_real(self, world: Path) -> None:
        gt = read_boxes_csv(world / "retrieval" / "boxes_gt.csv")
        ds = RevisitedDataset.load(world / "retrieval")
        with open(world / "retrieval" / "difficulty.csv", newline="") as fh:
            diff = {r["name"]: r for r in csv.DictReader(fh)}
        easy = [gt[ds.imlist[i]][0].area for g in ds.gnd for i in g["easy"]]
        small = [
            float(diff[ds.imlist[i]]["area"])
            for g in ds.gnd
            for i in g["hard"]
            if diff[ds.imlist[i]]["placement"] == "hard_small"
        ]
        junk = [diff[ds.imlist[i]] for g in ds.gnd for i in g["junk"]]
        assert min(easy) >= 0.15 and max(small) <= 0.15
        assert all(float(j["area"]) < 0.02 or float(j["occlusion"]) >= 0.8 for j in junk)
        # The landmark really is where its box says: its pixels differ from a fresh clutter.
        name = ds.imlist[ds.gnd[0]["easy"][0]]
        img = cv2.imread(str(ds.image_path(name)))
        x0, y0, x1, y1 = gt[name][0].to_pixels(img.shape[1], img.shape[0])
        assert (x1 - x0) * (y1 - y0) > 0.1 * img.shape[0] * img.shape[1]

    def test_cli(self, tmp_path: Path) -> None:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gldboxes",
                "synth",
                "--out",
                str(tmp_path / "w"),
                "--preset",
                "tiny",
                "--landmarks",
                "2",
                "--distractors",
                "2",
                "--train-landmarks",
                "2",
                "--size",
                "128",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "queries=2" in out.stdout
        # Same folder, other configuration: refused without --overwrite.
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "gldboxes",
                "synth",
                "--out",
                str(tmp_path / "w"),
                "--preset",
                "tiny",
                "--landmarks",
                "3",
            ],
            capture_output=True,
            text=True,
        )
        assert again.returncode == 2 and "another configuration" in again.stderr

    def test_features_match_between_views(self, world: Path) -> None:
        """Landmark textures carry SIFT structure that matches across a query and an easy view."""
        ds = RevisitedDataset.load(world / "retrieval")
        sift = cv2.SIFT_create(nfeatures=1000)
        q = cv2.imread(str(ds.query_paths()[0]), cv2.IMREAD_GRAYSCALE)
        x1, y1, x2, y2 = (int(v) for v in ds.gnd[0]["bbx"])
        _, dq = sift.detectAndCompute(q[y1:y2, x1:x2], None)

        def good_matches(name: str) -> int:
            img = cv2.imread(str(ds.image_path(name)), cv2.IMREAD_GRAYSCALE)
            _, d = sift.detectAndCompute(img, None)
            m = cv2.BFMatcher().knnMatch(dq, d, k=2)
            return sum(1 for a, b in m if a.distance < 0.8 * b.distance)

        pos = good_matches(ds.imlist[ds.gnd[0]["easy"][0]])
        neg = good_matches(ds.imlist[ds.gnd[1]["easy"][0]])
        assert pos > 3 * max(neg, 5), (pos, neg)
