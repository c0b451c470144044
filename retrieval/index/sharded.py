"""The sharded inverted file: index parts by image-id range, searched part by part.

Searching the parts one by one and merging the per-part top-k by (score desc, global id asc)
(:func:`merge_topk`) gives the rankings of the single index: a (query, image) score only involves
the query's and that image's words, so every part computes the score the single index computes,
and the tie-break by ascending id is preserved because local ids keep the global order.
Regional-search parts (D2R) pool their regions per image inside the part.

On disk: a folder with ``sharded.json`` (``format: gldboxes.sharded_inverted_file``, a
``format_version``, the parts' relative paths, first ids and sizes) beside or above the parts,
each an :class:`retrieval.index.inverted_file.InvertedFile` folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.io import read_tagged_json, write_json
from retrieval.index.aggregation import AggregatedBatch
from retrieval.index.inverted_file import InvertedFile

__all__ = ["FORMAT_VERSION", "HEADER_NAME", "ShardedInvertedFile", "merge_topk"]

FORMAT_VERSION = 1
HEADER_NAME = "sharded.json"


def merge_topk(
    ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part rankings into one: score descending, then global id ascending.

    Each part's rows are ranked (as :meth:`InvertedFile.search` returns them, ids made global):
    one part is returned as it is (cut to ``k``); several are ordered by a lexsort of their
    concatenation (numpy's merge sort, which finds the parts' sorted runs).

    Args:
        ids: per part, int64 (n_queries, k_p) global image ids.
        scores: per part, float64 (n_queries, k_p), aligned with ``ids``.
        k: how many to keep (``None``: all).

    Returns:
        ``(ids, scores)``: int64 and float64 (n_queries, k).
    """
    if not ids or len(ids) != len(scores):
        raise ValueError("merge_topk: give one (ids, scores) pair per part")
    all_ids = np.concatenate([np.asarray(a, np.int64) for a in ids], axis=1)
    all_sc = np.concatenate([np.asarray(s, np.float64) for s in scores], axis=1)
    if all_ids.shape != all_sc.shape:
        raise ValueError(f"merge_topk: ids {all_ids.shape} and scores {all_sc.shape} differ")
    if len(ids) == 1:  # already ranked
        return all_ids[:, :k], all_sc[:, :k]
    order = np.lexsort((all_ids, -all_sc), axis=-1)
    if k is not None:
        order = order[:, :k]
    return np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_sc, order, 1)


@dataclass(frozen=True, eq=False)
class ShardedInvertedFile:
    """An inverted file split into parts by image-id range, searched part by part.

    Regional-search parts (D2R: items are regions, pooled per image) keep a part-local
    ``item_image`` (images ``0 .. n_p - 1`` of the part); pooling happens inside each part, so
    the parts' image scores and the merged top-k are those of the single regional index.

    Attributes:
        parts: the index parts; part ``p`` holds global images ``starts[p] .. starts[p] +
            parts[p].n_images - 1`` under local ids ``0 ..``.
        starts: int64 (n_parts,) first global id of each part (contiguous ranges).
        meta: JSON-able metadata (image names, config hash ...).
    """

    parts: tuple[InvertedFile, ...]
    starts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("ShardedInvertedFile: no parts")
        starts = np.asarray(self.starts, np.int64)
        sizes = np.array([p.n_images for p in self.parts], np.int64)
        want = np.r_[0, np.cumsum(sizes)[:-1]]
        if starts.shape != want.shape or np.any(starts != want):
            raise ValueError(
                f"ShardedInvertedFile: part starts {starts.tolist()} are not contiguous ranges "
                f"for part sizes {sizes.tolist()}"
            )
        kinds = {
            (p.kernel, p.dim, p.binary, p.codebook_size, p.alpha, p.tau, p.normalize, p.pooling)
            for p in self.parts
        }
        if len(kinds) != 1:
            raise ValueError(f"ShardedInvertedFile: parts disagree on kernel/parameters: {kinds}")
        object.__setattr__(self, "starts", starts)

    # ---------------------------------------------------------------- build / files
    @classmethod
    def build(
        cls,
        batch: AggregatedBatch,
        codebook_size: int,
        kernel: str,
        part_size: int,
        *,
        alpha: float | None = None,
        tau: float | None = None,
        normalize: bool | None = None,
        meta: Mapping[str, Any] | None = None,
        item_image: np.ndarray | None = None,
        pooling: str | None = None,
        region_norm_floor: float | None = None,
    ) -> ShardedInvertedFile:
        """Build parts of ``part_size`` images from one aggregated database (in memory).

        Args:
            batch: the database, one entry per image, or per item with ``item_image``.
            item_image: regional search: int (n_items,) image of each item (sorted, as for
                :meth:`InvertedFile.build`); each part gets its images' items and a
                part-local ``item_image``. pooling: ``"max"`` or ``"avg"`` with it.
        """
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        owner = None if item_image is None else np.asarray(item_image, np.int64)
        if owner is not None and owner.shape != (batch.n_images,):
            raise ValueError(
                f"item_image has shape {owner.shape}, expected ({batch.n_images},) items"
            )
        n_images = batch.n_images if owner is None else (int(owner[-1]) + 1 if owner.size else 0)
        parts = []
        starts = []
        for a in range(0, max(n_images, 1), part_size):
            b = min(n_images, a + part_size)
            # the part's items: all of them for images a..b-1
            ia, ib = (a, b) if owner is None else np.searchsorted(owner, [a, b]).tolist()
            lo, hi = int(batch.offsets[ia]), int(batch.offsets[ib])
            sub = AggregatedBatch(
                batch.offsets[ia : ib + 1] - lo, batch.words[lo:hi], batch.data[lo:hi], batch.dim
            )
            parts.append(
                InvertedFile.build(
                    sub,
                    codebook_size,
                    kernel,
                    alpha=alpha,
                    tau=tau,
                    normalize=normalize,
                    item_image=None if owner is None else owner[ia:ib] - a,
                    pooling=None if owner is None else pooling,
                    region_norm_floor=region_norm_floor,
                )
            )
            starts.append(a)
        return cls(tuple(parts), np.asarray(starts, np.int64), dict(meta or {}))

    @classmethod
    def from_parts(
        cls, part_dirs: Sequence[str | os.PathLike[str]], *, mmap: bool = True
    ) -> ShardedInvertedFile:
        """Open index parts (folders, in id order) written one by one, e.g. by the runner's
        aggregation stage; their ``image_names`` metas are joined."""
        parts = tuple(InvertedFile.load(Path(d), mmap=mmap) for d in part_dirs)
        starts = np.r_[0, np.cumsum([p.n_images for p in parts])[:-1]].astype(np.int64)
        names = [n for p in parts for n in p.meta.get("image_names", [])]
        return cls(parts, starts, {"image_names": names})

    def save_header(
        self, folder: str | os.PathLike[str], part_dirs: Sequence[str | os.PathLike[str]]
    ) -> Path:
        """Write ``sharded.json`` describing parts already on disk (paths relative to it)."""
        root = Path(folder)
        if len(part_dirs) != len(self.parts):
            raise ValueError(f"{root}: {len(part_dirs)} part folders for {len(self.parts)} parts")
        return write_json(
            root / HEADER_NAME,
            {
                "format": "gldboxes.sharded_inverted_file",
                "format_version": FORMAT_VERSION,
                "n_images": self.n_images,
                "parts": [
                    {
                        "path": os.path.relpath(Path(d), root),
                        "start": int(s),
                        "n_images": p.n_images,
                    }
                    for d, s, p in zip(part_dirs, self.starts, self.parts, strict=True)
                ],
                "stats": self.stats(),
                "meta": self.meta,
            },
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write every part (``part-00000/`` ...) and ``sharded.json`` into ``folder``."""
        root = Path(folder)
        dirs = [p.save(root / f"part-{i:05d}") for i, p in enumerate(self.parts)]
        self.save_header(root, dirs)
        return root

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = True) -> ShardedInvertedFile:
        """Open a folder with ``sharded.json`` (parts memory-mapped by default).

        Raises:
            FileNotFoundError: no header. ValueError: wrong format/version or parts that do not
                match the header.
        """
        root = Path(folder)
        hpath = root / HEADER_NAME
        if not hpath.exists():
            raise FileNotFoundError(f"sharded index header not found: {hpath}")
        h = read_tagged_json(
            hpath, "gldboxes.sharded_inverted_file", FORMAT_VERSION, "sharded inverted-file header"
        )
        parts = []
        for e in h["parts"]:
            p = InvertedFile.load(root / e["path"], mmap=mmap)
            if p.n_images != int(e["n_images"]):
                raise ValueError(
                    f"{hpath}: part {e['path']} has {p.n_images} images, "
                    f"the header says {e['n_images']}"
                )
            parts.append(p)
        return cls(
            tuple(parts), np.array([e["start"] for e in h["parts"]], np.int64), h.get("meta") or {}
        )

    # ---------------------------------------------------------------- figures
    @property
    def n_images(self) -> int:
        return int(sum(p.n_images for p in self.parts))

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def stats(self) -> dict[str, float]:
        """Images, items (regions for regional search), postings, bytes and bytes per image
        summed over the parts."""
        n = self.n_images
        postings = int(sum(p.n_postings for p in self.parts))
        return {
            "parts": len(self.parts),
            "images": n,
            "items": int(sum(p.n_items for p in self.parts)),
            "postings": postings,
            "bytes": self.nbytes,
            "bytes_per_image": self.nbytes / max(n, 1),
        }

    # ---------------------------------------------------------------- search
    def scores(self, queries: AggregatedBatch) -> np.ndarray:
        """float64 (n_queries, n_images): the parts' score matrices side by side."""
        return np.concatenate([p.scores(queries) for p in self.parts], axis=1)

    def search(
        self,
        queries: AggregatedBatch,
        k: int | None = None,
        *,
        batch_size: int = 64,
        num_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` global ids per query: each part's top-k, merged (see :func:`merge_topk`).

        Returns:
            ``(ids, scores)``: int64 and float64 (n_queries, min(k, n_images)).
        """
        ids, scs = [], []
        for p, s in zip(self.parts, self.starts, strict=True):
            i, sc = p.search(queries, k, batch_size=batch_size, num_threads=num_threads)
            ids.append(i + s)
            scs.append(sc)
        return merge_topk(ids, scs, None if k is None else min(k, self.n_images))

    def merge(self, *, meta: Mapping[str, Any] | None = None) -> InvertedFile:
        """One :class:`InvertedFile` with every part (global ids), built without re-aggregating.

        The postings of each word are the parts' postings of that word one after the other,
        i.e. in ascending global id, exactly as :meth:`InvertedFile.build` orders them. In a
        regional index postings point to items: they are shifted by the items of the parts
        before, and ``item_image`` by the part's first image.
        """
        k = self.parts[0].codebook_size
        words = np.concatenate(
            [np.repeat(np.arange(k, dtype=np.int64), np.diff(p.offsets)) for p in self.parts]
        )
        item_starts = np.r_[0, np.cumsum([p.n_items for p in self.parts])[:-1]].astype(np.int64)
        gids = np.concatenate(
            [
                np.asarray(p.image_ids, np.int64) + s
                for p, s in zip(self.parts, item_starts, strict=True)
            ]
        )
        data = np.concatenate([np.asarray(p.data) for p in self.parts])
        order = np.argsort(words, kind="stable")
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(np.bincount(words, minlength=k), out=offsets[1:])
        p0 = self.parts[0]
        return InvertedFile(
            offsets=offsets,
            image_ids=gids[order].astype(np.uint32),
            data=np.ascontiguousarray(data[order]),
            words_per_image=np.concatenate([np.asarray(p.words_per_image) for p in self.parts]),
            dim=p0.dim,
            kernel=p0.kernel,
            alpha=p0.alpha,
            tau=p0.tau,
            normalize=p0.normalize,
            meta=dict(meta if meta is not None else self.meta),
            item_image=None
            if p0.item_image is None
            else np.concatenate(
                [
                    np.asarray(p.item_image, np.int64) + s
                    for p, s in zip(self.parts, self.starts, strict=True)
                ]
            ).astype(np.uint32),
            pooling=p0.pooling,
            region_norm_floor=p0.region_norm_floor,
        )
