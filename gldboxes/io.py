"""Shared file conventions: atomic writes, versioned JSON, resolved configs beside outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "config_hash",
    "read_json",
    "read_tagged_json",
    "read_yaml",
    "write_config",
    "write_json",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A crash (or an exception in the ``with`` body) leaves ``path`` untouched and removes the
    temporary file, so nothing half-written is ever mistaken for a finished output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing
    folder there is removed first) and gets the usual 0755 mode.

    A crash (or an exception in the ``with`` body) leaves ``path`` untouched and removes the
    temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and atomically rename it onto ``path`` on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as fh:
        yield fh


def _write_text_if_changed(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` unless the file already holds exactly it (a rerun that
    produces the same content keeps the file and its time stamp)."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
        pass
    with atomic_write(path) as fh:
        fh.write(text)
    return path


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys for stable bytes) and return the path;
    an unchanged file is left as it is."""
    return _write_text_if_changed(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising ``ValueError`` that names the file when it is malformed."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_tagged_json(
    path: str | os.PathLike[str], fmt: str, version: int, what: str
) -> dict[str, Any]:
    """Read a JSON header of ours: an object whose ``format`` is ``fmt`` and whose
    ``format_version`` is ``version``.

    Raises:
        ValueError: malformed JSON, another format (``"PATH: not a gldboxes WHAT"``) or
            another version (both named).
    """
    path = Path(path)
    h = read_json(path)
    if not isinstance(h, dict) or h.get("format") != fmt:
        raise ValueError(f"{path}: not a gldboxes {what}")
    if h.get("format_version") != version:
        raise ValueError(
            f"{path}: format_version {h.get('format_version')!r} is not supported "
            f"(this gldboxes reads {version})"
        )
    return h


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file with the safe loader (plain data only; an empty file is ``None``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"FILE:LINE: ..."`` for a syntax error or a Python-object tag
            (``!!python/...``), which the safe loader refuses.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
        what = " ".join(str(problem).split())
        raise ValueError(f"{where}: not valid YAML for a config ({what})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc


def write_config(
    directory: str | os.PathLike[str], conf: Mapping[str, Any], *, name: str = "config.yaml"
) -> Path:
    """Write the resolved configuration of a stage as YAML beside its outputs (an unchanged
    file is left as it is)."""
    return _write_text_if_changed(
        Path(directory) / name, yaml.safe_dump(_plain(conf), sort_keys=True)
    )


def config_hash(conf: Mapping[str, Any], length: int = 12) -> str:
    """A short stable hash of a configuration (used in folder names and done-markers)."""
    blob = json.dumps(_plain(conf), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _plain(obj: Any) -> Any:
    """Convert tuples, paths and numpy scalars into YAML/JSON-friendly builtins."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
