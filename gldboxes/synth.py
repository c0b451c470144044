"""A synthetic landmark world: GLD-style training boxes and a Revisited-style retrieval benchmark.

Landmarks are procedurally textured planar "facades" (window grids, glyphs, polygons, stripes:
rich, distinct local structure so that SIFT-like features match across views). Each image pastes
one landmark with a random perspective warp, scale, lighting change, blur and partial occlusion
into a cluttered background, and records the landmark's box. Everything is deterministic for a
seed: the same seed gives byte-identical files.

Outputs of :func:`generate_world` (``OUT``)::

    world.json                       configuration, seed, format version, counts, and
                                     ``"kind": WORLD_KIND``: the marker that tells other
                                     packages an image comes from a synthetic world
    train/images/a/b/c/<id>.jpg      GLD-style training images (id: 16 hex characters)
    train/train.csv                  id,url,landmark_id (url relative to train/)
    train/boxes.csv                  id,box  Google Landmark Boxes ground truth
    train/no_landmark.csv            id,reason  (~8%: clutter only, or landmark mostly occluded)
    retrieval/jpg/<name>.jpg         database and query images
    retrieval/gnd_synth.pkl (.json)  Revisited ground truth: imlist, qimlist,
                                     gnd=[{bbx, easy, hard, junk}]
    retrieval/boxes_gt.csv           id,box  landmark boxes of database images
    retrieval/difficulty.csv         name,kind,landmark,area,occlusion,warp

Difficulty (retrieval database, per query landmark):
    easy: the landmark covers 20-50% of the image, mild warp, unoccluded;
    hard: small (2-8% of the image) in clutter, or strongly warped, or 35-55% occluded;
    junk: barely visible (under 1.2% of the image, or 80-90% occluded).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gldboxes.boxes import Box, write_boxes_csv
from gldboxes.io import atomic_write, read_json, write_json
from gldboxes.progress import tqdm

__all__ = ["FORMAT_VERSION", "WORLD_KIND", "SynthConf", "confs", "generate_world", "main"]

logger = logging.getLogger("gldboxes.synth")

FORMAT_VERSION = 2
# ``world.json["kind"]``: marks a folder as a synthetic world, so that e.g. a detector trained
# only on it can tell synthetic images (under ``train/`` and ``retrieval/``) from real photos.
WORLD_KIND = "gldboxes.synth.world"

# Seed streams: landmark textures and image layouts never share random numbers.
_QUERY_LANDMARKS, _OTHER_LANDMARKS, _TRAIN_LANDMARKS, _MOTIFS = 1, 2, 3, 4
# Shared architectural vocabulary: every landmark, and the clutter, reuses motifs from one pool
# per world (as Oxford's colleges share gothic windows), so local features are not unique to a
# landmark and small landmarks compete with look-alike structure elsewhere.
N_MOTIFS = 48
_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789#%&@"
_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)


@dataclass(frozen=True)
class SynthConf:
    """Configuration of a synthetic world (every field is written to ``world.json``)."""

    seed: int = 0  # master seed; the same seed gives byte-identical outputs
    size: int = 512  # long side of every image in pixels (short side = 3/4 of it)
    texture_size: int = 320  # side of a landmark's texture before warping
    landmarks: int = 50  # query landmarks of the retrieval benchmark
    queries_per_landmark: int = 1  # query images per landmark (each with its bbx)
    easy_per_landmark: int = 6  # database images per landmark, by difficulty
    hard_per_landmark: int = 8
    junk_per_landmark: int = 2
    distractors: int = 200  # database images of other landmarks (half) and clutter only (half)
    train_landmarks: int = 40  # landmarks of the GLD-style training set (disjoint textures)
    train_per_landmark: int = 10  # training images per landmark
    no_landmark_fraction: float = 0.08  # training images without a prominent landmark
    jpeg_quality: int = 90
    workers: int = 2  # processes used to render (the output does not depend on it)

    def __post_init__(self) -> None:
        if self.size < 64:
            raise ValueError(f"size must be >= 64 pixels, got {self.size}")
        for name in ("landmarks", "queries_per_landmark", "train_landmarks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.no_landmark_fraction < 1.0:
            raise ValueError(
                f"no_landmark_fraction must be in [0, 1), got {self.no_landmark_fraction}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return (self.size * 3) // 4, self.size


confs: dict[str, SynthConf] = {
    # ~1,000 database images, 50 queries, 400 training images: the README's main job.
    "default": SynthConf(),
    # A few seconds: unit tests and the quick pipeline.
    "tiny": SynthConf(
        size=320,
        texture_size=224,
        landmarks=6,
        easy_per_landmark=2,
        hard_per_landmark=3,
        junk_per_landmark=1,
        distractors=12,
        train_landmarks=6,
        train_per_landmark=8,
        workers=1,
    ),
}


# ----------------------------------------------------------------------------------------------
# Drawing primitives


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, size=3)
    return int(c[0]), int(c[1]), int(c[2])


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random colour field (h, w, 3) uint8 from an upsampled coarse grid."""
    coarse = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(
        np.uint8
    )


def _glyphs(
    rng: np.random.Generator, img: np.ndarray, count: int, scale: tuple[float, float]
) -> None:
    h, w = img.shape[:2]
    for _ in range(count):
        text = "".join(rng.choice(list(_GLYPHS), size=int(rng.integers(1, 4))))
        font = _FONTS[int(rng.integers(len(_FONTS)))]
        s = float(rng.uniform(*scale))
        org = (int(rng.integers(0, max(1, w - 20))), int(rng.integers(15, h)))
        cv2.putText(img, text, org, font, s, _color(rng), int(rng.integers(1, 4)), cv2.LINE_AA)


@lru_cache(maxsize=64)
def motif(seed: int, index: int, size: int = 96) -> np.ndarray:
    """One motif of the world's shared pool, (size, size, 3) uint8 BGR.

    Four families: arched windows with mullions, rosettes, inscriptions, ornaments.
    """
    rng = _rng(seed, _MOTIFS, index)
    img = np.full((size, size, 3), _color(rng, 30, 230), np.uint8)
    fg, fg2 = _color(rng), _color(rng)
    c = size // 2
    kind = index % 4
    if kind == 0:
        x0, x1 = int(size * 0.2), int(size * 0.8)
        cv2.rectangle(img, (x0, c), (x1, int(size * 0.92)), fg, -1)
        cv2.ellipse(img, (c, c), ((x1 - x0) // 2, int(size * 0.35)), 0, 180, 360, fg, -1)
        for k in range(1, int(rng.integers(2, 5))):
            x = x0 + k * (x1 - x0) // int(rng.integers(2, 5))
            cv2.line(img, (x, int(size * 0.2)), (x, int(size * 0.92)), fg2, 2)
        cv2.line(img, (x0, int(size * 0.6)), (x1, int(size * 0.6)), fg2, 2)
    elif kind == 1:
        n = int(rng.integers(6, 13))
        for r in (0.45, 0.3, 0.15):
            cv2.circle(img, (c, c), int(size * r), fg if r != 0.3 else fg2, 2 + int(r * 4))
        for k in range(n):
            a = 2 * math.pi * k / n
            p = (int(c + size * 0.45 * math.cos(a)), int(c + size * 0.45 * math.sin(a)))
            cv2.line(img, (c, c), p, fg, 2)
    elif kind == 2:
        _glyphs(rng, img, 3, (0.5, 0.9))
    else:
        for _ in range(int(rng.integers(3, 6))):
            pts = rng.integers(0, size, size=(3, 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], _color(rng))
        step = int(rng.integers(5, 10))
        for k in range(0, size, step):
            cv2.line(img, (k, 0), (k, size // 4), fg2, 2)
    cv2.rectangle(img, (0, 0), (size - 1, size - 1), fg2, 2)
    return img


def _paste_motifs(
    rng: np.random.Generator, img: np.ndarray, seed: int, count: int, side: tuple[int, int]
) -> None:
    """Paste ``count`` motifs of the world's pool, resized to ``side`` pixels, at random places."""
    h, w = img.shape[:2]
    for _ in range(count):
        m = motif(seed, int(rng.integers(N_MOTIFS)))
        s = int(rng.integers(side[0], side[1] + 1))
        if s >= min(h, w):
            continue
        patch = cv2.resize(m, (s, s), interpolation=cv2.INTER_AREA)
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        img[y : y + s, x : x + s] = patch


@lru_cache(maxsize=256)
def landmark_texture(seed: int, stream: int, index: int, size: int) -> np.ndarray:
    """The texture of one landmark, (size, size, 3) uint8 BGR; deterministic per key."""
    rng = _rng(seed, stream, index)
    img = _smooth_field(rng, size, size, 3)
    img = cv2.addWeighted(img, 0.5, np.full_like(img, _color(rng, 40, 220)), 0.5, 0)
    # A facade: a grid of windows of one of several styles.
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    mx, my = size / (cols + 1), size / (rows + 1)
    style = int(rng.integers(3))
    wcol, fcol = _color(rng), _color(rng)
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.15:
                continue
            cx, cy = (c + 1) * mx, (r + 1) * my
            hw, hh = mx * rng.uniform(0.2, 0.35), my * rng.uniform(0.2, 0.38)
            p0 = (int(cx - hw), int(cy - hh))
            p1 = (int(cx + hw), int(cy + hh))
            if style == 0:
                cv2.rectangle(img, p0, p1, wcol, -1)
                cv2.rectangle(img, p0, p1, fcol, 2)
            elif style == 1:
                cv2.rectangle(img, (p0[0], int(cy)), p1, wcol, -1)
                cv2.ellipse(img, (int(cx), int(cy)), (int(hw), int(hh)), 0, 180, 360, wcol, -1)
                cv2.line(img, (int(cx), p0[1]), (int(cx), p1[1]), fcol, 2)
            else:
                cv2.circle(img, (int(cx), int(cy)), int(min(hw, hh)), wcol, -1)
                cv2.circle(img, (int(cx), int(cy)), int(min(hw, hh) * 0.5), fcol, 2)
    # Motifs from the world's shared vocabulary, then structure unique to this landmark.
    _paste_motifs(rng, img, seed, int(rng.integers(5, 9)), (size // 7, size // 4))
    for _ in range(int(rng.integers(3, 7))):
        pts = rng.integers(0, size, size=(int(rng.integers(3, 6)), 2)).astype(np.int32)
        cv2.fillPoly(img, [pts], _color(rng))
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size - size // 5, size=2))
        step = int(rng.integers(4, 10))
        col = _color(rng)
        for k in range(0, size // 5, step):
            cv2.line(img, (x0 + k, y0), (x0 + k, y0 + size // 5), col, max(1, step // 3))
    _glyphs(rng, img, int(rng.integers(5, 10)), (0.5, 1.4))
    cv2.rectangle(img, (0, 0), (size - 1, size - 1), _color(rng), 4)
    return img


def _clutter(rng: np.random.Generator, h: int, w: int, seed: int) -> np.ndarray:
    """A cluttered background (h, w, 3) uint8: colour field, shapes, strokes, glyphs, motifs."""
    img = _smooth_field(rng, h, w, int(rng.integers(3, 7)))
    area = h * w
    for _ in range(int(rng.integers(25, 45) * area / (512 * 384))):
        kind = int(rng.integers(4))
        col = _color(rng)
        if kind == 0:
            p0 = rng.integers(0, [w, h])
            p1 = p0 + rng.integers(5, max(6, w // 6), size=2)
            cv2.rectangle(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), col, -1)
        elif kind == 1:
            c = rng.integers(0, [w, h])
            cv2.circle(img, (int(c[0]), int(c[1])), int(rng.integers(3, max(4, w // 12))), col, -1)
        elif kind == 2:
            p = rng.integers(0, [w, h], size=(2, 2))
            cv2.line(
                img,
                (int(p[0, 0]), int(p[0, 1])),
                (int(p[1, 0]), int(p[1, 1])),
                col,
                int(rng.integers(1, 5)),
            )
        else:
            pts = rng.integers(0, [w, h]) + rng.integers(-w // 10, w // 10, size=(3, 2))
            cv2.fillPoly(img, [pts.astype(np.int32)], col)
    _glyphs(rng, img, int(rng.integers(3, 8) * area / (512 * 384)) + 1, (0.4, 1.0))
    _paste_motifs(
        rng,
        img,
        seed,
        int(rng.integers(2, 6) * area / (512 * 384)) + 1,
        (max(8, min(h, w) // 12), max(9, min(h, w) // 5)),
    )
    noise = rng.normal(0.0, 4.0, size=img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Placement:
    """How a landmark appears in an image (sampled per difficulty)."""

    area: tuple[float, float]  # fraction of the image covered by the landmark's box
    jitter: tuple[float, float]  # perspective corner jitter, fraction of the side
    rotation: float  # max in-plane rotation in degrees
    occlusion: tuple[float, float]  # fraction of the box hidden by clutter
    blur: tuple[float, float]  # Gaussian sigma


PLACEMENTS: dict[str, _Placement] = {
    "query": _Placement((0.22, 0.40), (0.0, 0.05), 5, (0.0, 0.0), (0.0, 0.5)),
    "easy": _Placement((0.20, 0.50), (0.0, 0.08), 8, (0.0, 0.0), (0.0, 0.8)),
    "hard_small": _Placement((0.02, 0.08), (0.0, 0.10), 12, (0.0, 0.0), (0.0, 0.8)),
    "hard_warp": _Placement((0.10, 0.25), (0.16, 0.24), 25, (0.0, 0.0), (0.5, 1.2)),
    "hard_occluded": _Placement((0.10, 0.25), (0.0, 0.10), 12, (0.35, 0.55), (0.0, 0.8)),
    "junk_tiny": _Placement((0.005, 0.012), (0.0, 0.10), 12, (0.0, 0.0), (0.0, 1.0)),
    "junk_occluded": _Placement((0.10, 0.25), (0.0, 0.10), 12, (0.80, 0.90), (0.0, 1.0)),
    "train": _Placement((0.04, 0.55), (0.0, 0.15), 15, (0.0, 0.2), (0.0, 1.0)),
}


@dataclass(frozen=True)
class _Job:
    path: str  # output path of the JPEG
    image_seed: tuple[int, ...]
    texture: tuple[int, int, int] | None  # (seed, stream, index) or None for clutter only
    placement: str | None
    shape: tuple[int, int]
    texture_size: int
    jpeg_quality: int


@dataclass
class _Rendered:
    path: str
    box: Box | None
    area: float
    occlusion: float
    warp: float


def _render(job: _Job) -> _Rendered:
    rng = _rng(*job.image_seed)
    h, w = job.shape
    img = _clutter(rng, h, w, job.image_seed[0])
    # Global lighting and the landmark are drawn with the image's own generator.
    box: Box | None = None
    area = occl = warp = 0.0
    if job.texture is not None and job.placement is not None:
        pl = PLACEMENTS[job.placement]
        tex = landmark_texture(*job.texture, job.texture_size)
        ts = tex.shape[0]
        area = float(rng.uniform(*pl.area))
        side = math.sqrt(area * h * w)
        side = min(side, 0.95 * min(h, w))
        cx = float(rng.uniform(side / 2, w - side / 2))
        cy = float(rng.uniform(side / 2, h - side / 2))
        warp = float(rng.uniform(*pl.jitter))
        theta = math.radians(float(rng.uniform(-pl.rotation, pl.rotation)))
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        unit = unit + rng.uniform(-warp, warp, size=(4, 2))
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        dst = (unit @ rot.T) * side + np.array([cx, cy])
        dst[:, 0] = np.clip(dst[:, 0], 0, w - 1)
        dst[:, 1] = np.clip(dst[:, 1], 0, h - 1)
        src = np.array([[0, 0], [ts - 1, 0], [ts - 1, ts - 1], [0, ts - 1]], dtype=np.float32)
        hmat = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
        gain, bias = float(rng.uniform(0.7, 1.3)), float(rng.uniform(-25, 25))
        lit = np.clip(tex.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        warped = cv2.warpPerspective(lit, hmat, (w, h), flags=cv2.INTER_LINEAR)
        mask = cv2.warpPerspective(np.full((ts, ts), 255, np.uint8), hmat, (w, h))
        sigma = float(rng.uniform(*pl.blur))
        if sigma > 0.3:
            warped = cv2.GaussianBlur(warped, (0, 0), sigma)
        m = (mask.astype(np.float32) / 255.0)[..., None]
        img = (warped.astype(np.float32) * m + img.astype(np.float32) * (1 - m)).astype(np.uint8)
        x0, y0 = dst.min(axis=0)
        x1, y1 = dst.max(axis=0)
        occl = float(rng.uniform(*pl.occlusion))
        if occl > 0:
            # Hide a band of the box under clutter, from a random side.
            bw, bh = x1 - x0, y1 - y0
            occluder = _clutter(rng, h, w, job.image_seed[0])
            side_pick = int(rng.integers(4))
            if side_pick == 0:
                sl = (slice(int(y0), int(y1) + 1), slice(int(x0), int(x0 + occl * bw) + 1))
            elif side_pick == 1:
                sl = (slice(int(y0), int(y1) + 1), slice(int(x1 - occl * bw), int(x1) + 1))
            elif side_pick == 2:
                sl = (slice(int(y0), int(y0 + occl * bh) + 1), slice(int(x0), int(x1) + 1))
            else:
                sl = (slice(int(y1 - occl * bh), int(y1) + 1), slice(int(x0), int(x1) + 1))
            img[sl] = occluder[sl]
        box = Box(
            ymin=float(y0) / h, xmin=float(x0) / w, ymax=float(y1 + 1) / h, xmax=float(x1 + 1) / w
        )
        box = Box(min(box.ymin, 1.0), min(box.xmin, 1.0), min(box.ymax, 1.0), min(box.xmax, 1.0))
        area = box.area
    # Camera: global exposure and sensor noise.
    img = np.clip(
        img.astype(np.float32) * float(rng.uniform(0.85, 1.15)) + rng.normal(0, 2.0, img.shape),
        0,
        255,
    ).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, job.jpeg_quality])
    if not ok:
        raise ValueError(f"could not encode {job.path}")
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(job.path, "wb") as fh:
        fh.write(buf.tobytes())
    return _Rendered(job.path, box, area, occl, warp)


def _run_jobs(jobs: Sequence[_Job], workers: int, desc: str) -> list[_Rendered]:
    if workers <= 1 or len(jobs) < 64:
        return [_render(j) for j in tqdm(jobs, desc=desc, unit="img", leave=False)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(_render, jobs, chunksize=16),
                total=len(jobs),
                desc=desc,
                unit="img",
                leave=False,
            )
        )


def _gld_id(seed: int, index: int) -> str:
    return hashlib.sha1(f"gldboxes-synth-{seed}-{index}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The world


def _train_jobs(conf: SynthConf, out: Path) -> tuple[list[_Job], list[dict[str, Any]]]:
    rng = _rng(conf.seed, 100)
    n = conf.train_landmarks * conf.train_per_landmark
    no_lm = rng.random(n) < conf.no_landmark_fraction
    jobs, rows = [], []
    for i in range(n):
        lm = i // conf.train_per_landmark
        gid = _gld_id(conf.seed, i)
        rel = f"images/{gid[0]}/{gid[1]}/{gid[2]}/{gid}.jpg"
        reason = ""
        texture: tuple[int, int, int] | None = (conf.seed, _TRAIN_LANDMARKS, lm)
        placement = "train"
        if no_lm[i]:
            if rng.random() < 0.5:
                texture, reason = None, "clutter only"
            else:
                placement, reason = "junk_occluded", "landmark mostly occluded"
        jobs.append(
            _Job(
                str(out / "train" / rel),
                (conf.seed, 200, i),
                texture,
                placement,
                conf.shape,
                conf.texture_size,
                conf.jpeg_quality,
            )
        )
        rows.append({"id": gid, "url": rel, "landmark_id": lm, "reason": reason})
    return jobs, rows


def _retrieval_plan(
    conf: SynthConf,
) -> list[tuple[str, str, tuple[int, int, int] | None, str | None, int]]:
    """(name, kind, texture key, placement, landmark) for every retrieval image, queries first."""
    rng = _rng(conf.seed, 300)
    plan: list[tuple[str, str, tuple[int, int, int] | None, str | None, int]] = []
    hard_modes = ("hard_small", "hard_small", "hard_warp", "hard_occluded")
    for lm in range(conf.landmarks):
        tex = (conf.seed, _QUERY_LANDMARKS, lm)
        for q in range(conf.queries_per_landmark):
            plan.append((f"lm{lm:03d}_query{q}", "query", tex, "query", lm))
        for j in range(conf.easy_per_landmark):
            plan.append((f"lm{lm:03d}_{j:03d}e", "easy", tex, "easy", lm))
        for j in range(conf.hard_per_landmark):
            mode = hard_modes[j % len(hard_modes)]
            plan.append((f"lm{lm:03d}_{j:03d}h", "hard", tex, mode, lm))
        for j in range(conf.junk_per_landmark):
            mode = "junk_tiny" if rng.random() < 0.5 else "junk_occluded"
            plan.append((f"lm{lm:03d}_{j:03d}j", "junk", tex, mode, lm))
    n_other = conf.distractors // 2
    n_other_lm = max(1, conf.distractors // 8)
    for j in range(n_other):
        tex = (conf.seed, _OTHER_LANDMARKS, j % n_other_lm)
        mode = ("easy", "hard_small", "hard_warp")[j % 3]
        plan.append((f"other{j:05d}", "other", tex, mode, -1))
    for j in range(conf.distractors - n_other):
        plan.append((f"clutter{j:05d}", "clutter", None, None, -1))
    return plan


def generate_world(
    out_dir: str | os.PathLike[str], conf: SynthConf | None = None, *, overwrite: bool = False
) -> Path:
    """Generate the synthetic world into ``out_dir`` (see the module docstring for the layout).

    Skipped when ``out_dir/world.json`` already records the same configuration, unless
    ``overwrite``. Returns ``out_dir``.
    """
    conf = conf or confs["default"]
    out = Path(out_dir)
    marker = out / "world.json"
    record = {"format_version": FORMAT_VERSION, "conf": asdict(replace(conf, workers=0))}
    if marker.exists() and not overwrite:
        old = read_json(marker)
        if {k: old.get(k) for k in record} == record:
            logger.info("synthetic world already in %s; skipping", out)
            return out
        raise ValueError(
            f"{out} holds a synthetic world with another configuration; pass overwrite=True "
            "(--overwrite) or choose another folder"
        )
    for sub in ("train", "retrieval"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)

    # GLD-style training set.
    train_jobs, train_rows = _train_jobs(conf, out)
    train_res = _run_jobs(train_jobs, conf.workers, "train images")
    tdir = out / "train"
    with atomic_write(tdir / "train.csv", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["id", "url", "landmark_id"])
        wr.writerows([r["id"], r["url"], r["landmark_id"]] for r in train_rows)
    write_boxes_csv(
        tdir / "boxes.csv",
        {
            r["id"]: [res.box]
            for r, res in zip(train_rows, train_res, strict=True)
            if not r["reason"] and res.box is not None
        },
    )
    with atomic_write(tdir / "no_landmark.csv", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["id", "reason"])
        wr.writerows([r["id"], r["reason"]] for r in train_rows if r["reason"])

    # Revisited-style retrieval benchmark.
    rdir = out / "retrieval"
    plan = _retrieval_plan(conf)
    jobs = [
        _Job(
            str(rdir / "jpg" / f"{name}.jpg"),
            (conf.seed, 400, i),
            tex,
            pl,
            conf.shape,
            conf.texture_size,
            conf.jpeg_quality,
        )
        for i, (name, _, tex, pl, _) in enumerate(plan)
    ]
    res = _run_jobs(jobs, conf.workers, "retrieval images")
    queries = [(p, r) for p, r in zip(plan, res, strict=True) if p[1] == "query"]
    database = [(p, r) for p, r in zip(plan, res, strict=True) if p[1] != "query"]
    order = _rng(conf.seed, 500).permutation(len(database))
    database = [database[i] for i in order]
    imlist = [p[0] for p, _ in database]
    index = {name: i for i, name in enumerate(imlist)}
    h, w = conf.shape
    gnd = []
    for p, r in queries:
        lm = p[4]
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for dp, _ in database:
            if dp[4] == lm:
                lists[dp[1]].append(index[dp[0]])
        b = r.box
        if b is None:
            raise ValueError(f"internal error: query {p[0]} has no landmark box")
        bbx = [b.xmin * w, b.ymin * h, b.xmax * w, b.ymax * h]
        gnd.append({"bbx": [round(v, 2) for v in bbx], **{k: sorted(v) for k, v in lists.items()}})
    # The loader lives in retrieval/, which gldboxes must not import: write the same structure.
    cfg = {"imlist": imlist, "qimlist": [p[0] for p, _ in queries], "gnd": gnd}
    _write_gnd(rdir / "gnd_synth.pkl", cfg)
    write_boxes_csv(
        rdir / "boxes_gt.csv",
        {p[0]: [r.box] for p, r in database if r.box is not None and p[1] != "clutter"},
    )
    with atomic_write(rdir / "difficulty.csv", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["name", "kind", "placement", "landmark", "area", "occlusion", "warp"])
        for p, r in [*queries, *database]:
            wr.writerow(
                [
                    p[0],
                    p[1],
                    p[3] or "",
                    p[4],
                    f"{r.area:.5f}",
                    f"{r.occlusion:.3f}",
                    f"{r.warp:.3f}",
                ]
            )

    counts = {
        "train_images": len(train_rows),
        "train_boxes": sum(1 for r in train_rows if not r["reason"]),
        "train_no_landmark": sum(1 for r in train_rows if r["reason"]),
        "database_images": len(imlist),
        "queries": len(queries),
    }
    write_json(marker, {**record, "kind": WORLD_KIND, "counts": counts})
    logger.info("synthetic world written to %s: %s", out, counts)
    return out


def _write_gnd(path: Path, cfg: dict[str, Any]) -> None:
    import json
    import pickle

    with atomic_write(path, "wb") as fh:
        pickle.dump(cfg, fh, protocol=3)
    with atomic_write(path.with_suffix(".json")) as fh:
        json.dump(cfg, fh)


def main(conf: SynthConf, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """hloc-style stage entry: generate the world and return its folder."""
    return generate_world(out_dir, conf, overwrite=overwrite)


def conf_from_args(base: str, overrides: Iterable[tuple[str, Any]]) -> SynthConf:
    """A preset with the given non-``None`` fields replaced."""
    if base not in confs:
        raise ValueError(f"unknown synth preset {base!r}; expected one of {sorted(confs)}")
    return replace(confs[base], **{k: v for k, v in overrides if v is not None})
