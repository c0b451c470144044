"""``gldboxes retrieval rmac`` (rank a Revisited dataset with MAC / R-MAC, +AML, +QE, or learned
R-MAC: :func:`retrieval.rmac.run_rmac`) and ``gldboxes retrieval rmac-train`` (learned R-MAC)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """``retrieval rmac`` (rank a dataset) and ``retrieval rmac-train`` (learned R-MAC)."""
    rm = sub.add_parser(
        "rmac", help="MAC / R-MAC (+AML re-ranking, +QE) or learned R-MAC on a Revisited dataset"
    )
    rm.add_argument("--dataset", required=True, help="Revisited-style folder")
    rm.add_argument("--out", required=True, help="output root (OUT/rmac/...)")
    rm.add_argument(
        "--method",
        default="rmac",
        choices=["mac", "rmac", "rmac+aml", "rmac+aml+qe", "learned-rmac"],
    )
    rm.add_argument("--preset", default="resnet101-rmac", help="retrieval.rmac.confs preset")
    rm.add_argument("--weights", help="'imagenet', 'random', or a Keras weights file")
    rm.add_argument("--max-side", type=int, help="downscale images to this long side")
    rm.add_argument("--levels", type=int, help="R-MAC levels L")
    rm.add_argument("--rerank", type=int, help="AML: re-rank the top N")
    rm.add_argument("--model", help="learned-rmac: the model folder of 'rmac-train'")
    wsrc = rm.add_mutually_exclusive_group()
    wsrc.add_argument("--whitening-images", help="learn the PCA-whitening on this image folder")
    wsrc.add_argument("--whitening-dataset", help="... or on another Revisited folder's database")
    rm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rm.add_argument("--overwrite", action="store_true")
    from gldboxes.executor import add_engine_options

    add_engine_options(rm)  # --engine serial|ray: where the per-image work runs
    rm.set_defaults(func=_rmac)

    tr = sub.add_parser("rmac-train", help="train learned R-MAC (triplet loss, hard mining)")
    tr.add_argument(
        "--train-csv", required=True, help="id,url,landmark_id (e.g. OUT/train/train.csv)"
    )
    tr.add_argument("--out", required=True, help="the model goes to OUT/<preset output>/")
    tr.add_argument("--preset", default="tiny-cpu", help="retrieval.rmac.learned.confs preset")
    tr.add_argument("--steps", type=int, help="override the number of SGD steps")
    tr.add_argument("--max-side", type=int, help="override the image size (long side)")
    tr.add_argument("--weights", help="backbone initialisation: 'imagenet', 'random' or a file")
    tr.add_argument("--boxes", help="boxes CSV: pool its boxes instead of the R-MAC grid")
    tr.add_argument("--overwrite", action="store_true")
    tr.set_defaults(func=_rmac_train)


def _weights_arg(value: str | None) -> Any:
    return None if value == "random" else value


def _rmac(args: argparse.Namespace) -> int:
    import json

    from gldboxes.executor import executor_from_args
    from retrieval.rmac import resolve_conf, run_rmac

    over: dict[str, Any] = {"method": args.method}
    if args.weights is not None:
        over["weights"] = _weights_arg(args.weights)
    for key in ("max_side", "levels", "model"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if args.rerank is not None:
        over["aml"] = {"rerank": args.rerank}
    conf = resolve_conf(args.preset, **over)
    with executor_from_args(args, args.out) as engine:
        res = run_rmac(
            args.dataset,
            args.out,
            conf,
            whitening_images=args.whitening_images,
            whitening_dataset=args.whitening_dataset,
            overwrite=args.overwrite,
            executor=engine,
            shard_size=args.shard_size,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "method": res.method,
                    "ranks": str(res.ranks),
                    "metrics": str(res.metrics_path),
                    "timings": res.timings,
                    "mAP": {p: r.map for p, r in res.results.items()},
                },
                indent=2,
            )
        )
    else:
        print(res.table())
        print(f"ranks: {res.ranks}\nmetrics: {res.metrics_path}")
    return 0


def _rmac_train(args: argparse.Namespace) -> int:
    import copy

    from retrieval.rmac.learned import confs, main

    if args.preset not in confs:
        raise ValueError(f"unknown learned R-MAC preset {args.preset!r}; expected {sorted(confs)}")
    conf = copy.deepcopy(confs[args.preset])
    if args.steps is not None:
        conf["steps"] = args.steps
    if args.max_side is not None:
        conf["max_side"] = args.max_side
    if args.weights is not None:
        conf["weights"] = _weights_arg(args.weights)
    if args.boxes is not None:
        conf["regions"] = "boxes"
    print(main(conf, args.train_csv, args.out, boxes=args.boxes, overwrite=args.overwrite))
    return 0
