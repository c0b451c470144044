"""The paper's landmark-balanced train/val split of a Google Landmarks training CSV.

Detect-to-Retrieve builds Google Landmark Boxes from the GLD training set: part of the training
set is held out as validation, then up to 4 training and 4 validation images are picked per
landmark (58k training / 36k validation images from 15k landmarks in the paper), so that every
landmark is represented in a balanced way. This module does the same, vectorised for CSVs of
millions of rows:

1. read ``id,landmark_id`` (GLDv2 ``train.csv``: ``id,url,landmark_id``; Kaggle 2021:
   ``id,landmark_id``) or the ``landmark_id,images`` layout of ``train_clean.csv``;
2. drop excluded images and landmarks (e.g. those overlapping evaluation sets), landmarks with
   fewer than ``min_images`` images, and optionally keep ``n_landmarks`` landmarks;
3. hold out a ``val_fraction`` of each landmark's images (landmark-stratified; the per-landmark
   count ``floor(f * n + u)`` with a per-landmark uniform ``u`` is stochastic rounding, so every
   landmark's expected held-out share is exactly ``f``);
4. sample up to ``train_per_landmark`` images of the rest and ``val_per_landmark`` of the
   held-out part of each landmark.

Randomness comes from keyed 64-bit hashes of the image and landmark ids (SipHash with a key
derived from the seed), so the split is deterministic for a seed, independent of the CSV's row
order, and an image's fate does not change when unrelated rows are added or excluded.

Outputs of :func:`main` (``OUT/<conf output>-s<seed>/``): ``train.csv`` and ``val.csv``
(``id,landmark_id``, sorted by id), optionally ``train_pool.csv``/``val_pool.csv`` (the whole
hold-out partition), ``stats.json`` (format_version 1) and ``config.yaml``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json

__all__ = [
    "FORMAT_VERSION",
    "LandmarkSplit",
    "confs",
    "hash_keys",
    "long_tail_histogram",
    "main",
    "read_exclusions",
    "read_landmark_csv",
    "split_landmarks",
]

logger = logging.getLogger("gldboxes.split")

FORMAT_VERSION = 1

confs: dict[str, dict[str, Any]] = {
    # Detect-to-Retrieve's Google Landmark Boxes protocol (4 train + 4 val per landmark).
    "paper": {
        "output": "split-paper",  # folder name prefix; the seed is appended
        "val_fraction": 0.2,  # share of each landmark's images held out (not given in the paper)
        "train_per_landmark": 4,  # images sampled per landmark from the training part
        "val_per_landmark": 4,  # images sampled per landmark from the held-out part
        "n_landmarks": None,  # keep this many landmarks (hash-sampled); None keeps all
        "min_images": 1,  # drop landmarks with fewer images than this
        "write_pools": False,  # also write the whole hold-out partition (large CSVs)
        "seed": 0,  # hash key of every random choice
    },
    # The same with the paper's landmark count (15k) sampled from the eligible landmarks.
    "paper_15k": {
        "output": "split-paper15k",
        "val_fraction": 0.2,
        "train_per_landmark": 4,
        "val_per_landmark": 4,
        "n_landmarks": 15000,
        "min_images": 2,
        "write_pools": False,
        "seed": 0,
    },
}

# Hash streams: independent random choices never share keys.
_STREAM_IMAGE_ORDER, _STREAM_ROUNDING, _STREAM_LANDMARKS = 1, 2, 3
_TAIL_EDGES = (1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513, 1025)


def hash_keys(values: np.ndarray | pd.Series, seed: int, stream: int) -> np.ndarray:
    """Keyed 64-bit hashes (N,) uint64 of ids or landmark ids: the split's source of randomness.

    Args:
        values: (N,) strings or integers.
        seed: the split seed; stream: which random choice (keeps choices independent).
    """
    if not 0 <= seed < 10**12 or not 0 <= stream < 10**3:
        raise ValueError(f"seed must be in [0, 1e12) and stream in [0, 1000), got {seed}, {stream}")
    key = f"{seed:012d}{stream:03d}g"  # pandas wants exactly 16 characters
    arr = values.array if isinstance(values, pd.Series) else np.asarray(values)
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "US":
        arr = arr.astype(object)
    return np.asarray(pd.util.hash_array(arr, hash_key=key, categorize=False), dtype=np.uint64)


@dataclass
class LandmarkSplit:
    """Result of :func:`split_landmarks`, as indices into the *input* arrays.

    Attributes:
        kept: (M,) int64 rows left after exclusions and landmark filters.
        val_pool: (M,) bool, held-out flag of each kept row.
        train: (T,) int64 sampled training rows; val: (V,) int64 sampled validation rows.
        stats: counts (see :func:`split_landmarks`).
    """

    kept: np.ndarray
    val_pool: np.ndarray
    train: np.ndarray
    val: np.ndarray
    stats: dict[str, Any]


def split_landmarks(
    ids: np.ndarray | pd.Series,
    landmarks: np.ndarray | pd.Series,
    *,
    val_fraction: float = 0.2,
    train_per_landmark: int = 4,
    val_per_landmark: int = 4,
    seed: int = 0,
    n_landmarks: int | None = None,
    min_images: int = 1,
    exclude_ids: Iterable[str] = (),
    exclude_landmarks: Iterable[int] = (),
) -> LandmarkSplit:
    """Landmark-stratified hold-out, then up to ``train/val_per_landmark`` images per landmark.

    Args:
        ids: (N,) unique image ids (strings); landmarks: (N,) integer landmark ids.
        val_fraction: expected share of each landmark's images held out, in [0, 1].
        n_landmarks: keep the landmarks with the smallest keyed hash (a seeded sample).

    Returns:
        a :class:`LandmarkSplit`; rows of ``train``/``val`` are ordered by (landmark, key).
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if train_per_landmark < 0 or val_per_landmark < 0:
        raise ValueError("train_per_landmark and val_per_landmark must be >= 0")
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    if n_landmarks is not None and n_landmarks < 1:
        raise ValueError(f"n_landmarks must be >= 1 or None, got {n_landmarks}")
    id_s = ids if isinstance(ids, pd.Series) else pd.Series(np.asarray(ids), dtype="str")
    id_s = id_s.reset_index(drop=True)
    lm = np.asarray(landmarks, dtype=np.int64)
    n_rows = len(id_s)
    if lm.shape != (n_rows,):
        raise ValueError(f"ids ({n_rows},) and landmarks {lm.shape} must have the same length")

    # 1. exclusions
    keep = np.ones(n_rows, dtype=bool)
    ex_ids = list(exclude_ids)
    if ex_ids:
        keep &= ~id_s.isin(ex_ids).to_numpy()
    ex_lm = np.fromiter((int(x) for x in exclude_landmarks), dtype=np.int64)
    if len(ex_lm):
        keep &= ~np.isin(lm, ex_lm)
    n_excluded_images = int(n_rows - keep.sum())
    # 2. landmark filters
    uniq, inv, counts = _group(lm[keep])
    ok_lm = counts >= min_images
    if n_landmarks is not None and ok_lm.sum() > n_landmarks:
        lm_key = hash_keys(uniq, seed, _STREAM_LANDMARKS)
        eligible = np.flatnonzero(ok_lm)
        chosen = eligible[np.argsort(lm_key[eligible], kind="stable")[:n_landmarks]]
        ok_lm = np.zeros_like(ok_lm)
        ok_lm[chosen] = True
    kept = np.flatnonzero(keep)[ok_lm[inv]]
    kept_lm = lm[kept]
    uniq, inv, counts = _group(kept_lm)

    # 3. stratified hold-out with stochastic rounding, 4. per-landmark sampling
    img_key = hash_keys(id_s.iloc[kept], seed, _STREAM_IMAGE_ORDER)
    u = hash_keys(uniq, seed, _STREAM_ROUNDING).astype(np.float64) / 2.0**64
    n_val = np.floor(val_fraction * counts + u).astype(np.int64)
    np.minimum(n_val, counts, out=n_val)
    order = np.lexsort((img_key, inv))  # by landmark, then key
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(kept), dtype=np.int64)
    rank[order] = np.arange(len(kept)) - np.repeat(starts, counts)
    grp_val = n_val[inv]
    val_pool = rank < grp_val
    val_sel = rank < np.minimum(grp_val, val_per_landmark)
    train_sel = (rank >= grp_val) & (rank < grp_val + train_per_landmark)
    ordered = kept[order]
    train = ordered[train_sel[order]]
    val = ordered[val_sel[order]]

    n_train_l = np.bincount(inv[train_sel], minlength=len(uniq))
    n_val_l = np.bincount(inv[val_sel], minlength=len(uniq))
    n_val_pool_l = n_val
    stats: dict[str, Any] = {
        "input_images": int(n_rows),
        "input_landmarks": len(pd.unique(lm)),
        "excluded_images": n_excluded_images,
        "images": len(kept),
        "landmarks": len(uniq),
        "train_pool_images": int(len(kept) - val_pool.sum()),
        "val_pool_images": int(val_pool.sum()),
        "train_pool_landmarks": int(((counts - n_val_pool_l) > 0).sum()),
        "val_pool_landmarks": int((n_val_pool_l > 0).sum()),
        "train_images": len(train),
        "val_images": len(val),
        "train_landmarks": int((n_train_l > 0).sum()),
        "val_landmarks": int((n_val_l > 0).sum()),
        "landmarks_in_both": int(((n_train_l > 0) & (n_val_l > 0)).sum()),
        "landmarks_train_full": int((n_train_l == train_per_landmark).sum()),
        "landmarks_val_full": int((n_val_l == val_per_landmark).sum()),
        "landmarks_fully_covered": int(
            ((n_train_l == train_per_landmark) & (n_val_l == val_per_landmark)).sum()
        ),
        "long_tail": long_tail_histogram(counts),
    }
    return LandmarkSplit(kept=kept, val_pool=val_pool, train=train, val=val, stats=stats)


def _group(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)`` via hashing (faster)."""
    codes, uniq = pd.factorize(values, sort=True)
    inv = codes.astype(np.int64)
    return np.asarray(uniq, dtype=np.int64), inv, np.bincount(inv, minlength=len(uniq))


def long_tail_histogram(counts: np.ndarray) -> list[dict[str, Any]]:
    """Landmarks and images per bin of images-per-landmark (1, 2, 3-4, 5-8, ..., 1025+).

    Args:
        counts: (L,) images per landmark.
    """
    counts = np.asarray(counts, dtype=np.int64)
    edges = np.array((*_TAIL_EDGES, np.iinfo(np.int64).max))
    bins = np.searchsorted(edges, counts, side="right") - 1
    n_lm = np.bincount(bins, minlength=len(_TAIL_EDGES))
    n_img = np.bincount(bins, weights=counts, minlength=len(_TAIL_EDGES))
    out = []
    for b, lo in enumerate(_TAIL_EDGES):
        hi = edges[b + 1] - 1
        label = str(lo) if hi == lo else (f"{lo}+" if b == len(_TAIL_EDGES) - 1 else f"{lo}-{hi}")
        out.append(
            {"images_per_landmark": label, "landmarks": int(n_lm[b]), "images": int(n_img[b])}
        )
    return out


def read_landmark_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``id,landmark_id`` pairs from a GLD CSV (any of the three layouts, see module doc).

    Returns:
        a DataFrame with ``id`` (str) and ``landmark_id`` (int64) columns.

    Raises:
        ValueError: missing columns, a non-integer landmark id or a duplicated image id with
            two landmarks, naming the file (and the line where it helps).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"landmark CSV not found: {path}")
    header = pd.read_csv(path, nrows=0).columns.str.strip().str.lower().tolist()
    fallback = True
    if "images" in header and "landmark_id" in header and "id" not in header:
        raw = pd.read_csv(
            path,
            usecols=lambda c: c.strip().lower() in ("landmark_id", "images"),
            dtype={"images": "str"},
        )
        raw.columns = raw.columns.str.strip().str.lower()
        raw["id"] = raw["images"].fillna("").str.split()
        df = raw.explode("id")[["id", "landmark_id"]].dropna(subset=["id"])
        df = df[df["id"] != ""].reset_index(drop=True)
    elif "id" in header and "landmark_id" in header:
        df = _read_fast(path)
        fallback = df is None
        if df is None:  # not clean integers: the careful reader finds and names the bad rows
            df = pd.read_csv(
                path,
                usecols=lambda c: c.strip().lower() in ("id", "landmark_id"),
                dtype={"id": "str"},
                keep_default_na=False,
                na_values={"landmark_id": ["", "None", "nan"]},
            )
            df.columns = df.columns.str.strip().str.lower()
    else:
        raise ValueError(
            f"{path}: expected columns 'id,landmark_id' (or 'landmark_id,images'), got {header}"
        )
    lm = pd.to_numeric(df["landmark_id"], errors="coerce")
    bad = lm.isna() | (lm != lm.round())
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: {int(bad.sum())} row(s) without an integer landmark_id; first "
            f"is data row {first + 1} (id {df['id'].iloc[first]!r})"
        )
    df["landmark_id"] = lm.astype(np.int64)
    if df["id"].dtype != "str" or fallback:
        df["id"] = df["id"].astype("str").str.strip()
    # duplicates: cheap hash check first, strings only for the suspects
    h = hash_keys(df["id"], 0, 0)
    if len(np.unique(h)) < len(h):
        dup = df.duplicated(subset=["id"], keep=False)
        conflicts = df[dup].groupby("id")["landmark_id"].nunique()
        conflicts = conflicts[conflicts > 1]
        if len(conflicts):
            raise ValueError(
                f"{path}: {len(conflicts)} image id(s) listed under two landmarks, "
                f"e.g. {conflicts.index[0]!r}"
            )
        n_dup = int(df.duplicated(subset=["id"]).sum())
        logger.warning("%s: dropping %d repeated row(s)", path, n_dup)
        df = df.drop_duplicates(subset=["id"]).reset_index(drop=True)
    return df[["id", "landmark_id"]]


def _read_fast(path: Path) -> pd.DataFrame | None:
    """Multi-threaded pyarrow read of a clean ``id,...,landmark_id`` CSV, or ``None``."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    cols = pd.read_csv(path, nrows=0).columns.tolist()
    names = {c.strip().lower(): c for c in cols if c.strip().lower() in ("id", "landmark_id")}
    try:
        df = pd.read_csv(
            path,
            engine="pyarrow",
            usecols=[names["id"], names["landmark_id"]],
            dtype={names["id"]: "str", names["landmark_id"]: "int64"},
        )
    except Exception:
        return None
    df.columns = pd.Index([c.strip().lower() for c in df.columns])
    return df


def read_exclusions(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[int]]:
    """Image ids and landmark ids to exclude, from CSVs with an ``id`` and/or ``landmark_id``
    column (e.g. images or landmarks overlapping Revisited Oxford/Paris).

    A file with a single unnamed column is read as image ids.
    """
    ids: list[str] = []
    lms: list[int] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"exclusion list not found: {p}")
        df = pd.read_csv(p, dtype="str", keep_default_na=False)
        cols = [c.strip().lower() for c in df.columns]
        df.columns = pd.Index(cols)
        if "id" not in cols and "landmark_id" not in cols:
            if len(cols) != 1:
                raise ValueError(f"{p}: expected an 'id' and/or 'landmark_id' column, got {cols}")
            df = pd.read_csv(p, dtype="str", header=None, names=["id"], keep_default_na=False)
        if "id" in df.columns:
            ids.extend(v.strip() for v in df["id"] if v.strip())
        if "landmark_id" in df.columns:
            vals = [v.strip() for v in df["landmark_id"] if v.strip()]
            try:
                lms.extend(int(v) for v in vals)
            except ValueError as exc:
                raise ValueError(f"{p}: landmark_id column holds a non-integer ({exc})") from exc
    return ids, lms


def main(
    conf: dict[str, Any],
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Split ``csv_path`` with ``conf`` into ``out_dir/<output>-s<seed>/``; returns that folder.

    Skipped (returns at once) when the folder holds a finished split of the same configuration,
    input file (path, size, mtime) and exclusion lists, unless ``overwrite``.
    """
    conf = {**confs["paper"], **conf}
    csv_path = Path(csv_path)
    ex_paths = [Path(p) for p in exclude]
    folder = Path(out_dir) / f"{conf['output']}-s{int(conf['seed'])}"
    inputs = {"csv": _fingerprint(csv_path), "exclude": [_fingerprint(p) for p in ex_paths]}
    key = config_hash({"conf": conf, "inputs": inputs})
    stats_path = folder / "stats.json"
    if stats_path.exists() and not overwrite:
        try:
            old = read_json(stats_path)
        except ValueError:
            old = {}
        if isinstance(old, dict) and old.get("key") == key:
            logger.info("split already done: %s", folder)
            return folder
    t0 = time.perf_counter()
    df = read_landmark_csv(csv_path)
    ex_ids, ex_lms = read_exclusions(ex_paths)
    t_read = time.perf_counter() - t0
    result = split_landmarks(
        df["id"],
        df["landmark_id"].to_numpy(),
        val_fraction=float(conf["val_fraction"]),
        train_per_landmark=int(conf["train_per_landmark"]),
        val_per_landmark=int(conf["val_per_landmark"]),
        seed=int(conf["seed"]),
        n_landmarks=None if conf["n_landmarks"] is None else int(conf["n_landmarks"]),
        min_images=int(conf["min_images"]),
        exclude_ids=ex_ids,
        exclude_landmarks=ex_lms,
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write_rows(folder / "train.csv", df, result.train)
    _write_rows(folder / "val.csv", df, result.val)
    if conf["write_pools"]:
        _write_rows(folder / "train_pool.csv", df, result.kept[~result.val_pool])
        _write_rows(folder / "val_pool.csv", df, result.kept[result.val_pool])
    write_config(folder, conf)
    stats = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "inputs": inputs,
        "conf": conf,
        "excluded_ids_listed": len(ex_ids),
        "excluded_landmarks_listed": len(ex_lms),
        "seconds": {"read": round(t_read, 3), "total": round(time.perf_counter() - t0, 3)},
        **result.stats,
    }
    write_json(stats_path, stats)  # last: its presence marks the split as done
    logger.info(
        "split: %d train / %d val images from %d landmarks -> %s",
        stats["train_images"],
        stats["val_images"],
        stats["landmarks"],
        folder,
    )
    return folder


def _fingerprint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_rows(path: Path, df: pd.DataFrame, rows: np.ndarray) -> None:
    sub = df.iloc[rows].sort_values("id", kind="stable")
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False, lineterminator="\n")
