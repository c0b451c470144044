"""Local features (RootSIFT, DELF/DELG SavedModels) into one HDF5 file per dataset and config.

Presets (:data:`confs`), hloc-style; the ``output`` name encodes the settings:

* ``rootsift`` (default): OpenCV SIFT, the ``max_features`` strongest by response, RootSIFT
  (L1-normalise, square root: unit L2 norm), 128-D. Runs offline everywhere. ``upright`` drops
  the dominant orientations (one descriptor per keypoint at angle 0, as for the upright
  photos of Revisited Oxford/Paris). Image-size policy: the longer side is downscaled to
  ``max_side`` (1,024 px, the size of the Revisited images) before extraction and keypoints
  are stored in original pixels, so thresholds in pixels (spatial verification) refer to the
  image at ``max_side``.
* ``rootsift-n4000``: the same with a budget of 4,000 features per image (the classical
  ASMK setups use several thousand; slower to extract, index and verify).
* ``delf`` (:mod:`retrieval.features.delf`) and ``kaze`` (:mod:`retrieval.features.kaze`):
  plug-ins, listed in
  :data:`FEATURE_PLUGINS`.

HDF5 layout (keyed by image id)::

    <id>/keypoints    float32 (N, 2)  x, y in pixels of the original (EXIF-upright) image
    <id>/descriptors  float32 (N, D)
    <id>/scales       float32 (N,)    SIFT size in original pixels / DELF pyramid scale
    <id>/scores       float32 (N,)    SIFT response / DELF attention
    <id>.attrs        status ("ok" | "empty" | "error"), error, image_size (w, h), bbx

Queries are cropped to their ``bbx`` (x1, y1, x2, y2) before extraction (Revisited protocol);
their keypoints are still in full-image pixels. Bad images are decoded when PIL can (CMYK,
grayscale, 16-bit, palette, alpha composited on white, EXIF orientation applied, huge JPEGs
decoded at reduced size) and otherwise recorded as ``status="error"`` with no features and
reported by name; images without features are recorded as empty.

Extraction is resumable and survives kill -9: finished images are committed every 32 images or
2 s to small chunk files in ``<file>.partial.d/`` (each written under a temporary name, closed,
flushed and renamed, so a chunk torn by a kill is just discarded); a rerun skips the images of
committed chunks, and completion merges them into a temporary file renamed onto ``<file>``. A
damaged ``<file>`` (truncated, not HDF5) is named in a warning and redone. Readers validate what
they read (:func:`check_features`: float (N, 2) keypoints, float (N, D) descriptors, equal
counts, finite values) and name the file and image in every error.

Modules: :mod:`~retrieval.features.images` (decoding, crop and resize),
:mod:`~retrieval.features.sift` (RootSIFT), :mod:`~retrieval.features.h5` (the HDF5 layout,
writing one image, validated reading), :mod:`~retrieval.features.chunks` (committed chunk files
and the merge); this package holds the presets, the plug-in registry and the stage :func:`main`.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import write_config
from gldboxes.progress import tqdm
from retrieval.features.chunks import (
    ChunkSources,
    ChunkWriter,
    committed_chunks,
    held_images,
    legacy_images,
    merge_chunks,
)
from retrieval.features.h5 import (
    FORMAT_VERSION,
    H5_ERRORS,
    ExtractedFeatures,
    check_features,
    failures,
    read_descriptors,
    read_features,
    write_image,
)
from retrieval.features.images import BadImageError, ImageItem, crop_and_resize, load_image
from retrieval.features.sift import RootSift, rootsift, rootsift_conf

__all__ = [
    "FORMAT_VERSION",
    "BadImageError",
    "ExtractedFeatures",
    "ImageItem",
    "check_features",
    "confs",
    "extract_image",
    "failures",
    "load_image",
    "main",
    "make_extractor",
    "output_name",
    "read_descriptors",
    "read_features",
    "rootsift",
    "write_image",
]

logger = logging.getLogger("retrieval.features")

# The RootSIFT presets (their keys commented in retrieval.features.sift); each plug-in adds
# its own below.
confs: dict[str, dict[str, Any]] = {
    "rootsift": rootsift_conf(1000),
    "rootsift-n4000": rootsift_conf(4000),
}


# Plug-in local features: one module each, holding ``NAME`` (the ``model.name`` of its presets),
# ``confs`` (its presets, in the format above, ``verification`` defaults included) and
# ``make(model_conf)`` returning an extractor with ``dim``, ``pixel_scales`` (``scales`` are
# keypoint sizes in pixels, rescaled with the image) and ``__call__(image) -> (keypoints (N, 2),
# descriptors (N, D), scales (N,), scores (N,))``. Adding a feature = one module + this line.
FEATURE_PLUGINS: tuple[str, ...] = ("retrieval.features.delf", "retrieval.features.kaze")


def _plugin(name: str) -> Any:
    """The plug-in module whose ``NAME`` is ``name``, or ``None``."""
    for module in FEATURE_PLUGINS:
        mod = importlib.import_module(module)
        if mod.NAME == name:
            return mod
    return None


for _module in FEATURE_PLUGINS:
    confs.update(importlib.import_module(_module).confs)


def output_name(conf: Mapping[str, Any]) -> str:
    """The features folder name of a preset after overrides: ``<model>-n<budget>`` plus
    ``-up`` (upright RootSIFT) and ``-r<max_side>`` when it differs from 1,024 px.

    Args:
        conf: a features preset (``model`` and ``preprocessing`` dicts).

    Returns:
        e.g. ``rootsift-n1000`` (the default preset), ``rootsift-n4000-up``, ``delf-n1000-r800``.
    """
    model, pre = conf["model"], conf.get("preprocessing", {})
    name = f"{model['name']}-n{int(model['max_features'])}"
    if model.get("upright"):
        name += "-up"
    if int(pre.get("max_side", 1024)) != 1024:
        name += f"-r{int(pre['max_side'])}"
    return name


# ---------------------------------------------------------------------------- extraction
def make_extractor(conf: Mapping[str, Any]) -> Any:
    """The extractor of a features preset (the one :func:`main` uses), ready for
    :func:`extract_image`.

    Args:
        conf: a preset of :data:`confs` (with any ``model`` overrides resolved).

    Returns:
        a RootSIFT extractor (OpenCV SIFT + RootSIFT) for ``model.name == "rootsift"``, or the
        plug-in's (``delf``: :class:`retrieval.features.delf.DelfExtractor`, its SavedModel loaded
        here;
        ``kaze``); each exposes ``dim`` and ``__call__(image) -> (keypoints (N, 2), descriptors
        (N, D), scales (N,), scores (N,))``.

    Raises:
        ValueError: an unknown ``model.name``.
    """
    name = conf["model"]["name"]
    if name == "rootsift":
        return RootSift(conf["model"])
    plugin = _plugin(name)
    if plugin is not None:
        return plugin.make(conf["model"])
    known = ["rootsift", *(importlib.import_module(m).NAME for m in FEATURE_PLUGINS)]
    raise ValueError(f"unknown feature model {name!r}; expected one of {known}")


def extract_image(
    extractor: Any, item: ImageItem, conf: Mapping[str, Any]
) -> tuple[ExtractedFeatures, tuple[int, int]]:
    """Extract one image (cropped to its bbx) with coordinates mapped back to original pixels."""
    pre = conf["preprocessing"]
    max_side = int(pre.get("max_side", 1024))
    arr, size, factor = load_image(
        item.path,
        grayscale=bool(pre.get("grayscale", True)),
        exif_transpose=bool(pre.get("exif_transpose", True)),
        max_side=max_side if item.bbx is None else None,
    )
    arr, sx, sy, ox, oy = crop_and_resize(arr, factor, item.bbx, max_side)
    dim = getattr(extractor, "dim", 128)
    if min(arr.shape[:2]) < int(pre.get("min_side", 8)):
        return ExtractedFeatures.empty(max(dim, 0)), size
    xy, desc, scales, scores = extractor(arr)
    kp = (xy * np.array([sx, sy], np.float32) + np.array([ox, oy], np.float32)).astype(np.float32)
    if getattr(extractor, "pixel_scales", False):
        scales = scales * np.float32((sx + sy) / 2)
    return ExtractedFeatures(
        kp.reshape(-1, 2),
        desc.astype(np.float32),
        scales.astype(np.float32),
        scores.astype(np.float32),
    ), size


# Finished images are committed to small chunk files every _COMMIT_IMAGES images or
# _COMMIT_SECONDS seconds, whichever comes first: a kill -9 loses at most that much work.
_COMMIT_IMAGES = 32
_COMMIT_SECONDS = 2.0


def main(
    conf: Mapping[str, Any],
    images: Sequence[ImageItem],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Extract features of ``images`` into the HDF5 file ``output`` (resumable, kill-safe).

    Finished images are committed every 32 images or 2 s to chunk files in
    ``<output>.partial.d/`` (written under a temporary name, closed, flushed, renamed); a
    rerun skips the images of committed chunks, and the last step merges the chunks (into a
    copy of an existing ``output``, whose other images are kept) as a temporary file renamed
    onto ``output``. A damaged ``output`` is named in a warning and redone.

    Args:
        conf: a preset of :data:`confs`.
        images: the images (ids must be unique; ``bbx`` set for cropped queries).
        output: the ``.h5`` file to write.
        overwrite: re-extract every image.

    Returns:
        ``output``. Images that cannot be decoded are recorded with ``status="error"`` and no
        features, and listed (by name) in a warning; :func:`failures` returns them.
    """
    out = Path(output)
    names = [it.name for it in images]
    if len(set(names)) != len(names):
        raise ValueError(f"{out}: duplicate image ids among the {len(names)} images to extract")
    partial_dir = out.with_name(out.name + ".partial.d")
    legacy = out.with_name(out.name + ".partial")  # the append-mode file of earlier versions
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        out.unlink(missing_ok=True)
        legacy.unlink(missing_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
    sources: ChunkSources = []  # finished work not in `out`, oldest first
    if legacy.exists():
        old = legacy_images(legacy)
        if old is not None:
            sources.append((legacy, old))
    chunks, seq = committed_chunks(partial_dir)
    sources.extend(chunks)
    pending = set().union(*(ids for _, ids in sources))
    held = None  # the images `out` holds complete (of those asked for and those pending)
    if out.exists():
        held = held_images(out, [*names, *pending.difference(names)], "features file")
    if held is not None and pending <= held:
        # nothing newer than `out`: leftovers of a merge killed before it cleaned up
        sources, chunks = [], []
        if held.issuperset(names):
            legacy.unlink(missing_ok=True)
            shutil.rmtree(partial_dir, ignore_errors=True)
            logger.info("features complete, skipping: %s", out)
            return out
    done = (held or set()) | pending
    todo = [it for it in images if it.name not in done]
    if len(todo) < len(images):
        logger.info(
            "%s: resuming, %d of %d images left (%d committed chunks)",
            out.name,
            len(todo),
            len(images),
            len(chunks),
        )
    extractor = make_extractor(conf) if todo else None
    writer = ChunkWriter(
        partial_dir,
        str(conf["output"]),
        seq,
        commit_images=_COMMIT_IMAGES,
        commit_seconds=_COMMIT_SECONDS,
    )
    bad: list[str] = []
    try:
        for it in tqdm(
            todo,
            desc=f"features {out.name}",
            unit="img",
            disable=len(todo) < 20 or not logger.isEnabledFor(logging.INFO),
        ):
            attrs: dict[str, Any] = {}
            if it.bbx is not None:
                attrs["bbx"] = np.asarray(it.bbx, np.float64)
            try:
                feats, size = extract_image(extractor, it, conf)
                attrs["image_size"] = np.asarray(size, np.int64)
                attrs["status"] = "ok" if feats.descriptors.shape[0] else "empty"
            except (BadImageError, FileNotFoundError, ValueError) as exc:
                bad.append(it.name)
                feats = ExtractedFeatures.empty(max(getattr(extractor, "dim", 128), 0))
                attrs["status"] = "error"
                attrs["error"] = str(exc)
                logger.debug("%s", exc)
            writer.add(it.name, feats, attrs)
    except BaseException:
        try:  # keep the images finished so far (Ctrl-C, a failing extractor)
            writer.commit()
        except H5_ERRORS:
            writer.discard()
        writer.wait()
        raise
    writer.commit()
    sources.extend(writer.wait())
    merge_chunks(out, held is not None, sources, partial_dir, str(conf["output"]))
    legacy.unlink(missing_ok=True)
    shutil.rmtree(partial_dir, ignore_errors=True)
    write_config(out.parent, dict(conf), name=f"{out.stem}.config.yaml")
    if todo:
        logger.info(
            "%s: %d images extracted, %d kept from earlier runs",
            out.name,
            len(todo),
            len(images) - len(todo),
        )
    if bad:
        logger.warning(
            "%s: %d images could not be read and have no features: %s%s",
            out.name,
            len(bad),
            ", ".join(bad[:20]),
            " ..." if len(bad) > 20 else "",
        )
    return out
