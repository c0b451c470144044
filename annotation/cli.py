"""``gldboxes annotate ...``: Label Studio campaigns from the command line (light imports only).

The token of the server comes from ``$LABEL_STUDIO_API_KEY`` or, for a server started with
``gldboxes annotate server start --data-dir D``, from ``D/.gldboxes-token``; it is never printed.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="Label Studio URL (default: the one recorded in --data-dir)")
    p.add_argument("--data-dir", help="data dir of a server started by 'annotate server start'")


def register(subparsers: Any) -> None:
    """Add ``annotate`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "annotate", help="Label Studio box campaigns, quality control, automatic boxes"
    )
    sub = parser.add_subparsers(dest="annotate_command", metavar="STEP")
    sub.required = True

    srv = sub.add_parser("server", help="start/stop/status of a local Label Studio")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--data-dir", help="data dir (database, log, state); required for start/stop")
    srv.add_argument("--url", help="status only: an existing server's URL")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument(
        "--document-root",
        help="folder served to Label Studio as local files (images must live under it)",
    )
    srv.add_argument("--username", default="admin@localhost", help="admin e-mail")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /health")
    srv.set_defaults(func=_server)

    cr = sub.add_parser("create", help="create a campaign (project + local-files storage)")
    _conn(cr)
    cr.add_argument("--title", required=True)
    cr.add_argument(
        "--image-dir", required=True, help="folder of the images (under the server's document root)"
    )
    cr.add_argument("--instructions", help="text file with rater instructions")
    cr.set_defaults(func=_create)

    im = sub.add_parser("import", help="import a split's images (idempotent), with pre-annotations")
    _conn(im)
    im.add_argument("--project", type=int, required=True)
    im.add_argument("--split", required=True, help="CSV id,url[,landmark_id]")
    im.add_argument(
        "--image-root", help="folder the url column is relative to (default: the CSV's folder)"
    )
    im.add_argument("--document-root", required=True, help="the server's local-files root")
    im.add_argument("--predictions", help="boxes CSV (detector or autobox) used as pre-annotations")
    im.add_argument("--model-version", default="", help="name of the pre-annotations' source")
    im.add_argument(
        "--overlap", type=float, default=0.1, help="fraction of new tasks given to two raters"
    )
    im.add_argument("--gold", help="boxes CSV of gold tasks (known boxes)")
    im.add_argument("--gold-no-landmark", help="text file: ids of gold tasks without a landmark")
    im.add_argument("--seed", type=int, default=0)
    im.set_defaults(func=_import)

    pr = sub.add_parser("progress", help="tasks done and per-rater counts")
    _conn(pr)
    pr.add_argument("--project", type=int, required=True)
    pr.set_defaults(func=_progress)

    ex = sub.add_parser("export", help="snapshot JSON (full predictions) + boxes CSV")
    _conn(ex)
    ex.add_argument("--project", type=int, required=True)
    ex.add_argument("--out", required=True, help="output folder")
    ex.set_defaults(func=_export)

    for name, helptext in (
        ("validate", "validation report of a snapshot"),
        ("agreement", "rater agreement, gold accuracy, pre-annotation acceptance"),
        ("filter", "clean boxes CSV + removed.csv (what and why)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--snapshot", required=True, help="snapshot JSON from 'annotate export'")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument(
            "--min-side",
            type=float,
            default=0.02,
            help="tiny box: a side below this fraction of the image",
        )
        p.add_argument("--agree-iou", type=float, default=0.5)
        p.set_defaults(func=_quality, quality=name)

    ab = sub.add_parser("autobox", help="estimate boxes from verified matches (Gordo et al.)")
    ab.add_argument("--split", required=True, help="CSV id,url,landmark_id")
    ab.add_argument("--image-root", help="folder the url column is relative to")
    ab.add_argument("--out", required=True)
    ab.add_argument("--conf", default="gordo-rootsift", choices=["gordo-rootsift"])
    ab.add_argument("--gt", help="ground-truth boxes CSV: also print mean IoU vs whole image")
    ab.add_argument("--no-landmark", help="no_landmark.csv: also print noise rejection")
    ab.add_argument("--overwrite", action="store_true")
    ab.set_defaults(func=_autobox)


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    from pathlib import Path

    from annotation.server import read_state, resolve_token

    data_dir = Path(args.data_dir) if args.data_dir else None
    url = args.url
    if url is None:
        state = read_state(data_dir) if data_dir is not None else None
        if state is None:
            raise ValueError("give --url, or --data-dir of a running 'annotate server start'")
        url = str(state["url"])
    return url, resolve_token(data_dir)


def _server(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from annotation import server

    if args.action == "status":
        url = args.url
        if url is None:
            state = server.read_state(Path(args.data_dir)) if args.data_dir else None
            if state is None:
                print(json.dumps({"status": "not running"}))
                return 1
            url = state["url"]
        body = server.health(url)
        print(json.dumps({"url": url, "status": (body or {}).get("status", "unreachable")}))
        return 0 if body else 1
    if not args.data_dir:
        raise ValueError(f"annotate server {args.action}: --data-dir is required")
    data_dir = Path(args.data_dir)
    if args.action == "stop":
        stopped = server.stop(data_dir)
        print(json.dumps({"stopped": stopped}))
        return 0
    token = os.environ.get(server.TOKEN_ENV) or (
        server.resolve_token(data_dir)
        if (data_dir / server.TOKEN_FILE).exists()
        else server.new_token()
    )
    password = os.environ.get("GLDBOXES_LS_PASSWORD") or server.new_token()[:20]
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = server.ServerSettings(
        data_dir=data_dir,
        port=args.port,
        username=args.username,
        password=password,
        token=token,
        document_root=Path(args.document_root) if args.document_root else None,
    )
    state = server.start(settings, timeout=args.timeout, write_token=True)
    print(
        json.dumps(
            {
                "url": state["url"],
                "pid": state["pid"],
                "token_file": str(data_dir / server.TOKEN_FILE),
            }
        )
    )
    return 0


def _check_document_root(args: argparse.Namespace, image_dir: Any) -> None:
    """Before creating anything: the server of ``--data-dir`` must serve ``image_dir``."""
    from pathlib import Path

    from annotation.server import read_state

    state = read_state(Path(args.data_dir)) if getattr(args, "data_dir", None) else None
    if state is None:
        return  # a server given by --url: Label Studio itself checks (create_campaign)
    root = state.get("document_root")
    if not root:
        raise ValueError(
            f"the Label Studio server of {args.data_dir} was started without --document-root, "
            "so it cannot serve local images: restart it with "
            f"'gldboxes annotate server start --data-dir {args.data_dir} --document-root DIR'"
        )
    if not Path(image_dir).resolve().is_relative_to(Path(root)):
        raise ValueError(
            f"--image-dir {image_dir} is not under the server's document root {root}: "
            "restart the server with a --document-root that holds it"
        )


def _create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from annotation.campaign import connect, create_campaign
    from annotation.config import DEFAULT_INSTRUCTIONS

    url, token = _endpoint(args)
    _check_document_root(args, Path(args.image_dir))
    text = (
        Path(args.instructions).read_text(encoding="utf-8")
        if args.instructions
        else DEFAULT_INSTRUCTIONS
    )
    pid = create_campaign(
        connect(url, token), title=args.title, image_dir=args.image_dir, instructions=text
    )
    print(pid)
    return 0


def _import(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation.campaign import connect, import_images, read_predictions, read_split
    from gldboxes.boxes import Box

    url, token = _endpoint(args)
    items = read_split(args.split, args.image_root)
    preds = read_predictions(args.predictions) if args.predictions else None
    gold: dict[str, Box | None] = {}
    if args.gold:
        gold.update(read_predictions(args.gold))
    if args.gold_no_landmark:
        for line in Path(args.gold_no_landmark).read_text(encoding="utf-8").split():
            gold[line.strip()] = None
    res = import_images(
        connect(url, token),
        url=url,
        token=token,
        project_id=args.project,
        items=items,
        document_root=args.document_root,
        predictions=preds,
        model_version=args.model_version or ("predictions" if preds else ""),
        overlap_fraction=args.overlap,
        gold=gold,
        seed=args.seed,
    )
    print(
        json.dumps({"added": res.added, "skipped": res.skipped, "seconds": round(res.seconds, 2)})
    )
    return 0


def _progress(args: argparse.Namespace) -> int:
    import json

    from annotation.campaign import connect
    from annotation.export import fetch_snapshot, parse_snapshot, progress

    url, token = _endpoint(args)
    tasks, anns = parse_snapshot(fetch_snapshot(connect(url, token), args.project))
    print(json.dumps(progress(tasks, anns), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation.campaign import connect
    from annotation.export import export_snapshot, load_snapshot, parse_snapshot
    from annotation.quality import decide, filter_boxes, validate

    url, token = _endpoint(args)
    out = Path(args.out)
    snap_path = export_snapshot(
        connect(url, token), args.project, out / f"project-{args.project}-snapshot.json"
    )
    tasks, anns = parse_snapshot(load_snapshot(snap_path))
    decisions = decide(tasks, anns, validate(anns))
    boxes, removed = filter_boxes(
        decisions,
        out / f"project-{args.project}-boxes.csv",
        out / f"project-{args.project}-removed.csv",
    )
    print(json.dumps({"snapshot": str(snap_path), "boxes": str(boxes), "removed": str(removed)}))
    return 0


def _quality(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation.export import load_snapshot, parse_snapshot
    from annotation.quality import (
        agreement,
        decide,
        filter_boxes,
        validate,
        validation_report,
    )
    from gldboxes.io import write_json

    out = Path(args.out)
    stem = Path(args.snapshot).stem
    tasks, anns = parse_snapshot(load_snapshot(args.snapshot))
    issues = validate(anns, min_side=args.min_side)
    if args.quality == "validate":
        rep = validation_report(tasks, anns, issues)
        path = write_json(out / f"{stem}-validation.json", rep)
        print(json.dumps({"report": str(path), "counts": rep["counts"]}))
    elif args.quality == "agreement":
        rep = agreement(tasks, anns, issues, match_iou=args.agree_iou)
        path = write_json(out / f"{stem}-agreement.json", rep)
        summary = {k: v for k, v in rep["overlap"].items() if k != "details"}
        print(
            json.dumps(
                {
                    "report": str(path),
                    "overlap": summary,
                    "gold": rep["gold"],
                    "preannotation": {
                        k: v for k, v in rep["preannotation"].items() if k != "per_rater"
                    },
                }
            )
        )
    else:
        decisions = decide(tasks, anns, issues, agree_iou=args.agree_iou)
        boxes, removed = filter_boxes(
            decisions, out / f"{stem}-boxes.csv", out / f"{stem}-removed.csv"
        )
        print(json.dumps({"boxes": str(boxes), "removed": str(removed)}))
    return 0


def _autobox(args: argparse.Namespace) -> int:
    import json

    from annotation import autobox

    path = autobox.main(
        autobox.confs[args.conf],
        args.split,
        args.out,
        image_root=args.image_root,
        overwrite=args.overwrite,
    )
    result: dict[str, Any] = {"boxes": str(path)}
    if args.gt:
        result.update(autobox.evaluate(path, args.gt, args.split, args.no_landmark))
    print(json.dumps(result, indent=2))
    return 0
