"""Spatial verification per query: ours vs faiss matching + ``cv2.estimateAffine2D`` (the peer).

Every side verifies the same pairs (per query, its shortlist) with the same matching rules and
RANSAC settings (3-point affine samples, the conf's threshold, 1000 trials):

* ``ours``: :func:`retrieval.verification.verify_many` per query, ``backend="numba"`` (the
  default): one faiss ``pairwise_L2sqr`` SGEMM per pair, compiled nearest-neighbour, mutual and
  ratio rules on it, a compiled seeded RANSAC; a query's candidates batched, runs of them spread
  over the threads;
* ``ours, numpy``: the same with ``backend="numpy"`` (the previous default: two ``faiss.knn``
  calls for a mutual ratio test, RANSAC vectorised in numpy); same inlier counts;
* ``peer``: the peer's own code at its best settings: ``faiss.knn`` (k=2 for the ratio test,
  thresholds on faiss' squared distances) and a second ``faiss.knn`` the other way for the
  mutual check, then ``cv2.estimateAffine2D`` (C++ RANSAC, ``confidence`` 0.99 and
  ``refineIters`` 0 by default: it stops early and skips the refinement; not seedable per call,
  so its inlier counts differ a little); pairs spread over the same threads;
* ``naive`` (1 thread only, ``--naive-queries``): a scipy k-d tree and a Python loop over the
  trials (:func:`retrieval.verification.verify_pair_naive`); same inlier counts as ours.

Thread counts are enforced, not requested: for each count N in ``--threads`` the benchmark
re-runs itself in a child process pinned to N CPUs (``sched_setaffinity`` before any import,
so every thread it ever starts inherits the mask) with ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` = N; inside, both sides use N pool threads
with faiss/OpenMP and OpenCV at one thread each. The output prints each method's CPU / wall
ratio (at most N). Every timing is the best of ``--repeats`` runs, methods interleaved; the
machine's load average is printed (CPU seconds are the steadier figure on a shared machine).

Data:

* synthetic (default): per query, ``--top-n`` database images of ``--features`` features;
  every database image holds noisy copies of 5-30% of the query's descriptors at random
  places (putative matches that are outliers) and 1 in 10 also shares 15-60 features under an
  affine map (inliers);
* ``--dataset DIR --ranks NPY --db-features H5 --query-features H5``: a Revisited dataset,
  its first-stage ranking and features (e.g. the README's real-photo run): per query the union
  of the protocols' top-N heads (what ``--verify`` verifies); also prints mAP before and after
  verification for ours and for the peer.

Usage (from the repository root)::

    .venv/bin/python benchmarks/verification_speed.py --queries 3
    F=runs/real/features/rootsift-n1000 R=runs/real/results
    .venv/bin/python benchmarks/verification_speed.py --dataset ../shared/data/real/mini_rparis6k \\
        --db-features $F/mini_rparis6k-db.h5 --query-features $F/mini_rparis6k-query.h5 \\
        --ranks $R/asmk_star-k1024-rootsift-n1000-landmark_photos-68483882-mini_rparis6k/ranks.npy
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ours", "ours, numpy", "peer", "naive")


def _pin(n: int) -> None:
    """Restrict this process (and every thread it will start) to its first ``n`` CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SystemExit(f"--threads {n}: only {len(cpus)} CPUs available")
    os.sched_setaffinity(0, set(cpus[:n]))


def _unit(rng: Any, n: int, d: int) -> Any:
    import numpy as np

    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_query(rng: Any, n_db: int, n_feat: int, dim: int) -> tuple[Any, list[Any]]:
    """One query's features and its ``n_db`` shortlisted database images' features."""
    import numpy as np

    from retrieval.verification import Features

    q = Features(rng.uniform(0, 1024, (n_feat, 2)), _unit(rng, n_feat, dim))
    db = []
    for i in range(n_db):
        n_out = int(rng.uniform(0.05, 0.30) * n_feat)
        n_in = int(rng.integers(15, 61)) if i % 10 == 0 else 0
        src = rng.permutation(n_feat)[: n_out + n_in]
        noise = 0.15 / np.sqrt(dim) * rng.standard_normal((src.size, dim)).astype(np.float32)
        desc = q.descriptors[src] + noise
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        kp = rng.uniform(0, 1024, (src.size, 2))
        a = np.array([[0.8, 0.1], [-0.1, 0.9]]) * rng.uniform(0.7, 1.3)
        kp[:n_in] = q.keypoints[src[:n_in]] @ a.T + rng.uniform(-50, 50, 2)
        kp[:n_in] += rng.normal(0, 1.0, (n_in, 2))
        n_rest = n_feat - src.size
        db.append(
            Features(
                np.concatenate([kp, rng.uniform(0, 1024, (n_rest, 2))]),
                np.concatenate([desc, _unit(rng, n_rest, dim)]).astype(np.float32),
            )
        )
    return q, db


def peer_pair(q: Any, d: Any, conf: Any, confidence: float, refine: int) -> int:
    """The peer on one pair: faiss.knn matching, then cv2.estimateAffine2D; inliers (0 below
    ``conf.min_inliers``)."""
    import cv2
    import faiss
    import numpy as np

    a, b = q.descriptors, d.descriptors
    if len(a) == 0 or len(b) == 0:
        return 0
    k = 2 if conf.ratio is not None and len(b) > 1 else 1
    dist, nn = faiss.knn(a, b, k)  # squared L2
    ok = np.ones(len(a), bool)
    if conf.max_distance is not None:
        ok &= dist[:, 0] < conf.max_distance**2
    if k == 2:
        ok &= dist[:, 0] < conf.ratio**2 * dist[:, 1]
    if conf.mutual:
        back = faiss.knn(b, a, 1)[1][:, 0]
        ok &= back[nn[:, 0]] == np.arange(len(a))
    i = np.nonzero(ok)[0]
    if len(i) < max(conf.min_matches, 3):
        return 0
    _, mask = cv2.estimateAffine2D(
        q.keypoints[i],
        d.keypoints[nn[i, 0]],
        method=cv2.RANSAC,
        ransacReprojThreshold=conf.threshold * float(getattr(d, "scale", 1.0)),
        maxIters=conf.trials,
        confidence=confidence,
        refineIters=refine,
    )
    n = 0 if mask is None else int(mask.sum())
    return n if n >= conf.min_inliers else 0


def _one_thread() -> None:
    import cv2
    import faiss

    faiss.omp_set_num_threads(1)
    cv2.setNumThreads(1)


def _time_methods(
    queries: Sequence[tuple[Any, list[Any]]],
    conf: Any,
    threads: int,
    repeats: int,
    naive_queries: int,
    confidence: float,
    refine: int,
) -> tuple[dict[str, tuple[float, float]], dict[str, list[list[int]]]]:
    """Per method: (best wall s per query, best CPU s per query) and the inlier counts."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from retrieval.verification import verify_many, verify_pair_naive

    def ours(backend: str) -> Callable[[], list[list[int]]]:
        return lambda: [
            verify_many([(q, d) for d in ds], conf, threads, backend=backend) for q, ds in queries
        ]

    pool = ThreadPoolExecutor(max_workers=threads, initializer=_one_thread)
    _one_thread()

    def peer() -> list[list[int]]:
        return [
            list(pool.map(lambda d, q=q: peer_pair(q, d, conf, confidence, refine), ds))
            for q, ds in queries
        ]

    def naive() -> list[list[int]]:
        out = []
        for q, ds in queries[:naive_queries]:
            n = [verify_pair_naive(q, d, conf).num_inliers for d in ds]
            out.append([x if x >= conf.min_inliers else 0 for x in n])
        return out

    fns: dict[str, Callable[[], list[list[int]]]] = {
        "ours": ours("numba"),
        "ours, numpy": ours("numpy"),
        "peer": peer,
    }
    # warm-up: numba compilation (cached on disk), faiss/OpenCV first calls
    warm = [(queries[0][0], queries[0][1][:2])]
    verify_many([(q, d) for q, ds in warm for d in ds], conf, 1)
    peer_pair(warm[0][0], warm[0][1][0], conf, confidence, refine)
    best: dict[str, list[float]] = {m: [np.inf, np.inf] for m in METHODS}
    counts: dict[str, list[list[int]]] = {}
    for r in range(repeats):
        run = dict(fns)
        if r == 0 and threads == 1 and naive_queries > 0:
            run["naive"] = naive
        for name, fn in run.items():
            w0, c0 = time.perf_counter(), time.process_time()
            counts[name] = fn()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            nq = naive_queries if name == "naive" else len(queries)
            best[name][0] = min(best[name][0], w / nq)
            best[name][1] = min(best[name][1], c / nq)
    pool.shutdown()
    timing = {m: (w, c) for m, (w, c) in best.items() if np.isfinite(w)}
    return timing, counts


def _print_timing(
    timing: dict[str, tuple[float, float]],
    counts: dict[str, list[list[int]]],
    threads: int,
    n_pairs: int,
    n_q: int,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(
        f"-- {threads} thread(s): pinned to CPU(s) {cpus}, {n_q} queries, {n_pairs} pairs; "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'method':<12} {'wall s/query':>12} {'CPU s/query':>12} {'CPU/wall':>9}")
    for m, (w, c) in timing.items():
        print(f"{m:<12} {w:12.4f} {c:12.4f} {c / w:9.2f}")
    ow, oc = timing["ours"]
    pw, pc = timing["peer"]
    nw, nc = timing["ours, numpy"]
    print(
        f"ours vs peer (faiss.knn + cv2.estimateAffine2D): {pw / ow:.2f}x wall, {pc / oc:.2f}x "
        f"CPU; vs ours, numpy: {nw / ow:.2f}x wall, {nc / oc:.2f}x CPU (>1: ours is faster)"
    )
    same = counts["ours"] == counts["ours, numpy"]
    line = f"inlier counts: ours == ours, numpy: {same}"
    if "naive" in counts:
        k = len(counts["naive"])
        line += f"; ours == naive ({k} queries): {counts['ours'][:k] == counts['naive']}"
    flat_o = [x for q in counts["ours"] for x in q]
    flat_p = [x for q in counts["peer"] for x in q]
    agree = sum((a > 0) == (b > 0) for a, b in zip(flat_o, flat_p, strict=True))
    line += f"; verified-or-not agrees with the peer on {agree}/{len(flat_o)} pairs"
    print(line)


def _dataset_queries(args: argparse.Namespace) -> tuple[Any, list[tuple[Any, list[Any]]], Any]:
    """(dataset, per query (features, candidates' features), per query candidate indices)."""
    import numpy as np

    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import protocol_gnd
    from retrieval.verification import read_features_h5
    from retrieval.verification.rerank import _protocol_head

    ds = RevisitedDataset.load(args.dataset)
    ranks = np.load(args.ranks, allow_pickle=False)
    qf = read_features_h5(args.query_features, ds.qimlist, max_side=args.max_side)
    dbf = read_features_h5(args.db_features, ds.imlist, max_side=args.max_side)
    pgnd = {p: protocol_gnd(ds.gnd, p) for p in ("easy", "medium", "hard")}
    nq = min(args.queries_limit or ds.n_queries, ds.n_queries)
    queries, heads = [], []
    for q in range(nq):
        col = ranks[:, q]
        union: set[int] = set()
        for p in pgnd:
            junk = np.asarray(pgnd[p][q]["junk"], dtype=np.int64)
            union.update(int(v) for v in col[_protocol_head(col, junk, args.top_n)])
        idx = sorted(union)
        heads.append(idx)
        queries.append((qf[ds.qimlist[q]], [dbf[ds.imlist[i]] for i in idx]))
    return ds, queries, (ranks, heads)


def _print_map(ds: Any, extra: Any, counts: dict[str, list[list[int]]], top_n: int) -> None:
    """mAP before and after verification, with ours' and the peer's inlier counts."""
    import numpy as np

    from retrieval.evaluation.evaluate import evaluate_protocols, protocol_gnd
    from retrieval.verification.rerank import _protocol_head, _rerank_order

    ranks, heads = extra
    nq = len(heads)
    gnd = ds.gnd[:nq]
    r = ranks[:, :nq]
    before = evaluate_protocols(r, gnd)
    rows = {"first stage": {p: 100 * before[p].map for p in before}}
    for name in ("ours", "peer"):
        inl = {(q, d): n for q in range(nq) for d, n in zip(heads[q], counts[name][q], strict=True)}
        rows[f"+SV {name}"] = {}
        for p in ("easy", "medium", "hard"):
            pg = protocol_gnd(gnd, p)
            new = r.copy()
            for q in range(nq):
                col = r[:, q]
                h = _protocol_head(col, np.asarray(pg[q]["junk"], dtype=np.int64), top_n)
                ids = col[h]
                o = _rerank_order(np.array([inl[(q, int(d))] for d in ids], np.int64), None)
                rest = np.ones(col.size, bool)
                rest[h] = False
                new[:, q] = np.concatenate([ids[o], col[rest]])
            rows[f"+SV {name}"][p] = 100 * evaluate_protocols(new, gnd, protocols=[p])[p].map
    print(f"mAP (%), {nq} queries, top-{top_n}: {'E':>6} {'M':>6} {'H':>6}")
    for k, v in rows.items():
        print(f"  {k:<16} {v['easy']:6.2f} {v['medium']:6.2f} {v['hard']:6.2f}")


def child(args: argparse.Namespace) -> None:
    """One thread count, pinned by the parent: load data, time, print."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from retrieval.features import confs
    from retrieval.verification import VerificationConf

    preset = dict(confs[args.preset].get("verification") or {}) if args.preset else {}
    if args.max_distance is not None:
        preset["max_distance"] = args.max_distance
    conf = VerificationConf(**preset)
    extra = ds = None
    if args.dataset:
        ds, queries, extra = _dataset_queries(args)
        what = f"dataset {args.dataset}"
    else:
        rng = np.random.default_rng(args.seed)
        queries = [
            synthetic_query(rng, args.top_n, args.features, args.dim) for _ in range(args.queries)
        ]
        what = f"synthetic, {args.features} features of dim {args.dim}"
    n_pairs = sum(len(ds_) for _, ds_ in queries)
    if args.header:
        from retrieval.verification import match_descriptors

        k = [
            len(
                match_descriptors(
                    queries[0][0].descriptors,
                    d.descriptors,
                    max_distance=conf.max_distance,
                    ratio=conf.ratio,
                    mutual=conf.mutual,
                )
            )
            for d in queries[0][1]
        ]
        print(f"{what}; {conf}")
        print(
            f"putative matches per pair (query 1): median {int(np.median(k))}, max {max(k)}; "
            f"peer: cv2.estimateAffine2D confidence {args.confidence}, refineIters {args.refine}"
        )
    timing, counts = _time_methods(
        queries,
        conf,
        args.pinned,
        args.repeats,
        args.naive_queries,
        args.confidence,
        args.refine,
    )
    _print_timing(timing, counts, args.pinned, n_pairs, len(queries))
    if ds is not None and args.header:
        _print_map(ds, extra, counts, args.top_n)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--queries", type=int, default=3, help="synthetic queries")
    ap.add_argument("--top-n", type=int, default=100, help="shortlist size (paper: 100)")
    ap.add_argument("--features", type=int, default=1000, help="synthetic features per image")
    ap.add_argument("--dim", type=int, default=128, help="synthetic descriptor dimension")
    ap.add_argument(
        "--preset",
        default="rootsift",
        help="features preset whose verification defaults to use ('' = the paper's DELF rule)",
    )
    ap.add_argument("--max-distance", type=float, default=None, help="override: 1-NN L2 bound")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", help="Revisited dataset folder (real mode)")
    ap.add_argument("--ranks", help="first-stage ranks.npy (n_db, n_q) (real mode)")
    ap.add_argument("--db-features", help="database features HDF5 (real mode)")
    ap.add_argument("--query-features", help="query features HDF5 (real mode)")
    ap.add_argument("--max-side", type=int, default=1024, help="features' extraction size")
    ap.add_argument("--queries-limit", type=int, default=0, help="real mode: first N queries")
    ap.add_argument("--naive-queries", type=int, default=1, help="queries timed with naive")
    ap.add_argument("--confidence", type=float, default=0.99, help="peer: OpenCV confidence")
    ap.add_argument("--refine", type=int, default=0, help="peer: OpenCV refineIters")
    ap.add_argument("--pinned", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--header", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dataset and not (args.ranks and args.db_features and args.query_features):
        ap.error("--dataset needs --ranks, --db-features and --query-features")
    if args.pinned:
        child(args)
        return 0
    raw = list(sys.argv[1:] if argv is None else argv)
    for i, n in enumerate(int(t) for t in args.threads.split(",")):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(n)
        env["NUMBA_NUM_THREADS"] = str(n)
        cmd = [sys.executable, __file__, *raw, "--pinned", str(n)] + (
            ["--header"] if i == 0 else []
        )
        subprocess.run(cmd, env=env, check=True, preexec_fn=functools.partial(_pin, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
