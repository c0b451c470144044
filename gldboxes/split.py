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

import csv
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gldboxes.boxes import image_id_problem
from gldboxes.io import atomic_path, config_hash, read_json, write_config, write_json

__all__ = [
    "FORMAT_VERSION",
    "LandmarkSplit",
    "confs",
    "hash_keys",
    "long_tail_histogram",
    "main",
    "output_name_problem",
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
    lm = _as_landmark_array(landmarks)
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
    starts = np.cumsum(counts) - counts  # (also right when nothing is left)
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


def _as_landmark_array(landmarks: np.ndarray | pd.Series) -> np.ndarray:
    """(N,) int64 landmark ids; ``ValueError`` for fractions, negatives or int64 overflow."""
    arr = np.asarray(landmarks)
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"landmarks: {int(arr.max())} does not fit a 64-bit integer")
    if arr.dtype.kind == "f":
        ok = np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) < 2.0**63)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"landmarks: index {i} holds {arr[i]}, not an integer")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"landmarks: expected integers, got dtype {arr.dtype}")
    lm = arr.astype(np.int64)
    neg = lm < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"landmarks: index {i} holds {int(lm[i])}; ids must be >= 0")
    return lm


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

    Every row is checked (vectorised): landmark ids must be non-negative integers that fit in
    int64, image ids non-empty, printable and safe as file names (no ``/``, ``\\`` or ``..``).

    Returns:
        a DataFrame with ``id`` (str) and ``landmark_id`` (int64) columns.

    Raises:
        ValueError: ``"FILE:LINE: what is wrong"`` for an empty file, a header without rows,
            missing columns, a bad landmark or image id, or an image id under two landmarks.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"landmark CSV not found: {path}")
    try:
        header = pd.read_csv(path, nrows=0).columns.str.strip().str.lower().tolist()
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}:1: empty file; expected a header 'id,landmark_id'") from None
    row_of: np.ndarray | None = None  # data row of each output row when not the identity
    if "images" in header and "landmark_id" in header and "id" not in header:
        raw = pd.read_csv(
            path,
            usecols=lambda c: c.strip().lower() in ("landmark_id", "images"),
            dtype="str",
            keep_default_na=False,
        )
        raw.columns = raw.columns.str.strip().str.lower()
        raw["id"] = raw["images"].str.split()
        df = raw.explode("id")[["id", "landmark_id"]]  # the index stays the data row
        df = df[df["id"].notna()]
        row_of = df.index.to_numpy()
        df = df.reset_index(drop=True)
    elif "id" in header and "landmark_id" in header:
        fast = _read_fast(path)
        if fast is None:  # not clean integers: read text, the checks below name the bad row
            df = pd.read_csv(
                path,
                usecols=lambda c: c.strip().lower() in ("id", "landmark_id"),
                dtype="str",
                keep_default_na=False,
            )
            df.columns = df.columns.str.strip().str.lower()
            df["id"] = df["id"].str.strip()
        else:
            df = fast
    else:
        raise ValueError(
            f"{path}:1: expected columns 'id,landmark_id' (or 'landmark_id,images'), got {header}"
        )
    if len(df) == 0:
        raise ValueError(f"{path}:2: no rows (only a header); expected 'id,landmark_id' rows")
    df["landmark_id"] = _check_landmark_ids(path, df["landmark_id"], row_of)
    _check_image_ids(path, df["id"], row_of)
    # duplicates: cheap hash check first, strings only for the suspects
    h = hash_keys(df["id"], 0, 0)
    if len(np.unique(h)) < len(h):
        dup = df[df.duplicated(subset=["id"], keep=False)]
        first_lm = dup.groupby("id")["landmark_id"].transform("first")
        clash = np.flatnonzero((dup["landmark_id"] != first_lm).to_numpy())
        if len(clash):
            row = int(dup.index[clash[0]])
            n_ids = dup["id"].iloc[clash].nunique()
            raise ValueError(
                f"{path}:{_line(path, row, row_of)}: image id {dup['id'].iloc[clash[0]]!r} "
                f"listed under two landmarks ({first_lm.iloc[clash[0]]} and "
                f"{dup['landmark_id'].iloc[clash[0]]}); {n_ids} such id(s) in the file"
            )
        n_dup = int(df.duplicated(subset=["id"]).sum())
        logger.warning("%s: dropping %d repeated row(s)", path, n_dup)
        df = df.drop_duplicates(subset=["id"]).reset_index(drop=True)
    return df[["id", "landmark_id"]]


_INT64_MAX_TEXT = str(np.iinfo(np.int64).max)
# An image id becomes a file name (``<id>.jpg``): no separators, no parent references, printable.
# This flags suspects only (any non-ASCII too); ``image_id_problem`` decides.
_SUSPECT_ID = r"[/\\]|\.\.|^\s*$|[^\x21-\x7e]"
_SCAN_BYTES = 8 << 20  # bytes of ids scanned per step (temporaries stay under 32 MB)


def _check_landmark_ids(path: Path, values: pd.Series, row_of: np.ndarray | None) -> np.ndarray:
    """(N,) int64 landmark ids, or ``ValueError`` ``FILE:LINE`` at the first bad one.

    ``values`` are int64 (a clean fast read: only the sign is left to check) or text, which must
    be digits (surrounding spaces allowed) of a value up to ``2**63 - 1``.
    """
    if values.dtype == np.int64:
        lm = values.to_numpy()
        neg = lm < 0
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            raise ValueError(
                f"{path}:{_line(path, i, row_of)}: landmark_id {int(lm[i])} is negative; landmark "
                f"ids are non-negative integers ({int(neg.sum())} such row(s) in the file)"
            )
        return lm
    text = values.astype("str").fillna("").str.strip()
    digits = text.str.fullmatch(r"[0-9]+").fillna(False).to_numpy(dtype=bool)
    body = text.str.lstrip("0")
    n = body.str.len().to_numpy()
    big = digits & ((n > 19) | ((n == 19) & (body > _INT64_MAX_TEXT).to_numpy(dtype=bool)))
    bad = ~digits | big
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = (
            "does not fit a 64-bit integer"
            if big[i]
            else "is not a non-negative integer"
            if text.iloc[i]
            else "is missing"
        )
        raise ValueError(
            f"{path}:{_line(path, i, row_of)}: landmark_id {text.iloc[i]!r} {what} "
            f"({int(bad.sum())} bad row(s) in the file)"
        )
    return text.astype(np.int64).to_numpy()


def _check_image_ids(path: Path, ids: pd.Series, row_of: np.ndarray | None) -> None:
    """``ValueError`` ``FILE:LINE`` at the first empty, unprintable or path-like image id.

    A vectorised pass flags suspects (see :func:`_suspect_ids`); only those few are judged in
    Python by :func:`gldboxes.boxes.image_id_problem` (a printable non-ASCII id is fine).
    """
    suspect = _suspect_ids(ids)
    if not suspect.any():
        return
    rows = np.flatnonzero(suspect)
    verdicts = [image_id_problem(v) for v in ids.iloc[rows].tolist()]
    bad = [(int(r), v) for r, v in zip(rows, verdicts, strict=True) if v]
    if bad:
        row, what = bad[0]
        raise ValueError(
            f"{path}:{_line(path, row, row_of)}: {what} ({len(bad)} bad row(s) in the file)"
        )


def _suspect_ids(ids: pd.Series) -> np.ndarray:
    """(N,) bool: ids that may be empty, blank, unprintable or path-like (a superset).

    For Arrow-backed strings this scans the UTF-8 bytes directly, in chunks: any byte outside
    ``!``..``~``, ``/``, ``\\`` or ``..`` flags its row (a ``..`` across two ids flags the first:
    it is only a suspect). Other string arrays take a regex.
    """
    suspect = ids.isna().to_numpy(dtype=bool, copy=True)
    chunked = getattr(ids.array, "_pa_array", None)
    if chunked is None:
        found = ids.str.contains(_SUSPECT_ID, regex=True).fillna(True)
        return suspect | found.to_numpy(dtype=bool)
    import pyarrow as pa

    start = 0
    for chunk in chunked.chunks:
        m = len(chunk)
        if m == 0:
            continue
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            chunk = chunk.cast(pa.large_string())  # e.g. string_view
        bufs = chunk.buffers()
        off_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=off_type)[chunk.offset : chunk.offset + m + 1]
        offsets = offsets.astype(np.int64, copy=False)
        suspect[start : start + m] |= offsets[1:] == offsets[:-1]  # empty ids
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0)
        lo, hi = int(offsets[0]), int(offsets[-1])
        for c0 in range(lo, hi, _SCAN_BYTES):
            c1 = min(hi, c0 + _SCAN_BYTES + 1)  # one byte of overlap for '..'
            b = data[c0:c1]
            bad = (b <= 0x20) | (b >= 0x7F) | (b == 0x2F) | (b == 0x5C)
            dots = b == 0x2E
            bad[:-1] |= dots[:-1] & dots[1:]
            pos = np.flatnonzero(bad)
            if len(pos):
                rows = np.searchsorted(offsets, pos + c0, side="right") - 1
                suspect[start + rows] = True
        start += m
    return suspect


def _line(path: Path, row: int, row_of: np.ndarray | None = None) -> int:
    """1-based file line where data row ``row`` starts (header and blank lines skipped, quoted
    newlines followed, as pandas reads them); ``row_of`` maps output rows to data rows first.

    Only called on the error path: it scans the file up to that row.
    """
    data_row = int(row_of[row]) if row_of is not None else row
    seen = -1  # the header is record -1
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        prev = 0
        for record in reader:
            start, prev = prev + 1, reader.line_num
            if not record:
                continue
            if seen == data_row:
                return start
            seen += 1
    return data_row + 2


def _read_fast(path: Path) -> pd.DataFrame | None:
    """Multi-threaded pyarrow read of an ``id,...,landmark_id`` CSV whose landmark ids all
    parse as int64, or ``None`` (then the text reader finds and names the bad rows)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    cols = pd.read_csv(path, nrows=0).columns.tolist()
    names = {c.strip().lower(): c for c in cols if c.strip().lower() in ("id", "landmark_id")}
    try:
        # landmark_id type inferred, not forced: forcing int64 truncates 3.5 and wraps 1e23
        df = pd.read_csv(
            path,
            engine="pyarrow",
            usecols=[names["id"], names["landmark_id"]],
            dtype={names["id"]: "str"},
        )
    except Exception:
        return None
    df.columns = pd.Index([c.strip().lower() for c in df.columns])
    if df["landmark_id"].dtype != np.int64:
        return None
    return df


def read_exclusions(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[int]]:
    """Image ids and landmark ids to exclude, from CSVs with an ``id`` and/or ``landmark_id``
    column (e.g. images or landmarks overlapping Revisited Oxford/Paris).

    A file with a single unnamed column is read as image ids.

    Raises:
        ValueError: ``"FILE:LINE: ..."`` at a landmark id that is not a non-negative integer.
    """
    ids: list[str] = []
    lms: list[int] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"exclusion list not found: {p}")
        try:
            df = pd.read_csv(p, dtype="str", keep_default_na=False)
        except pd.errors.EmptyDataError:
            continue  # an empty list excludes nothing
        cols = [c.strip().lower() for c in df.columns]
        df.columns = pd.Index(cols)
        if "id" not in cols and "landmark_id" not in cols:
            if len(cols) != 1:
                raise ValueError(f"{p}:1: expected an 'id' and/or 'landmark_id' column, got {cols}")
            df = pd.read_csv(p, dtype="str", header=None, names=["id"], keep_default_na=False)
        if "id" in df.columns:
            ids.extend(v.strip() for v in df["id"] if v.strip())
        if "landmark_id" in df.columns:
            col = df["landmark_id"].str.strip()
            rows = np.flatnonzero((col != "").to_numpy(dtype=bool))
            lms.extend(_check_landmark_ids(p, col.iloc[rows], rows).tolist())
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
    problem = output_name_problem(conf["output"])
    if problem:
        raise ValueError(f"conf 'output': {problem}")
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


def output_name_problem(name: object) -> str:
    """What makes ``name`` unusable as the split's folder name prefix, or ``""``."""
    if not isinstance(name, str) or not name.strip():
        return f"folder name {name!r} is empty"
    if "/" in name or "\\" in name or ".." in name or not name.isprintable():
        return f"folder name {name!r} must be one printable path component (no '/', '\\', '..')"
    return ""


def _fingerprint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_rows(path: Path, df: pd.DataFrame, rows: np.ndarray) -> None:
    sub = df.iloc[rows].sort_values("id", kind="stable")
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False, lineterminator="\n")
