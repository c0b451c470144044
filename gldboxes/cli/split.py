"""``gldboxes split``: the paper's landmark-balanced train/val split of a GLD training CSV."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``split`` subcommand."""
    p = subparsers.add_parser(
        "split",
        help="hold out a landmark-stratified validation part, then 4 train + 4 val "
        "images per landmark",
    )
    p.add_argument("--csv", required=True, help="id,landmark_id CSV (train.csv, train_clean.csv)")
    p.add_argument("--out", required=True, help="output root; the split goes to a named folder")
    p.add_argument("--seed", type=int, help="hash key of every random choice (default 0)")
    p.add_argument("--conf", default="paper", help="preset: paper or paper_15k")
    p.add_argument("--val-fraction", type=float, help="share of each landmark held out")
    p.add_argument("--train-per-landmark", type=int, help="training images per landmark")
    p.add_argument("--val-per-landmark", type=int, help="validation images per landmark")
    p.add_argument("--landmarks", type=int, help="keep this many landmarks (seeded sample)")
    p.add_argument("--min-images", type=int, help="drop landmarks with fewer images")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="CSV of ids and/or landmark_ids to leave out (repeatable)",
    )
    p.add_argument(
        "--write-pools", action="store_true", help="also write the whole held-out partition"
    )
    p.add_argument("--output", help="folder name prefix (default from the preset)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished split")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gldboxes.io import read_json
    from gldboxes.split import confs, main

    if args.conf not in confs:
        raise ValueError(f"--conf: unknown preset {args.conf!r}; expected one of {list(confs)}")
    conf = dict(confs[args.conf])
    overrides = {
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "train_per_landmark": args.train_per_landmark,
        "val_per_landmark": args.val_per_landmark,
        "n_landmarks": args.landmarks,
        "min_images": args.min_images,
        "output": args.output,
    }
    conf.update({k: v for k, v in overrides.items() if v is not None})
    _check_args(args)
    if args.write_pools:
        conf["write_pools"] = True
    folder = main(conf, args.csv, args.out, exclude=args.exclude, overwrite=args.overwrite)
    s = read_json(folder / "stats.json")
    print(
        f"{folder}: {s['train_images']} train / {s['val_images']} val images, "
        f"{s['landmarks']} landmarks ({s['landmarks_fully_covered']} fully covered, "
        f"{s['landmarks_in_both']} in both), from {s['images']} of {s['input_images']} images"
    )
    print(
        "images per landmark: "
        + ", ".join(
            f"{b['images_per_landmark']}: {b['landmarks']}"
            for b in s["long_tail"]
            if b["landmarks"]
        )
    )
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """``ValueError`` naming the option for an out-of-range number or an unsafe folder name."""
    limits = (
        ("--seed", args.seed, 0),
        ("--train-per-landmark", args.train_per_landmark, 0),
        ("--val-per-landmark", args.val_per_landmark, 0),
        ("--landmarks", args.landmarks, 1),
        ("--min-images", args.min_images, 1),
    )
    for flag, value, low in limits:
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction <= 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")
    if args.output is not None:
        from gldboxes.split import output_name_problem

        problem = output_name_problem(args.output)
        if problem:
            raise ValueError(f"--output: {problem}")
