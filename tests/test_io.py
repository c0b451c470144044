"""Shared I/O: atomic folder replacement."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gldboxes.io import atomic_dir


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "index"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"  # the finished folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp folder left

    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
