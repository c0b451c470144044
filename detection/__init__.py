"""detection: landmark detectors with TensorFlow (imported lazily), AP@0.5 evaluation, inference."""

import logging

logger = logging.getLogger("detection")
logger.addHandler(logging.NullHandler())
