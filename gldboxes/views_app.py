"""The FiftyOne App server on 127.0.0.1: :func:`start_app` and its :class:`AppServer`.

Serves the datasets of :mod:`gldboxes.views` (``gldboxes view ... --launch``). The database comes
first (:func:`gldboxes.fodb.database`); the App is a child process that dies with its parent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["AppServer", "start_app"]

logger = logging.getLogger("gldboxes.views_app")


# --------------------------------------------------------------------------- the App


class AppServer:
    """The FiftyOne App server (``fiftyone.server.main``) as a child process on 127.0.0.1.

    Starting the server module directly is ready in ~6 s (``fo.launch_app`` takes ~27 s here)
    and leaves nothing behind once :meth:`stop` has run. The child inherits the environment, so
    call :func:`gldboxes.fodb.configure_fiftyone` (or set ``FIFTYONE_DATABASE_URI``) first.
    It is killed when the process that started it dies (Linux), and a pidfile beside its log
    (``fiftyone-app-<port>.json``) lets the next :func:`start_app` on that port stop a server
    that outlived its starting command.

    Attributes:
        port: the TCP port.
        process: the server process.
        log_path: its log file.
        state_path: its pidfile (pid, port, owner).
    """

    def __init__(
        self,
        port: int,
        process: subprocess.Popen[bytes],
        log_path: Path,
        state_path: Path | None = None,
    ) -> None:
        self.port = port
        self.process = process
        self.log_path = log_path
        self.state_path = state_path

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def dataset_url(self, name: str) -> str:
        """The App page of dataset ``name`` (``/datasets/<slug>``)."""
        import fiftyone.core.utils as fou

        return f"{self.url}/datasets/{fou.to_slug(name)}"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``timeout`` s); idempotent."""
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            logger.info("FiftyOne App on port %d stopped", self.port)
        if self.state_path is not None:
            try:
                if json.loads(self.state_path.read_text()).get("pid") == proc.pid:
                    self.state_path.unlink()
            except (OSError, ValueError, AttributeError):
                pass

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_app(
    port: int | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
) -> AppServer:
    """Start the FiftyOne App server on 127.0.0.1 and wait until it serves its page.

    Args:
        port: TCP port; a free one by default.
        log_dir: where ``fiftyone-app-<port>.log`` goes (default: the system temp folder).
        timeout: seconds to wait for the first successful HTTP response.

    A server left on ``port`` by a command that died (its pidfile names a dead owner) is
    stopped first.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its log's end).
    """
    import tempfile
    import time
    import urllib.error
    import urllib.request

    from gldboxes.fodb import (
        ServerStartError,
        die_with_parent,
        free_port,
        owner_record,
        stop_orphan,
    )

    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        raise RuntimeError(
            "FIFTYONE_DATABASE_URI is not set; start the database first (gldboxes.fodb.database)"
        )
    port = free_port() if port is None else int(port)
    log_path = Path(log_dir or tempfile.gettempdir()) / f"fiftyone-app-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_path = log_path.with_suffix(".json")
    try:
        stale = json.loads(state_path.read_text())
    except (OSError, ValueError):
        stale = None
    marker = f"fiftyone.server.main --address 127.0.0.1 --port {port} "
    if isinstance(stale, dict) and stop_orphan(
        stale, marker=marker, what="FiftyOne App", timeout=5.0
    ):
        state_path.unlink(missing_ok=True)
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_DATABASE_VALIDATION": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fiftyone.server.main",
                "--address",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # SIGKILL: the App keeps no state, and its graceful shutdown can wait ~30 s for a
            # database that is going down with the same parent.
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
    app = AppServer(port, proc, log_path, state_path)
    tmp = state_path.with_name(f".{state_path.name}.tmp")
    state = {"format_version": 1, "pid": proc.pid, "port": port, **owner_record()}
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"FiftyOne App exited with code {proc.returncode}; {_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(app.url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            app.stop()
            raise ServerStartError(
                f"FiftyOne App did not answer on {app.url} within "
                f"{timeout:.0f} s; {_tail(log_path)}"
            )
        time.sleep(0.3)
    logger.info("FiftyOne App serving on %s (log %s)", app.url, log_path)
    return app


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "log tail: " + " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
