"""``gldboxes view boxes|detections|retrieval|app|db``: FiftyOne datasets and the App.

Each ``view`` command starts (or reuses) the toolkit's own MongoDB in ``--db-dir`` (default
``$GLDBOXES_DB_DIR`` or ``~/.gldboxes/mongodb``; a ``$FIFTYONE_DATABASE_URI`` already set wins),
builds or refreshes a persistent dataset (image metadata included), prints its name, figures
and saved views, and with ``--launch`` serves the FiftyOne App on 127.0.0.1 until Ctrl-C, then
stops the App and the database cleanly. Both die with the command even when it is killed
(``kill -9``), so a rerun finds its ports free.

``view detections`` shows predictions scoring >= 0.3 by default (``--min-score 0`` for all);
``view retrieval`` saves one view per query (``query-<index>-<name>``: the query, then its
results in rank order with chips such as ``positive (Medium)`` and ``hard (Revisited)``).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]

# Defaults mirrored from gldboxes.views (not imported here: the CLI imports lazily); a test
# checks they agree.
DEFAULT_MIN_SCORE = 0.3  # views.DEFAULT_MIN_SCORE
DEFAULT_MAX_QUERY_VIEWS = 100  # retrieval.evaluation.view.DEFAULT_MAX_QUERY_VIEWS


def register(subparsers: Any) -> None:
    """Add ``view`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "view", help="FiftyOne datasets of boxes, detections and retrieval results (+ the App)"
    )
    sub = parser.add_subparsers(dest="view_command", metavar="KIND")
    sub.required = True

    def common(p: argparse.ArgumentParser, launch: bool = True) -> None:
        p.add_argument(
            "--db-dir",
            help="MongoDB data folder (default $GLDBOXES_DB_DIR or "
            "~/.gldboxes/mongodb); ignored when $FIFTYONE_DATABASE_URI is set",
        )
        p.add_argument("--db-port", type=int, help="MongoDB port (default: a free one)")
        if launch:
            p.add_argument("--name", help="dataset name (default: after the source files)")
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="rebuild even when the dataset is up to date",
            )
            p.add_argument(
                "--launch",
                action="store_true",
                help="serve the FiftyOne App on 127.0.0.1 until Ctrl-C",
            )
        p.add_argument("--port", type=int, default=5151, help="App port (default 5151)")

    bx = sub.add_parser(
        "boxes",
        help="the box dataset: images, boxes, split, landmark, "
        "no-landmark flag, annotation metadata",
    )
    bx.add_argument(
        "--world",
        help="a synthetic world folder: fills --boxes/--train-csv/--no-landmark from WORLD/train",
    )
    bx.add_argument("--boxes", help="ground-truth boxes CSV (id,box)")
    bx.add_argument("--train-csv", help="GLD train.csv (id,url,landmark_id)")
    bx.add_argument("--images", help="image root (default: the train.csv folder)")
    bx.add_argument("--no-landmark", help="no_landmark.csv (id,reason)")
    bx.add_argument(
        "--annotations",
        help="annotation metadata CSV/JSON (id,rater,agreement,pre_annotation_kept)",
    )
    bx.add_argument("--splits", help="CSV id,split")
    bx.add_argument("--split", default="train", help="split of images not in --splits")
    bx.add_argument("--skip-missing", action="store_true", help="leave out missing images")
    common(bx)
    bx.set_defaults(func=_boxes)

    dt = sub.add_parser(
        "detections",
        help="ground truth vs detector boxes, COCO-style "
        "evaluation at IoU 0.5 + sweep, per-sample TP/FP/FN",
    )
    dt.add_argument("--gt", required=True, help="ground-truth boxes CSV (id,box)")
    dt.add_argument("--pred", required=True, help="detector boxes CSV (id,box,score)")
    dt.add_argument("--images", required=True, help="image root")
    dt.add_argument("--ids", help="CSV with an id column: further images to include")
    dt.add_argument("--iou", type=float, default=0.5, help="IoU of the TP/FP/FN matching")
    dt.add_argument(
        "--min-score",
        type=float,
        default=DEFAULT_MIN_SCORE,
        help=f"leave out predictions scoring below this, from the view and the evaluation "
        f"(default {DEFAULT_MIN_SCORE}; 0 keeps every box, for the detector's full AP)",
    )
    dt.add_argument("--skip-missing", action="store_true", help="leave out missing images")
    common(dt)
    dt.set_defaults(func=_detections)

    rt = sub.add_parser(
        "retrieval",
        help="per query its top-k results with rank, score, label per protocol, regions and AP",
    )
    rt.add_argument("--dataset", required=True, help="Revisited dataset folder (gnd_*.pkl, jpg/)")
    rt.add_argument("--ranks", required=True, help="ranks .npy (n_ranked, n_queries)")
    rt.add_argument("--scores", help="scores .npy aligned with ranks")
    rt.add_argument("--regions", help="regions boxes CSV (id = database image name)")
    rt.add_argument(
        "--region-min-score",
        type=float,
        default=0.0,
        help="keep regions with score >= this (the paper indexes >= 0.1)",
    )
    rt.add_argument("--top-k", type=int, default=100, help="results per query")
    rt.add_argument(
        "--query-views",
        type=int,
        default=DEFAULT_MAX_QUERY_VIEWS,
        metavar="N",
        help="save a view 'query-<index>-<name>' (the query, then its results in rank order "
        "with chips like 'positive (Medium)' and 'hard (Revisited)') for each of the first N "
        f"queries (default {DEFAULT_MAX_QUERY_VIEWS}; 0: none)",
    )
    common(rt)
    rt.set_defaults(func=_retrieval)

    ap = sub.add_parser("app", help="serve the FiftyOne App for existing datasets")
    ap.add_argument("--name", help="dataset to open (printed URL)")
    common(ap, launch=False)
    ap.set_defaults(func=_app)


def _run(args: argparse.Namespace, build: Any) -> int:
    """Open the database, ``build()`` a dataset, print it, optionally serve the App."""
    from gldboxes import fodb

    with fodb.database(args.db_dir, port=args.db_port):
        ds = build()
        from gldboxes.views_base import dataset_summary

        summary = dataset_summary(ds).get("summary", {})
        print(
            f"dataset {ds.name!r}: {len(ds)} samples; "
            + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict))
        )
        saved = ds.list_saved_views()
        if saved:
            more = f", ... ({len(saved)} in all)" if len(saved) > 5 else ""
            shown = ", ".join(saved[:5]) + more
            print(f"saved views: {shown}")
        if getattr(args, "launch", False):
            _serve(args.port, ds.name)
    return 0


def _serve(port: int, name: str | None) -> None:
    """Serve the App until Ctrl-C (SIGINT), SIGTERM or SIGHUP; always stops it.

    Should this process be killed outright (SIGKILL), the App and a ``mongod`` we started get
    SIGTERM from the kernel (Linux, :func:`gldboxes.fodb.die_with_parent`), and the next run
    stops any that outlived their command (:func:`gldboxes.fodb.stop_orphan`).
    """
    import signal
    import sys

    from gldboxes.views_app import start_app

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    previous_hup = signal.signal(signal.SIGHUP, _term)  # terminal closed: stop cleanly too
    app = start_app(port)
    try:
        url = app.dataset_url(name) if name else app.url
        print(f"FiftyOne App: {url}  (Ctrl-C to stop)", flush=True)
        sys.stdout.flush()
        app.process.wait()
        raise RuntimeError(
            f"the FiftyOne App exited with code {app.process.returncode}; see {app.log_path}"
        )
    except KeyboardInterrupt:
        print("stopping the FiftyOne App", flush=True)
    finally:
        app.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)


def _boxes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gldboxes.views import build_box_dataset

    boxes, train_csv, no_lm = args.boxes, args.train_csv, args.no_landmark
    if args.world:
        tdir = Path(args.world) / "train"
        boxes = boxes or tdir / "boxes.csv"
        train_csv = train_csv or tdir / "train.csv"
        if no_lm is None and (tdir / "no_landmark.csv").exists():
            no_lm = tdir / "no_landmark.csv"
    if not boxes or not train_csv:
        raise ValueError("view boxes: give --world or both --boxes and --train-csv")

    def build() -> Any:
        return build_box_dataset(
            boxes_csv=boxes,
            train_csv=train_csv,
            images_root=args.images,
            no_landmark_csv=no_lm,
            annotations=args.annotations,
            splits_csv=args.splits,
            split=args.split,
            name=args.name,
            missing="skip" if args.skip_missing else "error",
            overwrite=args.overwrite,
        )

    return _run(args, build)


def _detections(args: argparse.Namespace) -> int:
    from gldboxes.views import build_detection_dataset

    def build() -> Any:
        return build_detection_dataset(
            gt_csv=args.gt,
            pred_csv=args.pred,
            images_root=args.images,
            ids_csv=args.ids,
            name=args.name,
            iou=args.iou,
            min_score=args.min_score,
            missing="skip" if args.skip_missing else "error",
            overwrite=args.overwrite,
        )

    return _run(args, build)


def _retrieval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from gldboxes.boxes import read_boxes_csv
    from gldboxes.views_base import slug
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import evaluate_protocols
    from retrieval.evaluation.view import build_retrieval_dataset

    data = RevisitedDataset.load(args.dataset)
    arrays = {}
    for key in ("ranks", "scores"):
        path = getattr(args, key)
        if path is None:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"{key} file not found: {path}")
        try:
            arrays[key] = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc
    gnd = {"imlist": data.imlist, "qimlist": data.qimlist, "gnd": data.gnd}
    try:
        res = evaluate_protocols(arrays["ranks"], data.gnd, n_db=data.n_db)
    except ValueError as exc:
        raise ValueError(f"{args.ranks}: {exc}") from exc
    aps = {p: r.aps for p, r in res.items()}
    regions = None
    if args.regions:
        regions = {
            k: [b for b in v if b.score is None or b.score >= args.region_min_score]
            for k, v in read_boxes_csv(args.regions).items()
        }
    name = args.name or f"gldboxes-retrieval-{slug(data.name)}-{slug(Path(args.ranks).stem)}"

    def build() -> Any:
        return build_retrieval_dataset(
            gnd=gnd,
            image_root=data.root,
            ranks=arrays["ranks"],
            scores=arrays.get("scores"),
            aps=aps,
            regions=regions,
            top_k=args.top_k,
            name=name,
            source={"ranks": args.ranks, "scores": args.scores, "regions": args.regions},
            overwrite=args.overwrite,
            max_query_views=args.query_views,
        )

    return _run(args, build)


def _app(args: argparse.Namespace) -> int:
    from gldboxes import fodb

    with fodb.database(args.db_dir, port=args.db_port):
        import fiftyone as fo

        names = fo.list_datasets()
        if args.name and args.name not in names:
            raise ValueError(f"no dataset named {args.name!r}; datasets: {names}")
        print("datasets: " + (", ".join(names) or "(none)"))
        _serve(args.port, args.name)
    return 0
