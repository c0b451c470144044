"""benchmarks/asmk_peer.py at a tiny size: both of its modes run and print agreeing rankings."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_agrees_and_prints_ratios() -> None:
    if importlib.util.find_spec("asmk") is None:
        pytest.fail("the asmk peer is not installed: run `make test` (scripts/peers.sh)")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "asmk_peer.py"),
            "--images",
            "300,2000",
            "--queries",
            "8",
            "--codebook-size",
            "256",
            "--full-max",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    # the descriptor pipeline (300 images) and the generated aggregated images (2,000)
    assert "## 300 database images: descriptors" in text
    assert "## 2000 database images: aggregated images made directly" in text
    assert text.count("mAP agreement within 0.5 points: yes") == 2
    assert text.count("| identical top-10 lists | | 100% | |") == 2
    ratios = re.findall(
        r"\| search per query, (?:full ranking|top 100), 1 thread \(ms\) .* \| "
        r"([0-9.]+)x \|",
        text,
    )
    assert len(ratios) == 4
    # ours is at least twice as fast one query at a time, even on a loaded machine
    assert min(float(r) for r in ratios) > 2.0, ratios
