"""``gldboxes retrieval ...``: the retrieval evaluator's command-line face (light imports only)."""

from __future__ import annotations

import argparse
from typing import Any

from retrieval.cli import gldv2 as cli_gldv2
from retrieval.cli import rmac as cli_rmac

__all__ = [
    "add_verification_options",
    "engine_conf_from_args",
    "register",
    "verification_conf_from_args",
]


def register(subparsers: Any) -> None:
    """Add ``retrieval`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "retrieval", help="local features, ASMK*, regional search, Revisited evaluation"
    )
    sub = parser.add_subparsers(dest="retrieval_command", metavar="STEP")
    sub.required = True

    ev = sub.add_parser(
        "evaluate",
        help="mAP and mP@1/5/10 of a ranking under Easy/Medium/Hard; GLDv2 mAP@100 / GAP",
    )
    ev.add_argument("--gnd", help="gnd_<name>.pkl (official) or .json")
    ev.add_argument("--ranks", help="ranks .npy of shape (n_db, n_queries)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--kappas", default="1,5,10", help="k of mP@k, comma-separated")
    cli_gldv2.add_evaluate_options(ev)  # --dataset/--solution/--submission (retrieval.cli.gldv2)
    ev.set_defaults(func=_evaluate)

    dl = sub.add_parser(
        "download", help="download roxford5k / rparis6k / revisitop1m distractors (resumable)"
    )
    dl.add_argument("name", choices=["roxford5k", "rparis6k", "revisitop1m"])
    dl.add_argument(
        "--out",
        required=True,
        help="data root; the dataset goes to OUT/NAME (revisitop1m: into OUT itself)",
    )
    dl.add_argument("--gnd-base-url", help="mirror for the ground-truth pickle")
    dl.add_argument("--images-base-url", help="mirror for the image tarballs")
    _distractor_download_options(dl)
    dl.set_defaults(func=_download)

    # The run's stages (retrieval.runner.run); all write config-named folders under --out.
    ex = sub.add_parser(
        "extract",
        help="local features of a dataset (db + cropped queries) or "
        "of an image folder, into OUT/features/<preset>/",
    )
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="Revisited-style folder (gnd_<name>.pkl + jpg/)")
    src.add_argument("--images", help="any image folder (recursive), e.g. a codebook training set")
    _engine_options(ex)
    ex.set_defaults(func=_extract)

    cb = sub.add_parser("codebook", help="seeded faiss k-means on a features file")
    cb.add_argument(
        "--train-features", required=True, help="features .h5 of ANOTHER dataset than the benchmark"
    )
    cb.add_argument("--out", required=True, help="output root (OUT/codebooks/<name>/)")
    _feature_options(cb)
    cb.add_argument("--codebook-size", type=int, default=1024, help="visual words K")
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--niter", type=int, default=20, help="k-means iterations")
    cb.add_argument("--max-descriptors", type=int, default=500_000, help="training sample size")
    cb.add_argument("--name", help="training-set name for the folder (default: file stem)")
    cb.add_argument("--overwrite", action="store_true")
    cb.set_defaults(func=_codebook)

    ix = sub.add_parser(
        "index",
        help="aggregate a dataset's database into an inverted file, or index/grow/shrink a "
        "folder of your own photos (--images, --remove, --compact)",
    )
    ix.add_argument("--dataset", help="Revisited-style folder")
    ix.add_argument("--codebook", help="codebook.npy (or its folder)")
    _engine_options(ix)
    from retrieval.cli.photos import add_index_options, register_query

    add_index_options(ix)
    ix.set_defaults(func=_index)
    register_query(sub)

    se = sub.add_parser("search", help="rank the database for every query (ranks.npy)")
    se.add_argument("--dataset", required=True, help="Revisited-style folder")
    se.add_argument("--codebook", required=True, help="codebook.npy (or its folder)")
    _engine_options(se)
    se.set_defaults(func=_search)

    rn = sub.add_parser("run", help="one shot: features, codebook, index, ranks, metrics table")
    rn.add_argument("--dataset", required=True, help="Revisited-style folder")
    _codebook_options(rn)
    rn.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rn.add_argument(
        "--distractors",
        metavar="DIR|INDEX",
        help="add distractors to the database: an image folder (e.g. the extracted revisitop1m) "
        "or a distractor index built with the same features/codebook/kernel "
        "(OUT/index/...-<set>.parts); the table row ends +<count> (roxford5k+1m)",
    )
    _engine_options(rn)
    _region_options(rn)
    from gldboxes.executor import add_engine_options

    add_engine_options(rn)  # --engine serial|ray: where the per-image stages run
    rn.set_defaults(func=_run)

    ab = sub.add_parser(
        "ablation",
        help="Detect-to-Retrieve grid: methods x region sources x thresholds -> CSV, table, plot",
    )
    ab.add_argument("--dataset", required=True, help="Revisited-style folder")
    ab.add_argument("--out", required=True, help="output root; results in OUT/ablation/")
    ab.add_argument("--boxes", help="detector boxes CSV (id,box,score) for the threshold rows")
    ab.add_argument("--thresholds", default="0.7,0.5,0.3,0.1", help="detector score thresholds")
    ab.add_argument("--rmac-levels", default="1,2,3", help="R-MAC grid levels ('' for none)")
    ab.add_argument("--ss", default="1,2,5,10", help="selective-search top-N ('' for none)")
    ab.add_argument("--gt-boxes", help="ground-truth boxes CSV (default DATASET/boxes_gt.csv)")
    ab.add_argument("--no-gt", action="store_true", help="skip the ground-truth-box rows")
    ab.add_argument(
        "--methods",
        default="asmk_star,r_asmk_star,naive_r_asmk_star,d2r_max,d2r_avg,vlad,r_vlad",
        help="comma-separated methods (retrieval.runner.ablation.METHODS)",
    )
    ab.add_argument(
        "--region-features",
        default="assign",
        help="assign, reextract, or both comma-separated (the paper re-extracts)",
    )
    add_verification_options(ab)
    _codebook_options(ab)
    _feature_options(ab)
    ab.add_argument("--name", default="ablation", help="result folder under --out")
    ab.add_argument("--overwrite", action="store_true", help="redo finished work")
    ab.set_defaults(func=_ablation)

    cli_rmac.register(sub)  # R-MAC / AML / learned R-MAC (retrieval.cli.rmac)
    cli_gldv2.register(sub)  # GLDv2 benchmark folders (retrieval.cli.gldv2)


def _codebook_options(p: argparse.ArgumentParser) -> None:
    """Where the codebook comes from (one of three) and its size and seed."""
    cbs = p.add_mutually_exclusive_group()
    cbs.add_argument(
        "--codebook-images",
        nargs="+",
        metavar="DIR",
        help="train the codebook on these image folders (any photos of other places)",
    )
    cbs.add_argument("--codebook-dataset", help="train it on another Revisited folder's database")
    cbs.add_argument("--codebook", help="use this codebook.npy")
    p.add_argument("--codebook-size", type=int, default=1024, help="visual words K")
    p.add_argument("--codebook-seed", type=int, default=0)


def _feature_options(p: argparse.ArgumentParser) -> None:
    from retrieval.features import confs

    p.add_argument("--features", default="rootsift", choices=sorted(confs), help="features preset")
    p.add_argument("--model-path", help="delf: SavedModel directory")
    p.add_argument("--pca-path", help="delf: PCA .npz or folder of .datum files")
    p.add_argument(
        "--max-features",
        type=int,
        help="feature budget per image (rootsift default 1000; classical ASMK: several "
        "thousand); named in the output folder (rootsift-n4000)",
    )
    p.add_argument(
        "--upright",
        action="store_true",
        default=None,
        help="rootsift: one descriptor per keypoint at angle 0 (upright photos)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        help="downscale the longer image side to this before extraction (default 1024, the "
        "size of the Revisited images); keypoints stay in original pixels",
    )


def add_verification_options(p: argparse.ArgumentParser) -> None:
    """Spatial verification knobs; unset ones take the features preset's defaults."""
    p.add_argument("--verify", action="store_true", help="spatial verification after search")
    p.add_argument("--gv-top-n", type=int, help="verified head per protocol (default 100)")
    p.add_argument(
        "--gv-max-distance",
        type=float,
        help="1-NN L2 threshold (preset: delf 0.8, rootsift off; 'inf' turns it off)",
    )
    p.add_argument(
        "--gv-ratio", type=float, help="Lowe's ratio test (preset: rootsift 0.8; 1 turns it off)"
    )
    p.add_argument(
        "--gv-mutual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mutual nearest neighbours only (preset: rootsift on, delf off)",
    )
    p.add_argument(
        "--gv-threshold",
        type=float,
        help="RANSAC inlier threshold in pixels of the image at --max-side (default 10)",
    )
    p.add_argument(
        "--gv-min-inliers",
        type=int,
        help="fewer inliers: unverified, first-stage order kept (preset: rootsift 10, delf 0)",
    )
    p.add_argument("--gv-trials", type=int, help="RANSAC trials (default 1000)")
    p.add_argument(
        "--gv-max-scale",
        type=float,
        help="refuse affine models scaling areas beyond this squared (default 10; inf: off)",
    )


def verification_conf_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The run's ``verification`` dict from the ``--gv-*`` options (None: no verification)."""
    if not getattr(args, "verify", False):
        return None
    keys = (
        "top_n",
        "max_distance",
        "ratio",
        "mutual",
        "threshold",
        "min_inliers",
        "trials",
        "max_scale",
    )
    return {k: getattr(args, f"gv_{k}") for k in keys if getattr(args, f"gv_{k}") is not None}


def _feature_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``feature_model`` / ``feature_preprocessing`` overrides from the features options."""
    model: dict[str, Any] = {}
    if getattr(args, "model_path", None):
        model["path"] = args.model_path
    if getattr(args, "pca_path", None):
        model["pca_path"] = args.pca_path
    if getattr(args, "max_features", None) is not None:
        model["max_features"] = args.max_features
    if getattr(args, "upright", None):
        model["upright"] = True
    pre = {"max_side": args.max_side} if getattr(args, "max_side", None) else {}
    return {"feature_model": model, "feature_preprocessing": pre}


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output root of the config-named folders")
    _feature_options(p)
    from retrieval.index.kernels import kernels

    p.add_argument(
        "--kernel",
        default="asmk_star",
        choices=list(kernels),
        help="aggregation kernel (retrieval.index.kernels)",
    )
    p.add_argument("--num-assignments", type=int, default=1, help="visual words per descriptor")
    from retrieval.index.assignment import ASSIGNMENTS

    p.add_argument(
        "--assignment",
        choices=list(ASSIGNMENTS),
        default="exact",
        help="visual-word assignment: exact (the paper's) or hnsw (a faiss HNSW graph over the "
        "words, cached beside the codebook: faster at K=65,536, 99%% of words exact)",
    )
    p.add_argument("--top-k", type=int, help="ranks kept per query (default: all)")
    p.add_argument("--overwrite", action="store_true", help="redo finished work")


def _region_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regions", help="index regions: a retrieval.regions preset (gt, d2r-0.3 ...)")
    p.add_argument("--region-boxes", help="boxes CSV of the detector (or gt) region source")
    p.add_argument("--region-threshold", type=float, help="detector score threshold")
    p.add_argument(
        "--region-features",
        default="assign",
        choices=["assign", "reextract"],
        help="regional features: assign whole-image features to boxes, or re-extract on crops",
    )
    p.add_argument(
        "--regional-search",
        choices=["max", "avg"],
        help="D2R regional search: index every region, pool scores per image",
    )
    p.add_argument(
        "--region-norm-floor",
        type=float,
        help="regional search: a region's ASMK normalisation counts at least this fraction of "
        "its image's words (default 0.1; 0: plain ASMK)",
    )
    add_verification_options(p)


def _region_conf(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "regions": getattr(args, "regions", None),
        "region_boxes": getattr(args, "region_boxes", None),
        "region_threshold": getattr(args, "region_threshold", None),
        "region_features": getattr(args, "region_features", "assign"),
        "regional_search": getattr(args, "regional_search", None),
        "region_norm_floor": getattr(args, "region_norm_floor", None),
        "verification": verification_conf_from_args(args),
    }


def engine_conf_from_args(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The resolved run conf (:func:`retrieval.runner.conf.resolve_conf`) of the features,
    kernel, assignment and verification options, plus ``extra`` conf keys.

    Raises:
        ValueError: from ``resolve_conf`` when an option is out of range or unknown.
    """
    from retrieval.runner.conf import resolve_conf

    return resolve_conf(
        features=args.features,
        **_feature_overrides(args),
        kernel=getattr(args, "kernel", "asmk_star"),
        num_assignments=getattr(args, "num_assignments", 1),
        assignment=getattr(args, "assignment", "exact"),
        top_k=getattr(args, "top_k", None),
        **extra,
    )


def _extract(args: argparse.Namespace) -> int:
    from retrieval.runner.driver import extract_folder
    from retrieval.runner.run import run

    conf = engine_conf_from_args(args)
    if args.images:
        path, name = extract_folder(conf, args.images, args.out, overwrite=args.overwrite)
        print(f"{name}: {path}")
    else:  # the run's first stage: the database and the cropped queries, in shards
        res = run(args.dataset, args.out, conf, overwrite=args.overwrite, until="features")
        assert res.db_features is not None and res.query_features is not None
        print(
            f"database: {res.db_features.paths[0].parent.parent}\n"
            f"queries: {res.query_features.paths[0].parent.parent}"
        )
    return 0


def _codebook(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retrieval.runner.driver import build_codebook

    cbconf = {
        "size": args.codebook_size,
        "seed": args.seed,
        "niter": args.niter,
        "max_descriptors": args.max_descriptors,
        "max_points_per_centroid": 256,
    }
    conf = engine_conf_from_args(args, codebook=cbconf)
    name = args.name or Path(args.train_features).stem
    path = build_codebook(conf, args.train_features, name, args.out, overwrite=args.overwrite)
    print(path)
    return 0


def _stage_run(args: argparse.Namespace, until: str) -> Any:
    """The run's stages up to ``until`` with a given codebook (``retrieval index`` / ``search``)."""
    from retrieval.features.codebook import load_codebook
    from retrieval.runner.run import run

    k = load_codebook(args.codebook).shape[0]
    conf = engine_conf_from_args(args, codebook={"size": k})
    return run(
        args.dataset,
        args.out,
        conf,
        codebook_path=args.codebook,
        overwrite=args.overwrite,
        until=until,
    )


def _index(args: argparse.Namespace) -> int:
    if args.images or args.remove or args.compact:
        from retrieval.cli.photos import index

        if args.dataset:
            raise ValueError("retrieval index: give --dataset or --images/--remove/--compact")
        return index(args)
    if args.regions or args.codebook_images or args.codebook_size:
        raise ValueError("--regions/--codebook-images/--codebook-size apply to --images")
    if not args.dataset or not args.codebook:
        raise ValueError("retrieval index: give --dataset and --codebook, or --images (photos)")
    print(_stage_run(args, "index").index)
    return 0


def _search(args: argparse.Namespace) -> int:
    print(_stage_run(args, "evaluate").ranks)
    return 0


def _run(args: argparse.Namespace) -> int:
    """``retrieval run``: the one runner, serial here or shard by shard on Ray (``--engine``)."""
    import json

    from gldboxes.executor import executor_from_args
    from retrieval.runner.run import run

    conf = engine_conf_from_args(
        args,
        codebook={"size": args.codebook_size, "seed": args.codebook_seed},
        **_region_conf(args),
    )
    with executor_from_args(args, args.out) as engine:
        res = run(
            args.dataset,
            args.out,
            conf,
            executor=engine,
            shard_size=args.shard_size,
            codebook_images=args.codebook_images,
            codebook_dataset=args.codebook_dataset,
            codebook_path=args.codebook,
            overwrite=args.overwrite,
            distractors=args.distractors,
        )
    ver = res.verification
    if args.json:
        print(
            json.dumps(
                {
                    **_run_summary(res),
                    "verification": (
                        {
                            "mAP": {p: r.map for p, r in ver["results"].items()},
                            "seconds_per_query": ver["seconds_per_query"],
                            "metrics": str(ver["metrics_path"]),
                            "ranks": {p: str(v) for p, v in ver["ranks"].items()},
                        }
                        if ver
                        else None
                    ),
                },
                indent=2,
            )
        )
    else:
        print(res.table())
        if res.distractors is not None:
            _print_distractors(res.distractors)
        print(f"index: {res.index} ({res.index_stats.get('bytes_per_image', 0):.0f} bytes/image)")
        print(f"ranks: {res.ranks}\nmetrics: {res.metrics_path}")
        if ver:
            print(
                f"verification: {ver['seconds_per_query']:.3f} s per query, {ver['metrics_path']}"
            )
    return 0


def _print_distractors(index: Any) -> None:
    """One line on the distractor index of a run: folder, images, bytes per image."""
    from retrieval.index.sharded import ShardedInvertedFile

    st = ShardedInvertedFile.load(index).stats()
    print(
        f"distractors: {index} ({st['images']:.0f} images in {st['parts']:.0f} "
        f"part{'s' if st['parts'] != 1 else ''}, "
        f"{st['bytes_per_image']:.0f} bytes/image)"
    )


def _run_summary(res: Any) -> dict[str, Any]:
    """The JSON fields of a ``retrieval run`` report."""
    return {
        "ranks": str(res.ranks),
        "metrics": str(res.metrics_path),
        "index": str(res.index),
        "index_stats": res.index_stats,
        "mAP": {p: r.map for p, r in res.results.items()},
        "distractors": None if res.distractors is None else str(res.distractors),
    }


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--{what}: expected comma-separated numbers, got {text!r}") from exc


def _ablation(args: argparse.Namespace) -> int:
    import copy

    from retrieval.runner.ablation import confs, main

    conf = copy.deepcopy(confs["paper"])
    conf["engine"] = {
        "features": args.features,
        **_feature_overrides(args),
        "codebook": {"size": args.codebook_size, "seed": args.codebook_seed},
    }
    conf["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    conf["thresholds"] = _floats(args.thresholds, "thresholds")
    conf["rmac_levels"] = [int(v) for v in _floats(args.rmac_levels, "rmac-levels")]
    conf["ss"] = [int(v) for v in _floats(args.ss, "ss")]
    conf["gt"] = not args.no_gt
    conf["region_features"] = [m.strip() for m in args.region_features.split(",") if m.strip()]
    conf["verification"] = verification_conf_from_args(args)
    path = main(
        conf,
        args.dataset,
        args.out,
        boxes=args.boxes,
        gt_boxes=args.gt_boxes,
        codebook_images=args.codebook_images,
        codebook_dataset=args.codebook_dataset,
        codebook_path=args.codebook,
        overwrite=args.overwrite,
        name=args.name,
    )
    print((path.parent / "ablation.md").read_text())
    print(
        f"csv: {path}\ntable: {path.parent / 'ablation.md'}\nplot: {path.parent / 'ablation.png'}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from retrieval.evaluation.datasets import load_gnd
    from retrieval.evaluation.evaluate import evaluate_protocols, format_table

    if cli_gldv2.uses_gldv2(args):
        return cli_gldv2.evaluate_gldv2(args)
    if not args.gnd or not args.ranks:
        raise ValueError("--gnd and --ranks are required (or GLDv2: --dataset or --solution)")
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


def _distractor_download_options(p: argparse.ArgumentParser) -> None:
    """``retrieval download revisitop1m`` options (archives, mirror, engine, transfer policy)."""
    from gldboxes.executor import add_engine_options

    g = p.add_argument_group("revisitop1m (1,001,001 distractors in 100 archives)")
    g.add_argument("--archives", help="archive numbers, e.g. 1-100 or 1-3,7 (default: all)")
    g.add_argument(
        "--base-url",
        help="mirror root holding revisitop1m.txt and jpg/revisitop1m.N.tar.gz (default: "
        "revisitop's server; http(s):// or file://)",
    )
    g.add_argument("--keep-archives", action="store_true", help="keep the .tar.gz files")
    g.add_argument("--retries", type=int, default=5, help="retries per file")
    g.add_argument("--timeout", type=float, default=60.0, help="connect/read timeout, seconds")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait, seconds")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_options(p, shard_size=1, shard_unit="archives")


def _download_revisitop1m(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gldboxes.executor import executor_from_args
    from retrieval.evaluation.distractors import REVISITOP1M_BASE_URL, download_revisitop1m

    with executor_from_args(args, Path(args.out) / "shards") as engine:
        engine.progress = engine.progress and not args.no_progress
        rep = download_revisitop1m(
            args.out,
            archives=args.archives,
            base_url=args.base_url or REVISITOP1M_BASE_URL,
            executor=engine,
            archives_per_task=args.shard_size,
            keep_archives=args.keep_archives,
            retries=args.retries,
            backoff=args.backoff,
            timeout=args.timeout,
        )
    print(
        f"revisitop1m: {len(rep.done)} archive(s) done now, {len(rep.skipped)} already done, "
        f"{rep.images} images extracted; {rep.present} of the {rep.listed} listed images in "
        f"{rep.root / 'jpg'}; manifest {rep.manifest}"
    )
    if rep.failed:
        print(f"FAILED ({len(rep.failed)}), rerun to fetch them again:")
        for name, reason in sorted(rep.failed.items()):
            print(f"  {name}: {reason}")
        return 1
    return 0


def _download(args: argparse.Namespace) -> int:
    from retrieval.evaluation.datasets import download_revisited

    if args.name == "revisitop1m":
        if args.gnd_base_url or args.images_base_url:
            raise ValueError("revisitop1m: give its mirror with --base-url")
        return _download_revisitop1m(args)
    if args.engine or args.archives or args.base_url:
        raise ValueError(
            f"--engine/--archives/--base-url apply to revisitop1m; {args.name} takes "
            "--gnd-base-url/--images-base-url"
        )
    base: dict[str, str] = {}
    if args.gnd_base_url:
        base["gnd"] = args.gnd_base_url
    if args.images_base_url:
        base["images"] = args.images_base_url
    ds = download_revisited(args.name, args.out, base_urls=base or None)
    print(f"{ds.name}: {ds.n_db} database images, {ds.n_queries} queries in {ds.root}")
    return 0


# --------------------------------------------------------------------------- R-MAC family
