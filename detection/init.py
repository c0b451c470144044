"""Pretrained detector initialisation from local files: ``--init-checkpoint``, ``--init-modules``.

Two source formats, one loader each, and a dispatcher (:func:`initialize_model`):

=====================  =====================================================================
Keras ImageNet ``.h5`` The backbone only, from the weights file Keras publishes for its
                       applications (``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_
                       <alpha>_<size>_no_top.h5``, ``resnet50_weights_tf_dim_ordering_tf_
                       kernels_notop.h5``; Keras 2 "legacy" HDF5 layout: ``layer_names`` /
                       ``weight_names`` attributes). Layers are matched to Model Garden's
                       backbone in order, conv + batch-norm unit by unit, shapes checked;
                       ResNet's conv biases and batch-norm epsilon are folded into the
                       batch-norm statistics (Model Garden's convs have no bias), exactly.
TF checkpoint          A Model Garden checkpoint (a training run's ``ckpt-N``, the published
                       ImageNet backbones and COCO detectors): its root holds ``backbone/``,
                       ``decoder/``, ``head/`` (RetinaNet) or ``rpn_head/``,
                       ``detection_head/`` (Faster R-CNN). ``backbone`` initialises the
                       backbone; ``all`` the whole detector, except head outputs whose last
                       axis depends on the number of classes (COCO's 91 vs our 2), which keep
                       their fresh initialisation. TF Object Detection API checkpoints have
                       another layout and are refused.
=====================  =====================================================================

Every variable of the initialised modules must be in the file with the same shape; otherwise
a one-line ``ValueError`` names the first missing or mismatched one. ``gs://`` paths are only
accepted when Google Cloud Storage is reachable.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "INIT_MODULES",
    "check_init_modules",
    "checkpoint_keys",
    "initialize_model",
    "initializer",
    "load_checkpoint",
    "load_keras_h5",
    "read_keras_h5",
    "resolve_init_source",
]

logger = logging.getLogger("detection.init")

INIT_MODULES = ("backbone", "all")  # what a file initialises: the backbone or the whole model
_H5_SUFFIXES = (".h5", ".hdf5")
# Batch-norm epsilon of the Keras applications (not stored in the .h5): ResNet50 uses 1.001e-5,
# MobileNetV2 1e-3.
_KERAS_RESNET_EPS = 1.001e-5
_KERAS_DEFAULT_EPS = 1e-3
_RESNET_LAYER = re.compile(r"^conv(\d+)_(?:block(\d+)_(\d+)_)?(conv|bn)$")


def _is_h5(path: str) -> bool:
    return path.lower().endswith(_H5_SUFFIXES)


def _gcs_reachable(timeout: float = 3.0) -> bool:
    """Whether Google Cloud Storage answers on port 443 (a ``gs://`` read needs it)."""
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_init_source(spec: str | None, cache_dir: str | os.PathLike[str]) -> str | None:
    """Turn an ``--init-checkpoint`` value into a local ``.h5`` file or checkpoint prefix.

    Args:
        spec: ``None``/``""``/``"none"`` (train from scratch); a Keras ``.h5`` path or
            ``http(s)`` URL; a checkpoint prefix, folder, ``gs://`` path or ``.tar.gz`` URL
            (see :func:`detection.configs.resolve_init_checkpoint`).
        cache_dir: where downloads go.

    Returns:
        A local ``.h5`` path, a checkpoint prefix (or a reachable ``gs://`` path), or ``None``.

    Raises:
        ValueError: the file does not exist, or a ``gs://`` path while GCS is unreachable.
    """
    from detection.configs import resolve_init_checkpoint

    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    spec = spec.strip()
    if spec.startswith("gs://"):
        if not _gcs_reachable():
            raise ValueError(
                f"--init-checkpoint {spec}: Google Cloud Storage is unreachable (offline?); "
                f"copy the checkpoint to a local folder (gsutil cp '{spec}*' DIR/) and pass "
                "DIR/<prefix>"
            )
        return spec
    if _is_h5(spec):
        if "://" in spec:
            from gldboxes.http import download_file

            name = spec.rstrip("/").rsplit("/", 1)[-1]
            return str(download_file(spec, Path(cache_dir) / name))
        if not Path(spec).is_file():
            raise ValueError(f"--init-checkpoint {spec}: no such Keras weights file")
        return str(Path(spec))
    if "://" not in spec and not (Path(spec).exists() or Path(spec + ".index").is_file()):
        raise ValueError(
            f"--init-checkpoint {spec}: no such file, folder or checkpoint prefix "
            "(expected PREFIX.index beside PREFIX.data-*)"
        )
    try:
        return resolve_init_checkpoint(spec, cache_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"--init-checkpoint {exc}") from exc


def check_init_modules(source: str, modules: str) -> None:
    """Reject an unknown ``--init-modules`` value or ``all`` with a backbone-only ``.h5``."""
    if modules not in INIT_MODULES:
        raise ValueError(f"--init-modules must be one of {list(INIT_MODULES)}, got {modules!r}")
    if _is_h5(source) and modules != "backbone":
        raise ValueError(
            f"--init-checkpoint {source}: a Keras ImageNet .h5 holds a backbone only; "
            "use --init-modules backbone (or a Model Garden COCO checkpoint for 'all')"
        )


# --------------------------------------------------------------------------- Keras .h5


def read_keras_h5(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """The layers of a Keras 2 weights file that have weights, in file order.

    Returns:
        ``[(layer_name, {"kernel": array, "bias": ..., "gamma": ..., ...}), ...]`` (weight
        names without the layer prefix and ``:0``).

    Raises:
        ValueError: not an HDF5 file or not Keras 2's ``layer_names`` layout.
    """
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 file ({exc})") from exc
    with fh:
        group = (
            fh["model_weights"] if "layer_names" not in fh.attrs and "model_weights" in fh else fh
        )
        if "layer_names" not in group.attrs:
            raise ValueError(
                f"{path}: not a Keras application weights file (no 'layer_names' attribute; "
                "Keras 3 .weights.h5 files are not supported)"
            )
        out: list[tuple[str, dict[str, Any]]] = []
        for raw in group.attrs["layer_names"]:
            lname = raw.decode() if isinstance(raw, bytes) else str(raw)
            layer = group[lname]
            weights: dict[str, Any] = {}
            for wraw in layer.attrs.get("weight_names", []):
                wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
                short = wname.rsplit("/", 1)[-1].split(":")[0]
                weights[short] = layer[wname][()]
            if weights:
                out.append((lname, weights))
    return out


def _leaf_layers(model: Any) -> list[Any]:
    """Leaf layers with weights of a Keras model, in build order (conv, batch-norm, ...)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if layer.weights and not list(layer._flatten_layers(include_self=False, recursive=False))
    ]


def _units(items: list[tuple[str, dict[str, Any]]]) -> list[list[tuple[str, dict[str, Any]]]]:
    """Group ``(name, weights)`` into conv (+ following batch-norm) units."""
    units: list[list[tuple[str, dict[str, Any]]]] = []
    for name, w in items:
        if (
            "moving_mean" in w
            and units
            and len(units[-1]) == 1
            and "moving_mean" not in units[-1][0][1]
        ):
            units[-1].append((name, w))
        else:
            units.append([(name, w)])
    return units


def _resnet_order(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Keras ResNet layers sorted as Model Garden builds them: stem, then per block the
    shortcut (``_0_``) and ``_1_``..``_3_``, each conv before its batch-norm."""

    def key(item: tuple[str, dict[str, Any]]) -> tuple[int, int, int, int]:
        m = _RESNET_LAYER.match(item[0])
        if m is None:
            raise ValueError(f"unexpected layer {item[0]!r} in a Keras ResNet weights file")
        stage, block, idx, kind = m.groups()
        return int(stage), int(block or 0), int(idx or 0), 0 if kind == "conv" else 1

    return sorted(items, key=key)


def load_keras_h5(backbone: Any, path: str | os.PathLike[str]) -> list[str]:
    """Initialise a Model Garden backbone from a Keras ImageNet ``.h5`` (see module doc).

    Args:
        backbone: a built ``official.vision`` MobileNet or ResNet backbone.
        path: the Keras weights file (``include_top=False``, "no_top").

    Returns:
        Names of the backbone variables assigned (all of them).

    Raises:
        ValueError: naming the first Keras layer that does not fit the backbone.
    """
    import numpy as np

    items = read_keras_h5(path)
    resnet = any(name == "conv1_conv" for name, _ in items)
    if resnet:
        items = _resnet_order(items)
    keras_eps = _KERAS_RESNET_EPS if resnet else _KERAS_DEFAULT_EPS
    file_units = _units(items)
    leaves = _leaf_layers(backbone)
    model_units: list[list[Any]] = []  # conv (+ batch-norm) units of the backbone
    for layer in leaves:
        is_bn = hasattr(layer, "moving_mean")
        if is_bn and model_units and len(model_units[-1]) == 1:
            model_units[-1].append(layer)
        else:
            model_units.append([layer])
    assigned: list[str] = []
    for i, (funit, munit) in enumerate(zip(file_units, model_units, strict=False)):
        kname, kw = funit[0]
        conv = munit[0]
        kernel = kw.get("kernel", kw.get("depthwise_kernel"))
        target = getattr(conv, "depthwise_kernel", None)
        if target is None:
            target = getattr(conv, "kernel", None)
        if kernel is None or target is None or tuple(kernel.shape) != tuple(target.shape):
            raise ValueError(
                f"{path}: Keras layer {kname!r} {None if kernel is None else kernel.shape} does "
                f"not fit backbone variable {target.name if target is not None else conv.name!r} "
                f"{None if target is None else tuple(target.shape)} (unit {i}): another "
                "architecture or width (alpha)?"
            )
        if (len(funit) == 2) != (len(munit) == 2):
            raise ValueError(
                f"{path}: Keras layer {kname!r} and backbone layer {conv.name!r} differ in "
                f"batch-norm (unit {i})"
            )
        target.assign(kernel)
        assigned.append(target.name)
        bias = kw.get("bias")
        if len(funit) == 2:
            bname, bw = funit[1]
            bn = munit[1]
            gamma = np.asarray(bw["gamma"], np.float64)
            mean = np.asarray(bw["moving_mean"], np.float64)
            var = np.asarray(bw["moving_variance"], np.float64)
            if gamma.shape != tuple(bn.gamma.shape):
                raise ValueError(
                    f"{path}: Keras layer {bname!r} {gamma.shape} does not fit backbone "
                    f"variable {bn.gamma.name!r} {tuple(bn.gamma.shape)} (unit {i})"
                )
            if bias is not None:  # BN(x + b) with mean m == BN(x) with mean m - b
                mean = mean - np.asarray(bias, np.float64)
            # Same normalisation with the backbone's epsilon: var' + eps = var + keras_eps.
            var = var + keras_eps - float(bn.epsilon)
            low = var < 0
            if low.any():  # keep gamma / sqrt(var' + eps) unchanged where var' would be < 0
                gamma = np.where(
                    low, gamma * np.sqrt(float(bn.epsilon) / (var + float(bn.epsilon))), gamma
                )
                var = np.where(low, 0.0, var)
            for var_obj, value in (
                (bn.gamma, gamma),
                (bn.beta, bw["beta"]),
                (bn.moving_mean, mean),
                (bn.moving_variance, var),
            ):
                var_obj.assign(np.asarray(value, np.float32))
                assigned.append(var_obj.name)
        elif bias is not None:
            raise ValueError(f"{path}: Keras layer {kname!r} has a bias but no batch-norm")
    if len(file_units) != len(model_units):
        i = min(len(file_units), len(model_units))
        what = (
            f"backbone layer {model_units[i][0].name!r} has no Keras layer"
            if len(model_units) > len(file_units)
            else f"Keras layer {file_units[i][0][0]!r} has no backbone layer"
        )
        raise ValueError(f"{path}: {what} (unit {i}): another architecture or depth?")
    logger.info(
        "initialised the backbone from Keras weights %s (%d variables)", path, len(assigned)
    )
    return assigned


# --------------------------------------------------------------------------- TF checkpoints


def _escape(name: str) -> str:
    """TensorFlow's escaping of a dependency name inside a checkpoint key."""
    return name.replace(".", "..").replace("/", ".S")


def checkpoint_keys(items: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(checkpoint key, variable)`` for every variable under ``tf.train.Checkpoint(**items)``,
    named as ``Checkpoint.write`` names them (breadth-first, first path wins)."""
    import tensorflow as tf

    root = tf.train.Checkpoint(**items)
    seen = {id(root)}
    queue: list[tuple[Any, str]] = [(root, "")]
    out: list[tuple[str, Any]] = []
    while queue:
        obj, path = queue.pop(0)
        for name, child in tf.train.TrackableView.children(obj).items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{_escape(name)}" if path else _escape(name)
            if isinstance(child, tf.Variable):
                out.append((f"{child_path}/.ATTRIBUTES/VARIABLE_VALUE", child))
            queue.append((child, child_path))
    return out


def load_checkpoint(model: Any, prefix: str, modules: str) -> tuple[list[str], list[str]]:
    """Initialise ``model``'s backbone (``modules="backbone"``) or every module (``"all"``)
    from a Model Garden checkpoint.

    Args:
        model: a built Model Garden ``RetinaNetModel`` or ``MaskRCNNModel``.
        prefix: checkpoint prefix (``.../ckpt-N``).
        modules: ``backbone`` or ``all``.

    Returns:
        (checkpoint keys assigned, keys left at their initialisation because their last axis
        counts classes).

    Raises:
        ValueError: not a Model Garden layout, or naming the first missing/mismatched variable.
    """
    import tensorflow as tf

    items = {"backbone": model.backbone} if modules == "backbone" else dict(model.checkpoint_items)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as exc:
        raise ValueError(f"{prefix}: not a readable TF checkpoint ({type(exc).__name__})") from exc
    shapes = reader.get_variable_to_shape_map()
    if not any(k.startswith("backbone/") for k in shapes):
        raise ValueError(
            f"{prefix}: no 'backbone/...' variables, not a Model Garden checkpoint (TF Object "
            "Detection API checkpoints have another layout); first key: "
            f"{min(shapes) if shapes else 'none'}"
        )
    assigned: list[str] = []
    skipped: list[str] = []
    for key, var in checkpoint_keys(items):
        if key not in shapes:
            raise ValueError(f"{prefix}: variable {key} is missing (modules={modules})")
        want, have = tuple(var.shape), tuple(shapes[key])
        if want != have:
            head = not key.startswith(("backbone/", "decoder/"))
            if modules == "all" and head and want[:-1] == have[:-1]:
                skipped.append(key)  # class-count-dependent output (COCO 91 classes vs 2)
                continue
            raise ValueError(f"{prefix}: variable {key} has shape {list(have)}, model {list(want)}")
        var.assign(reader.get_tensor(key))
        assigned.append(key)
    logger.info(
        "initialised %s from %s (%d variables; %d class-dependent left as initialised: %s)",
        modules,
        prefix,
        len(assigned),
        len(skipped),
        ", ".join(skipped),
    )
    return assigned, skipped


# --------------------------------------------------------------------------- dispatcher


def initialize_model(model: Any, source: str, modules: str) -> dict[str, Any]:
    """Initialise ``model`` from ``source`` (``.h5`` -> :func:`load_keras_h5` on the backbone,
    otherwise :func:`load_checkpoint`).

    Returns:
        ``{"source", "modules", "assigned": [names], "skipped": [keys]}``.
    """
    check_init_modules(source, modules)
    if _is_h5(source):
        return {
            "source": source,
            "modules": modules,
            "assigned": load_keras_h5(model.backbone, source),
            "skipped": [],
        }
    assigned, skipped = load_checkpoint(model, source, modules)
    return {"source": source, "modules": modules, "assigned": assigned, "skipped": skipped}


def initializer(source: str, modules: str) -> Callable[[Any], None]:
    """A ``task.initialize`` replacement: Orbit calls it once, when the run has no checkpoint
    of its own (a resumed run keeps its weights)."""
    check_init_modules(source, modules)

    def initialize(model: Any) -> None:
        initialize_model(model, source, modules)

    return initialize
