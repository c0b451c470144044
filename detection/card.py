"""Model card of a detector export (``detector.json``): what it was trained on, what it is fit for.

``gldboxes detect export`` writes the card beside every SavedModel it exports (atomically, with
the model). Fields of ``format_version`` 2 (1 had only the first six)::

    format_version   2
    layout           "model_garden" (how detection.inference.load_detector calls it)
    preset           the preset's output name, e.g. "detector-tiny_cpu-128"
    family           Model Garden task: "retinanet" | "maskrcnn"
    input_size       [height, width] fed to the network
    checkpoint       the exported checkpoint prefix (null: random weights)
    signature        the serving signature (detection.export.SIGNATURE)
    training         {"steps": weights' step, "seed", "run": run folder, "init_checkpoint"}
    training_data    {"records": TFRecords folder, "split": "train", "n_images",
                      "n_with_boxes", "synthetic_world": true | false | null (unknown),
                      "worlds": [roots of the synthetic worlds the images come from]}
                     or null (no records: random weights)
    validation       {"split", "ap50" (AP@0.5), "coco_ap", "n_images", "checkpoint"} or null
    fit_for          "synthetic_world" | "real_photos" | "unknown" | "none" (random weights)
    warning          one line for the user, or null; a synthetic-only model says
                     SYNTHETIC_ONLY_WARNING

Whether an image comes from the synthetic world is read from the data itself: it lies under
``train/`` or ``retrieval/`` of a folder whose ``world.json`` is a synthetic world's manifest
(``gldboxes.synth.WORLD_KIND``). :func:`warn_if_unfit` logs one warning line when a
synthetic-only detector is applied to other images.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gldboxes.io import read_json, write_json
from gldboxes.synth import WORLD_KIND

__all__ = [
    "CARD_NAME",
    "CARD_VERSION",
    "FIT_FOR",
    "RANDOM_WEIGHTS_WARNING",
    "SYNTHETIC_ONLY_WARNING",
    "WorldCheck",
    "build_model_card",
    "check_synthetic_world",
    "describe_training_data",
    "is_synthetic_world",
    "read_model_card",
    "warn_if_unfit",
    "write_model_card",
]

logger = logging.getLogger("detection.card")

CARD_NAME = "detector.json"
CARD_VERSION = 2
# What a detector is fit for, from its training data.
FIT_FOR: tuple[str, ...] = ("synthetic_world", "real_photos", "unknown", "none")
SYNTHETIC_ONLY_WARNING = "trained on the synthetic world only; not for real photos"
RANDOM_WEIGHTS_WARNING = "random weights: for timing the architecture only, not for detection"
# Sub-folders of a world that hold its images (gldboxes.synth writes nothing else as images).
_WORLD_IMAGE_DIRS = ("train", "retrieval")
_CARD_KEYS = ("training", "training_data", "validation", "fit_for", "warning")


def is_synthetic_world(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder/world.json`` is the manifest of a synthetic world.

    Worlds written before ``world.json`` carried ``kind`` are recognised by their manifest's
    shape (an integer ``format_version`` and a ``conf`` with the synthetic world's fields).
    """
    path = Path(folder) / "world.json"
    if not path.is_file():
        return False
    try:
        manifest = read_json(path)
    except (ValueError, OSError):
        return False
    if not isinstance(manifest, dict):
        return False
    if "kind" in manifest:
        return bool(manifest["kind"] == WORLD_KIND)
    conf = manifest.get("conf")
    return (
        isinstance(manifest.get("format_version"), int)
        and isinstance(conf, dict)
        and {"train_landmarks", "texture_size", "landmarks"} <= set(conf)
    )


@dataclass(frozen=True, slots=True)
class WorldCheck:
    """Which images lie inside a synthetic world.

    Attributes:
        n_images: number of images checked.
        worlds: roots of the synthetic worlds holding some of them (sorted).
        outside: existing images in no synthetic world, in input order.
        missing: images in no synthetic world that do not exist (nothing can be said).
    """

    n_images: int
    worlds: tuple[Path, ...]
    outside: tuple[Path, ...]
    missing: tuple[Path, ...]

    @property
    def all_synthetic(self) -> bool:
        """At least one image, and every one of them inside a synthetic world."""
        return self.n_images > 0 and not self.outside and not self.missing


def check_synthetic_world(paths: Iterable[str | os.PathLike[str]]) -> WorldCheck:
    """Sort ``paths`` into images of synthetic worlds and others.

    An image is synthetic when it lies under ``train/`` or ``retrieval/`` of a folder that
    :func:`is_synthetic_world`; symbolic links are followed when the literal path is not. One
    lookup per folder, so a GLD-sized list (~100k paths) takes well under a second.
    """
    folder_world: dict[Path, Path | None] = {}
    is_world: dict[Path, bool] = {}

    def world_of(path: Path) -> Path | None:
        parent = path.parent
        if parent not in folder_world:
            found = None
            chain = [parent, *parent.parents]
            for below, folder in itertools.pairwise(chain):
                if below.name not in _WORLD_IMAGE_DIRS:
                    continue
                if folder not in is_world:
                    is_world[folder] = is_synthetic_world(folder)
                if is_world[folder]:
                    found = folder
                    break
            folder_world[parent] = found
        return folder_world[parent]

    n = 0
    worlds: set[Path] = set()
    outside: list[Path] = []
    missing: list[Path] = []
    for p in paths:
        n += 1
        path = Path(os.path.abspath(p))
        root = world_of(path)
        if root is None:
            real = Path(os.path.realpath(path))
            if real != path:
                root = world_of(real)
        if root is not None:
            worlds.add(root)
        elif path.exists():
            outside.append(path)
        else:
            missing.append(path)
    return WorldCheck(n, tuple(sorted(worlds)), tuple(outside), tuple(missing))


def describe_training_data(
    records_dir: str | os.PathLike[str], split: str = "train"
) -> dict[str, Any]:
    """The ``training_data`` entry of a card: counts of the records split and whether its
    images (``<split>_images.txt`` of the records folder) all come from a synthetic world.

    ``synthetic_world`` is ``None`` when that cannot be told (records folder or images gone).
    """
    from detection.records import load_records_info

    root = Path(records_dir)
    out: dict[str, Any] = {
        "records": os.fspath(root),
        "split": split,
        "n_images": None,
        "n_with_boxes": None,
        "synthetic_world": None,
        "worlds": [],
    }
    try:
        info = load_records_info(root)
    except (FileNotFoundError, ValueError) as exc:
        logger.warning("training data unknown for the model card: %s", exc)
        return out
    out["n_images"] = info.splits.get(split)
    out["n_with_boxes"] = info.positives.get(split)
    listing = root / f"{split}_images.txt"
    if not listing.is_file():
        logger.warning("training data unknown for the model card: no %s", listing)
        return out
    lines = listing.read_text(encoding="utf-8").splitlines()
    check = check_synthetic_world(ln.strip() for ln in lines if ln.strip())
    out["worlds"] = [os.fspath(w) for w in check.worlds]
    if check.outside:
        out["synthetic_world"] = False
    elif check.all_synthetic:
        out["synthetic_world"] = True
    return out


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """The step of a ``.../ckpt-N`` prefix (0 for random weights, ``None`` when unnamed)."""
    if checkpoint is None:
        return 0
    tail = Path(checkpoint).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _validation_entry(
    metrics: Mapping[str, Any], checkpoint: str | None, source: str
) -> dict[str, Any]:
    """The ``validation`` entry from a metrics dict of ``detection.evaluate.main``."""
    if "ap50" not in metrics:
        raise ValueError(f"{source}: validation metrics have no 'ap50' (got {sorted(metrics)})")
    evaluated = metrics.get("checkpoint")
    if evaluated and checkpoint and Path(str(evaluated)).name != Path(checkpoint).name:
        raise ValueError(
            f"{source}: validation metrics are of checkpoint {evaluated}, "
            f"but the export is of {checkpoint}"
        )
    coco = metrics.get("coco") or {}
    return {
        "split": metrics.get("split"),
        "ap50": float(metrics["ap50"]),
        "coco_ap": None if coco.get("AP") is None else float(coco["AP"]),
        "n_images": metrics.get("n_images"),
        "checkpoint": evaluated,
    }


def _find_validation(run_dir: Path, checkpoint: str) -> Mapping[str, Any] | None:
    """Metrics of ``gldboxes detect eval`` on ``val`` for this checkpoint, when already run."""
    from detection.evaluate import load_metrics

    step = _checkpoint_step(checkpoint)
    path = run_dir / "eval" / f"val-step{step}.json"
    return load_metrics(path) if step is not None and path.is_file() else None


def build_model_card(
    conf: Mapping[str, Any],
    *,
    checkpoint: str | None,
    run_dir: str | os.PathLike[str] | None = None,
    validation: Mapping[str, Any] | None = None,
    signature: Mapping[str, Any] | None = None,
    layout: str = "model_garden",
) -> dict[str, Any]:
    """The card of an export (see the module docstring for the fields).

    Args:
        conf: the run's preset as written to its ``detector.yaml`` (its ``records`` key names
            the TFRecords folder trained on).
        checkpoint: the exported checkpoint prefix; ``None`` for random weights.
        run_dir: the training run; its ``eval/val-step<N>.json`` gives the validation AP when
            ``validation`` is not given.
        validation: metrics of ``detection.evaluate.main`` for this checkpoint (a dict with
            ``ap50``, ``split``, ``n_images``, ``checkpoint``, ``coco``).
        signature: the serving signature to document.

    Raises:
        ValueError: ``conf`` lacks ``output``/``family``/``input_size``, or ``validation`` is
            of another checkpoint or has no ``ap50``.
    """
    missing = [k for k in ("output", "family", "input_size") if k not in conf]
    if missing:
        raise ValueError(f"detector conf lacks {missing} (not a detection.configs preset)")
    records = conf.get("records")
    training_data = describe_training_data(records) if checkpoint is not None and records else None
    if validation is not None:
        val: dict[str, Any] | None = _validation_entry(validation, checkpoint, "validation")
    elif run_dir is not None and checkpoint is not None:
        found = _find_validation(Path(run_dir), checkpoint)
        val = None if found is None else _validation_entry(found, checkpoint, str(run_dir))
    else:
        val = None
    if checkpoint is None:
        fit_for, warning = "none", RANDOM_WEIGHTS_WARNING
    elif training_data is None or training_data["synthetic_world"] is None:
        fit_for, warning = "unknown", None
    elif training_data["synthetic_world"]:
        fit_for, warning = "synthetic_world", SYNTHETIC_ONLY_WARNING
    else:
        fit_for, warning = "real_photos", None
    return {
        "format_version": CARD_VERSION,
        "layout": layout,
        "preset": conf["output"],
        "family": conf["family"],
        "input_size": [int(v) for v in conf["input_size"]],
        "checkpoint": checkpoint,
        "signature": dict(signature) if signature is not None else None,
        "training": {
            "steps": _checkpoint_step(checkpoint),
            "seed": conf.get("seed"),
            "run": None if run_dir is None else os.fspath(Path(run_dir).resolve()),
            "init_checkpoint": conf.get("init_checkpoint"),
        },
        "training_data": training_data,
        "validation": val,
        "fit_for": fit_for,
        "warning": warning,
    }


def write_model_card(export_dir: str | os.PathLike[str], card: Mapping[str, Any]) -> Path:
    """Atomically write ``card`` as ``export_dir/detector.json``; returns the path.

    Raises:
        ValueError: ``card`` is not a current card (version, fields, ``fit_for``).
    """
    _validate(card, f"card for {export_dir}")
    if card["format_version"] != CARD_VERSION:
        raise ValueError(
            f"card for {export_dir}: format_version {card['format_version']!r}, "
            f"write version {CARD_VERSION}"
        )
    return write_json(Path(export_dir) / CARD_NAME, dict(card))


def _validate(card: Mapping[str, Any], source: str) -> None:
    missing = [k for k in ("format_version", *_CARD_KEYS) if k not in card]
    if missing:
        raise ValueError(f"{source}: not a detector model card (missing {missing})")
    if card["fit_for"] not in FIT_FOR:
        raise ValueError(f"{source}: fit_for {card['fit_for']!r}, expected one of {FIT_FOR}")


def read_model_card(export_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The card of an export folder; ``None`` when it has none (a foreign SavedModel).

    An export from before cards (``format_version`` 1: layout, preset, family, input_size,
    checkpoint, signature) comes back with the card fields filled in as unknown
    (``fit_for="unknown"``, ``warning=None``) and its ``format_version`` kept at 1.

    Raises:
        ValueError: ``detector.json`` is malformed or of an unknown ``format_version``.
    """
    path = Path(export_dir) / CARD_NAME
    if not path.is_file():
        return None
    card = read_json(path)
    if not isinstance(card, dict):
        raise ValueError(f"{path}: not a detector model card (expected a JSON object)")
    version = card.get("format_version")
    if version == 1:
        return {
            **card,
            "training": None,
            "training_data": None,
            "validation": None,
            "fit_for": "unknown",
            "warning": None,
        }
    if version != CARD_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, expected 1 or {CARD_VERSION}")
    _validate(card, str(path))
    return card


def warn_if_unfit(
    model_dir: str | os.PathLike[str], images: Iterable[str | os.PathLike[str]]
) -> str | None:
    """Log one warning line when a synthetic-only detector meets images of no synthetic world.

    Args:
        model_dir: the export folder (its card is read; no card, no check).
        images: the image paths about to be detected.

    Returns:
        The logged message, or ``None`` when the model is fit for these images (or unknown).
    """
    card = read_model_card(model_dir)
    if card is None or card["fit_for"] != "synthetic_world":
        return None
    check = check_synthetic_world(images)
    if not check.outside:
        return None
    message = (
        f"detector {os.fspath(model_dir)} was {card['warning'] or SYNTHETIC_ONLY_WARNING}: "
        f"{len(check.outside)} of {check.n_images} images here are not from a synthetic world "
        f"(e.g. {check.outside[0]}), so its boxes on them are meaningless"
    )
    logger.warning("%s", message)
    return message
