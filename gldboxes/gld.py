"""Google Landmarks downloads: GLDv2 tar shards (verified, resumable).

GLDv2 (https://github.com/cvdfoundation/google-landmark) is served as::

    BASE/{split}/images_XXX.tar              train: 500 shards, index: 100, test: 20
    BASE/md5sum/{split}/md5.images_XXX.txt   "<md5>  images_XXX.tar"
    BASE/metadata/*.csv, BASE/ground_truth/*.csv

:func:`download_gldv2` writes, under ``OUT/{split}/``::

    <metadata>.csv                 the split's CSVs (train.csv, train_clean.csv, ...)
    images/a/b/c/<id>.jpg          extracted images (only from verified shards)
    tars/images_XXX.tar            verified shards (removed after extraction unless kept)
    md5/md5.images_XXX.txt         the md5 lists
    manifest.json                  verified/extracted shards (format_version 1), written atomically

A shard counts as done only once its md5 matched and (by default) its images were moved into
place; a killed run resumes from the manifest without re-downloading verified shards, and a
partial ``.part`` file is resumed with an HTTP Range request. A shard failing its md5 check
makes the md5 list be fetched again once (a mirror may have fixed it since we cached it) before
the shard counts as bad. Shards that fail are reported, never extracted, and the command exits
non-zero naming them.

GLDv1-style URL lists (``id,url[,landmark_id]``, image by image) are :mod:`gldboxes.gld_urls`.

:mod:`gldboxes.gld_stages` does the same work task by task on an executor (``gldboxes download
... --engine serial|ray``): same images, manifest and ``failures.csv``, plus a ``shards/`` folder
of finished tasks. This module imports neither it nor :mod:`gldboxes.executor`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gldboxes.http import DownloadError, download_file, fetch_bytes, new_session
from gldboxes.io import atomic_write, read_json, write_json
from gldboxes.progress import tqdm

__all__ = [
    "GLDV2_BASE_URL",
    "GLDV2_METADATA",
    "GLDV2_SHARDS",
    "MANIFEST_VERSION",
    "GLDv2Report",
    "ShardManifest",
    "download_gldv2",
    "download_metadata",
    "download_shard_tar",
    "extract_shard",
    "fetch_shard_md5",
    "gldv2_setup",
    "image_relpath",
    "parse_md5_file",
    "parse_shard_spec",
    "shard_name",
]

logger = logging.getLogger("gldboxes.gld")

GLDV2_BASE_URL = "https://s3.amazonaws.com/google-landmark/"
GLDV2_SHARDS: dict[str, int] = {"train": 500, "index": 100, "test": 20}
# Metadata and solution files of each split, relative to the base URL.
GLDV2_METADATA: dict[str, tuple[str, ...]] = {
    "train": (
        "metadata/train.csv",
        "metadata/train_clean.csv",
        "metadata/train_attribution.csv",
        "metadata/train_label_to_category.csv",
        "metadata/train_label_to_hierarchical.csv",
    ),
    "index": (
        "metadata/index.csv",
        "metadata/index_image_to_landmark.csv",
        "metadata/index_label_to_category.csv",
        "metadata/index_label_to_hierarchical.csv",
    ),
    "test": (
        "metadata/test.csv",
        "ground_truth/recognition_solution_v2.1.csv",
        "ground_truth/retrieval_solution_v2.1.csv",
    ),
}
MANIFEST_VERSION = 1
_MEMBER_RE = re.compile(r"^[0-9a-zA-Z]/[0-9a-zA-Z]/[0-9a-zA-Z]/[^/]+\.jpg$")


# ------------------------------------------------------------------------------------ helpers
def shard_name(index: int) -> str:
    """``images_XXX.tar`` for a shard index."""
    return f"images_{index:03d}.tar"


def image_relpath(image_id: str) -> str:
    """The GLD layout ``a/b/c/<id>.jpg`` (first three characters of the id as folders)."""
    if len(image_id) < 3 or "/" in image_id or image_id.startswith("."):
        raise ValueError(f"image id {image_id!r} cannot be laid out as a/b/c/<id>.jpg")
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def parse_shard_spec(spec: str | None, n_shards: int) -> list[int]:
    """Parse ``"0-9,12,20-25"`` into sorted shard indices (``None``/``"all"``: every shard).

    Raises:
        ValueError: malformed spec or an index outside ``[0, n_shards)``.
    """
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n_shards))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--shards: {part!r} is not N or N-M (in {spec!r})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--shards: range {part!r} is backwards")
        if hi >= n_shards:
            raise ValueError(
                f"--shards: {hi} is out of range (this split has {n_shards} shards,"
                f" 0-{n_shards - 1})"
            )
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_md5_file(text: str, tar_name: str, *, source: str = "md5 file") -> str:
    """The md5 of ``tar_name`` from an md5sum listing (``"<md5>  images_000.tar"``).

    A single bare hash is accepted too.

    Raises:
        ValueError: no valid 32-hex-digit hash for ``tar_name`` in ``text``.
    """
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    for parts in lines:
        if len(parts) >= 2 and parts[-1].lstrip("*").endswith(tar_name):
            h = parts[0].lower()
            if re.fullmatch(r"[0-9a-f]{32}", h):
                return h
    if len(lines) == 1 and len(lines[0]) == 1 and re.fullmatch(r"[0-9a-fA-F]{32}", lines[0][0]):
        return lines[0][0].lower()
    raise ValueError(f"{source}: no md5 for {tar_name} in {text[:200]!r}")


def extract_shard(tar_path: str | os.PathLike[str], images_dir: str | os.PathLike[str]) -> int:
    """Extract a GLD shard's ``a/b/c/<id>.jpg`` members into ``images_dir``; returns the count.

    Members are written to a hidden staging folder and only then renamed into place, so an
    interrupted extraction never leaves a truncated image under its final name. Only regular
    files with relative, ``..``-free names are accepted.

    Raises:
        ValueError: an unsafe or unexpected member (naming the tar and the member), or a
            corrupt tar.
    """
    tar_path, images_dir = Path(tar_path), Path(images_dir)
    stage = images_dir / f".extract-{tar_path.stem}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    names: list[str] = []
    made: set[Path] = set()
    try:
        with tarfile.open(tar_path, "r|*") as tf:
            for member in tf:
                if member.isdir():
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                if not member.isfile():
                    raise ValueError(f"{tar_path}: member {member.name!r} is not a regular file")
                parts = Path(name).parts
                if Path(name).is_absolute() or ".." in parts or not parts:
                    raise ValueError(f"{tar_path}: unsafe member name {member.name!r}")
                if not _MEMBER_RE.match(name):
                    logger.warning(
                        "%s: member %r is not in the a/b/c/<id>.jpg layout", tar_path, member.name
                    )
                src = tf.extractfile(member)
                if src is None:
                    raise ValueError(f"{tar_path}: cannot read member {member.name!r}")
                dest = stage / name
                if dest.parent not in made:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    made.add(dest.parent)
                with open(dest, "wb") as fh:
                    shutil.copyfileobj(src, fh, 1 << 20)
                names.append(name)
    except tarfile.TarError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise ValueError(f"{tar_path}: not a readable tar ({exc})") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    made.clear()
    for name in names:
        final = images_dir / name
        if final.parent not in made:
            final.parent.mkdir(parents=True, exist_ok=True)
            made.add(final.parent)
        os.replace(stage / name, final)
    shutil.rmtree(stage, ignore_errors=True)
    return len(names)


def fetch_shard_md5(
    base: str,
    split: str,
    name: str,
    root: Path,
    *,
    session: Any,
    refresh: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> str:
    """The md5 of tar ``name`` from its md5 list, cached as ``root/md5/md5.images_XXX.txt``.

    The cached list is used when present; ``refresh`` fetches it again and replaces the cached
    copy (atomically, and only with a list that names a valid md5 for ``name``).

    Raises:
        DownloadError: the list could not be fetched; ValueError: it holds no md5 for ``name``
            (a cached copy is then deleted, so the next run fetches it again).
    """
    stem = name[: -len(".tar")]
    url = f"{base}md5sum/{split}/md5.{stem}.txt"
    path = root / "md5" / f"md5.{stem}.txt"
    policy: dict[str, Any] = {"retries": retries, "backoff": backoff, "timeout": timeout}
    if refresh:
        text = fetch_bytes(url, session=session, max_bytes=1 << 20, **policy).decode(
            "utf-8", "replace"
        )
        md5 = parse_md5_file(text, name, source=url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            fh.write(text)
        return md5
    download_file(url, path, session=session, **policy)
    try:
        return parse_md5_file(path.read_text("utf-8", "replace"), name, source=str(path))
    except ValueError:
        path.unlink(missing_ok=True)  # fetch it again next time
        raise


def download_shard_tar(
    base: str,
    split: str,
    name: str,
    root: Path,
    md5: str,
    *,
    session: Any,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[Path, str]:
    """Download tar ``name`` to ``root/tars/`` and check it against ``md5``.

    On the first md5 mismatch the md5 list is fetched again (a mirror may have fixed a wrong
    list that we cached): when the tar matches the fresh md5 it is kept as is, else the
    download is retried against the fresh md5.

    Returns:
        ``(tar path, the md5 it matched)``.

    Raises:
        DownloadError: see :func:`gldboxes.http.download_file`; ``permanent`` is set for a
            404/403/410 and for an md5 mismatch that outlived the refreshed list and retries.
    """
    policy: dict[str, Any] = {"retries": retries, "backoff": backoff, "timeout": timeout}
    current = [md5]

    def refresh() -> str:
        try:
            fresh = fetch_shard_md5(
                base, split, name, root, session=session, refresh=True, **policy
            )
        except (DownloadError, ValueError) as exc:
            logger.warning("%s: could not refetch its md5 list (%s)", name, exc)
            return current[0]
        if fresh != current[0]:
            logger.warning("%s: the mirror's md5 list changed (%s -> %s)", name, current[0], fresh)
        current[0] = fresh
        return fresh

    tar = download_file(
        f"{base}{split}/{name}",
        root / "tars" / name,
        md5=md5,
        session=session,
        on_bytes=on_bytes,
        refresh_md5=refresh,
        **policy,
    )
    return tar, current[0]


# -------------------------------------------------------------------------------- manifest
class ShardManifest:
    """Thread-safe, atomically written record of verified and extracted shards."""

    def __init__(self, path: Path, split: str, base_url: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {
            "format_version": MANIFEST_VERSION,
            "dataset": "gldv2",
            "split": split,
            "base_url": base_url,
            "shards": {},
        }
        if path.exists():
            old = read_json(path)
            if not isinstance(old, dict) or old.get("format_version") != MANIFEST_VERSION:
                raise ValueError(
                    f"{path}: not a gldboxes manifest of format_version {MANIFEST_VERSION}"
                )
            if old.get("split") != split:
                raise ValueError(
                    f"{path}: manifest is for split {old.get('split')!r}, not {split!r}"
                )
            self.data["shards"] = dict(old.get("shards", {}))

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self.data["shards"].get(name)
            return dict(entry) if entry else None

    def update(self, name: str, **fields: Any) -> None:
        with self._lock:
            entry = self.data["shards"].setdefault(name, {})
            entry.update(fields)
            write_json(self.path, self.data)


@dataclass
class GLDv2Report:
    """What :func:`download_gldv2` did.

    Attributes:
        done: shards finished in this run; skipped: shards already done before it;
        failed: ``{shard or file: reason}``; images: images extracted in this run;
        manifest: path of the manifest.
    """

    split: str
    root: Path
    manifest: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    metadata: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` when nothing failed."""
        return not self.failed


def download_gldv2(
    split: str,
    out_dir: str | os.PathLike[str],
    *,
    shards: Sequence[int] | str | None = None,
    base_url: str = GLDV2_BASE_URL,
    workers: int = 4,
    metadata: bool = True,
    extract: bool = True,
    keep_tars: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> GLDv2Report:
    """Download, verify and extract GLDv2 shards of ``split`` into ``out_dir/split``.

    Args:
        split: ``train``, ``index`` or ``test``.
        shards: indices, a spec like ``"0-9,12"``, or ``None`` for all.
        base_url: mirror root (default: the official S3 bucket).
        workers: parallel shard transfers (bounded thread pool sharing one connection pool).
        metadata: also fetch the split's metadata / solution CSVs.
        extract: extract verified shards to ``images/a/b/c/<id>.jpg``.
        keep_tars: keep shard tars after extraction (they are always kept without ``extract``).
        retries, backoff, timeout: per-file transfer policy (see ``gldboxes.http``).

    Returns:
        a :class:`GLDv2Report`; ``report.failed`` names every shard or file that failed (the
        function does not raise for them, so one bad shard never stops the others).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    indices, base, root, manifest, report = gldv2_setup(split, shards, base_url, out_dir)
    session = new_session(max(workers, 2))
    policy: dict[str, Any] = {"retries": retries, "backoff": backoff, "timeout": timeout}
    try:
        if metadata:
            download_metadata(split, base, root, session, policy, report)

        todo: list[str] = []
        for i in indices:
            name = shard_name(i)
            entry = manifest.get(name)
            if entry and entry.get("verified") and (entry.get("extracted") or not extract):
                report.skipped.append(name)
            else:
                todo.append(name)
        if report.skipped:
            logger.info(
                "%s: %d shard(s) already done, %d to do", split, len(report.skipped), len(todo)
            )

        bytes_bar = tqdm(
            total=None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"{split} bytes",
            disable=not progress,
            position=0,
        )
        shard_bar = tqdm(
            total=len(indices),
            initial=len(report.skipped),
            unit="shard",
            desc=f"{split} shards",
            disable=not progress,
            position=1,
        )

        def on_bytes(n: int) -> None:
            bytes_bar.update(n)

        def work(name: str) -> int:
            return _process_shard(
                name, split, base, root, manifest, session, policy, extract, keep_tars, on_bytes
            )

        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gld") as pool:
                futures = {pool.submit(work, name): name for name in todo}
                for fut in _as_completed(futures):
                    name = futures[fut]
                    try:
                        n = fut.result()
                    except (DownloadError, ValueError, OSError) as exc:
                        report.failed[name] = str(exc)
                        logger.error("%s failed: %s", name, exc)
                    else:
                        report.done.append(name)
                        report.images += n
                    shard_bar.update(1)
        finally:
            bytes_bar.close()
            shard_bar.close()
    finally:
        session.close()
    report.done.sort()
    return report


def _shard_indices(split: str, shards: Sequence[int] | str | None) -> list[int]:
    """Sorted tar indices of ``split`` from indices, a spec like ``"0-9,12"`` or None (all)."""
    if split not in GLDV2_SHARDS:
        raise ValueError(f"unknown GLDv2 split {split!r}; expected one of {list(GLDV2_SHARDS)}")
    n_total = GLDV2_SHARDS[split]
    if shards is None or isinstance(shards, str):
        return parse_shard_spec(shards, n_total)
    indices = sorted(set(int(i) for i in shards))
    bad = [i for i in indices if not 0 <= i < n_total]
    if bad:
        raise ValueError(f"shards {bad} out of range for {split} (0-{n_total - 1})")
    return indices


def gldv2_setup(
    split: str,
    shards: Sequence[int] | str | None,
    base_url: str,
    out_dir: str | os.PathLike[str],
) -> tuple[list[int], str, Path, ShardManifest, GLDv2Report]:
    """What both GLDv2 downloaders start from: tar indices, base URL (with a trailing ``/``),
    the split's folder (created), its manifest and an empty report.

    Raises:
        ValueError: when ``split`` is unknown or ``shards`` names tars out of its range.
    """
    indices = _shard_indices(split, shards)
    base = base_url if base_url.endswith("/") else base_url + "/"
    root = Path(out_dir) / split
    root.mkdir(parents=True, exist_ok=True)
    manifest = ShardManifest(root / "manifest.json", split, base)
    return (
        indices,
        base,
        root,
        manifest,
        GLDv2Report(split=split, root=root, manifest=manifest.path),
    )


def download_metadata(
    split: str, base: str, root: Path, session: Any, policy: dict[str, Any], report: GLDv2Report
) -> None:
    """Fetch the split's metadata CSVs into ``root``; failures go to ``report.failed``."""
    for rel in GLDV2_METADATA[split]:
        dest = root / rel.rsplit("/", 1)[1]
        try:
            download_file(base + rel, dest, session=session, **policy)
            report.metadata.append(dest.name)
        except DownloadError as exc:
            report.failed[rel] = str(exc)
            logger.error("metadata %s failed: %s", rel, exc)


def _as_completed(futures: dict[Future[int], str]) -> Iterator[Future[int]]:
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from finished


def _process_shard(
    name: str,
    split: str,
    base: str,
    root: Path,
    manifest: ShardManifest,
    session: Any,
    policy: dict[str, Any],
    extract: bool,
    keep_tars: bool,
    on_bytes: Callable[[int], None],
) -> int:
    """Download, verify and extract one shard; returns the number of images extracted."""
    md5 = fetch_shard_md5(base, split, name, root, session=session, **policy)
    tar = root / "tars" / name
    entry = manifest.get(name) or {}
    if not (entry.get("verified") and entry.get("md5") == md5 and tar.exists()):
        # download_file only renames the file into place after the md5 matched (it re-fetches
        # from scratch on a mismatch, and resumes a partial .part with Range).
        tar, md5 = download_shard_tar(
            base, split, name, root, md5, session=session, on_bytes=on_bytes, **policy
        )
        manifest.update(
            name,
            verified=True,
            md5=md5,
            bytes=tar.stat().st_size,
            extracted=False,
            verified_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
    if not extract:
        return 0
    n = extract_shard(tar, root / "images")
    manifest.update(name, extracted=True, images=n, tar_kept=keep_tars)
    if not keep_tars:
        tar.unlink(missing_ok=True)
    logger.info("%s: verified and extracted %d images", name, n)
    return n
