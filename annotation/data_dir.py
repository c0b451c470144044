"""A Label Studio data dir as we read it: our files in it, its database, its permissions.

Besides Label Studio's own SQLite database, uploads and logs, a data dir (``--data-dir``, else
``$GLDBOXES_LS_DATA_DIR``, else ``runs/ls``: :func:`default_data_dir`) holds our files:
``gldboxes-settings.json`` (:func:`read_settings`: what the next start reuses),
``gldboxes-login.json`` (0600, :func:`read_login`, :func:`write_login`: the admin's e-mail and
password) and ``.gldboxes-token`` (0600, :func:`resolve_token`: the admin's API token). The
database is only ever read here, read-only (:func:`admin_token`, :func:`local_storage_paths`,
:func:`annotation_counts`); :func:`check_document_root` refuses a document root that would break
the image serving of its projects. The data dir is owner-only (``make_private``): its database
holds every user's API token.

Starting and stopping the server on a data dir is :mod:`annotation.server`.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from gldboxes.io import read_json

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "LOGIN_FILE",
    "SETTINGS_FILE",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "admin_email",
    "admin_token",
    "annotation_counts",
    "check_document_root",
    "database_path",
    "default_data_dir",
    "local_storage_paths",
    "make_private",
    "read_login",
    "read_settings",
    "resolve_token",
    "write_login",
    "write_token_file",
]

TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the token of an existing server (the SDK's own variable)
SETTINGS_FILE = "gldboxes-settings.json"  # document root, port, admin e-mail; kept across stops
LOGIN_FILE = "gldboxes-login.json"  # the admin's e-mail and password (0600)
TOKEN_FILE = ".gldboxes-token"
DATA_DIR_ENV = "GLDBOXES_LS_DATA_DIR"  # data dir of commands given no --data-dir
DEFAULT_DATA_DIR = Path("runs") / "ls"  # ... and without that variable (relative to the cwd)


def database_path(data_dir: Path) -> Path:
    """Label Studio's SQLite database in ``data_dir`` (it may not exist yet)."""
    return data_dir / "label_studio.sqlite3"


def make_private(data_dir: Path) -> None:
    """Create ``data_dir`` 0700 and take group/other bits off it and the files directly in it.

    Existing data dirs (made before this rule, or copied from a template) are fixed on every
    start; sub-folders (media, exports) are unreachable for others through the 0700 parent.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    for entry in data_dir.iterdir():
        st = entry.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            entry.chmod(stat.S_IMODE(st.st_mode) & ~0o077)


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` when given, else ``$GLDBOXES_LS_DATA_DIR``, else ``runs/ls`` (cwd-relative)."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env) if env else DEFAULT_DATA_DIR


def read_settings(data_dir: Path) -> dict[str, Any] | None:
    """What the last start of ``data_dir`` used (document root, port, admin e-mail), or ``None``."""
    path = Path(data_dir) / SETTINGS_FILE
    if not path.exists():
        return None
    obj = read_json(path)
    if not isinstance(obj, dict) or "document_root" not in obj:
        raise ValueError(f"{path}: not a gldboxes settings file (needs document_root)")
    return obj


def read_login(data_dir: Path) -> tuple[str, str] | None:
    """The admin's ``(e-mail, password)`` from ``<data_dir>/gldboxes-login.json``, or ``None``."""
    path = Path(data_dir) / LOGIN_FILE
    if not path.exists():
        return None
    obj = read_json(path)
    if not isinstance(obj, dict) or not obj.get("email") or not obj.get("password"):
        raise ValueError(f"{path}: not a gldboxes login file (needs email, password)")
    return str(obj["email"]), str(obj["password"])


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` created 0600 (atomically: a temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_login(data_dir: Path, email: str, password: str) -> Path:
    """Record the admin's login in ``<data_dir>/gldboxes-login.json`` (0600)."""
    import json

    body = {"format_version": 1, "email": email, "password": password}
    return _write_private(Path(data_dir) / LOGIN_FILE, json.dumps(body, indent=1) + "\n")


def _query_db(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the data dir's database (``[]`` when it has none)."""
    db = database_path(Path(data_dir))
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise ValueError(f"{db}: cannot read the Label Studio database ({exc})") from exc
    finally:
        con.close()


_ADMIN_SQL = (
    "SELECT u.email, t.key FROM htx_user u LEFT JOIN authtoken_token t ON t.user_id = u.id "
    "WHERE u.id = COALESCE((SELECT created_by_id FROM organization ORDER BY id LIMIT 1), "
    "(SELECT MIN(id) FROM htx_user WHERE is_superuser = 1))"
)


def admin_token(data_dir: Path) -> str | None:
    """The API token of the data dir's admin (the organisation's owner), from its database.

    ``None`` when the data dir has no database (or the admin no token) yet.
    """
    rows = _query_db(data_dir, _ADMIN_SQL)
    return str(rows[0][1]) if rows and rows[0][1] else None


def admin_email(data_dir: Path) -> str | None:
    """The e-mail of the admin in ``data_dir``'s database: the organisation's creator, else the
    first superuser (None: no database or no user yet).

    Raises:
        ValueError: when the database cannot be read.
    """
    rows = _query_db(data_dir, _ADMIN_SQL)
    return str(rows[0][0]) if rows else None


def local_storage_paths(data_dir: Path) -> list[tuple[int, Path]]:
    """``(project id, folder)`` of every local-files storage (import or export) in the database."""
    rows = _query_db(
        data_dir,
        "SELECT s.project_id, m.path FROM io_storages_localfilesmixin m JOIN "
        "(SELECT localfilesmixin_ptr_id AS id, project_id FROM io_storages_localfilesimportstorage "
        "UNION SELECT localfilesmixin_ptr_id, project_id FROM io_storages_localfilesexportstorage)"
        " s ON s.id = m.id ORDER BY s.project_id",
    )
    return [(int(pid), Path(path)) for pid, path in rows]


def annotation_counts(data_dir: Path) -> dict[int, dict[str, int]]:
    """``{user id: {"submitted": n, "skipped": n}}`` over all projects, from the database."""
    rows = _query_db(
        data_dir,
        "SELECT completed_by_id, SUM(was_cancelled = 0), SUM(was_cancelled = 1) "
        "FROM task_completion WHERE completed_by_id IS NOT NULL GROUP BY completed_by_id",
    )
    return {int(u): {"submitted": int(a), "skipped": int(b)} for u, a, b in rows}


def check_document_root(data_dir: Path, document_root: Path | None) -> None:
    """Refuse a document root that would break the image serving of the data dir's projects.

    Raises:
        ValueError: (one line) ``document_root`` is not a folder, or a project of ``data_dir``
            has a local-files storage whose folder does not lie under it (every image of that
            project would answer 403/404).
    """
    if document_root is not None and not Path(document_root).is_dir():
        raise ValueError(f"--document-root {document_root} is not a folder")
    storages = local_storage_paths(data_dir)
    if not storages:
        return
    remembered = (read_settings(data_dir) or {}).get("document_root")
    hint = f" (it was started with --document-root {remembered})" if remembered else ""
    if document_root is None:
        pid, folder = storages[0]
        raise ValueError(
            f"{data_dir}: project {pid} serves images from {folder}, so the server needs "
            f"--document-root holding that folder{hint}; refusing to start without it"
        )
    root = Path(document_root).resolve()
    for pid, folder in storages:
        if not folder.resolve().is_relative_to(root):
            raise ValueError(
                f"--document-root {document_root} does not hold {folder}, the image folder of "
                f"project {pid} in {data_dir}: its images would answer 404{hint}; refusing to start"
            )


def resolve_token(data_dir: Path | None = None) -> str:
    """The API token: ``$LABEL_STUDIO_API_KEY``, else ``<data_dir>/.gldboxes-token``.

    Raises:
        ValueError: neither is available (the message names both, never a token).
    """
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if data_dir is not None:
        path = Path(data_dir) / TOKEN_FILE
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
    raise ValueError(
        f"no Label Studio token: set ${TOKEN_ENV}"
        + (f" or start the server with --data-dir {data_dir}" if data_dir else "")
    )


def write_token_file(data_dir: Path, token: str) -> Path:
    """Store ``token`` in ``<data_dir>/.gldboxes-token`` (owner-only) and return that path."""
    return _write_private(Path(data_dir) / TOKEN_FILE, token)
