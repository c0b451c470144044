"""Scale run: ASMK* inverted files of 100k to 1M synthetic images, built, opened and searched.

The database is generated directly in aggregated form (what :func:`retrieval.index.aggregation.
aggregate_many` returns for ASMK*): per image a set of visual-word ids and one packed 128-bit
sign signature per word, vectorised and seeded, block by block of ``--block`` images (block
``b`` comes from ``default_rng([seed, b])``, so an image is the same whatever the part size).

* Word frequencies follow a Zipf law over a fixed random permutation of the ``K`` words
  (``p(rank r) ~ r^-s``, ``s = --zipf``, default 0.5: imbalance factor ``K sum p^2`` 2.9 at
  K=65,536, above the ~1.2-1.6 of k-means codebooks, so the long posting lists are longer than
  real ones, not shorter). An image draws words with replacement and keeps the distinct ones;
  the number of draws is set so that the expected number of distinct words is the target
  (uniform in ``--words``, default 300-1,000 at K=65,536).
* Signatures are random bits; each query is a planted near-copy of one database image (70% of
  its words, each signature with 15% of its bits flipped, plus 30% fresh words), so the copy
  must come first in its ranking: the run checks it (``planted at rank 1``).

Each size runs in its own child process (so each peak RSS is that size's alone; phase peaks by
resetting ``VmHWM`` through ``/proc/self/clear_refs``). Above ``--part-images`` images the index
is built as parts by image-id range (the repository's layout for large indexes), each part
built by :meth:`InvertedFile.build` and written by :meth:`InvertedFile.save`, and searched part
by part: ASMK* scores of an image do not depend on other images (no idf), so the merged top-k
of the parts is exactly the one index's. (One index of 1M images cannot be built in ~10 GB:
its input batch alone is 650M postings x 20 bytes = 13 GB; parts of 131,072 images peak at
~5.5 GB.) The child prints and returns, per size:

* generation and build time, peak RSS of the build and of the search phases;
* bytes per image in memory (``InvertedFile.stats``) and on disk (the saved folders);
* open time of the saved index (:meth:`InvertedFile.load`, memory-mapped);
* per-query latency, top-100 and full ranking, one query at a time and batched, with the
  thread count of each row (numba's thread count, and the ``num_threads``-like keyword of
  :meth:`InvertedFile.search` when it has one).

Every time is given as wall time and as process CPU time (all threads): on a shared machine the
wall time measures the machine's load too, and one-thread rows compare CPU time with the peer.

``--asmk`` runs the ``asmk`` package (jenicek/asmk 0.1.1) on the same words and signatures at
sizes up to ``--asmk-max`` (default 100,000), through its lowest-level API (``asmk.
inverted_file.IVF.add`` / ``IVF.search`` with ``ASMKKernel.similarity``; signatures repacked to
its MSB-first uint32 words, bit for bit the same Hamming distances): its build (``add``), peak
RSS, pickle bytes, open time (unpickle) and per-query latency (it has no batched search and
always sorts every image), and how often its top-100 scores and ids equal ours. asmk's
``IVF.add`` is a Python loop over postings (~3 us and ~36 bytes each): at 1M images it would
take hours, so it only runs up to ``--asmk-max``. Install it with::

    .venv/bin/pip install cython
    .venv/bin/pip install --no-deps --no-build-isolation asmk

``--r1m DIR,...`` measures the R1M index size: for each real index folder (e.g.
``runs/real-s4/index/asmk_star-...``, ``.../d2r_max-...``), a synthetic index of ``--r1m-images``
images whose images copy the items (regions) per image and words per item of randomly drawn
real images (``words_per_image.npy``, ``item_image.npy``), built part by part, each part saved,
measured and deleted: the sum of the bytes written, not an extrapolation.

Run (the 1M size needs ~12-14 GB of free disk under ``--tmp`` and ~5 GB of memory)::

    .venv/bin/python benchmarks/scale.py --sizes 100000,1000000 --asmk --json scale.json
    .venv/bin/python benchmarks/scale.py --sizes "" --r1m runs/real/index/asmk_star-...,\
        runs/real/index/d2r_max-...-rmacb-L1-...
"""

from __future__ import annotations

import os

# BLAS threads (unused by the search) pinned to 1; numba's pool keeps all cores and each row
# sets its own thread count.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["BLOCK", "WordModel", "generate", "main", "merge_top"]

#: Default images generated per seeded block (parts are whole blocks).
BLOCK = 8192
DIM = 128
NBYTES = DIM // 8
KERNEL = "asmk_star"

Sampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------- synthetic data
@dataclass(frozen=True)
class WordModel:
    """A Zipf word distribution over ``k`` words and how many draws give ``t`` distinct words.

    Attributes:
        k: codebook size K.
        exponent: Zipf exponent s (``p ~ rank^-s``).
        p: float64 (K,) probability of each rank.
        perm: int64 (K,) word id of each rank (a seeded permutation).
        accept, alias: float64 (K,), int64 (K,) Walker's alias table over word ids (one
            uniform slot, one uniform for accept-or-alias: O(1) a draw).
        distinct: float64 (M,) expected distinct words after ``n`` draws, ``n = 0..M-1``.
    """

    k: int
    exponent: float
    p: np.ndarray
    perm: np.ndarray
    accept: np.ndarray
    alias: np.ndarray
    distinct: np.ndarray

    @classmethod
    def make(cls, k: int, exponent: float, seed: int, max_words: int) -> WordModel:
        if k < 2 or max_words < 1 or max_words >= k:
            raise ValueError(f"WordModel: need 2 <= k and 1 <= max_words < k, got {k}, {max_words}")
        p = np.arange(1, k + 1, dtype=np.float64) ** -float(exponent)
        p /= p.sum()
        lq = np.log1p(-p)
        m = int(3 * max_words) + 2
        chunks = []
        for a in range(0, m, 128):  # sum_w 1 - (1 - p_w)^n, in chunks of n, until max_words
            n = np.arange(a, min(m, a + 128), dtype=np.float64)
            chunks.append(k - np.exp(n[:, None] * lq[None, :]).sum(1))
            if chunks[-1][-1] >= max_words:
                break
        distinct = np.concatenate(chunks)
        if distinct[-1] < max_words:
            raise ValueError(f"WordModel: {max_words} distinct words unreachable at s={exponent}")
        perm = np.random.default_rng([seed, 1 << 30]).permutation(k)
        accept, alias = _alias_table(p[np.argsort(perm)])  # probabilities by word id
        return cls(
            k=k,
            exponent=float(exponent),
            p=p,
            perm=perm,
            accept=accept,
            alias=alias,
            distinct=distinct,
        )

    @property
    def imbalance(self) -> float:
        """K * sum p^2 (1 for uniform word use)."""
        p = self.p
        return float(self.k * np.sum(p * p))

    def draws(self, targets: np.ndarray) -> np.ndarray:
        """int64 draws per item whose expected distinct count is ``targets`` (int (n,))."""
        return np.searchsorted(self.distinct, np.asarray(targets, np.float64)).astype(np.int64)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """int64 (n,) word ids drawn with replacement."""
        slot = rng.integers(0, self.k, n)
        return np.where(rng.random(n) < self.accept[slot], slot, self.alias[slot])


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker / Vose alias table of probabilities ``p`` (K,): ``(accept, alias)``."""
    k = p.size
    scaled = p * k
    accept = np.ones(k)
    alias = np.arange(k)
    small = [i for i in range(k) if scaled[i] < 1.0]
    large = [i for i in range(k) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return accept, alias


def uniform_words(lo: int, hi: int) -> Sampler:
    """One item per image, its target distinct words uniform in ``[lo, hi]``."""

    def sampler(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(n, np.int64), rng.integers(lo, hi + 1, n)

    return sampler


def profile_words(items_per_image: np.ndarray, words_per_item: np.ndarray) -> Sampler:
    """Each image copies the item count and words per item of a random real image.

    Args:
        items_per_image: int (n_real,) items (regions) of each real image.
        words_per_item: int (sum items_per_image,) distinct words of each real item, by image.
    """
    start = np.r_[0, np.cumsum(items_per_image)[:-1]]

    def sampler(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(0, items_per_image.size, n)
        ipi = items_per_image[pick]
        first = np.repeat(start[pick], ipi)
        within = np.arange(int(ipi.sum())) - np.repeat(np.cumsum(ipi) - ipi, ipi)
        return ipi, words_per_item[first + within]

    return sampler


def generate(
    model: WordModel, sampler: Sampler, seed: int, block: int, n_images: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block ``block`` of the synthetic database: ``n_images`` images.

    Returns:
        ``(items_per_image, offsets, words, data)``: int64 (n_images,), int64 (n_items + 1,),
        uint32 (n_rows,) sorted distinct words per item, uint8 (n_rows, 16) packed signatures.
    """
    rng = np.random.default_rng([seed, block])
    ipi, targets = sampler(rng, n_images)
    n_items = int(targets.size)
    nd = model.draws(targets)
    key = np.repeat(np.arange(n_items, dtype=np.int64) * model.k, nd)
    key += model.sample(rng, key.size)
    key.sort()
    key = key[np.r_[True, key[1:] != key[:-1]]] if key.size else key
    item, words = np.divmod(key, model.k)
    offsets = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(item, minlength=n_items), out=offsets[1:])
    data = np.frombuffer(rng.bytes(words.size * NBYTES), np.uint8).reshape(-1, NBYTES)
    return ipi, offsets, words.astype(np.uint32), data


def _blocks(n_images: int, lo: int, hi: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(block, its first image, images in it) for the blocks of ``size`` images holding images
    ``lo..hi-1`` (``lo`` a multiple of ``size``)."""
    for b in range(lo // size, (hi - 1) // size + 1):
        yield b, b * size, min(size, n_images - b * size)


def _planted_query(
    rng: np.random.Generator, model: WordModel, words: np.ndarray, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A near-copy of one image: 70% of its words (15% of bits flipped) + 30% fresh words."""
    keep = rng.random(words.size) < 0.7
    w, d = words[keep].astype(np.int64), data[keep].copy()
    flips = np.packbits(rng.random((w.size, DIM)) < 0.15, axis=1)
    d ^= flips
    fresh = np.setdiff1d(model.sample(rng, int(0.3 * words.size)), words)
    w = np.r_[w, fresh]
    d = np.r_[d, np.frombuffer(rng.bytes(fresh.size * NBYTES), np.uint8).reshape(-1, NBYTES)]
    order = np.argsort(w)
    return w[order].astype(np.uint32), np.ascontiguousarray(d[order])


# ---------------------------------------------------------------------- measurement helpers
def _reset_peak() -> bool:
    """Reset VmHWM (Linux ``clear_refs`` 5); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), else since the start (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Clock:
    """Wall and process CPU seconds (all threads) of a ``with`` block, added to ``into``."""

    def __init__(self, into: dict[str, Any] | None = None, name: str = "") -> None:
        self.into, self.name = into, name
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c
        if self.into is not None:
            self.into[f"{self.name}_s"] = self.into.get(f"{self.name}_s", 0.0) + self.wall
            self.into[f"{self.name}_cpu"] = self.into.get(f"{self.name}_cpu", 0.0) + self.cpu


def _rss_split() -> tuple[int, int]:
    """Current (anonymous, file-backed) RSS in bytes: mapped index pages are file-backed (page
    cache the kernel may drop), not memory the process allocated. (0, 0) if unknown."""
    vals = {"RssAnon:": 0, "RssFile:": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0] + ":"
            if key in vals:
                vals[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return vals["RssAnon:"], vals["RssFile:"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _thread_kw() -> str | None:
    """The thread-count keyword of InvertedFile.search, if it has one."""
    from retrieval.index.inverted_file import InvertedFile

    params = inspect.signature(InvertedFile.search).parameters
    return next(
        (n for n in ("threads", "n_threads", "num_threads", "workers") if n in params), None
    )


def _set_threads(n: int) -> int:
    """Set numba's thread count (clamped to its pool); returns the count in force."""
    import numba

    n = max(1, min(n, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


def merge_top(
    results: list[tuple[np.ndarray, np.ndarray]], starts: list[int], k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part rankings into the ranking over all parts, as the product does
    (:func:`retrieval.index.sharded.merge_topk`).

    Args:
        results: per part, ``(ids, scores)`` int64 / float64 (n_queries, k_part), each row by
            decreasing score with ties by ascending id (:meth:`InvertedFile.search`).
        starts: first image id of each part (ascending).
        k: results to keep (None: all).

    Returns:
        ``(ids, scores)`` (n_queries, k), global ids.
    """
    from retrieval.index.sharded import merge_topk

    if len(results) != len(starts) or not results:
        raise ValueError(f"merge_top: {len(results)} results for {len(starts)} parts")
    ids = [r[0] + s for r, s in zip(results, starts, strict=True)]
    return merge_topk(ids, [r[1] for r in results], k)


# ---------------------------------------------------------------------- children
def _build_parts(
    args: argparse.Namespace,
    model: WordModel,
    sampler: Sampler,
    n: int,
    out: Path,
    *,
    keep: bool,
    regional: bool = False,
    plant: np.ndarray | None = None,
) -> dict[str, Any]:
    """Generate and build the index of ``n`` images part by part under ``out``."""
    from retrieval.index.aggregation import AggregatedBatch
    from retrieval.index.inverted_file import InvertedFile

    part = max(args.block, args.part_images // args.block * args.block)
    rng = np.random.default_rng([args.seed, 1 << 31])
    qsrc: list[tuple[np.ndarray, np.ndarray]] = []
    res: dict[str, Any] = {"parts": []}
    nbytes = disk = items = postings = 0
    planted = np.zeros(0, np.int64) if plant is None else plant
    _reset_peak()
    for i, lo in enumerate(range(0, n, part)):
        hi = min(n, lo + part)
        with _Clock(res, "gen"):
            blocks = []
            for b, b0, m in _blocks(n, lo, hi, args.block):
                ipi, off, words, data = generate(model, sampler, args.seed, b, m)
                for j in np.flatnonzero((planted >= b0) & (planted < b0 + m)):
                    a, z = off[planted[j] - b0], off[planted[j] - b0 + 1]
                    qsrc.append(_planted_query(rng, model, words[a:z], data[a:z]))
                batch = AggregatedBatch(offsets=off, words=words, data=data, dim=DIM)
                blocks.append((ipi, batch))
            ipi = np.concatenate([x[0] for x in blocks])
            batch = AggregatedBatch.concatenate([x[1] for x in blocks])
            del blocks
        with _Clock(res, "build"):
            ivf = InvertedFile.build(
                batch,
                model.k,
                KERNEL,
                item_image=np.repeat(np.arange(ipi.size), ipi) if regional else None,
                pooling="max" if regional else None,
            )
            del batch
        st = ivf.stats()
        nbytes += int(st["bytes"])
        items += int(st["items"])
        postings += int(st["postings"])
        with _Clock(res, "save"):
            path = ivf.save(out / f"part-{i:04d}")
        del ivf
        disk += _dir_bytes(path)
        res["parts"].append({"path": str(path), "start": lo, "images": hi - lo})
        if not keep:
            shutil.rmtree(path)
    res.update(
        images=n,
        items=items,
        postings=postings,
        words_per_item=postings / max(items, 1),
        items_per_image=items / max(n, 1),
        bytes_memory=nbytes,
        bytes_disk=disk,
        peak_build=_peak_bytes(),
    )
    res["queries"] = qsrc
    return res


def _child_ours(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    """Build, open and search our index of ``n`` images (one child process per size)."""
    from retrieval.index.aggregation import AggregatedBatch
    from retrieval.index.inverted_file import InvertedFile

    lo, hi = (int(x) for x in args.words.split(","))
    model = WordModel.make(args.codebook_size, args.zipf, args.seed, hi)
    # numba compiles (or loads from its cache) on first use: outside the timed sections.
    t0 = time.perf_counter()
    _, off, w, d = generate(model, uniform_words(lo, hi), args.seed, 1 << 20, 4)
    tiny = AggregatedBatch(offsets=off, words=w, data=d, dim=DIM)
    small = InvertedFile.build(tiny, model.k, KERNEL)
    for k in (2, None):
        small.search(tiny, k)
        first = AggregatedBatch(offsets=off[:2], words=w[: off[1]], data=d[: off[1]], dim=DIM)
        small.search(first, k)
    warm = time.perf_counter() - t0
    plant = np.sort(np.random.default_rng([args.seed, 7]).choice(n, args.queries, replace=False))
    res = _build_parts(args, model, uniform_words(lo, hi), n, tmp, keep=True, plant=plant)
    qsrc = res.pop("queries")
    counts = np.array([len(w) for w, _ in qsrc])
    q = AggregatedBatch(
        offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        words=np.concatenate([w for w, _ in qsrc]),
        data=np.concatenate([d for _, d in qsrc]),
        dim=DIM,
    )
    del qsrc
    # open the saved parts (memory-mapped)
    with _Clock(res, "open"):
        parts = [InvertedFile.load(p["path"], mmap=True) for p in res["parts"]]
    starts = [p["start"] for p in res["parts"]]
    kw = _thread_kw()
    cores = os.cpu_count() or 1

    def run(batch: AggregatedBatch, k: int | None, threads: int) -> tuple[np.ndarray, np.ndarray]:
        extra: dict[str, Any] = {kw: threads} if kw else {}
        return merge_top([p.search(batch, k, **extra) for p in parts], starts, k)

    def one(i: int) -> AggregatedBatch:
        a, b = int(q.offsets[i]), int(q.offsets[i + 1])
        return AggregatedBatch(
            offsets=np.array([0, b - a], np.int64), words=q.words[a:b], data=q.data[a:b], dim=DIM
        )

    _reset_peak()
    _set_threads(cores)
    run(q, 100, cores)  # touch the mapped pages once (page cache warm from the build)
    rows = []
    top = None
    nfull = min(args.full_queries, args.queries)
    for threads in sorted({1, cores}):
        used = _set_threads(threads)
        for k in (100, None):
            nq = args.queries if k == 100 else nfull
            head = AggregatedBatch(
                offsets=q.offsets[: nq + 1],
                words=q.words[: q.offsets[nq]],
                data=q.data[: q.offsets[nq]],
                dim=DIM,
            )
            with _Clock() as batched:
                ids, sc = run(head, k, used)
            with _Clock() as single_c:
                single = [run(one(i), k, used)[0] for i in range(nq)]
            if not np.array_equal(np.concatenate(single), ids):
                raise RuntimeError("batched and one-at-a-time rankings differ")
            if k == 100:
                top, top_sc = ids, sc
            rows.append(
                {
                    "threads": used,
                    "k": k,
                    "queries": nq,
                    "single_ms": 1e3 * single_c.wall / nq,
                    "single_cpu_ms": 1e3 * single_c.cpu / nq,
                    "batched_ms": 1e3 * batched.wall / nq,
                    "batched_cpu_ms": 1e3 * batched.cpu / nq,
                }
            )
    assert top is not None
    res["peak_search"] = _peak_bytes()
    res["rss_anon_end"], res["rss_file_end"] = _rss_split()
    res["latency"] = rows
    res["thread_keyword"] = kw
    res["warmup_s"] = warm
    res["planted_rank1"] = float(np.mean(top[:, 0] == plant))
    res["top100_sha1"] = hashlib.sha1(np.ascontiguousarray(top).tobytes()).hexdigest()
    np.save(tmp / "ours-top100.npy", top)
    np.save(tmp / "ours-top100-scores.npy", top_sc)
    res["imbalance"] = model.imbalance
    res["zipf"] = model.exponent
    res["codebook_size"] = model.k
    return res


def _child_asmk(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    """The asmk package's inverted file on the same words and signatures."""
    import pickle

    from asmk import inverted_file, kernel

    lo, hi = (int(x) for x in args.words.split(","))
    model = WordModel.make(args.codebook_size, args.zipf, args.seed, hi)
    plant = np.sort(np.random.default_rng([args.seed, 7]).choice(n, args.queries, replace=False))
    rng = np.random.default_rng([args.seed, 1 << 31])
    res: dict[str, Any] = {"images": n}
    gen = _Clock(res, "gen").__enter__()
    des, wid, img, qsrc = [], [], [], []
    for b, b0, m in _blocks(n, 0, n, args.block):
        _, off, words, data = generate(model, uniform_words(lo, hi), args.seed, b, m)
        for j in np.flatnonzero((plant >= b0) & (plant < b0 + m)):
            a, z = off[plant[j] - b0], off[plant[j] - b0 + 1]
            qsrc.append(_planted_query(rng, model, words[a:z], data[a:z]))
        # asmk packs sign bits MSB first into uint32 words: our bytes read big-endian.
        des.append(data.view(">u4").astype(np.uint32))
        wid.append(words.astype(np.int64))
        img.append(np.repeat(np.arange(b0, b0 + m), np.diff(off)))
    des_a, wid_a, img_a = np.concatenate(des), np.concatenate(wid), np.concatenate(img)
    del des, wid, img
    gen.__exit__()
    _reset_peak()
    with _Clock(res, "build"):
        ivf = inverted_file.IVF.initialize_empty(codebook_size=model.k, use_idf=False)
        ivf.add(des_a, wid_a, img_a)
    del des_a, wid_a, img_a
    peak_build = _peak_bytes()
    mem = sum(a.nbytes for a in ivf.ivf_vecs if a is not None)
    mem += sum(a.nbytes for a in ivf.ivf_image_ids if a is not None)
    mem += np.asarray(ivf.norm_factor).nbytes + ivf.counts.nbytes + ivf.idf.nbytes
    path = tmp / "asmk_ivf.pkl"
    with open(path, "wb") as f:  # the peer's own format (asmk.io_helpers.save_pickle)
        pickle.dump(ivf.state_dict(), f)
    disk = path.stat().st_size
    del ivf
    with _Clock(res, "open"), open(path, "rb") as g:
        ivf = inverted_file.IVF.initialize_from_state(pickle.load(g))
    kern = kernel.ASMKKernel(None, binary=True)

    def sim(*x: Any) -> Any:
        return kern.similarity(*x, alpha=3, similarity_threshold=0.0)

    qs = [(d.view(">u4").astype(np.uint32), w.astype(np.int64)) for w, d in qsrc]
    _reset_peak()
    rows = []
    top = None
    for k in (100, None):
        nq = args.queries if k == 100 else min(args.full_queries, args.queries)
        with _Clock() as c:
            got = [ivf.search(d, w, similarity_func=sim, topk=k) for d, w in qs[:nq]]
        rows.append(
            {
                "threads": 1,
                "k": k,
                "queries": nq,
                "single_ms": 1e3 * c.wall / nq,
                "single_cpu_ms": 1e3 * c.cpu / nq,
            }
        )
        if k == 100:
            top = np.array([g[0] for g in got])
            np.save(tmp / "asmk-top100-scores.npy", np.array([g[1] for g in got]))
    assert top is not None
    np.save(tmp / "asmk-top100.npy", top)
    res.update(
        bytes_memory=mem,
        bytes_disk=disk,
        peak_build=peak_build,
        peak_search=_peak_bytes(),
        latency=rows,
        planted_rank1=float(np.mean(top[:, 0] == plant)),
        postings=int(ivf.counts.sum()),
    )
    return res


def _child_r1m(args: argparse.Namespace, folder: Path, tmp: Path) -> dict[str, Any]:
    """R1M-size index whose images copy a real index's items and words per item."""
    wpi = np.load(folder / "words_per_image.npy").astype(np.int64)
    ii_path = folder / "item_image.npy"
    if ii_path.exists():
        ii = np.load(ii_path).astype(np.int64)
        ipi = np.bincount(ii)
    else:
        ipi = np.ones(wpi.size, np.int64)
    model = WordModel.make(args.codebook_size, args.zipf, args.seed, int(wpi.max()))
    t0 = time.perf_counter()
    res = _build_parts(
        args,
        model,
        profile_words(ipi, wpi),
        args.r1m_images,
        tmp,
        keep=False,
        regional=ii_path.exists(),
    )
    res.pop("queries")
    res["wall_s"] = time.perf_counter() - t0
    res["profile"] = folder.name
    res["real_items_per_image"] = float(ipi.mean())
    res["real_words_per_item"] = float(wpi.mean())
    res["real_images"] = int(ipi.size)
    return res


# ---------------------------------------------------------------------- driver
def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _spawn(argv: list[str], mode: str, target: str, tmp: Path) -> dict[str, Any]:
    out = tmp / f"result-{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_child", mode, target, str(out)]
    subprocess.run(cmd, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _print_size(n: int, ours: dict[str, Any], peer: dict[str, Any] | None) -> None:
    """The table of one size: ours and (when run) asmk's, wall and process CPU time."""
    print(
        f"\n### {n:,} images: {ours['postings'] / n:.1f} words per image, "
        f"{len(ours['parts'])} part(s), K={ours['codebook_size']:,}, Zipf s={ours['zipf']} "
        f"(imbalance {ours['imbalance']:.2f})\n"
    )
    print("| measure | gldboxes wall | gldboxes CPU | asmk 0.1.1 wall | asmk CPU | asmk / ours |")
    print("|---|---|---|---|---|---|")
    p = peer or {}

    def cell(x: float | None, fmt: str) -> str:
        return "-" if x is None else fmt.format(x)

    def row(name: str, vals: tuple[float | None, ...], fmt: str = "{:.2f}", by: int = 1) -> None:
        """vals: ours wall, ours CPU, asmk wall, asmk CPU; the ratio compares index ``by``
        (0: wall, 1: CPU) of both sides."""
        a, b = vals[by], vals[by + 2]
        r = f"{b / a:.1f}x ({'CPU' if by else 'wall'})" if a and b else "-"
        print(f"| {name} | {' | '.join(cell(v, fmt) for v in vals)} | {r} |")

    def size(key: str, scale: float) -> tuple[float | None, ...]:
        return (ours[key] / scale, None, p[key] / scale if p else None, None)

    def timing(key: str) -> tuple[float | None, ...]:
        return (ours[f"{key}_s"], ours[f"{key}_cpu"], p.get(f"{key}_s"), p.get(f"{key}_cpu"))

    row("generate aggregated data (s, not in build)", timing("gen"))
    row("index build (s)", timing("build"))
    row("  save to disk (s)", (ours["save_s"], ours["save_cpu"], None, None))
    row("peak RSS, generate + build (GB)", size("peak_build", 1e9), by=0)
    row("bytes per image in memory", size("bytes_memory", n), "{:,.0f}", by=0)
    row("bytes per image on disk", size("bytes_disk", n), "{:,.0f}", by=0)
    row("index open (s; ours mmap, asmk unpickle)", timing("open"), "{:.3f}")
    row("peak RSS, search phase (GB)", size("peak_search", 1e9), by=0)
    if "rss_file_end" in ours:
        print(
            f"|   RSS after the searches: anonymous / file-backed (mapped index) (GB) | "
            f"{ours['rss_anon_end'] / 1e9:.2f} / {ours['rss_file_end'] / 1e9:.2f} | | | | |"
        )
    theirs = {r["k"]: r for r in p.get("latency", [])}
    for r in ours["latency"]:
        k = "top-100" if r["k"] == 100 else "full ranking"
        t = theirs.get(r["k"], {})
        tv = (t.get("single_ms"), t.get("single_cpu_ms"))
        by = 1 if r["threads"] == 1 else 0
        for mode in ("single", "batched"):
            label = "one at a time" if mode == "single" else "batched"
            row(
                f"query {k}, {label}, {r['threads']} thread(s) (ms/query, {r['queries']} q)",
                (r[f"{mode}_ms"], r[f"{mode}_cpu_ms"], *tv),
                by=by,
            )
    peer_rank1 = f"{100 * p['planted_rank1']:.0f}%" if p else "-"
    print(f"| planted copy at rank 1 | {100 * ours['planted_rank1']:.0f}% | | {peer_rank1} | | |")
    if p:
        print(
            "| top-100 scores equal to ours (rtol 1e-6: asmk sums in float32) | | | "
            f"{100 * p['same_scores']:.0f}% | | |\n"
            "| top-100 id lists identical to ours (asmk breaks ties by an unstable sort) | | | "
            f"{100 * p['same_top100']:.0f}% | | |"
        )
    print(
        f"\nours: numba compile/cache load {ours['warmup_s']:.1f} s (not timed); thread count "
        f"by numba.set_num_threads (search keyword: {ours['thread_keyword'] or 'none'}); CPU = "
        "process CPU time of all threads; asmk has no batched search (its one-at-a-time time "
        "is repeated against our batched rows), uses one thread and sorts every image for "
        "top-100 too"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="database sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--full-queries", type=int, default=20, help="queries for the full ranking")
    ap.add_argument("--words", default="300,1000", help="distinct words per image: lo,hi")
    ap.add_argument("--codebook-size", type=int, default=65536)
    ap.add_argument("--zipf", type=float, default=0.5, help="Zipf exponent of word frequencies")
    ap.add_argument("--part-images", type=int, default=131072, help="images per index part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=BLOCK, help="images per seeded block")
    ap.add_argument("--asmk", action="store_true", help="run the asmk package side by side")
    ap.add_argument("--asmk-max", type=int, default=100000, help="largest size asmk runs at")
    ap.add_argument("--r1m", default="", help="real index folders whose R1M size to measure")
    ap.add_argument("--r1m-images", type=int, default=1_000_000)
    ap.add_argument("--tmp", default=None, help="scratch folder (deleted after)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    raw = [a for a in (sys.argv[1:] if argv is None else argv)]

    if args._child:
        mode, target, out = args._child
        tmp = Path(out).parent / f"{mode}-{Path(target).name}"
        tmp.mkdir(parents=True, exist_ok=True)
        if mode == "ours":
            res = _child_ours(args, int(target), tmp)
        elif mode == "asmk":
            res = _child_asmk(args, int(target), tmp)
        else:
            res = _child_r1m(args, Path(target), tmp)
        Path(out).write_text(json.dumps(res))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s]
    lo, hi = (int(x) for x in args.words.split(","))
    if (sizes and min(sizes) < args.queries) or not 1 <= lo <= hi < args.codebook_size:
        raise ValueError("--sizes must be >= --queries and --words lo,hi with 1 <= lo <= hi < K")
    if not sizes and not args.r1m:
        raise ValueError("nothing to do: give --sizes and/or --r1m")
    if args.block < 1 or args.part_images < 1:
        raise ValueError("--block and --part-images must be >= 1")
    if args.asmk:
        try:
            import asmk  # noqa: F401
        except ImportError:
            print("the asmk package is not importable; install it as the docstring says")
            return 1
    base = Path(args.tmp) if args.tmp else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gldboxes-scale-", dir=base))
    load = os.getloadavg()
    print(
        f"scale run: {os.cpu_count()} cores, load average {load[0]:.2f} at start, "
        f"numpy {np.__version__}; page cache warm for searches; scratch {tmp}"
    )
    report: dict[str, Any] = {"args": vars(args) | {"_child": None}, "sizes": {}, "r1m": {}}
    child_argv = [a for a in raw if a not in ("--asmk",)]
    try:
        for n in sizes:
            ours = _spawn(child_argv, "ours", str(n), tmp)
            ours_top = np.load(tmp / f"ours-{n}" / "ours-top100.npy")
            for part in ours["parts"]:  # the index parts (the rankings stay for the peer)
                shutil.rmtree(part["path"], ignore_errors=True)
            peer = None
            if args.asmk and n <= args.asmk_max:
                peer = _spawn(child_argv, "asmk", str(n), tmp)
                theirs = np.load(tmp / f"asmk-{n}" / "asmk-top100.npy")
                peer["same_top100"] = float(np.mean(np.all(theirs == ours_top, axis=1)))
                a = np.load(tmp / f"asmk-{n}" / "asmk-top100-scores.npy")
                b = np.load(tmp / f"ours-{n}" / "ours-top100-scores.npy")
                peer["same_scores"] = float(
                    np.mean(np.all(np.isclose(a, b, rtol=1e-6, atol=1e-12), axis=1))
                )
                shutil.rmtree(tmp / f"asmk-{n}", ignore_errors=True)
            elif args.asmk:
                print(
                    f"asmk at {n:,} images: not run (--asmk-max {args.asmk_max:,}; its Python "
                    "IVF.add costs ~3 us a posting and ~36 bytes a posting in memory)"
                )
            shutil.rmtree(tmp / f"ours-{n}", ignore_errors=True)
            _print_size(n, ours, peer)
            sys.stdout.flush()
            report["sizes"][str(n)] = {"ours": ours, "asmk": peer}
        folders = [Path(f) for f in args.r1m.split(",") if f]
        if folders:
            print(
                f"\n### R1M index size: {args.r1m_images:,} synthetic images shaped like real "
                "indexes (items and words per item of random real images)\n"
            )
            print(
                "| real index | real items/img | real words/item | synth items/img | "
                "synth words/item | postings/img | bytes/img (disk) | total on disk (GB) | "
                "generate + build + save, wall (CPU) s | peak RSS (GB) |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
        for folder in folders:  # a row as soon as it is measured
            r = _spawn(child_argv, "r1m", str(folder), tmp)
            report["r1m"][folder.name] = r
            print(
                f"| {folder.name} | {r['real_items_per_image']:.2f} | "
                f"{r['real_words_per_item']:.1f} | {r['items_per_image']:.2f} | "
                f"{r['words_per_item']:.1f} | {r['postings'] / r['images']:.0f} | "
                f"{r['bytes_disk'] / r['images']:,.0f} | {_gb(r['bytes_disk'])} | "
                f"{r['gen_s'] + r['build_s'] + r['save_s']:.0f} "
                f"({r['gen_cpu'] + r['build_cpu'] + r['save_cpu']:.0f}) | "
                f"{_gb(r['peak_build'])} |",
                flush=True,
            )
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
