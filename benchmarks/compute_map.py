"""Benchmark: vectorised ``compute_map`` against the plain-loop reference, roxford5k-sized input.

70 queries x 4,993 database images under the three Revisited protocols, with the real
ground-truth file when ``../shared/data`` is present and a random one of the same shape otherwise.
Prints both timings and the speed-up ratio measured in this one run, and checks the results agree.

    .venv/bin/python benchmarks/compute_map.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.datasets import load_gnd
from retrieval.evaluate import PROTOCOLS, compute_map, compute_map_loop, protocol_gnd

GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"


def _ground_truth(rng: np.random.Generator) -> tuple[list[dict[str, Any]], int, str]:
    if GND.exists():
        cfg = load_gnd(GND)
        return cfg["gnd"], len(cfg["imlist"]), "real gnd_roxford5k.pkl"
    n_db, gnd = 4993, []
    for _ in range(70):
        perm = rng.permutation(n_db)
        gnd.append(
            {
                "easy": perm[:60].tolist(),
                "hard": perm[60:100].tolist(),
                "junk": perm[100:130].tolist(),
            }
        )
    return gnd, n_db, "random ground truth of roxford5k's shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gnd, n_db, source = _ground_truth(rng)
    ranks = np.argsort(rng.random((len(gnd), n_db)), axis=1).T
    protos = [protocol_gnd(gnd, p) for p in PROTOCOLS]

    def fast() -> list[float]:
        return [compute_map(ranks, g, (1, 5, 10), n_db=n_db)[0] for g in protos]

    def slow() -> list[float]:
        return [compute_map_loop(ranks, g, (1, 5, 10))[0] for g in protos]

    timings = {}
    results = {}
    for name, fn in (("vectorised", fast), ("plain loop", slow)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results[name] = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    np.testing.assert_allclose(results["vectorised"], results["plain loop"], atol=1e-12)
    print(
        f"compute_map on {ranks.shape[1]} queries x {ranks.shape[0]} images, 3 protocols "
        f"({source}), best of {args.repeat}:"
    )
    for name, t in timings.items():
        print(f"  {name:<11} {t * 1000:9.1f} ms")
    print(
        f"  speed-up    {timings['plain loop'] / timings['vectorised']:9.1f}x (same mAP to 1e-12)"
    )


if __name__ == "__main__":
    main()
