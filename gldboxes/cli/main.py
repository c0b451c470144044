"""Entry point of the ``gldboxes`` command.

Each package owns its command-line face in a light module (``<package>/cli.py`` or
``gldboxes/cli/<name>.py``) exposing ``register(subparsers)``; those modules import only
argparse at import time so ``gldboxes --help`` stays fast. Heavy libraries (TensorFlow,
FiftyOne, Label Studio SDK) are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gldboxes import __version__

__all__ = ["build_parser", "main"]

# Modules that register subcommands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "gldboxes.cli.synth",
    "gldboxes.cli.download",
    "gldboxes.cli.split",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gldboxes`` command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("gldboxes").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("gldboxes").error("interrupted")
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
