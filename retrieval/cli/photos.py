"""``gldboxes retrieval index --images`` / ``query``: search your own photos (light imports only).

``retrieval index --images DIR --out IDX`` creates a photo index or adds DIR's new photos to it
as a new part; ``--remove PATH_OR_ID...`` tombstones photos, ``--compact`` merges the parts and
drops them (:mod:`retrieval.runner.photos`). ``retrieval query --index IDX PHOTO...`` prints the
top-k,
``--verify`` re-ranks by spatial verification, ``--html DIR`` writes a self-contained page
(:mod:`retrieval.runner.report`) and ``--gt CSV`` scores the index on a ground-truth CSV.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_index_options", "index", "register_query"]


def add_index_options(p: argparse.ArgumentParser) -> None:
    """The own-photos options of ``retrieval index`` (beside its ``--dataset`` ones)."""
    p.add_argument(
        "--images", help="index any photo folder (recursive) into --out; rerun to add new photos"
    )
    p.add_argument(
        "--codebook-images", help="with --images: train the codebook on this folder of other photos"
    )
    p.add_argument("--codebook-size", type=int, help="with --images: visual words K (default 1024)")
    p.add_argument(
        "--remove",
        nargs="+",
        metavar="PATH_OR_ID",
        help="tombstone photos of the index --out (paths, folders or ids)",
    )
    p.add_argument(
        "--compact", action="store_true", help="merge the parts of --out, dropping removed photos"
    )
    p.add_argument("--regions", help="index regions: a retrieval.regions preset (rmacb-L2 ...)")
    p.add_argument("--region-boxes", help="boxes CSV for the d2r-*/gt region presets")
    p.add_argument("--region-threshold", type=float, help="detector score threshold")
    p.add_argument(
        "--regional-search",
        choices=["max", "avg"],
        help="D2R regional search: every region its own entry, scores pooled per photo",
    )


def index(args: argparse.Namespace) -> int:
    """``retrieval index`` with ``--images``, ``--remove`` or ``--compact``."""
    from retrieval.cli import engine_conf_from_args
    from retrieval.runner import photos

    out = args.out
    if args.remove:
        removed = photos.remove(out, args.remove)
        what = f"ids {', '.join(map(str, removed))}" if removed else "removed before"
        print(f"{out}: removed {len(removed)} photos ({what})")
    if args.images:
        extra: dict[str, Any] = {
            "regions": args.regions,
            "region_boxes": args.region_boxes,
            "region_threshold": args.region_threshold,
            "regional_search": args.regional_search,
        }
        if args.codebook_size:
            extra["codebook"] = {"size": args.codebook_size}
        photos.main(
            engine_conf_from_args(args, **extra),
            args.images,
            out,
            codebook=args.codebook,
            codebook_images=args.codebook_images,
            overwrite=args.overwrite,
        )
    if args.compact:
        photos.compact(out)
    idx = photos.PhotoIndex.load(out)
    h = idx.header
    print(
        f"{out}: {idx.n_photos} photos in {len(h['parts'])} parts, "
        f"{len(h['tombstones'])} tombstoned, "
        f"codebook K={idx.codebook.shape[0]}, kernel {idx.conf['kernel']}"
    )
    return 0


def register_query(sub: Any) -> None:
    """Add ``retrieval query`` to the retrieval subparsers."""
    from retrieval.cli import add_verification_options

    q = sub.add_parser(
        "query", help="search a photo index (retrieval index --images) with your own photos"
    )
    q.add_argument("--index", required=True, help="the photo index folder")
    q.add_argument("photos", nargs="*", metavar="PHOTO", help="query photos")
    q.add_argument("--top-k", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--html", metavar="DIR", help="write a self-contained report DIR/index.html")
    q.add_argument(
        "--gt",
        metavar="CSV",
        help="ground truth query,positive[,kind]: print Easy/Medium/Hard mAP of the index",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.add_argument(
        "--regions",
        help="regions to draw on the results instead of the index's own: a retrieval.regions "
        "preset (d2r-0.3 with --region-boxes from `detect boxes`, rmacb-L2, ss-5 ...)",
    )
    q.add_argument("--region-boxes", help="boxes CSV (id = photo name) for d2r-*/gt regions")
    q.add_argument("--region-threshold", type=float, help="detector score threshold")
    add_verification_options(q)
    q.set_defaults(func=_query)


def _query(args: argparse.Namespace) -> int:
    import json

    from retrieval.cli import verification_conf_from_args
    from retrieval.runner import photos

    if not args.photos and not args.gt:
        raise ValueError("retrieval query: give query PHOTOs and/or --gt CSV")
    idx = photos.PhotoIndex.load(args.index)
    out: dict[str, Any] = {}
    if args.gt:
        from retrieval.evaluation.evaluate import format_table

        res, _ = photos.evaluate_gt(idx, args.gt)
        out["gt"] = {p: r.as_dict() for p, r in res.items()}
        if not args.json:
            print(format_table({f"{idx.conf['kernel']} ({args.gt})": res}))
    if args.photos:
        regions = {
            "regions": args.regions,
            "region_boxes": args.region_boxes,
            "region_threshold": args.region_threshold,
        }
        results = idx.query(
            args.photos, args.top_k, verification=verification_conf_from_args(args), regions=regions
        )
        out["queries"] = [
            {
                "query": str(r.query),
                "results": [
                    {
                        "rank": j + 1,
                        "id": int(r.ids[j]),
                        "path": r.paths[j],
                        "score": float(r.scores[j]),
                        **({} if r.inliers is None else {"inliers": int(r.inliers[j])}),
                    }
                    for j in range(len(r.ids))
                ],
            }
            for r in results
        ]
        if not args.json:
            for q in out["queries"]:
                print(f"query {q['query']}")
                for e in q["results"]:
                    inl = f"  {e['inliers']:4d} inliers" if "inliers" in e else ""
                    print(f"  {e['rank']:3d}  {e['score']:.4f}{inl}  {_shown(e['path'])}")
        if args.html:
            from retrieval.runner.report import write_report

            page = write_report(results, args.html, title=f"gldboxes query: {args.index}")
            out["html"] = str(page)
            if not args.json:
                print(f"report: {page}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _shown(path: str) -> str:
    """A photo path as printed: relative to the working folder when it lies below it."""
    import os

    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
