"""Golden outputs of the retrieval run on the tiny synthetic world (tests/golden/).

``python scripts/golden.py --out runs/golden [--write [--quick-report DIR]]`` runs ``gldboxes
retrieval run`` for
ASMK*, R-ASMK* (ground-truth boxes and the R-MAC grid), D2R-ASMK* (max) and ASMK* + SV on the
tiny world, then prints whether every ranking and metric equals ``tests/golden/retrieval_run.json``
(``--write`` stores them instead). ``tests/test_golden.py`` runs the same cells under
``--engine serial`` and ``--engine ray`` and compares with the stored file; the quick pipeline's
first-stage, +SV and oracle rows are checked by ``tests/test_pipeline.py`` against
``tests/golden/quick_pipeline.json``.

Changes since the first store (509e2ea), each explained: the quick pipeline's
``index_bytes_per_image`` went from 1593.83 to 1380.08 when posting ids became delta-encoded
(#17); its rankings and metrics did not change.

Stored per cell: the full ranking (tiny: 48 database images) and every protocol's mAP and
mP@k from ``metrics.json`` (after verification for the +SV cell). The detector's rows are not
stored: CPU training is not bit-reproducible, so they follow the detector of the day.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "retrieval_run.json"
GOLDEN_QUICK = ROOT / "tests" / "golden" / "quick_pipeline.json"
#: The quick pipeline's rows that do not depend on the detector's training.
QUICK_ROWS = ("ASMK*", "ASMK* + SV", "R-ASMK* (GT boxes, oracle)")

#: cell name -> the ``retrieval run`` flags after the common ones ({world} is the world root).
CELLS: dict[str, list[str]] = {
    "asmk_star": ["--kernel", "asmk_star"],
    "r_asmk_star-gt": [
        "--kernel",
        "r_asmk_star",
        "--regions",
        "gt",
        "--region-boxes",
        "{world}/retrieval/boxes_gt.csv",
    ],
    "r_asmk_star-rmacb-L2": ["--kernel", "r_asmk_star", "--regions", "rmacb-L2"],
    "d2r_asmk_star-gt-max": [
        "--kernel",
        "asmk_star",
        "--regions",
        "gt",
        "--region-boxes",
        "{world}/retrieval/boxes_gt.csv",
        "--regional-search",
        "max",
    ],
    "asmk_star+sv": ["--kernel", "asmk_star", "--verify", "--gv-top-n", "20"],
}


def world(root: Path) -> Path:
    """The tiny synthetic world (generated once under ``root``)."""
    from gldboxes.synth import confs, generate_world

    w = root / "world"
    if not (w / "retrieval").exists():
        generate_world(w, confs["tiny"])
    return w


def argv(cell: str, w: Path, out: Path, engine: Sequence[str] = ()) -> list[str]:
    """The CLI arguments of one golden cell (K=128 trained on the world's training images)."""
    common = ["-q", "retrieval", "run", "--dataset", str(w / "retrieval"), "--out", str(out)]
    common += ["--codebook-images", str(w / "train" / "images"), "--codebook-size", "128"]
    return [*common, *[a.format(world=w) for a in CELLS[cell]], *engine, "--json"]


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What is compared: the ranking and every metric of a ``retrieval run --json`` report."""
    ver = report.get("verification")
    if ver:
        mpath = Path(ver["metrics"])
        ranks = {p: np.load(mpath.parent / f"ranks_{p}.npy") for p in ("easy", "medium", "hard")}
    else:
        mpath = Path(report["metrics"])
        ranks = {"all": np.load(report["ranks"])}
    metrics = json.loads(mpath.read_text())["metrics"]
    return {
        "ranks": {p: r.astype(np.int64).T.tolist() for p, r in ranks.items()},  # per query
        "ranks_md5": {
            p: hashlib.md5(np.ascontiguousarray(r, np.int64).tobytes()).hexdigest()
            for p, r in ranks.items()
        },
        "metrics": metrics,
    }


def run_cell(cell: str, w: Path, out: Path, engine: Sequence[str] = ()) -> dict[str, Any]:
    """Run one cell through the CLI in this process and return its :func:`summary`."""
    import contextlib
    import io

    from gldboxes.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv(cell, w, out, engine))
    if rc != 0:
        raise RuntimeError(f"{cell}: exit {rc}")
    return summary(json.loads(buf.getvalue()))


def quick_rows(report: Path) -> dict[str, dict[str, str]]:
    """The detector-free rows of a quick pipeline's ``report/table.csv``, as written."""
    import csv

    with open(report / "table.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    return {m: rows[m] for m in QUICK_ROWS}


def main(args: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "golden")
    p.add_argument("--write", action="store_true", help="store the outputs as the golden file")
    p.add_argument(
        "--quick-report",
        type=Path,
        help="also store the rows of this `pipeline --quick` report folder (with --write)",
    )
    a = p.parse_args(args)
    if a.write and a.quick_report is not None:
        GOLDEN_QUICK.write_text(json.dumps(quick_rows(a.quick_report), indent=1) + "\n")
        print(f"wrote {GOLDEN_QUICK}")
    w = world(a.out)
    got = {cell: run_cell(cell, w, a.out / "run") for cell in CELLS}
    if a.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    bad = [c for c in CELLS if got[c] != want.get(c)]
    for c in CELLS:
        print(f"{c}: {'changed' if c in bad else 'unchanged'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
