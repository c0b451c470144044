"""retrieval: local features, codebooks, ASMK-family kernels, inverted files and Revisited evaluation."""

import logging

logger = logging.getLogger("retrieval")
logger.addHandler(logging.NullHandler())
