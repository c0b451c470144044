"""R-MAC feature files: CNN activations -> MAC and regional vectors (and 8-bit maps) of images.

:func:`extract` writes one HDF5 file per image set, in this process or shard by shard on an
executor (:func:`feature_stage`, the per-image stage of :func:`retrieval.rmac.run_rmac`, as
:func:`retrieval.runner.shards.feature_stage` is the runner's): shard ``i`` holds images
``i * shard_size ...`` in ``<file stem>.shards/shard-XXXXX/features.h5`` (+ ``done.json``), the
backbone is loaded once per worker process, and the shards are merged into the one file
(then removed) with the attributes the one-process path writes, so both give the same file
content and the same rankings on any engine.

Layout: one group per image id with ``mac`` (C,), ``regional`` (R, C) (L2-normalised
regional max-pooled vectors), attribute ``image_size`` (w, h), and with ``keep_maps``
``maps`` uint8 (h, w, C) + ``scale`` (C,) (value = maps / 255 * scale); file attributes
``format_version``, ``config_hash`` (of the backbone conf and the items), ``maps``, ``config``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gldboxes.io import atomic_path, config_hash
from gldboxes.progress import tqdm
from retrieval.features.images import ImageItem
from retrieval.rmac.backbone import Backbone, build_backbone, load_rgb
from retrieval.rmac.pooling import map_descriptors
from retrieval.rmac.whitening import FORMAT_VERSION

if TYPE_CHECKING:
    import h5py

    from gldboxes.executor import Executor, Resources, Shard, Stage

__all__ = ["extract", "feature_stage", "read_features", "read_maps"]

logger = logging.getLogger("retrieval.rmac.activations")

#: The conf keys that decide a feature file's content.
CONF_KEYS = ("backbone", "weights", "seed", "max_side", "levels", "overlap")


def _backbone_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    return {k: conf[k] for k in CONF_KEYS}


def _write_attrs(f: h5py.File, conf: Mapping[str, Any], key: str, keep_maps: bool) -> None:
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["config_hash"] = key
    f.attrs["maps"] = bool(keep_maps)
    f.attrs["config"] = json.dumps(_backbone_conf(conf))


def _write_image(
    f: h5py.File, item: ImageItem, bb: Backbone, conf: Mapping[str, Any], keep_maps: bool
) -> None:
    """One image's group: ``mac`` (C,), ``regional`` (R, C), optionally ``maps`` + ``scale``."""
    img = load_rgb(item.path, int(conf["max_side"]), item.bbx)
    fmap = bb(img)[0]
    mac, reg = map_descriptors(fmap, int(conf["levels"]), float(conf["overlap"]))
    grp = f.create_group(item.name)
    grp.create_dataset("mac", data=mac)
    grp.create_dataset("regional", data=reg)
    grp.attrs["image_size"] = (img.shape[1], img.shape[0])
    if keep_maps:
        sc = fmap.max(axis=(0, 1)).astype(np.float32)
        qm = np.round(fmap / np.where(sc > 0, sc, 1.0) * 255.0).astype(np.uint8)
        grp.create_dataset("maps", data=qm, compression="gzip", compression_opts=1)
        grp.create_dataset("scale", data=sc)


def extract(
    conf: Mapping[str, Any],
    items: Sequence[ImageItem],
    out_h5: str | os.PathLike[str],
    *,
    keep_maps: bool = False,
    backbone: Backbone | Callable[[], Backbone] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
    shard_size: int = 256,
) -> Path:
    """Activations -> MAC and regional vectors (and optionally quantised maps) of images.

    Writes the HDF5 file of the module docstring. Skipped when the file exists with the same
    configuration (and maps when needed).

    Args:
        conf: an R-MAC conf (:data:`retrieval.rmac.confs`; the :data:`CONF_KEYS` are used).
        items: the images (unique ids; ``bbx`` in pixels crops a query).
        out_h5: the features file.
        keep_maps: also store the 8-bit activation maps (AML re-ranking).
        backbone: this process only: a built :class:`Backbone` or a factory called only when
            there is work to do (default: built from ``conf``).
        executor: run shard by shard on it (:func:`feature_stage`; ``backbone`` is then
            unused, each worker builds its own); None: in this process.
        shard_size: images per shard with an executor.
    """
    import h5py

    out_h5 = Path(out_h5)
    key = config_hash(
        _backbone_conf(conf) | {"items": [[it.name, str(it.path), it.bbx] for it in items]}
    )
    if out_h5.exists() and not overwrite:
        with h5py.File(out_h5, "r") as f:
            if f.attrs.get("config_hash") == key and (not keep_maps or f.attrs.get("maps")):
                logger.info("features exist, skipping: %s", out_h5)
                return out_h5
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{out_h5}: image ids are not unique")
    if executor is not None:
        _check_weights(conf)
        stage, shards = feature_stage(conf, items, keep_maps=keep_maps, shard_size=shard_size)
        shard_dir = out_h5.with_name(f"{out_h5.stem}.shards")
        rep = executor.run(stage, shards, shard_dir, overwrite=overwrite)
        with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as dst:
            _write_attrs(dst, conf, key, keep_maps)
            for d in rep.shard_dirs(shards):
                with h5py.File(d / "features.h5", "r") as src:
                    for n in src:
                        src.copy(src[n], dst, name=n)
        shutil.rmtree(shard_dir)  # merged: the maps need not be kept twice
        return out_h5
    if isinstance(backbone, Backbone):
        bb = backbone
    elif backbone is not None:
        bb = backbone()
    else:
        bb = build_backbone(conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0)))
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        _write_attrs(f, conf, key, keep_maps)
        for it in tqdm(items, desc=f"R-MAC {out_h5.stem}", disable=len(items) < 20):
            _write_image(f, it, bb, conf, keep_maps)
    return out_h5


def _check_weights(conf: Mapping[str, Any]) -> None:
    """Fail here, in one line, when the backbone's weights are unavailable, before any worker
    tries; ImageNet weights missing from the Keras cache are downloaded into it once (by
    building the backbone), where the workers of this machine then find them."""
    w = conf.get("weights")
    if w is None:
        return
    if w != "imagenet":
        if not Path(w).exists():
            raise FileNotFoundError(f"backbone weights file not found: {w}")
        return
    file = f"{conf['backbone']}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cache = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"
    if not (cache / file).exists():
        build_backbone(conf["backbone"], "imagenet")  # downloads, or raises ConnectionError


def _features_shard(
    shard: Shard, out: Path, backbone: Backbone, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Write the images ``[name, path, bbx or None]`` of a shard into ``out/features.h5``."""
    import h5py

    keep_maps = bool(shard.meta["keep_maps"])
    with h5py.File(out / "features.h5", "w") as f:
        for name, path, bbx in shard.items:
            item = ImageItem(name, Path(path), None if bbx is None else tuple(bbx))
            _write_image(f, item, backbone, conf, keep_maps)
    return {"images": len(shard.items)}


def feature_stage(
    conf: Mapping[str, Any],
    items: Sequence[ImageItem],
    *,
    keep_maps: bool = False,
    shard_size: int = 256,
    resources: Resources | None = None,
    retries: int = 2,
) -> tuple[Stage, list[Shard]]:
    """R-MAC features as an executor stage: one shard per ``shard_size`` images, in order.

    The backbone is the stage's model (built once per worker process, shared by the database,
    query and whitening sets of a conf: ``keep_maps`` is a shard input, not the stage's conf).

    Returns:
        ``(stage, shards)``; ``executor.run(stage, shards, folder)`` writes
        ``folder/shard-XXXXX/features.h5``.
    """
    import dataclasses

    from gldboxes.executor import Resources, Stage, make_shards

    bconf = _backbone_conf(conf)
    rows = [
        [it.name, os.fspath(Path(it.path).resolve()), None if it.bbx is None else list(it.bbx)]
        for it in items
    ]
    stage = Stage(
        f"rmac-features-{bconf['backbone']}",
        functools.partial(_features_shard, conf=bconf),
        conf=bconf,
        load_model=functools.partial(
            build_backbone, bconf["backbone"], bconf["weights"], seed=int(bconf["seed"] or 0)
        ),
        resources=resources or Resources(num_cpus=0.5),
        retries=retries,
    )
    shards = [
        dataclasses.replace(s, meta={**s.meta, "keep_maps": bool(keep_maps)})
        for s in make_shards(rows, shard_size, prefix="shard")
    ]
    return stage, shards


def read_features(
    path: str | os.PathLike[str], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mac (n, C), regional (sum R, C), counts (n,))`` of the named images."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"R-MAC features not found: {path}")
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError(f"{path}: not an R-MAC features file of format {FORMAT_VERSION}")
        missing = [n for n in names if n not in f]
        if missing:
            raise ValueError(f"{path}: no features for {len(missing)} images (e.g. {missing[:3]})")
        mac = np.stack([f[n]["mac"][()] for n in names])
        regs = [f[n]["regional"][()] for n in names]
    return mac, np.concatenate(regs), np.array([len(r) for r in regs], np.int64)


def read_maps(path: str | os.PathLike[str], names: Sequence[str]) -> list[np.ndarray]:
    """Dequantised float32 (h, w, C) activation maps of the named images."""
    import h5py

    with h5py.File(path, "r") as f:
        if not f.attrs.get("maps"):
            raise ValueError(f"{path}: holds no activation maps (extract with keep_maps)")
        return [f[n]["maps"][()].astype(np.float32) * (f[n]["scale"][()] / 255.0) for n in names]
