"""Export a trained detector as a SavedModel with a documented serving signature.

Layout of ``RUN/export-step<N>/`` (or the folder given)::

    saved_model.pb, variables/   the SavedModel (Model Garden's DetectionModule)
    params.yaml                  the Model Garden experiment config
    detector.json                the model card (``detection.card``): preset, checkpoint,
                                 signature, training steps and data (synthetic world or
                                 not), validation AP@0.5, ``fit_for`` and ``warning``

Signature ``serving_default`` (the ``SIGNATURE`` dict below, also written to
``detector.json``)::

    inputs              uint8   [1, H, W, 3]   one RGB image of any size (resized inside,
                                               aspect ratio kept, padded)
    detection_boxes     float32 [1, K, 4]      ymin, xmin, ymax, xmax in pixels of the *resized*
                                               input: divide by image_info[:, 2] (scale) for
                                               original pixels, then by image_info[:, 0]
    detection_scores    float32 [1, K]         landmark confidence, sorted descending
    detection_classes   int32   [1, K]         1 = landmark (0 is the background)
    num_detections      int32   [1]            valid rows of the K (K = max_detections)
    image_info          float32 [1, 4, 2]      [[orig h, w], [scaled h, w], [scale y, x],
                                                [offset y, x]]

``detection.inference.load_detector`` reads this layout (and the authors' TF1 export) and
returns normalised ``ymin xmin ymax xmax`` boxes.

Load time: Model Garden's ``export_inference_graph`` saves its ``DetectionModule`` object,
Keras model included, so the SavedModel also holds every Keras layer's traced call functions,
and ``tf.saved_model.load`` rebuilds each of them before the signature can run. The default
export (``lean=True``) saves the same serving function (same graph, fixed ``[1, None, None, 3]``
input signature, so no re-tracing) with only the model's variables attached: no optimizer
slots, no layer functions. ``benchmarks/detection_inference.py --load`` measures both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detection.card import (
    CARD_NAME,
    CARD_VERSION,
    build_model_card,
    read_model_card,
    write_model_card,
)
from gldboxes.io import atomic_dir

__all__ = ["SIGNATURE", "main"]

logger = logging.getLogger("detection.export")

SIGNATURE: dict[str, Any] = {
    "name": "serving_default",
    "inputs": {
        "inputs": {
            "dtype": "uint8",
            "shape": [1, None, None, 3],
            "doc": "one RGB image of any size",
        }
    },
    "outputs": {
        "detection_boxes": {
            "dtype": "float32",
            "shape": [1, "K", 4],
            "doc": "ymin, xmin, ymax, xmax in pixels of the resized input; "
            "divide by image_info[:, 2] then image_info[:, 0] to "
            "normalise",
        },
        "detection_scores": {
            "dtype": "float32",
            "shape": [1, "K"],
            "doc": "landmark confidence, sorted descending",
        },
        "detection_classes": {"dtype": "int32", "shape": [1, "K"], "doc": "1 = landmark"},
        "num_detections": {"dtype": "int32", "shape": [1], "doc": "valid rows among K"},
        "image_info": {
            "dtype": "float32",
            "shape": [1, 4, 2],
            "doc": "original size, scaled size, scale, offset (y, x)",
        },
    },
}


def main(
    run_dir: str | os.PathLike[str] | None,
    export_dir: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str = "latest",
    conf: dict[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    lean: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a run's checkpoint as a SavedModel (see the module docstring for the layout).

    Args:
        run_dir: a training run folder (its ``detector.yaml`` gives the preset); may be
            ``None`` when ``conf`` is given and ``checkpoint="random"``.
        export_dir: destination (default ``run_dir/export-step<N>``); written atomically.
        checkpoint: ``latest``, a checkpoint prefix, or ``random`` (seeded random weights:
            only for timing a preset's architecture, e.g. the GPU presets on a CPU).
        conf: the preset, when there is no run folder.
        validation: metrics of ``detection.evaluate.main`` for this checkpoint, for the
            card's AP@0.5; by default ``run_dir/eval/val-step<N>.json`` when it exists.
        lean: save only the serving signature and the model's variables (see "Load time"
            in the module docstring); ``False`` saves Model Garden's full export (every Keras
            layer's traced functions too), the reference the tests compare against.
        overwrite: export again even when the folder holds a current export. Without it an
            export whose card is older (``format_version`` 1) only gets a new card.

    Returns:
        The SavedModel folder.
    """
    from detection.configs import build_experiment
    from detection.tfcompat import import_tf
    from detection.train import load_run_conf, seed_everything

    if conf is None:
        if run_dir is None:
            raise ValueError("export needs a run folder or a preset conf")
        conf = load_run_conf(run_dir)
    tf = import_tf()
    if checkpoint == "latest":
        if run_dir is None:
            raise ValueError("checkpoint='latest' needs a run folder")
        ckpt_path = tf.train.latest_checkpoint(str(run_dir))
        if ckpt_path is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to export (train first)")
    elif checkpoint == "random":
        ckpt_path = None
    else:
        ckpt_path = checkpoint
        if not Path(ckpt_path + ".index").is_file():
            raise FileNotFoundError(f"{ckpt_path}: not a checkpoint prefix (no .index file)")
    tag = "random" if ckpt_path is None else f"step{ckpt_path.rsplit('-', 1)[-1]}"
    if export_dir is None:
        if run_dir is None:
            raise ValueError("export_dir is required without a run folder")
        export_dir = Path(run_dir) / f"export-{tag}"
    out = Path(export_dir)
    old = read_model_card(out) if (out / "saved_model.pb").is_file() else None
    if old is not None and not overwrite:
        if old["format_version"] < CARD_VERSION:
            # An export from before model cards: describe it, keep the SavedModel.
            card = build_model_card(
                conf,
                checkpoint=old.get("checkpoint", ckpt_path),
                run_dir=run_dir,
                validation=validation,
                signature=old.get("signature", SIGNATURE),
            )
            write_model_card(out, card)
            logger.info("wrote the model card of the existing export %s", out / CARD_NAME)
        else:
            logger.info("already exported: %s", out)
        return out
    card = build_model_card(
        conf, checkpoint=ckpt_path, run_dir=run_dir, validation=validation, signature=SIGNATURE
    )

    import official.vision  # noqa: F401 - registers the vision tasks

    params = build_experiment(conf, None)
    seed_everything(int(conf["seed"]))
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        if lean:
            _export_lean(params, conf, ckpt_path, tmp, tf)
        else:
            from official.vision.serving import export_saved_model_lib

            export_saved_model_lib.export_inference_graph(
                input_type="image_tensor",
                batch_size=1,
                input_image_size=[int(v) for v in conf["input_size"]],
                params=params,
                checkpoint_path=ckpt_path,
                export_dir=str(tmp),
            )
        write_model_card(tmp, card)
    logger.info(
        "exported %s (%s) to %s in %.1f s", conf["output"], tag, out, time.perf_counter() - started
    )
    if card["warning"]:
        logger.info("model card of %s: %s", out, card["warning"])
    return out


def _export_lean(
    params: Any, conf: Mapping[str, Any], ckpt_path: str | None, out: Path, tf: Any
) -> None:
    """Model Garden's ``DetectionModule`` serving function, saved with the model's variables
    only: the same graph and weights as ``export_inference_graph``, without the Keras layers'
    own traced call functions, which ``tf.saved_model.load`` would otherwise restore one by one.

    Raises:
        AssertionError: from TF when the checkpoint does not match the model (as Model Garden).
    """
    from official.core import train_utils
    from official.vision.serving import detection as detection_serving

    module = detection_serving.DetectionModule(
        params=params,
        batch_size=1,
        input_image_size=[int(v) for v in conf["input_size"]],
        input_type="image_tensor",
        num_channels=3,
    )
    if ckpt_path is not None:  # as official.core.export_base.export reads it
        status = tf.train.Checkpoint(model=module.model).read(ckpt_path)
        status.assert_existing_objects_matched().expect_partial()
    signatures = module.get_inference_signatures(
        {"image_tensor": tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY}
    )
    root = tf.Module()
    root.model_variables = list(module.model.variables)  # inference variables, no optimizer
    tf.saved_model.save(root, str(out), signatures=signatures)
    train_utils.serialize_config(params, str(out))
