"""annotation: Label Studio box campaigns, quality control and automatic box estimation."""

import logging

logger = logging.getLogger("annotation")
logger.addHandler(logging.NullHandler())
