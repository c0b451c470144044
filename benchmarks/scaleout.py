"""Scale-out: features + aggregation throughput with the serial executor, Ray on 1 CPU and Ray
on 2 CPUs, and the sharded search against the single index, all from one run.

What it does, on a synthetic world it generates (``tiny`` preset with ``--distractors`` extra
database images, ``--size`` pixels):

1. trains one codebook (driver, serial) on the world's training images;
2. for each engine (``serial``; local Ray with ``num_cpus=1``; local Ray with ``num_cpus=2``;
   one CPU per shard task, so 1 and 2 tasks run at once), runs the database feature shards and
   the aggregation into index parts into a fresh folder and prints images/s (Ray start-up is
   timed apart and not counted) and the speed-up against serial; checks every engine wrote the
   same bytes;
3. loads the index parts as a :class:`retrieval.index.sharded.ShardedInvertedFile`, merges them
into a
   single :class:`retrieval.index.inverted_file.InvertedFile`, checks the rankings are identical and
   prints the search time ratio (sharded / single), on the world's queries and on a random
   ``--random-images`` ASMK* database with a 65,536-word codebook;
4. prints the index bytes per image (``InvertedFile.stats``) and its extrapolation to R1M
   (1,001,001 distractors + the 4,993 Revisited Oxford images) against the paper's 27.6 GB.

Run::

    .venv/bin/python benchmarks/scaleout.py [--distractors 200 --size 512 --codebook 1024]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

PAPER_R1M_GB = 27.6  # DELF-D2R-R-ASMK* index on R1M (Teichmann et al. 2019, Table 5)
R1M_IMAGES = 1_001_001 + 4_993


def _digest(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("done.json", "stage.yaml")
    }


def _time_search(index: Any, q: Any, repeat: int) -> tuple[float, Any]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = index.search(q, 100)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--distractors", type=int, default=200, help="extra database images")
    ap.add_argument("--size", type=int, default=512, help="image long side (pixels)")
    ap.add_argument("--codebook", type=int, default=1024, help="visual words K")
    ap.add_argument("--shard-size", type=int, default=32, help="images per shard")
    ap.add_argument("--random-images", type=int, default=20000, help="random index for search")
    ap.add_argument("--repeat", type=int, default=5, help="search timings: best of N")
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from dataclasses import replace

    import ray

    from gldboxes.executor import RayExecutor, Resources, SerialExecutor
    from gldboxes.synth import confs, generate_world
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.features import ImageItem
    from retrieval.features.codebook import load_codebook
    from retrieval.index import sharded as sharded_index
    from retrieval.index.aggregation import AggregatedBatch
    from retrieval.index.inverted_file import InvertedFile
    from retrieval.runner import run as runner
    from retrieval.runner import shards as shard_stages
    from retrieval.runner.conf import feature_conf, resolve_conf

    work = Path(args.work or tempfile.mkdtemp(prefix="scaleout-"))
    t0 = time.perf_counter()
    world = generate_world(
        work / "world",
        replace(confs["tiny"], distractors=args.distractors, size=args.size, workers=2),
    )
    ds = RevisitedDataset.load(world / "retrieval")
    print(
        f"world: {ds.n_db} database images, {ds.n_queries} queries, {args.size}px "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    rc = resolve_conf(codebook={"size": args.codebook, "niter": 10}, kernel="asmk_star")
    fc = feature_conf(rc)
    # Codebook once, on the training images (serial; a driver step).
    t0 = time.perf_counter()
    base = runner.run(
        world / "retrieval",
        work / "base",
        rc,
        executor=SerialExecutor(progress=False),
        shard_size=args.shard_size,
        codebook_images=world / "train" / "images",
    )
    print(
        f"codebook K={args.codebook} + one full serial run: {time.perf_counter() - t0:.1f} s "
        f"(mAP medium {base.results['medium'].map:.3f})"
    )

    items = [ImageItem(n, ds.image_path(n)) for n in ds.imlist]
    engines: list[tuple[str, Any]] = [
        ("serial", SerialExecutor(progress=False)),
        (
            "ray 1 cpu",
            RayExecutor(work_dir=work / "r1", num_cpus=1, resources=Resources(1.0), progress=False),
        ),
        (
            "ray 2 cpu",
            RayExecutor(work_dir=work / "r2", num_cpus=2, resources=Resources(1.0), progress=False),
        ),
    ]
    rates: dict[str, float] = {}
    digests: dict[str, dict[str, bytes]] = {}
    for name, engine in engines:
        t_start = time.perf_counter()
        engine.start()
        startup = time.perf_counter() - t_start
        out = work / name.replace(" ", "-")
        t0 = time.perf_counter()
        assert base.codebook is not None
        stage, fshards = shard_stages.feature_stage(fc, items, shard_size=args.shard_size)
        frep = engine.run(stage, fshards, out / "features")
        feats = shard_stages.FeatureShards.from_run(frep, fshards)
        astage, parts = shard_stages.aggregation_stage(rc, feats, base.codebook)
        engine.run(astage, parts, out / "index")
        seconds = time.perf_counter() - t0
        engine.shutdown()
        if name.startswith("ray"):
            assert not ray.is_initialized()
        rates[name] = ds.n_db / seconds
        digests[name] = _digest(out)
        print(
            f"{name:>10}: features+aggregation {ds.n_db} images in {seconds:6.1f} s = "
            f"{rates[name]:6.2f} images/s  (x{rates[name] / rates['serial']:.2f} vs serial; "
            f"engine start {startup:.1f} s not counted)"
        )
    same = all(digests[n] == digests["serial"] for n in digests)
    print(f"outputs byte-identical across engines: {same} ({len(digests['serial'])} files)")

    # Sharded vs single search on the world's index parts.
    assert base.index is not None and base.codebook is not None and base.query_features
    sivf = sharded_index.ShardedInvertedFile.load(base.index)
    single = sivf.merge()
    cb = load_codebook(base.codebook)
    q = runner.aggregate_named(rc, base.query_features, base.query_features.all_names, cb)
    ts, (i_s, _) = _time_search(sivf, q, args.repeat)
    t1, (i_1, _) = _time_search(single, q, args.repeat)
    print(
        f"world index ({sivf.stats()['parts']} parts): rankings identical "
        f"{bool(np.array_equal(i_s, i_1))}; search sharded/single time ratio {ts / t1:.2f}"
    )

    # A larger random ASMK* database: 65,536 words, D=128, parts of 5,000 images.
    rng = np.random.default_rng(0)
    k, d, n = 65536, 128, args.random_images
    words_per_image = 300
    offsets = np.arange(n + 1, dtype=np.int64) * words_per_image
    words = np.sort(
        np.stack([rng.choice(k, words_per_image, replace=False) for _ in range(n)]), axis=1
    ).astype(np.uint32)
    data = rng.integers(0, 256, (n * words_per_image, d // 8), dtype=np.uint8)
    batch = AggregatedBatch(offsets, words.ravel(), data, d)
    t0 = time.perf_counter()
    big = InvertedFile.build(batch, k, "asmk_star")
    big_parts = sharded_index.ShardedInvertedFile.build(batch, k, "asmk_star", part_size=5000)
    build = time.perf_counter() - t0
    qb = AggregatedBatch(
        offsets[:51], words.ravel()[: 50 * words_per_image], data[: 50 * words_per_image] ^ 1, d
    )
    ts, (i_s, s_s) = _time_search(big_parts, qb, args.repeat)
    t1, (i_1, s_1) = _time_search(big, qb, args.repeat)
    print(
        f"random index {n} images x {words_per_image} words, K={k}, "
        f"{len(big_parts.parts)} parts (built in {build:.1f} s): rankings identical "
        f"{bool(np.array_equal(i_s, i_1) and np.array_equal(s_s, s_1))}; 50 queries top-100 "
        f"sharded {ts * 1e3:.1f} ms vs single {t1 * 1e3:.1f} ms = ratio {ts / t1:.2f}"
    )

    # Scale estimate.
    st = single.stats()
    fixed = single.offsets.nbytes
    per_image = (st["bytes"] - fixed) / st["images"]
    per_posting = single.id_stream.nbytes / single.n_postings + single.data.shape[1]
    r1m = per_image * R1M_IMAGES + 65537 * 8
    print(
        f"index: {st['images']} images, {st['words_per_image_mean']:.1f} words/image, "
        f"{per_image:.0f} bytes/image without the (K+1) offsets "
        f"({per_posting} B a posting + 4 B an image)"
    )
    print(
        f"R1M estimate at this words/image: {r1m / 1e9:.2f} GB vs the paper's "
        f"{PAPER_R1M_GB} GB for DELF-D2R-R-ASMK* (ratio {r1m / 1e9 / PAPER_R1M_GB:.3f}); "
        f"the paper's size corresponds to {PAPER_R1M_GB * 1e9 / R1M_IMAGES / per_posting:.0f} "
        "postings an image at our posting cost"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
