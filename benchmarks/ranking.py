"""The search's inner costs: nanoseconds a posting touched and the full ranking's sort.

One run, one thread (env ``BENCH_THREADS``, default 1, set before numpy loads), best of
``--repeats``, process CPU time:

* **postings**: an ASMK* index of ``--images`` synthetic aggregated images (K=4,096, the
  generator of ``benchmarks/asmk_peer.py``); per query the top-100 and the full ranking, and the
  top-100's time per posting the query touches;
* **sort**: the full ranking of one query's 100k scores by our radix sort
  (:func:`retrieval.index._ranking.rank_descending`) against numpy's
  ``np.argsort(-s, kind="stable")`` (the peer: the same order).

    .venv/bin/python benchmarks/ranking.py [--images 100000 --queries 20]
"""

from __future__ import annotations

import os

_THREADS = os.environ.get("BENCH_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["main"]


def _best(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # compiled loops loaded, buffers warm
    out = np.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out = min(out, time.process_time() - t0)
    return float(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from asmk_peer import synthetic_aggregated

    from retrieval.index._ranking import rank_descending
    from retrieval.index.inverted_file import InvertedFile

    rng = np.random.default_rng(args.seed)
    k, n = 4096, args.images
    words = np.stack([rng.choice(k, 400, replace=False) for _ in range(250)]).astype(np.int64)
    bits = rng.integers(0, 256, (*words.shape, 16), dtype=np.uint8)
    db = synthetic_aggregated(rng, rng.integers(0, 250, n), words, bits, 300, k)
    q = synthetic_aggregated(rng, rng.integers(0, 250, args.queries), words, bits, 300, k)
    ivf = InvertedFile.build(db, k, "asmk_star")
    qs = q.images()
    off = np.asarray(ivf.offsets)
    touched = sum(int(np.diff(off)[np.asarray(a.words, np.int64)].sum()) for a in qs)
    rows: list[tuple[str, float, float | None, str]] = []
    for kk, name in ((100, "top 100"), (None, "full ranking")):

        def each(kk: int | None = kk) -> None:
            for a in qs:
                ivf.search([a], kk, num_threads=1)

        t = _best(each, args.repeats)
        rows.append((f"search per query, {name} (ms)", 1e3 * t / len(qs), None, ""))
        if kk == 100:
            rows.append(("  top 100: ns a posting touched", 1e9 * t / touched, None, ""))

    ids, sc = ivf.search([qs[0]], None, num_threads=1)
    s = np.zeros((1, n))
    s[0, ids[0]] = sc[0]
    out = np.empty(s.shape, np.int64)
    ours = _best(lambda: rank_descending(np.ascontiguousarray(s + 0.0).view(np.uint64), out), 5)
    peer = _best(lambda: np.argsort(-s, axis=1, kind="stable"), args.repeats)
    if not np.array_equal(out, np.argsort(-s, axis=1, kind="stable")):
        raise RuntimeError("the radix ranking differs from the stable argsort")
    rows.append((f"full ranking of {n} scores (ms)", 1e3 * ours, 1e3 * peer, "np.argsort stable"))

    print(
        f"{n} images, K={k}, {len(qs)} queries ({touched / len(qs):.0f} postings a query); "
        f"1 thread (BLAS/OpenMP {_THREADS}); best of {args.repeats}, process CPU time"
    )
    print("\n| measure | ours | peer | peer / ours |")
    print("|---|---|---|---|")
    for name, a, b, peer_name in rows:
        if b is None:
            print(f"| {name} | {a:.2f} | | |")
        else:
            print(f"| {name} | {a:.2f} | {b:.2f} ({peer_name}) | {b / a:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
