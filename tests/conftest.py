"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real fixtures in ``../shared/data``; tests using it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not present at {SHARED_DATA}")
    return SHARED_DATA
