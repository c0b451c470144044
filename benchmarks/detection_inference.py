"""Inference speed of every detector preset on this machine, through the exported SavedModel.

Each preset is exported (random, seeded weights unless ``--run PRESET=RUN_DIR`` points at a
trained run), loaded like ``gldboxes detect boxes`` loads it, warmed up, then timed on the
same seeded 640x480 images. Prints seconds/image, images/s, and each preset's time relative to
``ssd_mobilenetv2`` measured in the same run — the paper reports Faster R-CNN at 89 ms vs SSD
at 27 ms on a TitanX, a ratio of 3.3.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/detection_inference.py \\
        [--presets tiny_cpu ssd_mobilenetv2 frcnn_resnet50] [--images 10] [--json OUT]

``--load`` times model loading instead: each preset is exported twice from the same seeded
weights, as Model Garden's full SavedModel (the peer: ``export_inference_graph``) and as our
lean export (``detection.export``'s default), and each is loaded ``--repeats`` times in a fresh
Python process: ``tf.saved_model.load``, then the first call (graph optimisation) and a second
call on a 640x480 image; the two exports' detections are compared.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/detection_inference.py --load \\
        --presets tiny_cpu ssd_mobilenetv2 [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


# Run in a fresh interpreter: TensorFlow import, load, first and second call, outputs.
_LOAD_PROBE = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
loaded = tf.saved_model.load(sys.argv[1])
t2 = time.perf_counter()
sig = loaded.signatures["serving_default"]
img = np.random.default_rng(0).integers(0, 256, (1, 480, 640, 3), dtype=np.uint8)
out = sig(inputs=tf.constant(img))
n = int(out["num_detections"].numpy()[0])
t3 = time.perf_counter()
sig(inputs=tf.constant(img))["num_detections"].numpy()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_call": t3 - t2,
                  "second_call": t4 - t3, "n": n,
                  "boxes": out["detection_boxes"].numpy()[0, :n].tolist(),
                  "scores": out["detection_scores"].numpy()[0, :n].tolist()}))
"""


def _probe(path: Path) -> dict[str, object]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def load_times(presets: list[str], repeats: int) -> dict[str, dict[str, object]]:
    """Full (Model Garden) vs lean export of each preset: load and first-call seconds."""
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="detload-") as tmp:
        for name in presets:
            conf = configs.get_conf(name)
            row: dict[str, object] = {}
            probes: dict[str, dict[str, object]] = {}
            for layout, lean in (("model_garden", False), ("lean", True)):
                t0 = time.perf_counter()
                path = export.main(
                    None, Path(tmp) / f"{name}-{layout}", checkpoint="random", conf=conf, lean=lean
                )
                row[f"{layout}_export_seconds"] = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                row[f"{layout}_mb"] = size / 2**20
                runs = [_probe(path) for _ in range(repeats)]
                probes[layout] = runs[-1]
                for key in ("load", "first_call", "second_call"):
                    row[f"{layout}_{key}"] = min(float(str(r[key])) for r in runs)
            a, b = probes["model_garden"], probes["lean"]
            same_n = a["n"] == b["n"]
            row["same_detections"] = same_n and bool(
                np.allclose(np.asarray(a["boxes"]), np.asarray(b["boxes"]), atol=1e-4)
                and np.allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), atol=1e-6)
            )
            results[name] = row
            mg = float(str(row["model_garden_load"])) + float(str(row["model_garden_first_call"]))
            ln = float(str(row["lean_load"])) + float(str(row["lean_first_call"]))
            print(
                f"{name:16s} Model Garden export: load {row['model_garden_load']:5.1f} s + first "
                f"call {row['model_garden_first_call']:4.1f} s ({row['model_garden_mb']:.0f} MB)"
                f" | lean: load {row['lean_load']:5.1f} s + first call "
                f"{row['lean_first_call']:4.1f} s ({row['lean_mb']:.0f} MB) | "
                f"{mg / ln:4.1f}x faster to the first detection; same detections: "
                f"{row['same_detections']}",
                flush=True,
            )
    return results


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
    parser.add_argument(
        "--load", action="store_true", help="time loading: full vs lean export (see above)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="fresh loads per export (--load)")
    args = parser.parse_args(argv)
    if args.load:
        res = load_times(args.presets, args.repeats)
        print(
            f"\nbest of {args.repeats} fresh processes each; {os.cpu_count()} CPUs visible, shared."
        )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        return 0
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
