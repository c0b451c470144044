"""The region-source registry: where an image's regions come from, and the selection they share.

A source is one :class:`RegionSource` object (its ``name``, what it ``needs`` of an image, its
``propose`` function); :data:`region_sources` maps names to sources (the built-in ``detector``,
``rmac``, ``selective_search``, ``gt`` and ``whole``; :data:`retrieval.regions.REGION_PLUGINS`
adds more). :func:`compute_regions` gives one image's regions under a preset: region 0 (the whole
image, :data:`WHOLE_IMAGE`), then the source's boxes through :func:`select_regions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy.typing as npt

from gldboxes.boxes import Box
from retrieval.regions.grid import rmac_boxes
from retrieval.regions.selective_search import selective_search_boxes

__all__ = [
    "WHOLE_IMAGE",
    "RegionSource",
    "compute_regions",
    "detector_boxes",
    "region_source",
    "region_sources",
    "select_regions",
]

#: Region 0 of every image.
WHOLE_IMAGE = Box(0.0, 0.0, 1.0, 1.0, 1.0)


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


def region_source(conf: Mapping[str, Any]) -> RegionSource:
    """The source of a regions preset (its ``source`` key).

    Raises:
        ValueError: an unknown source (the message lists every source).
    """
    name = conf.get("source")
    if name not in region_sources:
        raise ValueError(
            f"regions conf: unknown region source {name!r}; expected one of {tuple(region_sources)}"
        )
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
