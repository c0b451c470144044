"""``gldboxes detect ...``: records, train, eval, export, boxes (TensorFlow imported lazily)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]

_PRESETS = (
    "ssd_mobilenetv2",
    "frcnn_resnet50",
    "tiny_cpu",
    "frcnn_resnet50_paper",
    "ssd_mobilenetv2_paper",
)


def register(subparsers: Any) -> None:
    """Add ``detect`` and its steps to the top-level parser."""
    parser = subparsers.add_parser(
        "detect", help="landmark detectors: TFRecords, train, AP@0.5 eval, export, boxes"
    )
    sub = parser.add_subparsers(dest="detect_command", metavar="STEP")
    sub.required = True

    rec = sub.add_parser("records", help="boxes CSV + images -> sharded TFRecords (+ label map)")
    rec.add_argument("--boxes", required=True, help="ground-truth boxes CSV (id,box)")
    rec.add_argument("--images", required=True, help="image root (GLD a/b/c/<id>.jpg or flat)")
    rec.add_argument(
        "--images-csv",
        help="CSV with id[,url|path] listing every image (boxed or not), e.g. GLD train.csv",
    )
    rec.add_argument(
        "--split-csv",
        help="CSV id,split or a folder of train.csv/val.csv (gldboxes split); default: hashed",
    )
    rec.add_argument("--out", required=True, help="parent folder of the records folder")
    rec.add_argument("--conf", default="gld", help="records preset: gld or synth")
    rec.add_argument("--val-fraction", type=float, help="override the preset's val share")
    rec.add_argument("--no-negatives", action="store_true", help="drop images with no box")
    rec.add_argument("--overwrite", action="store_true")
    rec.set_defaults(func=_records)

    tr = sub.add_parser("train", help="train a preset (resumes from the last checkpoint)")
    tr.add_argument("--records", required=True, help="records folder (detect records)")
    tr.add_argument("--runs", required=True, help="parent folder of the run folder")
    tr.add_argument("--conf", default="tiny_cpu", choices=_PRESETS, help="detector preset")
    tr.add_argument("--steps", type=int, help="total steps (default: the preset's)")
    tr.add_argument("--batch-size", type=int, help="global training batch size")
    tr.add_argument(
        "--input-size",
        type=int,
        help="square input side (a multiple of 2**max_level; run folder renamed), e.g. 128",
    )
    tr.add_argument("--learning-rate", type=float, help="peak learning rate")
    tr.add_argument(
        "--init-checkpoint",
        help="Keras ImageNet .h5 (backbone), Model Garden checkpoint prefix/folder or URL "
        "(.tar.gz) to start from; 'none' trains from scratch",
    )
    tr.add_argument(
        "--init-modules",
        choices=("backbone", "all"),
        help="what --init-checkpoint initialises (default: the preset's, backbone)",
    )
    tr.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="evaluate AP@0.5 every N steps and at the end (TensorBoard RUN/validation "
        "eval/AP50, RUN/eval_history.json/.csv, best checkpoint in RUN/best); "
        "default: the preset's (the *_paper presets evaluate), 0: off",
    )
    tr.add_argument(
        "--eval-records", help="records folder evaluated with --eval-every (default --records)"
    )
    tr.add_argument("--eval-split", default="val", help="split evaluated with --eval-every")
    tr.add_argument("--overwrite", action="store_true", help="start the run from scratch")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="AP@0.5 + COCO sweep of a run (or of a boxes CSV)")
    ev.add_argument("--run", help="run folder (detect train)")
    ev.add_argument("--records", help="records folder holding the split")
    ev.add_argument("--split", default="val", help="records split (default val)")
    ev.add_argument(
        "--checkpoint",
        default="latest",
        help="latest, init (untrained baseline) or a checkpoint prefix",
    )
    ev.add_argument("--boxes", help="detector boxes CSV to score instead of a run")
    ev.add_argument("--gt", help="ground-truth boxes CSV (with --boxes)")
    ev.add_argument(
        "--ids",
        help="text file of evaluated image ids or paths (stems used); "
        "default: every id in --boxes/--gt",
    )
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=_eval)

    ex = sub.add_parser("export", help="export a run's checkpoint as a SavedModel")
    ex.add_argument("--run", required=True, help="run folder (detect train)")
    ex.add_argument("--out", help="SavedModel folder (default RUN/export-step<N>)")
    ex.add_argument("--checkpoint", default="latest", help="latest or a checkpoint prefix")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=_export)

    bx = sub.add_parser("boxes", help="detect landmarks in images -> boxes CSV (id,box,score)")
    bx.add_argument("--model", required=True, help="SavedModel (ours or the authors' TF1 one)")
    bx.add_argument("--images", required=True, help="image folder or text list of paths")
    bx.add_argument("--out", required=True, help="output boxes CSV")
    bx.add_argument("--threshold", type=float, default=0.0, help="keep boxes scoring >= this")
    bx.add_argument("--max-side", type=int, help="downscale larger images first")
    bx.add_argument("--overwrite", action="store_true")
    from gldboxes.executor import add_engine_options

    add_engine_options(bx)
    bx.set_defaults(func=_boxes)


def _exit_without_final_gc() -> None:
    """Skip the garbage collection of TensorFlow's object graph at interpreter exit.

    After training, the final collection of the model's reference cycles kept the process alive
    for seconds after it printed its result (issue #20: frcnn_resnet50 still running 45 s
    later; 7 s here under load). Everything is written, flushed and closed before the command
    returns, so ``gc.freeze`` at exit only skips freeing memory the OS reclaims anyway. An
    ``atexit`` hook: callers that run the CLI in-process (tests) keep a normal GC until they
    exit themselves.
    """
    import atexit
    import gc

    atexit.register(gc.freeze)


def _records(args: argparse.Namespace) -> int:
    from detection import records

    if args.conf not in records.confs:
        raise ValueError(f"--conf must be one of {sorted(records.confs)}, got {args.conf!r}")
    conf = dict(records.confs[args.conf])
    if args.val_fraction is not None:
        conf["val_fraction"] = args.val_fraction
    if args.no_negatives:
        conf["include_negatives"] = False
    out = records.main(
        conf,
        args.boxes,
        args.images,
        args.out,
        images_csv=args.images_csv,
        split_csv=args.split_csv,
        overwrite=args.overwrite,
    )
    info = records.load_records_info(out)
    print(
        f"{out}: "
        + ", ".join(
            f"{k} {v} ({info.positives.get(k, 0)} with boxes)" for k, v in info.splits.items()
        )
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from detection import configs, train

    _exit_without_final_gc()
    conf = configs.get_conf(
        args.conf,
        train_batch_size=args.batch_size,
        input_size=args.input_size,
        init_checkpoint_modules=args.init_modules,
    )
    if args.learning_rate is not None:
        conf["optimizer"]["learning_rate"] = args.learning_rate
    run = train.main(
        conf,
        args.records,
        args.runs,
        steps=args.steps,
        init_checkpoint=args.init_checkpoint,
        eval_every=args.eval_every,
        eval_records=args.eval_records,
        eval_split=args.eval_split,
        overwrite=args.overwrite,
    )
    print(run)
    return 0


def _read_ids(path: str) -> list[str]:
    from pathlib import Path

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"--ids file not found: {src}")
    lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
    return [
        Path(ln).stem if ("/" in ln or "." in ln) else ln
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def _eval(args: argparse.Namespace) -> int:
    import json

    from detection import evaluate

    _exit_without_final_gc()
    if args.boxes:
        if not args.gt:
            raise ValueError("--boxes needs --gt (the ground-truth boxes CSV)")
        ids = _read_ids(args.ids) if args.ids else None
        res = evaluate.evaluate_boxes(args.boxes, args.gt, image_ids=ids)
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    if not args.run or not args.records:
        raise ValueError("eval needs --run and --records (or --boxes and --gt)")
    out = evaluate.main(
        args.run,
        args.records,
        split=args.split,
        checkpoint=args.checkpoint,
        overwrite=args.overwrite,
    )
    res = evaluate.load_metrics(out)
    print(
        f"{out}: AP@0.5 = {res['ap50']:.4f}, AP@[.5:.95] = {res['coco'].get('AP', -1):.4f} "
        f"on {res['n_images']} {res['split']} images"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from detection import export

    _exit_without_final_gc()
    out = export.main(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(out)
    return 0


def _boxes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detection import inference
    from gldboxes.io import read_json

    if args.engine:
        return _boxes_sharded(args)
    out = inference.main(
        args.model,
        args.images,
        args.out,
        threshold=args.threshold,
        max_side=args.max_side,
        overwrite=args.overwrite,
    )
    stats = read_json(Path(str(out) + ".json"))
    ips = stats.get("images_per_second")
    print(
        f"{out}: {stats['n_images']} images, {stats['n_boxes']} boxes, {stats['n_bad']} bad, "
        f"{'n/a' if ips is None else f'{ips:.2f}'} images/s"
    )
    return 0


def _boxes_sharded(args: argparse.Namespace) -> int:
    """``detect boxes --engine serial|ray``: shards of images, merged into one boxes file."""
    from pathlib import Path

    from detection.images import list_images
    from detection.sharded import detect_stage, merge_boxes
    from gldboxes.executor import executor_from_args

    out = Path(args.out)
    images = list_images(args.images)
    stage, shards = detect_stage(
        args.model,
        images,
        threshold=args.threshold,
        max_side=args.max_side,
        shard_size=args.shard_size,
    )
    work = out.with_name(out.name + ".shards")
    with executor_from_args(args, work) as executor:
        report = executor.run(stage, shards, work, overwrite=args.overwrite)
    merge_boxes(work, shards, out)
    print(
        f"{out}: {report.counts.get('images', 0)} images in {len(report.done)} new shards "
        f"({len(report.skipped)} already done), {report.counts.get('boxes', 0)} boxes"
    )
    return 0
