"""Committed chunk files: the kill-safe, resumable writing of the features stage.

Finished images are committed to small chunk files in ``<file>.partial.d/`` (each written under a
temporary name, closed, flushed and renamed, so a chunk torn by a kill is just discarded); a rerun
takes the images of committed chunks (:func:`committed_chunks`, :func:`held_images`), and
completion merges them into a temporary file renamed onto ``<file>`` (:func:`merge_chunks`). A
damaged file is named in one warning and its images are redone. :func:`retrieval.features.main`
drives these pieces.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py

from retrieval.features.h5 import (
    FEATURE_DATASETS,
    FORMAT_VERSION,
    H5_ERRORS,
    ExtractedFeatures,
    write_image,
)

__all__ = [
    "ChunkSources",
    "ChunkWriter",
    "committed_chunks",
    "held_images",
    "legacy_images",
    "merge_chunks",
]

logger = logging.getLogger("retrieval.features")

_CHUNK_PATTERN = re.compile(r"chunk-(\d{6,})\.h5")
_DATASET_LINKS = tuple(k.encode() for k in FEATURE_DATASETS)

#: Finished work not yet merged: files and the complete images to take from each, oldest first.
ChunkSources = list[tuple[Path, set[str]]]


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete(f: h5py.File, ids: Iterable[str]) -> tuple[set[str], list[str]]:
    """Of ``ids``, those an open features file holds complete (a group with the ``done``
    attribute and the four datasets) and those marked done that lack a dataset.

    Low-level h5py calls (about 0.1 ms per image, half of what ``name in f`` and
    ``f[name].attrs`` cost): this runs over every image whenever a finished stage is checked.
    """
    fid = f.id
    done: set[str] = set()
    broken: list[str] = []
    for n in ids:
        b = n.encode()
        try:
            if not fid.links.exists(b):
                continue
        except RuntimeError:  # a missing parent group of a nested id ("a/region_1")
            continue
        obj = h5py.h5o.open(fid, b)
        if not isinstance(obj, h5py.h5g.GroupID) or not h5py.h5a.exists(obj, b"done"):
            continue
        if all(obj.links.exists(k) for k in _DATASET_LINKS):
            done.add(n)
        else:
            broken.append(n)
    return done, broken


def _damaged_file(path: Path, what: str, exc: BaseException) -> None:
    """One warning naming a damaged file; the file is removed so that its images are redone."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    logger.warning(
        "%s: damaged %s, cannot be read (%s: %s); redoing its images",
        path,
        what,
        type(exc).__name__,
        msg,
    )
    path.unlink(missing_ok=True)


def held_images(path: Path, ids: Iterable[str], what: str) -> set[str] | None:
    """Of ``ids``, the images an existing features file holds complete; None (after one
    warning naming it, and its removal) when it is damaged. Images marked done but lacking a
    dataset are named in a warning and left out (redone)."""
    try:
        with h5py.File(path, "r") as f:
            done, broken = _complete(f, ids)
    except H5_ERRORS as exc:
        _damaged_file(path, what, exc)
        return None
    if broken:
        logger.warning(
            "%s: damaged %s, %d images marked done lack their features (first: %s); redoing them",
            path,
            what,
            len(broken),
            ", ".join(repr(n) for n in broken[:3]),
        )
    return done


def legacy_images(path: Path) -> set[str] | None:
    """The complete images of the single append-mode ``.partial`` file of earlier versions
    (None when a kill left it unreadable: warned and removed)."""
    try:
        with h5py.File(path, "r") as f:
            ids: list[str] = []
            f.visit(ids.append)
    except H5_ERRORS as exc:
        _damaged_file(path, "partial file", exc)
        return None
    return held_images(path, ids, "partial file")


def _chunk_images(path: Path) -> set[str] | None:
    """The images of a committed chunk (listed in its ``images`` attribute, each complete);
    None when the chunk is damaged (warned and removed)."""
    try:
        with h5py.File(path, "r") as f:
            ids = json.loads(str(f.attrs["images"]))
            done, _ = _complete(f, ids)
        if len(done) != len(ids):
            raise OSError(f"{len(ids) - len(done)} of its {len(ids)} images are incomplete")
    except (*H5_ERRORS, ValueError) as exc:
        _damaged_file(path, "committed chunk", exc)
        return None
    return done


def committed_chunks(folder: Path) -> tuple[ChunkSources, int]:
    """The committed chunks of a partial folder in commit order, with their images, and the
    next free chunk number. Torn chunks (uncommitted ``.tmp`` files, unreadable chunks) and
    an unfinished merge are removed."""
    if not folder.is_dir():
        return [], 0
    chunks: ChunkSources = []
    seq, torn = 0, 0
    for p in sorted(folder.iterdir()):
        m = _CHUNK_PATTERN.fullmatch(p.name)
        if m is None:
            if p.name.endswith(".tmp") and p.is_file():
                p.unlink()
                torn += 1
            continue
        seq = max(seq, int(m.group(1)) + 1)
        images = _chunk_images(p)
        if images is not None:
            chunks.append((p, images))
    if torn:
        logger.info("%s: discarded %d uncommitted file(s)", folder, torn)
    return chunks, seq


class ChunkWriter:
    """Writes finished images into ``<folder>/chunk-<seq>.h5`` files, each written under a
    temporary name and closed; a background thread flushes it to disk and renames it to its
    committed name (off the extraction thread). A chunk torn by a kill is a leftover ``.tmp``
    file, discarded on resume."""

    def __init__(
        self,
        folder: Path,
        conf_output: str,
        seq: int,
        *,
        commit_images: int,
        commit_seconds: float,
    ) -> None:
        self.folder = folder
        self.conf_output = conf_output
        self.seq = seq
        self.commit_images = commit_images  # commit a chunk when it holds this many images
        self.commit_seconds = commit_seconds  # or this many seconds after the last one
        self._names: list[str] = []
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._since = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[tuple[Path, set[str]]]] = []

    def add(self, name: str, feats: ExtractedFeatures, attrs: Mapping[str, Any]) -> None:
        """Write one finished image; commit the chunk when it is full or old enough."""
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".chunk-{self.seq:06d}.h5.tmp"
            self._file = h5py.File(self._tmp, "w")
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["conf"] = self.conf_output
        write_image(self._file, name, feats, attrs)
        self._names.append(name)
        if (
            len(self._names) >= self.commit_images
            or time.monotonic() - self._since >= self.commit_seconds
        ):
            self.commit()

    def commit(self) -> None:
        """Close the open chunk and hand it to the thread that flushes and renames it."""
        self._since = time.monotonic()
        if self._file is None or self._tmp is None:
            return
        self._file.attrs["images"] = json.dumps(self._names)
        self._file.close()
        path = self.folder / f"chunk-{self.seq:06d}.h5"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-commit")
        self._pending.append(self._pool.submit(_publish, self._tmp, path, set(self._names)))
        self._file, self._tmp, self._names = None, None, []
        self.seq += 1

    def wait(self) -> ChunkSources:
        """Wait for the commits in flight; the chunks this writer committed, in order."""
        try:
            return [fut.result() for fut in self._pending]
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def discard(self) -> None:
        """Drop the open, uncommitted chunk (after an error inside the file)."""
        if self._file is not None:
            try:
                self._file.close()
            except H5_ERRORS:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file, self._tmp, self._names = None, None, []


def _publish(tmp: Path, path: Path, names: set[str]) -> tuple[Path, set[str]]:
    _fsync(tmp)
    os.replace(tmp, path)
    return path, names


def _copy_image(src: h5py.File, dst: h5py.File, name: str) -> None:
    """Copy image ``name`` (datasets and attributes) from ``src`` into ``dst``, replacing
    what ``dst`` holds under that name but not the image groups nested in it (ids may
    contain ``/``)."""
    if name not in dst:
        src.copy(src[name], dst, name=name)  # one H5Ocopy of the group
        return
    g, s = dst[name], src[name]
    for key in [k for k, v in g.items() if isinstance(v, h5py.Dataset)]:
        del g[key]
    for key in list(g.attrs):
        del g.attrs[key]
    for key, obj in s.items():
        if isinstance(obj, h5py.Dataset):
            s.copy(obj, g, name=key)
    for key, value in s.attrs.items():
        g.attrs[key] = value


def merge_chunks(
    out: Path, base: bool, sources: ChunkSources, scratch: Path, conf_output: str
) -> None:
    """Write ``out``: a copy of the existing ``out`` (``base``) or a new file, plus the images
    of ``sources`` (a later source wins), as a temporary file in ``scratch`` flushed to disk
    and renamed onto ``out``."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / ".merged.h5.tmp"
    if base:
        shutil.copyfile(out, tmp)
    with h5py.File(tmp, "r+" if base else "w") as dst:
        dst.attrs["format_version"] = FORMAT_VERSION
        dst.attrs["conf"] = conf_output
        for path, ids in sources:
            with h5py.File(path, "r") as src:
                for n in sorted(ids):  # parents before the ids nested under them
                    _copy_image(src, dst, n)
    _fsync(tmp)
    os.replace(tmp, out)
    _fsync(out.parent)
