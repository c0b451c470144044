"""The options of a retrieval run: every key with its default, their checks, and the names they
give to output folders.

:data:`default_conf` lists every option of :func:`retrieval.runner.run.run` (the resolved dict is
written beside each output as ``config.yaml``). The features, kernel and regions options name a
plug-in of a registry (:data:`retrieval.features.confs`, :data:`retrieval.index.kernels.kernels`,
:data:`retrieval.regions.confs`); the verification defaults travel with the features preset.

Detect-to-Retrieve (Teichmann et al. CVPR 2019) on the index side:

* ``regions``: a preset of :data:`retrieval.regions.confs` (``gt``, ``d2r-0.3``, ``rmacb-L2``,
  ``ss-5`` ...) or a regions conf dict; with ``region_boxes`` (a detector's boxes CSV) and
  ``region_threshold``. Region 0 is always the whole image.
* ``region_features``: ``"assign"`` gives each region the whole image's features whose keypoint
  lies in its crop (fast, nothing extracted); ``"reextract"`` extracts features again on every
  crop ``[floor(xmin W), floor(ymin H), ceil(xmax W), ceil(ymax H)]`` (the paper's way).
* a regional ``kernel`` (``r_asmk_star``, ``naive_r_asmk_star``, ``r_vlad`` ...) aggregates the
  regions into one entry per image; ``regional_search="max"|"avg"`` instead indexes every region
  as its own entry with the (single-image) ``kernel`` and pools scores per image (D2R-ASMK*).
* queries always stay single-region (``retrieval.index.aggregation.QUERY_KERNEL``), and regional
  kernels are compared without the ASMK score normalisation, as the authors do.
* ``verification``: spatial verification of the top ``top_n`` (junk removed per protocol, one pass
  for all protocols, :mod:`retrieval.verification`), evaluated per protocol.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gldboxes.io import config_hash, read_json
from retrieval import features as features_stage
from retrieval import regions as regions_stage
from retrieval.index.aggregation import KERNELS, REGIONAL_KERNELS
from retrieval.index.assignment import ASSIGNMENTS

__all__ = [
    "IMAGE_SUFFIXES",
    "REGION_FEATURE_MODES",
    "codebook_tag",
    "default_conf",
    "feature_conf",
    "region_conf",
    "region_norm_floor",
    "resolve_conf",
    "run_name",
    "verification_conf",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Every key of a run's configuration (the resolved dict is written beside each output).
default_conf: dict[str, Any] = {
    "features": "rootsift",  # preset of retrieval.features.confs
    "feature_model": {},  # overrides of the preset's "model" (e.g. {"max_features": 4000})
    "feature_preprocessing": {},  # overrides of the preset's "preprocessing" ({"max_side": 800})
    "codebook": {  # see retrieval.features.codebook.confs
        "size": 1024,
        "niter": 20,
        "seed": 0,
        "max_descriptors": 500_000,
        "max_points_per_centroid": 256,
    },
    "kernel": "asmk_star",  # one of retrieval.index.aggregation.KERNELS (naive_r_asmk_star, r_vlad
    # ...)
    "num_assignments": 1,  # visual words per descriptor
    # Visual-word assignment (retrieval.index.assignment): "exact" (nearest word, the paper's)
    # or "hnsw" (a faiss HNSW graph over the words, cached beside codebook.npy: ~2.5x faster
    # to build an index at K=65,536, 99% of descriptors get the exact word).
    "assignment": "exact",
    "alpha": None,  # selectivity exponent (None: the kernel's default, 3 for ASMK)
    "tau": None,  # selectivity threshold (None: kernel default, 0 for ASMK)
    "normalize": None,  # ASMK image normalisation (None: kernel default)
    "top_k": None,  # ranks kept per query (None: the whole database)
    "batch_images": 512,  # images aggregated per batch (memory bound)
    # Index-side regions (Detect-to-Retrieve); None: whole images only.
    "regions": None,  # a retrieval.regions.confs preset name, or a regions conf dict
    "region_boxes": None,  # boxes CSV: detector source (required), gt (default DATASET/boxes_gt)
    "region_threshold": None,  # detector score threshold overriding the preset's
    "region_features": "assign",  # "assign" (whole-image features in each box) | "reextract"
    "regional_search": None,  # None | "max" | "avg": D2R search, each region its own entry
    # Regional search: floor of a region's word count in the ASMK normalisation, as a fraction
    # of its image's (retrieval.index.inverted_file; None: REGION_NORM_FLOOR = 0.1; 0: plain ASMK).
    "region_norm_floor": None,
    # Spatial verification after search; None: off. A dict of VerificationConf fields
    # (max_distance, threshold, trials, seed, min_matches, min_inliers, max_scale) plus
    # "top_n" (head verified per protocol, 100) and "num_workers" (threads, None: CPUs).
    "verification": None,
}

REGION_FEATURE_MODES = ("assign", "reextract")
_VERIFY_KEYS = ("top_n", "num_workers")


def resolve_conf(conf: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``default_conf`` updated with ``conf`` and keyword overrides (nested ``codebook`` merged)."""
    out = copy.deepcopy(default_conf)
    for src in (conf or {}, overrides):
        for k, v in src.items():
            if k not in out:
                raise ValueError(f"unknown retrieval option {k!r}; expected one of {sorted(out)}")
            if k in ("codebook", "feature_model", "feature_preprocessing") and isinstance(
                v, Mapping
            ):
                out[k].update(v)
            elif v is not None or k in ("alpha", "tau", "normalize", "top_k"):
                out[k] = v
    if out["kernel"] not in KERNELS:
        raise ValueError(f"unknown kernel {out['kernel']!r}; expected one of {list(KERNELS)}")
    if out["assignment"] not in ASSIGNMENTS:
        raise ValueError(
            f"unknown assignment {out['assignment']!r}; expected one of {list(ASSIGNMENTS)}"
        )
    if out["features"] not in features_stage.confs:
        raise ValueError(
            f"unknown features preset {out['features']!r}; expected one of "
            f"{sorted(features_stage.confs)}"
        )
    _check_regional(out)
    return out


def _check_regional(out: Mapping[str, Any]) -> None:
    """Validate the region / regional-search / verification options of a resolved conf."""
    if out["region_features"] not in REGION_FEATURE_MODES:
        raise ValueError(
            f"region_features must be one of {REGION_FEATURE_MODES}, got {out['region_features']!r}"
        )
    if out["regional_search"] not in (None, "max", "avg"):
        raise ValueError(
            f"regional_search must be None, 'max' or 'avg', got {out['regional_search']!r}"
        )
    if out["regional_search"] is not None:
        if out["kernel"] in REGIONAL_KERNELS:
            raise ValueError(
                f"regional_search indexes each region with a single-image kernel; got the "
                f"regional kernel {out['kernel']!r} (use asmk_star for D2R-ASMK*)"
            )
        if out["regions"] is None:
            raise ValueError("regional_search needs regions (a retrieval.regions.confs preset)")
    reg = out["regions"]
    if isinstance(reg, str) and reg not in regions_stage.confs:
        raise ValueError(
            f"unknown regions preset {reg!r}; expected one of {sorted(regions_stage.confs)}"
        )
    if reg is not None and not isinstance(reg, str | Mapping):
        raise ValueError(f"regions must be a preset name or a conf dict, got {type(reg).__name__}")
    ver = out["verification"]
    if ver is not None:
        if not isinstance(ver, Mapping):
            raise ValueError(f"verification must be a dict of settings, got {ver!r}")
        from retrieval.verification import VerificationConf

        known = set(VerificationConf.__dataclass_fields__) | set(_VERIFY_KEYS)
        bad = sorted(set(ver) - known)
        if bad:
            raise ValueError(f"unknown verification setting(s) {bad}; expected {sorted(known)}")


def feature_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The features preset of a run, with the run's ``feature_model`` overrides applied.

    Args:
        conf: a resolved run conf (:func:`resolve_conf`).

    Returns:
        a deep copy of ``retrieval.features.confs[conf["features"]]`` whose ``model`` and
        ``preprocessing`` dicts are updated with ``conf["feature_model"]`` and
        ``conf["feature_preprocessing"]``; its ``output`` (the features folder) names the
        resulting budget, orientation and image size (:func:`retrieval.features.output_name`).
    """
    fc = copy.deepcopy(features_stage.confs[conf["features"]])
    model = dict(conf.get("feature_model") or {})
    pre = dict(conf.get("feature_preprocessing") or {})
    bad = sorted(set(pre) - set(fc["preprocessing"]))
    if bad:
        raise ValueError(
            f"unknown feature preprocessing option(s) {bad}; expected {sorted(fc['preprocessing'])}"
        )
    base = copy.deepcopy(fc)
    fc["model"].update(model)
    fc["preprocessing"].update(pre)
    if model or pre:
        fc["output"] = features_stage.output_name(fc)
        # Settings the name does not spell out (a model file, SIFT thresholds) get a hash, so
        # two configurations never share a features folder.
        named = {"max_features", "upright", "max_side", "name"}
        other = {
            f"{part}.{k}": v
            for part in ("model", "preprocessing")
            for k, v in fc[part].items()
            if k not in named and base[part].get(k) != v
        }
        if other:
            fc["output"] += f"-{config_hash(other, 6)}"
    return fc


def codebook_tag(codebook_path: str | os.PathLike[str]) -> str:
    """The training-set name used in folder names: from the codebook's sidecar, else a hash."""
    p = Path(codebook_path)
    side = (p / "codebook.json") if p.is_dir() else p.with_suffix(".json")
    if side.exists():
        name = read_json(side).get("training_set")
        if isinstance(name, str) and name:
            return name.replace("/", "_")
    return f"cb{config_hash({'p': os.path.abspath(p)}, 8)}"


def region_conf(conf: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resolved regions conf of a run (preset + threshold override), or None.

    The ``output`` name gets the threshold and, for a detector's boxes file, a hash of its path,
    so two boxes files or thresholds never share a regions CSV.
    """
    reg = conf.get("regions")
    if reg is None:
        return None
    rc = copy.deepcopy(regions_stage.confs[reg] if isinstance(reg, str) else dict(reg))
    if "source" not in rc or "output" not in rc:
        raise ValueError(f"regions conf needs 'source' and 'output' keys, got {sorted(rc)}")
    thr = conf.get("region_threshold")
    if thr is not None:
        if rc["source"] != "detector":
            raise ValueError(f"region_threshold applies to detector regions, not {rc['source']!r}")
        rc["score_threshold"] = float(thr)
        rc["output"] = f"regions-d2r-{float(thr):g}"
    boxes = conf.get("region_boxes")
    if boxes is not None and rc["source"] in ("detector", "gt"):
        tag = config_hash({"boxes": os.path.abspath(os.fspath(boxes))}, 6)
        rc["output"] = f"{rc['output']}-{Path(boxes).stem}{tag}"
    return rc


def region_norm_floor(conf: Mapping[str, Any]) -> float | None:
    """The normalisation floor of a run's regional-search index (None without regional search).

    Args:
        conf: a run conf; ``region_norm_floor`` None means the library default.
    """
    from retrieval.index.inverted_file import REGION_NORM_FLOOR

    if not conf.get("regional_search"):
        return None
    rho = conf.get("region_norm_floor")
    return float(REGION_NORM_FLOOR if rho is None else rho)


def run_name(conf: Mapping[str, Any], training_set: str, dataset: str) -> str:
    """The config-named folder of a run's index and results.

    Args:
        conf: a resolved run conf; training_set: the codebook's training-set tag
            (:func:`codebook_tag`); dataset: the database's name.

    Returns:
        ``<method>-k<K>-<features>[-ma<m>][-hnsw][-<hash of alpha/tau/normalize>]
        [-<regions>-<ra|rx>]-<training set>-<dataset>``, ``method`` being the kernel or
        ``d2r_<pooling>-<kernel>`` for regional search, e.g.
        ``d2r_max-asmk_star-k128-rootsift-n1000-gt-rx-images-0a1b2c3d-synth``.
    """
    fc = feature_conf(conf)
    ma = f"-ma{conf['num_assignments']}" if int(conf["num_assignments"]) != 1 else ""
    if conf.get("assignment", "exact") != "exact":
        ma += f"-{conf['assignment']}"
    extra = {k: conf[k] for k in ("alpha", "tau", "normalize") if conf[k] is not None}
    tag = f"-{config_hash(extra, 6)}" if extra else ""
    method = conf["kernel"]
    rc = region_conf(conf)
    if conf.get("regional_search"):
        method = f"d2r_{conf['regional_search']}-{method}"
    if rc is not None:
        mode = "ra" if conf.get("region_features", "assign") == "assign" else "rx"
        tag += f"-{rc['output'].removeprefix('regions-')}-{mode}"
    return f"{method}-k{conf['codebook']['size']}-{fc['output']}{ma}{tag}-{training_set}-{dataset}"


def verification_conf(conf: Mapping[str, Any]) -> tuple[Any, int, int | None]:
    """The spatial verification settings of a run: the features preset's ``verification``
    defaults (RootSIFT: ratio test + mutual NN; DELF: 1-NN below 0.8), updated with the run's
    ``verification`` dict (keys set to None keep the preset's value).

    Args:
        conf: a resolved run conf whose ``verification`` is not None.

    Returns:
        ``(VerificationConf, top_n, num_workers)``.
    """
    from retrieval.verification import VerificationConf

    ver = {k: v for k, v in dict(conf.get("verification") or {}).items() if v is not None}
    top_n = int(ver.pop("top_n", 100))
    workers = ver.pop("num_workers", None)
    if top_n < 1:
        raise ValueError(f"verification top_n must be >= 1, got {top_n}")
    preset = dict(feature_conf(resolve_conf(conf)).get("verification") or {})
    return VerificationConf(**{**preset, **ver}), top_n, None if workers is None else int(workers)
