"""Benchmark: cost per query of AML re-ranking (Tolias et al.) against its peers, in one run.

Random non-negative activation maps shaped like a backbone's last map (default: ResNet at
1024 pixels, 32 x 24 x 2048 cells, stored quantised as the database maps are) stand in for the
top-N database images of a query. Measured in the same run:

* **AML re-ranking** of the top N (window search + refinement + window R-MAC + whitening),
  :func:`retrieval.rmac.aml_rerank`;
* its peer, the **initial R-MAC search** of one query over a database of ``--db`` vectors
  (one matrix product and a sort), :func:`retrieval.rmac.search`;
* the vectorised localisation :func:`retrieval.rmac.aml_localize` against the loop-for-loop
  reference :func:`retrieval.rmac.aml_localize_loop` (a port of the authors' ``aml.c`` in
  Python) on a few maps, with the check that both find the same windows.

    .venv/bin/python benchmarks/aml_rerank.py [--top 100 --height 24 --width 32 --channels 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from retrieval.rmac import (
    aml_localize,
    aml_localize_loop,
    aml_rerank,
    learn_whitening,
    search,
)


def _maps(rng: np.random.Generator, n: int, h: int, w: int, c: int) -> list[np.ndarray]:
    """Sparse ReLU-like activations, quantised to 8 bits as the database maps are stored."""
    out = []
    for _ in range(n):
        x = np.maximum(rng.normal(-0.5, 1.0, (h, w, c)), 0).astype(np.float32)
        scale = x.max(axis=(0, 1))
        q = np.round(x / np.where(scale > 0, scale, 1) * 255) / 255 * scale
        out.append(q.astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=100, help="images re-ranked per query (N)")
    ap.add_argument("--height", type=int, default=24, help="map height in cells")
    ap.add_argument("--width", type=int, default=32, help="map width in cells")
    ap.add_argument("--channels", type=int, default=2048, help="map channels C")
    ap.add_argument("--db", type=int, default=5000, help="database size of the search peer")
    ap.add_argument("--queries", type=int, default=3, help="queries timed")
    ap.add_argument("--loop-maps", type=int, default=2, help="maps for the loop reference")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    h, w, c = args.height, args.width, args.channels
    maps = _maps(rng, args.top, h, w, c)
    wh = learn_whitening(rng.normal(size=(4 * c, c)).astype(np.float32))
    db = rng.normal(size=(args.db, c)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)

    t_aml, t_search = [], []
    for _ in range(args.queries):
        q_mac = maps[0][3:15, 5:20].max(axis=(0, 1)) + rng.random(c).astype(np.float32) * 0.1
        q_rmac = rng.normal(size=c).astype(np.float32)
        q_rmac /= np.linalg.norm(q_rmac)
        t0 = time.perf_counter()
        search(q_rmac[None], db)
        t1 = time.perf_counter()
        aml_rerank(q_rmac, q_mac, 0.75, np.arange(args.top), maps, wh, levels=3)
        t2 = time.perf_counter()
        t_search.append(t1 - t0)
        t_aml.append(t2 - t1)
    aml_s, search_s = float(np.median(t_aml)), float(np.median(t_search))
    print(f"maps {h}x{w}x{c}, top N = {args.top}, database {args.db}, {args.queries} queries")
    print(
        f"AML re-ranking (+window R-MAC): {aml_s * 1e3:9.1f} ms/query "
        f"({aml_s / args.top * 1e3:.2f} ms per re-ranked image)"
    )
    print(f"R-MAC search (peer):            {search_s * 1e3:9.1f} ms/query")
    print(f"ratio AML / search:             {aml_s / search_s:9.1f}x")

    small = np.stack(maps[: args.loop_maps])
    q = small[0][3:15, 5:20].max(axis=(0, 1))
    t0 = time.perf_counter()
    boxes, _ = aml_localize(small, q, qratio=0.75)
    t1 = time.perf_counter()
    ref = [aml_localize_loop(m, q, qratio=0.75)[0] for m in small]
    t2 = time.perf_counter()
    same = all(np.array_equal(b, r) for b, r in zip(boxes, ref, strict=True))
    print(
        f"localisation of {args.loop_maps} maps: vectorised {(t1 - t0) * 1e3:.1f} ms, "
        f"loop reference {(t2 - t1) * 1e3:.1f} ms, speed-up {(t2 - t1) / (t1 - t0):.1f}x, "
        f"same windows: {same}"
    )


if __name__ == "__main__":
    main()
