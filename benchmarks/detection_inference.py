"""Inference speed of every detector preset on this machine, through the exported SavedModel.

Each preset is exported (random, seeded weights unless ``--run PRESET=RUN_DIR`` points at a
trained run), loaded like ``gldboxes detect boxes`` loads it, warmed up, then timed on the
same seeded 640x480 images. Prints seconds/image, images/s, and each preset's time relative to
``ssd_mobilenetv2`` measured in the same run — the paper reports Faster R-CNN at 89 ms vs SSD
at 27 ms on a TitanX, a ratio of 3.3.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/detection_inference.py \\
        [--presets tiny_cpu ssd_mobilenetv2 frcnn_resnet50] [--images 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection import configs, export
from detection.inference import load_detector

PAPER_MS = {"ssd_mobilenetv2": 27.0, "frcnn_resnet50": 89.0}  # TitanX, Teichmann et al. 2019


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded 480x640 RGB images with a few bright rectangles on smooth noise."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (640, 480))
        for _ in range(3):
            x0, y0 = int(rng.integers(0, 500)), int(rng.integers(0, 360))
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            cv2.rectangle(img, (x0, y0), (x0 + 120, y0 + 100), color, -1)
        out.append(img)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(configs.confs))
    parser.add_argument("--images", type=int, default=10, help="timed images per preset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        help="PRESET=RUN_DIR: time a trained run instead of random weights",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    imgs = _images(args.images + args.warmup)
    results: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(prefix="detbench-") as tmp:
        for name in args.presets:
            conf = configs.get_conf(name)
            t0 = time.perf_counter()
            if name in runs:
                path = export.main(runs[name], Path(tmp) / name)
                weights = "trained"
            else:
                path = export.main(None, Path(tmp) / name, checkpoint="random", conf=conf)
                weights = "random"
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            det = load_detector(path)
            t_load = time.perf_counter() - t0
            for img in imgs[: args.warmup]:
                det(img)
            t0 = time.perf_counter()
            for img in imgs[args.warmup :]:
                det(img)
            per = (time.perf_counter() - t0) / args.images
            results[name] = {
                "weights": weights,
                "seconds_per_image": per,
                "images_per_second": 1.0 / per,
                "export_seconds": t_export,
                "load_seconds": t_load,
            }
            print(
                f"{name:16s} {weights:7s} {per:7.3f} s/image  {1 / per:6.2f} images/s  "
                f"(export {t_export:5.1f} s, load {t_load:5.1f} s)",
                flush=True,
            )
            del det
    ref = results.get("ssd_mobilenetv2")
    if ref is not None:
        print("\ntime relative to ssd_mobilenetv2 on this CPU (paper, TitanX: frcnn 3.3x):")
        for name, r in results.items():
            ratio = float(r["seconds_per_image"]) / float(ref["seconds_per_image"])
            paper = (
                f"  paper {PAPER_MS[name] / PAPER_MS['ssd_mobilenetv2']:.1f}x"
                if name in PAPER_MS
                else ""
            )
            print(f"  {name:16s} {ratio:5.2f}x{paper}")
    print(f"\n{os.cpu_count()} CPUs visible; other processes share them.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
