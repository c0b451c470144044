"""Keras backbones cut at their last convolutional map, and images loaded for them.

Part of :mod:`retrieval.rmac`; see its docstring for the method."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BACKBONES",
    "Backbone",
    "build_backbone",
    "load_rgb",
]

logger = logging.getLogger("retrieval.rmac.backbone")

BACKBONES = ("resnet50", "resnet101", "vgg16", "tiny")


# =========================================================================== backbone
@dataclass
class Backbone:
    """A Keras backbone cut at its last convolutional map.

    Attributes:
        name: ``resnet50`` | ``resnet101`` | ``vgg16`` | ``tiny``.
        model: keras Model, (B, H, W, 3) preprocessed float32 -> (B, h, w, C) non-negative.
        channels: C.
        mode: input preprocessing, ``caffe`` (BGR, ImageNet mean) or ``tf`` (to [-1, 1]).
    """

    name: str
    model: Any
    channels: int
    mode: str
    _fn: Any = None

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) RGB uint8 -> float32 network input."""
        x = np.asarray(images, np.float32)
        if self.mode == "caffe":
            x = x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
        else:
            x = x / 127.5 - 1.0
        return np.ascontiguousarray(x)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) RGB uint8 images of one size -> (B, h, w, C) float32 activations."""
        import tensorflow as tf

        if self._fn is None:
            self._fn = tf.function(
                lambda x: self.model(x, training=False),
                input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            )
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"backbone {self.name}: expected (B, H, W, 3) images, got {arr.shape}")
        out = self._fn(tf.constant(self.preprocess(arr))).numpy()
        return np.maximum(out, 0.0).astype(np.float32, copy=False)


def _tiny_model(keras: Any, seed: int) -> Any:
    """A small VGG-like CNN (stride 8, 64 channels): the CPU backbone of tests and tiny runs."""
    init = keras.initializers.HeNormal(seed=seed)
    inp = keras.Input((None, None, 3))
    x = inp
    for i, ch in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(
            ch,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=init,
            name=f"tiny_conv{i + 1}",
        )(x)
        if i < 3:
            x = keras.layers.MaxPooling2D(2, name=f"tiny_pool{i + 1}")(x)
    return keras.Model(inp, x, name="tiny")


def build_backbone(name: str, weights: str | None = None, *, seed: int = 0) -> Backbone:
    """Build a backbone cut at its last convolutional map.

    Args:
        name: ``resnet50``, ``resnet101``, ``vgg16`` or ``tiny``.
        weights: ``"imagenet"`` (Keras downloads them; needs the internet), ``None`` (random
            initialisation, seeded by ``seed``) or the path of a Keras weights file
            (``.weights.h5`` / ``.h5``) for this architecture.
        seed: seed of the random initialisation.
    """
    import keras

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    path: Path | None = None
    kweights: str | None = None
    if weights == "imagenet":
        if name == "tiny":
            raise ValueError("backbone 'tiny' has no ImageNet weights; use weights=None or a file")
        kweights = "imagenet"
    elif weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
    keras.utils.set_random_seed(seed)
    shape = (None, None, 3)
    apps = {"resnet50": "ResNet50", "resnet101": "ResNet101", "vgg16": "VGG16"}
    if name in apps:
        try:
            full = getattr(keras.applications, apps[name])(
                include_top=False, weights=kweights, input_shape=shape
            )
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            if kweights != "imagenet" or not (
                isinstance(exc, OSError) or "URL fetch failure" in str(exc)
            ):
                raise
            file = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
            cache = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"
            raise ConnectionError(
                f"backbone {name}: cannot download its ImageNet weights {file} "
                f"({' '.join(str(exc).split())}); copy that file into {cache}/ "
                "or pass --weights FILE (a Keras weights file of this backbone; "
                "--weights random for a seeded random initialisation)"
            ) from exc
        model = (
            keras.Model(full.input, full.get_layer("block5_conv3").output, name="vgg16_conv5")
            if name == "vgg16"
            else full
        )
        mode = "caffe"
    else:
        model = _tiny_model(keras, seed)
        mode = "tf"
    if path is not None:
        try:
            model.load_weights(str(path))
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: cannot load {name} weights ({exc})") from exc
    return Backbone(name=name, model=model, channels=int(model.output.shape[-1]), mode=mode)


# =========================================================================== images
def load_rgb(
    path: str | os.PathLike[str],
    max_side: int,
    bbx: Sequence[float] | None = None,
    *,
    min_side: int = 16,
) -> np.ndarray:
    """Decode an image as RGB, downscale its long side to ``max_side``, crop to ``bbx``.

    The crop ``bbx = (x1, y1, x2, y2)`` is in original pixels and is applied after the downscale,
    so a cropped query has the same scale as the database images. Images smaller than
    ``min_side`` are upscaled to it (the backbones need a few cells).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    import cv2

    from retrieval.features import load_image

    arr, (w0, h0), _ = load_image(path, grayscale=False, max_side=max_side)
    s = min(1.0, max_side / max(w0, h0))
    nw, nh = max(1, round(w0 * s)), max(1, round(h0 * s))
    if arr.shape[:2] != (nh, nw):
        arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
    if bbx is not None:
        x1, y1, x2, y2 = (float(v) * s for v in bbx)
        c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c2, r2 = min(nw, math.ceil(x2)), min(nh, math.ceil(y2))
        if c2 <= c1 or r2 <= r1:
            raise ValueError(f"{path}: bbx {list(bbx)} does not overlap the {w0}x{h0} image")
        arr = arr[r1:r2, c1:c2]
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        f = min_side / min(h, w)
        arr = cv2.resize(
            arr,
            (max(min_side, round(w * f)), max(min_side, round(h * f))),
            interpolation=cv2.INTER_LINEAR,
        )
    return np.ascontiguousarray(arr)
