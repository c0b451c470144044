"""Robust HTTP file transfer: retries with backoff, Range resume, md5 check, atomic rename."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import requests

__all__ = ["DownloadError", "download_file", "md5sum", "new_session"]

logger = logging.getLogger("gldboxes.http")

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadError(RuntimeError):
    """A transfer that failed for good (after retries) or whose checksum did not match."""


def new_session(pool_size: int = 8) -> requests.Session:
    """A ``requests.Session`` with a connection pool sized for ``pool_size`` parallel transfers."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "gldboxes"
    return session


def md5sum(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    session: requests.Session | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
    chunk_size: int = 1 << 16,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    The file only appears at ``dest`` once complete (and, when ``md5`` is given, verified), so a
    crash never leaves a half-written file under the final name. A checksum mismatch deletes the
    partial data and fetches again from scratch, up to ``retries`` times.

    Args:
        url: ``http(s)://`` or ``file://`` address.
        dest: final path.
        md5: expected hex md5, or ``None`` to skip verification.
        session: a shared session (connection pooling); a new one is made if omitted.
        retries: attempts after the first on connection errors, 5xx/429 and md5 mismatch.
        backoff: first wait in seconds, doubled after each failure.
        on_bytes: called with the number of bytes received, for progress bars.

    Raises:
        DownloadError: the transfer failed after all retries, or a 4xx other than 408/429.
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    sess = session or new_session(1)
    wait = backoff
    last_error = "no attempt made"
    try:
        for attempt in range(retries + 1):
            if attempt:
                logger.debug("retry %d for %s in %.1fs (%s)", attempt, url, wait, last_error)
                time.sleep(wait)
                wait *= 2
            try:
                _fetch_into(sess, url, part, timeout, chunk_size, on_bytes)
            except _Retryable as exc:
                last_error = str(exc)
                continue
            except requests.RequestException as exc:  # connection reset, timeout, ...
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if md5 is not None:
                got = md5sum(part)
                if got != md5:
                    last_error = f"md5 mismatch (expected {md5}, got {got})"
                    logger.warning("%s: %s; fetching again", url, last_error)
                    part.unlink(missing_ok=True)
                    continue
            os.replace(part, dest)
            return dest
    finally:
        if own_session:
            sess.close()
    raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last_error})")


class _Retryable(Exception):
    pass


def _fetch_into(
    sess: requests.Session,
    url: str,
    part: Path,
    timeout: float,
    chunk_size: int,
    on_bytes: Callable[[int], None] | None,
) -> None:
    if url.startswith("file://"):
        src = Path(url[len("file://"):])
        if not src.exists():
            raise DownloadError(f"{url}: no such file")
        with open(src, "rb") as fin, open(part, "wb") as fout:
            while block := fin.read(chunk_size):
                fout.write(block)
                if on_bytes:
                    on_bytes(len(block))
        return
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with sess.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            # Range not satisfiable: the partial file is complete or stale; start over.
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 on resume; restarting")
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {resp.status_code}")
        mode = "ab" if (have and resp.status_code == 206) else "wb"
        expected = resp.headers.get("Content-Length")
        received = 0
        with open(part, mode) as fout:
            for block in resp.iter_content(chunk_size):
                fout.write(block)
                received += len(block)
                if on_bytes:
                    on_bytes(len(block))
        if expected is not None and received < int(expected):
            raise _Retryable(f"connection dropped after {received} of {expected} bytes")
