"""``gldboxes retrieval ...``: the retrieval evaluator's command-line face (light imports only)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``retrieval`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser("retrieval", help="local features, ASMK*, regional search, "
                                   "Revisited evaluation")
    sub = parser.add_subparsers(dest="retrieval_command", metavar="STEP")
    sub.required = True

    ev = sub.add_parser("evaluate", help="mAP and mP@1/5/10 of a ranking under Easy/Medium/Hard")
    ev.add_argument("--gnd", required=True, help="gnd_<name>.pkl (official) or .json")
    ev.add_argument("--ranks", required=True, help="ranks .npy of shape (n_db, n_queries)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--kappas", default="1,5,10", help="k of mP@k, comma-separated")
    ev.set_defaults(func=_evaluate)

    dl = sub.add_parser("download", help="download roxford5k / rparis6k (resumable)")
    dl.add_argument("name", choices=["roxford5k", "rparis6k"])
    dl.add_argument("--out", required=True, help="data root; the dataset goes to OUT/NAME")
    dl.add_argument("--gnd-base-url", help="mirror for the ground-truth pickle")
    dl.add_argument("--images-base-url", help="mirror for the image tarballs")
    dl.set_defaults(func=_download)


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from retrieval.datasets import load_gnd
    from retrieval.evaluate import evaluate_protocols, format_table

    cfg = load_gnd(args.gnd)
    path = Path(args.ranks)
    if not path.exists():
        raise FileNotFoundError(f"ranks file not found: {path}")
    try:
        ranks = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc
    kappas = [int(k) for k in args.kappas.split(",") if k]
    try:
        res = evaluate_protocols(ranks, cfg["gnd"], kappas, n_db=len(cfg["imlist"]))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if args.json:
        print(json.dumps({p: r.as_dict() for p, r in res.items()}, indent=2))
    else:
        print(format_table({path.stem: res}, kappas))
    return 0


def _download(args: argparse.Namespace) -> int:
    from retrieval.datasets import download_revisited

    base: dict[str, str] = {}
    if args.gnd_base_url:
        base["gnd"] = args.gnd_base_url
    if args.images_base_url:
        base["images"] = args.images_base_url
    ds = download_revisited(args.name, args.out, base_urls=base or None)
    print(f"{ds.name}: {ds.n_db} database images, {ds.n_queries} queries in {ds.root}")
    return 0
