"""Region sources for the index side of Detect-to-Retrieve, and cropping/assigning features to them.

Every source gives, per database image, a list of normalised boxes (Google Landmark Boxes order
``ymin xmin ymax xmax`` in [0, 1]) whose **region 0 is always the whole image**:

========================  ============================================================  =========
source                    boxes added after the whole image                             score
========================  ============================================================  =========
``detector``              detector boxes of a boxes CSV with ``score >= threshold``     detector
``rmac``                  R-MAC grid ("RMACB", Tolias et al. 2016), levels ``1..L``     1.0
``selective_search``      the first ``top_n`` proposals of OpenCV contrib's selective   1/(1+r)
                          search (rank ``r``), computed on a downscaled image
``gt``                    the ground-truth landmark boxes (the oracle upper bound)      1.0
``whole``                 nothing (the single-image baseline)                           -
========================  ============================================================  =========

Every source then goes through the same selection (:func:`select_regions`, preset keys
``min_size`` and ``max_regions``): boxes whose width or height is below ``min_size`` of the
image's width or height are dropped, the rest are sorted best score first (stable: the source's
order among equal scores, e.g. the R-MAC grid coarse to fine) and at most ``max_regions`` are
kept. Region 0 is never dropped. Generic proposals (selective search) include many slivers and
tiny boxes with a handful of features; as items of a regional index they mostly add chance
matches, so their presets drop boxes under a fifth of the image side by default (the R-MAC grid,
whose smallest squares span half the short side, and detector / ground-truth boxes are not
filtered by default).

The stage :func:`main` writes a *regions CSV* in the boxes format (``id,box,score``), one row per
region in region order, so row ``j`` of an image is ``region_j`` of the regional features
(``id/region_j`` in the features HDF5). Region 0 is written explicitly as ``0.0 0.0 1.0 1.0``
with score 1.0.

Regional features can be computed two ways (the caller picks):

* re-extracted on each crop, :func:`crop_box` (the paper's way): the crop is
  ``[floor(xmin W), floor(ymin H), ceil(xmax W), ceil(ymax H)]``;
* assigned from the whole image's features, :func:`assign_features_to_regions` (fast): a
  keypoint ``(x, y)`` belongs to a region when it lies inside that same pixel rectangle,
  ``x0 <= x < x1`` and ``y0 <= y < y1``.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.io import write_config
from gldboxes.progress import tqdm

__all__ = [
    "REGION_PLUGINS",
    "SOURCES",
    "SS_MIN_SIZE",
    "WHOLE_IMAGE",
    "RegionSource",
    "assign_features_to_regions",
    "compute_regions",
    "confs",
    "crop_box",
    "detector_boxes",
    "main",
    "read_regions_csv",
    "region_source",
    "region_sources",
    "regional_descriptors",
    "rmac_boxes",
    "rmac_grid",
    "select_regions",
    "selective_search_boxes",
    "selective_search_conf",
]

logger = logging.getLogger("retrieval.regions")

#: Region 0 of every image.
WHOLE_IMAGE = Box(0.0, 0.0, 1.0, 1.0, 1.0)

#: ``min_size`` of the selective-search presets: a proposal narrower or lower than this fraction
#: of the image side is dropped (before taking the first ``top_n``).
SS_MIN_SIZE = 0.2


def _detector(threshold: float) -> dict[str, Any]:
    return {
        "output": f"regions-d2r-{threshold:g}",  # file stem of the regions CSV
        "source": "detector",  # boxes from a detector's boxes CSV (id,box,score)
        "score_threshold": threshold,  # keep boxes with score >= threshold (paper: .7/.5/.3/.1)
        "max_boxes": None,  # keep at most this many boxes per image, best first (None: all)
        "min_size": 0.0,  # drop boxes narrower/lower than this fraction of the image side
        "max_regions": None,  # keep at most this many regions besides region 0 (None: all)
    }


def _rmac(levels: int) -> dict[str, Any]:
    return {
        "output": f"regions-rmacb-L{levels}",
        "source": "rmac",  # R-MAC grid boxes (RMACB), Tolias et al.'s sampling
        "levels": levels,  # levels l = 1..L; level l has l x (l + m - 1) square regions
        "overlap": 0.4,  # desired overlap of neighbouring regions (Tolias: 0.4)
        "min_size": 0.0,  # drop boxes narrower/lower than this fraction of the image side
        "max_regions": None,  # keep at most this many regions besides region 0, coarse first
    }


def selective_search_conf(top_n: int, min_size: float = SS_MIN_SIZE) -> dict[str, Any]:
    """The selective-search regions conf keeping ``top_n`` proposals (the ``ss-N`` presets)."""
    return {
        # the suffix names the size filter (stale CSVs of the unfiltered presets never match)
        "output": f"regions-ss-{top_n}" + (f"-s{min_size:g}" if min_size > 0 else ""),
        "source": "selective_search",  # OpenCV contrib ximgproc selective search
        "top_n": top_n,  # keep the first N proposals (OpenCV's rank order)
        "mode": "fast",  # "fast" or "quality" (switchToSelectiveSearchFast / Quality)
        "max_side": 256,  # run on the image downscaled to this long side (speed)
        "min_area": 0.01,  # drop proposals smaller than this fraction of the image
        "seed": 0,  # seeds libc rand(), which OpenCV's ranking uses (None: not seeded)
        "min_size": min_size,  # drop proposals narrower/lower than this fraction of the image
        # side, before taking the first top_n (slivers and specks carry a few chance words)
        "max_regions": None,  # keep at most this many regions besides region 0 (None: top_n)
    }


#: Named presets (hloc style); ``output`` is the file stem of the regions CSV.
confs: dict[str, dict[str, Any]] = {
    **{f"d2r-{t:g}": _detector(t) for t in (0.7, 0.5, 0.3, 0.1)},
    **{f"rmacb-L{n}": _rmac(n) for n in (1, 2, 3)},
    **{f"ss-{n}": selective_search_conf(n) for n in (1, 2, 5, 10)},
    "gt": {
        "output": "regions-gt",
        "source": "gt",  # ground-truth landmark boxes (oracle), e.g. the world's boxes_gt.csv
        "min_size": 0.0,  # drop boxes narrower/lower than this fraction of the image side
        "max_regions": None,  # keep at most this many regions besides region 0 (None: all)
    },
    "whole": {
        "output": "regions-whole",
        "source": "whole",  # region 0 only: the single-image index
    },
}


# --------------------------------------------------------------------------- R-MAC grid


def rmac_grid(width: int, height: int, levels: int, *, overlap: float = 0.4) -> np.ndarray:
    """R-MAC square regions of Tolias et al. (ICLR 2016), their exact sampling procedure.

    At level ``l`` the square side is ``floor(2 w / (l + 1))`` with ``w = min(W, H)``; the long
    side gets ``l + m - 1`` positions and the short side ``l``, where ``m`` (2..7, or 1 for a
    square image) is the number of level-1 regions along the long side whose neighbours overlap
    closest to ``overlap``. Positions are spread evenly from one border to the other.

    Args:
        width, height: image size ``W, H`` in pixels.
        levels: ``L`` >= 1.
        overlap: desired overlap of neighbouring level-1 regions.

    Returns:
        (R, 4) int64 regions ``[x0, y0, side, side]`` in pixels (top-left, 0-based), level by
        level, row-major within a level; ``R = sum_l l (l + m - 1)``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"rmac_grid: image size must be positive, got {width}x{height}")
    if levels < 1:
        raise ValueError(f"rmac_grid: levels must be >= 1, got {levels}")
    w = min(width, height)
    steps = np.arange(2, 8, dtype=np.float64)
    b = (max(width, height) - w) / (steps - 1)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - overlap))) + 1  # 1-based, as MATLAB
    wd = idx if height < width else 0  # extra positions along x
    hd = idx if height > width else 0  # extra positions along y
    out: list[np.ndarray] = []
    for lev in range(1, levels + 1):
        wl = math.floor(2 * w / (lev + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for size, extra in ((width, wd), (height, hd)):
            n = lev + extra
            step = (size - wl) / (n - 1) if n > 1 else 0.0
            starts.append(np.floor(wl2 + np.arange(n) * step) - wl2)
        xs, ys = starts
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        reg = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, wl), np.full(gx.size, wl)], 1)
        out.append(reg.astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0, 4), np.int64)


def rmac_boxes(width: int, height: int, levels: int, *, overlap: float = 0.4) -> list[Box]:
    """R-MAC grid regions (:func:`rmac_grid`) as normalised boxes with score 1.0."""
    grid = rmac_grid(width, height, levels, overlap=overlap).astype(np.float64)
    x0, y0, side = grid[:, 0] / width, grid[:, 1] / height, grid[:, 2]
    x1 = np.minimum((grid[:, 0] + side) / width, 1.0)
    y1 = np.minimum((grid[:, 1] + side) / height, 1.0)
    return [
        Box(float(a), float(b), float(c), float(d), 1.0)
        for a, b, c, d in zip(y0, x0, y1, x1, strict=True)
    ]


# --------------------------------------------------------------------------- selective search

_SS_LOCK = threading.Lock()


def _seed_libc_rand(seed: int) -> None:
    """Seed C ``rand()``: OpenCV's selective search ranks proposals with it."""
    libc = ctypes.CDLL(None)
    libc.srand(ctypes.c_uint(seed))


def selective_search_boxes(
    image: npt.NDArray[Any],
    *,
    top_n: int,
    mode: str = "fast",
    max_side: int | None = 256,
    min_area: float = 0.01,
    seed: int | None = 0,
    min_size: float = 0.0,
) -> list[Box]:
    """The first ``top_n`` selective-search proposals (OpenCV contrib ``ximgproc``).

    OpenCV orders proposals by a randomised hierarchical rank (level times C ``rand()``); with
    ``seed`` set, ``rand()`` is seeded under a lock so the result is reproducible (this touches
    the process-wide C generator). Exact duplicates, proposals under ``min_area`` and proposals
    narrower or lower than ``min_size`` of the image side are dropped before taking the first
    ``top_n``.

    Args:
        image: (H, W, 3) BGR or (H, W) grey uint8 image.
        top_n: number of proposals to keep (>= 0).
        mode: ``"fast"`` or ``"quality"``.
        max_side: downscale so the long side is at most this (None: full size).
        min_area: minimum proposal area as a fraction of the image.
        seed: seed of the ranking randomness (None: unseeded, not reproducible).
        min_size: minimum proposal width and height as a fraction of the image's (0: any).

    Returns:
        Up to ``top_n`` boxes, best-ranked first, score ``1 / (1 + rank)``.
    """
    import cv2

    if top_n < 0:
        raise ValueError(f"selective_search_boxes: top_n must be >= 0, got {top_n}")
    if mode not in ("fast", "quality"):
        raise ValueError(f"selective_search_boxes: mode must be 'fast' or 'quality', got {mode!r}")
    img: npt.NDArray[Any] = np.asarray(image)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"selective_search_boxes: expected an (H, W, 3) image, got {img.shape}")
    if top_n == 0:
        return []
    if not hasattr(cv2, "ximgproc") or not hasattr(cv2.ximgproc, "segmentation"):
        raise ValueError(
            "selective search needs OpenCV contrib (cv2.ximgproc.segmentation); reinstall "
            "opencv-contrib-python-headless with the same version as opencv-python-headless"
        )
    h, w = img.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        img = cv2.resize(
            img, (max(2, round(w * s)), max(2, round(h * s))), interpolation=cv2.INTER_AREA
        )
        h, w = img.shape[:2]
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img))
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    if seed is not None:
        with _SS_LOCK:
            _seed_libc_rand(seed)
            raw = ss.process()
    else:
        raw = ss.process()
    rects: np.ndarray = np.asarray(raw, dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    keep = rects[:, 2] * rects[:, 3] >= min_area * w * h
    keep &= (rects[:, 2] >= min_size * w) & (rects[:, 3] >= min_size * h)
    rects = rects[keep]
    _, first = np.unique(rects, axis=0, return_index=True)
    rects = rects[np.sort(first)][:top_n]
    out = []
    for r, (x, y, bw, bh) in enumerate(rects.tolist()):
        out.append(
            Box(y / h, x / w, min((y + bh) / h, 1.0), min((x + bw) / w, 1.0), 1.0 / (1.0 + r))
        )
    return out


# --------------------------------------------------------------------------- detector / GT


def detector_boxes(
    boxes: Sequence[Box], *, score_threshold: float, max_boxes: int | None = None
) -> list[Box]:
    """Detector boxes with ``score >= score_threshold``, best first, at most ``max_boxes``.

    Boxes without a score count as score 1.0 (ground-truth files used as detections).
    """
    scored = [b if b.score is not None else Box(b.ymin, b.xmin, b.ymax, b.xmax, 1.0) for b in boxes]
    kept = [b for b in scored if b.score is not None and b.score >= score_threshold]
    kept.sort(key=lambda b: -(b.score or 0.0))  # stable: file order among equal scores
    return kept if max_boxes is None else kept[:max_boxes]


def select_regions(
    boxes: Sequence[Box], *, min_size: float = 0.0, max_regions: int | None = None
) -> list[Box]:
    """The selection every source goes through: size filter, best score first, cap.

    Args:
        boxes: a source's boxes (region 0 excluded); a box without a score counts as 1.0.
        min_size: drop boxes whose width or height is below this fraction of the image's width
            or height (normalised box sides, with a 1e-9 tolerance for rounding).
        max_regions: keep at most this many (None: all).

    Returns:
        The kept boxes, by decreasing score (stable: the source's order among equal scores).
    """
    if not 0.0 <= min_size <= 1.0:
        raise ValueError(f"select_regions: min_size must be in [0, 1], got {min_size}")
    if max_regions is not None and max_regions < 0:
        raise ValueError(f"select_regions: max_regions must be >= 0 or None, got {max_regions}")
    tol = min_size - 1e-9
    kept = [b for b in boxes if b.xmax - b.xmin >= tol and b.ymax - b.ymin >= tol]
    kept.sort(key=lambda b: -(1.0 if b.score is None else b.score))
    return kept if max_regions is None else kept[:max_regions]


@dataclass(frozen=True, kw_only=True)
class RegionSource:
    """A region source: where the boxes after region 0 come from.

    Attributes:
        name: the ``source`` key of a regions preset.
        needs: what :attr:`propose` reads of an image: ``"nothing"``, ``"boxes"`` (its rows of a
            boxes file), ``"size"`` (width and height) or ``"pixels"`` (the BGR image).
        propose: ``propose(conf, width=, height=, image=, boxes=) -> [Box]``, the source's boxes
            before :func:`select_regions`.
        default_boxes: with ``needs == "boxes"``: the dataset file used when no boxes file is
            given (None: a boxes file is required).
    """

    name: str
    needs: Literal["nothing", "boxes", "size", "pixels"]
    propose: Callable[..., list[Box]]
    default_boxes: str | None = None


def _propose_whole(conf: Mapping[str, Any], **_: Any) -> list[Box]:
    return []


def _propose_detector(conf: Mapping[str, Any], *, boxes: Sequence[Box], **_: Any) -> list[Box]:
    return detector_boxes(
        boxes, score_threshold=conf["score_threshold"], max_boxes=conf.get("max_boxes")
    )


def _propose_gt(conf: Mapping[str, Any], *, boxes: Sequence[Box], **_: Any) -> list[Box]:
    return [Box(b.ymin, b.xmin, b.ymax, b.xmax, 1.0) for b in boxes]


def _propose_rmac(conf: Mapping[str, Any], *, width: int, height: int, **_: Any) -> list[Box]:
    return rmac_boxes(width, height, conf["levels"], overlap=conf.get("overlap", 0.4))


def _propose_ss(conf: Mapping[str, Any], *, image: npt.NDArray[Any], **_: Any) -> list[Box]:
    return selective_search_boxes(
        image,
        top_n=conf["top_n"],
        mode=conf.get("mode", "fast"),
        max_side=conf.get("max_side", 256),
        min_area=conf.get("min_area", 0.01),
        seed=conf.get("seed", 0),
        min_size=float(conf.get("min_size") or 0.0),
    )


#: Modules holding one more region source each (``SOURCE``, a :class:`RegionSource`); listed
#: once here. Its presets go in that module's ``confs``.
REGION_PLUGINS: tuple[str, ...] = ()

#: Every region source by name.
region_sources: dict[str, RegionSource] = {
    r.name: r
    for r in (
        RegionSource(name="detector", needs="boxes", propose=_propose_detector),
        RegionSource(name="rmac", needs="size", propose=_propose_rmac),
        RegionSource(name="selective_search", needs="pixels", propose=_propose_ss),
        RegionSource(name="gt", needs="boxes", propose=_propose_gt, default_boxes="boxes_gt.csv"),
        RegionSource(name="whole", needs="nothing", propose=_propose_whole),
    )
}
for _module in REGION_PLUGINS:
    _mod = importlib.import_module(_module)
    region_sources[_mod.SOURCE.name] = _mod.SOURCE
    confs.update(_mod.confs)
SOURCES = tuple(region_sources)


def region_source(conf: Mapping[str, Any]) -> RegionSource:
    """The source of a regions preset (its ``source`` key).

    Raises:
        ValueError: an unknown source (the message lists every source).
    """
    name = conf.get("source")
    if name not in region_sources:
        raise ValueError(f"regions conf: unknown region source {name!r}; expected one of {SOURCES}")
    return region_sources[str(name)]


def compute_regions(
    conf: Mapping[str, Any],
    *,
    width: int | None = None,
    height: int | None = None,
    image: npt.NDArray[Any] | None = None,
    boxes: Sequence[Box] | None = None,
) -> list[Box]:
    """All regions of one image under a preset: the whole image first, then the source's boxes.

    The source's boxes go through :func:`select_regions` with the preset's ``min_size``
    (default 0) and ``max_regions`` (default None); region 0 is always kept.

    Args:
        conf: a preset of :data:`confs` (or a dict with the same keys).
        width, height: image size in pixels (needed by ``size`` sources: ``rmac``).
        image: (H, W, 3) BGR pixels (needed by ``pixels`` sources: ``selective_search``).
        boxes: the image's boxes from the boxes file (``boxes`` sources: ``detector``,
            ``gt``); None or empty when the image has none.
    """
    src = region_source(conf)
    if src.needs == "size" and (width is None or height is None):
        raise ValueError(f"compute_regions: the {src.name!r} source needs width and height")
    if src.needs == "pixels" and image is None:
        raise ValueError(f"compute_regions: the {src.name!r} source needs the image")
    found = src.propose(conf, width=width, height=height, image=image, boxes=boxes or [])
    min_size = float(conf.get("min_size") or 0.0)
    return [
        WHOLE_IMAGE,
        *select_regions(found, min_size=min_size, max_regions=conf.get("max_regions")),
    ]


# --------------------------------------------------------------------------- crops and features


def crop_box(image: npt.NDArray[Any], box: Box) -> npt.NDArray[Any]:
    """The pixels of ``box``: ``image[floor(ymin H):ceil(ymax H), floor(xmin W):ceil(xmax W)]``.

    Args:
        image: (H, W) or (H, W, C) array.

    Returns:
        A view (h, w[, C]) with ``h, w >= 1``; features extracted on it are in crop pixels and
        map back to the image by adding ``(floor(xmin W), floor(ymin H))``.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"crop_box: expected an (H, W[, C]) image, got shape {img.shape}")
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box.to_pixels(w, h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop_box: box {box.to_string()} is empty on a {w}x{h} image")
    return img[y0:y1, x0:x1]


def assign_features_to_regions(
    keypoints: npt.ArrayLike, boxes: Sequence[Box], width: int, height: int
) -> list[np.ndarray]:
    """Indices of the keypoints inside each region's crop rectangle (fast regional features).

    A keypoint ``(x, y)`` belongs to a box when ``x0 <= x < x1`` and ``y0 <= y < y1`` with
    ``(x0, y0, x1, y1)`` the crop of :func:`crop_box`; regions may share keypoints.

    Args:
        keypoints: (N, 2) ``x, y`` in pixels of the whole image.
        boxes: R regions (region 0 is normally the whole image).
        width, height: image size in pixels.

    Returns:
        R sorted int64 index arrays into ``keypoints``.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[1] != 2:
        raise ValueError(f"assign_features_to_regions: keypoints must be (N, 2), got {kp.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"assign_features_to_regions: bad image size {width}x{height}")
    if not boxes:
        return []
    rect = np.array([b.to_pixels(width, height) for b in boxes], dtype=np.float64)  # (R, 4)
    x, y = kp[None, :, 0], kp[None, :, 1]
    inside = (
        (x >= rect[:, 0:1]) & (x < rect[:, 2:3]) & (y >= rect[:, 1:2]) & (y < rect[:, 3:4])
    )  # (R, N)
    r_idx, k_idx = np.nonzero(inside)
    cuts = np.searchsorted(r_idx, np.arange(1, len(boxes)))
    return [a.astype(np.int64) for a in np.split(k_idx, cuts)]


def regional_descriptors(
    keypoints: npt.ArrayLike,
    descriptors: npt.ArrayLike,
    boxes: Sequence[Box],
    width: int,
    height: int,
) -> list[np.ndarray]:
    """Per-region descriptor arrays from the whole image's features (the fast mode).

    The output is what ``retrieval.index.aggregation.aggregate(..., regions=[...])`` takes for one
    image: entry ``j`` holds the descriptors of the keypoints inside region ``j``.

    Args:
        keypoints: (N, 2) ``x, y`` pixels; descriptors: (N, D).
        boxes: R regions, region 0 normally the whole image.

    Returns:
        R arrays (N_j, D), same dtype as ``descriptors``.
    """
    desc = np.asarray(descriptors)
    kp = np.asarray(keypoints)
    if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
        raise ValueError(
            f"regional_descriptors: {kp.shape[0]} keypoints but descriptors have shape {desc.shape}"
        )
    return [desc[idx] for idx in assign_features_to_regions(kp, boxes, width, height)]


# --------------------------------------------------------------------------- files and the stage


def read_regions_csv(path: str | Path) -> dict[str, list[Box]]:
    """Read a regions CSV written by :func:`main`, checking that region 0 is the whole image.

    Returns:
        ``{image id: [region_0, region_1, ...]}`` in file order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"regions file not found: {path}")
    regions = read_boxes_csv(path)
    for key, boxes in regions.items():
        b = boxes[0]
        if (b.ymin, b.xmin, b.ymax, b.xmax) != (0.0, 0.0, 1.0, 1.0):
            raise ValueError(
                f"{path}: region 0 of {key!r} is {b.to_string()}, not the whole "
                "image '0.0 0.0 1.0 1.0'"
            )
    return regions


def _regions_of_image(
    conf: Mapping[str, Any], path: Path, boxes: Sequence[Box] | None
) -> list[Box]:
    """Regions of one image file under ``conf`` (reads what the source needs)."""
    width = height = None
    image: npt.NDArray[Any] | None = None
    needs = region_source(conf).needs
    if needs == "size":
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
    elif needs == "pixels":
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
    return compute_regions(conf, width=width, height=height, image=image, boxes=boxes)


#: Selective-search proposals per image kept in the cache the ``ss-N`` presets share: the
#: proposals are ranked, filtered and then cut, so ``ss-N`` is exactly the first N of them.
SS_CACHE_TOP_N = 32
_SS_CACHE_VERSION = 1


def _ss_cache(conf: Mapping[str, Any], export_dir: Path) -> Path | None:
    """The proposals cache of a selective-search conf (None when ``top_n`` exceeds it)."""
    from gldboxes.io import config_hash

    if int(conf["top_n"]) > SS_CACHE_TOP_N:
        return None
    key = {
        "mode": conf.get("mode", "fast"),
        "max_side": conf.get("max_side", 256),
        "min_area": conf.get("min_area", 0.01),
        "seed": conf.get("seed", 0),
        "min_size": float(conf.get("min_size") or 0.0),
        "top_n": SS_CACHE_TOP_N,
        "version": _SS_CACHE_VERSION,
    }
    return export_dir / f"ss-proposals-{config_hash(key, 10)}.npz"


def _selective_search_all(
    conf: Mapping[str, Any], paths: Sequence[tuple[str, Path]], num_workers: int, desc: str
) -> dict[str, list[Box]]:
    """Selective-search regions of every image (processes when ``num_workers > 1``)."""
    if num_workers > 1:
        # processes, not threads: the seeded C rand() is per process
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            jobs = pool.map(
                _regions_of_image,
                [conf] * len(paths),
                [p for _, p in paths],
                [None] * len(paths),
                chunksize=4,
            )
            return {
                name: regs
                for (name, _), regs in tqdm(
                    zip(paths, jobs, strict=True), total=len(paths), desc=desc
                )
            }
    return {
        name: _regions_of_image(conf, path, None)
        for name, path in tqdm(paths, desc=desc, disable=len(paths) < 50)
    }


def _write_ss_cache(path: Path, regions: Mapping[str, Sequence[Box]]) -> None:
    """Save proposals (region 0 excluded) as npz: names, offsets, boxes (M, 5) with scores."""
    from gldboxes.io import atomic_path

    names = list(regions)
    props = [list(regions[n])[1:] for n in names]
    offsets = np.r_[0, np.cumsum([len(p) for p in props])].astype(np.int64)
    rows = [(b.ymin, b.xmin, b.ymax, b.xmax, b.score or 0.0) for p in props for b in p]
    arr = np.asarray(rows, np.float64).reshape(-1, 5)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            format_version=np.int64(_SS_CACHE_VERSION),
            names=np.asarray(names, dtype=str),
            offsets=offsets,
            boxes=arr,
        )


def _from_ss_cache(
    conf: Mapping[str, Any], path: Path, names: Sequence[str]
) -> dict[str, list[Box]]:
    """The regions of ``names`` under ``conf`` from the proposals cache (a prefix of each)."""
    with np.load(path, allow_pickle=False) as z:
        if int(z["format_version"]) != _SS_CACHE_VERSION:
            raise ValueError(f"{path}: unsupported proposals cache version")
        cached = [str(n) for n in z["names"]]
        offsets, arr = z["offsets"], z["boxes"]
    if cached != list(names):
        raise ValueError(f"{path}: proposals cache is for other images; delete it to recompute")
    top_n = int(conf["top_n"])
    min_size = float(conf.get("min_size") or 0.0)
    out: dict[str, list[Box]] = {}
    for i, name in enumerate(names):
        rows = arr[offsets[i] : offsets[i + 1]][:top_n]
        found = [Box(*map(float, r)) for r in rows]
        out[name] = [
            WHOLE_IMAGE,
            *select_regions(found, min_size=min_size, max_regions=conf.get("max_regions")),
        ]
    return out


def main(
    conf: Mapping[str, Any],
    dataset: str | Path,
    export_dir: str | Path,
    *,
    boxes: str | Path | None = None,
    overwrite: bool = False,
    num_workers: int = 1,
) -> Path:
    """Write the regions CSV of a Revisited-style dataset's database images under one preset.

    Args:
        conf: a preset of :data:`confs`.
        dataset: dataset folder (``gnd_*.pkl`` + ``jpg/``; the synthetic world's
            ``OUT/retrieval``); ids are the database image names.
        export_dir: output folder; writes ``<conf['output']>.csv`` and ``.yaml`` (config).
        boxes: the boxes CSV for ``detector`` (required) and ``gt`` (default
            ``dataset/boxes_gt.csv``).
        overwrite: recompute even when the output exists.
        num_workers: processes for selective search (the output does not depend on it).

    Returns:
        The regions CSV path.
    """
    from retrieval.evaluation.datasets import RevisitedDataset

    conf = dict(conf)
    src = region_source(conf)
    source = src.name
    out = Path(export_dir) / f"{conf['output']}.csv"
    if out.exists() and not overwrite:
        logger.info("regions %s exist, skipping", out)
        return out
    ds = RevisitedDataset.load(dataset)
    by_id: dict[str, list[Box]] = {}
    if src.needs == "boxes":
        if boxes is None and src.default_boxes is not None:
            boxes = ds.root / src.default_boxes
        if boxes is None:
            raise ValueError(f"regions: the {source!r} source needs a boxes file (--boxes)")
        if not Path(boxes).exists():
            raise FileNotFoundError(f"boxes file not found: {boxes}")
        by_id = read_boxes_csv(boxes)
        unknown = set(by_id) - set(ds.imlist)
        if unknown and len(unknown) == len(by_id):
            raise ValueError(
                f"{boxes}: none of its ids is a database image of {ds.root} "
                f"(e.g. {sorted(unknown)[:3]})"
            )
    paths = [(name, ds.image_path(name)) for name in ds.imlist]
    desc = f"regions {conf['output']}"
    regions: dict[str, list[Box]] = {}
    cache = _ss_cache(conf, Path(export_dir)) if source == "selective_search" else None
    if cache is not None and cache.exists() and not overwrite:
        regions = _from_ss_cache(conf, cache, [n for n, _ in paths])
    elif cache is not None:
        # compute SS_CACHE_TOP_N proposals once; every ss-N preset (N <= it) takes a prefix
        wide = {**conf, "top_n": SS_CACHE_TOP_N, "max_regions": None}
        proposals = _selective_search_all(wide, paths, num_workers, desc)
        _write_ss_cache(cache, proposals)
        regions = _from_ss_cache(conf, cache, [n for n, _ in paths])
    elif source == "selective_search":  # more proposals than the cache keeps
        regions = _selective_search_all(conf, paths, num_workers, desc)
    else:
        for name, path in tqdm(paths, desc=desc, disable=len(paths) < 50):
            regions[name] = _regions_of_image(conf, path, by_id.get(name))
    n = sum(len(v) for v in regions.values())
    write_boxes_csv(out, regions, with_score=True)
    write_config(
        out.parent,
        {**conf, "dataset": str(dataset), "boxes": None if boxes is None else str(boxes)},
        name=f"{conf['output']}.yaml",
    )
    logger.info(
        "wrote %d regions of %d images (%.2f per image) to %s",
        n,
        len(regions),
        n / max(len(regions), 1),
        out,
    )
    return out
