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

Modules: :mod:`~retrieval.regions.sources` (the source registry, the selection,
:func:`compute_regions`), :mod:`~retrieval.regions.grid` (the R-MAC grid),
:mod:`~retrieval.regions.selective_search`, :mod:`~retrieval.regions.crops` (crops and regional
features), :mod:`~retrieval.regions.stage` (the regions CSV and :func:`main`); this package holds
the presets :data:`confs` and the plug-in list :data:`REGION_PLUGINS`.
"""

from __future__ import annotations

import importlib
from typing import Any

from retrieval.regions.crops import assign_features_to_regions, crop_box, regional_descriptors
from retrieval.regions.grid import rmac_boxes, rmac_grid
from retrieval.regions.selective_search import selective_search_boxes
from retrieval.regions.sources import (
    WHOLE_IMAGE,
    RegionSource,
    compute_regions,
    detector_boxes,
    region_source,
    region_sources,
    select_regions,
)
from retrieval.regions.stage import SS_CACHE_TOP_N, main, read_regions_csv

__all__ = [
    "REGION_PLUGINS",
    "SOURCES",
    "SS_CACHE_TOP_N",
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


#: Modules holding one more region source each (``SOURCE``, a :class:`RegionSource`); listed
#: once here. Its presets go in that module's ``confs``.
REGION_PLUGINS: tuple[str, ...] = ()

for _module in REGION_PLUGINS:
    _mod = importlib.import_module(_module)
    region_sources[_mod.SOURCE.name] = _mod.SOURCE
    confs.update(_mod.confs)
SOURCES = tuple(region_sources)
