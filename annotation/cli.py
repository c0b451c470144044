"""``gldboxes annotate ...``: Label Studio campaigns from the command line (light imports only).

Every command finds the server through its data dir: ``--data-dir``, else
``$GLDBOXES_LS_DATA_DIR``, else ``runs/ls`` (see :mod:`annotation.server`). The token comes from
``$LABEL_STUDIO_API_KEY`` or the data dir's ``.gldboxes-token``; it is never printed.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="Label Studio URL (default: the one recorded in the data dir)")
    p.add_argument(
        "--data-dir",
        help="data dir of 'annotate server start' (default: $GLDBOXES_LS_DATA_DIR or runs/ls)",
    )


def _gold_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-gold-accuracy",
        type=float,
        default=0.7,
        help="raters below this accuracy on gold tasks are dropped or down-weighted (0: keep all)",
    )
    p.add_argument(
        "--gold-policy",
        choices=["drop", "weight"],
        default="drop",
        help="drop: ignore their annotations; weight: weight accuracy/threshold in the box mean",
    )
    p.add_argument(
        "--min-gold-answers",
        type=int,
        default=1,
        help="raters with fewer gold answers are not judged yet",
    )


def register(subparsers: Any) -> None:
    """Add ``annotate`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "annotate", help="Label Studio box campaigns, quality control, automatic boxes"
    )
    sub = parser.add_subparsers(dest="annotate_command", metavar="STEP")
    sub.required = True

    srv = sub.add_parser(
        "server",
        help="start/stop/status/info of a local Label Studio",
        description="start: the admin login goes to DATA_DIR/gldboxes-login.json (0600), its "
        "password from $GLDBOXES_LS_PASSWORD on the first start, else random; info prints it.",
    )
    srv.add_argument("action", choices=["start", "stop", "status", "info"])
    srv.add_argument(
        "--data-dir",
        help="data dir (database, log, login, state); default $GLDBOXES_LS_DATA_DIR or runs/ls",
    )
    srv.add_argument("--url", help="status only: an existing server's URL")
    srv.add_argument("--port", type=int, help="default: the last start's, else 8080")
    srv.add_argument(
        "--document-root",
        help="folder served to Label Studio as local files (images must live under it); "
        "default: the last start's",
    )
    srv.add_argument("--username", help="admin e-mail of a new data dir (default admin@localhost)")
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
    im.add_argument(
        "--split", required=True, help="CSV id,url[,landmark_id] or id,landmark_id (gldboxes split)"
    )
    im.add_argument(
        "--image-root",
        help="folder the url column (or, without one, the images by id) is relative to "
        "(default: the CSV's folder)",
    )
    im.add_argument(
        "--document-root", help="the server's local-files root (default: the one it runs with)"
    )
    im.add_argument("--predictions", help="boxes CSV (detector or autobox) used as pre-annotations")
    im.add_argument("--model-version", default="", help="name of the pre-annotations' source")
    im.add_argument(
        "--overlap", type=float, default=0.1, help="fraction of new tasks given to two raters"
    )
    im.add_argument(
        "--gold", help="boxes CSV of gold tasks (known boxes; kept in DATA_DIR/gold, not in tasks)"
    )
    im.add_argument("--gold-no-landmark", help="text file: ids of gold tasks without a landmark")
    im.add_argument("--seed", type=int, default=0)
    im.add_argument(
        "--refresh-predictions",
        action="store_true",
        help="images already imported get the --predictions box instead of their old one "
        "(no task added twice, annotations untouched)",
    )
    im.set_defaults(func=_import)

    pr = sub.add_parser("progress", help="tasks done and per-rater counts")
    _conn(pr)
    pr.add_argument("--project", type=int, required=True)
    pr.add_argument(
        "--watch",
        action="store_true",
        help="one JSON line per --interval: done/total, per-rater boxes/hour since the first "
        "line, ETA; stops on Ctrl-C or when every task is done",
    )
    pr.add_argument("--interval", type=float, default=60.0, help="--watch: seconds between lines")
    pr.add_argument("--count", type=int, help="--watch: stop after this many lines")
    pr.set_defaults(func=_progress)

    ex = sub.add_parser("export", help="snapshot JSON (full predictions) + boxes CSV")
    _conn(ex)
    ex.add_argument("--project", type=int, required=True)
    ex.add_argument("--out", required=True, help="output folder")
    _gold_filter_args(ex)
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
        if name == "filter":
            _gold_filter_args(p)
        p.set_defaults(func=_quality, quality=name)

    ab = sub.add_parser("autobox", help="estimate boxes from verified matches (Gordo et al.)")
    ab.add_argument(
        "--split", required=True, help="CSV id,url,landmark_id or id,landmark_id (gldboxes split)"
    )
    ab.add_argument(
        "--image-root", help="folder the url column (or, without one, the images by id) is under"
    )
    ab.add_argument("--out", required=True)
    ab.add_argument("--conf", default="gordo-rootsift", choices=["gordo-rootsift"])
    ab.add_argument("--gt", help="ground-truth boxes CSV: also print mean IoU vs whole image")
    ab.add_argument("--no-landmark", help="no_landmark.csv: also print noise rejection")
    ab.add_argument("--overwrite", action="store_true")
    ab.set_defaults(func=_autobox)

    ra = sub.add_parser("raters", help="add, list or remove the raters (Label Studio users)")
    ra_sub = ra.add_subparsers(dest="raters_command", metavar="ACTION")
    ra_sub.required = True
    r_add = ra_sub.add_parser("add", help="add a rater (signs them up through the invite link)")
    _conn(r_add)
    r_add.add_argument("email")
    r_add.add_argument(
        "--password-file",
        help="file holding the rater's password (default: a random one written to "
        "DATA_DIR/raters/EMAIL.password, 0600)",
    )
    r_add.set_defaults(func=_raters)
    r_list = ra_sub.add_parser("list", help="the users with their submitted/skipped counts")
    _conn(r_list)
    r_list.set_defaults(func=_raters)
    r_rm = ra_sub.add_parser(
        "remove", help="take a rater out of the organization (annotations stay theirs)"
    )
    _conn(r_rm)
    r_rm.add_argument("email")
    r_rm.set_defaults(func=_raters)


def _data_dir(args: argparse.Namespace) -> Any:
    """The data dir: ``--data-dir``, else ``$GLDBOXES_LS_DATA_DIR``, else ``runs/ls``."""
    from annotation.data_dir import default_data_dir

    return default_data_dir(getattr(args, "data_dir", None))


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """URL and token of the server (``--url``, else the data dir's running server), checked up."""
    from annotation.data_dir import resolve_token
    from annotation.server import health, read_state

    data_dir = _data_dir(args)
    url = args.url
    if url is None:
        state = read_state(data_dir)
        if state is None:
            raise ValueError(
                f"no Label Studio server runs from {data_dir}: start it with 'gldboxes annotate "
                f"server start --data-dir {data_dir}', or give --url / --data-dir"
            )
        url = str(state["url"])
    if health(url) is None:
        raise ValueError(
            f"Label Studio at {url} does not answer (see {data_dir}/server.log; "
            f"'gldboxes annotate server start --data-dir {data_dir}' restarts it)"
        )
    return url, resolve_token(data_dir)


def _server(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation import server

    data_dir = Path(_data_dir(args))
    if args.action == "status":
        url = args.url
        if url is None:
            state = server.read_state(data_dir)
            if state is None:
                print(json.dumps({"status": "not running", "data_dir": str(data_dir)}))
                return 1
            url = state["url"]
        body = server.health(url)
        print(json.dumps({"url": url, "status": (body or {}).get("status", "unreachable")}))
        return 0 if body else 1
    if args.action == "info":
        return _server_info(data_dir)
    if args.action == "stop":
        stopped = server.stop(data_dir)
        print(json.dumps({"stopped": stopped, "data_dir": str(data_dir)}))
        return 0
    settings = server.resolve_settings(
        data_dir, port=args.port, document_root=args.document_root, username=args.username
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    state = server.start(settings, timeout=args.timeout, write_token=True)
    print(
        json.dumps(
            {
                "url": state["url"],
                "pid": state["pid"],
                "data_dir": str(data_dir),
                "document_root": state["document_root"],
                "login_file": str(data_dir / server.LOGIN_FILE),
                "token_file": str(data_dir / server.TOKEN_FILE),
            }
        )
    )
    return 0


def _server_info(data_dir: Any) -> int:
    """Print URL, login (file, e-mail, password), document root and project count."""
    import json

    import requests

    from annotation import server

    state = server.read_state(data_dir)
    login = server.read_login(data_dir)
    if state is None and login is None:
        raise ValueError(
            f"{data_dir}: no Label Studio data dir (start one with 'gldboxes annotate server "
            f"start --data-dir {data_dir} --document-root DIR')"
        )
    url = None if state is None else str(state["url"])
    up = url is not None and server.health(url) is not None
    projects = None
    if up and url is not None:
        resp = requests.get(
            f"{url}/api/projects/",
            params={"page_size": "1"},
            headers={"Authorization": f"Token {server.resolve_token(data_dir)}"},
            timeout=60,
        )
        if resp.status_code != 200:
            raise ValueError(
                f"Label Studio at {url}: listing projects gave HTTP {resp.status_code}"
            )
        projects = int(resp.json()["count"])
    remembered = server.read_settings(data_dir) or {}
    print(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "url": url,
                "running": up,
                "document_root": (state or remembered).get("document_root"),
                "login_file": str(data_dir / server.LOGIN_FILE),
                "email": None if login is None else login[0],
                "password": None if login is None else login[1],
                "projects": projects,
            },
            indent=2,
        )
    )
    return 0


def _check_document_root(args: argparse.Namespace, image_dir: Any) -> None:
    """Before creating anything: the server of the data dir must serve ``image_dir``."""
    from pathlib import Path

    from annotation.server import read_state

    if not Path(image_dir).is_dir():
        raise ValueError(f"--image-dir {image_dir} is not a folder")
    data_dir = _data_dir(args)
    state = read_state(data_dir) if args.url is None else None
    if state is None:
        return  # a server given by --url: Label Studio itself checks (create_campaign)
    root = state.get("document_root")
    if not root:
        raise ValueError(
            f"the Label Studio server of {data_dir} was started without --document-root, "
            "so it cannot serve local images: restart it with "
            f"'gldboxes annotate server start --data-dir {data_dir} --document-root DIR'"
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

    _check_document_root(args, Path(args.image_dir))  # offline checks first
    url, token = _endpoint(args)  # then: the server answers
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

    from annotation.campaign import (
        connect,
        import_images,
        read_predictions,
        read_split,
        save_gold,
    )
    from annotation.server import read_state
    from gldboxes.boxes import Box

    url, token = _endpoint(args)
    document_root = args.document_root
    if document_root is None:
        state = read_state(_data_dir(args)) if args.url is None else None
        document_root = None if state is None else state.get("document_root")
        if not document_root:
            raise ValueError(
                "annotate import: give --document-root (the server's local-files root)"
            )
    items = read_split(args.split, args.image_root)
    preds = read_predictions(args.predictions) if args.predictions else None
    gold: dict[str, Box | None] = {}
    if args.gold:
        gold.update(read_predictions(args.gold))
    if args.gold_no_landmark:
        for line in Path(args.gold_no_landmark).read_text(encoding="utf-8").split():
            gold[line.strip()] = None
    if gold:  # our own file, never the task data (raters can read tasks)
        save_gold(_data_dir(args), args.project, gold)
    res = import_images(
        connect(url, token),
        url=url,
        token=token,
        project_id=args.project,
        items=items,
        document_root=document_root,
        predictions=preds,
        model_version=args.model_version or ("predictions" if preds else ""),
        overlap_fraction=args.overlap,
        gold=gold,
        seed=args.seed,
        refresh=args.refresh_predictions,
    )
    summary = {"added": res.added, "skipped": res.skipped, "seconds": round(res.seconds, 2)}
    if args.refresh_predictions:
        summary["refreshed"] = res.refreshed
    print(json.dumps(summary))
    return 0


def _progress(args: argparse.Namespace) -> int:
    import json

    from annotation.campaign import connect
    from annotation.export import fetch_snapshot, parse_snapshot, progress

    url, token = _endpoint(args)
    client = connect(url, token)
    if not args.watch:
        tasks, anns = parse_snapshot(fetch_snapshot(client, args.project))
        print(json.dumps(progress(tasks, anns), indent=2))
        return 0
    return _watch_progress(args, client)


def _watch_progress(args: argparse.Namespace, client: Any) -> int:
    """``progress --watch``: a JSON line per interval until done, ``--count`` lines or Ctrl-C."""
    import json
    import time

    from annotation.export import fetch_snapshot, parse_snapshot, progress, progress_rates

    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    first: dict[str, Any] | None = None
    t_first = 0.0
    lines = 0
    try:
        while True:
            now = time.monotonic()
            snap = fetch_snapshot(client, args.project, keep=False)
            cur = progress(*parse_snapshot(snap))
            if first is None:
                first, t_first = cur, now
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            line.update(progress_rates(first, cur, now - t_first))
            print(json.dumps(line), flush=True)
            lines += 1
            if cur["tasks_done"] >= cur["tasks"] or (args.count and lines >= args.count):
                return 0
            time.sleep(max(0.0, args.interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        return 0


def _export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation.campaign import connect, load_gold, removed_raters
    from annotation.export import export_snapshot, load_snapshot, parse_snapshot
    from annotation.quality import filter_campaign

    url, token = _endpoint(args)
    out = Path(args.out)
    snap_path = export_snapshot(
        connect(url, token),
        args.project,
        out / f"project-{args.project}-snapshot.json",
        gold=load_gold(_data_dir(args), args.project),
        known_users=removed_raters(_data_dir(args)),
    )
    tasks, anns = parse_snapshot(load_snapshot(snap_path))
    res = filter_campaign(
        tasks,
        anns,
        out / f"project-{args.project}",
        min_gold_accuracy=args.min_gold_accuracy,
        gold_policy=args.gold_policy,
        min_gold_answers=args.min_gold_answers,
    )
    print(json.dumps({"snapshot": str(snap_path), **res}))
    return 0


def _quality(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from annotation.export import load_snapshot, parse_snapshot
    from annotation.quality import (
        agreement,
        filter_campaign,
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
        res = filter_campaign(
            tasks,
            anns,
            out / stem,
            min_side=args.min_side,
            agree_iou=args.agree_iou,
            min_gold_accuracy=args.min_gold_accuracy,
            gold_policy=args.gold_policy,
            min_gold_answers=args.min_gold_answers,
        )
        print(json.dumps(res))
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


def _raters(args: argparse.Namespace) -> int:
    import json
    import os
    import secrets
    from pathlib import Path

    from annotation import campaign, server

    url, token = _endpoint(args)
    data_dir = Path(_data_dir(args))
    if args.raters_command == "list":
        counts = server.annotation_counts(data_dir) if args.url is None else {}
        rows = [
            {**r, **counts.get(r["id"], {"submitted": 0, "skipped": 0})}
            for r in campaign.list_raters(url, token)
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if args.raters_command == "remove":
        uid = campaign.remove_rater(url, token, args.email, data_dir=data_dir)
        print(json.dumps({"removed": args.email, "id": uid}))
        return 0
    if "/" in args.email or "@" not in args.email:
        raise ValueError(f"rater {args.email!r}: not an e-mail address")
    if args.password_file:
        pw_file = Path(args.password_file)
        password = pw_file.read_text(encoding="utf-8").strip()
        if not password:
            raise ValueError(f"--password-file {pw_file} is empty")
    else:  # a random password, kept owner-only in the data dir for the lead to hand over
        pw_file = data_dir / "raters" / f"{args.email}.password"
        if pw_file.exists():
            password = pw_file.read_text(encoding="utf-8").strip()
        else:
            password = secrets.token_urlsafe(12)
            pw_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(password + "\n")
    rater = campaign.add_rater(url, token, args.email, password)
    print(json.dumps({"email": rater.email, "id": rater.id, "password_file": str(pw_file)}))
    return 0
