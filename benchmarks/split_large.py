"""The paper's split on a synthetic GLDv2-sized CSV (4 million rows): time and peak memory.

Generates (once, cached) a ``id,url,landmark_id`` CSV shaped like GLDv2's ``train.csv``
(4.1M images, ~200k landmarks, long-tailed), then runs ``gldboxes.split.main`` on it in a child
process and reports wall time and the child's peak resident memory. As a peer, a plain
pandas ``groupby().apply`` implementation of the same protocol runs on a row prefix (it is
too slow for all rows); ours runs on the same prefix and the ratio is printed.

    .venv/bin/python benchmarks/split_large.py [--rows 4000000] [--peer-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gldboxes.split import hash_keys, split_landmarks  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from gldboxes.split import main
t0 = time.perf_counter()
folder = main({{"seed": 0, "output": "bench"}}, {csv!r}, {out!r}, overwrite=True)
dt = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": dt, "peak_mb": peak_kb / 1024, "folder": str(folder)}}))
"""


def make_csv(path: Path, rows: int, landmarks: int, seed: int = 0) -> None:
    """A GLDv2-like train.csv: long-tailed landmark sizes, hex ids, Wikimedia-like URLs."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, landmarks + 1) ** 0.9  # Zipf-like popularity
    lm_ids = rng.permutation(landmarks * 2)[:landmarks]
    lms = lm_ids[rng.choice(landmarks, rows, p=weights / weights.sum())]
    raw = rng.integers(0, 2**63, rows, dtype=np.int64)
    ids = pd.Series(raw).map("{:016x}".format)
    urls = (
        "https://upload.wikimedia.org/wikipedia/commons/"
        + ids.str[:1]
        + "/"
        + ids.str[:2]
        + "/"
        + ids
        + ".jpg"
    )
    df = pd.DataFrame({"id": ids, "url": urls, "landmark_id": lms})
    df.to_csv(path, index=False)


def peer_split(df: pd.DataFrame, seed: int, val_fraction: float = 0.2, per: int = 4) -> set[str]:
    """The same protocol written the usual pandas way: one Python call per landmark."""

    def one(group: pd.DataFrame) -> pd.DataFrame:
        g = group.sort_values("key")
        lm = int(g["landmark_id"].iloc[0])
        u = int(hash_keys(np.array([lm]), seed, 2)[0]) / 2.0**64
        n_val = min(math.floor(val_fraction * len(g) + u), len(g))
        return g.iloc[n_val : n_val + per]

    df = df.assign(key=hash_keys(df["id"], seed, 1))
    train = df.groupby("landmark_id", group_keys=False)[list(df.columns)].apply(one)
    return set(train["id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--landmarks", type=int, default=200_000)
    ap.add_argument("--peer-rows", type=int, default=50_000)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gldboxes-split-bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"train_{args.rows}_{args.landmarks}.csv"
    if not csv_path.exists():
        t0 = time.perf_counter()
        make_csv(csv_path, args.rows, args.landmarks)
        print(
            f"generated {csv_path} ({csv_path.stat().st_size / 2**20:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f} s"
        )

    code = CHILD.format(repo=str(REPO), csv=str(csv_path), out=str(work / "out"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    stats = json.loads((Path(m["folder"]) / "stats.json").read_text())
    print(
        f"ours, {args.rows:,} rows: {m['seconds']:.1f} s end to end (read "
        f"{stats['seconds']['read']:.1f} s), peak RSS {m['peak_mb']:.0f} MB -> "
        f"{stats['train_images']:,} train / {stats['val_images']:,} val images, "
        f"{stats['landmarks']:,} landmarks, {stats['landmarks_fully_covered']:,} fully covered"
    )

    df = pd.read_csv(
        csv_path, nrows=args.peer_rows, usecols=["id", "landmark_id"], dtype={"id": str}
    )
    t0 = time.perf_counter()
    ours = split_landmarks(df["id"], df["landmark_id"].to_numpy(), seed=0)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = peer_split(df, seed=0)
    t_peer = time.perf_counter() - t0
    same = set(df["id"].to_numpy()[ours.train]) == peer
    print(
        f"{args.peer_rows:,}-row prefix, split only: ours {t_ours:.2f} s | pandas "
        f"groupby-apply {t_peer:.2f} s | ratio {t_peer / t_ours:.0f}x | same train set: {same}"
    )
    print(
        f"(this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        " MB)"
    )


if __name__ == "__main__":
    main()
