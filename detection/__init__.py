"""detection: landmark detectors with TensorFlow (imported lazily), AP@0.5 evaluation, inference.

Stages (each a module with a typed ``main``; the CLI is ``gldboxes detect STEP``):

=================  =========================================================================
``records``        boxes CSV + images -> sharded TFRecords (TF detection tf.Example layout)
``configs``        presets ``ssd_mobilenetv2``, ``frcnn_resnet50``, ``tiny_cpu`` on Model Garden
``train``          Orbit training loop: checkpoints, resume, TensorBoard, progress bar
``evaluate``       AP@0.5 + COCO sweep of a checkpoint, or of any boxes CSV (NumPy + pycocotools)
``export``         SavedModel with a documented ``serving_default`` signature
``card``           the export's model card ``detector.json``: training data, AP@0.5, ``fit_for``
``inference``      batch detection -> ``id,box,score`` CSV; also loads the authors' TF1 export
=================  =========================================================================
"""

import logging

logger = logging.getLogger("detection")
logger.addHandler(logging.NullHandler())
