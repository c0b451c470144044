"""Robust HTTP file transfer: retries with backoff, Range resume, md5 check, atomic rename."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import requests

__all__ = [
    "PERMANENT_STATUS",
    "DownloadError",
    "download_file",
    "fetch_bytes",
    "md5sum",
    "new_session",
]

logger = logging.getLogger("gldboxes.http")

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Answers that say the file is not there for us (gone, forbidden): asking again cannot help.
PERMANENT_STATUS = frozenset({403, 404, 410})


class DownloadError(RuntimeError):
    """A transfer that failed for good (after retries) or whose checksum did not match.

    Attributes:
        status: the HTTP status of a permanent failure (404, 403, ...), else ``None``.
        checksum: ``True`` when the last attempt downloaded the whole file and its md5 did not
            match (after the expected md5 was refreshed, when a refresher was given).
    """

    def __init__(self, message: str, *, status: int | None = None, checksum: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.checksum = checksum

    @property
    def permanent(self) -> bool:
        """``True`` when retrying the same request cannot succeed (404/403/410, bad md5)."""
        return self.checksum or self.status in PERMANENT_STATUS


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
    refresh_md5: Callable[[], str] | None = None,
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
        refresh_md5: called once, on the first md5 mismatch, to ask again for the expected md5
            (e.g. refetch a cached checksum list that the mirror may have fixed); when it
            returns another hash, that one is expected from then on, and a file that matches it
            is kept without being fetched again.

    Raises:
        DownloadError: the transfer failed after all retries, or a 4xx other than 408/429
            (``checksum`` is set when the last attempt failed the md5 check).
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
    checksum = False
    try:
        for attempt in range(retries + 1):
            if attempt:
                logger.debug("retry %d for %s in %.1fs (%s)", attempt, url, wait, last_error)
                time.sleep(wait)
                wait *= 2
            checksum = False
            try:
                _fetch_into(sess, url, part, timeout, chunk_size, on_bytes)
            except _Retryable as exc:
                last_error = str(exc)
                continue
            except requests.RequestException as exc:  # connection reset, timeout, ...
                last_error = _describe(exc)
                continue
            if md5 is not None:
                got = md5sum(part)
                if got != md5 and refresh_md5 is not None:
                    fresh, refresh_md5 = refresh_md5(), None  # once per download
                    if fresh != md5:
                        logger.warning("%s: expected md5 changed from %s to %s", url, md5, fresh)
                        md5 = fresh
                if got != md5:
                    last_error = f"md5 mismatch (expected {md5}, got {got})"
                    checksum = True
                    logger.warning("%s: %s; fetching again", url, last_error)
                    part.unlink(missing_ok=True)
                    continue
            os.replace(part, dest)
            return dest
    finally:
        if own_session:
            sess.close()
    raise DownloadError(
        f"{url}: failed after {retries + 1} attempts ({last_error})", checksum=checksum
    )


class _Retryable(Exception):
    pass


def _describe(exc: requests.RequestException) -> str:
    """``ConnectionError: [Errno 111] Connection refused`` instead of urllib3's nested reprs."""
    text = f"{type(exc).__name__}: {exc}"
    errno = re.search(r"\[Errno -?\d+\] [^'\")]*", text)
    if isinstance(exc, requests.ConnectionError) and errno:
        return f"{type(exc).__name__}: {errno.group(0).strip()}"
    return text


def _fetch_into(
    sess: requests.Session,
    url: str,
    part: Path,
    timeout: float,
    chunk_size: int,
    on_bytes: Callable[[int], None] | None,
) -> None:
    if url.startswith("file://"):
        src = Path(url[len("file://") :])
        if not src.exists():
            raise DownloadError(f"{url}: no such file")
        with open(src, "rb") as fin, open(part, "wb") as fout:
            while block := fin.read(chunk_size):
                fout.write(block)
                if on_bytes:
                    on_bytes(len(block))
        return
    have = part.stat().st_size if part.exists() else 0
    # identity: a compressed body would break byte offsets (Range) and Content-Length checks.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with sess.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            # Range not satisfiable: the partial file is complete or stale; start over.
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 on resume; restarting")
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {resp.status_code}", status=resp.status_code)
        if have and resp.status_code == 206 and _range_start(resp) != have:
            # The server resumed from another offset than asked: never splice; start over.
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 206 from offset {_range_start(resp)}, asked {have}")
        mode = "ab" if (have and resp.status_code == 206) else "wb"
        expected = resp.headers.get("Content-Length")
        received = 0
        if expected is not None and hasattr(resp.raw, "enforce_content_length"):
            # Let urllib3 hand over the bytes of a body cut short instead of raising and
            # discarding its last partial read: we check the length below and resume from
            # exactly where the connection dropped.
            resp.raw.enforce_content_length = False
        with open(part, mode) as fout:
            for block in resp.iter_content(chunk_size):
                fout.write(block)
                received += len(block)
                if on_bytes:
                    on_bytes(len(block))
        if expected is not None and received < int(expected):
            raise _Retryable(f"connection dropped after {received} of {expected} bytes")


def _range_start(resp: requests.Response) -> int | None:
    """First byte offset of a 206 answer from ``Content-Range: bytes a-b/n``, if parseable."""
    value = resp.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def fetch_bytes(
    url: str,
    *,
    session: requests.Session | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30.0,
    max_bytes: int | None = None,
) -> bytes:
    """GET ``url`` into memory with retries and exponential backoff (small files: images, CSVs).

    Connection errors, timeouts, truncated bodies and 408/425/429/5xx answers are retried;
    other 4xx answers fail at once with ``DownloadError.status`` set (a dead URL is not
    transient).

    Args:
        max_bytes: refuse bodies larger than this (``DownloadError``), to bound memory.

    Raises:
        DownloadError: after ``retries + 1`` failed attempts or on a permanent HTTP error.
    """
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
                with sess.get(url, stream=True, timeout=timeout) as resp:
                    if resp.status_code in RETRY_STATUS:
                        last_error = f"HTTP {resp.status_code}"
                        continue
                    if resp.status_code >= 400:
                        raise DownloadError(
                            f"{url}: HTTP {resp.status_code}", status=resp.status_code
                        )
                    chunks: list[bytes] = []
                    size = 0
                    for block in resp.iter_content(1 << 16):
                        size += len(block)
                        if max_bytes is not None and size > max_bytes:
                            raise DownloadError(f"{url}: larger than {max_bytes} bytes")
                        chunks.append(block)
                    return b"".join(chunks)
            except requests.RequestException as exc:  # reset, timeout, truncated body, ...
                last_error = _describe(exc)
                continue
    finally:
        if own_session:
            sess.close()
    raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last_error})")
