"""Our ASMK* against the ``asmk`` package (jenicek/asmk) on the same descriptors and codebook.

Both run in this one process on the same synthetic landmark data, the same codebook and the
same settings (single assignment, binary ASMK*, alpha 3, tau 0, no idf, image normalisation
on). One run measures every database size of ``--images`` (default 5,000 and 100,000):

* sizes up to ``--full-max`` (the 5k run): the whole pipeline on descriptors. mAP of both
  (ground truth: database images of the query's landmark), which must agree within 0.5
  points, and how often the top-10 lists are identical; index build time ratio (quantise +
  aggregate + inverted file, theirs / ours) and the same without the exact assignment (one
  (N, D) x (D, K) GEMM both sides pay alike, faiss here and there); per-query time end to
  end (quantise + aggregate + score + rank);
* larger sizes (100k: 30M descriptors would not fit the time): a cheaper generator makes the
  aggregated images directly (per landmark, prototype words and sign bits; an image keeps a
  random part of its landmark's words with bits flipped (``--flip-ands``) and adds clutter words
  with random bits), our inverted file is built from them and the peer's ``IVF`` object is
  filled with the same per-word vectors and ids (the state its ``add`` would reach, without
  its per-vector Python loop);
* at every size: the inverted-file search per query (aggregated query in) against the peer's
  ``IVF.search``, for the full ranking (the Revisited protocol) and the top ``--topk``, one
  query at a time on one thread, and ours batched on ``--threads`` threads; index bytes per
  image and the time to open the saved index (theirs: its pickle; ours: memory-mapped
  ``.npy`` files, then the first query).

Threads: BLAS/OpenMP threads of both sides are set from env ``BENCH_THREADS`` (default 1)
before numpy loads; the peer's search is a single-threaded Python loop over the query's words
(numpy and its Cython Hamming distance inside), ours runs with ``num_threads=1`` in every
one-query row and ``num_threads=--threads`` (default: every core) in the batched row. Times
of single-threaded rows are process CPU seconds (``time.process_time``: on a shared machine
they do not count the time other jobs hold the core); multi-threaded rows are wall seconds.

The ``asmk`` package is not a dependency of gldboxes and this script installs nothing. To
install it into the project's virtualenv (an sdist with a Cython extension)::

    .venv/bin/pip install cython
    .venv/bin/pip install --no-deps --no-build-isolation asmk

Run (defaults: 5,000 and 100,000 database images, 100 queries, 300 descriptors or words an
image, 4,096 words; about 7 minutes on a loaded 2-core machine)::

    .venv/bin/python benchmarks/asmk_peer.py [--images 5000,100000 --queries 100]
"""

from __future__ import annotations

import os

# Thread count of BLAS / OpenMP for both sides, set before numpy loads (env BENCH_THREADS,
# default 1): on a loaded shared machine multithreaded BLAS spin-waits and small GEMMs get
# 100x slower, which would measure the machine, not the code. Same setting for both peers.
_THREADS = os.environ.get("BENCH_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["main", "synthetic_aggregated", "synthetic_descriptors"]


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


def synthetic_aggregated(
    rng: np.random.Generator,
    labels: np.ndarray,
    proto_words: np.ndarray,
    proto_bits: np.ndarray,
    per_image: int,
    codebook_size: int,
    *,
    clutter: float = 0.5,
    flip_ands: int = 2,
    chunk: int = 4096,
) -> Any:
    """Aggregated binary images made directly (no descriptors), vectorised in image chunks.

    Args:
        labels: int (n_images,) landmark of each image.
        proto_words: int (L, P) each landmark's words; proto_bits: uint8 (L, P, B) their bits.
        per_image: words drawn an image before duplicates merge (a fraction ``clutter`` of
            them uniform over the codebook with random bits).
        flip_ands: each bit of a landmark word is flipped with probability
            ``2 ** -flip_ands`` (the AND of that many random bytes).

    Returns:
        an :class:`retrieval.index.aggregation.AggregatedBatch` (words sorted and unique per
        image; a repeated word keeps its first draw).
    """
    from retrieval.index.aggregation import AggregatedBatch

    n = labels.shape[0]
    n_proto, nb = proto_words.shape[1], proto_bits.shape[2]
    n_land = int(per_image * (1 - clutter))
    words_parts, data_parts, counts = [], [], np.zeros(n, np.int64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        m = b - a
        pick = rng.integers(0, n_proto, (m, n_land))
        lab = labels[a:b, None]
        w = np.concatenate(
            [proto_words[lab, pick], rng.integers(0, codebook_size, (m, per_image - n_land))],
            axis=1,
        )
        flips = rng.integers(0, 256, (m, n_land, nb), dtype=np.uint8)
        for _ in range(flip_ands - 1):  # each bit set with probability 2^-flip_ands
            flips &= rng.integers(0, 256, (m, n_land, nb), dtype=np.uint8)
        bits = np.concatenate(
            [
                proto_bits[lab, pick] ^ flips,
                rng.integers(0, 256, (m, per_image - n_land, nb), dtype=np.uint8),
            ],
            axis=1,
        )
        key = (np.arange(a, b, dtype=np.int64)[:, None] * codebook_size + w).ravel()
        uniq, first = np.unique(key, return_index=True)  # sorted by (image, word)
        words_parts.append((uniq % codebook_size).astype(np.uint32))
        data_parts.append(bits.reshape(-1, nb)[first])
        counts[a:b] = np.bincount(uniq // codebook_size - a, minlength=m)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return AggregatedBatch(
        offsets=offsets,
        words=np.concatenate(words_parts),
        data=np.concatenate(data_parts),
        dim=8 * nb,
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _wall(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _peer_bits(packed: np.ndarray) -> np.ndarray:
    """Our packed sign bits (n, 16) uint8 as the peer's packing unit, uint32 (n, 4) (the same
    bits in other words: Hamming distances are unchanged)."""
    return np.ascontiguousarray(packed).view(np.uint32)


def _peer_ivf(ivf: Any) -> Any:
    """The peer's ``IVF`` holding our index's postings: per word its vectors and image ids (the
    state ``IVF.add`` reaches; no idf, norm factor = words per image)."""
    from asmk.inverted_file import IVF

    off = np.asarray(ivf.offsets)
    ids = ivf.image_ids.astype(np.int64)
    k = ivf.codebook_size
    vecs: list[np.ndarray | None] = [None] * k
    imids: list[np.ndarray | None] = [None] * k
    for w in np.flatnonzero(np.diff(off)):
        vecs[w] = _peer_bits(ivf.data[off[w] : off[w + 1]])
        imids[w] = ids[off[w] : off[w + 1]]
    return IVF(
        norm_factor=np.asarray(ivf.words_per_image, np.float64),
        n_images=ivf.n_images,
        ivf_vecs=vecs,
        ivf_image_ids=imids,
        counts=np.diff(off).astype(np.int32),
        idf=np.ones(k, np.float32),
        imid_offset=0,
        use_idf=False,
    )


def _search_rows(
    ivf: Any, peer: Any, kern: Any, queries: Any, topk: int, threads: int
) -> tuple[list[tuple[str, float, float, float]], np.ndarray, np.ndarray]:
    """Search timings (name, theirs, ours, unit) and both full rankings (n_queries, n_db)."""
    sim = {"alpha": 3, "similarity_threshold": 0.0}
    qs = queries.images()
    peer_q = [(_peer_bits(a.data), np.asarray(a.words, np.int64)) for a in qs]

    def peer_search(k: int | None) -> np.ndarray:
        return np.stack(
            [
                peer.search(d, w, similarity_func=lambda *x: kern.similarity(*x, **sim), topk=k)[0]
                for d, w in peer_q
            ]
        )

    nq = len(qs)
    for k in (None, topk):  # our compiled loops load (or compile) for these array types
        ivf.search(qs[:1], k, num_threads=1)
    t_peer_full, peer_ranks = _cpu(lambda: peer_search(None))
    t_peer_top, _ = _cpu(lambda: peer_search(topk))
    t_full, our_ranks = _cpu(
        lambda: np.concatenate([ivf.search([a], num_threads=1)[0] for a in qs])
    )
    t_top, our_top = _cpu(
        lambda: np.concatenate([ivf.search([a], topk, num_threads=1)[0] for a in qs])
    )
    c0 = time.process_time()
    w_batch_full, batch_full = _wall(lambda: ivf.search(queries, num_threads=threads)[0])
    c1 = time.process_time()
    w_batch_top, batch_top = _wall(lambda: ivf.search(queries, topk, num_threads=threads)[0])
    c2 = time.process_time()
    print(
        f"ours batched on {threads} threads: CPU {1e3 * (c1 - c0) / nq:.2f} ms (full) and "
        f"{1e3 * (c2 - c1) / nq:.2f} ms (top {topk}) a query over all threads; machine load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall rows count waits)"
    )
    if not (np.array_equal(batch_full, our_ranks) and np.array_equal(batch_top, our_top)):
        raise RuntimeError("batched and one-by-one rankings differ")
    if not np.array_equal(our_top, our_ranks[:, :topk]):
        raise RuntimeError("the top-k is not the head of the full ranking")
    rows = [
        ("search per query, full ranking, 1 thread (ms)", t_peer_full / nq, t_full / nq, 1e3),
        (f"search per query, top {topk}, 1 thread (ms)", t_peer_top / nq, t_top / nq, 1e3),
        (
            f"search per query, full ranking, ours batched on {threads} threads, wall (ms)",
            t_peer_full / nq,
            w_batch_full / nq,
            1e3,
        ),
        (
            f"search per query, top {topk}, ours batched on {threads} threads, wall (ms)",
            t_peer_top / nq,
            w_batch_top / nq,
            1e3,
        ),
    ]
    return rows, np.asarray(peer_ranks), our_ranks


def _open_rows(ivf: Any, peer: Any, query: Any) -> list[tuple[str, float, float, float]]:
    """Bytes per image on disk and the time to open the saved index and answer one query."""
    from asmk import io_helpers as asmk_io

    from retrieval.index.inverted_file import InvertedFile

    with tempfile.TemporaryDirectory() as tmp:
        ppath = Path(tmp) / "asmk_ivf.pkl"
        asmk_io.save_pickle(str(ppath), peer.state_dict())
        peer_bytes = os.path.getsize(ppath)
        our_bytes = _dir_bytes(ivf.save(Path(tmp) / "ours"))
        t_peer_open, _ = _wall(lambda: asmk_io.load_pickle(str(ppath)))
        # our loops for read-only (memory-mapped) arrays load or compile outside the timing
        InvertedFile.load(Path(tmp) / "ours", mmap=True).search(query, 100, num_threads=1)
        t0 = time.perf_counter()
        back = InvertedFile.load(Path(tmp) / "ours", mmap=True)
        t_open = time.perf_counter() - t0
        back.search(query, 100, num_threads=1)
        t_first = time.perf_counter() - t0 - t_open
    n = ivf.n_images
    return [
        ("index bytes per image", peer_bytes / n, our_bytes / n, 1),
        ("open the saved index (files in the page cache), wall (ms)", t_peer_open, t_open, 1e3),
        (
            "  ours memory-mapped: open + first top-100 query, wall (ms)",
            t_peer_open,
            t_open + t_first,
            1e3,
        ),
    ]


def _print_rows(rows: list[tuple[str, float, float, float]]) -> None:
    for name, theirs, ours, unit in rows:
        print(f"| {name} | {unit * theirs:.2f} | {unit * ours:.2f} | {theirs / ours:.1f}x |")


def _agreement(
    peer_ranks: np.ndarray, our_ranks: np.ndarray, gnd: list[dict[str, Any]]
) -> tuple[float, float, float]:
    from retrieval.evaluation.evaluate import compute_map

    map_peer = 100 * compute_map(peer_ranks.T, gnd)[0]
    map_ours = 100 * compute_map(our_ranks.T, gnd)[0]
    top10 = float(
        np.mean(
            [np.array_equal(a[:10], b[:10]) for a, b in zip(peer_ranks, our_ranks, strict=True)]
        )
    )
    return map_peer, map_ours, top10


def run_full(args: argparse.Namespace, n_images: int) -> bool:
    """The descriptor pipeline at ``n_images`` (build, end-to-end query, search, bytes)."""
    from asmk import asmk_method, codebook, index

    from retrieval.features.codebook import train_codebook
    from retrieval.index.aggregation import aggregate_many, assign
    from retrieval.index.inverted_file import InvertedFile

    rng = np.random.default_rng(args.seed)
    d = args.dim
    protos = rng.standard_normal((args.landmarks, 400, d)).astype(np.float32)
    db_lab = rng.integers(0, args.landmarks, n_images)
    q_lab = rng.integers(0, args.landmarks, args.queries)
    t0 = time.process_time()
    hard = {"noise": args.noise, "clutter": args.clutter}
    db = synthetic_descriptors(rng, n_images, args.per_image, protos, db_lab, d, **hard)
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
        f"\n## {n_images} database images: descriptors, the whole pipeline\n\n"
        f"data: {n_images} database images, {args.queries} queries, {args.per_image} "
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
    imids = np.repeat(np.arange(n_images), [x.shape[0] for x in db])
    qdes = np.concatenate(qs)
    qimids = np.repeat(np.arange(args.queries), [x.shape[0] for x in qs])
    asmk_build, built = _cpu(lambda: method.build_ivf(des, imids.copy()))
    asmk_quant, _ = _cpu(lambda: cdb.quantize(des, multiple_assignment=1))
    asmk_query, (_, _, asmk_ranks, _) = _cpu(lambda: built.query_ivf(qdes, qimids))
    asmk_query /= args.queries

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
    our_quant, _ = _cpu(lambda: assign(des, cb))
    our_query_single, our_ranks = _cpu(
        lambda: np.concatenate(
            [ivf.search(aggregate_many([q], cb, "asmk_star"), num_threads=1)[0] for q in qs]
        )
    )
    our_query_single /= args.queries
    our_q = aggregate_many(qs, cb, "asmk_star")
    search, _, our_search_ranks = _search_rows(
        ivf, built.inverted_file, built.kernel, our_q, args.topk, args.threads
    )
    if not np.array_equal(our_ranks, our_search_ranks):
        raise RuntimeError("end-to-end and aggregated-query rankings differ")
    map_asmk, map_ours, top10 = _agreement(np.asarray(asmk_ranks), our_ranks, gnd)
    print("\n| measure | asmk 0.1.1 | gldboxes | ratio (asmk / ours) |")
    print("|---|---|---|---|")
    print(f"| mAP (%) | {map_asmk:.2f} | {map_ours:.2f} | diff {map_ours - map_asmk:+.2f} |")
    print(f"| identical top-10 lists | | {100 * top10:.0f}% | |")
    _print_rows(
        [
            ("index build, 1 thread (s)", asmk_build, our_build, 1),
            ("  of which exact assignment (s)", asmk_quant, our_quant, 1),
            ("  build without assignment (s)", asmk_build - asmk_quant, our_build - our_quant, 1),
            ("query end to end, full ranking, 1 thread (ms)", asmk_query, our_query_single, 1e3),
            *search,
            *_open_rows(ivf, built.inverted_file, our_q.images()[:1]),
        ]
    )
    share = our_quant / our_build
    print(
        f"build: the exact assignment (faiss GEMM, the same work on both sides) is "
        f"{100 * share:.0f}% of ours and {100 * asmk_quant / asmk_build:.0f}% of theirs; "
        f"with it alike the build ratio cannot pass asmk_build / our_quant = "
        f"{asmk_build / our_quant:.1f}x"
    )
    ok = abs(map_ours - map_asmk) <= 0.5
    print(f"mAP agreement within 0.5 points: {'yes' if ok else 'NO'}")
    return ok


def run_search_only(args: argparse.Namespace, n_images: int) -> bool:
    """Search, bytes and open time at ``n_images`` on directly generated aggregated images."""
    from asmk.kernel import ASMKKernel

    from retrieval.index.inverted_file import InvertedFile

    rng = np.random.default_rng(args.seed + n_images)
    nb = -(-args.dim // 8)
    k = args.codebook_size
    proto_words = np.stack(
        [rng.choice(k, min(400, k), replace=False) for _ in range(args.landmarks)]
    ).astype(np.int64)
    proto_bits = rng.integers(0, 256, (*proto_words.shape, nb), dtype=np.uint8)
    db_lab = rng.integers(0, args.landmarks, n_images)
    q_lab = rng.integers(0, args.landmarks, args.queries)
    gen = {"clutter": args.clutter, "flip_ands": args.flip_ands}
    t_gen, db = _wall(
        lambda: synthetic_aggregated(rng, db_lab, proto_words, proto_bits, args.per_image, k, **gen)
    )
    q = synthetic_aggregated(rng, q_lab, proto_words, proto_bits, args.per_image, k, **gen)
    t_build, ivf = _cpu(lambda: InvertedFile.build(db, k, "asmk_star"))
    peer = _peer_ivf(ivf)
    print(
        f"\n## {n_images} database images: aggregated images made directly\n\n"
        f"data: {n_images} database images, {args.queries} queries, "
        f"{db.words.size / n_images:.0f} distinct words an image of {k} (D={args.dim}), "
        f"{db.words.size} postings; generated in {t_gen:.1f} s, our inverted file built in "
        f"{t_build:.1f} s (the peer's IVF filled with the same postings)"
    )
    gnd = [{"ok": np.flatnonzero(db_lab == q_lab[i]), "junk": []} for i in range(args.queries)]
    search, peer_ranks, our_ranks = _search_rows(
        ivf, peer, ASMKKernel(None, binary=True), q, args.topk, args.threads
    )
    map_peer, map_ours, top10 = _agreement(peer_ranks, our_ranks, gnd)
    print("\n| measure | asmk 0.1.1 | gldboxes | ratio (asmk / ours) |")
    print("|---|---|---|---|")
    print(f"| mAP (%) | {map_peer:.2f} | {map_ours:.2f} | diff {map_ours - map_peer:+.2f} |")
    print(f"| identical top-10 lists | | {100 * top10:.0f}% | |")
    _print_rows([*search, *_open_rows(ivf, peer, q.images()[:1])])
    ok = abs(map_ours - map_peer) <= 0.5
    print(f"mAP agreement within 0.5 points: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    from retrieval.index.inverted_file import default_num_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--images", default="5000,100000", help="database sizes, comma-separated (e.g. 5000)"
    )
    ap.add_argument(
        "--full-max",
        type=int,
        default=20_000,
        help="largest size run on descriptors (the whole pipeline); larger: aggregated images",
    )
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--per-image", type=int, default=300, help="descriptors (words) an image")
    ap.add_argument("--landmarks", type=int, default=250)
    ap.add_argument("--codebook-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.35, help="descriptor noise (harder: 0.8)")
    ap.add_argument("--clutter", type=float, default=0.5, help="fraction of clutter descriptors")
    ap.add_argument(
        "--flip-ands",
        type=int,
        default=2,
        help="generated words: bits flipped with probability 2^-flip_ands (2: 0.25)",
    )
    ap.add_argument("--topk", type=int, default=100, help="k of the top-k search rows")
    ap.add_argument(
        "--threads",
        type=int,
        default=default_num_threads(),
        help="threads of our batched search rows (default: every core)",
    )
    args = ap.parse_args(argv)
    try:
        import asmk  # noqa: F401
    except ImportError:
        print("the asmk package is not importable; install it as the docstring says")
        return 1
    sizes = [int(s) for s in args.images.split(",") if s.strip()]
    print(
        f"threads: BLAS/OpenMP {_THREADS} on both sides; asmk's search: 1 (a Python loop); "
        f"ours: 1 in one-query rows, {args.threads} in batched rows "
        f"({default_num_threads()} cores available)"
    )
    ok = True
    for n in sizes:
        ok &= run_full(args, n) if n <= args.full_max else run_search_only(args, n)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
