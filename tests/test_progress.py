"""Tests of gldboxes.progress: bars that do not flood logs."""

from __future__ import annotations

import io

import pytest

from gldboxes.progress import tqdm


def test_tqdm_disable_wins_over_an_explicit_false(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for _ in tqdm(range(50), disable=False, file=buf, desc="x"):
        pass
    assert buf.getvalue() == ""


def test_not_a_terminal_redraws_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Into a file (a log, CI, a notebook) 20,000 steps give a couple of lines, not thousands."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    buf = io.StringIO()
    for _ in tqdm(range(20000), file=buf, desc="x"):
        pass
    text = buf.getvalue()
    assert "20000/20000" in text
    assert text.count("\r") <= 3
    monkeypatch.setenv("GLDBOXES_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()
    for _ in tqdm(range(200), file=buf, desc="x", miniters=1):
        pass
    assert buf.getvalue().count("\r") > 50
