"""Label Studio server lifecycle: install into its own venv, initialise a data dir, start, stop.

The server (``label-studio==1.23.2``) pins a Django stack of its own, so it lives in a separate
virtualenv (``<repo>/.venv-labelstudio`` or ``$GLDBOXES_LABELSTUDIO_VENV``) and runs as a
subprocess bound to 127.0.0.1. A data dir (``--data-dir``, else ``$GLDBOXES_LS_DATA_DIR``, else
``runs/ls``: :func:`default_data_dir`) holds the SQLite database, uploads, ``server.log`` and our
own files:

- ``gldboxes-server.json``: the running server (pid, port, URL, document root); removed on stop.
- ``gldboxes-settings.json``: what the next start reuses (document root, port, admin e-mail);
  kept across stops, so ``annotate server start`` needs ``--document-root`` only once.
- ``gldboxes-login.json`` (0600): the admin's e-mail and password, written once when the data
  dir is initialised (password from ``$GLDBOXES_LS_PASSWORD`` or random); shown by
  ``annotate server info`` so the lead can log into the web UI.
- ``.gldboxes-token`` (0600): the admin's API token, re-read from the database on every start
  (Label Studio keeps the token it was initialised with; a new one would answer 401).

A start that would break image serving is refused: when a project of the data dir has a
local-files storage, the document root must exist and hold its folder (otherwise every image
answers 403/404).

Traps handled here (see ``../shared/design/STACK.md``):
- ``--enable-legacy-api-token`` only takes effect when the organisation is first created, so the
  data dir is initialised (``label-studio init``) with it; otherwise the preset token gets 401.
- The first start on an empty data dir runs 80-135 s of migrations; tests build a migrated
  *template* data dir once (:func:`template_data_dir`) and copy it (:func:`copy_data_dir`).
- Images are served from ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` only when local-files
  serving is enabled *and* the project has a Local Storage record (see ``annotation.campaign``).

The API token is read from the environment (``LABEL_STUDIO_API_KEY``) or, for a server we
started ourselves, from ``<data dir>/.gldboxes-token`` (mode 0600). It is never logged.

Our files in the data dir and the read-only queries of its database are
:mod:`annotation.data_dir`; its public names are importable from here too.

The data dir is owner-only: its SQLite database holds every user's API token. :func:`start`
and :func:`init_data_dir` make it 0700 and its files 0600 (also those of a data dir copied
or made earlier) and run Label Studio with umask 077. Its output reaches ``server.log`` /
``init.log`` (0600) through :mod:`annotation.logpipe`, which masks credential values: Label
Studio's request log otherwise records the organisation's invite link
(``/user/signup/?token=...``), with which anyone can join.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests

from annotation.data_dir import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    LOGIN_FILE,
    SETTINGS_FILE,
    TOKEN_ENV,
    TOKEN_FILE,
    admin_email,
    admin_token,
    annotation_counts,
    check_document_root,
    database_path,
    default_data_dir,
    local_storage_paths,
    make_private,
    read_login,
    read_settings,
    resolve_token,
    write_login,
    write_token_file,
)
from gldboxes.io import read_json, write_json

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "LABEL_STUDIO_VERSION",
    "LOGIN_FILE",
    "PASSWORD_ENV",
    "SETTINGS_FILE",
    "STATE_FILE",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "ServerSettings",
    "admin_token",
    "annotation_counts",
    "check_document_root",
    "copy_data_dir",
    "default_data_dir",
    "ensure_installed",
    "free_port",
    "health",
    "init_data_dir",
    "local_storage_paths",
    "new_token",
    "read_login",
    "read_settings",
    "read_state",
    "resolve_settings",
    "resolve_token",
    "server_env",
    "start",
    "stop",
    "template_data_dir",
    "venv_dir",
    "wait_healthy",
    "write_login",
]

logger = logging.getLogger("annotation.server")

LABEL_STUDIO_VERSION = "1.23.2"
VENV_ENV = "GLDBOXES_LABELSTUDIO_VENV"  # overrides <repo>/.venv-labelstudio
STATE_FILE = "gldboxes-server.json"  # the running server; removed on stop
PASSWORD_ENV = "GLDBOXES_LS_PASSWORD"  # admin password on first start (default: random)
DEFAULT_ADMIN = "admin@localhost"
DEFAULT_PORT = 8080
STATE_FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs the server with its output redacted into an owner-only log (stdlib-only script).
LOGPIPE = Path(__file__).resolve().with_name("logpipe.py")
# umask of the server process: what it creates in the data dir is owner-only.
SERVER_UMASK = 0o077


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How to run one Label Studio server.

    Attributes:
        data_dir: ``LABEL_STUDIO_BASE_DATA_DIR`` (database, media, log, state file).
        port: TCP port on ``host``.
        username: the admin's e-mail (Label Studio logs in with e-mails).
        password: the admin's password.
        token: the admin's API token (legacy token, > 5 characters).
        document_root: folder served by local-files storage (images must live under it);
            ``None`` disables local-files serving.
        host: bind address; 127.0.0.1 only, unless you know what you are doing.
    """

    data_dir: Path
    port: int
    username: str
    password: str
    token: str
    document_root: Path | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"


def venv_dir() -> Path:
    """The server venv: ``$GLDBOXES_LABELSTUDIO_VENV`` or ``<repo>/.venv-labelstudio``."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else REPO_ROOT / ".venv-labelstudio"


def ensure_installed(venv: Path | None = None, version: str = LABEL_STUDIO_VERSION) -> Path:
    """Install ``label-studio==version`` into its own venv on first use; return its executable.

    Takes a few minutes the first time (pip resolves ~1 GB of Django stack); later calls only
    check ``<venv>/bin/label-studio`` and the installed version.
    """
    venv = venv or venv_dir()
    exe = venv / "bin" / "label-studio"
    python = venv / "bin" / "python"
    if exe.exists() and _installed_version(python) == version:
        return exe
    logger.info(
        "installing label-studio==%s into %s (first use; takes a few minutes)", version, venv
    )
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"label-studio=={version}"], check=True
    )
    if not exe.exists():
        raise ValueError(f"{venv}: pip finished but bin/label-studio is missing")
    return exe


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def server_env(settings: ServerSettings) -> dict[str, str]:
    """Environment of the server process: data dir, admin, token, offline and quiet settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(settings.data_dir.resolve()),
            "LABEL_STUDIO_USERNAME": settings.username,
            "LABEL_STUDIO_PASSWORD": settings.password,
            "LABEL_STUDIO_USER_TOKEN": settings.token,
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.document_root is not None:
        env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
        env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(settings.document_root.resolve())
    return env


def init_data_dir(settings: ServerSettings, *, venv: Path | None = None) -> Path:
    """Run migrations and create the admin (with legacy tokens enabled) in ``settings.data_dir``.

    Slow on an empty data dir (80-135 s of migrations); a no-op-ish second time.
    """
    exe = ensure_installed(venv)
    settings = replace(settings, data_dir=Path(settings.data_dir).resolve())
    make_private(settings.data_dir)
    log = settings.data_dir / "init.log"
    proc = subprocess.run(
        _logged(log, [str(exe), "init", "--no-browser", "--enable-legacy-api-token", "--quiet"]),
        env=server_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        cwd=settings.data_dir,
        stdin=subprocess.DEVNULL,
        umask=SERVER_UMASK,
    )
    if proc.returncode != 0:
        raise ValueError(f"{settings.data_dir}: label-studio init failed (see {log})")
    if read_login(settings.data_dir) is None:
        write_login(settings.data_dir, settings.username, settings.password)
    return settings.data_dir


def _logged(log: Path, cmd: list[str]) -> list[str]:
    """``cmd`` wrapped by :mod:`annotation.logpipe`: output redacted into ``log`` (0600)."""
    return [sys.executable, "-I", str(LOGPIPE), str(log), "--", *cmd]


def start(
    settings: ServerSettings,
    *,
    venv: Path | None = None,
    timeout: float = 300.0,
    write_token: bool = False,
) -> dict[str, Any]:
    """Start Label Studio in the background and wait until ``GET /health`` answers.

    Initialises the data dir first when it has no database and makes it owner-only. The process
    runs in its own session (it outlives the caller; stop it with :func:`stop`) with umask 077.
    Its output goes, credentials masked, to ``<data_dir>/server.log`` (0600) through
    :mod:`annotation.logpipe`, the leader of the server's process group (``pid`` in the state).

    Args:
        write_token: also store the token in ``<data_dir>/.gldboxes-token`` (mode 0600) so later
            commands can find it without an environment variable.

    Returns:
        The state written to ``<data_dir>/gldboxes-server.json``: ``pid``, ``port``, ``url``.
    """
    # absolute: the server and its log pipe run with the data dir as working directory
    settings = replace(settings, data_dir=Path(settings.data_dir).resolve())
    if settings.host != "127.0.0.1":
        logger.warning("binding Label Studio to %s, not 127.0.0.1", settings.host)
    if len(settings.token) <= 5:
        raise ValueError("Label Studio token must be longer than 5 characters")
    state = read_state(settings.data_dir)
    if state is not None and _pid_alive(int(state["pid"])):
        raise ValueError(
            f"{settings.data_dir}: a server already runs from it (pid {state['pid']}, "
            f"{state['url']}); stop it first"
        )
    if _port_in_use(settings.host, settings.port):
        raise ValueError(f"port {settings.port} on {settings.host} is already in use")
    check_document_root(settings.data_dir, settings.document_root)
    exe = ensure_installed(venv)
    if not database_path(settings.data_dir).exists():
        logger.info(
            "initialising %s (migrations take 1-2 minutes on first start)", settings.data_dir
        )
        init_data_dir(settings, venv=venv)
    else:
        # Label Studio keeps the admin and token it was initialised with; LABEL_STUDIO_USER_TOKEN
        # and _PASSWORD are ignored from then on, so the token to use is the database's.
        token = admin_token(settings.data_dir)
        if token is not None and token != settings.token:
            logger.info("using the admin token recorded in %s", settings.data_dir)
            settings = replace(settings, token=token)
        if read_login(settings.data_dir) is None:
            _reset_admin_password(settings, exe)
    make_private(settings.data_dir)
    if write_token:
        write_token_file(settings.data_dir, settings.token)
    write_json(
        settings.data_dir / SETTINGS_FILE,
        {
            "format_version": STATE_FORMAT_VERSION,
            "document_root": None
            if settings.document_root is None
            else str(settings.document_root.resolve()),
            "port": settings.port,
            "username": settings.username,
        },
    )
    cmd = [
        str(exe),
        "start",
        "--no-browser",
        "--internal-host",
        settings.host,
        "--port",
        str(settings.port),
        "--enable-legacy-api-token",
    ]
    proc = subprocess.Popen(
        _logged(settings.data_dir / "server.log", cmd),
        env=server_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=settings.data_dir,
        start_new_session=True,
        umask=SERVER_UMASK,
    )
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "pid": proc.pid,
        "port": settings.port,
        "host": settings.host,
        "url": settings.url,
        "version": LABEL_STUDIO_VERSION,
        "document_root": None
        if settings.document_root is None
        else str(settings.document_root.resolve()),
    }
    write_json(settings.data_dir / STATE_FILE, state)
    try:
        wait_healthy(settings.url, timeout=timeout, process=proc)
    except Exception:
        _terminate(proc.pid, timeout=20.0)
        (settings.data_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    logger.info("Label Studio %s up at %s (pid %d)", LABEL_STUDIO_VERSION, settings.url, proc.pid)
    return state


def resolve_settings(
    data_dir: Path,
    *,
    port: int | None = None,
    document_root: str | os.PathLike[str] | None = None,
    username: str | None = None,
) -> ServerSettings:
    """Settings of the next start of ``data_dir``: given values, else what it remembers.

    - document root and port: given, else ``gldboxes-settings.json``, else none / 8080;
    - admin: the login file's (or the database's) e-mail; on a new data dir ``username`` (default
      ``admin@localhost``) with ``$GLDBOXES_LS_PASSWORD`` or a random password;
    - token: the admin's token in the database; on a new data dir ``$LABEL_STUDIO_API_KEY`` or a
      fresh one.

    Raises:
        ValueError: ``username`` differs from the data dir's existing admin.
    """
    data_dir = Path(data_dir)
    remembered = read_settings(data_dir) or {}
    login = read_login(data_dir)
    existing = login[0] if login else admin_email(data_dir)
    if username and existing and username != existing:
        raise ValueError(
            f"--username {username}: the admin of {data_dir} is {existing} (drop --username)"
        )
    env_password = os.environ.get(PASSWORD_ENV, "")
    if login is not None:
        password = login[1]
        if env_password and env_password != password:
            logger.warning(
                "$%s is ignored: the admin of %s exists (its password is in %s)",
                PASSWORD_ENV,
                data_dir,
                data_dir / LOGIN_FILE,
            )
    else:
        password = env_password or secrets.token_urlsafe(12)
    token = admin_token(data_dir) or os.environ.get(TOKEN_ENV, "").strip() or new_token()
    root = document_root if document_root is not None else remembered.get("document_root")
    return ServerSettings(
        data_dir=data_dir,
        port=int(port or remembered.get("port") or DEFAULT_PORT),
        username=existing or username or DEFAULT_ADMIN,
        password=password,
        token=token,
        document_root=None if root is None else Path(root),
    )


def _reset_admin_password(settings: ServerSettings, exe: Path) -> None:
    """Give the admin of a data dir without a login file ``settings.password`` and record it.

    Data dirs made before the login file existed (or by ``gldboxes pipeline --annotation``
    runs of older versions) have an admin whose random password was never shown.
    """
    email = admin_email(settings.data_dir)
    if email is None:
        return
    log = settings.data_dir / "init.log"
    proc = subprocess.run(
        _logged(
            log,
            [str(exe), "reset_password", "--username", email, "--password", settings.password],
        ),
        env=server_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        cwd=settings.data_dir,
        stdin=subprocess.DEVNULL,
        umask=SERVER_UMASK,
    )
    if proc.returncode != 0:
        raise ValueError(f"{settings.data_dir}: resetting the admin password failed (see {log})")
    write_login(settings.data_dir, email, settings.password)
    logger.info("admin %s of %s: new password written to %s", email, settings.data_dir, LOGIN_FILE)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The state file of a server started from ``data_dir``, or ``None``."""
    path = Path(data_dir) / STATE_FILE
    if not path.exists():
        return None
    state = read_json(path)
    if not isinstance(state, dict) or "pid" not in state or "url" not in state:
        raise ValueError(f"{path}: not a gldboxes server state file (needs pid, url)")
    return state


def stop(data_dir: Path, *, timeout: float = 30.0) -> bool:
    """Stop the server started from ``data_dir`` (SIGTERM to its process group, then SIGKILL).

    Returns:
        ``True`` when a running server was stopped, ``False`` when none was running.
    """
    state = read_state(Path(data_dir))
    if state is None:
        return False
    pid = int(state["pid"])
    was_alive = _pid_alive(pid)
    if was_alive:
        _terminate(pid, timeout=timeout)
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return was_alive


def _terminate(pid: int, *, timeout: float) -> None:
    """SIGTERM the process group led by ``pid`` (our server), wait, then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.2)
    logger.warning("Label Studio pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while _pid_alive(pid) and time.monotonic() < deadline + 10:
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it has exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
        if proc_stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def health(url: str, *, timeout: float = 5.0) -> dict[str, Any] | None:
    """``GET <url>/health`` as JSON (``{"status": "UP"}``), or ``None`` when unreachable."""
    try:
        resp = requests.get(url.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException:
        return None
    if resp.status_code != 200:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def wait_healthy(
    url: str, *, timeout: float = 300.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``/health`` until it reports UP; raise ``ValueError`` on timeout or process exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = health(url, timeout=2.0)
        if body is not None and body.get("status") == "UP":
            return
        if process is not None and process.poll() is not None:
            raise ValueError(
                f"Label Studio exited with code {process.returncode} before "
                f"{url}/health answered (see its server.log)"
            )
        time.sleep(0.5)
    raise ValueError(f"Label Studio at {url} not healthy after {timeout:.0f} s")


def new_token() -> str:
    """A fresh random API token (40 hex characters, as Label Studio's own)."""
    return secrets.token_hex(20)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def template_data_dir(
    cache_root: Path,
    *,
    username: str,
    password: str,
    token: str,
    venv: Path | None = None,
    version: str = LABEL_STUDIO_VERSION,
) -> Path:
    """A migrated data dir with the admin created, built once and cached under ``cache_root``.

    Keyed by Label Studio version and admin e-mail (``<cache_root>/<version>-<hash>/``); a file
    lock makes concurrent test sessions build it once. Copy it with :func:`copy_data_dir`
    before starting a server on it.
    """
    import hashlib

    key = hashlib.sha256(f"{username}\0{token}".encode()).hexdigest()[:10]
    target = Path(cache_root) / f"{version}-{key}"
    with _locked(Path(cache_root) / f".{version}-{key}.lock"):
        if (target / "complete.json").exists():
            return target
        tmp = Path(cache_root) / f".{version}-{key}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        settings = ServerSettings(
            data_dir=tmp, port=0, username=username, password=password, token=token
        )
        t0 = time.monotonic()
        init_data_dir(settings, venv=venv)
        write_json(
            tmp / "complete.json",
            {
                "format_version": 1,
                "version": version,
                "username": username,
                "seconds": round(time.monotonic() - t0, 1),
            },
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        logger.info(
            "built Label Studio template data dir %s in %.0f s", target, time.monotonic() - t0
        )
    return target


def copy_data_dir(template: Path, dest: Path) -> Path:
    """Copy a template data dir to ``dest`` (which must not exist yet)."""
    if dest.exists():
        raise ValueError(f"{dest}: already exists; refusing to overwrite a data dir")
    shutil.copytree(
        template, dest, ignore=shutil.ignore_patterns(STATE_FILE, "*.log", "complete.json")
    )
    return dest
