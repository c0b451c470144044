"""A local HTTP file server with fault injection, for testing downloaders (127.0.0.1 only).

Usage (tests import it as a plain module: pytest puts ``tests/`` on ``sys.path``)::

    from fault_server import Fault, FaultServer

    with FaultServer({"data/a.bin": payload}) as srv:
        srv.add_fault("data/a.bin", Fault(status=500, times=2))   # two 500s, then the file
        srv.add_fault("data/*.tar", Fault(drop_after=1000))        # glob patterns work
        download(srv.url("data/a.bin"))
        assert srv.hits("data/a.bin") == 3
        srv.stop()        # refuses connections and cuts open ones
        srv.start()       # serves again on the same port

Faults apply, in the order they were added, to the next ``times`` GET requests whose path
matches (``fnmatch``); ``times=None`` keeps a fault forever. Kinds (combinable):

- ``status``: answer with that HTTP status and a short text body instead of the file;
- ``drop_after``: send headers announcing the full length, ``drop_after`` body bytes, then
  close the socket (a connection dropped mid-file);
- ``corrupt``: serve the file with every byte inverted (same length, wrong checksum);
- ``delay``: sleep that many seconds before answering (client read timeouts);
- ``rate``: throttle the body to that many bytes per second (slow transfers);
- ``ignore_range``: answer 200 with the whole file even when a ``Range`` was asked.

``Range: bytes=a-`` and ``bytes=a-b`` are honoured with 206 and ``Content-Range`` (416 past the
end). Every request is logged on arrival in :attr:`FaultServer.log` as a :class:`Request` (its
``status`` and ``bytes_sent`` are filled in as it is answered).
"""

from __future__ import annotations

import fnmatch
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Fault", "FaultServer", "Request"]


@dataclass
class Fault:
    """One injected fault; see the module docstring for the kinds."""

    status: int | None = None
    drop_after: int | None = None
    corrupt: bool = False
    delay: float = 0.0
    rate: float | None = None
    ignore_range: bool = False
    times: int | None = 1
    used: int = field(default=0, init=False)

    def exhausted(self) -> bool:
        return self.times is not None and self.used >= self.times


@dataclass
class Request:
    """A logged request (logged on arrival, completed when answered).

    Attributes:
        path: without the leading slash; range_start: first byte asked for (``Range``);
        status: HTTP status sent (0 while pending); bytes_sent: body bytes written;
        fault: whether an injected fault applied.
    """

    path: str
    range_start: int | None
    status: int = 0
    bytes_sent: int = 0
    fault: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FaultServer

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.owner._lock:
            self.owner._conns.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self.owner._lock:
            self.owner._conns.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
    # the client's delayed ACK add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path).lstrip("/")
        data = owner._get_file(path)
        fault = None if head else owner._take_fault(path)
        start, end = self._parse_range()
        req = owner._record(Request(path, start, fault=fault is not None))
        try:
            self._answer(req, data, fault, start, end, head)
        except OSError:  # the client went away (timeout, reset): nothing more to send
            self.close_connection = True

    def _answer(
        self,
        req: Request,
        data: bytes | None,
        fault: Fault | None,
        start: int | None,
        end: int | None,
        head: bool,
    ) -> None:
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.status is not None:
            self._send_text(req, fault.status, f"injected {fault.status}\n")
            return
        if data is None:
            self._send_text(req, 404, "not found\n")
            return
        if fault and fault.corrupt:
            data = bytes(255 - b for b in data)
        status, first = 200, 0
        if start is not None and not (fault and fault.ignore_range):
            if start >= len(data):
                req.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            stop = len(data) if end is None else min(end + 1, len(data))
            body = data[start:stop]
            status, first = 206, start
        else:
            body = data
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        limit = len(body)
        if fault and fault.drop_after is not None:
            limit = min(limit, fault.drop_after)
        self._write(req, body[:limit], fault.rate if fault else None)
        if req.bytes_sent < len(body):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _write(self, req: Request, body: bytes, rate: float | None) -> None:
        step = 1 << 16 if rate is None else max(1, int(rate / 20))
        try:
            while req.bytes_sent < len(body):
                if self.server.owner._stopping.is_set():
                    break
                chunk = body[req.bytes_sent : req.bytes_sent + step]
                self.wfile.write(chunk)
                req.bytes_sent += len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)
            self.wfile.flush()
        except OSError:
            pass

    def _send_text(self, req: Request, status: int, text: str) -> None:
        body = text.encode()
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        req.bytes_sent = len(body)

    def _parse_range(self) -> tuple[int | None, int | None]:
        value = self.headers.get("Range")
        if not value or not value.startswith("bytes="):
            return None, None
        first, _, last = value[len("bytes=") :].split(",")[0].partition("-")
        try:
            return int(first), (int(last) if last.strip() else None)
        except ValueError:
            return None, None


class FaultServer:
    """Serve in-memory files (and optionally a directory) on 127.0.0.1 with injected faults.

    Args:
        files: ``{path: bytes}``, paths relative to the server root (no leading slash).
        root: also serve files below this directory (in-memory files take precedence).
        port: TCP port; 0 picks a free one (kept across :meth:`stop`/:meth:`start`).
    """

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        *,
        root: str | Path | None = None,
        port: int = 0,
    ) -> None:
        self._files: dict[str, bytes] = {k.lstrip("/"): bytes(v) for k, v in (files or {}).items()}
        self._root = Path(root) if root is not None else None
        self._faults: list[tuple[str, Fault]] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.log: list[Request] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultServer:
        """Start serving (again) on ``self.port``; returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.owner = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (mid-transfer ones too) and close."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def restart(self) -> None:
        """Stop, then start on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ content
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base_url + path.lstrip("/")

    def add_file(self, path: str, data: bytes) -> None:
        """Serve ``data`` at ``path`` (replacing any previous content)."""
        with self._lock:
            self._files[path.lstrip("/")] = bytes(data)

    def remove_file(self, path: str) -> None:
        """Stop serving ``path`` (404 from now on)."""
        with self._lock:
            self._files.pop(path.lstrip("/"), None)

    def add_fault(self, pattern: str, fault: Fault) -> Fault:
        """Inject ``fault`` into requests whose path matches the glob ``pattern``."""
        with self._lock:
            self._faults.append((pattern.lstrip("/"), fault))
        return fault

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    # ------------------------------------------------------------------ inspection
    def hits(self, pattern: str = "*") -> int:
        """Number of logged requests whose path matches ``pattern``."""
        with self._lock:
            return sum(fnmatch.fnmatchcase(r.path, pattern.lstrip("/")) for r in self.log)

    def requests(self, pattern: str = "*") -> list[Request]:
        """Logged requests whose path matches ``pattern``, in order."""
        with self._lock:
            return [r for r in self.log if fnmatch.fnmatchcase(r.path, pattern.lstrip("/"))]

    def bytes_sent(self, pattern: str = "*") -> int:
        """Body bytes sent for paths matching ``pattern``."""
        return sum(r.bytes_sent for r in self.requests(pattern))

    # ------------------------------------------------------------------ internals
    def _get_file(self, path: str) -> bytes | None:
        with self._lock:
            data = self._files.get(path)
        if data is None and self._root is not None:
            candidate = (self._root / path).resolve()
            if candidate.is_file() and self._root.resolve() in candidate.parents:
                data = candidate.read_bytes()
        return data

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for pattern, fault in self._faults:
                if not fault.exhausted() and fnmatch.fnmatchcase(path, pattern):
                    fault.used += 1
                    return fault
        return None

    def _record(self, req: Request) -> Request:
        with self._lock:
            self.log.append(req)
        return req
