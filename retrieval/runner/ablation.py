"""The Detect-to-Retrieve ablation: methods x region sources x thresholds, in one command.

Runs the grid of the paper's Table 1 and Figure 4 (Teichmann et al., CVPR 2019) on one
Revisited-style dataset, reusing the features and the codebook across every cell (the runner's
stages skip what is done), and writes into ``OUT/ablation/``:

* ``ablation.csv``: one row per (method, region source, setting, regional-feature mode): mAP
  under Easy / Medium / Hard, index size (items and bytes, absolute and relative to the
  single-image ASMK* index), the time to build the regional features and the index, and with
  ``verification`` the mAP after spatial verification and its seconds per query;
* ``ablation.md``: Markdown tables like Table 1 (Medium and Hard mAP and relative index size per
  method and threshold / level / number of proposals);
* ``ablation.png``: mAP against relative index size (items), Medium and Hard, like Figure 4.

Methods (:data:`METHODS`): single-image baselines (``asmk_star``, ``asmk``, ``vlad``) run once on
whole images; regional kernels (``r_asmk_star``, ``naive_r_asmk_star``, ``r_asmk``,
``naive_r_asmk``, ``r_vlad``) aggregate every image's regions into one entry; ``d2r_max`` /
``d2r_avg`` index each region as its own ASMK* entry and pool scores per image (eqs. 3, 4).
Region sources: detector boxes at each threshold (``boxes``), R-MAC grid levels, selective-search
top-N and ground-truth boxes (``gt_boxes``; the oracle), each with region 0 the whole image.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gldboxes.io import atomic_write, write_config
from retrieval.index.kernels import kernels as KERNEL_REGISTRY

__all__ = [
    "METHODS",
    "AblationCell",
    "confs",
    "format_markdown",
    "grid",
    "main",
    "plot",
]

logger = logging.getLogger("retrieval.runner.ablation")

#: method name -> (paper label, engine options). Single-image methods have no regions.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    **{k.name: (k.label, {"kernel": k.name}) for k in KERNEL_REGISTRY.values()},
    # Detect-to-Retrieve regional search: ASMK* words of every region, best (max) or mean region.
    "d2r_max": ("D2R-ASMK* max", {"kernel": "asmk_star", "regional_search": "max"}),
    "d2r_avg": ("D2R-ASMK* avg", {"kernel": "asmk_star", "regional_search": "avg"}),
}
_SINGLE = frozenset(k.name for k in KERNEL_REGISTRY.values() if not k.regional)

#: Named grids (hloc style); every key commented.
confs: dict[str, dict[str, Any]] = {
    "paper": {
        "engine": {},  # run options shared by every cell (retrieval.runner.conf: features ...)
        "methods": [  # rows of the grid (keys of METHODS); baselines run once
            "asmk_star",
            "r_asmk_star",
            "naive_r_asmk_star",
            "d2r_max",
            "d2r_avg",
            "vlad",
            "r_vlad",
        ],
        "thresholds": [0.7, 0.5, 0.3, 0.1],  # detector score thresholds (with a boxes file)
        "rmac_levels": [1, 2, 3],  # R-MAC grid levels L (RMACB)
        "ss": [1, 2, 5, 10],  # selective search: top-N proposals
        "gt": True,  # ground-truth boxes as regions (needs gt_boxes or DATASET/boxes_gt.csv)
        "region_features": ["assign"],  # "assign" and/or "reextract" (the paper's)
        "verification": None,  # None, or engine verification settings applied to every cell
    },
}


@dataclass(frozen=True)
class AblationCell:
    """One cell of the grid: a method on a region source and setting."""

    method: str  # key of METHODS
    source: str  # "whole", "detector", "rmac", "selective_search", "gt"
    setting: str  # threshold / levels / top-N as text ("-" for whole images and gt)
    region_features: str  # "assign" | "reextract" | "-" (whole images)
    engine: dict[str, Any]  # the engine options of the cell

    @property
    def label(self) -> str:
        return METHODS[self.method][0]


def _source_settings(
    conf: Mapping[str, Any], boxes: str | os.PathLike[str] | None, gt_boxes: Any
) -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    if boxes is not None:
        for t in conf.get("thresholds") or []:
            out.append(
                (
                    "detector",
                    f"{float(t):g}",
                    {"regions": "d2r-0.1", "region_boxes": os.fspath(boxes), "region_threshold": t},
                )
            )
    for lev in conf.get("rmac_levels") or []:
        if f"rmacb-L{int(lev)}" not in _region_presets():
            raise ValueError(f"ablation: no R-MAC preset for L={lev} (have 1, 2, 3)")
        out.append(("rmac", f"L{int(lev)}", {"regions": f"rmacb-L{int(lev)}"}))
    for n in conf.get("ss") or []:
        preset = f"ss-{int(n)}"
        if preset in _region_presets():
            out.append(("selective_search", str(int(n)), {"regions": preset}))
        else:
            from retrieval.regions import selective_search_conf

            out.append(
                ("selective_search", str(int(n)), {"regions": selective_search_conf(int(n))})
            )
    if conf.get("gt"):
        extra: dict[str, Any] = {"regions": "gt"}
        if gt_boxes is not None:
            extra["region_boxes"] = os.fspath(gt_boxes)
        out.append(("gt", "-", extra))
    return out


def _region_presets() -> Mapping[str, Any]:
    from retrieval.regions import confs as rconfs

    return rconfs


def grid(
    conf: Mapping[str, Any],
    *,
    boxes: str | os.PathLike[str] | None = None,
    gt_boxes: str | os.PathLike[str] | None = None,
) -> list[AblationCell]:
    """The cells of an ablation conf: baselines once, regional methods per source and setting."""
    methods = list(conf.get("methods") or [])
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"ablation: unknown method(s) {bad}; expected some of {list(METHODS)}")
    modes = list(conf.get("region_features") or ["assign"])
    if any(m not in ("assign", "reextract") for m in modes):
        raise ValueError(f"ablation: region_features must be assign/reextract, got {modes}")
    base = dict(conf.get("engine") or {})
    cells = [AblationCell("asmk_star", "whole", "-", "-", {**base, "kernel": "asmk_star"})]
    for m in methods:
        if m in _SINGLE and m != "asmk_star":
            cells.append(AblationCell(m, "whole", "-", "-", {**base, **METHODS[m][1]}))
    for source, setting, extra in _source_settings(conf, boxes, gt_boxes):
        for mode in modes:
            for m in methods:
                if m in _SINGLE:
                    continue
                eng = {**base, **METHODS[m][1], **extra, "region_features": mode}
                cells.append(AblationCell(m, source, setting, mode, eng))
    return cells


_COLUMNS = [
    "method",
    "label",
    "source",
    "setting",
    "region_features",
    "easy_map",
    "medium_map",
    "hard_map",
    "items",
    "images",
    "items_rel",
    "bytes",
    "bytes_rel",
    "region_features_seconds",
    "aggregate_seconds",
    "gv_easy_map",
    "gv_medium_map",
    "gv_hard_map",
    "gv_seconds_per_query",
    "index",
]


def main(
    conf: Mapping[str, Any],
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    boxes: str | os.PathLike[str] | None = None,
    gt_boxes: str | os.PathLike[str] | None = None,
    codebook_images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    codebook_dataset: str | os.PathLike[str] | None = None,
    codebook_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    name: str = "ablation",
) -> Path:
    """Run the grid and write ``OUT/<name>/ablation.{csv,md,png}``; returns the CSV path.

    Args:
        conf: an ablation conf (see :data:`confs`).
        dataset: Revisited-style folder (the synthetic world's ``retrieval/``).
        out_dir: the runner's output root (features, codebook, regions, indexes are shared
            with ``gldboxes retrieval run`` there).
        boxes: a detector's boxes CSV (``id,box,score``) for the threshold rows.
        gt_boxes: ground-truth boxes CSV (default ``DATASET/boxes_gt.csv`` when ``gt``).
        codebook_images, codebook_dataset, codebook_path: the codebook (see
            :func:`retrieval.runner.run.run`).
        overwrite: recompute every stage.
        name: the result folder under ``out_dir`` (several grids can share features).
    """
    from retrieval.runner import run as runner

    out = Path(out_dir)
    cells = grid(conf, boxes=boxes, gt_boxes=gt_boxes)
    logger.info("ablation: %d cells", len(cells))
    rows: list[dict[str, Any]] = []
    cb_path = codebook_path
    baseline: dict[str, float] = {}
    for cell in cells:
        eng = dict(cell.engine)
        if conf.get("verification") is not None:
            eng["verification"] = dict(conf["verification"])
        res = runner.run(
            dataset,
            out,
            eng,
            codebook_images=None if cb_path else codebook_images,
            codebook_dataset=None if cb_path else codebook_dataset,
            codebook_path=cb_path,
            overwrite=overwrite,
        )
        cb_path = res.codebook  # every later cell reuses it
        st = res.index_stats
        if not baseline:
            baseline = {"items": float(st["items"]), "bytes": float(st["bytes"])}
        rx = 0.0
        if cell.region_features == "reextract" and res.regions is not None:
            rx = res.seconds.get("features-regions", float("nan"))
        row: dict[str, Any] = {
            "method": cell.method,
            "label": cell.label,
            "source": cell.source,
            "setting": cell.setting,
            "region_features": cell.region_features,
            "easy_map": 100 * res.results["easy"].map,
            "medium_map": 100 * res.results["medium"].map,
            "hard_map": 100 * res.results["hard"].map,
            "items": int(st["items"]),
            "images": int(st["images"]),
            "items_rel": st["items"] / baseline["items"],
            "bytes": int(st["bytes"]),
            "bytes_rel": st["bytes"] / baseline["bytes"],
            "region_features_seconds": rx,
            "aggregate_seconds": res.seconds.get("aggregate", float("nan")),
            "index": res.index.name if res.index else "",
        }
        if res.verification:
            for p in ("easy", "medium", "hard"):
                row[f"gv_{p}_map"] = 100 * res.verification["results"][p].map
            row["gv_seconds_per_query"] = res.verification["seconds_per_query"]
        rows.append(row)
        logger.info(
            "%s %s %s %s: M %.2f H %.2f, %.2fx items",
            cell.label,
            cell.source,
            cell.setting,
            cell.region_features,
            row["medium_map"],
            row["hard_map"],
            row["items_rel"],
        )
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"ablation: name must be a plain folder name, got {name!r}")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "ablation.csv"
    with atomic_write(csv_path) as fh:
        w = csv.DictWriter(fh, fieldnames=_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in _COLUMNS})
    with atomic_write(folder / "ablation.md") as fh:
        fh.write(format_markdown(rows))
    plot(rows, folder / "ablation.png")
    write_config(
        folder,
        {
            **copy.deepcopy(dict(conf)),
            "dataset": os.fspath(dataset),
            "boxes": None if boxes is None else os.fspath(boxes),
            "gt_boxes": None if gt_boxes is None else os.fspath(gt_boxes),
            "codebook": os.fspath(cb_path) if cb_path else None,
        },
    )
    return csv_path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown like the paper's Table 1: per source family, methods x settings.

    Each cell reads ``Medium / Hard mAP (relative index size in items)``; a second, long table
    lists every row with byte sizes, costs and (when run) spatial verification.
    """
    lines = ["# Detect-to-Retrieve ablation", ""]
    base = [r for r in rows if r["source"] == "whole"]
    if base:
        lines += [
            "## Single-image baselines",
            "",
            "| method | M mAP | H mAP | size |",
            "|---|---|---|---|",
        ]
        for r in base:
            lines.append(
                f"| {r['label']} | {_num(r['medium_map']):.2f} | {_num(r['hard_map']):.2f} | "
                f"{_num(r['items_rel']):.2f}x |"
            )
        lines.append("")
    names = {
        "detector": "Detector boxes (score threshold)",
        "rmac": "R-MAC grid boxes (levels)",
        "selective_search": "Selective search (top-N)",
        "gt": "Ground-truth boxes (oracle)",
    }
    for source, title in names.items():
        sub = [r for r in rows if r["source"] == source]
        if not sub:
            continue
        settings = list(dict.fromkeys(str(r["setting"]) for r in sub))
        for mode in dict.fromkeys(str(r["region_features"]) for r in sub):
            lines += [
                f"## {title}, regional features: {mode}",
                "",
                "Cells: Medium / Hard mAP (index size relative to ASMK*, in items).",
                "",
                "| method | " + " | ".join(settings) + " |",
                "|---|" + "---|" * len(settings),
            ]
            for method in dict.fromkeys(str(r["method"]) for r in sub):
                cells = []
                label = METHODS[method][0]
                for s in settings:
                    hit = [
                        r
                        for r in sub
                        if r["method"] == method
                        and str(r["setting"]) == s
                        and str(r["region_features"]) == mode
                    ]
                    if not hit:
                        cells.append("-")
                        continue
                    r = hit[0]
                    cells.append(
                        f"{_num(r['medium_map']):.1f} / {_num(r['hard_map']):.1f} "
                        f"({_num(r['items_rel']):.2f}x)"
                    )
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    gv = any(r.get("gv_medium_map") not in (None, "") for r in rows)
    cols = ["method", "regions", "setting", "features", "E", "M", "H", "items", "bytes"]
    cols += ["bytes/image", "features s", "index s"]
    cols += ["GV E", "GV M", "GV H", "GV s/query"] if gv else []
    lines += ["## All runs", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [
            str(r["label"]),
            str(r["source"]),
            str(r["setting"]),
            str(r["region_features"]),
            f"{_num(r['easy_map']):.2f}",
            f"{_num(r['medium_map']):.2f}",
            f"{_num(r['hard_map']):.2f}",
            f"{_num(r['items_rel']):.2f}x",
            f"{_num(r['bytes_rel']):.2f}x",
            f"{_num(r['bytes']) / max(_num(r['images']), 1.0):,.0f}",
            f"{_num(r['region_features_seconds']):.1f}",
            f"{_num(r['aggregate_seconds']):.1f}",
        ]
        if gv:
            vals += [
                f"{_num(r.get('gv_easy_map')):.2f}",
                f"{_num(r.get('gv_medium_map')):.2f}",
                f"{_num(r.get('gv_hard_map')):.2f}",
                f"{_num(r.get('gv_seconds_per_query')):.3f}",
            ]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """mAP (Medium, Hard) against relative index size, one series per method and source.

    Writes a PNG with matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"detector": "o", "rmac": "s", "selective_search": "^", "gt": "*", "whole": "D"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(
            (str(r["method"]), str(r["source"]), str(r["region_features"])), []
        ).append(r)
    cmap = plt.get_cmap("tab10")
    colours = {m: cmap(i % 10) for i, m in enumerate(METHODS)}
    for ax, prot in zip(axes, ("medium", "hard"), strict=True):
        for (method, source, mode), rs in groups.items():
            xs = [_num(r["items_rel"]) for r in rs]
            ys = [_num(r[f"{prot}_map"]) for r in rs]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            label = METHODS[method][0] + ("" if source == "whole" else f", {source}")
            if mode == "reextract":
                label += " (re-extracted)"
            ax.plot(
                [xs[i] for i in order],
                [ys[i] for i in order],
                marker=markers.get(source, "o"),
                linestyle="--" if mode == "reextract" else "-",
                color=colours[method],
                label=label,
                markersize=9 if source in ("whole", "gt") else 6,
            )
        ax.set_xlabel("index size relative to ASMK* (items)")
        ax.set_ylabel(f"mAP, {prot.capitalize()} (%)")
        ax.set_title(f"{prot.capitalize()} protocol")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path
