"""Inlier counts of same-landmark and unrelated pairs of real photos under a features preset.

The RootSIFT preset's ``min_inliers`` (10) was set from this, on photos outside the retrieval
benchmark (``../shared/data/landmark_photos``), so that unrelated pairs stay below it::

    .venv/bin/python scripts/calibrate_min_inliers.py ../shared/data/landmark_photos \
        --out runs/calib

A photo's landmark is its folder name for ``sacre_coeur_hloc`` and otherwise its file stem
without a trailing number or A/B letter (``toronto_A`` -> ``toronto``, ``sacre_coeur1`` ->
``sacre_coeur``).
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import h5py
import numpy as np

from retrieval.runner.conf import feature_conf, resolve_conf
from retrieval.runner.driver import extract_folder
from retrieval.verification import VerificationConf, read_features_h5, verify_pair


def landmark(key: str) -> str:
    parts = key.split("__")
    if len(parts) > 1 and parts[0] == "sacre_coeur_hloc":
        return "sacre_coeur"
    return re.sub(r"_?(\d+|[AB])$", "", Path(parts[-1]).stem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", help="folder of landmark photos")
    ap.add_argument("--out", required=True, help="output root for the features")
    ap.add_argument("--features", default="rootsift")
    args = ap.parse_args()
    conf = resolve_conf(features=args.features, verification={})
    h5, _ = extract_folder(conf, args.images, args.out)
    with h5py.File(h5, "r") as f:
        keys = sorted(f.keys())
    fc = feature_conf(conf)
    feats = read_features_h5(h5, keys, max_side=fc["preprocessing"]["max_side"])
    vconf = VerificationConf(**{**fc["verification"], "min_inliers": 0})
    same, other = [], []
    for a, b in itertools.combinations(keys, 2):
        n = verify_pair(feats[a], feats[b], vconf).num_inliers
        (same if landmark(a) == landmark(b) else other).append(n)
    s, o = np.array(same), np.array(other)
    minimum = fc["verification"]["min_inliers"]
    print(f"{len(keys)} photos, preset {args.features} (min_inliers {minimum})")
    print(f"same landmark: {s.size} pairs, median {np.median(s):g}, >= 10: {(s >= 10).mean():.0%}")
    print(f"unrelated:     {o.size} pairs, max {o.max()}, 95th percentile {np.percentile(o, 95):g}")


if __name__ == "__main__":
    main()
