"""Tests of gldboxes.progress: bars that do not flood logs."""

from __future__ import annotations

import io
import time

import pytest

from gldboxes.progress import tqdm


def test_tqdm_disable_wins_over_an_explicit_false(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for _ in tqdm(range(50), disable=False, file=buf, desc="x"):
        pass
    assert buf.getvalue() == ""


def test_not_a_terminal_redraws_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    """Into a file (a log, CI, a notebook) a bar redraws every 10 s, not ten times a second."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    buf = io.StringIO()
    for _ in tqdm(range(40), file=buf, desc="x"):
        time.sleep(0.02)  # 0.8 s: plain tqdm (mininterval 0.1 s) redraws about 8 times
    text = buf.getvalue()
    assert "40/40" in text
    assert text.count("\r") <= 3
    monkeypatch.setenv("GLDBOXES_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()
    for _ in tqdm(range(200), file=buf, desc="x", miniters=1):
        pass
    assert buf.getvalue().count("\r") > 50
