"""gldboxes: the Google Landmark Boxes toolkit (dataset, synthetic world, shared I/O and CLI)."""

from __future__ import annotations

import logging

__all__ = ["__version__", "logger"]

__version__ = "0.1.0"

logger = logging.getLogger("gldboxes")
logger.addHandler(logging.NullHandler())
