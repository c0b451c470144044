"""Lazy TensorFlow import with quiet logs (the only place that sets TF's log levels)."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["import_tf"]


def import_tf() -> Any:
    """Import TensorFlow (and quiet absl/TF INFO chatter unless ``detection`` logs at DEBUG).

    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (hides the harmless "no CUDA" lines) when unset.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from absl import logging as absl_logging

    debug = logging.getLogger("detection").getEffectiveLevel() <= logging.DEBUG
    absl_logging.set_verbosity(absl_logging.INFO if debug else absl_logging.WARNING)
    tf.get_logger().setLevel(logging.INFO if debug else logging.ERROR)
    return tf
