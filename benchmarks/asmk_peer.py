"""Our ASMK* against the ``asmk`` package (jenicek/asmk) on the same descriptors and codebook.

Both run in this one process on the same synthetic landmark descriptors, the same codebook and
the same settings (single assignment, binary ASMK*, alpha 3, tau 0, no idf, image
normalisation on), and the script prints:

* mAP of both (ground truth: database images of the query's landmark), which must agree within
  0.5 points, and how often the top-10 lists are identical;
* index build time ratio (quantise + aggregate + inverted file, theirs / ours), and the same
  without the exact assignment (one (N, D) x (D, K) GEMM both sides pay alike);
* per-query time ratio end to end (quantise + aggregate + score + rank the whole database; ours
  one query at a time and batched) and of the inverted-file search alone (aggregated query in,
  full ranking out);
* index bytes ratio (their pickled inverted file vs our ``.npy`` folder on disk).

The ``asmk`` package is not a dependency of gldboxes and this script installs nothing. To
install it into the project's virtualenv (an sdist with a Cython extension)::

    .venv/bin/pip install cython
    .venv/bin/pip install --no-deps --no-build-isolation asmk

Run (defaults: 5,000 database images, 100 queries, 300 descriptors an image, 4,096 words)::

    .venv/bin/python benchmarks/asmk_peer.py [--images 5000 --queries 100 --per-image 300]
"""

from __future__ import annotations

import os

# Thread count of BLAS / OpenMP for both sides, set before numpy loads (env BENCH_THREADS,
# default 1): on a loaded shared machine multithreaded BLAS spin-waits and small GEMMs get
# 100x slower, which would measure the machine, not the code. Same setting for both peers.
# Times are process CPU seconds (time.process_time): with one thread they do not count the
# time other jobs on a shared machine hold the core.
_THREADS = os.environ.get("BENCH_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["main", "synthetic_descriptors"]


def synthetic_descriptors(
    rng: np.random.Generator,
    n_images: int,
    per_image: int,
    landmarks: np.ndarray,
    labels: np.ndarray,
    dim: int,
    noise: float = 0.35,
    clutter: float = 0.5,
) -> list[np.ndarray]:
    """Per image: noisy copies of a random subset of its landmark's prototype descriptors plus
    random clutter, L2-normalised. landmarks: (L, P, D) prototypes; labels: (n_images,)."""
    n_proto = landmarks.shape[1]
    out = []
    n_land = int(per_image * (1 - clutter))
    for i in range(n_images):
        pick = rng.choice(n_proto, size=n_land, replace=False)
        d = landmarks[labels[i], pick] + noise * rng.standard_normal((n_land, dim))
        c = rng.standard_normal((per_image - n_land, dim))
        x = np.concatenate([d, c]).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="database images")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--per-image", type=int, default=300, help="descriptors per image")
    ap.add_argument("--landmarks", type=int, default=250)
    ap.add_argument("--codebook-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.35, help="descriptor noise (harder: 0.8)")
    ap.add_argument("--clutter", type=float, default=0.5, help="fraction of clutter descriptors")
    args = ap.parse_args(argv)

    try:
        from asmk import asmk_method, codebook, index
        from asmk import io_helpers as asmk_io
    except ImportError:
        print("the asmk package is not importable; install it as the docstring says")
        return 1
    from retrieval.evaluation.evaluate import compute_map
    from retrieval.features.codebook import train_codebook
    from retrieval.index.aggregation import aggregate_many, assign
    from retrieval.index.inverted_file import InvertedFile

    rng = np.random.default_rng(args.seed)
    d = args.dim
    protos = rng.standard_normal((args.landmarks, 400, d)).astype(np.float32)
    db_lab = rng.integers(0, args.landmarks, args.images)
    q_lab = rng.integers(0, args.landmarks, args.queries)
    t0 = time.process_time()
    hard = {"noise": args.noise, "clutter": args.clutter}
    db = synthetic_descriptors(rng, args.images, args.per_image, protos, db_lab, d, **hard)
    qs = synthetic_descriptors(rng, args.queries, args.per_image, protos, q_lab, d, **hard)
    # The codebook is trained on "another dataset": fresh images of other landmarks.
    other = rng.standard_normal((args.landmarks, 400, d)).astype(np.float32)
    n_train = min(40 * args.codebook_size, 200_000)
    tr_lab = rng.integers(0, args.landmarks, n_train // args.per_image + 1)
    train = np.concatenate(
        synthetic_descriptors(rng, tr_lab.size, args.per_image, other, tr_lab, d)
    )[:n_train]
    cb = train_codebook(train, args.codebook_size, seed=args.seed, niter=10)
    print(
        f"data: {args.images} database images, {args.queries} queries, {args.per_image} "
        f"descriptors each (D={d}), codebook {args.codebook_size} trained on {n_train} "
        f"descriptors ({time.process_time() - t0:.1f} s)"
    )
    gnd = [{"ok": np.flatnonzero(db_lab == q_lab[i]), "junk": []} for i in range(args.queries)]

    # ---------------------------------------------------------------- asmk (the peer)
    params: dict[str, Any] = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": args.codebook_size}},
        "build_ivf": {
            "kernel": {"binary": True},
            "ivf": {"use_idf": False},
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
            "search": {"topk": None},
            "similarity": {"similarity_threshold": 0.0, "alpha": 3},
        },
    }
    cdb = codebook.Codebook(index.initialize_index(None), size=args.codebook_size)
    cdb.index(cb.copy())
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    des = np.concatenate(db)
    imids = np.repeat(np.arange(args.images), [x.shape[0] for x in db])
    qdes = np.concatenate(qs)
    qimids = np.repeat(np.arange(args.queries), [x.shape[0] for x in qs])
    t0 = time.process_time()
    built = method.build_ivf(des, imids.copy())
    asmk_build = time.process_time() - t0
    t0 = time.process_time()
    cdb.quantize(des, multiple_assignment=1)
    asmk_quant = time.process_time() - t0
    t0 = time.process_time()
    _, _, asmk_ranks, _ = built.query_ivf(qdes, qimids)
    asmk_query = (time.process_time() - t0) / args.queries
    # the inverted-file search alone, on queries already quantised and aggregated
    kern, aivf = built.kernel, built.inverted_file
    sim = built.params["query_ivf"]["similarity"]
    agg_q = [kern.aggregate_image(*cdb.quantize(q, multiple_assignment=1)) for q in qs]
    t0 = time.process_time()
    for a in agg_q:
        aivf.search(*a, similarity_func=lambda *x: kern.similarity(*x, **sim), topk=None)
    asmk_search = (time.process_time() - t0) / args.queries

    # ---------------------------------------------------------------- ours
    # numba compiles our inner loops on first use and caches them on disk (the peer's Cython is
    # compiled at install time): load or compile them outside the timed sections, and say so.
    t0 = time.perf_counter()
    warm = aggregate_many(db[:2], cb, "asmk_star")
    InvertedFile.build(warm, args.codebook_size, "asmk_star").search(warm)
    print(f"our compiled kernels loaded (or compiled) in {time.perf_counter() - t0:.2f} s")
    t0 = time.process_time()
    batch = aggregate_many(db, cb, "asmk_star")
    ivf = InvertedFile.build(batch, args.codebook_size, "asmk_star")
    our_build = time.process_time() - t0
    t0 = time.process_time()
    assign(des, cb)
    our_quant = time.process_time() - t0
    t0 = time.process_time()
    our_ranks = np.concatenate([ivf.search(aggregate_many([q], cb, "asmk_star"))[0] for q in qs])
    our_query_single = (time.process_time() - t0) / args.queries
    t0 = time.process_time()
    our_ranks_b, _ = ivf.search(aggregate_many(qs, cb, "asmk_star"))
    our_query_batch = (time.process_time() - t0) / args.queries
    if not np.array_equal(our_ranks, our_ranks_b):
        raise RuntimeError("batched and one-by-one rankings differ")
    our_q = aggregate_many(qs, cb, "asmk_star").images()
    t0 = time.process_time()
    for a in our_q:
        ivf.search([a])
    our_search = (time.process_time() - t0) / args.queries

    with tempfile.TemporaryDirectory() as tmp:
        asmk_path = Path(tmp) / "asmk_ivf.pkl"
        asmk_io.save_pickle(str(asmk_path), built.inverted_file.state_dict())
        asmk_bytes = os.path.getsize(asmk_path)
        our_bytes = _dir_bytes(ivf.save(Path(tmp) / "ours"))

    map_asmk = 100 * compute_map(np.asarray(asmk_ranks).T, gnd)[0]
    map_ours = 100 * compute_map(our_ranks.T, gnd)[0]
    top10 = float(
        np.mean(
            [
                np.array_equal(a[:10], b[:10])
                for a, b in zip(np.asarray(asmk_ranks), our_ranks, strict=True)
            ]
        )
    )
    print("| measure | asmk 0.1.1 | gldboxes | ratio (asmk / ours) |")
    print("|---|---|---|---|")
    print(f"| mAP (%) | {map_asmk:.2f} | {map_ours:.2f} | diff {map_ours - map_asmk:+.2f} |")
    print(f"| identical top-10 lists | | {100 * top10:.0f}% | |")
    rows = [
        ("index build (s)", asmk_build, our_build, 1),
        ("  of which exact assignment (s)", asmk_quant, our_quant, 1),
        ("  build without assignment (s)", asmk_build - asmk_quant, our_build - our_quant, 1),
        ("query end to end, one at a time (ms)", asmk_query, our_query_single, 1e3),
        ("query end to end, batched (ms)", asmk_query, our_query_batch, 1e3),
        ("inverted-file search per query (ms)", asmk_search, our_search, 1e3),
    ]
    for name, theirs, ours, unit in rows:
        print(f"| {name} | {unit * theirs:.2f} | {unit * ours:.2f} | {theirs / ours:.1f}x |")
    print(
        f"| index bytes per image | {asmk_bytes / args.images:.0f} | "
        f"{our_bytes / args.images:.0f} | {asmk_bytes / our_bytes:.2f}x |"
    )
    ok = abs(map_ours - map_asmk) <= 0.5
    print(f"mAP agreement within 0.5 points: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
