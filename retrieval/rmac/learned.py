"""Learned R-MAC (Gordo et al., "Deep Image Retrieval", ECCV 2016 / IJCV 2017) in TensorFlow.

The R-MAC pipeline of :mod:`retrieval.rmac` written as differentiable layers on top of a Keras
backbone, trained end to end with a three-stream triplet ranking loss:

* **ROI max-pooling** of the last convolutional map over regions: the R-MAC grid
  (:func:`retrieval.regions.rmac_grid` via :func:`retrieval.rmac.rmac_regions`) or, in place of
  Gordo et al.'s region proposal network, boxes read from a Google Landmark Boxes CSV (an image
  without a box falls back to the grid);
* per region: L2, **shift + fully connected** layer (initialised to the PCA-whitening of the
  regional vectors, so the untrained network computes R-MAC exactly), L2; sum; L2;
* loss ``0.5 max(0, m + |q - d+|^2 - |q - d-|^2)`` with margin ``m = 0.1``; the three streams
  share their weights;
* **hard-triplet mining** (:mod:`retrieval.rmac.triplets`) from cached descriptors: every
  ``mining.every`` steps the descriptors of a random pool of training images are computed with
  the current network; each anchor gets a random positive (same landmark) and its most similar
  images of other landmarks as negatives;
  the triplets with the largest loss make the next batches (``strategy: hard``, the GPU presets).
  From a *random* network hardest triplets collapse the embedding (every loss stuck at m/2), so
  the tiny CPU preset uses ``semihard`` negatives (less similar than the positive) instead;
* SGD with momentum (and weight decay).

:data:`confs` has a tiny CPU preset (``tiny-cpu``: a small random CNN on ~100-pixel images, a few
steps in seconds) and GPU presets following Gordo et al. (ResNet101 / VGG16 from ImageNet weights,
800-pixel training images, margin 0.1, SGD).

The stage :func:`main` trains on a GLD-style CSV (``id,url,landmark_id``; the synthetic world's
``train/train.csv``) and writes ``OUT/<output>/``: ``backbone.weights.h5``, ``head.npz``
(``shift``, ``fc``, format version), ``model.json`` (configuration, loss history) and
``config.yaml``; :func:`load_model` reads it back (``gldboxes retrieval rmac --method
learned-rmac --model OUT/<output>``).

:func:`describe_stage` describes images with a trained model as an executor stage (the describe
step of :func:`retrieval.rmac.run_rmac`, serial or on Ray): shard ``i`` holds images
``i * shard_size ...`` and writes ``shard-XXXXX/descriptors.npy`` float32 (n, D); the model is
loaded once per worker process; the stage's configuration names the model folder and a hash of
its saved files, so the shards of a retrained model are never mixed with older ones.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm
from retrieval.rmac.backbone import Backbone, build_backbone, load_rgb
from retrieval.rmac.pooling import rmac_regions
from retrieval.rmac.triplets import mine_triplets, triplet_loss
from retrieval.rmac.whitening import learn_whitening

if TYPE_CHECKING:
    from gldboxes.executor import Resources, Shard, Stage
    from retrieval.features.images import ImageItem

__all__ = [
    "DESCRIPTORS_NAME",
    "FORMAT_VERSION",
    "MODEL_FILES",
    "LearnedRMAC",
    "confs",
    "describe_stage",
    "load_model",
    "main",
    "mine_triplets",
    "model_files_hash",
    "model_tag",
    "read_train_csv",
    "train",
    "triplet_loss",
]

logger = logging.getLogger("retrieval.rmac.learned")

FORMAT_VERSION = 1

#: The files of a saved model (:meth:`LearnedRMAC.save`), in the order they are hashed.
MODEL_FILES = ("model.json", "head.npz", "backbone.weights.h5")

#: The file each shard of :func:`describe_stage` writes: float32 (n, D).
DESCRIPTORS_NAME = "descriptors.npy"

#: Named presets (every key commented in ``tiny-cpu``).
confs: dict[str, dict[str, Any]] = {
    "tiny-cpu": {
        "output": "learned-rmac-tiny-cpu",  # folder name of the trained model
        "backbone": "tiny",  # resnet50 | resnet101 | vgg16 | tiny (small CNN for CPU tests)
        "weights": None,  # "imagenet" (Keras download), None (random, seeded) or a weights file
        "seed": 0,  # seeds initialisation, mining and batch order
        "max_side": 96,  # images downscaled to this long side (training and description)
        "levels": 2,  # R-MAC grid levels
        "overlap": 0.4,  # R-MAC grid overlap
        "regions": "grid",  # "grid" or "boxes" (ROI pooling of a boxes CSV's boxes)
        "dim": None,  # output dimension of the FC layer (None: the backbone's channels)
        "margin": 0.1,  # triplet margin m (Gordo et al.: 0.1)
        "optimizer": {
            "lr": 3e-3,  # SGD learning rate
            "momentum": 0.9,  # SGD momentum
            "weight_decay": 0.0,  # decoupled weight decay (Keras SGD)
            "clipnorm": None,  # clip each gradient to this L2 norm (None: no clipping)
        },
        "steps": 30,  # SGD steps
        "batch_triplets": 8,  # triplets per step (three images each)
        "mining": {
            "pool": 64,  # images whose descriptors are cached per mining round
            "every": 5,  # re-mine every this many steps
            "negatives": 5,  # hardest negatives considered per anchor
            # "hard" (Gordo et al., from a pretrained network) or "semihard" (Schroff et al.):
            # from a random network, hardest triplets collapse the embedding to the margin
            "strategy": "semihard",
        },
        "pca_images": 64,  # images used to initialise shift + FC as PCA-whitening
        "pca_eps": 1e-2,  # whitening eigenvalue floor, relative to the largest (few samples)
        "train_backbone": True,  # fine-tune the convolutional layers too (Gordo: yes)
        "cache_images": True,  # keep decoded training images in memory
    },
}


def _gpu(backbone: str, dim: int) -> dict[str, Any]:
    return {
        **copy.deepcopy(confs["tiny-cpu"]),
        "output": f"learned-rmac-{backbone}-gordo",
        "backbone": backbone,
        "weights": "imagenet",  # initialise from ImageNet (Keras download or a weights file)
        "max_side": 800,  # Gordo et al.: training images rescaled to 800 pixels
        "levels": 3,
        "dim": dim,
        "margin": 0.1,
        "optimizer": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-5},
        "steps": 8000,
        "batch_triplets": 64,  # Gordo et al.: batches of 64 triplets
        "mining": {"pool": 5000, "every": 64, "negatives": 10, "strategy": "hard"},
        "pca_images": 5000,
        "pca_eps": 1e-6,
        "cache_images": False,
    }


confs["resnet101-gordo"] = _gpu("resnet101", 2048)
confs["vgg16-gordo"] = _gpu("vgg16", 512)


# =========================================================================== the model
def _cells(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """A normalised box ``(ymin, xmin, ymax, xmax)`` as map cells ``x0, y0, x1, y1`` (>= 1 cell)."""
    ymin, xmin, ymax, xmax = box
    x0 = min(int(np.floor(xmin * w)), w - 1)
    y0 = min(int(np.floor(ymin * h)), h - 1)
    x1 = max(x0 + 1, min(w, int(np.ceil(xmax * w))))
    y1 = max(y0 + 1, min(h, int(np.ceil(ymax * h))))
    return x0, y0, x1, y1


@dataclass
class LearnedRMAC:
    """Backbone + differentiable R-MAC head.

    Attributes:
        backbone: the Keras backbone (:class:`retrieval.rmac.Backbone`).
        shift: tf.Variable (C,), the PCA mean with a minus sign at initialisation.
        fc: tf.Variable (C, D), the whitening projection transposed at initialisation.
        conf: the training configuration.
    """

    backbone: Backbone
    shift: Any
    fc: Any
    conf: dict[str, Any]
    history: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, conf: Mapping[str, Any]) -> LearnedRMAC:
        import tensorflow as tf

        bb = build_backbone(conf["backbone"], conf.get("weights"), seed=int(conf.get("seed", 0)))
        c = bb.channels
        d = int(conf.get("dim") or c)
        shift = tf.Variable(tf.zeros([c]), name="rmac_shift")
        eye = np.eye(c, d, dtype=np.float32)
        fc = tf.Variable(eye, name="rmac_fc")
        return cls(bb, shift, fc, dict(conf))

    @property
    def trainable_variables(self) -> list[Any]:
        head = [self.shift, self.fc]
        if self.conf.get("train_backbone", True):
            return list(self.backbone.model.trainable_variables) + head
        return head

    # ------------------------------------------------------------------ regions
    def _masks(self, h: int, w: int, boxes: Sequence[Sequence[float]] | None) -> np.ndarray:
        """(R, h, w) float32 masks of the grid or of normalised boxes."""
        if boxes:
            cells = [_cells(b, h, w) for b in boxes]
        else:
            cells = [
                tuple(r)
                for r in rmac_regions(
                    w, h, int(self.conf["levels"]), overlap=float(self.conf["overlap"])
                )
            ]
        m = np.zeros((len(cells), h, w), np.float32)
        for r, (x0, y0, x1, y1) in enumerate(cells):
            m[r, y0:y1, x0:x1] = 1.0
        return m

    def _map_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the backbone's map for an (height, width) input (cached)."""
        cache = self.__dict__.setdefault("_sizes", {})
        if (height, width) not in cache:
            try:
                shape = self.backbone.model.compute_output_shape((1, height, width, 3))
                cache[(height, width)] = (int(shape[1]), int(shape[2]))
            except Exception:  # some layers cannot infer shapes statically: run it once
                out = self.backbone.model(np.zeros((1, height, width, 3), np.float32))
                cache[(height, width)] = (int(out.shape[1]), int(out.shape[2]))
        return cache[(height, width)]

    def _pool_fn(self) -> Any:
        """tf.function: (B, H, W, 3) input, (B, R, h, w) masks -> (B, R, C) pooled, L2-normed."""
        import tensorflow as tf

        fn = self.__dict__.get("_pool")
        if fn is None:
            model = self.backbone.model

            @tf.function(
                input_signature=[
                    tf.TensorSpec([None, None, None, 3], tf.float32),
                    tf.TensorSpec([None, None, None, None], tf.float32),
                ]
            )
            def fn(x: Any, masks: Any) -> Any:
                fmap = tf.nn.relu(model(x, training=False))  # batch norm stays frozen
                p = tf.reduce_max(fmap[:, None] * masks[..., None], axis=[2, 3])
                return tf.math.l2_normalize(p, axis=-1, epsilon=1e-12)

            self.__dict__["_pool"] = fn
        return fn

    def _pooled(
        self, images: Sequence[np.ndarray], boxes: Sequence[Any] | None
    ) -> tuple[Any, np.ndarray]:
        """ROI max-pooled, L2-normalised regional vectors, images in input order.

        Images of one size run as one batch; batch normalisation stays frozen (inference
        statistics), as usual when fine-tuning for retrieval with small batches.

        Returns:
            ``(pooled tf (N, R, C), valid (N, R) float32)``, R the largest region count
            (missing regions are zero and invalid).
        """
        import tensorflow as tf

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        groups, order, valids = [], [], []
        masks_all: list[list[np.ndarray]] = []
        for shape, members in by_shape.items():
            h, w = self._map_size(shape[0], shape[1])
            masks_all.append(
                [self._masks(h, w, None if boxes is None else boxes[i]) for i in members]
            )
        rmax = max(m.shape[0] for ms in masks_all for m in ms)
        fn = self._pool_fn()
        for members, ms in zip(by_shape.values(), masks_all, strict=True):
            h, w = ms[0].shape[1:]
            mk = np.zeros((len(members), rmax, h, w), np.float32)
            val = np.zeros((len(members), rmax), np.float32)
            for j, m in enumerate(ms):
                mk[j, : m.shape[0]] = m
                val[j, : m.shape[0]] = 1.0
            x = self.backbone.preprocess(np.stack([images[i] for i in members]))
            groups.append(fn(tf.constant(x), tf.constant(mk)))
            order.extend(members)
            valids.append(val)
        inv = np.argsort(np.asarray(order))
        pooled = tf.gather(tf.concat(groups, axis=0), inv)
        return pooled, np.concatenate(valids)[inv]

    def descriptors(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Any] | None = None,
    ) -> Any:
        """Differentiable descriptors of RGB uint8 images (any sizes): tf (B, D), L2-normalised.

        Args:
            images: B (H, W, 3) uint8 arrays.
            boxes: per image a list of normalised ``(ymin, xmin, ymax, xmax)`` regions, or
                None / an empty list for the R-MAC grid.
        """
        import tensorflow as tf

        pooled, valid = self._pooled(images, boxes)  # (B, R, C), (B, R)
        y = tf.math.l2_normalize(tf.matmul(pooled + self.shift, self.fc), axis=-1, epsilon=1e-12)
        summed = tf.reduce_sum(y * tf.constant(valid)[..., None], axis=1)
        return tf.math.l2_normalize(summed, axis=-1, epsilon=1e-12)

    def describe(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Any] | None = None,
        *,
        batch: int = 32,
    ) -> np.ndarray:
        """Descriptors as numpy (N, D), in batches (no gradient)."""
        out = []
        for s in range(0, len(images), batch):
            b = None if boxes is None else boxes[s : s + batch]
            out.append(self.descriptors(images[s : s + batch], b).numpy())
        d = int(self.fc.shape[1])
        return np.concatenate(out) if out else np.zeros((0, d), np.float32)

    def describe_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        bbxs: Sequence[Sequence[float] | None] | None = None,
    ) -> np.ndarray:
        """Descriptors (N, D) of image files (queries cropped to their ``bbx`` in pixels)."""
        out = []
        ms = int(self.conf["max_side"])
        for i, p in enumerate(tqdm(paths, desc="learned R-MAC", disable=len(paths) < 20)):
            img = load_rgb(p, ms, None if bbxs is None else bbxs[i])
            out.append(self.descriptors([img]).numpy())
        d = int(self.fc.shape[1])
        return np.concatenate(out) if out else np.zeros((0, d), np.float32)

    def init_pca(self, images: Sequence[np.ndarray], boxes: Sequence[Any] | None = None) -> None:
        """Set shift + FC to the PCA-whitening of these images' regional vectors (Gordo et al.)."""
        import tensorflow as tf

        regs: list[np.ndarray] = []
        for s in range(0, len(images), 32):
            b = None if boxes is None else boxes[s : s + 32]
            pooled, valid = self._pooled(images[s : s + 32], b)
            regs.append(pooled.numpy()[valid > 0])
        x = np.concatenate(regs)
        d = int(self.conf.get("dim") or x.shape[1])
        wh = learn_whitening(x, dim=d, eps=float(self.conf.get("pca_eps", 1e-6)))
        proj = np.zeros((x.shape[1], d), np.float32)  # pad if fewer components than d
        proj[:, : wh.proj.shape[0]] = wh.proj.T
        self.shift.assign(tf.constant(-wh.mean))
        self.fc.assign(tf.constant(proj))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike[str]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "backbone.weights.h5") as tmp:
            target = tmp.with_name(tmp.name + ".weights.h5")
            self.backbone.model.save_weights(str(target))
            os.replace(target, tmp)
        with atomic_path(folder / "head.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(FORMAT_VERSION),
                kind=np.str_("learned_rmac"),
                shift=self.shift.numpy(),
                fc=self.fc.numpy(),
            )
        write_json(
            folder / "model.json",
            {
                "format_version": FORMAT_VERSION,
                "kind": "learned_rmac",
                "conf": self.conf,
                "history": [float(v) for v in self.history],
            },
        )
        return folder


def model_tag(folder: str | os.PathLike[str]) -> str:
    """Name of a trained model for result folders: its folder name plus a hash of its head."""
    folder = Path(folder)
    head = folder / "head.npz"
    if not head.exists():
        raise FileNotFoundError(f"learned R-MAC model not found (no head.npz): {folder}")
    st = head.stat()
    return f"{folder.name}-{config_hash({'p': str(folder.resolve()), 't': st.st_mtime_ns}, 8)}"


def load_model(folder: str | os.PathLike[str]) -> LearnedRMAC:
    """Load a model written by :meth:`LearnedRMAC.save` / :func:`main`."""
    import tensorflow as tf

    folder = Path(folder)
    for name in ("model.json", "head.npz", "backbone.weights.h5"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"learned R-MAC model: {folder / name} not found")
    meta = read_json(folder / "model.json")
    if meta.get("kind") != "learned_rmac" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / 'model.json'}: not a learned R-MAC model of format "
            f"{FORMAT_VERSION} (kind {meta.get('kind')!r}, format "
            f"{meta.get('format_version')!r})"
        )
    with np.load(folder / "head.npz", allow_pickle=False) as z:
        if int(z["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{folder / 'head.npz'}: format_version {int(z['format_version'])}")
        shift, fc = z["shift"].astype(np.float32), z["fc"].astype(np.float32)
    conf = dict(meta["conf"])
    bb = build_backbone(
        conf["backbone"], str(folder / "backbone.weights.h5"), seed=int(conf.get("seed", 0))
    )
    if fc.shape[0] != bb.channels or shift.shape != (bb.channels,):
        raise ValueError(
            f"{folder / 'head.npz'}: head {fc.shape} does not fit the "
            f"{bb.channels}-channel backbone"
        )
    model = LearnedRMAC(
        bb, tf.Variable(shift), tf.Variable(fc), conf, [float(v) for v in meta.get("history", [])]
    )
    return model


def model_files_hash(folder: str | os.PathLike[str]) -> str:
    """SHA-1 of a saved model's :data:`MODEL_FILES` (their bytes, in order): equal hash, same
    descriptors; a retrained or edited model gets another."""
    folder = Path(folder)
    h = hashlib.sha1()
    for name in MODEL_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"learned R-MAC model: {path} not found")
        h.update(name.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# =========================================================================== describe stage
def _describe_shard(shard: Shard, out: Path, model: LearnedRMAC) -> dict[str, int]:
    """Descriptors of a shard's images ``[name, path, bbx (x1, y1, x2, y2) or None]`` in order:
    ``out/descriptors.npy`` float32 (n, D), :meth:`LearnedRMAC.describe_paths` exactly."""
    paths = [path for _, path, _ in shard.items]
    bbxs = [None if b is None else tuple(float(v) for v in b) for _, _, b in shard.items]
    desc = np.ascontiguousarray(model.describe_paths(paths, bbxs), dtype=np.float32)
    with atomic_path(out / DESCRIPTORS_NAME) as tmp, open(tmp, "wb") as fh:
        np.save(fh, desc, allow_pickle=False)
    return {"images": len(shard.items)}


def describe_stage(
    model_folder: str | os.PathLike[str],
    items: Sequence[ImageItem],
    *,
    shard_size: int,
    resources: Resources | None = None,
    retries: int = 2,
) -> tuple[Stage, list[Shard]]:
    """Learned R-MAC descriptors as an executor stage: one shard per ``shard_size`` images.

    The model (:func:`load_model` of ``model_folder``) is the stage's model, loaded once per
    worker process; the stage's conf is the resolved folder and :func:`model_files_hash`, so a
    retrained model redoes every shard. Each image is described alone, as
    :meth:`LearnedRMAC.describe_paths` does, so the descriptors do not depend on the sharding.

    Args:
        model_folder: a model written by :func:`main` / :meth:`LearnedRMAC.save`.
        items: the images; ``bbx`` (x1, y1, x2, y2) in pixels crops a query.
        shard_size: images per shard (>= 1).
        resources: per-task resources (default: half a CPU, as the R-MAC activations).
        retries: extra attempts of a shard that raised.

    Returns:
        ``(stage, shards)``; ``executor.run(stage, shards, folder)`` writes
        ``folder/shard-XXXXX/descriptors.npy`` float32 (n_shard, D); concatenated in shard
        order they are the items' descriptors (N, D).
    """
    from gldboxes.executor import Resources, Stage, make_shards

    if shard_size < 1:
        raise ValueError(f"describe_stage: shard_size must be >= 1, got {shard_size}")
    folder = Path(model_folder).resolve()
    conf = {"model": os.fspath(folder), "files": model_files_hash(folder)}
    rows = [
        [
            it.name,
            os.fspath(Path(it.path).resolve()),
            None if it.bbx is None else [float(v) for v in it.bbx],
        ]
        for it in items
    ]
    stage = Stage(
        "learned-rmac-describe",
        _describe_shard,
        conf=conf,
        load_model=functools.partial(load_model, os.fspath(folder)),
        resources=resources or Resources(num_cpus=0.5),
        retries=retries,
    )
    return stage, make_shards(rows, shard_size, prefix="shard")


# =========================================================================== training
def train(
    conf: Mapping[str, Any],
    images: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    boxes: Sequence[Any] | None = None,
    *,
    model: LearnedRMAC | None = None,
) -> LearnedRMAC:
    """Train learned R-MAC with the triplet loss and hard-triplet mining; returns the model.

    Args:
        conf: a preset of :data:`confs` (or a dict with the same keys).
        images: N RGB uint8 training images (already downscaled to ``conf['max_side']``).
        labels: (N,) landmark ids.
        boxes: optional per-image region boxes (``conf['regions'] == 'boxes'``).
        model: continue from this model instead of building one (PCA init is then skipped).

    The per-step batch losses are appended to ``model.history``.
    """
    import keras
    import tensorflow as tf

    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"train: {len(images)} images for {len(labels)} labels")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"train: {len(boxes)} box lists for {len(images)} images")
    rng = np.random.default_rng(int(conf.get("seed", 0)))
    if model is None:
        model = LearnedRMAC.build(conf)
        sel = rng.choice(len(images), min(int(conf["pca_images"]), len(images)), replace=False)
        model.init_pca([images[i] for i in sel], None if boxes is None else [boxes[i] for i in sel])
    opt_conf = conf["optimizer"]
    opt = keras.optimizers.SGD(
        learning_rate=float(opt_conf["lr"]),
        momentum=float(opt_conf["momentum"]),
        weight_decay=float(opt_conf.get("weight_decay") or 0.0) or None,
        clipnorm=None if opt_conf.get("clipnorm") is None else float(opt_conf["clipnorm"]),
    )
    variables = model.trainable_variables
    mining = conf["mining"]
    bsz = int(conf["batch_triplets"])
    margin = float(conf["margin"])
    triplets = np.zeros((0, 3), np.int64)
    cursor = 0
    for step in tqdm(range(int(conf["steps"])), desc="learned R-MAC", disable=conf["steps"] < 50):
        if step % int(mining["every"]) == 0 or len(triplets) == 0:
            pool = np.sort(
                rng.choice(len(images), min(int(mining["pool"]), len(images)), replace=False)
            )
            desc = model.describe(
                [images[i] for i in pool], None if boxes is None else [boxes[i] for i in pool]
            )
            t, _ = mine_triplets(
                desc,
                labels[pool],
                n_triplets=bsz * int(mining["every"]),
                negatives=int(mining["negatives"]),
                margin=margin,
                rng=rng,
                strategy=str(mining.get("strategy", "hard")),
            )
            triplets = pool[t]
            cursor = 0
        idx = np.arange(cursor, cursor + bsz) % len(triplets)
        cursor += bsz
        batch = triplets[idx]
        flat = batch.T.ravel()  # anchors, positives, negatives
        imgs = [images[i] for i in flat]
        bxs = None if boxes is None else [boxes[i] for i in flat]
        with tf.GradientTape() as tape:
            d = model.descriptors(imgs, bxs)
            a, p, n = d[:bsz], d[bsz : 2 * bsz], d[2 * bsz :]
            loss = triplet_loss(a, p, n, margin)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(
            [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        )
        model.history.append(float(loss))
        logger.debug("step %d loss %.5f", step, float(loss))
    return model


# =========================================================================== the stage
def read_train_csv(
    path: str | os.PathLike[str], *, exclude: set[str] | None = None
) -> list[tuple[str, Path, int]]:
    """Rows ``(id, image path, landmark_id)`` of a GLD-style ``id,url,landmark_id`` CSV.

    ``url`` is a path relative to the CSV's folder (the synthetic world) or absolute.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training CSV not found: {path}")
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for c in ("id", "url", "landmark_id"):
            if c not in cols:
                raise ValueError(f"{path}: expected header id,url,landmark_id, got {cols}")
        for line, row in enumerate(reader, start=2):
            if exclude and row["id"] in exclude:
                continue
            try:
                lid = int(row["landmark_id"])
            except ValueError as exc:
                raise ValueError(
                    f"{path}:{line}: landmark_id {row['landmark_id']!r} is not an integer"
                ) from exc
            p = Path(row["url"])
            rows.append((row["id"], p if p.is_absolute() else path.parent / p, lid))
    if not rows:
        raise ValueError(f"{path}: no training rows")
    return rows


def main(
    conf: Mapping[str, Any],
    train_csv: str | os.PathLike[str],
    export_dir: str | os.PathLike[str],
    *,
    boxes: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train learned R-MAC on a GLD-style training CSV; returns the model folder.

    Args:
        conf: a preset of :data:`confs`.
        train_csv: ``id,url,landmark_id``; ids listed in a ``no_landmark.csv`` beside it (the
            synthetic world) are left out.
        export_dir: the model goes to ``export_dir/<conf['output']>/``.
        boxes: a boxes CSV (``id,box``) for ``regions: boxes`` (default: ``boxes.csv`` beside
            the training CSV).
        overwrite: retrain even when the model exists with the same configuration.
    """
    from gldboxes.boxes import read_boxes_csv

    conf = copy.deepcopy(dict(conf))
    train_csv = Path(train_csv)
    folder = Path(export_dir) / conf["output"]
    key = config_hash(
        {
            **conf,
            "train_csv": str(train_csv.resolve()),
            "boxes": None if boxes is None else str(boxes),
        }
    )
    done = folder / "done.json"
    if done.exists() and not overwrite and read_json(done).get("config_hash") == key:
        logger.info("learned R-MAC model exists, skipping: %s", folder)
        return folder
    exclude: set[str] = set()
    nl = train_csv.parent / "no_landmark.csv"
    if nl.exists():
        with open(nl, newline="", encoding="utf-8") as fh:
            exclude = {r["id"] for r in csv.DictReader(fh)}
    rows = read_train_csv(train_csv, exclude=exclude)
    region_boxes: list[Any] | None = None
    if conf.get("regions", "grid") == "boxes":
        bpath = Path(boxes) if boxes is not None else train_csv.parent / "boxes.csv"
        if not bpath.exists():
            raise FileNotFoundError(f"boxes file not found: {bpath}")
        by_id = read_boxes_csv(bpath)
        region_boxes = [
            [(b.ymin, b.xmin, b.ymax, b.xmax) for b in by_id.get(r[0], [])] for r in rows
        ]
    elif conf.get("regions", "grid") != "grid":
        raise ValueError(
            f"learned R-MAC conf: regions must be 'grid' or 'boxes', got {conf.get('regions')!r}"
        )
    ms = int(conf["max_side"])
    images: Sequence[np.ndarray]
    if conf.get("cache_images", True):
        images = [
            load_rgb(p, ms)
            for _, p, _ in tqdm(rows, desc="training images", disable=len(rows) < 50)
        ]
    else:
        images = _LazyImages([p for _, p, _ in rows], ms)
    labels = np.array([r[2] for r in rows])
    model = train(conf, images, labels, region_boxes)
    model.save(folder)
    write_config(folder, {**conf, "train_csv": str(train_csv), "boxes": boxes})
    write_json(
        done,
        {
            "config_hash": key,
            "n_images": len(rows),
            "final_loss": model.history[-1] if model.history else None,
            "first_loss": model.history[0] if model.history else None,
        },
    )
    logger.info(
        "learned R-MAC: %d images, %d steps, loss %.4f -> %.4f; saved %s",
        len(rows),
        len(model.history),
        model.history[0] if model.history else float("nan"),
        model.history[-1] if model.history else float("nan"),
        folder,
    )
    return folder


class _LazyImages(Sequence[np.ndarray]):
    """Training images decoded on access (``cache_images: False``: large training sets)."""

    def __init__(self, paths: Sequence[Path], max_side: int) -> None:
        self.paths = list(paths)
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [load_rgb(p, self.max_side) for p in self.paths[i]]
        return load_rgb(self.paths[int(i)], self.max_side)
