"""``gldboxes synth``: generate the synthetic landmark world."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``synth`` subcommand."""
    p = subparsers.add_parser(
        "synth", help="generate the synthetic landmark world (GLD-style train set + benchmark)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="master seed (same seed, same bytes)")
    p.add_argument("--preset", default="default", help="base preset: default or tiny")
    p.add_argument("--landmarks", type=int, help="query landmarks of the retrieval benchmark")
    p.add_argument("--queries-per-landmark", type=int, help="query images per landmark")
    p.add_argument("--easy-per-landmark", type=int, help="easy database images per landmark")
    p.add_argument("--hard-per-landmark", type=int, help="hard database images per landmark")
    p.add_argument("--junk-per-landmark", type=int, help="junk database images per landmark")
    p.add_argument("--distractors", type=int, help="database images of other landmarks/clutter")
    p.add_argument("--train-landmarks", type=int, help="landmarks of the training set")
    p.add_argument("--train-per-landmark", type=int, help="training images per landmark")
    p.add_argument("--size", type=int, help="long image side in pixels")
    p.add_argument("--workers", type=int, help="rendering processes (output does not depend)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gldboxes.io import read_json
    from gldboxes.synth import conf_from_args, generate_world

    keys = (
        "seed",
        "landmarks",
        "queries_per_landmark",
        "easy_per_landmark",
        "hard_per_landmark",
        "junk_per_landmark",
        "distractors",
        "train_landmarks",
        "train_per_landmark",
        "size",
        "workers",
    )
    conf = conf_from_args(args.preset, [(k, getattr(args, k)) for k in keys])
    out = generate_world(args.out, conf, overwrite=args.overwrite)
    counts = read_json(out / "world.json")["counts"]
    print(f"synthetic world in {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0
