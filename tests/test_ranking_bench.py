"""benchmarks/ranking.py at a tiny size: it runs, checks its order, and prints every row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_the_rows() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ranking.py"), "--images", "3000"]
    cmd += ["--queries", "3", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "ns a posting touched" in text
    # the peer row with its ratio (the script raises if the orders differ)
    ratios = re.findall(r"\(np\.argsort stable\) \| ([0-9.]+)x \|", text)
    assert len(ratios) == 1 and float(ratios[0]) > 0
