"""Build time of the retrieval-results FiftyOne dataset: 70 queries x top-100.

Writes a Revisited-style folder of small JPEGs (1,000 database images, 70 queries, seeded
ground truth), a ranking, scores and a regions CSV, starts its own mongod in a temporary folder,
then times :func:`gldboxes.views.build_retrieval_dataset` against a peer measured in the same
run: the same builder with ``fast=False``, which sends every sample through FiftyOne's public
``add_samples`` (mongoengine documents, ~5 ms a sample here) instead of one bulk insert.
Prints both times and their ratio, and the time of a rebuild skipped because the dataset is up
to date.

    .venv/bin/python benchmarks/views_retrieval.py [--queries 70] [--top-k 100] [--db 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gldboxes import fodb
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv


def make_folder(root: Path, n_db: int, n_q: int, seed: int) -> dict[str, Any]:
    """A Revisited-like folder with tiny images; returns the ground truth dict."""
    rng = np.random.default_rng(seed)
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    imlist = [f"db_{i:05d}" for i in range(n_db)]
    qimlist = [f"q_{i:03d}" for i in range(n_q)]
    for name in imlist + qimlist:
        img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "jpg" / f"{name}.jpg"), img)
    gnd = []
    for _ in range(n_q):
        perm = rng.permutation(n_db)
        gnd.append(
            {
                "bbx": [8.0, 6.0, 50.0, 40.0],
                "easy": perm[:8].tolist(),
                "hard": perm[8:20].tolist(),
                "junk": perm[20:24].tolist(),
            }
        )
    regions = {n: [Box(0.1, 0.1, 0.6, 0.7, 0.8), Box(0.3, 0.2, 0.9, 0.9, 0.4)] for n in imlist}
    write_boxes_csv(root / "regions.csv", regions, with_score=True)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--db", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="views-bench-") as tmp:
        root = Path(tmp) / "bench"
        gnd = make_folder(root, args.db, args.queries, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        ranks = np.stack([rng.permutation(args.db) for _ in range(args.queries)], axis=1)
        scores = np.sort(rng.random(ranks.shape), axis=0)[::-1]
        regions = read_boxes_csv(root / "regions.csv")
        from retrieval.evaluation.evaluate import evaluate_protocols

        aps = {p: r.aps for p, r in evaluate_protocols(ranks, gnd["gnd"]).items()}

        with fodb.database(Path(tmp) / "db", use_env=False):
            t0 = time.perf_counter()
            import fiftyone  # noqa: F401

            from retrieval.evaluation.view import build_retrieval_dataset

            t_import = time.perf_counter() - t0
            kw = dict(
                gnd=gnd,
                image_root=root,
                ranks=ranks,
                scores=scores,
                aps=aps,
                regions=regions,
                top_k=args.top_k,
            )
            # Warm-up (first DB round trips, schema creation) on a small slice.
            build_retrieval_dataset(name="warmup", **{**kw, "top_k": 2})

            t0 = time.perf_counter()
            ds = build_retrieval_dataset(name="bench", overwrite=True, **kw)
            t_ours = time.perf_counter() - t0
            n = len(ds)

            t0 = time.perf_counter()
            build_retrieval_dataset(name="bench", **kw)
            t_skip = time.perf_counter() - t0

            # Peer: the same builder sending every sample through FiftyOne's add_samples.
            t0 = time.perf_counter()
            peer = build_retrieval_dataset(name="bench-peer", fast=False, **kw)
            t_peer = time.perf_counter() - t0
            if len(peer) != n:
                raise RuntimeError(f"peer built {len(peer)} samples, ours {n}")
            fodb.disconnect_fiftyone()

    print(
        f"retrieval dataset: {args.queries} queries x top-{args.top_k} = {n} samples "
        f"(1 query + {args.top_k} results per query, 3 protocol labels, regions, APs)"
    )
    print(f"  import fiftyone                     {t_import:7.2f} s")
    print(f"  build_retrieval_dataset (ours)      {t_ours:7.2f} s  ({n / t_ours:,.0f} samples/s)")
    print(f"  peer: same builder, fast=False      {t_peer:7.2f} s  (every sample via add_samples)")
    print(f"  rebuild skipped (up to date)        {t_skip:7.2f} s")
    print(f"  ratio peer / ours                   {t_peer / t_ours:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
