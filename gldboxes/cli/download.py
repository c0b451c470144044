"""``gldboxes download``: GLDv2 tar shards (verified, resumable) and GLDv1-style URL lists.

Without ``--engine`` both download in threads of this process. With ``--engine serial|ray``
the work is cut into tasks (``--shard-size`` tar shards, or URL rows, per task) run by the
executor (:mod:`gldboxes.executor`; Ray: local, or a cluster through ``RAY_ADDRESS`` with
``--out`` on storage every node sees), each finished task marked by a ``done.json`` under
``OUT/.../shards/`` so a rerun skips it. GLDv2 comes from ``--base-url``, else
``$GLDBOXES_GLDV2_BASE_URL`` (a mirror; the README's commands run against one in the tests),
else the official bucket.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gldboxes.executor import Executor

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``download gldv2`` and ``download urls``."""
    from gldboxes.executor import add_engine_options

    parser = subparsers.add_parser(
        "download", help="download GLDv2 shards or a GLDv1-style URL list (resumable)"
    )
    sub = parser.add_subparsers(dest="download_command", metavar="SOURCE")
    sub.required = True

    g = sub.add_parser("gldv2", help="GLDv2 tar shards + metadata: md5-verified, then extracted")
    g.add_argument("--split", required=True, choices=["train", "index", "test"])
    g.add_argument("--out", required=True, help="data root; the split goes to OUT/SPLIT")
    g.add_argument("--shards", help="e.g. 0-9,12 (default: all shards of the split)")
    g.add_argument(
        "--base-url",
        help="mirror root (default: $GLDBOXES_GLDV2_BASE_URL, else the official S3 bucket)",
    )
    g.add_argument(
        "--workers", type=int, default=4, help="parallel shard transfers (without --engine)"
    )
    g.add_argument("--retries", type=int, default=5, help="retries per file")
    g.add_argument("--timeout", type=float, default=60.0, help="connect/read timeout, seconds")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait, seconds")
    g.add_argument("--keep-tars", action="store_true", help="keep shard tars after extraction")
    g.add_argument("--no-extract", action="store_true", help="only download and verify")
    g.add_argument("--no-metadata", action="store_true", help="skip the metadata CSVs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_options(g, shard_size=1, shard_unit="tar shards")
    g.set_defaults(func=_gldv2)

    u = sub.add_parser("urls", help="per-image download of an id,url[,landmark_id] CSV")
    u.add_argument("--csv", required=True, help="CSV with id and url columns")
    u.add_argument("--out", required=True, help="images go to OUT/images/a/b/c/<id>.jpg")
    u.add_argument(
        "--workers", type=int, default=16, help="parallel transfers (per task with --engine)"
    )
    u.add_argument("--max-size", type=int, help="downscale so the longer side is at most this")
    u.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoding")
    u.add_argument("--retries", type=int, default=3, help="retries per image (5xx, resets)")
    u.add_argument("--timeout", type=float, default=30.0, help="connect/read timeout, seconds")
    u.add_argument("--backoff", type=float, default=0.5, help="first retry wait, seconds")
    u.add_argument(
        "--skip-failed",
        action="store_true",
        help="do not retry ids listed in an earlier failures.csv",
    )
    u.add_argument("--limit", type=int, help="only the first N rows")
    u.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_options(u, shard_size=1000, shard_unit="URL rows")
    u.set_defaults(func=_urls)


def _executor(args: argparse.Namespace, work_dir: Path) -> Executor:
    """The ``--engine`` executor; ``--no-progress`` also silences its bar over tasks."""
    from gldboxes.executor import executor_from_args

    engine = executor_from_args(args, work_dir)
    engine.progress = engine.progress and not args.no_progress
    return engine


def _gldv2(args: argparse.Namespace) -> int:
    from gldboxes.gld import GLDV2_BASE_URL, download_gldv2
    from gldboxes.gld_stages import download_gldv2_sharded

    base_url = args.base_url or os.environ.get("GLDBOXES_GLDV2_BASE_URL") or GLDV2_BASE_URL
    if args.engine:
        if args.no_extract:
            raise ValueError(
                "--no-extract: the sharded download (--engine) always extracts verified tars; "
                "drop --engine to only download and verify"
            )
        with _executor(args, Path(args.out) / args.split / "shards") as engine:
            report = download_gldv2_sharded(
                args.split,
                args.out,
                engine,
                shards=args.shards,
                base_url=base_url,
                tars_per_task=args.shard_size,
                metadata=not args.no_metadata,
                keep_tars=args.keep_tars,
                retries=args.retries,
                backoff=args.backoff,
                timeout=args.timeout,
            )
    else:
        report = download_gldv2(
            args.split,
            args.out,
            shards=args.shards,
            base_url=base_url,
            workers=args.workers,
            metadata=not args.no_metadata,
            extract=not args.no_extract,
            keep_tars=args.keep_tars,
            retries=args.retries,
            backoff=args.backoff,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
    print(
        f"gldv2 {report.split}: {len(report.done)} shard(s) done now, {len(report.skipped)} "
        f"already done, {report.images} images extracted, manifest {report.manifest}"
    )
    if report.failed:
        print(f"FAILED ({len(report.failed)}): " + ", ".join(sorted(report.failed)))
        for name, reason in sorted(report.failed.items()):
            print(f"  {name}: {reason}")
        return 1
    return 0


def _urls(args: argparse.Namespace) -> int:
    from gldboxes.gld_stages import download_url_list_sharded
    from gldboxes.gld_urls import download_url_list

    if args.engine:
        with _executor(args, Path(args.out) / "shards") as engine:
            report = download_url_list_sharded(
                args.csv,
                args.out,
                engine,
                rows_per_shard=args.shard_size,
                workers=args.workers,
                max_size=args.max_size,
                quality=args.quality,
                retries=args.retries,
                backoff=args.backoff,
                timeout=args.timeout,
                retry_failed=not args.skip_failed,
                limit=args.limit,
            )
        print(
            f"{report.downloaded} downloaded, {report.present} already present, "
            f"{report.failed} failed (listed in {report.failures_csv}); "
            f"{len(report.shards_done)} task(s) run, {len(report.shards_skipped)} already done, "
            f"in {report.seconds:.1f} s{_duplicates(report.duplicates)}"
        )
        if report.failed_shards:
            print(f"FAILED tasks ({len(report.failed_shards)}), rerun to redo them:")
            for name, reason in sorted(report.failed_shards.items()):
                print(f"  {name}: {reason}")
            return 1
        return 0
    report = download_url_list(
        args.csv,
        args.out,
        workers=args.workers,
        max_size=args.max_size,
        quality=args.quality,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
        retry_failed=not args.skip_failed,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(
        f"{report.downloaded} downloaded, {report.present} already present, {report.failed} "
        f"failed (listed in {report.failures_csv}), {report.skipped_failed} earlier failures "
        f"skipped, in {report.seconds:.1f} s{_duplicates(report.duplicates)}"
    )
    return 0


def _duplicates(n: int) -> str:
    """``; N rows repeating an earlier id skipped`` when there were any."""
    return f"; {n} row(s) repeating an earlier id skipped (first row wins)" if n else ""
