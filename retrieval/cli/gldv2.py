"""``gldboxes retrieval gldv2`` and the GLDv2 side of ``retrieval evaluate`` (light imports only).

Registered from :mod:`retrieval.cli`; the work is in :mod:`retrieval.evaluation.gldv2`.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_evaluate_options", "evaluate_gldv2", "register", "uses_gldv2"]


def register(sub: Any) -> None:
    """Add ``retrieval gldv2`` to the ``retrieval`` subparsers."""
    g = sub.add_parser(
        "gldv2",
        help="a GLDv2 retrieval/recognition benchmark folder from index/test images and a "
        "solution CSV (for retrieval run / evaluate)",
    )
    g.add_argument(
        "--index",
        required=True,
        help="index images: a folder (a/b/c/<id>.jpg, recursive) or an id CSV (index.csv) with "
        "images/ beside it",
    )
    g.add_argument("--test", required=True, help="query images: a folder or an id CSV (test.csv)")
    g.add_argument(
        "--solution",
        required=True,
        help="retrieval_solution_v2.1.csv (id,images,Usage) or recognition_solution_v2.1.csv "
        "(id,landmarks,Usage)",
    )
    g.add_argument("--out", required=True, help="the benchmark folder to write")
    g.add_argument(
        "--usage",
        default="all",
        choices=["all", "public", "private"],
        help="queries to keep (Ignored ones are always dropped)",
    )
    g.add_argument(
        "--labels",
        help="recognition: id,landmark_id of the index images (index_image_to_landmark.csv, "
        "train.csv)",
    )
    g.add_argument("--name", help="dataset name (default gldv2-<task>-<usage>-<hash>)")
    g.add_argument("--overwrite", action="store_true", help="rebuild an existing benchmark")
    g.set_defaults(func=_gldv2)

    x = sub.add_parser(
        "gldv2-export",
        help="lay out a Revisited-style folder as a GLDv2 download with a retrieval solution",
    )
    x.add_argument("--dataset", required=True, help="Revisited-style folder (gnd_<name> + jpg/)")
    x.add_argument("--out", required=True, help="OUT/index/..., OUT/test/... as GLDv2 stores them")
    x.add_argument(
        "--protocol",
        default="medium",
        choices=["easy", "medium", "hard"],
        help="whose positives become the solution's images",
    )
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=_gldv2_export)


def add_evaluate_options(ev: argparse.ArgumentParser) -> None:
    """The GLDv2 options of ``retrieval evaluate``."""
    ev.add_argument(
        "--dataset", help="GLDv2 benchmark folder (retrieval gldv2): mAP@100 or GAP of --ranks"
    )
    ev.add_argument(
        "--solution", help="GLDv2 solution CSV: score a Kaggle --submission CSV against it"
    )
    ev.add_argument(
        "--submission", help="Kaggle submission CSV: id,images or id,landmarks ('<id> <score>')"
    )
    ev.add_argument("--k", type=int, default=100, help="GLDv2 retrieval: the mAP@k cut-off")
    ev.add_argument(
        "--write-submission",
        metavar="CSV",
        help="with --dataset: also write the ranking as a Kaggle submission CSV",
    )


def uses_gldv2(args: argparse.Namespace) -> bool:
    """Whether ``retrieval evaluate`` was called with GLDv2 options."""
    return bool(getattr(args, "dataset", None) or getattr(args, "solution", None))


def evaluate_gldv2(args: argparse.Namespace) -> int:
    """``retrieval evaluate --dataset BENCH --ranks R`` or ``--solution S --submission C``."""
    import json
    from pathlib import Path

    from retrieval.evaluation.gldv2 import (
        evaluate_benchmark,
        evaluate_submission,
        format_scores,
        write_submission,
    )

    if args.gnd:
        raise ValueError("--gnd: give either --gnd (Revisited) or --dataset/--solution (GLDv2)")
    if args.dataset and args.solution:
        raise ValueError("--dataset and --solution: give one (a benchmark or a solution CSV)")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.dataset:
        if not args.ranks:
            raise ValueError("--dataset needs --ranks (ranks.npy of retrieval run)")
        score = evaluate_benchmark(args.dataset, args.ranks, k=args.k)
        name = Path(args.ranks).parent.name
        if args.write_submission:
            write_submission(args.dataset, args.ranks, args.write_submission, k=args.k)
    else:
        if not args.submission:
            raise ValueError("--solution needs --submission (a Kaggle submission CSV)")
        if args.write_submission:
            raise ValueError("--write-submission: only with --dataset and --ranks")
        score = evaluate_submission(args.solution, args.submission, k=args.k)
        name = Path(args.submission).name
    if args.json:
        print(json.dumps(score.as_dict(), indent=2))
    else:
        print(format_scores({name: score}))
        if args.dataset and args.write_submission:
            print(f"submission: {args.write_submission}")
    return 0


def _gldv2_export(args: argparse.Namespace) -> int:
    from gldboxes.io import read_json
    from retrieval.evaluation.gldv2 import export_revisited, read_solution

    out = export_revisited(args.dataset, args.out, protocol=args.protocol, overwrite=args.overwrite)
    sol = read_solution(out / "test" / "retrieval_solution_v2.1.csv")
    n_index = read_json(out / "export.json")["n_index"]
    print(
        f"{out}: {n_index} index images in index/, {len(sol.ids)} scored queries "
        f"({sol.usage.count('Public')} Public, {sol.usage.count('Private')} Private, "
        f"{len(sol.ignored)} Ignored) in test/retrieval_solution_v2.1.csv"
    )
    return 0


def _gldv2(args: argparse.Namespace) -> int:
    from gldboxes.io import read_json
    from retrieval.evaluation.gldv2 import confs, main

    conf = {**confs[args.usage], "name": args.name}
    out = main(
        conf,
        args.index,
        args.test,
        args.solution,
        args.out,
        labels=args.labels,
        overwrite=args.overwrite,
    )
    meta = read_json(out / "gldv2.json")
    usage = meta["query_usage"]
    dropped = [f"{v} {k.replace('_', ' ')}" for k, v in sorted(meta["dropped"].items()) if v]
    print(
        f"{meta['name']}: {meta['task']} benchmark in {out}: {meta['n_index']} index images, "
        f"{len(usage)} queries ({usage.count('Public')} Public, {usage.count('Private')} "
        f"Private); dropped: {', '.join(dropped) or 'none'}"
    )
    return 0
