"""Revisited Oxford/Paris datasets: safe ground-truth loading, image paths, official downloads.

A dataset folder is laid out as the official downloads are::

    roxford5k/
        gnd_roxford5k.pkl      # {'imlist', 'qimlist', 'gnd': [{bbx, easy, hard, junk}]}
        jpg/<name>.jpg         # database and query images

The synthetic world (:mod:`gldboxes.synth`) writes the same layout, so everything here works on
both.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import pickle
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gldboxes.http import DownloadError, download_file, new_session
from gldboxes.io import atomic_write, read_json, write_json

__all__ = [
    "DATASETS",
    "DatasetDownloadError",
    "RevisitedDataset",
    "UnsafePickleError",
    "download_revisited",
    "extract_images",
    "load_gnd",
    "safe_load_pickle",
    "save_gnd",
]

logger = logging.getLogger("retrieval.evaluation.datasets")

# Official sources (revisitop / VGG). Images come as tarballs; the ground truth as a pickle.
DATASETS: dict[str, dict[str, Any]] = {
    "roxford5k": {
        "gnd_url": "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
        "image_urls": [
            "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
        ],
    },
    "rparis6k": {
        "gnd_url": "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl",
        "image_urls": [
            "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
            "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
        ],
    },
}

# The only globals a ground-truth pickle may reference: builtin containers and numpy arrays.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("_codecs", "encode"),
    }
)


class DatasetDownloadError(ValueError):
    """A dataset file could not be fetched or was unreadable; the message says what to do.

    A ``ValueError``, so the command line prints it as one line and exits with status 2.
    """


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that references something other than builtins and numpy arrays.

    Also a ``ValueError`` (bad input): the CLI reports it in one line, without a traceback.
    """


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, source: str) -> None:
        super().__init__(fh, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refusing to load {module}.{name}; ground-truth pickles may only "
            "hold builtin containers and numpy arrays (use the official gnd_<name>.pkl or a "
            ".json ground truth)"
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Load a third-party pickle admitting only builtins and numpy arrays.

    Raises:
        UnsafePickleError: the pickle tries to import anything else (e.g. ``os.system``).
        ValueError: the file is not a readable pickle.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _as_int_list(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).ravel()]


def _validate_gnd(cfg: Any, source: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a dict with imlist/qimlist/gnd, got {type(cfg)}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{source}: ground truth has no {key!r} entry")
    n_db, n_q = len(cfg["imlist"]), len(cfg["qimlist"])
    if len(cfg["gnd"]) != n_q:
        raise ValueError(f"{source}: {len(cfg['gnd'])} gnd entries for {n_q} queries")
    gnd = []
    for i, g in enumerate(cfg["gnd"]):
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise ValueError(f"{source}: query {i} has no {key!r} list")
            ids = _as_int_list(g[key])
            bad = [v for v in ids if v < 0 or v >= n_db]
            if bad:
                raise ValueError(f"{source}: query {i} {key} id {bad[0]} outside [0, {n_db})")
            entry[key] = ids
        if "bbx" in g and g["bbx"] is not None:
            bbx = [float(v) for v in np.asarray(g["bbx"]).ravel()]
            if len(bbx) != 4:
                raise ValueError(f"{source}: query {i} bbx must have 4 numbers, got {bbx}")
            entry["bbx"] = bbx
        gnd.append(entry)
    return {
        "imlist": [str(s) for s in cfg["imlist"]],
        "qimlist": [str(s) for s in cfg["qimlist"]],
        "gnd": gnd,
    }


def load_gnd(path: str | Path) -> dict[str, Any]:
    """Load a Revisited ground-truth file (official ``.pkl`` or our ``.json`` twin) and check it.

    Returns:
        ``{'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [int],
        'hard': [int], 'junk': [int]}]}`` with 0-based database indices.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    raw = read_json(path) if path.suffix == ".json" else safe_load_pickle(path)
    return _validate_gnd(raw, str(path))


def save_gnd(cfg: dict[str, Any], path: str | Path) -> Path:
    """Write a ground truth with the official pickle structure (builtins only) and a JSON twin."""
    path = Path(path)
    clean = _validate_gnd(cfg, str(path))
    with atomic_write(path, "wb") as fh:
        pickle.dump(clean, fh, protocol=3)
    write_json(path.with_suffix(".json"), clean)
    return path


@dataclass(frozen=True)
class RevisitedDataset:
    """A Revisited-style benchmark folder: ground truth plus ``jpg/`` images.

    Attributes:
        root: the dataset folder.
        name: dataset name (``roxford5k``, ``rparis6k``, ``synth`` ...).
        imlist: database image names (n_db,).
        qimlist: query image names (n_q,).
        gnd: per-query dicts with ``bbx``, ``easy``, ``hard``, ``junk``.
    """

    root: Path
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    @classmethod
    def load(cls, root: str | Path, name: str | None = None) -> RevisitedDataset:
        """Open a dataset folder holding one ``gnd_*.pkl`` (or ``gnd_*.json``) and ``jpg/``."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if name is None:
            cands = sorted(root.glob("gnd_*.pkl")) or sorted(root.glob("gnd_*.json"))
            if len(cands) != 1:
                raise ValueError(
                    f"{root}: expected exactly one gnd_<name>.pkl, found {[c.name for c in cands]}"
                )
            gnd_path = cands[0]
            name = gnd_path.stem[len("gnd_") :]
        else:
            gnd_path = root / f"gnd_{name}.pkl"
            if not gnd_path.exists():
                gnd_path = root / f"gnd_{name}.json"
        cfg = load_gnd(gnd_path)
        return cls(
            root=root, name=name, imlist=cfg["imlist"], qimlist=cfg["qimlist"], gnd=cfg["gnd"]
        )

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def image_path(self, name: str) -> Path:
        """Path of an image by name (``jpg/<name>.jpg``)."""
        return self.root / "jpg" / f"{name}.jpg"

    def db_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    def query_bbx(self, i: int) -> tuple[float, float, float, float] | None:
        """The query's box ``(x1, y1, x2, y2)`` in pixels, or ``None``."""
        b = self.gnd[i].get("bbx")
        return None if b is None else (b[0], b[1], b[2], b[3])

    def missing_images(self) -> list[str]:
        """Names of database and query images not present on disk."""
        return [n for n in (*self.imlist, *self.qimlist) if not self.image_path(n).exists()]


def download_revisited(
    name: str,
    out: str | Path,
    *,
    base_urls: dict[str, str] | None = None,
    retries: int = 5,
) -> RevisitedDataset:
    """Download a Revisited dataset's ground truth and images into ``out/<name>/``.

    Resumable: finished files are kept, partial transfers resume with HTTP Range requests, and
    tarballs are extracted (images only, flattened into ``jpg/``) once fully downloaded. The
    download counts as verified when the tarballs are valid archives and every image named by the
    ground truth is present. A tarball is extracted into a staging folder and its images moved
    into ``jpg/`` only once the whole archive was read; a truncated or corrupt tarball is deleted
    with its staging folder, so the next run fetches it again.

    Args:
        name: ``roxford5k`` or ``rparis6k``.
        out: the data root.
        base_urls: optional replacement of the hosts (for mirrors and tests), mapping ``"gnd"``
            and ``"images"`` to a base URL; file names are kept.

    Raises:
        DatasetDownloadError: a file could not be fetched (offline, dead URL) or an archive was
            truncated or corrupt (then deleted); the message names the URL and what to do.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = Path(out) / name
    (root / "jpg").mkdir(parents=True, exist_ok=True)

    def _url(kind: str, url: str) -> str:
        if base_urls and kind in base_urls:
            return base_urls[kind].rstrip("/") + "/" + url.rsplit("/", 1)[1]
        return url

    def _fetch(url: str, dest: Path) -> Path:
        try:
            return download_file(url, dest, session=session, retries=retries)
        except DownloadError as exc:
            raise DatasetDownloadError(
                f"cannot download {url}: {_short(exc, url)}; check the network connection (or "
                "give a reachable mirror: --gnd-base-url / --images-base-url), then rerun: "
                "finished files are kept"
            ) from exc

    session = new_session(2)
    try:
        gnd_url = _url("gnd", spec["gnd_url"])
        _fetch(gnd_url, root / gnd_url.rsplit("/", 1)[1])
        archives = root / "archives"
        for url in spec["image_urls"]:
            url = _url("images", url)
            fname = url.rsplit("/", 1)[1]
            done = archives / (fname + ".extracted")
            if done.exists():
                continue
            tgz = _fetch(url, archives / fname)
            extract_images(tgz, root / "jpg", url)
            done.write_text("ok\n")
    finally:
        session.close()
    ds = RevisitedDataset.load(root, name)
    missing = ds.missing_images()
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} images of the ground truth are missing after extraction "
            f"(first: {missing[:3]})"
        )
    logger.info("%s ready: %d database images, %d queries", name, ds.n_db, ds.n_queries)
    return ds


def _short(exc: DownloadError, url: str) -> str:
    """The reason of a :class:`DownloadError` without the URL it starts with."""
    text = str(exc)
    return text[len(url) + 2 :] if text.startswith(url + ": ") else text


# What reading a truncated or corrupt .tgz / .tar.xz / .tar.bz2 can raise.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def extract_images(tgz: Path, jpg_dir: Path, url: str = "", *, flatten: bool = True) -> list[str]:
    """Extract the ``.jpg`` members of a tarball into ``jpg_dir`` (no path traversal).

    Members go to a staging folder beside ``jpg_dir`` and are moved into it only once the whole
    archive was read, its compressed stream to the end (the gzip/xz checksum checked). A
    truncated or corrupt archive is deleted with the staging folder.

    Args:
        flatten: put every image directly in ``jpg_dir`` (Oxford/Paris); else keep the
            members' relative paths (revisitop1m), refusing absolute and ``..`` names.

    Returns:
        the extracted images' paths relative to ``jpg_dir``, sorted.

    Raises:
        DatasetDownloadError: the archive is truncated or corrupt (it was deleted).
        ValueError: an unsafe member name (absolute or with ``..``) when not flattening.
    """
    stage = jpg_dir.parent / f".extract-{tgz.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    names: list[str] = []
    try:
        try:
            with tarfile.open(tgz, "r:*") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.lower().endswith(".jpg"):
                        continue
                    name = Path(member.name).name if flatten else _safe_member(tgz, member.name)
                    fh = tar.extractfile(member)
                    if fh is None:
                        continue
                    (stage / name).parent.mkdir(parents=True, exist_ok=True)
                    with open(stage / name, "wb") as out:
                        shutil.copyfileobj(fh, out, 1 << 20)
                    names.append(name)
                rest = getattr(tar.fileobj, "read", None)
                while rest is not None and rest(1 << 20):  # to the end: checks the CRC
                    pass
        except _ARCHIVE_ERRORS as exc:
            tgz.unlink(missing_ok=True)
            raise DatasetDownloadError(
                f"{tgz}: truncated or corrupt archive ({type(exc).__name__}: {exc}); deleted it "
                f"and its partial extraction, rerun to fetch it again"
                + (f" from {url}" if url else "")
            ) from exc
        done = sorted(set(names))
        for name in done:
            (jpg_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, jpg_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return done


def _safe_member(tgz: Path, name: str) -> str:
    """A tar member's relative path (``./`` stripped), refusing absolute and ``..`` names."""
    rel = name[2:] if name.startswith("./") else name
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"{tgz}: unsafe member name {name!r}")
    return Path(*parts).as_posix()
