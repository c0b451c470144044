"""Progress bars for long work: tqdm, quiet where a bar would flood a log.

Every progress bar of the toolkit goes through :func:`tqdm`, which is ``tqdm.tqdm`` with two
rules on top:

* ``TQDM_DISABLE=1`` (tqdm's own variable) turns every bar off, even where the caller passes
  ``disable=False`` (tqdm itself only applies the variable to arguments left unset);
* when stderr is not a terminal (a log file, CI, a pipe, a notebook) a bar redraws at most
  every 10 s (``GLDBOXES_PROGRESS_INTERVAL`` seconds), not ten times a second, so a long stage
  writes a few lines instead of thousands.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm as _tqdm

__all__ = ["progress_disabled", "tqdm"]

_TRUE = ("1", "true", "yes", "on")


def progress_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no progress bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.tqdm(*args, **kwargs)`` with the rules of the module docstring."""
    if progress_disabled():
        kwargs["disable"] = True
    stream = kwargs.get("file") or sys.stderr
    if "mininterval" not in kwargs and not getattr(stream, "isatty", lambda: False)():
        try:
            kwargs["mininterval"] = float(os.environ.get("GLDBOXES_PROGRESS_INTERVAL", "10"))
        except ValueError:
            kwargs["mininterval"] = 10.0
        kwargs.setdefault("maxinterval", max(kwargs["mininterval"], 10.0))
    return _tqdm(*args, **kwargs)
