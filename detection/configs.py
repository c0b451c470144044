"""Detector presets on TensorFlow Model Garden (``official.vision``) and their experiment configs.

The paper (Teichmann et al., CVPR 2019, Sec. 4) trains two detectors on Google Landmark Boxes
with the TF Object Detection API: an SSD with a MobileNetV2 backbone (85.61% AP@0.5, 27 ms on
a TitanX) and a Faster R-CNN with ResNet-50 (84.37%, 89 ms). Their training settings were never
published (tensorflow/models#7223), so the GPU presets below are our choices, modelled on the
OD API's TF2 zoo configs (``ssd_mobilenet_v2_fpnlite_320x320``,
``faster_rcnn_resnet50_v1_640x640``) scaled to one GPU:

========================  ==================================================================
``ssd_mobilenetv2``       RetinaNet (single stage, focal loss) on MobileNetV2 with a separable
                          FPN and head = the OD API's "SSD MobileNetV2 FPNLite"; 384x384
                          (Model Garden's mobile RetinaNet size at max_level 7).
``frcnn_resnet50``        Faster R-CNN ResNet-50-FPN: Model Garden's ``maskrcnn`` task with
                          ``include_mask=False``; 640x640; ImageNet ResNet-50 backbone init.
``tiny_cpu``              A 0.35-width MobileNetV2 RetinaNet at 128x128 that learns the
                          synthetic world's boxes in minutes on 2 CPU cores (tests, demos).
``frcnn_resnet50_paper``  The paper's fine-tuning protocol on these architectures: the OD API
``ssd_mobilenetv2_paper`` sample configs' schedules, AP@0.5 evaluated during training, and a
                          pretrained start required (``--init-checkpoint``); see below ``confs``.
========================  ==================================================================

Reproducing the paper's training on a GPU machine (one GPU; several are used automatically
through ``MirroredStrategy`` with the same global batch)::

    pip install -e ".[detection]" "tensorflow[and-cuda]==2.20.0"
    gldboxes download urls --csv gld/train.csv --out gld            # GLD-v1 training images
    gldboxes detect records --conf gld --boxes gld/boxes.csv --images gld \
        --images-csv gld/train.csv --out data                        # 90/10 hashed split
    gldboxes detect train --conf ssd_mobilenetv2 --records data/records-gld-val10-neg \
        --runs runs [--init-checkpoint PATH_OR_URL]                  # or --conf frcnn_resnet50
        [--eval-every 2000]                                          # AP@0.5 in TensorBoard
    gldboxes detect train --conf ssd_mobilenetv2_paper --records data/records-gld-val10-neg \
        --runs runs --init-checkpoint mobilenet_v2_..._1.0_224_no_top.h5   # the paper's protocol
    tensorboard --logdir runs/detector-ssd_mobilenetv2-384
    gldboxes detect eval --run runs/detector-ssd_mobilenetv2-384 \
        --records data/records-gld-val10-neg                         # AP@0.5 + COCO sweep
    gldboxes detect export --run runs/detector-ssd_mobilenetv2-384
    gldboxes detect boxes --model runs/detector-ssd_mobilenetv2-384/export-step60000 \
        --images roxford5k/jpg --out boxes-roxford5k.csv

Every key of a preset is commented; :func:`build_experiment` turns a preset plus a records
folder into a Model Garden ``ExperimentConfig`` (TensorFlow is imported there, lazily).
CPU lessons (see STACK.md): batch-norm momentum 0.9 and Adam 1e-3 for short runs from
scratch, float32 (no bfloat16), no ``gs://`` init checkpoint, ``num_classes`` counts the
background (2 = background + landmark).

Model Garden pads every input to a multiple of ``2**max_level`` (the coarsest FPN stride), so
a preset's ``input_size`` must already be such a multiple: otherwise the backbone, built for
``input_size``, receives the padded batch and the first training step fails. :func:`get_conf`
and :func:`build_experiment` check it (:func:`check_input_size`). ``get_conf(name,
input_size=[128, 128])`` runs the same code path at a tiny size (tests, CPU smoke runs); the
run folder name then carries the new size.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detection.records import RecordsInfo

__all__ = [
    "NUM_CLASSES",
    "build_experiment",
    "check_input_size",
    "confs",
    "get_conf",
    "resolve_init_checkpoint",
    "versions",
]

logger = logging.getLogger("detection.configs")

NUM_CLASSES = 2  # Model Garden counts the background: 0 = background, 1 = landmark

_OPT_SSD: dict[str, Any] = {
    "type": "sgd",  # sgd (momentum) | adam | rmsprop (rho, momentum, epsilon)
    "learning_rate": 0.02,  # peak rate: OD API FPNLite uses 0.08 at batch 128, scaled to 32
    "momentum": 0.9,  # sgd only
    "schedule": "cosine",  # constant | cosine (to 0 at train_steps) | exponential (decay_*)
    "warmup_steps": 1000,  # linear warm-up from warmup_learning_rate
    "warmup_learning_rate": 0.002,
}

confs: dict[str, dict[str, Any]] = {
    "ssd_mobilenetv2": {
        "output": "detector-ssd_mobilenetv2-384",  # run folder name under the runs root
        "family": "retinanet",  # Model Garden task: retinanet | maskrcnn
        # Height, width fed to the network (aspect kept, padded); a multiple of 2**max_level.
        # Not the OD API's 320: Model Garden pads to a multiple of 128 at max_level 7, so 320
        # would reach the backbone as 384. 384 is Model Garden's own size for its mobile
        # RetinaNet at levels 3-7 (``retinanet_mobile_coco``); 256 would lose resolution.
        "input_size": [384, 384],
        "min_level": 3,  # finest FPN level (stride 8)
        "max_level": 7,  # coarsest FPN level (stride 128): landmarks are large
        "backbone": {"type": "mobilenet", "model_id": "MobileNetV2", "filter_size_scale": 1.0},
        "decoder": {"num_filters": 128, "use_separable_conv": True},  # FPNLite
        "head": {"num_convs": 4, "num_filters": 128, "use_separable_conv": True},
        "anchor": {"num_scales": 3, "aspect_ratios": [0.5, 1.0, 2.0], "anchor_size": 4.0},
        "activation": "relu6",  # MobileNetV2's activation
        "norm_momentum": 0.997,  # batch-norm moving-average momentum (long GPU runs)
        "train_batch_size": 32,  # global batch (split over GPUs by MirroredStrategy)
        "eval_batch_size": 8,
        "train_steps": 60000,  # ~22 epochs of the ~86k GLD boxes training images
        "steps_per_loop": 200,  # steps between host callbacks (progress bar, summaries)
        "checkpoint_interval": 2000,  # steps between checkpoints (resume points)
        "max_to_keep": 5,  # checkpoints kept
        "eval_every": None,  # steps between AP@0.5 evaluations while training (None: off)
        "requires_init_checkpoint": False,  # True: refuse to train without --init-checkpoint
        "optimizer": dict(_OPT_SSD),
        "weight_decay": 4e-5,  # L2 on weights
        "augmentation": {"hflip": True, "scale_min": 0.8, "scale_max": 1.25},
        "shuffle_buffer": 2048,  # examples in the training shuffle buffer
        "init_checkpoint": None,  # path or URL of an ImageNet/COCO checkpoint (None: scratch)
        "init_checkpoint_modules": "backbone",  # all | backbone | decoder
        "mixed_precision": "float32",  # float32 | mixed_float16 (GPU) | mixed_bfloat16 (TPU)
        "pre_nms_score_threshold": 0.01,  # lowest score kept before NMS (AP needs low scores)
        "nms_iou_threshold": 0.5,
        "max_detections": 100,  # boxes returned per image
        "seed": 0,
    },
    "frcnn_resnet50": {
        "output": "detector-frcnn_resnet50-640",
        "family": "maskrcnn",  # Faster R-CNN = the maskrcnn task with include_mask=False
        "input_size": [640, 640],
        "min_level": 2,
        "max_level": 6,
        "backbone": {"type": "resnet", "model_id": 50},
        "decoder": {"num_filters": 256, "use_separable_conv": False},  # FPN
        "head": {"num_convs": 0, "num_filters": 256, "num_fcs": 2, "fc_dims": 1024},  # 2-fc
        "anchor": {"num_scales": 1, "aspect_ratios": [0.5, 1.0, 2.0], "anchor_size": 8.0},
        "activation": "relu",
        "norm_momentum": 0.997,
        "train_batch_size": 8,
        "eval_batch_size": 4,
        "train_steps": 100000,  # ~9 epochs of GLD boxes at batch 8
        "steps_per_loop": 100,
        "checkpoint_interval": 2000,
        "max_to_keep": 5,
        "eval_every": None,
        "requires_init_checkpoint": False,
        "optimizer": {
            "type": "sgd",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "schedule": "cosine",
            "warmup_steps": 2000,
            "warmup_learning_rate": 0.001,
        },
        "weight_decay": 4e-5,
        "augmentation": {"hflip": True, "scale_min": 0.8, "scale_max": 1.25},
        "shuffle_buffer": 1024,
        # Model Garden's own ImageNet ResNet-50 (the COCO configs use it); any local path or
        # http(s) URL of a checkpoint (or a .tar.gz holding one) works too.
        "init_checkpoint": "gs://cloud-tpu-checkpoints/vision-2.0/resnet50_imagenet/ckpt-28080",
        "init_checkpoint_modules": "backbone",
        "mixed_precision": "float32",
        "pre_nms_score_threshold": 0.01,
        "nms_iou_threshold": 0.5,
        "max_detections": 100,
        "num_proposals": 1000,  # RPN proposals kept in training (test: 1000 too)
        "seed": 0,
    },
    "tiny_cpu": {
        "output": "detector-tiny_cpu-128",
        "family": "retinanet",
        "input_size": [128, 128],
        "min_level": 3,
        "max_level": 5,  # 128 / 32 = 4x4 coarsest map
        "backbone": {"type": "mobilenet", "model_id": "MobileNetV2", "filter_size_scale": 0.35},
        "decoder": {"num_filters": 32, "use_separable_conv": True},
        "head": {"num_convs": 1, "num_filters": 32, "use_separable_conv": True},
        "anchor": {"num_scales": 2, "aspect_ratios": [0.5, 1.0, 2.0], "anchor_size": 3.0},
        "activation": "relu6",
        "norm_momentum": 0.9,  # 0.99 leaves eval at the initial loss in short runs
        "train_batch_size": 4,
        "eval_batch_size": 4,
        "train_steps": 300,
        "steps_per_loop": 25,
        "checkpoint_interval": 100,
        "max_to_keep": 3,
        "eval_every": None,
        "requires_init_checkpoint": False,
        "optimizer": {
            "type": "adam",
            "learning_rate": 1e-3,
            "schedule": "constant",
            "warmup_steps": 0,
            "warmup_learning_rate": 0.0,
        },
        "weight_decay": 0.0,
        "augmentation": {"hflip": True, "scale_min": 0.9, "scale_max": 1.1},
        "shuffle_buffer": 64,
        "init_checkpoint": None,  # from scratch: no network access needed
        "init_checkpoint_modules": "backbone",
        "mixed_precision": "float32",
        "pre_nms_score_threshold": 0.01,
        "nms_iou_threshold": 0.5,
        "max_detections": 20,
        "seed": 0,
    },
}


# The paper's fine-tuning protocol (Teichmann et al. 2019, Sec. 4): a Faster R-CNN ResNet-50 and
# an SSD MobileNetV2 from the TF Object Detection API, pretrained, fine-tuned on the Google
# Landmark Boxes train split and scored by AP@0.5 on its validation split (the paper reports
# 85.61 for the SSD and 84.37 for the Faster R-CNN, as at the top of this module). The authors
# did not publish their training configs (tensorflow/models#7223),
# so these presets carry the schedule of the OD API sample configs the paper's two models come
# from (``faster_rcnn_resnet50_coco.config``, ``ssd_mobilenet_v2_coco.config``), moved onto
# Model Garden's architectures above; they evaluate AP@0.5 during training and refuse to start
# without ``--init-checkpoint`` (pass ``none`` to train from scratch on purpose). Where to get
# the pretrained files: README, "Detectors", and ``detection/init.py``.
confs["frcnn_resnet50_paper"] = {
    **copy.deepcopy(confs["frcnn_resnet50"]),
    "output": "detector-frcnn_resnet50_paper-640",
    # OD API: keep-aspect resize to min side 600 / max side 1024; Model Garden feeds one padded
    # size, a multiple of 2**max_level = 64: 640x640 (its own R50-FPN COCO size).
    "input_size": [640, 640],
    # OD API sample: batch 1 at learning rate 3e-4 (frozen batch norm). Model Garden trains
    # batch norm, which needs several images a batch: batch 8 with the rate scaled linearly.
    "train_batch_size": 8,
    # The OD API sample's 200k steps at batch 1 = 200k images = 25k steps at batch 8
    # (~2.3 epochs of the ~86k training images of Google Landmark Boxes).
    "train_steps": 25000,
    "checkpoint_interval": 2500,
    "eval_every": 2500,  # AP@0.5 on the validation split 10 times during training
    "requires_init_checkpoint": True,
    "optimizer": {
        "type": "sgd",  # OD API: momentum_optimizer, momentum 0.9
        "learning_rate": 0.0024,  # OD API 0.0003 at batch 1, x8
        "momentum": 0.9,
        # OD API: manual steps at 900k and 1.2M steps, beyond its 200k: constant in effect.
        "schedule": "constant",
        "warmup_steps": 500,  # short linear warm-up: the x8 rate on a fresh class head
        "warmup_learning_rate": 0.0003,
    },
    # ImageNet ResNet-50 (Keras .h5 or Model Garden checkpoint) for the backbone, or a
    # Model Garden Faster R-CNN R50-FPN COCO checkpoint with --init-modules all.
    "init_checkpoint": None,
    "init_checkpoint_modules": "backbone",
    # RPN proposals: the OD API keeps 300, but Model Garden's ROI sampler draws 512 a image
    # from them, so the base preset's 1000 stays.
    "num_proposals": 1000,
}
confs["ssd_mobilenetv2_paper"] = {
    **copy.deepcopy(confs["ssd_mobilenetv2"]),
    "output": "detector-ssd_mobilenetv2_paper-384",
    # OD API: fixed 300x300 resize; the nearest size Model Garden accepts at max_level 7
    # (multiples of 128) is 384, as in the ssd_mobilenetv2 preset.
    "input_size": [384, 384],
    "train_batch_size": 24,  # OD API sample batch
    "train_steps": 200000,  # OD API sample num_steps (~56 epochs of ~86k images)
    "checkpoint_interval": 10000,
    "eval_every": 10000,  # AP@0.5 on the validation split 20 times during training
    "requires_init_checkpoint": True,
    "optimizer": {
        "type": "rmsprop",  # OD API: rms_prop_optimizer
        "learning_rate": 0.004,  # OD API initial_learning_rate
        "momentum": 0.9,  # OD API momentum_optimizer_value
        "rho": 0.9,  # OD API decay
        "epsilon": 1.0,  # OD API epsilon
        "schedule": "exponential",  # OD API exponential_decay_learning_rate
        "decay_steps": 800720,  # OD API decay_steps
        "decay_rate": 0.95,  # OD API decay_factor
        "warmup_steps": 0,
        "warmup_learning_rate": 0.0,
    },
    # Keras ImageNet MobileNetV2 1.0 .h5 (backbone), or a Model Garden RetinaNet MobileNetV2
    # COCO checkpoint of this architecture with --init-modules all.
    "init_checkpoint": None,
    "init_checkpoint_modules": "backbone",
}


def get_conf(name_or_conf: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A deep copy of preset ``name`` (or of a given dict) with top-level ``overrides``;
    overrides whose value is ``None`` are ignored (unset CLI options).

    An ``input_size`` override (``[h, w]`` or one int for a square) also renames the run
    folder: ``detector-ssd_mobilenetv2-384`` becomes ``detector-ssd_mobilenetv2-128``.

    Raises:
        ValueError: unknown preset or key, or an input size that is not a multiple of
            ``2**max_level`` (see :func:`check_input_size`).
    """
    if isinstance(name_or_conf, str):
        if name_or_conf not in confs:
            raise ValueError(f"unknown detector preset {name_or_conf!r}; have {sorted(confs)}")
        conf = copy.deepcopy(confs[name_or_conf])
    else:
        conf = copy.deepcopy(dict(name_or_conf))
    old_size = list(conf.get("input_size", []))
    for key, value in overrides.items():
        if key not in conf:
            raise ValueError(f"unknown detector config key {key!r}; have {sorted(conf)}")
        if value is not None:
            conf[key] = value
    if isinstance(conf.get("input_size"), int):
        conf["input_size"] = [conf["input_size"]] * 2
    new_size = [int(v) for v in conf["input_size"]]
    if new_size != old_size and overrides.get("output") is None:
        conf["output"] = _rename_for_size(str(conf["output"]), old_size, new_size)
    check_input_size(conf)
    return conf


def _size_tag(size: list[int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _rename_for_size(output: str, old: list[int], new: list[int]) -> str:
    """``output`` with its trailing size tag (``-384``) replaced by the new size's."""
    old_tag = f"-{_size_tag(old)}" if len(old) == 2 else ""
    stem = output[: -len(old_tag)] if old_tag and output.endswith(old_tag) else output
    return f"{stem}-{_size_tag(new)}"


def check_input_size(conf: Mapping[str, Any]) -> None:
    """Check that ``conf["input_size"]`` is two positive multiples of ``2**max_level``.

    Model Garden pads images to that multiple, and the backbone is built for ``input_size``:
    any other size fails at the first step (``expected shape=(None, 320, 320, 3), found
    shape=(2, 384, 384, 3)``).

    Raises:
        ValueError: naming the preset, the size and the nearest valid sizes.
    """
    size = conf.get("input_size")
    stride = 2 ** int(conf["max_level"])
    name = conf.get("output", "detector config")
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise ValueError(f"{name}: input_size must be [height, width], got {size!r}")
    for side in size:
        if int(side) < stride or int(side) % stride:
            low = max(stride, int(side) // stride * stride)
            raise ValueError(
                f"{name}: input_size {list(size)} must be multiples of 2**max_level = {stride} "
                f"(Model Garden pads to it); try {low} or {low + stride}"
            )


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (written beside every run)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("tensorflow", "tf-models-official", "tf-keras", "numpy", "pycocotools", "gldboxes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def resolve_init_checkpoint(spec: str | None, cache_dir: str | os.PathLike[str]) -> str | None:
    """Turn an init-checkpoint spec into something ``tf.train.Checkpoint.read`` accepts.

    Args:
        spec: ``None``; a checkpoint prefix (``.../ckpt-123``) or a folder holding one; a
            ``gs://`` path (left to TensorFlow's GCS file system); an ``http(s)://`` or
            ``file://`` URL of a checkpoint ``.tar.gz``/``.tar``, downloaded (resumably) and
            unpacked into ``cache_dir``.
        cache_dir: where downloads go.

    Returns:
        A checkpoint prefix or ``gs://`` path, or ``None``.

    Raises:
        FileNotFoundError: no checkpoint at the path or inside the archive.
    """
    if not spec:
        return None
    if spec.startswith("gs://"):
        return spec
    if "://" in spec:
        from gldboxes.http import download_file

        name = spec.rstrip("/").rsplit("/", 1)[-1]
        archive = download_file(spec, Path(cache_dir) / name)
        if not tarfile.is_tarfile(archive):
            raise ValueError(f"{spec}: expected a .tar/.tar.gz holding a checkpoint")
        dest = Path(cache_dir) / (name.split(".tar")[0] + "-unpacked")
        if not dest.is_dir():
            tmp = dest.with_name(dest.name + ".tmp")
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(tmp, dest)
        return _find_checkpoint(dest, spec)
    return _find_checkpoint(Path(spec), spec)


def _find_checkpoint(path: Path, spec: str) -> str:
    """The checkpoint prefix at ``path`` (a prefix, or a folder searched recursively)."""
    if path.is_dir():
        indexes = sorted(path.rglob("*.index"))
        if not indexes:
            raise FileNotFoundError(f"{spec}: no checkpoint (*.index) under {path}")
        # Prefer the newest step when several checkpoints are present.
        best = max(indexes, key=lambda p: (_step_of(p.stem), str(p)))
        return str(best.with_suffix(""))
    if Path(str(path) + ".index").is_file():
        return str(path)
    raise FileNotFoundError(f"{spec}: not a checkpoint prefix or folder")


def _step_of(stem: str) -> int:
    tail = stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _optimizer_config(opt: Mapping[str, Any], train_steps: int) -> dict[str, Any]:
    """Model Garden ``OptimizationConfig`` dict from our compact optimizer settings."""
    kind = opt["type"]
    if kind == "sgd":
        optimizer = {"type": "sgd", "sgd": {"momentum": float(opt.get("momentum", 0.9))}}
    elif kind == "adam":
        optimizer = {"type": "adam", "adam": {}}
    elif kind == "rmsprop":
        optimizer = {
            "type": "rmsprop",
            "rmsprop": {
                "rho": float(opt.get("rho", 0.9)),
                "momentum": float(opt.get("momentum", 0.0)),
                "epsilon": float(opt.get("epsilon", 1e-7)),
            },
        }
    else:
        raise ValueError(f"optimizer type must be sgd, adam or rmsprop, got {kind!r}")
    lr = float(opt["learning_rate"])
    if opt.get("schedule", "constant") == "cosine":
        schedule = {
            "type": "cosine",
            "cosine": {"initial_learning_rate": lr, "decay_steps": max(1, train_steps)},
        }
    elif opt.get("schedule", "constant") == "constant":
        schedule = {"type": "constant", "constant": {"learning_rate": lr}}
    elif opt.get("schedule") == "exponential":
        schedule = {
            "type": "exponential",
            "exponential": {
                "initial_learning_rate": lr,
                "decay_steps": int(opt["decay_steps"]),
                "decay_rate": float(opt["decay_rate"]),
                "staircase": True,  # the OD API's exponential_decay_learning_rate default
            },
        }
    else:
        raise ValueError(
            f"optimizer schedule must be constant, cosine or exponential, got {opt['schedule']!r}"
        )
    out: dict[str, Any] = {"optimizer": optimizer, "learning_rate": schedule}
    warm = int(opt.get("warmup_steps", 0))
    if warm > 0:
        out["warmup"] = {
            "type": "linear",
            "linear": {
                "warmup_steps": warm,
                "warmup_learning_rate": float(opt.get("warmup_learning_rate", 0.0)),
            },
        }
    return out


def build_experiment(
    conf: Mapping[str, Any],
    records: RecordsInfo | None,
    *,
    train_split: str = "train",
    val_split: str = "val",
    init_checkpoint: str | None = None,
) -> Any:
    """The Model Garden ``ExperimentConfig`` of a preset, reading ``records``' shards.

    Args:
        conf: a preset (see ``confs``).
        records: the records folder's info; ``None`` builds a data-less config (export,
            benchmarks with random weights).
        init_checkpoint: a resolved checkpoint prefix (see :func:`resolve_init_checkpoint`),
            overriding nothing when ``None`` (the preset's own value is *not* used here).

    Returns:
        ``official.core.config_definitions.ExperimentConfig``.
    """
    from official.core import config_definitions as cfg
    from official.modeling import optimization
    from official.vision.configs import backbones, common, decoders
    from official.vision.configs import maskrcnn as mcfg
    from official.vision.configs import retinanet as rcfg

    check_input_size(conf)
    family = conf["family"]
    h, w = (int(v) for v in conf["input_size"])
    bb = conf["backbone"]
    if bb["type"] == "mobilenet":
        backbone = backbones.Backbone(
            type="mobilenet",
            mobilenet=backbones.MobileNet(
                model_id=bb["model_id"], filter_size_scale=float(bb.get("filter_size_scale", 1.0))
            ),
        )
    elif bb["type"] == "resnet":
        backbone = backbones.Backbone(
            type="resnet", resnet=backbones.ResNet(model_id=int(bb["model_id"]))
        )
    else:
        raise ValueError(f"backbone type must be mobilenet or resnet, got {bb['type']!r}")
    decoder = decoders.Decoder(
        type="fpn",
        fpn=decoders.FPN(
            num_filters=int(conf["decoder"]["num_filters"]),
            use_separable_conv=bool(conf["decoder"]["use_separable_conv"]),
        ),
    )
    norm = common.NormActivation(
        activation=conf["activation"],
        use_sync_bn=False,
        norm_momentum=float(conf["norm_momentum"]),
        norm_epsilon=1e-3,
    )
    aug = conf["augmentation"]
    n_train = records.splits.get(train_split, 0) if records else 0
    train_path = records.pattern(train_split) if records and n_train else ""
    val_path = records.pattern(val_split) if records and records.splits.get(val_split, 0) else ""
    seed = int(conf["seed"])
    dtype = (
        "float32"
        if conf["mixed_precision"] == "float32"
        else ("bfloat16" if "bfloat16" in conf["mixed_precision"] else "float16")
    )
    anchor_kw = {k: conf["anchor"][k] for k in ("num_scales", "aspect_ratios", "anchor_size")}

    if family == "retinanet":
        model: Any = rcfg.RetinaNet(
            num_classes=NUM_CLASSES,
            input_size=[h, w, 3],
            min_level=int(conf["min_level"]),
            max_level=int(conf["max_level"]),
            anchor=rcfg.Anchor(**anchor_kw),
            backbone=backbone,
            decoder=decoder,
            head=rcfg.RetinaNetHead(
                num_convs=int(conf["head"]["num_convs"]),
                num_filters=int(conf["head"]["num_filters"]),
                use_separable_conv=bool(conf["head"]["use_separable_conv"]),
            ),
            detection_generator=rcfg.DetectionGenerator(
                pre_nms_score_threshold=float(conf["pre_nms_score_threshold"]),
                nms_iou_threshold=float(conf["nms_iou_threshold"]),
                max_num_detections=int(conf["max_detections"]),
            ),
            norm_activation=norm,
        )
        parser: Any = rcfg.Parser(
            aug_rand_hflip=bool(aug["hflip"]),
            aug_scale_min=float(aug["scale_min"]),
            aug_scale_max=float(aug["scale_max"]),
        )
        train_data: Any = rcfg.DataConfig(
            input_path=train_path,
            is_training=True,
            global_batch_size=int(conf["train_batch_size"]),
            dtype=dtype,
            parser=parser,
            shuffle_buffer_size=int(conf["shuffle_buffer"]),
            seed=seed,
        )
        val_data: Any = rcfg.DataConfig(
            input_path=val_path,
            is_training=False,
            drop_remainder=False,
            global_batch_size=int(conf["eval_batch_size"]),
            dtype=dtype,
        )
        task: Any = rcfg.RetinaNetTask(
            model=model,
            train_data=train_data,
            validation_data=val_data,
            losses=rcfg.Losses(l2_weight_decay=float(conf["weight_decay"])),
            init_checkpoint=init_checkpoint,
            init_checkpoint_modules=conf["init_checkpoint_modules"],
            annotation_file=None,
            use_coco_metrics=True,
            export_config=rcfg.ExportConfig(output_normalized_coordinates=False),
        )
    elif family == "maskrcnn":
        head = conf["head"]
        model = mcfg.MaskRCNN(
            num_classes=NUM_CLASSES,
            input_size=[h, w, 3],
            min_level=int(conf["min_level"]),
            max_level=int(conf["max_level"]),
            anchor=mcfg.Anchor(**anchor_kw),
            include_mask=False,
            mask_head=None,
            mask_sampler=None,
            mask_roi_aligner=None,
            backbone=backbone,
            decoder=decoder,
            detection_head=mcfg.DetectionHead(
                num_convs=int(head["num_convs"]),
                num_filters=int(head["num_filters"]),
                num_fcs=int(head["num_fcs"]),
                fc_dims=int(head["fc_dims"]),
            ),
            roi_generator=mcfg.ROIGenerator(
                num_proposals=int(conf.get("num_proposals", 1000)),
                test_num_proposals=int(conf.get("num_proposals", 1000)),
            ),
            detection_generator=mcfg.DetectionGenerator(
                pre_nms_score_threshold=float(conf["pre_nms_score_threshold"]),
                nms_iou_threshold=float(conf["nms_iou_threshold"]),
                max_num_detections=int(conf["max_detections"]),
            ),
            norm_activation=norm,
        )
        mparser = mcfg.Parser(
            aug_rand_hflip=bool(aug["hflip"]),
            aug_scale_min=float(aug["scale_min"]),
            aug_scale_max=float(aug["scale_max"]),
        )
        train_data = mcfg.DataConfig(
            input_path=train_path,
            is_training=True,
            global_batch_size=int(conf["train_batch_size"]),
            dtype=dtype,
            parser=mparser,
            shuffle_buffer_size=int(conf["shuffle_buffer"]),
            seed=seed,
        )
        val_data = mcfg.DataConfig(
            input_path=val_path,
            is_training=False,
            drop_remainder=False,
            global_batch_size=int(conf["eval_batch_size"]),
            dtype=dtype,
        )
        task = mcfg.MaskRCNNTask(
            model=model,
            train_data=train_data,
            validation_data=val_data,
            losses=mcfg.Losses(l2_weight_decay=float(conf["weight_decay"])),
            init_checkpoint=init_checkpoint,
            init_checkpoint_modules=conf["init_checkpoint_modules"],
            annotation_file=None,
            use_coco_metrics=True,
        )
    else:
        raise ValueError(f"detector family must be retinanet or maskrcnn, got {family!r}")

    steps = int(conf["train_steps"])
    trainer = cfg.TrainerConfig(
        train_steps=steps,
        validation_steps=-1,  # the whole validation split
        validation_interval=int(conf["checkpoint_interval"]),
        steps_per_loop=int(conf["steps_per_loop"]),
        summary_interval=int(conf["steps_per_loop"]),
        checkpoint_interval=int(conf["checkpoint_interval"]),
        max_to_keep=int(conf["max_to_keep"]),
        optimizer_config=optimization.OptimizationConfig(
            _optimizer_config(conf["optimizer"], steps)
        ),
        best_checkpoint_export_subdir="",
    )
    runtime = cfg.RuntimeConfig(mixed_precision_dtype=conf["mixed_precision"].replace("mixed_", ""))
    exp = cfg.ExperimentConfig(task=task, trainer=trainer, runtime=runtime)
    exp.validate()
    return exp


def validation_steps(n_examples: int, batch_size: int) -> int:
    """Batches needed to cover ``n_examples`` (the last one partial)."""
    return max(1, math.ceil(n_examples / max(1, batch_size)))
