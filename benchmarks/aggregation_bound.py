"""How close is aggregating one image to the machine's matrix-multiply bound?

Aggregating N descriptors against a K-word codebook must at least compute the N x K distance
matrix: one (N, D) x (D, K) single-precision GEMM, 2*N*D*K flops. This script times, in one run
and on the same arrays:

* the bound: ``np.matmul(X, C.T, out=buf)`` through numpy's BLAS into a preallocated output
  (the same SGEMM, nothing else: no fresh (N, K) array paged in on every call, which would make
  the bound look slower than it is);
* ``faiss.knn`` (exact L2 nearest word: GEMM + argmin);
* ``retrieval.index.aggregation.aggregate`` for ``asmk`` and ``asmk_star`` (assignment + residual
  sums
  + normalisation / sign packing);

and prints each as a multiple of the bound and in GFLOP/s. Default: N=1,000, D=128, K=65,536.

    .venv/bin/python benchmarks/aggregation_bound.py [--n 1000 --k 65536 --dim 128 --repeat 7]
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
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["main"]


def _best(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (page faults, thread pools)
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    import faiss

    from retrieval.index.aggregation import aggregate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="descriptors of the image")
    ap.add_argument("--k", type=int, default=65536, help="codebook size")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cb = rng.standard_normal((args.k, args.dim)).astype(np.float32)
    cb /= np.linalg.norm(cb, axis=1, keepdims=True)
    flops = 2.0 * args.n * args.dim * args.k

    buf = np.empty((args.n, args.k), np.float32)  # reused by every call of the bound
    cbt = cb.T
    rows = {
        "SGEMM X @ C.T into a reused buffer (bound)": _best(
            lambda: np.matmul(x, cbt, out=buf), args.repeat
        ),
        "faiss.knn (assignment)": _best(lambda: faiss.knn(x, cb, 1), args.repeat),
        "aggregate asmk": _best(lambda: aggregate(x, cb, "asmk"), args.repeat),
        "aggregate asmk_star": _best(lambda: aggregate(x, cb, "asmk_star"), args.repeat),
    }
    bound = rows["SGEMM X @ C.T into a reused buffer (bound)"]
    print(
        f"N={args.n} D={args.dim} K={args.k}: {flops / 1e9:.2f} GFLOP per image; threads: "
        f"BLAS/OpenMP {_THREADS} (BENCH_THREADS), faiss {faiss.omp_get_max_threads()}; "
        "process CPU time, best of --repeat"
    )
    print("| step | ms | x bound | GFLOP/s | fraction of bound |")
    print("|---|---|---|---|---|")
    for name, t in rows.items():
        print(
            f"| {name} | {1e3 * t:.2f} | {t / bound:.2f} | {flops / t / 1e9:.1f} | "
            f"{bound / t:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
