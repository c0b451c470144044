"""Export a trained detector as a SavedModel with a documented serving signature.

Layout of ``RUN/export-step<N>/`` (or the folder given)::

    saved_model.pb, variables/   the SavedModel (Model Garden's DetectionModule)
    params.yaml                  the Model Garden experiment config
    detector.json                what this file documents: preset, checkpoint, signature

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
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from gldboxes.io import atomic_dir, read_json, write_json

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
    if (out / "detector.json").is_file() and not overwrite:
        logger.info("already exported: %s", out)
        return out

    import official.vision  # noqa: F401 - registers the vision tasks
    from official.vision.serving import export_saved_model_lib

    params = build_experiment(conf, None)
    seed_everything(int(conf["seed"]))
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        export_saved_model_lib.export_inference_graph(
            input_type="image_tensor",
            batch_size=1,
            input_image_size=[int(v) for v in conf["input_size"]],
            params=params,
            checkpoint_path=ckpt_path,
            export_dir=str(tmp),
        )
        write_json(
            tmp / "detector.json",
            {
                "format_version": 1,
                "layout": "model_garden",
                "preset": conf["output"],
                "family": conf["family"],
                "input_size": list(conf["input_size"]),
                "checkpoint": ckpt_path,
                "signature": SIGNATURE,
            },
        )
    logger.info(
        "exported %s (%s) to %s in %.1f s", conf["output"], tag, out, time.perf_counter() - started
    )
    return out


def read_export_info(export_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``detector.json`` of an export folder, or ``None`` for a foreign SavedModel."""
    path = Path(export_dir) / "detector.json"
    return read_json(path) if path.is_file() else None
