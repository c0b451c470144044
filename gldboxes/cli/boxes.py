"""``gldboxes boxes convert``: box files from one format to another (via ``gldboxes.boxes``).

Formats (files of ``{image id: [box]}``; the image id is the file stem):

    gld           boxes CSV ``id,box[,score]``, ``box = "ymin xmin ymax xmax"`` normalised
    coco          COCO instances JSON, one category ``landmark``, pixel ``[x, y, w, h]``;
                  writing it needs ``--images`` (image sizes are read from the files)
    label_studio  Label Studio JSON export (a list of tasks); reading only
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["READ_FORMATS", "WRITE_FORMATS", "register"]

READ_FORMATS: tuple[str, ...] = ("gld", "coco", "label_studio")
WRITE_FORMATS: tuple[str, ...] = ("gld", "coco")


def register(subparsers: Any) -> None:
    """Add ``boxes`` and its ``convert`` subcommand."""
    parser = subparsers.add_parser("boxes", help="box files: convert between formats")
    sub = parser.add_subparsers(dest="boxes_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "convert",
        help="convert a box file: gld CSV, COCO instances JSON, Label Studio export (read)",
    )
    p.add_argument("--from", dest="src", required=True, choices=READ_FORMATS, help="input format")
    p.add_argument("--to", dest="dst", required=True, choices=WRITE_FORMATS, help="output format")
    p.add_argument("--in", dest="inp", required=True, metavar="PATH", help="input file")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (written atomically)")
    p.add_argument(
        "--images",
        metavar="DIR",
        help="folder of the images (<id>.jpg at any depth): sizes for --to coco",
    )
    p.add_argument(
        "--clip", action="store_true", help="clip boxes that stick out of the image (else error)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gldboxes.box_formats import read_coco_json, read_label_studio_json, write_coco_json
    from gldboxes.boxes import read_boxes_csv, write_boxes_csv

    inp = Path(args.inp)
    if not inp.is_file():
        raise FileNotFoundError(f"--in: file not found: {inp}")
    if args.dst == "coco" and args.images is None:
        raise ValueError("--to coco needs --images DIR (the image sizes come from the files)")
    if args.src == "gld":
        if args.clip:
            raise ValueError("--clip applies to --from coco or label_studio, not gld")
        boxes = read_boxes_csv(inp)
    elif args.src == "coco":
        boxes = read_coco_json(inp, clip=args.clip)
    else:
        boxes = read_label_studio_json(inp, clip=args.clip)
    if args.dst == "gld":
        out = write_boxes_csv(args.out, boxes)
    else:
        out = write_coco_json(args.out, boxes, images=args.images)
    n = sum(len(v) for v in boxes.values())
    print(f"{out}: {n} boxes of {len(boxes)} images ({args.src} -> {args.dst})")
    return 0
