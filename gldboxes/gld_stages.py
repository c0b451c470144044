"""Google Landmarks downloads as executor stages: GLDv2 tars and URL-list rows, shard by shard.

:func:`download_gldv2_sharded` and :func:`download_url_list_sharded` do the work of
:func:`gldboxes.gld.download_gldv2` and :func:`gldboxes.gld.download_url_list` as tasks on an
executor (:mod:`gldboxes.executor`: serial, or Ray with ``--engine ray``), with the same output
layout plus ``shards/<task>/done.json``; the per-task work is :func:`gldv2_shard_stage` and
:func:`url_list_stage`. Imports go one way: this module uses :mod:`gldboxes.gld` and
:mod:`gldboxes.executor`, neither of which imports it.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gldboxes.executor import (
    DONE_NAME,
    Executor,
    NonRetryableError,
    Resources,
    Shard,
    Stage,
    make_shards,
    numbered_shards,
    read_done,
)
from gldboxes.gld import (
    GLDV2_BASE_URL,
    GLDV2_SHARDS,
    GLDv2Report,
    download_metadata,
    download_shard_tar,
    extract_shard,
    fetch_shard_md5,
    gldv2_setup,
    image_relpath,
    parse_md5_file,
    shard_name,
)
from gldboxes.gld_urls import (
    UrlListReport,
    download_url_list,
    iter_url_rows,
    read_failures,
    url_list_duplicates,
    warn_duplicates,
    write_failures,
)
from gldboxes.http import DownloadError, new_session

__all__ = [
    "download_gldv2_sharded",
    "download_url_list_sharded",
    "gldv2_shard_stage",
    "url_list_shards",
    "url_list_stage",
]

logger = logging.getLogger("gldboxes.gld_stages")


def download_gldv2_sharded(
    split: str,
    out_dir: str | os.PathLike[str],
    executor: Executor,
    *,
    shards: Sequence[int] | str | None = None,
    base_url: str = GLDV2_BASE_URL,
    tars_per_task: int = 1,
    metadata: bool = True,
    keep_tars: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> GLDv2Report:
    """:func:`download_gldv2` with the tar shards run task by task on an executor.

    The tars go through :func:`gldboxes.executor.gldv2_shard_stage` (``tars_per_task`` tars a
    task: download, md5-verify, extract), on the serial executor or on Ray; the metadata CSVs
    are fetched on the driver. The layout is :func:`download_gldv2`'s (``images/``,
    ``md5/``, ``manifest.json``) plus ``shards/tars-XXX/`` (``done.json``, ``images.txt``:
    the task's members). A rerun skips the tasks whose ``done.json`` matches and the tars the
    manifest has as verified and extracted by :func:`download_gldv2`; tars finished here are
    entered into the manifest too, so either downloader resumes the other's work.

    Returns:
        a :class:`GLDv2Report` over tar names (``images_XXX.tar``); ``images`` counts the
        images extracted in this run; a failed task names all of its tars in ``failed``.
    """

    if tars_per_task < 1:
        raise ValueError(f"tars_per_task must be >= 1, got {tars_per_task}")
    indices, base, root, manifest, report = gldv2_setup(split, shards, base_url, out_dir)
    if metadata:
        session = new_session(2)
        try:
            policy: dict[str, Any] = {"retries": retries, "backoff": backoff, "timeout": timeout}
            download_metadata(split, base, root, session, policy, report)
        finally:
            session.close()
    stage, tasks = gldv2_shard_stage(
        split,
        root,
        indices,
        base_url=base,
        tars_per_task=tars_per_task,
        keep_tars=keep_tars,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
    )
    work = root / "shards"

    def in_manifest(task: Shard) -> bool:  # finished by download_gldv2, not by a task
        entries = [manifest.get(shard_name(int(i))) or {} for i in task.items]
        return read_done(work / task.name) is None and all(
            e.get("verified") and e.get("extracted") for e in entries
        )

    earlier = {t.name for t in tasks if in_manifest(t)}
    rep = executor.run(
        stage, [t for t in tasks if t.name not in earlier], work, raise_on_failure=False
    )
    for task in tasks:
        names = [shard_name(int(i)) for i in task.items]
        if task.name in earlier:
            report.skipped.extend(names)
            continue
        if task.name in rep.failed:
            report.failed.update({n: rep.failed[task.name] for n in names})
            continue
        (report.skipped if task.name in rep.skipped else report.done).extend(names)
        if task.name in rep.done:
            done = read_done(rep.out_dir / task.name) or {}
            report.images += int(done.get("counts", {}).get("images", 0))
        for n in names:
            if not (manifest.get(n) or {}).get("extracted"):
                md5_file = root / "md5" / f"md5.{n[: -len('.tar')]}.txt"
                text = md5_file.read_text("utf-8", "replace")
                md5 = parse_md5_file(text, n, source=str(md5_file))
                manifest.update(
                    n, verified=True, md5=md5, extracted=True, tar_kept=keep_tars, task=task.name
                )
    report.done.sort()
    report.skipped.sort()
    return report


def download_url_list_sharded(
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    executor: Executor,
    *,
    rows_per_shard: int = 1000,
    workers: int = 8,
    max_size: int | None = None,
    quality: int = 90,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30.0,
    retry_failed: bool = True,
    limit: int | None = None,
) -> UrlListReport:
    """:func:`download_url_list` with slices of ``rows_per_shard`` rows run on an executor.

    Each task (:func:`gldboxes.executor.url_list_stage`) fetches its rows not yet on disk with
    ``workers`` threads and moves the images into ``out_dir/images/a/b/c/<id>.jpg``; its
    ``failures.csv`` stays in ``out_dir/shards/urls-XXXXX/`` and the driver joins them into
    ``out_dir/failures.csv`` (``id,url,reason``, sorted by id, as :func:`download_url_list`
    writes it). A rerun skips finished tasks; with ``retry_failed`` a finished task that had
    failures runs again (its images on disk are kept, only the failures are fetched).

    Returns:
        an :class:`UrlListReport`: ``downloaded`` / ``present`` of the tasks run now (rows
        of tasks skipped count as present), ``failed`` = rows in the joined failures list.
    """

    out = Path(out_dir)
    t0 = time.perf_counter()
    stage, tasks = url_list_stage(
        csv_path,
        out,
        rows_per_shard=rows_per_shard,
        workers=workers,
        max_size=max_size,
        quality=quality,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        limit=limit,
    )
    work = out / "shards"
    if retry_failed:
        for task in tasks:
            done = read_done(work / task.name)
            if done is not None and int(done.get("counts", {}).get("failed", 0)) > 0:
                logger.info("%s: retrying its %s failure(s)", task.name, done["counts"]["failed"])
                (work / task.name / DONE_NAME).unlink()
    rep = executor.run(stage, tasks, work, raise_on_failure=False)
    report = UrlListReport(images_dir=out / "images", failures_csv=out / "failures.csv")
    report.shards_done, report.shards_skipped = list(rep.done), list(rep.skipped)
    report.failed_shards = dict(rep.failed)
    failures: dict[str, tuple[str, str]] = {}
    duplicates = url_list_duplicates(Path(csv_path), limit)  # dropped from the tasks' rows
    for task in tasks:
        if task.name in rep.failed:
            continue
        counts = (read_done(work / task.name) or {}).get("counts", {})
        if task.name in rep.done:
            report.downloaded += int(counts.get("downloaded", 0))
            report.present += int(counts.get("present", 0))
        else:
            report.present += int(counts.get("rows", 0)) - int(counts.get("failed", 0))
        failures.update(read_failures(work / task.name / "failures.csv"))
    write_failures(report.failures_csv, failures, duplicates)
    report.failed = len(failures)
    report.duplicates = len(duplicates)
    warn_duplicates(Path(csv_path), duplicates, report.failures_csv)
    report.seconds = time.perf_counter() - t0
    logger.info(
        "%s: %d downloaded, %d already present, %d failed (%s); %d task(s) run, %d skipped",
        Path(csv_path).name,
        report.downloaded,
        report.present,
        report.failed,
        report.failures_csv,
        len(rep.done),
        len(rep.skipped),
    )
    return report


def _tar_members(tar: Path) -> list[str]:
    """The regular-file members of a tar (``./`` stripped); seeks over the data when it can."""
    with tarfile.open(tar, "r:*") as tf:
        return [m.name[2:] if m.name.startswith("./") else m.name for m in tf if m.isfile()]


def _gldv2_shard(shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]) -> dict[str, int]:
    """Download, verify and extract the GLDv2 tar shards listed in ``shard.items``."""

    base, split, root = str(conf["base_url"]), str(conf["split"]), Path(conf["root"])
    policy: dict[str, Any] = {
        "retries": int(conf["retries"]),
        "backoff": float(conf["backoff"]),
        "timeout": float(conf["timeout"]),
    }
    n_images = n_bytes = 0
    listing: list[str] = []
    session = new_session(2)
    try:
        for index in shard.items:
            name = shard_name(int(index))
            try:
                md5 = fetch_shard_md5(base, split, name, root, session=session, **policy)
                # The tar (and its resumable .part) live outside the shard folder, so a retried
                # attempt resumes the transfer with an HTTP Range request.
                tar, _ = download_shard_tar(base, split, name, root, md5, session=session, **policy)
            except DownloadError as exc:
                if exc.permanent:  # 404/403/410 or a bad md5 after refetching the list
                    raise NonRetryableError(str(exc)) from exc
                raise
            n_bytes += tar.stat().st_size
            try:
                listing.extend(_tar_members(tar))
                n_images += extract_shard(tar, root / "images")
            except ValueError as exc:  # unsafe member or corrupt tar: md5-verified, stays bad
                raise NonRetryableError(str(exc)) from exc
            except tarfile.TarError as exc:
                raise NonRetryableError(f"{tar}: not a readable tar ({exc})") from exc
            if not bool(conf["keep_tars"]):
                tar.unlink()
    finally:
        session.close()
    (out / "images.txt").write_text("".join(f"{n}\n" for n in sorted(listing)), "utf-8")
    return {"tars": len(shard.items), "images": n_images, "bytes": n_bytes}


def gldv2_shard_stage(
    split: str,
    root: str | os.PathLike[str],
    shard_indices: Sequence[int],
    *,
    base_url: str | None = None,
    tars_per_task: int = 1,
    keep_tars: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    resources: Resources | None = None,
) -> tuple[Stage, list[Shard]]:
    """The GLDv2 download as an executor stage: one task per ``tars_per_task`` tar shards.

    Each task fetches the md5 list and the tar (md5-verified; a retried attempt resumes the
    ``.part`` with an HTTP Range request), extracts it into ``root/images/a/b/c/<id>.jpg``
    (members staged and renamed: a crash never leaves a truncated image) and lists the
    extracted members in its shard folder (``images.txt``). Run it with
    ``executor.run(stage, shards, root / "shards")``; the metadata CSVs are small and stay with
    :func:`gldboxes.gld.download_gldv2` (``shards=[]``).

    Returns:
        ``(stage, shards)``; the shard items are tar indices, a shard is named after its
        first (and last) tar: ``tars-007``, ``tars-008-009``.
    """

    if split not in GLDV2_SHARDS:
        raise ValueError(f"unknown GLDv2 split {split!r}; expected one of {list(GLDV2_SHARDS)}")
    bad = [i for i in shard_indices if not 0 <= int(i) < GLDV2_SHARDS[split]]
    if bad:
        raise ValueError(f"GLDv2 {split}: shard indices {bad[:5]} out of range")
    base = base_url or GLDV2_BASE_URL
    base = base if base.endswith("/") else base + "/"
    hashed = {
        "split": split,
        "base_url": base,
        "root": os.fspath(Path(root).resolve()),
        "keep_tars": keep_tars,
    }
    conf = {**hashed, "retries": retries, "backoff": backoff, "timeout": timeout}
    stage = Stage(
        "gldv2-download",
        functools.partial(_gldv2_shard, conf=conf),
        conf=hashed,
        resources=resources or Resources(num_cpus=0.25),
        retries=2,
    )
    return stage, numbered_shards(shard_indices, tars_per_task, prefix="tars")


def url_list_shards(
    csv_path: str | os.PathLike[str], rows_per_shard: int, *, limit: int | None = None
) -> list[Shard]:
    """Shards of ``[id, url]`` rows of a GLDv1-style CSV (header with ``id`` and ``url``).

    ``limit``: only the first ``limit`` rows (smoke runs). Rows repeating an earlier id are left
    out (the first row wins; :func:`gldboxes.gld.download_url_list_sharded` reports them).
    """

    rows: list[list[str]] = []
    seen: set[str] = set()
    for n, (image_id, url, _) in enumerate(iter_url_rows(Path(csv_path))):
        if limit is not None and n >= limit:
            break
        if image_id not in seen:
            seen.add(image_id)
            rows.append([image_id, url])
    return make_shards(rows, rows_per_shard, prefix="urls")


def _url_list_shard(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Fetch one slice of a URL list; images are moved into the shared images tree."""

    images = Path(conf["images_dir"])

    def present(image_id: str) -> bool:
        try:
            return (images / image_relpath(image_id)).exists()
        except ValueError:  # a bad id: download_url_list lists it in failures.csv
            return False

    todo = [(i, u) for i, u in shard.items if not present(i)]
    sub = out / "urls.csv"
    with open(sub, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "url"])
        w.writerows(todo)
    fetched = out / "fetched"
    rep = download_url_list(
        sub,
        fetched,
        workers=int(conf["workers"]),
        max_size=conf["max_size"],
        quality=int(conf["quality"]),
        retries=int(conf["retries"]),
        backoff=float(conf["backoff"]),
        timeout=float(conf["timeout"]),
        progress=False,
    )
    moved = 0
    for p in sorted((fetched / "images").rglob("*.jpg")):
        dest = images / p.relative_to(fetched / "images")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)  # same filesystem: atomic; an image on disk is always complete
        moved += 1
    os.replace(fetched / "failures.csv", out / "failures.csv")
    shutil.rmtree(fetched)
    sub.unlink()
    return {
        "rows": len(shard.items),
        "downloaded": moved,
        "present": len(shard.items) - len(todo),
        "failed": rep.failed,
    }


def url_list_stage(
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rows_per_shard: int = 1000,
    workers: int = 8,
    max_size: int | None = None,
    quality: int = 90,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30.0,
    limit: int | None = None,
    resources: Resources | None = None,
) -> tuple[Stage, list[Shard]]:
    """The URL-list download as an executor stage: one task per ``rows_per_shard`` rows.

    Each task runs :func:`gldboxes.gld.download_url_list` on its rows not yet on disk
    (``workers`` threads) into its temporary folder, moves the images into
    ``out_dir/images/a/b/c/<id>.jpg`` and keeps its ``failures.csv`` (``id,url,reason``) in
    its shard folder. Run it with ``executor.run(stage, shards, out_dir / "shards")``.

    Returns:
        ``(stage, shards)``; the shard items are ``[id, url]`` rows (the first ``limit``).
    """
    hashed = {
        "csv": os.fspath(Path(csv_path).resolve()),
        "images_dir": os.fspath((Path(out_dir) / "images").resolve()),
        "max_size": max_size,
        "quality": quality,
    }
    conf = {
        **hashed,
        "workers": workers,
        "retries": retries,
        "backoff": backoff,
        "timeout": timeout,
    }
    stage = Stage(
        "url-download",
        functools.partial(_url_list_shard, conf=conf),
        conf=hashed,
        resources=resources or Resources(num_cpus=0.25),
        retries=2,
    )
    return stage, url_list_shards(csv_path, rows_per_shard, limit=limit)
