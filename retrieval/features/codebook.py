"""Visual-word codebooks: seeded faiss k-means on a sample of descriptors, ``.npy`` + JSON sidecar.

Convention (the Revisited protocol, as in the Detect-to-Retrieve and ASMK papers): the codebook
of a benchmark is trained on *another* dataset's descriptors, never on the benchmark itself --
Revisited Oxford uses a codebook trained on Revisited Paris and vice versa; the synthetic world
uses its GLD-style ``train/`` images. :func:`main` records the training set in the sidecar so a
result can always be traced to its codebook.

Files: ``<dir>/codebook.npy`` float32 (K, D) and ``<dir>/codebook.json`` (``format_version``,
size, dim, seed, iterations, training set, number of training descriptors, config hash).
Approximate assignment (``assignment="hnsw"``) caches its graph over the centroids beside them
(:func:`load_word_index`): ``<dir>/codebook.hnsw-m<M>-efc<EF>.faiss`` (``faiss.write_index``)
and its tagged JSON header ``<dir>/codebook.hnsw-m<M>-efc<EF>.json`` (``format``
``gldboxes-word-index``, ``format_version``, the codebook's SHA-1, the graph's parameters).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gldboxes.io import (
    atomic_path,
    config_hash,
    read_json,
    read_tagged_json,
    write_config,
    write_json,
)
from retrieval.index.assignment import (
    ASSIGNMENTS,
    HNSW_DEFAULTS,
    WordIndex,
    codebook_fingerprint,
)

__all__ = [
    "FORMAT_VERSION",
    "MIN_DESCRIPTORS_PER_WORD",
    "WORD_INDEX_FORMAT",
    "WORD_INDEX_VERSION",
    "confs",
    "load_codebook",
    "load_word_index",
    "main",
    "sample_descriptors",
    "sample_rows",
    "train_codebook",
    "word_assignment",
    "word_index_paths",
]

logger = logging.getLogger("retrieval.features.codebook")

FORMAT_VERSION = 1

#: The tag and version of a cached word index's JSON header (:func:`load_word_index`).
WORD_INDEX_FORMAT = "gldboxes-word-index"
WORD_INDEX_VERSION = 1

#: Fewer training descriptors per visual word than this draw a warning: k-means cannot place
#: the words well (faiss itself asks for at least 39 per centroid).
MIN_DESCRIPTORS_PER_WORD = 39

confs: dict[str, dict[str, Any]] = {
    # 1,024 words: the synthetic world and quick checks.
    "k1024": {
        "size": 1024,  # number of visual words K (1,000 .. 65,536)
        "niter": 20,  # k-means iterations
        "seed": 0,  # faiss k-means seed (and the descriptor sample's seed)
        "max_descriptors": 500_000,  # training sample size (0: all descriptors)
        "max_points_per_centroid": 256,  # faiss subsamples above K * this
        "nredo": 1,  # k-means restarts (best objective kept)
    },
    # The paper's 65,536 words (train on millions of descriptors of the other dataset).
    "k65536": {
        "size": 65536,
        "niter": 20,
        "seed": 0,
        "max_descriptors": 5_000_000,
        "max_points_per_centroid": 256,
        "nredo": 1,
    },
}


def train_codebook(
    descriptors: np.ndarray,
    size: int,
    *,
    seed: int = 0,
    niter: int = 20,
    max_points_per_centroid: int = 256,
    nredo: int = 1,
) -> np.ndarray:
    """Seeded k-means (faiss, exact L2 assignment).

    Args:
        descriptors: float32 (N, D) training descriptors, N >= size.
        size: number of centroids K.
        nredo: k-means runs from different seeded starts; the lowest objective wins.

    Returns:
        float32 (K, D) centroids.
    """
    import faiss

    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"codebook training descriptors must be (N, D), got shape {x.shape}")
    if size < 1:
        raise ValueError(f"codebook size must be >= 1, got {size}")
    if x.shape[0] < size:
        raise ValueError(
            f"codebook of {size} words needs at least {size} training descriptors, got {x.shape[0]}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("codebook training descriptors hold NaN or infinite values")
    km = faiss.Kmeans(
        x.shape[1],
        size,
        niter=niter,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        nredo=nredo,
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def sample_descriptors(
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    max_descriptors: int,
    seed: int,
) -> tuple[np.ndarray, int]:
    """A seeded uniform sample of the descriptors of one or several features HDF5 files.

    Args:
        features: a features file, or several (their images are pooled, in the given order).
        max_descriptors: sample size (0: all descriptors).
        seed: seed of the draw.

    Returns:
        ``(sample (M, D) float32, total number of descriptors in the files)``.
    """
    paths = (
        [Path(features)] if isinstance(features, str | os.PathLike) else [Path(p) for p in features]
    )
    if not paths:
        raise ValueError("codebook: no training features files given")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"features file not found: {path}")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(h5py.File(p, "r")) for p in paths]
        keys = [(f, n) for f in files for n in sorted(f.keys())]
        counts = np.array([f[n]["descriptors"].shape[0] for f, n in keys], np.int64)
        total = int(counts.sum())
        if total == 0:
            raise ValueError(f"{', '.join(map(str, paths))}: no descriptors to train a codebook on")
        items, bounds, rows = sample_rows(counts, max_descriptors, seed)
        parts = [  # per image of the training set, reading only the images sampled
            keys[i][0][keys[i][1]]["descriptors"][()][rows[a:b]]
            for i, (a, b) in zip(items.tolist(), itertools.pairwise(bounds.tolist()), strict=True)
        ]
    return np.concatenate(parts).astype(np.float32, copy=False), total


def sample_rows(
    counts: np.ndarray, max_rows: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded uniform sample, without replacement, of the rows of items holding ``counts``
    rows each (all rows when ``max_rows`` is falsy or not below the total), grouped by item.

    Args:
        counts: int (n_items,) rows of each item, in the order the draw numbers them.

    Returns:
        ``(items, bounds, rows)``: int64 (U,) the sampled items, ascending; int64 (U + 1,)
        their slices of ``rows``; int64 (M,) the sampled rows, as indices within their item.
    """
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    if max_rows and total > max_rows:
        pick = np.sort(rng.choice(total, size=max_rows, replace=False))
    else:
        pick = np.arange(total)
    offs = np.r_[0, np.cumsum(counts)]
    item = np.searchsorted(offs, pick, side="right") - 1
    starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]]) if pick.size else pick
    items = item[starts]
    return items, np.r_[starts, pick.size].astype(np.int64), pick - offs[item]


def load_codebook(path: str | os.PathLike[str]) -> np.ndarray:
    """Load ``codebook.npy`` (or its folder), checking it against its JSON sidecar.

    Returns:
        float32 (K, D).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "codebook.npy"
    if not path.exists():
        raise FileNotFoundError(f"codebook not found: {path}")
    try:
        cb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable codebook array ({exc})") from exc
    side = path.with_suffix(".json")
    if side.exists():
        meta = read_json(side)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{side}: unsupported format_version {meta.get('format_version')!r}")
        if [meta.get("size"), meta.get("dim")] != list(cb.shape):
            raise ValueError(
                f"{path}: shape {cb.shape} does not match its sidecar "
                f"({meta.get('size')}, {meta.get('dim')})"
            )
    if cb.ndim != 2 or not np.issubdtype(cb.dtype, np.floating):
        raise ValueError(
            f"{path}: a codebook must be a float (K, D) array, got {cb.dtype} {cb.shape}"
        )
    return np.ascontiguousarray(cb, dtype=np.float32)


def main(
    conf: dict[str, Any],
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    training_set: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Train a codebook on a sample of a features file and write it into ``output_dir``.

    Args:
        conf: a preset of :data:`confs` (or a dict with the same keys).
        features: the features HDF5 of the training set (another dataset than the benchmark),
            or several files pooled into one training set.
        output_dir: folder receiving ``codebook.npy``, ``codebook.json`` and ``config.yaml``.
        training_set: a name for the training set recorded in the sidecar (default: file name).

    Returns:
        the path of ``codebook.npy`` (skipped when it exists and not ``overwrite``).
    """
    out = Path(output_dir)
    npy = out / "codebook.npy"
    if npy.exists() and (out / "codebook.json").exists() and not overwrite:
        logger.info("codebook exists, skipping: %s", npy)
        return npy
    size, seed = int(conf["size"]), int(conf.get("seed", 0))
    t0 = time.perf_counter()
    x, total = sample_descriptors(features, int(conf.get("max_descriptors", 0)), seed)
    logger.info(
        "k-means: %d words on %d of %d descriptors (D=%d)", size, x.shape[0], total, x.shape[1]
    )
    per_word = x.shape[0] / max(size, 1)
    if per_word < MIN_DESCRIPTORS_PER_WORD:
        logger.warning(
            "codebook %s: %d training descriptors for %d words (%.1f per word; k-means wants at "
            "least %d): the words will be poorly placed. Train on more images (several "
            "--codebook-images folders, or --codebook-dataset), more features per image "
            "(--max-features), or fewer words (--codebook-size)",
            out.name,
            x.shape[0],
            size,
            per_word,
            MIN_DESCRIPTORS_PER_WORD,
        )
    cb = train_codebook(
        x,
        size,
        seed=seed,
        niter=int(conf.get("niter", 20)),
        max_points_per_centroid=int(conf.get("max_points_per_centroid", 256)),
        nredo=int(conf.get("nredo", 1)),
    )
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, cb, allow_pickle=False)
    write_json(
        out / "codebook.json",
        {
            "format_version": FORMAT_VERSION,
            "size": size,
            "dim": int(cb.shape[1]),
            "seed": seed,
            "niter": int(conf.get("niter", 20)),
            "training_set": training_set or _names(features),
            "training_features": _names(features, full=True),
            "n_training_descriptors": int(x.shape[0]),
            "descriptors_per_word": round(per_word, 2),
            "n_available_descriptors": total,
            "config_hash": config_hash(conf),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    write_config(out, conf)
    return npy


def _names(features: Any, *, full: bool = False) -> str:
    """The training file name(s), joined with ``+``."""
    paths = [features] if isinstance(features, str | os.PathLike) else list(features)
    return "+".join(os.fspath(p) if full else Path(p).name for p in paths)


def _codebook_npy(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / "codebook.npy" if p.is_dir() else p


def word_index_paths(
    codebook_path: str | os.PathLike[str],
    *,
    m: int = HNSW_DEFAULTS["m"],
    ef_construction: int = HNSW_DEFAULTS["ef_construction"],
) -> tuple[Path, Path]:
    """The cached HNSW graph of a codebook and its JSON header: ``(<stem>.hnsw-m<M>-efc<EF>.faiss,
    <stem>.hnsw-m<M>-efc<EF>.json)`` beside ``codebook.npy`` (or the folder's)."""
    npy = _codebook_npy(codebook_path)
    stem = npy.with_suffix("")
    name = f"{stem.name}.hnsw-m{int(m)}-efc{int(ef_construction)}"
    return npy.with_name(f"{name}.faiss"), npy.with_name(f"{name}.json")


def load_word_index(
    codebook_path: str | os.PathLike[str],
    *,
    m: int = HNSW_DEFAULTS["m"],
    ef_construction: int = HNSW_DEFAULTS["ef_construction"],
    ef_search: int = HNSW_DEFAULTS["ef_search"],
    overwrite: bool = False,
) -> WordIndex:
    """The HNSW word index of a codebook file: read from its cache beside ``codebook.npy``, or
    built (single-threaded, deterministic) and cached there on first use.

    A cache whose header names another codebook (retrained: its SHA-1 differs) or whose graph
    does not hold the codebook's K x D is rebuilt, with a log line.

    Args:
        codebook_path: ``codebook.npy`` or its folder.
        m, ef_construction: the graph's parameters (part of the cache's file name).
        ef_search: the search beam of the returned index (a search setting, not cached).
        overwrite: rebuild even when a valid cache exists.

    Returns:
        a :class:`retrieval.index.assignment.WordIndex`, for ``aggregate_many(...,
        assignment=...)``.

    Raises:
        FileNotFoundError: no codebook. ValueError: the cache header is not ours or of another
            version, or the graph file is unreadable.
    """
    import faiss

    npy = _codebook_npy(codebook_path)
    cb = load_codebook(npy)
    fingerprint = codebook_fingerprint(cb)
    graph, header = word_index_paths(npy, m=m, ef_construction=ef_construction)
    if graph.exists() and header.exists() and not overwrite:
        head = read_tagged_json(header, WORD_INDEX_FORMAT, WORD_INDEX_VERSION, "word index header")
        if head.get("codebook_sha1") == fingerprint and head.get("bytes") == graph.stat().st_size:
            try:
                index = faiss.read_index(os.fspath(graph))
            except RuntimeError as exc:
                raise ValueError(f"{graph}: unreadable faiss index ({exc})") from exc
            if (int(index.ntotal), int(index.d)) == cb.shape:
                return WordIndex(
                    index,
                    fingerprint=fingerprint,
                    m=m,
                    ef_construction=ef_construction,
                    ef_search=ef_search,
                )
        logger.info("%s: cached word index does not match %s; rebuilding", graph, npy)
    t0 = time.perf_counter()
    built = WordIndex.build(cb, m=m, ef_construction=ef_construction, ef_search=ef_search)
    with atomic_path(graph) as tmp:
        faiss.write_index(built.index, os.fspath(tmp))
    write_json(
        header,
        {
            "format": WORD_INDEX_FORMAT,
            "format_version": WORD_INDEX_VERSION,
            "method": "hnsw",
            "codebook": npy.name,
            "codebook_sha1": fingerprint,
            "size": int(cb.shape[0]),
            "dim": int(cb.shape[1]),
            "m": int(m),
            "ef_construction": int(ef_construction),
            "bytes": graph.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    logger.info("word index (HNSW m=%d) of %s built in %.1f s", m, npy, time.perf_counter() - t0)
    return built


def word_assignment(
    codebook_path: str | os.PathLike[str],
    assignment: str,
    *,
    m: int = HNSW_DEFAULTS["m"],
    ef_construction: int = HNSW_DEFAULTS["ef_construction"],
    ef_search: int = HNSW_DEFAULTS["ef_search"],
) -> str | WordIndex:
    """What a run passes as ``aggregate_many(..., assignment=...)`` for its conf value:
    ``"exact"`` as is, ``"hnsw"`` as the codebook's cached :class:`WordIndex`
    (:func:`load_word_index`)."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS}")
    if assignment == "exact":
        return "exact"
    return load_word_index(codebook_path, m=m, ef_construction=ef_construction, ef_search=ef_search)
