"""Label Studio server lifecycle: install into its own venv, initialise a data dir, start, stop.

The server (``label-studio==1.23.2``) pins a Django stack of its own, so it lives in a separate
virtualenv (``<repo>/.venv-labelstudio`` or ``$GLDBOXES_LABELSTUDIO_VENV``) and runs as a
subprocess bound to 127.0.0.1. A data dir holds the SQLite database, uploads, ``server.log`` and
``gldboxes-server.json`` (pid, port, URL; never the token).

Traps handled here (see ``../shared/design/STACK.md``):
- ``--enable-legacy-api-token`` only takes effect when the organisation is first created, so the
  data dir is initialised (``label-studio init``) with it; otherwise the preset token gets 401.
- The first start on an empty data dir runs 80-135 s of migrations; tests build a migrated
  *template* data dir once (:func:`template_data_dir`) and copy it (:func:`copy_data_dir`).
- Images are served from ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` only when local-files
  serving is enabled *and* the project has a Local Storage record (see ``annotation.campaign``).

The API token is read from the environment (``LABEL_STUDIO_API_KEY``) or, for a server we
started ourselves, from ``<data dir>/.gldboxes-token`` (mode 0600). It is never logged.

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
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from gldboxes.io import read_json, write_json

__all__ = [
    "LABEL_STUDIO_VERSION",
    "STATE_FILE",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "ServerSettings",
    "copy_data_dir",
    "ensure_installed",
    "free_port",
    "health",
    "init_data_dir",
    "new_token",
    "read_state",
    "resolve_token",
    "server_env",
    "start",
    "stop",
    "template_data_dir",
    "venv_dir",
    "wait_healthy",
]

logger = logging.getLogger("annotation.server")

LABEL_STUDIO_VERSION = "1.23.2"
VENV_ENV = "GLDBOXES_LABELSTUDIO_VENV"  # overrides <repo>/.venv-labelstudio
TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the token of an existing server (the SDK's own variable)
STATE_FILE = "gldboxes-server.json"
TOKEN_FILE = ".gldboxes-token"
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
    _make_private(settings.data_dir)
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
    return settings.data_dir


def _db_path(data_dir: Path) -> Path:
    return data_dir / "label_studio.sqlite3"


def _make_private(data_dir: Path) -> None:
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
    exe = ensure_installed(venv)
    if not _db_path(settings.data_dir).exists():
        logger.info(
            "initialising %s (migrations take 1-2 minutes on first start)", settings.data_dir
        )
        init_data_dir(settings, venv=venv)
    _make_private(settings.data_dir)
    if write_token:
        _write_token(settings.data_dir, settings.token)
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


def _write_token(data_dir: Path, token: str) -> Path:
    path = Path(data_dir) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token)
    return path


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
