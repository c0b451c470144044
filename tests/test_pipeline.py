"""The main job end to end: ``gldboxes pipeline --quick`` on the tiny synthetic world."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gldboxes", "-q", "pipeline", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ASMK* |" in proc.stdout and "D2R-R-ASMK*" in proc.stdout

    report = out / "report"
    with open(report / "table.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) >= {"ASMK*", "D2R-ASMK* (max)", "D2R-R-ASMK*", "ASMK* + SV"}
    for r in rows.values():
        for key in ("easy_map", "medium_map", "hard_map", "medium_mp10"):
            assert 0.0 <= float(r[key]) <= 1.0, (r["method"], key, r[key])
    asmk, r_asmk, d2r = rows["ASMK*"], rows["D2R-R-ASMK*"], rows["D2R-ASMK* (max)"]
    # Whole-image features split over the detected boxes: R-ASMK* indexes the same words.
    assert float(r_asmk["index_bytes_per_image"]) == float(asmk["index_bytes_per_image"])
    assert float(r_asmk["regions_per_image"]) > 1.0
    # Regional search stores every region: a larger index.
    assert float(d2r["relative_index_size"]) > 1.5
    # Retrieval on the tiny world is far above a random ranking (~0.2 Medium mAP here).
    assert float(asmk["medium_map"]) > 0.6
    assert (report / "table.md").read_text().startswith("| method |")
    assert (report / "map_vs_index_size.png").stat().st_size > 10_000

    # The detector-free rows are the golden ones stored before the one-runner refactor
    # (scripts/golden.py); the detector's rows follow its CPU training, not bit-reproducible.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from golden import GOLDEN_QUICK, quick_rows

    assert quick_rows(report) == json.loads(GOLDEN_QUICK.read_text())

    summary = json.loads((report / "summary.json").read_text())
    det = summary["detector"]
    # A few minutes of CPU training learn the landmarks; the untrained detector finds nothing.
    assert det["ap50"] > 0.3 and det["ap50_untrained"] < 0.05, det
    auto = summary["autobox"]
    assert auto["mean_iou"] > auto["whole_image_iou"], auto

    # A rerun skips every finished stage: the ranks are not rewritten.
    ranks = sorted((out / "retrieval" / "results").rglob("ranks*.npy"))
    before = {p: p.stat().st_mtime_ns for p in ranks}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in ranks} == before


@pytest.mark.slow
def test_real_data_mode(tmp_path: Path) -> None:
    """``--dataset``: a Revisited folder, the other one for the codebook, a detector SavedModel
    (here the synthetic world's benchmark stands in for roxford5k, with a tiny TF1 detector)."""
    from tiny_models import export_tf1_detector

    from gldboxes.synth import confs, generate_world

    world = generate_world(tmp_path / "w0", confs["tiny"])
    other = generate_world(tmp_path / "w1", replace(confs["tiny"], seed=1))
    detector = export_tf1_detector(tmp_path / "det", (0.2, 0.2, 0.8, 0.8))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "gldboxes",
        "-q",
        "pipeline",
        "--quick",
        "--out",
        str(out),
        "--dataset",
        str(world / "retrieval"),
        "--codebook-dataset",
        str(other / "retrieval"),
        "--detector",
        str(detector),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "report" / "table.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert "R-ASMK* (GT boxes, oracle)" not in rows  # no ground-truth boxes on real data
    assert float(rows["D2R-R-ASMK*"]["regions_per_image"]) == pytest.approx(2.0)
    assert 0.5 < float(rows["ASMK*"]["medium_map"]) <= 1.0
    assert not (out / "world").exists()  # nothing synthesised, nothing trained
    # Missing inputs are named.
    bad = subprocess.run(cmd[:-2], capture_output=True, text=True)
    assert bad.returncode == 2 and "--detector" in bad.stderr
