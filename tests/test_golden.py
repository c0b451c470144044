"""The golden outputs stored before the one-runner refactor, unchanged under both engines.

``tests/golden/retrieval_run.json`` holds, for ASMK*, R-ASMK* (ground-truth boxes and the R-MAC
grid), D2R-ASMK* (max) and ASMK* + SV on the tiny world, the full ranking of every query and
every metric, as ``gldboxes retrieval run`` gave them with the two runners of before
(``scripts/golden.py --write`` at 509e2ea). The one runner must give them again, serial and on
Ray (``--engine ray``, a local Ray of 2 CPUs started by the command).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from golden import CELLS, GOLDEN, run_cell, world


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return world(tmp_path_factory.mktemp("golden"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["serial", "ray"])
def test_run_equals_golden(
    engine: str, tiny: Path, golden: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp(f"golden-{engine}")
    flags = ["--engine", engine] + (["--num-cpus", "2"] if engine == "ray" else [])
    if engine == "ray":
        import ray  # the `ray` extra: a missing install fails, never skips

        assert ray.__version__
    changed = []
    for cell in CELLS:
        got = run_cell(cell, tiny, out, flags)
        want = golden[cell]
        if got != want:
            changed.append(cell)
            # the first difference, readable
            for key in ("metrics", "ranks_md5"):
                assert got[key] == want[key], (cell, key)
    assert changed == []
    # A cell's rankings are not trivial: the R-MAC grid row is below 1.0 Hard mAP.
    assert golden["r_asmk_star-rmacb-L2"]["metrics"]["hard"]["mAP"] < 0.99
