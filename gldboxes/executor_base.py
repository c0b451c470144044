"""The engine-independent core of the executor: stages, shards, done-markers and the serial engine.

What :mod:`gldboxes.executor` runs (see its docstring for the whole picture):

* the work: :class:`Stage` (a per-shard function, its config, model loader and resources),
  :class:`Shard` (:func:`make_shards`, :func:`numbered_shards`), :class:`Resources`;
* one shard: :func:`run_shard` (temporary folder, ``done.json``, rename; :func:`read_done`) and
  the per-worker model cache (:func:`model_loads`, :func:`clear_model_cache`);
* the driver every engine shares, :class:`Executor` (skip finished shards, run the rest,
  :class:`StageReport`, :class:`ShardFailedError`), and :class:`SerialExecutor`.

The Ray engine is :mod:`gldboxes.executor_ray`; this module never imports Ray.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gldboxes import __version__
from gldboxes.io import config_hash, read_json, write_config, write_json
from gldboxes.progress import tqdm

__all__ = [
    "DONE_NAME",
    "FORMAT_VERSION",
    "Executor",
    "NonRetryableError",
    "Resources",
    "SerialExecutor",
    "Shard",
    "ShardFailedError",
    "Stage",
    "StageReport",
    "clear_model_cache",
    "make_shards",
    "model_loads",
    "numbered_shards",
    "read_done",
    "run_shard",
]

logger = logging.getLogger("gldboxes.executor_base")

FORMAT_VERSION = 1
DONE_NAME = "done.json"

StageFn = Callable[["Shard", Path, Any], Mapping[str, int]]


# ------------------------------------------------------------------------------------- model
_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOADS: dict[str, int] = {}


def _model_for(stage: Stage) -> Any:
    """The stage's model in this process, loaded on first use and kept for later shards."""
    if stage.load_model is None:
        return None
    key = stage.model_key
    if key not in _MODEL_CACHE:
        t0 = time.perf_counter()
        _MODEL_CACHE[key] = stage.load_model()
        _MODEL_LOADS[key] = _MODEL_LOADS.get(key, 0) + 1
        logger.info(
            "%s: model loaded in %.1f s (pid %d)", stage.name, time.perf_counter() - t0, os.getpid()
        )
    return _MODEL_CACHE[key]


def model_loads() -> dict[str, int]:
    """How many times each model was loaded in this process (``{model key: loads}``)."""
    return dict(_MODEL_LOADS)


def clear_model_cache() -> None:
    """Drop the models cached in this process (frees memory between pipelines)."""
    _MODEL_CACHE.clear()


# ------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Resources:
    """What one shard task reserves on a Ray node.

    Attributes:
        num_cpus: CPUs per task; fractional values (0.5) let several tasks share a core and keep
            a 2-core machine from deadlocking when Ray needs a CPU for its own work.
        num_gpus: GPUs per task (fractional to share one GPU between model copies).
        memory: bytes of RAM reserved per task for scheduling (``None``: no reservation).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    def __post_init__(self) -> None:
        if not self.num_cpus > 0:
            raise ValueError(f"Resources.num_cpus must be > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"Resources.num_gpus must be >= 0, got {self.num_gpus}")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"Resources.memory must be a positive byte count, got {self.memory}")

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ray.remote(...).options``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = int(self.memory)
        return opts


@dataclass(frozen=True)
class Shard:
    """One unit of work: an index, a folder name and JSON-able items (paths, ids, rows).

    Attributes:
        index: position of the shard (0-based).
        items: the inputs, as JSON-able values (strings, numbers, lists); they enter the
            inputs hash, so a shard whose items changed is redone.
        name: folder name of the shard's outputs (default ``shard-00042``).
        meta: extra JSON-able inputs that also enter the hash (e.g. the first global image id
            of an index part).
    """

    index: int
    items: tuple[Any, ...]
    name: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"Shard.index must be >= 0, got {self.index}")
        if not self.name:
            object.__setattr__(self, "name", f"shard-{self.index:05d}")
        if "/" in self.name or self.name.startswith("."):
            raise ValueError(f"Shard.name {self.name!r} must be a plain, non-hidden folder name")
        object.__setattr__(self, "items", tuple(self.items))


def make_shards(
    items: Sequence[Any], shard_size: int, *, prefix: str = "shard", meta: bool = True
) -> list[Shard]:
    """Cut ``items`` into consecutive shards of ``shard_size`` (the last one may be shorter).

    With ``meta`` each shard records ``{"start": first item index, "stop": end}``, i.e. its
    range of global ids when ``items`` is a list of images.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = []
    for i, a in enumerate(range(0, len(items), shard_size)):
        chunk = tuple(items[a : a + shard_size])
        m = {"start": a, "stop": a + len(chunk)} if meta else {}
        out.append(Shard(i, chunk, f"{prefix}-{i:05d}", m))
    return out


def numbered_shards(numbers: Sequence[int], per_shard: int, *, prefix: str) -> list[Shard]:
    """Shards of numbered files (GLDv2 tars, revisitop1m archives), ``per_shard`` a task, named
    after their numbers (``<prefix>-007``, ``<prefix>-008-009``), not their position, so a
    rerun over a larger set finds the finished tasks under the same names.

    Args:
        numbers: file numbers (deduplicated and sorted here).
        per_shard: numbers per task, >= 1.
        prefix: task name prefix (``tars``, ``archive``).
    """
    if per_shard < 1:
        raise ValueError(f"{prefix}: numbers per task must be >= 1, got {per_shard}")
    return [
        Shard(
            s.index,
            s.items,
            f"{prefix}-{s.items[0]:03d}" + (f"-{s.items[-1]:03d}" if len(s.items) > 1 else ""),
        )
        for s in make_shards(sorted({int(i) for i in numbers}), per_shard, meta=False)
    ]


@dataclass(frozen=True)
class Stage:
    """A per-shard function plus what is needed to run it anywhere.

    Attributes:
        name: stage name (logs, task names, ``done.json``).
        fn: ``fn(shard, out_dir, model) -> counts``, a module-level function (Ray ships it to
            workers by reference, so its module must be importable there).
        conf: the stage configuration (JSON-able); its hash marks the outputs.
        load_model: zero-argument callable returning the model, called once per worker process.
        resources: default per-task resources (an executor may override them).
        retries: extra attempts for a shard that raised (or whose Ray worker died).
        versions: library versions to record in ``done.json`` (besides python/numpy/gldboxes).
    """

    name: str
    fn: StageFn
    conf: Mapping[str, Any] = field(default_factory=dict)
    load_model: Callable[[], Any] | None = None
    resources: Resources = field(default_factory=Resources)
    retries: int = 2
    versions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"Stage.name {self.name!r} must be a non-empty plain name")
        if self.retries < 0:
            raise ValueError(f"Stage.retries must be >= 0, got {self.retries}")
        if not callable(self.fn):
            raise ValueError(f"Stage {self.name!r}: fn must be callable")

    @property
    def config_hash(self) -> str:
        return config_hash({"stage": self.name, "conf": self.conf})

    @property
    def model_key(self) -> str:
        return f"{self.name}-{self.config_hash}"

    def inputs_hash(self, shard: Shard) -> str:
        """Hash of the stage config and the shard's items: equal hash, same outputs."""
        try:
            return config_hash(
                {"conf": self.config_hash, "items": list(shard.items), "meta": dict(shard.meta)},
                16,
            )
        except TypeError as exc:
            raise ValueError(
                f"stage {self.name!r}, shard {shard.name}: items must be JSON-able ({exc})"
            ) from exc


class NonRetryableError(RuntimeError):
    """Raised by a stage function when retrying the shard cannot help; executors do not retry it."""


class ShardFailedError(RuntimeError):
    """Some shards failed after all retries (the others are finished and kept).

    Attributes:
        failed: ``{shard name: error message}``.
    """

    def __init__(self, stage: str, failed: Mapping[str, str]) -> None:
        names = ", ".join(sorted(failed)[:10]) + (" ..." if len(failed) > 10 else "")
        super().__init__(
            f"stage {stage}: {len(failed)} shard(s) failed after retries ({names}); "
            "rerun to redo only them"
        )
        self.failed = dict(failed)


@dataclass
class StageReport:
    """What a run of a stage did.

    Attributes:
        out_dir: the stage's output folder (one sub-folder per shard).
        done: shards finished in this run; skipped: shards already finished before;
        failed: ``{shard: error}``; counts: summed counts of every finished shard;
        seconds: wall time of the run.
    """

    stage: str
    out_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def shard_dirs(self, shards: Sequence[Shard]) -> list[Path]:
        """The output folders of ``shards``, in order."""
        return [self.out_dir / s.name for s in shards]


def _versions(extra: Mapping[str, str]) -> dict[str, str]:
    import numpy as np

    out = {"gldboxes": __version__, "python": platform.python_version(), "numpy": np.__version__}
    out.update({str(k): str(v) for k, v in extra.items()})
    return out


def read_done(shard_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``done.json`` of a shard folder, or ``None`` when the shard is not finished."""
    path = Path(shard_dir) / DONE_NAME
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a gldboxes done-marker of format_version {FORMAT_VERSION}")
    return data


def run_shard(stage: Stage, shard: Shard, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Run one shard (in whatever process calls this): temp folder, ``done.json``, rename.

    Returns:
        the ``done.json`` content.
    """
    out = Path(out_dir)
    final = out / shard.name
    tmp = out / f".{shard.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        model = _model_for(stage)
        t0 = time.perf_counter()
        counts = stage.fn(shard, tmp, model)
        seconds = time.perf_counter() - t0
        done = {
            "format_version": FORMAT_VERSION,
            "stage": stage.name,
            "shard": shard.name,
            "index": shard.index,
            "n_items": len(shard.items),
            "meta": dict(shard.meta),
            "config_hash": stage.config_hash,
            "inputs_hash": stage.inputs_hash(shard),
            "versions": _versions(stage.versions),
            "counts": {str(k): int(v) for k, v in dict(counts or {}).items()},
            "outputs": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
            "seconds": round(seconds, 4),
            "host": platform.node(),
            "pid": os.getpid(),
        }
        write_json(tmp / DONE_NAME, done)
        if final.exists():  # a stale shard (other config); the driver decided to redo it
            shutil.rmtree(final)
        os.replace(tmp, final)
        return done
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- executors
class Executor:
    """Common driver logic: skip finished shards, run the rest, report, clean temp folders."""

    engine = "base"

    def __init__(self, *, progress: bool = True, resources: Resources | None = None) -> None:
        self.progress = progress
        self.resources = resources

    def _execute(
        self, stage: Stage, shards: Sequence[Shard], out_dir: Path
    ) -> Iterator[tuple[Shard, dict[str, Any] | None, str | None]]:
        raise NotImplementedError

    def run(
        self,
        stage: Stage,
        shards: Sequence[Shard],
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        raise_on_failure: bool = True,
    ) -> StageReport:
        """Run every unfinished shard of ``stage`` into ``out_dir/<shard.name>/``.

        Args:
            stage: the stage.
            shards: its shards (unique names).
            out_dir: the stage's output folder (name it after the config).
            overwrite: redo finished shards too.
            raise_on_failure: raise :class:`ShardFailedError` when shards failed for good
                (after the others finished); else only report them.

        Returns:
            a :class:`StageReport`.
        """
        out = Path(out_dir)
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"{out}: shard names are not unique")
        out.mkdir(parents=True, exist_ok=True)
        _clean_tmp(out)
        write_config(
            out,
            {"stage": stage.name, "config_hash": stage.config_hash, "conf": dict(stage.conf)},
            name="stage.yaml",
        )
        report = StageReport(stage=stage.name, out_dir=out)
        todo: list[Shard] = []
        finished: dict[str, dict[str, Any]] = {}
        for s in shards:
            done = None if overwrite else read_done(out / s.name)
            if done is not None and done.get("inputs_hash") == stage.inputs_hash(s):
                report.skipped.append(s.name)
                finished[s.name] = done
            else:
                if done is not None:
                    logger.info("%s: %s was made with other inputs; redoing it", stage.name, s.name)
                todo.append(s)
        if report.skipped:
            logger.info(
                "%s: %d shard(s) already done, %d to do", stage.name, len(report.skipped), len(todo)
            )
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(shards),
            initial=len(report.skipped),
            unit="shard",
            desc=f"{stage.name} [{self.engine}]",
            # one shard to do is one step: no bar (a run of many small stages stays quiet)
            disable=not self.progress or len(todo) <= 1,
        )
        try:
            for shard, done, error in self._execute(stage, todo, out):
                if error is None and done is not None:
                    report.done.append(shard.name)
                    finished[shard.name] = done
                else:
                    report.failed[shard.name] = error or "unknown error"
                    logger.error("%s: %s failed: %s", stage.name, shard.name, error)
                bar.update(1)
        finally:
            bar.close()
            _clean_tmp(out)
        report.seconds = time.perf_counter() - t0
        report.done.sort()
        for d in finished.values():
            for k, v in d.get("counts", {}).items():
                report.counts[k] = report.counts.get(k, 0) + int(v)
        if report.failed and raise_on_failure:
            raise ShardFailedError(stage.name, report.failed)
        return report

    def start(self) -> Executor:
        """Start the engine (no-op for the serial executor)."""
        return self

    def shutdown(self) -> None:
        """Stop what :meth:`start` started."""

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _clean_tmp(out: Path) -> None:
    for p in out.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


class SerialExecutor(Executor):
    """Shards one after the other in this process, each retried ``stage.retries`` times (not
    after a :class:`NonRetryableError`)."""

    engine = "serial"

    def _execute(
        self, stage: Stage, shards: Sequence[Shard], out_dir: Path
    ) -> Iterator[tuple[Shard, dict[str, Any] | None, str | None]]:
        for shard in shards:
            error: str | None = None
            done: dict[str, Any] | None = None
            for attempt in range(stage.retries + 1):
                try:
                    done = run_shard(stage, shard, out_dir)
                except NonRetryableError as exc:  # another attempt cannot fix it
                    error = f"{type(exc).__name__}: {exc}"
                    break
                except Exception as exc:  # a shard's failure must not stop the others
                    error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "%s: %s attempt %d failed: %s", stage.name, shard.name, attempt + 1, error
                    )
                    continue
                break
            yield (shard, done, None) if done is not None else (shard, None, error)
