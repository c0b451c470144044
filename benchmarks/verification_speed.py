"""Spatial verification speed: ours (faiss + vectorised RANSAC + threads) vs a naive per-pair loop.

Both sides verify the same top-N shortlists with the paper's settings (1-NN, L2 < max distance,
affine RANSAC with 3-point samples, 10 px, 1000 trials, seed 0) and must give the same inlier
counts (same seeded samples). Peers measured in the same run:

* ``naive``: the authors' way, per pair and serial: a scipy k-d tree for matching and a Python
  loop over the 1000 RANSAC trials (:func:`retrieval.verification.verify_pair_naive`);
* ``ours, 1 thread``: the vectorised code without the thread pool, faiss and OpenCV held to one
  thread (``faiss.omp_set_num_threads(1)``, ``cv2.setNumThreads(1)``);
* ``opencv`` (the peer): the same faiss matching (exact 1-NN/2-NN, the conf's distance, ratio
  and mutual rules: :func:`retrieval.verification.match_descriptors`) + ``cv2.estimateAffine2D``
  (C++ RANSAC, stops early at 99.9% confidence, not seedable per call, so its inlier counts may
  differ), pairs spread over the same number of threads as ours (faiss one thread inside each);
  ``opencv, 1 thread`` the same serially on one thread.

Two data sources:

* synthetic (default): per query, ``--top-n`` database images of ``--features`` features each;
  every database image holds noisy copies of 5-30% of the query's descriptors at random places
  (putative matches that are outliers) and 1 in 10 also shares 15-60 features under an affine
  map (inliers), so pairs have realistic putative-match counts;
* ``--world OUT/retrieval --run-dir DIR``: the synthetic landmark world end to end: RootSIFT +
  ASMK* first stage (``retrieval.runner.run.run``), then spatial verification of the top-N under
  every
  protocol in one pass; prints mAP before/after and seconds per query.

Usage::

    .venv/bin/python benchmarks/verification_speed.py --queries 3
    .venv/bin/python benchmarks/verification_speed.py --world /tmp/w/retrieval --run-dir /tmp/run \
        --max-distance 0.5 --naive-queries 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.verification import (
    Features,
    VerificationConf,
    match_descriptors,
    match_descriptors_naive,
    rerank,
    rerank_revisited,
    verify_pair_naive,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_query(
    rng: np.random.Generator, n_db: int, n_feat: int, dim: int
) -> tuple[Features, dict[int, Features], list[int]]:
    """One query and its ``n_db`` shortlisted database images (ids 0..n_db-1)."""
    q = Features(rng.uniform(0, 1024, (n_feat, 2)), _unit(rng, n_feat, dim))
    db: dict[int, Features] = {}
    for i in range(n_db):
        n_out = int(rng.uniform(0.05, 0.30) * n_feat)
        n_in = int(rng.integers(15, 61)) if i % 10 == 0 else 0
        src = rng.permutation(n_feat)[: n_out + n_in]
        desc = q.descriptors[src] + 0.15 / np.sqrt(dim) * rng.standard_normal(
            (src.size, dim)
        ).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        kp = rng.uniform(0, 1024, (src.size, 2))
        a = np.array([[0.8, 0.1], [-0.1, 0.9]]) * rng.uniform(0.7, 1.3)
        kp[:n_in] = q.keypoints[src[:n_in]] @ a.T + rng.uniform(-50, 50, 2)
        kp[:n_in] += rng.normal(0, 1.0, (n_in, 2))
        n_rest = n_feat - src.size
        db[i] = Features(
            np.concatenate([kp, rng.uniform(0, 1024, (n_rest, 2))]),
            np.concatenate([desc, _unit(rng, n_rest, dim)]),
        )
    return q, db, list(rng.permutation(n_db))


def _opencv_pair(q: Features, d: Features, conf: VerificationConf) -> int:
    import cv2

    m = match_descriptors(
        q.descriptors,
        d.descriptors,
        max_distance=conf.max_distance,
        ratio=conf.ratio,
        mutual=conf.mutual,
    )
    if len(m) < conf.min_matches:
        return 0
    _, mask = cv2.estimateAffine2D(
        q.keypoints[m[:, 0]].astype(np.float64),
        d.keypoints[m[:, 1]].astype(np.float64),
        ransacReprojThreshold=conf.threshold,
        maxIters=conf.trials,
        confidence=0.999,
        refineIters=0,
    )
    return 0 if mask is None else int(mask.sum())


def _time_queries(
    queries: Sequence[tuple[Features, dict[Any, Features], list[Any]]],
    top_n: int,
    conf: VerificationConf,
    workers: int,
) -> dict[str, Any]:
    """Wall and CPU seconds per query of ours (threads, 1 thread), naive and OpenCV."""
    out: dict[str, Any] = {}
    inl: dict[str, list[list[int]]] = {}

    def ours(nw: int) -> list[list[int]]:
        return [
            sorted(rerank(q, db, short, top_n=top_n, conf=conf, num_workers=nw).inliers.tolist())
            for q, db, short in queries
        ]

    def naive() -> list[list[int]]:
        return [
            sorted(verify_pair_naive(q, db[i], conf).num_inliers for i in short[:top_n])
            for q, db, short in queries
        ]

    def opencv(nw: int) -> list[list[int]]:
        from concurrent.futures import ThreadPoolExecutor

        import cv2
        import faiss

        def one_thread() -> None:
            faiss.omp_set_num_threads(1)

        cv2.setNumThreads(1)  # parallel over pairs, like ours, not inside estimateAffine2D
        pairs = [(q, db[i]) for q, db, short in queries for i in short[:top_n]]
        with ThreadPoolExecutor(max_workers=nw, initializer=one_thread) as pool:
            flat = list(pool.map(lambda p: _opencv_pair(p[0], p[1], conf), pairs))
        out, k = [], 0
        for _, _, short in queries:
            n = len(short[:top_n])
            out.append(flat[k : k + n])
            k += n
        return out

    def single_thread(fn: Any) -> Any:
        def run() -> Any:
            import cv2
            import faiss

            before, cv_before = faiss.omp_get_max_threads(), cv2.getNumThreads()
            faiss.omp_set_num_threads(1)
            cv2.setNumThreads(1)
            try:
                return fn()
            finally:
                faiss.omp_set_num_threads(before)
                cv2.setNumThreads(cv_before)

        return run

    peers = {
        "ours": lambda: ours(workers),
        "ours, 1 thread": single_thread(lambda: ours(1)),
        "opencv": lambda: opencv(workers),
        "opencv, 1 thread": single_thread(lambda: opencv(1)),
        "naive": single_thread(naive),
    }
    for name, fn in peers.items():
        w0, c0 = time.perf_counter(), time.process_time()
        inl[name] = fn()
        out[name] = (
            (time.perf_counter() - w0) / len(queries),
            (time.process_time() - c0) / len(queries),
        )
    out["same_inliers"] = inl["ours"] == inl["naive"]
    return out


def _print_speed(timing: dict[str, Any], top_n: int, n_q: int, workers: int) -> None:
    print(
        f"spatial verification, top-{top_n}, {n_q} queries, {workers} threads, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'method':<16} {'wall s/query':>12} {'naive/it':>9} {'CPU s/query':>12} {'naive/it':>9}"
    )
    nw, nc = timing["naive"]
    for k in ("ours", "ours, 1 thread", "opencv", "opencv, 1 thread", "naive"):
        w, c = timing[k]
        print(f"{k:<16} {w:12.3f} {nw / w:8.1f}x {c:12.3f} {nc / c:8.1f}x")
    ow, o1 = (
        timing["opencv"][0] / timing["ours"][0],
        timing["opencv, 1 thread"][0] / timing["ours, 1 thread"][0],
    )
    print(
        f"vs the peer (faiss matching + cv2.estimateAffine2D): {ow:.2f}x at {workers} threads, "
        f"{o1:.2f}x on 1 thread (wall time; >1 means ours is faster)"
    )
    print(f"ours and naive give identical inlier counts: {timing['same_inliers']}")


def run_synthetic(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    queries = [
        synthetic_query(rng, args.top_n, args.features, args.dim) for _ in range(args.queries)
    ]
    conf = VerificationConf(max_distance=args.max_distance)
    k = [
        len(
            match_descriptors_naive(
                queries[0][0].descriptors, f.descriptors, max_distance=conf.max_distance
            )
        )
        for f in queries[0][1].values()
    ]
    print(
        f"synthetic: {args.features} features of dim {args.dim}; putative matches per pair "
        f"median {int(np.median(k))}, max {max(k)}"
    )
    _print_speed(
        _time_queries(queries, args.top_n, conf, args.workers),
        args.top_n,
        args.queries,
        args.workers,
    )


def run_world(args: argparse.Namespace) -> None:
    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import evaluate_protocols
    from retrieval.runner import run as runner

    ds = RevisitedDataset.load(args.world)
    train = Path(args.world).parent / "train" / "images"
    res = runner.run(
        ds.root,
        args.run_dir,
        {"features": "rootsift", "kernel": "asmk_star", "codebook": {"size": args.codebook}},
        codebook_images=train if train.is_dir() else None,
    )
    assert res.ranks is not None
    ranks = np.load(res.ranks, allow_pickle=False)
    assert res.db_features is not None and res.query_features is not None
    qf = res.query_features.read_local(ds.qimlist)
    db_names = sorted({ds.imlist[int(i)] for i in ranks[: 3 * args.top_n].ravel()})
    dbf_by_name = res.db_features.read_local(db_names)
    name_to_idx = {n: i for i, n in enumerate(ds.imlist)}
    dbf = {name_to_idx[n]: f for n, f in dbf_by_name.items()}
    conf = VerificationConf(max_distance=args.max_distance)
    gv = rerank_revisited(
        ranks,
        ds.gnd,
        [qf[n] for n in ds.qimlist],
        dbf,
        top_n=args.top_n,
        conf=conf,
        num_workers=args.workers,
    )
    before = evaluate_protocols(ranks, ds.gnd)
    print(
        f"world {ds.root}: {ds.n_db} database images, {ds.n_queries} queries; RootSIFT "
        f"ASMK* k={args.codebook}; GV top-{args.top_n}, max distance {args.max_distance}"
    )
    print(f"{'protocol':<8} {'mAP before':>10} {'mAP after':>10}")
    for p in ("easy", "medium", "hard"):
        after = evaluate_protocols(gv.ranks[p], ds.gnd, protocols=[p])[p]
        print(f"{p:<8} {100 * before[p].map:10.2f} {100 * after.map:10.2f}")
    print(
        f"one pass over all protocols: {gv.pairs} pairs, {gv.seconds_per_query:.3f} s per query "
        f"({args.workers} threads)"
    )
    n = min(args.naive_queries, ds.n_queries)
    if n > 0:
        queries = []
        for qi in range(n):
            short = [int(i) for i in ranks[: args.top_n, qi]]
            queries.append((qf[ds.qimlist[qi]], dbf, short))
        _print_speed(
            _time_queries(queries, args.top_n, conf, args.workers), args.top_n, n, args.workers
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=3, help="synthetic queries")
    ap.add_argument("--top-n", type=int, default=100, help="shortlist size (paper: 100)")
    ap.add_argument("--features", type=int, default=1000, help="features per image")
    ap.add_argument("--dim", type=int, default=128, help="descriptor dimension")
    ap.add_argument("--max-distance", type=float, default=0.9, help="1-NN L2 threshold")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", help="synthetic world's retrieval folder (end-to-end mode)")
    ap.add_argument("--run-dir", help="work folder of the end-to-end run")
    ap.add_argument("--codebook", type=int, default=512, help="visual words (end-to-end)")
    ap.add_argument(
        "--naive-queries",
        type=int,
        default=2,
        help="queries timed with the naive peer too (end-to-end)",
    )
    args = ap.parse_args(argv)
    if args.world:
        if not args.run_dir:
            ap.error("--world needs --run-dir")
        run_world(args)
    else:
        run_synthetic(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
