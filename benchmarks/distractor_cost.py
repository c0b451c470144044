"""Cost of distractors: time and index size per 1,000 distractor images, and the R1M estimate.

Builds a distractor index (:func:`retrieval.evaluation.distractors.distractor_index`: RootSIFT
features
and ASMK* aggregation, shard by shard on the serial executor, one process) from an image
folder, by default the real Revisited Paris photos in ``../shared/data/real/mini_rparis6k/jpg``
(the same kind of ~1024-px Flickr photos as revisitop1m), with a codebook trained on a tiny
synthetic world's training images. Prints the wall time split into features and aggregation
(the shards' own timings), the index bytes, both per 1,000 images, and their extrapolation to
the 1,001,001 revisitop1m images on one core.

Run::

    .venv/bin/python benchmarks/distractor_cost.py [--images DIR] [--codebook-size 1024]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "real" / "mini_rparis6k" / "jpg"


def main(argv: list[str] | None = None) -> None:
    """Build the index, print the per-1,000 figures and the R1M extrapolation."""
    from gldboxes.executor import read_done
    from gldboxes.synth import confs, generate_world
    from retrieval.evaluation.distractors import REVISITOP1M_IMAGES, distractor_index
    from retrieval.index.sharded import ShardedInvertedFile
    from retrieval.runner.conf import resolve_conf
    from retrieval.runner.driver import build_codebook, extract_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="distractor folder")
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--shard-size", type=int, default=256, help="images per shard / part")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        conf = resolve_conf(codebook={"size": args.codebook_size, "niter": 10})
        world = generate_world(out / "world", confs["tiny"])
        h5, name = extract_folder(conf, world / "train" / "images", out)
        cb = build_codebook(conf, h5, name, out)
        t0, c0 = time.perf_counter(), time.process_time()
        idx = distractor_index(conf, args.images, cb, name, out, shard_size=args.shard_size)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sivf = ShardedInvertedFile.load(idx)
        n = sivf.n_images
        feat_dir = next((out / "features").glob("*/*.shards"))
        feat_s = sum((read_done(d) or {}).get("seconds", 0.0) for d in feat_dir.glob("shard-*"))
        agg_s = sum((read_done(d) or {}).get("seconds", 0.0) for d in idx.glob("part-*"))
        st = sivf.stats()
        per_k = 1000.0 / n
        print(f"{n} distractor images from {args.images}, K={args.codebook_size}, RootSIFT")
        print(
            f"per 1,000 images: {cpu * per_k:.1f} s CPU, {wall * per_k:.1f} s wall (features "
            f"{feat_s * per_k:.1f} s, aggregation {agg_s * per_k:.1f} s; the wall time counts "
            f"other processes' load, {os.getloadavg()[0]:.1f} now), index "
            f"{st['bytes'] * per_k / 1e6:.2f} MB ({st['bytes_per_image']:.0f} bytes/image)"
        )
        r1m = REVISITOP1M_IMAGES / 1000.0
        print(
            f"R1M ({REVISITOP1M_IMAGES:,} images): {cpu * per_k * r1m / 3600:.0f} CPU-hours "
            f"({wall * per_k * r1m / 3600:.0f} h at this wall rate), index "
            f"{st['bytes'] * per_k * r1m / 1e9:.1f} GB"
        )


if __name__ == "__main__":
    main()
