"""``gldboxes pipeline``: the whole Detect-to-Retrieve story on the synthetic landmark world.

Every stage runs through its own package's stage function and talks to the next through files,
so a rerun skips what is finished::

    synth world ─┬─ split (4 train + 4 val per landmark) ─ autobox pre-annotation (Gordo et al.)
                 │                                        └ [Label Studio campaign]
                 ├─ TF records ─ train tiny detector ─ AP@0.5 on val ─ export ─ boxes on database
                 └─ RootSIFT ─ codebook (another world) ─ ASMK* / D2R-ASMK* / D2R-R-ASMK*
                    ─ spatial verification ─ Revisited mAP ─ table, CSV, plot ─ FiftyOne datasets

This module is the CLI face of :mod:`gldboxes` that dispatches to ``annotation``, ``detection``
and ``retrieval``; those are imported inside the functions, so ``gldboxes --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "register", "run_pipeline"]

logger = logging.getLogger("gldboxes.pipeline")

# Every key is documented; a YAML file given with --config overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "seed": 0,  # master seed of the world (the codebook world uses seed + 1)
        "world": "default",  # gldboxes.synth preset of the benchmark world
        "world_overrides": {},  # SynthConf fields replacing the preset's
        # The codebook is trained on another world (the other-dataset convention).
        "codebook_world": {"landmarks": 2, "distractors": 10, "train_landmarks": 40},
        "split": "paper",  # gldboxes.split preset (4 train + 4 val images per landmark)
        "autobox": "gordo-rootsift",  # annotation.autobox preset (pre-annotation)
        "annotation": False,  # also run a Label Studio campaign with the pre-annotations
        "detector": "tiny_cpu",  # detection.configs preset
        "detector_steps": 600,  # training steps of the detector
        "detector_records": "synth",  # detection.records preset
        "detect_threshold": 0.1,  # detector score threshold for regions (paper: 0.1)
        "features": "rootsift",  # retrieval.features preset
        "feature_model": {},  # overrides of the features preset's model (DELF: path, pca_path)
        "codebook_size": 1024,  # visual words
        # Spatial verification of the top N; matching and thresholds are the features
        # preset's (retrieval.features.confs[...]["verification"]: RootSIFT ratio + mutual).
        "verification": {"top_n": 100},
        "oracle": True,  # also index with the ground-truth boxes (upper bound)
        "views": True,  # build the FiftyOne datasets (needs the `view` extra)
    },
    "quick": {
        "seed": 0,
        "world": "tiny",
        "world_overrides": {},
        "codebook_world": {"landmarks": 1, "distractors": 4, "train_landmarks": 8},
        "split": "paper",
        "autobox": "gordo-rootsift",
        "annotation": False,
        "detector": "tiny_cpu",
        "detector_steps": 150,
        "detector_records": "synth",
        "detect_threshold": 0.1,
        "features": "rootsift",
        "feature_model": {},
        "codebook_size": 128,
        "verification": {"top_n": 20},
        "oracle": True,
        "views": False,
    },
}

# Real-data mode (``--dataset``): the paper's settings on a Revisited folder, no training.
PRESETS["paper"] = {
    **PRESETS["full"],
    "features": "delf",  # DELF-GLD (give --features-model and --features-pca)
    "codebook_size": 65536,  # the paper's codebook, trained on the other dataset
    "detect_threshold": 0.1,  # the paper's lowest (and best) threshold
    "verification": None,  # the published targets are without verification
    "oracle": False,
    "views": False,
}

TABLE_COLUMNS = (
    "method",
    "regions_per_image",
    "index_bytes_per_image",
    "relative_index_size",
    "easy_map",
    "medium_map",
    "hard_map",
    "medium_mp10",
)


def register(subparsers: Any) -> None:
    """Add the ``pipeline`` subcommand."""
    p = subparsers.add_parser(
        "pipeline",
        help="the end-to-end Detect-to-Retrieve pipeline on the synthetic landmark world",
    )
    p.add_argument("--out", default="runs/pipeline", help="work folder (reruns resume here)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--quick", action="store_true", help="the quick preset (about 3 minutes)")
    p.add_argument("--config", help="YAML file overriding preset keys")
    p.add_argument("--annotation", action="store_true", help="also run a Label Studio campaign")
    p.add_argument("--no-views", action="store_true", help="skip the FiftyOne datasets")
    real = p.add_argument_group("real data (skips the world, the split and detector training)")
    real.add_argument("--dataset", help="Revisited folder (roxford5k / rparis6k layout)")
    real.add_argument("--codebook-dataset", help="the other Revisited folder (codebook)")
    real.add_argument("--detector", help="detector SavedModel (ours or the authors' TF1 one)")
    real.add_argument("--features-model", help="DELF SavedModel directory (--preset paper)")
    real.add_argument("--features-pca", help="DELF PCA (.npz or folder of .datum files)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gldboxes.io import read_yaml

    conf = copy.deepcopy(PRESETS["quick" if args.quick else args.preset])
    if args.config:
        extra = read_yaml(args.config) or {}
        if not isinstance(extra, dict):
            raise ValueError(
                f"{args.config}: expected a mapping of pipeline keys, got a {type(extra).__name__}"
            )
        unknown = set(extra) - set(conf)
        if unknown:
            raise ValueError(f"{args.config}: unknown pipeline keys {sorted(unknown)}")
        conf.update(extra)
    if args.annotation:
        conf["annotation"] = True
    if args.no_views:
        conf["views"] = False
    if conf["features"] == "delf" and not (args.dataset and args.features_model):
        raise ValueError(
            "DELF features need a real dataset and model: --dataset DIR --codebook-dataset DIR "
            "--detector SAVEDMODEL --features-model DELF_SAVEDMODEL [--features-pca PCA]"
        )
    if args.dataset:
        if not (args.codebook_dataset and args.detector):
            raise ValueError("--dataset needs --codebook-dataset and --detector")
        model = {"path": args.features_model, "pca_path": args.features_pca}
        conf["feature_model"] = {k: v for k, v in model.items() if v}
        result = run_real_data(
            conf,
            Path(args.dataset),
            Path(args.codebook_dataset),
            Path(args.detector),
            Path(args.out),
        )
    else:
        result = run_pipeline(conf, Path(args.out))
    print(result["markdown"])
    print(f"\nreport: {result['report_dir']}")
    return 0


def _stage(name: str) -> Any:
    """Context manager that logs a stage and its wall time."""

    class _Timer:
        def __enter__(self) -> None:
            self.t0 = time.perf_counter()
            logger.info("== %s", name)

        def __exit__(self, *exc: object) -> None:
            logger.info("== %s done in %.1f s", name, time.perf_counter() - self.t0)

    return _Timer()


def _with_urls(split_csv: Path, train_csv: Path, out: Path) -> Path:
    """The split's ids with their ``url`` and ``landmark_id`` from the world's train.csv."""
    with open(train_csv, newline="", encoding="utf-8") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    with open(split_csv, newline="", encoding="utf-8") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    from gldboxes.io import atomic_write

    with atomic_write(out, newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["id", "url", "landmark_id"])
        for i in ids:
            wr.writerow([i, rows[i]["url"], rows[i]["landmark_id"]])
    return out


def run_pipeline(conf: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and write the report; returns its rows.

    Returns:
        ``{"rows": [...], "markdown": str, "report_dir": Path, "detector": {...},
        "autobox": {...}}``.
    """
    from dataclasses import replace

    from gldboxes import split as split_stage
    from gldboxes import synth
    from gldboxes.io import write_config, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_config(out, conf, name="pipeline.yaml")
    t_start = time.perf_counter()
    seed = int(conf["seed"])

    with _stage("synthetic worlds"):
        wconf = replace(synth.confs[conf["world"]], seed=seed, **conf["world_overrides"])
        world = synth.generate_world(out / "world", wconf)
        cbconf = replace(wconf, seed=seed + 1, **conf["codebook_world"])
        cb_world = synth.generate_world(out / "world-codebook", cbconf)
    train_csv = world / "train" / "train.csv"

    with _stage("split"):
        split_dir = split_stage.main(
            {**split_stage.confs[conf["split"]], "seed": seed}, train_csv, out / "split"
        )
        both = out / "split" / "train_val.csv"
        _merge_csv([split_dir / "train.csv", split_dir / "val.csv"], both)
        split_urls = _with_urls(both, train_csv, out / "split" / "train_val_urls.csv")

    autobox_metrics = _autobox(conf, world, split_urls, out)
    campaign = (
        _annotation(conf, world, split_urls, Path(autobox_metrics["boxes_csv"]), out)
        if conf["annotation"]
        else None
    )
    detector = _detector(conf, world, split_dir, out)

    rows, runs = _retrieval(
        conf,
        world / "retrieval",
        {"codebook_images": cb_world / "train" / "images"},
        detector["db_boxes"],
        world / "retrieval" / "boxes_gt.csv",
        out,
    )

    report = out / "report"
    report.mkdir(exist_ok=True)
    markdown = _write_table(rows, report)
    _plot(rows, report / "map_vs_index_size.png")
    summary = {
        "format_version": 1,
        "wall_time_s": time.perf_counter() - t_start,
        "detector": {k: v for k, v in detector.items() if k != "db_boxes"},
        "autobox": autobox_metrics,
        "annotation": campaign,
        "rows": rows,
    }
    if conf["views"]:
        summary["views"] = _views(world, split_dir, detector, runs, out)
    write_json(report / "summary.json", summary)
    header = (
        f"Detect-to-Retrieve on the synthetic world ({world}):\n"
        f"detector {conf['detector']}: AP@0.5 on validation {100 * detector['ap50']:.1f} "
        f"(untrained {100 * detector['ap50_untrained']:.1f}); automatic boxes mean IoU "
        f"{autobox_metrics['mean_iou']:.3f} (whole image {autobox_metrics['whole_image_iou']:.3f})"
        "\n\n"
    )
    return {
        "rows": rows,
        "markdown": header + markdown,
        "report_dir": report,
        "detector": summary["detector"],
        "autobox": autobox_metrics,
    }


def run_real_data(
    conf: Mapping[str, Any], dataset: Path, codebook_dataset: Path, detector: Path, out: Path
) -> dict[str, Any]:
    """The Detect-to-Retrieve table on a real Revisited folder (roxford5k, rparis6k).

    Boxes come from a trained detector SavedModel (ours, or the authors' released Faster R-CNN),
    features from ``conf["features"]`` (the ``paper`` preset: DELF with ``feature_model`` =
    ``{"path": SavedModel, "pca_path": PCA}``), the codebook from the other dataset.
    """
    from detection import inference
    from gldboxes.io import write_config, write_json
    from retrieval.evaluation.datasets import RevisitedDataset

    out.mkdir(parents=True, exist_ok=True)
    write_config(out, conf, name="pipeline.yaml")
    t_start = time.perf_counter()
    ds = RevisitedDataset.load(dataset)
    with _stage("detector: boxes on the database"):
        db_boxes = inference.main(detector, ds.db_paths(), out / "detector" / "db_boxes.csv")
    rows, _ = _retrieval(conf, dataset, {"codebook_dataset": codebook_dataset}, db_boxes, None, out)
    report = out / "report"
    report.mkdir(exist_ok=True)
    markdown = _write_table(rows, report)
    _plot(rows, report / "map_vs_index_size.png")
    write_json(
        report / "summary.json",
        {"format_version": 1, "wall_time_s": time.perf_counter() - t_start, "rows": rows},
    )
    header = f"Detect-to-Retrieve on {ds.name} ({ds.n_db} images, {ds.n_queries} queries):\n\n"
    return {"rows": rows, "markdown": header + markdown, "report_dir": report}


def _merge_csv(parts: list[Path], out: Path) -> None:
    from gldboxes.io import atomic_write

    with atomic_write(out, newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        header_done = False
        for p in parts:
            with open(p, newline="", encoding="utf-8") as fin:
                rd = csv.reader(fin)
                header = next(rd)
                if not header_done:
                    wr.writerow(header)
                    header_done = True
                wr.writerows(rd)


def _autobox(conf: Mapping[str, Any], world: Path, split_urls: Path, out: Path) -> dict[str, Any]:
    from annotation import autobox

    with _stage("automatic box estimation (pre-annotation)"):
        pred = autobox.main(
            autobox.confs[conf["autobox"]],
            split_urls,
            out / "autobox",
            image_root=world / "train",
        )
        metrics = autobox.evaluate(
            pred,
            world / "train" / "boxes.csv",
            split_urls,
            world / "train" / "no_landmark.csv",
        )
    logger.info(
        "autobox: mean IoU %.3f vs whole image %.3f; noise rejected %s",
        metrics["mean_iou"],
        metrics["whole_image_iou"],
        metrics["noise_rejected"],
    )
    metrics["boxes_csv"] = str(pred)
    return metrics


def _annotation(
    conf: Mapping[str, Any], world: Path, split_urls: Path, pre_boxes: Path, out: Path
) -> dict[str, Any]:
    """A Label Studio campaign over the split, pre-annotated with the automatic boxes.

    Starts a local server (installed into its own venv on first use), creates the campaign,
    imports the images without copying them, and stops the server; the data dir keeps the
    campaign (``gldboxes annotate server start --data-dir OUT/annotation/labelstudio``).
    """
    import secrets

    from annotation import campaign, server

    data_dir = out / "annotation" / "labelstudio"
    token_file = out / "annotation" / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    if not token_file.exists():
        token_file.write_text(server.new_token())
        token_file.chmod(0o600)
    settings = server.ServerSettings(
        data_dir=data_dir,
        port=server.free_port(),
        username="admin@localhost",
        password=secrets.token_urlsafe(12),
        token=token_file.read_text().strip(),
        document_root=world.resolve(),  # the campaign folder must lie strictly below it
    )
    from gldboxes.io import read_json, write_json

    record = out / "annotation" / "campaign.json"
    with _stage("Label Studio campaign"):
        state = server.start(settings)
        try:
            # the database's token: a resumed data dir keeps the one it was created with
            token = server.admin_token(data_dir) or settings.token
            client = campaign.connect(state["url"], token)
            # A rerun imports into the same project (the import itself is idempotent).
            if record.exists():
                project = int(read_json(record)["project"])
            else:
                project = campaign.create_campaign(
                    client, title="gldboxes pipeline", image_dir=(world / "train").resolve()
                )
                write_json(record, {"format_version": 1, "project": project})
            items = campaign.read_split(split_urls, world / "train")
            preds = campaign.read_predictions(pre_boxes)
            res = campaign.import_images(
                client,
                url=state["url"],
                token=token,
                project_id=project,
                items=items,
                document_root=settings.document_root or world,
                predictions=preds,
                model_version=str(conf["autobox"]),
            )
        finally:
            server.stop(data_dir)
    return {
        "project": project,
        "imported": {"added": res.added, "skipped": res.skipped, "seconds": res.seconds},
        "data_dir": str(data_dir),
    }


def _detector(conf: Mapping[str, Any], world: Path, split_dir: Path, out: Path) -> dict[str, Any]:
    from detection import evaluate as det_eval
    from detection import export as det_export
    from detection import inference, records, train
    from detection.configs import get_conf

    with _stage("detector: records, training, evaluation, export"):
        rec = records.main(
            records.confs[conf["detector_records"]],
            world / "train" / "boxes.csv",
            world / "train",
            out / "detector",
            images_csv=world / "train" / "train.csv",
            split_csv=split_dir,
        )
        dconf = get_conf(conf["detector"], seed=int(conf["seed"]))
        run_dir = train.main(dconf, rec, out / "detector", steps=int(conf["detector_steps"]))
        metrics = det_eval.load_metrics(det_eval.main(run_dir, rec, split="val"))
        base = det_eval.load_metrics(det_eval.main(run_dir, rec, split="val", checkpoint="init"))
        model = det_export.main(run_dir, validation=metrics)
    with _stage("detector: boxes on the retrieval database"):
        db_boxes = inference.main(
            model, world / "retrieval" / "jpg", out / "detector" / "db_boxes.csv", threshold=0.0
        )
    return {
        "ap50": float(metrics["ap50"]),
        "ap50_untrained": float(base["ap50"]),
        "metrics": metrics,
        "model": str(model),
        "db_boxes": db_boxes,
    }


def _method_confs(
    conf: Mapping[str, Any], db_boxes: Path, gt_boxes: Path | None
) -> list[dict[str, Any]]:
    """The rows of the final table: (label, engine conf)."""
    thr = float(conf["detect_threshold"])
    common = {
        "features": conf["features"],
        "feature_model": dict(conf.get("feature_model") or {}),
        "codebook": {"size": int(conf["codebook_size"]), "seed": int(conf["seed"])},
    }
    det = {"regions": f"d2r-{thr}", "region_boxes": str(db_boxes), "region_threshold": thr}
    gt = {"regions": "gt", "region_boxes": str(gt_boxes)}
    ver = dict(conf["verification"]) if conf["verification"] else None
    rows = [
        {"method": "ASMK*", **common, "kernel": "asmk_star"},
        {
            "method": "D2R-ASMK* (max)",
            **common,
            "kernel": "asmk_star",
            **det,
            "regional_search": "max",
        },
        {"method": "D2R-R-ASMK*", **common, "kernel": "r_asmk_star", **det},
    ]
    if ver is not None:
        rows.append({"method": "ASMK* + SV", **common, "kernel": "asmk_star", "verification": ver})
        rows.append(
            {
                "method": "D2R-R-ASMK* + SV",
                **common,
                "kernel": "r_asmk_star",
                **det,
                "verification": ver,
            }
        )
    if conf["oracle"] and gt_boxes is not None:
        rows.append(
            {"method": "R-ASMK* (GT boxes, oracle)", **common, "kernel": "r_asmk_star", **gt}
        )
    for r in rows:
        if r.get("regions", "").startswith("d2r-") and r["regions"] not in _region_presets():
            r["regions"] = "d2r-0.1"
    return rows


def _region_presets() -> Mapping[str, Any]:
    from retrieval import regions

    return regions.confs


def _retrieval(
    conf: Mapping[str, Any],
    dataset: Path,
    codebook: Mapping[str, Path],
    db_boxes: Path,
    gt_boxes: Path | None,
    out: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method of the table on ``dataset``; ``codebook`` holds the run's codebook
    source (``codebook_images`` or ``codebook_dataset``)."""
    from retrieval.runner import run as runner

    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    base_bytes: float | None = None
    for mc in _method_confs(conf, db_boxes, gt_boxes):
        label = mc.pop("method")
        with _stage(f"retrieval: {label}"):
            res = runner.run(
                dataset,
                out / "retrieval",
                mc,
                codebook_images=codebook.get("codebook_images"),
                codebook_dataset=codebook.get("codebook_dataset"),
            )
        runs[label] = res
        stats = res.index_stats or {}
        bpi = float(stats.get("bytes_per_image", float("nan")))
        if base_bytes is None:
            base_bytes = bpi
        verified = bool(mc.get("verification")) and bool(res.verification)
        results = res.verification["results"] if verified else res.results
        rows.append(
            {
                "method": label,
                "regions_per_image": _regions_per_image(res.regions),
                "index_bytes_per_image": bpi,
                "relative_index_size": bpi / base_bytes if base_bytes else float("nan"),
                "easy_map": results["easy"].map,
                "medium_map": results["medium"].map,
                "hard_map": results["hard"].map,
                "medium_mp10": results["medium"].mp_at.get(10, float("nan")),
                "verification_s_per_query": (
                    float(res.verification.get("seconds_per_query", float("nan")))
                    if verified
                    else None
                ),
            }
        )
    return rows, runs


def _regions_per_image(regions_csv: Path | None) -> float:
    """Mean number of index regions per image (1 without regions; region 0 counts)."""
    if regions_csv is None:
        return 1.0
    from gldboxes.boxes import read_boxes_csv

    boxes = read_boxes_csv(regions_csv)
    return sum(len(v) for v in boxes.values()) / max(1, len(boxes))


def _write_table(rows: list[dict[str, Any]], report: Path) -> str:
    from gldboxes.io import atomic_write

    with atomic_write(report / "table.csv", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r[k] for k in TABLE_COLUMNS})
    lines = [
        "| method | regions / image | index bytes / image | relative size | mAP Easy | "
        "mAP Medium | mAP Hard | mP@10 Medium |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['regions_per_image']:.2f} | {r['index_bytes_per_image']:.0f} | "
            f"{r['relative_index_size']:.2f} | {100 * r['easy_map']:.2f} | "
            f"{100 * r['medium_map']:.2f} | {100 * r['hard_map']:.2f} | "
            f"{100 * r['medium_mp10']:.2f} |"
        )
    md = "\n".join(lines)
    with atomic_write(report / "table.md") as fh:
        fh.write(md + "\n")
    return md


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gldboxes.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "medium_map", "Medium"), (axes[1], "hard_map", "Hard")):
        for r in rows:
            ax.scatter(r["relative_index_size"], 100 * r[key])
            ax.annotate(r["method"], (r["relative_index_size"], 100 * r[key]), fontsize=7)
        ax.set_xlabel("index size relative to ASMK*")
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"Synthetic world, {title}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _views(
    world: Path, split_dir: Path, detector: Mapping[str, Any], runs: Mapping[str, Any], out: Path
) -> dict[str, Any]:
    import numpy as np

    from gldboxes import fodb, views
    from retrieval.evaluation.datasets import load_gnd
    from retrieval.evaluation.view import build_retrieval_dataset

    info: dict[str, Any] = {}
    with _stage("FiftyOne datasets"), fodb.database(out / "fiftyone-db"):
        bx = views.build_box_dataset(
            boxes_csv=world / "train" / "boxes.csv",
            train_csv=world / "train" / "train.csv",
            no_landmark_csv=world / "train" / "no_landmark.csv",
            name="pipeline-boxes",
        )
        info["boxes"] = {"name": bx.name, "samples": len(bx)}
        dt = views.build_detection_dataset(
            gt_csv=world / "retrieval" / "boxes_gt.csv",
            pred_csv=detector["db_boxes"],
            images_root=world / "retrieval" / "jpg",
            name="pipeline-detections",
        )
        info["detections"] = {"name": dt.name, "samples": len(dt)}
        gnd = load_gnd(world / "retrieval" / "gnd_synth.pkl")
        for label, res in runs.items():
            if "+ SV" in label or "oracle" in label:
                continue
            rt = build_retrieval_dataset(
                gnd=gnd,
                image_root=world / "retrieval",
                ranks=np.load(res.ranks),
                name=f"pipeline-retrieval-{views.slug(label)}",
            )
            info[label] = {"name": rt.name, "samples": len(rt)}
    return info
