"""Entry point of the ``gldboxes`` command.

Each package owns its command-line face in a light module (``<package>/cli.py`` or
``gldboxes/cli/<name>.py``) exposing ``register(subparsers)``; those modules import only
argparse at import time so ``gldboxes --help`` stays fast. Heavy libraries (TensorFlow,
FiftyOne, Label Studio SDK) are imported inside the command functions.

Errors: an *expected* error (bad input, a missing or unreadable file, an unsafe file, the
network or a server not reachable; see :func:`expected_error`) ends the command with exit code 2
and one log line naming the file or thing and what to do. ``--debug`` (or ``GLDBOXES_DEBUG=1``)
adds the traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from gldboxes import __version__

__all__ = ["build_parser", "expected_error", "main"]

# Modules that register subcommands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "gldboxes.cli.synth",
    "gldboxes.cli.download",
    "gldboxes.cli.split",
    "gldboxes.cli.boxes",
    "gldboxes.cli.view",
    "detection.cli",
    "retrieval.cli",
    "annotation.cli",
    "gldboxes.cli.pipeline",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="gldboxes",
        description="Detect-to-Retrieve toolkit: landmark boxes, detectors and regional retrieval.",
    )
    parser.add_argument("--version", action="version", version=f"gldboxes {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-v info is the default, -vv debug)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an expected error too (or set GLDBOXES_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    """One stderr handler per package logger; calling again replaces it (no duplicates)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    )
    handler.set_name("gldboxes-cli")
    for name in ("gldboxes", "retrieval", "detection", "annotation"):
        lg = logging.getLogger(name)
        for old in [h for h in lg.handlers if h.get_name() == "gldboxes-cli"]:
            lg.removeHandler(old)
        lg.setLevel(level)
        lg.addHandler(handler)
        lg.propagate = False


# Advice appended to a failure to reach the network or a server.
_NETWORK_HINT = "check the network connection (or proxy) and that the server is up, then retry"


def expected_error(exc: BaseException) -> str | None:
    """The one-line message for an expected error, or ``None`` for a bug (keep its traceback).

    Expected: ``ValueError`` (bad input, including unsafe files), ``OSError`` (missing or
    unreadable files, full disks; ``ConnectionError``, ``URLError``, timeouts and ``requests``
    errors are ``OSError`` too), a failed download (:class:`gldboxes.http.DownloadError`),
    transport errors of ``httpx`` (Label Studio SDK) and ``pymongo`` (FiftyOne's database),
    shards that failed after their retries (``ShardFailedError``) and a server that did not
    start (``gldboxes.fodb.ServerStartError``).
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if _is_network_error(exc):
        url = _url_of(exc)
        if url and url not in text:
            text = f"{url}: {text}"
        # a permanent download failure (404, bad md5) says so itself: no network advice
        return text if getattr(exc, "permanent", False) else f"{text} ({_NETWORK_HINT})"
    if isinstance(exc, OSError):
        if exc.filename is not None and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        return text
    if isinstance(exc, ValueError):
        return text
    # failures the message already explains: shards that failed after retries (a rerun redoes
    # only them) and servers we start that did not come up (their log tail is in the message)
    for module, name in (
        ("gldboxes.executor", "ShardFailedError"),
        ("gldboxes.fodb", "ServerStartError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return text
    return None


def _is_network_error(exc: BaseException) -> bool:
    """A connection that failed, by type; libraries are only consulted when already imported."""
    import socket
    import urllib.error

    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror | urllib.error.URLError):
        return True
    checks = (
        ("requests", ("ConnectionError", "Timeout")),
        ("gldboxes.http", ("DownloadError",)),
        ("httpx", ("TransportError",)),
        ("pymongo.errors", ("ConnectionFailure",)),
    )
    for module, names in checks:
        mod = sys.modules.get(module)
        if mod is None:
            continue
        types = tuple(t for n in names if isinstance(t := getattr(mod, n, None), type))
        if types and isinstance(exc, types):
            return True
    return False


def _url_of(exc: BaseException) -> str | None:
    """The URL of the failed request (``requests`` and ``httpx`` errors carry it), or ``None``."""
    try:
        request = getattr(exc, "request", None)  # httpx raises RuntimeError when it is unset
    except Exception:
        return None
    url = getattr(request, "url", None)
    return str(url) if url else None


def _debug_requested(args: argparse.Namespace) -> bool:
    env = os.environ.get("GLDBOXES_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gldboxes`` command; returns the process exit code (2 for expected errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    log = logging.getLogger("gldboxes")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:
        message = expected_error(exc)
        if message is None:
            raise
        log.error("%s", message, exc_info=exc if _debug_requested(args) else None)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
