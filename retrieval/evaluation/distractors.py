"""Distractors: the revisitop1m download and distractor indexes appended to a benchmark's index.

Revisited Oxford/Paris are reported "+R1M": the database is the benchmark's images plus the
1,001,001 revisitop1m distractors (Radenovic et al. CVPR 2018), served as::

    BASE/revisitop1m.txt                       image list, one path relative to jpg/ a line
    BASE/jpg/revisitop1m.{1..100}.tar.gz       the images, 100 archives (no published md5s)

:func:`download_revisitop1m` writes, under ``OUT/`` (e.g. ``data/revisitop1m``)::

    revisitop1m.txt                    the image list
    jpg/<member path>.jpg              extracted images (only from archives read to the end)
    archives/revisitop1m.N.tar.gz      downloaded archives (removed after extraction unless kept)
    shards/archive-NNN/                one executor task per archive (done.json, images.txt)
    manifest.json                      per archive: bytes, md5, images (format_version 1)

An archive is fetched with HTTP Range resume (``.part``) and checked by its length
(``Content-Length``) and by reading it to the end (tar structure and the gzip CRC); a bad
archive is deleted and fetched again (the task's retries), and its images only appear once the
whole archive was read (staging folder). Tasks run on the serial executor or on Ray
(``--engine ray``), one archive a task by default; a rerun skips finished archives.

:func:`distractor_index` turns a distractor image folder (the extracted revisitop1m, whose
``revisitop1m.txt`` fixes the image order, or any folder) into an index of parts
(:class:`retrieval.index.sharded.ShardedInvertedFile`, ``sharded.json``) built with a run's
features, codebook and kernel, shard by shard on an executor, under
``OUT/index/<kernel>-k<K>-<features>-<trainset>-<distractor set>.parts/``. The index records
what it was built with (codebook md5, kernel, features ...); an index given instead of a folder
is checked against the run's settings. The runner searches its parts after the dataset's
(:mod:`retrieval.runner.run`): image ids ``0 .. n_db - 1`` are the dataset's, ``n_db ..`` the
distractors' (in the index's order). ASMK/VLAD scores of a (query, image) pair depend on
nothing else, so the ranking restricted to the dataset's images is the plain run's ranking, and
the Revisited metrics count every distractor as a negative.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gldboxes.io import config_hash, read_json, write_json

if TYPE_CHECKING:
    from gldboxes.executor import Executor, Resources, Shard, Stage

__all__ = [
    "MANIFEST_VERSION",
    "REVISITOP1M_ARCHIVES",
    "REVISITOP1M_BASE_URL",
    "REVISITOP1M_IMAGES",
    "REVISITOP1M_LIST",
    "DistractorDownloadReport",
    "Distractors",
    "archive_name",
    "check_run_conf",
    "count_label",
    "distractor_images",
    "distractor_index",
    "download_revisitop1m",
    "open_distractors",
    "parse_archives",
    "revisitop1m_archive_stage",
]

logger = logging.getLogger("retrieval.evaluation.distractors")

REVISITOP1M_BASE_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
REVISITOP1M_ARCHIVES = 100
REVISITOP1M_IMAGES = 1_001_001
REVISITOP1M_LIST = "revisitop1m.txt"
MANIFEST_VERSION = 1
# sharded.json meta key recording what a distractor index was built with
_IDENT_KEY = "distractors"
# settings of a run that must match a distractor index's for its scores to be comparable
_MATCH_KEYS = (
    "features",
    "kernel",
    "codebook_size",
    "codebook_md5",
    "num_assignments",
    "alpha",
    "tau",
    "normalize",
)


# ================================================================================== download
def archive_name(index: int) -> str:
    """``revisitop1m.<index>.tar.gz`` (archives are numbered from 1, as revisitop does)."""
    return f"revisitop1m.{index}.tar.gz"


def parse_archives(
    spec: str | Sequence[int] | None, n_archives: int = REVISITOP1M_ARCHIVES
) -> list[int]:
    """Archive numbers from ``"1-100"``, ``"1-3,7"``, a list, or ``None``/``"all"`` (every one).

    Raises:
        ValueError: a malformed spec or a number outside ``1 .. n_archives``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(1, n_archives + 1))
    out: set[int] = set()
    parts = spec.split(",") if isinstance(spec, str) else [str(int(i)) for i in spec]
    for part in parts:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--archives: {part.strip()!r} is not N or N-M (in {spec!r})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or lo < 1 or hi > n_archives:
            raise ValueError(
                f"--archives: {part.strip()!r} is outside 1-{n_archives} (or backwards); "
                f"revisitop1m has archives revisitop1m.1.tar.gz .. revisitop1m.{n_archives}.tar.gz"
            )
        out.update(range(lo, hi + 1))
    return sorted(out)


def _archive_task(
    shard: Shard, out: Path, model: Any, *, conf: Mapping[str, Any]
) -> dict[str, int]:
    """Download, verify and extract the archives ``shard.items`` into ``root/jpg``."""
    from gldboxes.executor import NonRetryableError
    from gldboxes.http import DownloadError, download_file, md5sum, new_session
    from retrieval.evaluation.datasets import DatasetDownloadError, extract_images

    root, base = Path(conf["root"]), str(conf["base_url"])
    n_images = n_bytes = 0
    listing: list[str] = []
    record: dict[str, Any] = {}
    session = new_session(2)
    try:
        for index in shard.items:
            name = archive_name(int(index))
            url = f"{base}jpg/{name}"
            try:
                # the archive and its resumable .part live outside the task folder, so a
                # retried attempt resumes the transfer with an HTTP Range request
                tgz = download_file(
                    url,
                    root / "archives" / name,
                    session=session,
                    retries=int(conf["retries"]),
                    backoff=float(conf["backoff"]),
                    timeout=float(conf["timeout"]),
                )
            except DownloadError as exc:
                if exc.permanent:  # 404/403/410: asking again cannot help
                    raise NonRetryableError(str(exc)) from exc
                raise
            size, md5 = tgz.stat().st_size, md5sum(tgz)
            try:
                images = extract_images(tgz, root / "jpg", url, flatten=False)
            except DatasetDownloadError:
                raise  # corrupt or truncated: deleted, the task's next attempt refetches it
            except ValueError as exc:  # unsafe member names: the same bytes stay unsafe
                raise NonRetryableError(str(exc)) from exc
            listing.extend(images)
            record[name] = {"bytes": size, "md5": md5, "images": len(images)}
            n_images += len(images)
            n_bytes += size
            if not conf["keep_archives"]:
                tgz.unlink()
    finally:
        session.close()
    write_json(out / "archives.json", record)
    (out / "images.txt").write_text("".join(f"{n}\n" for n in sorted(listing)), "utf-8")
    return {"archives": len(shard.items), "images": n_images, "bytes": n_bytes}


def revisitop1m_archive_stage(
    root: str | os.PathLike[str],
    archives: Sequence[int],
    *,
    base_url: str = REVISITOP1M_BASE_URL,
    archives_per_task: int = 1,
    keep_archives: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    resources: Resources | None = None,
) -> tuple[Stage, list[Shard]]:
    """The revisitop1m download as an executor stage: one task per ``archives_per_task``.

    Returns:
        ``(stage, shards)``; run with ``executor.run(stage, shards, root / "shards")``. Tasks
        are named after their first (and last) archive: ``archive-007``, ``archive-008-009``,
        so a rerun over more archives finds the finished ones under the same names.
    """
    from gldboxes.executor import Resources, Stage, numbered_shards

    if archives_per_task < 1:
        raise ValueError(f"archives_per_task (--shard-size) must be >= 1, got {archives_per_task}")
    base = base_url if base_url.endswith("/") else base_url + "/"
    hashed = {
        "base_url": base,
        "root": os.fspath(Path(root).resolve()),
        "keep_archives": bool(keep_archives),
    }
    conf = {**hashed, "retries": retries, "backoff": backoff, "timeout": timeout}
    import functools

    stage = Stage(
        "revisitop1m-download",
        functools.partial(_archive_task, conf=conf),
        conf=hashed,
        resources=resources or Resources(num_cpus=0.25),
        retries=2,
    )
    return stage, numbered_shards(archives, archives_per_task, prefix="archive")


@dataclass
class DistractorDownloadReport:
    """What :func:`download_revisitop1m` did.

    Attributes:
        root: the distractor folder; manifest: its ``manifest.json``;
        done / skipped: archives finished in this run / before it; failed: ``{archive:
        reason}``; images: images extracted in this run; listed: images in the image list;
        present: listed images on disk after the run.
    """

    root: Path
    manifest: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    listed: int = 0
    present: int = 0

    @property
    def ok(self) -> bool:
        """``True`` when no archive failed."""
        return not self.failed


def download_revisitop1m(
    out: str | os.PathLike[str],
    *,
    archives: str | Sequence[int] | None = None,
    base_url: str = REVISITOP1M_BASE_URL,
    executor: Executor | None = None,
    archives_per_task: int = 1,
    keep_archives: bool = False,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> DistractorDownloadReport:
    """Download, verify and extract revisitop1m archives into ``out`` (resumable).

    Args:
        out: the distractor folder (``revisitop1m.txt``, ``jpg/`` ... go there).
        archives: ``"1-100"``-style spec or numbers (default: all 100).
        base_url: mirror root holding ``revisitop1m.txt`` and ``jpg/`` (default: revisitop's).
        executor: serial (default) or Ray; one task per ``archives_per_task`` archives.
        keep_archives: keep the ``.tar.gz`` files after extraction.

    Returns:
        a :class:`DistractorDownloadReport`; failed archives are named in ``failed`` (never
        extracted); the others are finished.

    Raises:
        DatasetDownloadError: the image list could not be fetched.
    """
    from gldboxes.executor import SerialExecutor, read_done
    from gldboxes.http import DownloadError, download_file
    from retrieval.evaluation.datasets import DatasetDownloadError

    wanted = parse_archives(archives)
    root = Path(out)
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    list_url = base + REVISITOP1M_LIST
    try:
        listing = download_file(
            list_url, root / REVISITOP1M_LIST, retries=retries, backoff=backoff, timeout=timeout
        )
    except DownloadError as exc:
        raise DatasetDownloadError(
            f"cannot download {list_url}: {exc}; check the network (or give a reachable mirror "
            "with --base-url), then rerun: finished archives are kept"
        ) from exc
    stage, shards = revisitop1m_archive_stage(
        root,
        wanted,
        base_url=base,
        archives_per_task=archives_per_task,
        keep_archives=keep_archives,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
    )
    own = executor is None
    engine = executor or SerialExecutor(progress=progress)
    try:
        rep = engine.run(stage, shards, root / "shards", raise_on_failure=False)
    finally:
        if own:
            engine.shutdown()
    report = DistractorDownloadReport(root=root, manifest=root / "manifest.json")
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_VERSION,
        "dataset": "revisitop1m",
        "base_url": base,
        "archives": {},
    }
    if report.manifest.exists():
        old = read_json(report.manifest)
        if not isinstance(old, dict) or old.get("format_version") != MANIFEST_VERSION:
            raise ValueError(f"{report.manifest}: not a revisitop1m manifest of format_version 1")
        manifest["archives"] = dict(old.get("archives") or {})
    for s in shards:
        names = [archive_name(int(i)) for i in s.items]
        if s.name in rep.failed:
            report.failed.update({n: rep.failed[s.name] for n in names})
            continue
        (report.skipped if s.name in rep.skipped else report.done).extend(names)
        rec = read_json(rep.out_dir / s.name / "archives.json")
        for n in names:
            manifest["archives"][n] = {**rec[n], "task": s.name}
        if s.name in rep.done:
            report.images += int((read_done(rep.out_dir / s.name) or {})["counts"]["images"])
    write_json(report.manifest, manifest)
    names = _read_list(listing)
    report.listed = len(names)
    jpg = root / "jpg"
    report.present = sum((jpg / n).is_file() for n in names)
    done_all = len(manifest["archives"]) == REVISITOP1M_ARCHIVES
    if done_all and report.present < report.listed:
        report.failed[REVISITOP1M_LIST] = (
            f"{report.listed - report.present} of its {report.listed} images are missing "
            "under jpg/ after all archives were extracted"
        )
    return report


def _read_list(path: Path) -> list[str]:
    """Image paths of a ``revisitop1m.txt`` (relative to ``jpg/``), one a line."""
    text = path.read_text("utf-8", "replace")
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    bad = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if bad:
        raise ValueError(f"{path}: unsafe image path {bad[0]!r}")
    return names


# ==================================================================================== index
def distractor_images(folder: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The distractor images of a folder, in index order, as ``(id, path)``.

    A revisitop1m folder (``revisitop1m.txt`` + ``jpg/``) gives its listed images in list order
    (those not on disk are skipped, with a warning); any other folder gives every image under
    it, sorted by path. Ids are paths relative to the folder's images with ``/`` -> ``__``.

    Raises:
        FileNotFoundError: no such folder. ValueError: no image in it.
    """
    from retrieval.runner.conf import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--distractors: folder not found: {root}")
    listing = root / REVISITOP1M_LIST
    if listing.is_file() and (root / "jpg").is_dir():
        names = _read_list(listing)
        present = [n for n in names if (root / "jpg" / n).is_file()]
        if len(present) < len(names):
            logger.warning(
                "%s: %d of the %d listed images are not on disk (archives not downloaded?); "
                "using the %d present",
                root,
                len(names) - len(present),
                len(names),
                len(present),
            )
        out = [(n.replace("/", "__"), root / "jpg" / n) for n in present]
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        out = [(p.relative_to(root).as_posix().replace("/", "__"), p) for p in files]
    if not out:
        raise ValueError(f"--distractors: {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return out


def count_label(n: int) -> str:
    """A distractor count as papers write it: 1,001,001 -> ``1m``, 12,000 -> ``12k``, 48 -> 48."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}m"
    if n >= 1_000:
        return f"{n / 1e3:.3g}k"
    return str(n)


def _ident(conf: Mapping[str, Any], codebook_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a distractor index must share with a run (scores comparable)."""
    from gldboxes.http import md5sum
    from retrieval.features.codebook import load_codebook
    from retrieval.runner.conf import feature_conf

    cb = Path(codebook_path)
    cb = cb / "codebook.npy" if cb.is_dir() else cb
    return {
        "features": feature_conf(conf)["output"],
        "kernel": conf["kernel"],
        "codebook_size": int(load_codebook(cb).shape[0]),
        "codebook_md5": md5sum(cb),
        "num_assignments": int(conf["num_assignments"]),
        "alpha": conf.get("alpha"),
        "tau": conf.get("tau"),
        "normalize": conf.get("normalize"),
    }


def check_run_conf(conf: Mapping[str, Any], *, verify: bool = False) -> None:
    """Refuse run settings distractors do not support yet (regions, spatial verification).

    Raises:
        ValueError: naming the option.
    """
    if conf.get("regions") is not None or conf.get("regional_search"):
        raise ValueError(
            "--distractors: index-side regions (--regions, --regional-search) are not supported "
            "with distractors (the distractor index holds whole images only)"
        )
    if verify or conf.get("verification") is not None:
        raise ValueError(
            "--distractors: spatial verification (--verify) is not supported with distractors"
        )


def distractor_index(
    conf: Mapping[str, Any],
    source: str | os.PathLike[str],
    codebook_path: str | os.PathLike[str],
    training_set: str,
    out_dir: str | os.PathLike[str],
    *,
    executor: Executor | None = None,
    shard_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """The distractor index of a run: built from an image folder, or an existing one checked.

    Args:
        conf: the run's resolved conf (:data:`retrieval.runner.conf.default_conf`).
        source: a distractor image folder (see :func:`distractor_images`) or a distractor
            index folder (``sharded.json``) built with the same features, codebook and kernel.
        codebook_path: the run's ``codebook.npy``; training_set: its tag (folder names).
        executor: runs the feature and aggregation shards (default: serial, in this process).
        shard_size: images per feature shard and index part.

    Returns:
        the index folder (``sharded.json`` + parts), e.g.
        ``OUT/index/asmk_star-k1024-rootsift-n1000-<trainset>-revisitop1m-1a2b3c4d.parts``.

    Raises:
        ValueError: regions or verification in ``conf``, or an index built with other
            settings (naming the file and the first setting that differs).
    """
    from gldboxes.executor import SerialExecutor
    from retrieval import features as features_stage
    from retrieval.index.sharded import HEADER_NAME, ShardedInvertedFile
    from retrieval.runner.conf import feature_conf, run_name
    from retrieval.runner.shards import FeatureShards, aggregation_stage, feature_stage

    check_run_conf(conf)
    src = Path(source)
    ident = _ident(conf, codebook_path)
    if (src / HEADER_NAME).is_file():
        _check_index(src / HEADER_NAME, ident)
        return src
    images = distractor_images(src)
    name = f"{src.resolve().name}-{config_hash({'dir': os.path.abspath(src)}, 8)}"
    fc = feature_conf(conf)
    own = executor is None
    engine = executor or SerialExecutor(progress=len(images) > shard_size)
    try:
        fstage, fshards = feature_stage(
            fc,
            [features_stage.ImageItem(i, p) for i, p in images],
            shard_size=shard_size,
        )
        frep = engine.run(
            fstage,
            fshards,
            Path(out_dir) / "features" / fc["output"] / f"{name}.shards",
            overwrite=overwrite,
        )
        feats = FeatureShards.from_run(frep, fshards)
        astage, parts = aggregation_stage(conf, feats, codebook_path)
        folder = Path(out_dir) / "index" / f"{run_name(conf, training_set, name)}.parts"
        engine.run(astage, parts, folder, overwrite=overwrite)
    finally:
        if own:
            engine.shutdown()
    sivf = ShardedInvertedFile.from_parts([folder / s.name / "index" for s in parts])
    meta = {
        _IDENT_KEY: {**ident, "name": name, "images": os.fspath(src.resolve())},
        "image_names": sivf.meta["image_names"],
    }
    sivf = ShardedInvertedFile(sivf.parts, sivf.starts, meta)
    sivf.save_header(folder, [folder / s.name / "index" for s in parts])
    logger.info("distractor index %s: %d images", folder, sivf.n_images)
    return folder


def _check_index(header: Path, ident: Mapping[str, Any]) -> None:
    """Refuse a distractor index whose recorded settings differ from the run's."""
    h = read_json(header)
    got = (h.get("meta") or {}).get(_IDENT_KEY) if isinstance(h, dict) else None
    if not isinstance(got, dict):
        raise ValueError(
            f"--distractors: {header} is not a distractor index (no {_IDENT_KEY!r} record); "
            "give the distractor image folder instead"
        )
    for key in _MATCH_KEYS:
        if got.get(key) != ident[key]:
            raise ValueError(
                f"--distractors: {header} was built with {key}={got.get(key)!r}, this run uses "
                f"{ident[key]!r}; give the image folder to build a matching index"
            )


@dataclass(frozen=True)
class Distractors:
    """An opened distractor index and how results name it.

    Attributes:
        folder: the index folder; n_images: distractor count; label: ``+1m``-style suffix;
        tag: short hash of what the index holds (image folder, features, codebook, kernel), the
        same whatever its part size (results folder names); header_md5: md5 of its
        ``sharded.json`` (a rebuilt index redoes the search); part_dirs, starts: its parts and
        their first (distractor-local) image ids.
    """

    folder: Path
    n_images: int
    label: str
    tag: str
    header_md5: str
    part_dirs: tuple[Path, ...]
    starts: tuple[int, ...]


def open_distractors(folder: str | os.PathLike[str]) -> Distractors:
    """Read a distractor index's header: its parts, count and names for results."""
    from gldboxes.http import md5sum
    from retrieval.index.sharded import HEADER_NAME

    root = Path(folder)
    h = read_json(root / HEADER_NAME)
    n = int(h["n_images"])
    ident = (h.get("meta") or {}).get(_IDENT_KEY)
    if not isinstance(ident, dict):
        raise ValueError(f"--distractors: {root / HEADER_NAME} is not a distractor index")
    return Distractors(
        folder=root,
        n_images=n,
        label=f"+{count_label(n)}",
        tag=config_hash(ident, 6),
        header_md5=md5sum(root / HEADER_NAME),
        part_dirs=tuple(root / e["path"] for e in h["parts"]),
        starts=tuple(int(e["start"]) for e in h["parts"]),
    )
