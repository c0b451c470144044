"""retrieval: local features, codebooks, ASMK kernels, inverted files, Revisited evaluation."""

import logging

logger = logging.getLogger("retrieval")
logger.addHandler(logging.NullHandler())
