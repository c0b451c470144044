"""GLDv1-style URL lists: download an ``id,url[,landmark_id]`` CSV image by image.

:func:`download_url_list` fetches every row into ``OUT/images/a/b/c/<id>.jpg`` (re-encoded JPEG,
optional maximum size), records dead URLs, bad rows and repeated ids in ``OUT/failures.csv``
(not fatal) and skips images already present on a re-run. The GLDv2 tar shards are
:mod:`gldboxes.gld`; :mod:`gldboxes.gld_stages` runs both task by task on an executor. This
module imports neither :mod:`gldboxes.gld_stages` nor :mod:`gldboxes.executor`.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gldboxes.gld import image_relpath
from gldboxes.http import fetch_bytes, new_session
from gldboxes.io import atomic_path, atomic_write
from gldboxes.progress import tqdm

__all__ = [
    "DUPLICATE_ID",
    "UrlListReport",
    "download_url_list",
    "iter_url_rows",
    "read_failures",
    "url_list_duplicates",
    "warn_duplicates",
    "write_failures",
]

logger = logging.getLogger("gldboxes.gld_urls")

DUPLICATE_ID = "duplicate id"  # failures.csv reason of a row repeating an earlier id


# ------------------------------------------------------------------------------- URL lists
@dataclass
class UrlListReport:
    """What :func:`download_url_list` did (counts) and where the failures are listed.

    ``failed`` counts rows that produced no image (dead URL, undecodable body, an id that cannot
    be a file name, a row without enough fields); ``duplicates`` counts later rows repeating an
    earlier id (skipped: the first row wins; listed in ``failures.csv`` as ``duplicate id``).

    :func:`gldboxes.gld_stages.download_url_list_sharded` also fills ``shards_done`` /
    ``shards_skipped`` (task folders finished in this run / before it) and ``failed_shards``
    (``{task: error}``).
    """

    images_dir: Path
    failures_csv: Path
    downloaded: int = 0
    present: int = 0
    failed: int = 0
    skipped_failed: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    shards_done: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)


def download_url_list(
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 16,
    max_size: int | None = None,
    quality: int = 90,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30.0,
    retry_failed: bool = True,
    limit: int | None = None,
    max_bytes: int = 50 << 20,
    progress: bool = True,
) -> UrlListReport:
    """Fetch every ``id,url`` of a GLDv1-style CSV into ``out_dir/images/a/b/c/<id>.jpg``.

    Images are decoded and re-encoded as RGB JPEG (``quality``), downscaled so the longer side
    is at most ``max_size`` when given; pixels are kept as stored (no EXIF rotation). Each image
    is written atomically, so an image on disk is complete and a re-run skips it. Dead URLs,
    HTTP errors, undecodable bodies, ids that cannot be laid out as ``a/b/c/<id>.jpg`` and rows
    with missing fields go to ``out_dir/failures.csv`` (``id,url,reason``) and are not fatal;
    so do later rows repeating an id (reason ``duplicate id``; the first row wins). 16-bit
    grayscale images are scaled to 8 bits; a UTF-8 byte-order mark before the header is
    accepted.

    Args:
        workers: parallel transfers; at most ``4 * workers`` rows are in flight at once, so a
            5-million-row CSV is streamed, never held in memory.
        retry_failed: try ids listed in an earlier ``failures.csv`` again (else keep them).
        limit: only the first ``limit`` rows (smoke runs).

    Raises:
        ValueError: the CSV lacks ``id`` and ``url`` columns (naming the file).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    csv_path, out = Path(csv_path), Path(out_dir)
    images_dir = out / "images"
    failures_csv = out / "failures.csv"
    images_dir.mkdir(parents=True, exist_ok=True)
    previous = read_failures(failures_csv)
    failures: dict[str, tuple[str, str]] = dict(previous)  # cleared per id on success
    duplicates: list[tuple[str, str]] = []  # (id, url) of rows repeating an earlier id
    repeated = _repeated_id_hashes(csv_path, limit)
    seen: set[str] = set()  # only the ids whose hash occurs more than once
    report = UrlListReport(images_dir=images_dir, failures_csv=failures_csv)
    t0 = time.perf_counter()
    session = new_session(workers)
    bar = tqdm(unit="img", desc="images", disable=not progress)
    lock = threading.Lock()

    def work(image_id: str, url: str, dest: Path) -> None:
        data = fetch_bytes(
            url,
            session=session,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            max_bytes=max_bytes,
        )
        jpeg = _reencode(data, max_size, quality)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(jpeg)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gldurl") as pool:
            in_flight: dict[Future[None], tuple[str, str]] = {}

            def drain(block_until: int) -> None:
                nonlocal in_flight
                while len(in_flight) > block_until:
                    finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        image_id, url = in_flight.pop(fut)
                        exc = fut.exception()
                        with lock:
                            if exc is None:
                                report.downloaded += 1
                                failures.pop(image_id, None)
                            else:
                                report.failed += 1
                                failures[image_id] = (url, _reason(exc))
                        bar.update(1)

            for n_rows, (image_id, url, problem) in enumerate(iter_url_rows(csv_path)):
                if limit is not None and n_rows >= limit:
                    break
                if hash(image_id) in repeated:
                    if image_id in seen:
                        duplicates.append((image_id, url))
                        bar.update(1)
                        continue
                    seen.add(image_id)
                if problem is None:
                    try:
                        dest = images_dir / image_relpath(image_id)
                    except ValueError as exc:
                        problem = str(exc)
                if problem is not None:
                    report.failed += 1
                    failures[image_id] = (url, problem)
                    bar.update(1)
                    continue
                if dest.exists():
                    report.present += 1
                    failures.pop(image_id, None)
                    bar.update(1)
                    continue
                if not retry_failed and image_id in previous:
                    report.skipped_failed += 1
                    bar.update(1)
                    continue
                if not url or url.lower() == "none":
                    report.failed += 1
                    failures[image_id] = (url, "no url")
                    bar.update(1)
                    continue
                in_flight[pool.submit(work, image_id, url, dest)] = (image_id, url)
                drain(4 * workers)
            drain(0)
    finally:
        bar.close()
        session.close()
        write_failures(failures_csv, failures, duplicates)
        report.duplicates = len(duplicates)
        report.seconds = time.perf_counter() - t0
    warn_duplicates(csv_path, duplicates, failures_csv)
    logger.info(
        "%s: %d downloaded, %d already present, %d failed (%s)",
        csv_path.name,
        report.downloaded,
        report.present,
        report.failed,
        failures_csv,
    )
    return report


def iter_url_rows(path: Path) -> Iterator[tuple[str, str, str | None]]:
    """``(id, url, problem)`` of each row of an ``id,url[,...]`` CSV (a UTF-8 BOM is accepted).

    ``problem`` names what is wrong with a row too short to hold both fields (else ``None``);
    ids are not checked here (:func:`image_relpath` does).

    Raises:
        ValueError: the header lacks ``id`` or ``url`` (naming the file).
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        cols = [c.strip().lower() for c in header or []]
        if "id" not in cols or "url" not in cols:
            raise ValueError(f"{path}: expected a header with 'id' and 'url', got {header}")
        i_id, i_url = cols.index("id"), cols.index("url")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            image_id = row[i_id].strip() if len(row) > i_id else ""
            url = row[i_url].strip() if len(row) > i_url else ""
            problem = None
            if len(row) <= max(i_id, i_url):
                problem = f"line {line}: expected {len(cols)} fields, got {len(row)}"
            yield image_id, url, problem


def _repeated_id_hashes(path: Path, limit: int | None) -> set[int]:
    """``hash(id)`` of the ids that occur more than once in the first ``limit`` rows.

    A first pass keeps only an int64 per row (40 MB for 5 million rows, where a set of the ids
    would take ~0.5 GB); the rare hash collision only makes the caller remember one more id.
    """
    import numpy as np

    rows = iter_url_rows(path)
    ids = (row[0] for row in (rows if limit is None else itertools.islice(rows, max(limit, 0))))
    hashes = np.fromiter((hash(i) for i in ids), np.int64)
    hashes.sort()
    return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())


def url_list_duplicates(path: Path, limit: int | None) -> list[tuple[str, str]]:
    """``(id, url)`` of the rows (among the first ``limit``) repeating an earlier row's id."""
    repeated = _repeated_id_hashes(path, limit)
    if not repeated:
        return []
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    rows = iter_url_rows(path)
    for image_id, url, _ in rows if limit is None else itertools.islice(rows, max(limit, 0)):
        if hash(image_id) in repeated:
            if image_id in seen:
                out.append((image_id, url))
            seen.add(image_id)
    return out


def warn_duplicates(path: Path, duplicates: list[tuple[str, str]], failures_csv: Path) -> None:
    """One warning naming the URL list ``path``, how many rows repeat an id and ``failures_csv``
    (nothing when ``duplicates`` is empty)."""
    if duplicates:
        logger.warning(
            "%s: %d row(s) repeat an earlier id and were skipped (the first row wins; listed "
            "in %s as %r)",
            path,
            len(duplicates),
            failures_csv,
            DUPLICATE_ID,
        )


def _reencode(data: bytes, max_size: int | None, quality: int) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_size is not None and img.format == "JPEG":
                img.draft("RGB", (max_size, max_size))  # decode at reduced scale: much faster
            img.load()
            rgb = _to_8bit(img).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    if max_size is not None and max(rgb.size) > max_size:
        rgb.thumbnail((max_size, max_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _to_8bit(img: Any) -> Any:
    """``img`` unchanged, or as 8-bit ``L`` when it is a 16/32-bit integer or float image.

    ``convert("RGB")`` would clip those at 255 (a 16-bit photo turns white). Integer images
    whose values fit 16 bits are scaled by the 16-bit range (65535 -> 255), wider or float
    ones by their maximum, as :func:`retrieval.features.load_image` does.
    """
    from PIL import Image

    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    import numpy as np

    wide = np.asarray(img, dtype=np.float64)
    top = float(wide.max()) if wide.size else 0.0
    if img.mode != "F" and top <= 255:
        scale = 1.0
    elif img.mode != "F" and top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / (top or 1.0)
    return Image.fromarray(np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8), "L")


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text[:300]


def read_failures(path: Path) -> dict[str, tuple[str, str]]:
    """``{id: (url, reason)}`` of a ``failures.csv`` (its ``duplicate id`` rows left out: they
    are found again from the CSV on every run); empty when the file does not exist.

    Raises:
        ValueError: when the header lacks ``id`` (naming the file).
    """
    if not path.exists():
        return {}
    out: dict[str, tuple[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise ValueError(f"{path}: expected header 'id,url,reason', got {reader.fieldnames}")
        for row in reader:
            if row.get("reason") != DUPLICATE_ID:
                out[row["id"]] = (row.get("url") or "", row.get("reason") or "")
    return out


def write_failures(
    path: Path,
    failures: dict[str, tuple[str, str]],
    duplicates: Sequence[tuple[str, str]] = (),
) -> None:
    """Write ``id,url,reason`` sorted by id; a duplicate row follows its id's failure row."""
    rows = [(i, *failures[i]) for i in failures]
    rows += [(i, url, DUPLICATE_ID) for i, url in duplicates]
    rows.sort(key=lambda r: (r[0], r[2] == DUPLICATE_ID))  # stable: duplicates in CSV order
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "url", "reason"])
        writer.writerows(rows)
