"""Run per-image stages shard by shard, on this machine (``serial``) or on Ray (``ray``).

A **stage** is a function from one shard of inputs to one set of output files::

    fn(shard: Shard, out: Path, model: Any) -> Mapping[str, int]   # counts, e.g. {"images": 250}

It writes everything into ``out`` (a fresh temporary folder) and returns counts. The executor
renames ``out`` onto ``OUT_DIR/<shard.name>/`` only after the function returned and a
``done.json`` (stage name, config hash, inputs hash, library versions, counts, seconds) was
written into it, so a shard folder either does not exist or is complete. A rerun skips every
shard whose ``done.json`` has the same inputs hash (stage config + the shard's items) and redoes
the rest; a changed configuration redoes everything. Temporary folders of crashed attempts
(``.<shard>.tmp-*``) are removed by the driver before and after each run.

``model`` is ``stage.load_model()``, called **once per worker process** and cached under the
stage's config hash, so a DELF or detector SavedModel is loaded once per worker and reused
across all the shards that worker runs (``None`` when the stage has no model).

Executors:

* :class:`SerialExecutor`: shards one after the other in this process (tests, tiny runs). A
  shard that raises is retried ``stage.retries`` times.
* :class:`RayExecutor`: one plain Ray task per shard (no actors: a file-writing stage needs no
  long-lived state beyond the per-process model cache) with per-task ``num_cpus`` (fractional:
  on a 2-core machine 0.5 CPU a task keeps four in flight and never starves Ray's own work),
  ``num_gpus`` and ``memory``; Ray retries a shard whose task raised or whose worker died
  (``max_retries``/``retry_exceptions``). ``ray.init()`` starts a local Ray by default with its
  scratch (``_temp_dir``) inside the run's work directory; ``RAY_ADDRESS`` (or ``address=``)
  connects to an existing cluster instead, where the inputs and ``OUT_DIR`` must be on storage
  every node sees (a shared filesystem).

A stage function raises :class:`NonRetryableError` for a failure that another attempt cannot fix
(a dead URL, a file failing its checksum after the stage's own retries, an unsafe archive): both
executors then record the shard as failed at once, without retrying it (on Ray the task returns
the failure instead of raising, so Ray's ``retry_exceptions`` does not apply).

Both show a tqdm bar over shards and return a :class:`StageReport`. Global steps (k-means on a
sample gathered from shards, merging index parts, metrics) run on the driver, outside this
module. Ray is imported lazily, only by :class:`RayExecutor`.

The stages themselves live with their packages (the GLD downloads in :mod:`gldboxes.gld_stages`,
features and aggregation in :mod:`retrieval.runner.sharded`, detection in :mod:`detection.sharded`);
this module imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
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
    "ENGINES",
    "FORMAT_VERSION",
    "Executor",
    "NonRetryableError",
    "RayExecutor",
    "Resources",
    "SerialExecutor",
    "Shard",
    "ShardFailedError",
    "Stage",
    "StageReport",
    "add_engine_options",
    "clear_model_cache",
    "executor_from_args",
    "make_executor",
    "make_shards",
    "model_loads",
    "numbered_shards",
    "read_done",
    "run_shard",
]

logger = logging.getLogger("gldboxes.executor")

FORMAT_VERSION = 1
DONE_NAME = "done.json"
ENGINES: tuple[str, ...] = ("serial", "ray")
# Ray's unix sockets live under its temp dir: AF_UNIX paths are limited to 107 bytes and Ray adds
# ~66 characters (session_<date>_<pid>/sockets/plasma_store), so longer scratch paths are reached
# through a short symlink in the system temp dir.
_MAX_RAY_TEMP_LEN = 40

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
            disable=not self.progress or not todo,
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


class RayExecutor(Executor):
    """One Ray task per shard; local Ray by default, a cluster through ``RAY_ADDRESS``.

    Args:
        work_dir: the run's work directory; a local Ray keeps its scratch (sessions, logs,
            spilled objects) in ``work_dir/ray``.
        num_cpus: CPUs of a local Ray (``None``: all); ignored on a cluster.
        num_gpus: GPUs of a local Ray (``None``: detected); ignored on a cluster.
        address: a cluster address; default ``RAY_ADDRESS`` from the environment, else local.
            A token-auth cluster gets ``$RAY_AUTH_TOKEN``/``$RAY_AUTH_TOKEN_PATH`` when set, or
            ``~/.ray/auth_token`` when the head runs on this machine (:func:`_use_ray_token_for`).
        resources: per-task resources overriding each stage's defaults.
        runtime_env: Ray runtime environment (e.g. ``{"env_vars": {...}}``) for the workers.
        progress: show the tqdm bar over shards.
    """

    engine = "ray"

    def __init__(
        self,
        *,
        work_dir: str | os.PathLike[str],
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        address: str | None = None,
        resources: Resources | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(progress=progress, resources=resources)
        self.work_dir = Path(work_dir)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.address = address
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self._owned = False

    @property
    def cluster_address(self) -> str | None:
        """The cluster this executor connects to (``None``: a local Ray)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def temp_dir(self) -> Path:
        """Where a local Ray puts its scratch (``work_dir/ray``; maybe through a short link)."""
        real = (self.work_dir / "ray").resolve()
        real.mkdir(parents=True, exist_ok=True)
        if len(str(real)) <= _MAX_RAY_TEMP_LEN:
            return real
        link = Path(tempfile.gettempdir()) / f"gldray-{config_hash({'p': str(real)}, 10)}"
        if link.is_symlink() and Path(os.readlink(link)) != real:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(real, target_is_directory=True)
        return link

    def start(self) -> RayExecutor:
        """``ray.init`` unless Ray is already running in this process."""
        import ray

        if ray.is_initialized():
            return self
        addr = self.cluster_address
        kwargs: dict[str, Any] = {
            "address": addr,
            "include_dashboard": False,
            "log_to_driver": logger.isEnabledFor(logging.DEBUG),
            "configure_logging": False,
        }
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        if addr is None:
            kwargs["num_cpus"] = self.num_cpus
            kwargs["num_gpus"] = self.num_gpus
            kwargs["_temp_dir"] = str(self.temp_dir())
            # Loopback only: Ray binds its GCS, raylet, agents and workers to the node IP
            # when that is 127.0.0.1 and to every interface otherwise, and on Linux ray.init
            # swaps "127.0.0.1" for the external IP unless ENABLE_RAY_CLUSTER is off (as on
            # macOS/Windows, $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Off for this call only.
            kwargs["_node_ip_address"] = "127.0.0.1"
            logger.info("starting a local Ray (%s CPUs) in %s", self.num_cpus, kwargs["_temp_dir"])
        else:
            logger.info("connecting to the Ray cluster at %s", addr)
            _use_ray_token_for(addr)
        import ray._private.ray_constants as ray_constants

        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = multi_node and addr is not None
        try:
            ray.init(**kwargs)
        except Exception as exc:
            if addr is not None and _is_auth_failure(exc):
                source = "--ray-address" if self.address else "RAY_ADDRESS"
                raise ValueError(_auth_help(addr, source)) from None
            raise
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        self._owned = True
        return self

    def shutdown(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False

    def _execute(
        self, stage: Stage, shards: Sequence[Shard], out_dir: Path
    ) -> Iterator[tuple[Shard, dict[str, Any] | None, str | None]]:
        import ray

        if not shards:
            return
        self.start()
        res = self.resources or stage.resources
        task = ray.remote(_run_shard_task).options(
            **res.ray_options(),
            max_retries=stage.retries,
            retry_exceptions=True,
            name=f"gldboxes:{stage.name}",
        )
        stage_ref = ray.put(stage)
        refs = {task.remote(stage_ref, s, str(out_dir)): s for s in shards}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                shard = refs[ref]
                try:
                    done = ray.get(ref)
                except Exception as exc:  # RayTaskError, WorkerCrashedError, ...
                    yield shard, None, f"{type(exc).__name__}: {_first_line(exc)}"
                else:
                    if _NOT_RETRIED in done:
                        yield shard, None, str(done[_NOT_RETRIED])
                    else:
                        yield shard, done, None


# Ray's token authentication: `ray start --head` turns it on when RAY_AUTH_MODE is unset and a
# token exists ($RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which any
# local ray.init() or `ray get-auth-token --generate` writes); a driver given an explicit address
# stays in mode "disabled" unless RAY_AUTH_MODE=token is exported.
_RAY_DEFAULT_TOKEN = Path("~/.ray/auth_token")


def _is_this_machine(addr: str) -> bool:
    """Whether the host of a Ray address (``host:port``) is a loopback or local interface."""
    import ipaddress
    import socket

    host = addr.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0]).split("%")[0]
        if ipaddress.ip_address(ip).is_loopback:
            return True
        try:  # only an address of one of this machine's interfaces can be bound
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def _use_ray_token_for(addr: str) -> None:
    """Connect to ``addr`` with Ray's token authentication when a token is meant for it.

    An explicit ``RAY_AUTH_MODE`` is left as it is. Otherwise token mode is turned on when the
    user exported ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, or when the head runs on this
    machine and ``~/.ray/auth_token`` (the token ``ray start --head`` used) exists; a token is
    never sent to another machine's cluster unasked. Ray's C++ side caches the mode and the
    token, so both are reread here (Ray is not initialised in this process yet).
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    env = os.environ
    if env.get("RAY_AUTH_MODE") is None and (
        env.get("RAY_AUTH_TOKEN")
        or env.get("RAY_AUTH_TOKEN_PATH")
        or (_RAY_DEFAULT_TOKEN.expanduser().is_file() and _is_this_machine(addr))
    ):
        logger.info("using Ray token authentication for %s (RAY_AUTH_MODE=token)", addr)
        env["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _is_auth_failure(exc: BaseException) -> bool:
    """Whether ``ray.init`` failed because the cluster rejected (or we lacked) the auth token."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_help(addr: str, source: str) -> str:
    """One line saying what to set when the cluster at ``addr`` refused this driver."""
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    if mode != "token":
        sent = f"no token was sent (RAY_AUTH_MODE={mode})"
    elif os.environ.get("RAY_AUTH_TOKEN"):
        sent = "the token in $RAY_AUTH_TOKEN was rejected"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        sent = f"the token in $RAY_AUTH_TOKEN_PATH ({path}) was rejected"
    else:
        sent = f"the token in {_RAY_DEFAULT_TOKEN} was rejected or is missing"
    return (
        f"{source}={addr}: the Ray cluster uses token authentication and {sent}; export "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<output of `ray get-auth-token` on the head> "
        "(or RAY_AUTH_TOKEN_PATH=<a copy of the head's ~/.ray/auth_token>)"
    )


_NOT_RETRIED = "non_retryable_error"


def _run_shard_task(stage: Stage, shard: Shard, out_dir: str) -> dict[str, Any]:
    """:func:`run_shard` as a Ray task: a :class:`NonRetryableError` is returned as
    ``{"non_retryable_error": message}`` instead of raised, so Ray does not retry the task."""
    try:
        return run_shard(stage, shard, out_dir)
    except NonRetryableError as exc:
        return {_NOT_RETRIED: f"{type(exc).__name__}: {exc}"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # RayTaskError prints a traceback; its last line names the original exception.
    return (text[-1] if text else repr(exc))[:500]


# ------------------------------------------------------------------------------ CLI plumbing
def make_executor(
    engine: str,
    *,
    work_dir: str | os.PathLike[str],
    num_cpus: float | None = None,
    task_cpus: float | None = None,
    task_gpus: float = 0.0,
    task_memory: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> Executor:
    """An executor by name (``serial`` or ``ray``) with optional per-task resources."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    res = (
        Resources(num_cpus=task_cpus, num_gpus=task_gpus, memory=task_memory)
        if task_cpus is not None
        else None
    )
    if engine == "serial":
        return SerialExecutor(progress=progress, resources=res)
    return RayExecutor(
        work_dir=work_dir, num_cpus=num_cpus, address=address, resources=res, progress=progress
    )


def add_engine_options(
    parser: argparse.ArgumentParser, *, shard_size: int = 256, shard_unit: str = "images"
) -> None:
    """Add ``--engine serial|ray`` and its resource options to a stage command.

    Args:
        shard_size: default of ``--shard-size``; shard_unit: what a shard counts (its help).
    """
    g = parser.add_argument_group("execution (serial here, or Ray: local or RAY_ADDRESS)")
    g.add_argument("--engine", choices=list(ENGINES), help="run shard by shard on this engine")
    g.add_argument(
        "--shard-size", type=int, default=shard_size, help=f"{shard_unit} per shard (task)"
    )
    g.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    g.add_argument("--num-cpus", type=float, help="CPUs of a local Ray (default: all)")
    g.add_argument("--task-cpus", type=float, help="CPUs per shard task (fractional allowed)")
    g.add_argument("--task-gpus", type=float, default=0.0, help="GPUs per shard task")
    g.add_argument("--task-memory", type=int, help="bytes of RAM reserved per shard task")


def executor_from_args(args: argparse.Namespace, work_dir: str | os.PathLike[str]) -> Executor:
    """The executor named by :func:`add_engine_options`' arguments (default: serial)."""
    return make_executor(
        args.engine or "serial",
        work_dir=work_dir,
        num_cpus=args.num_cpus,
        task_cpus=args.task_cpus,
        task_gpus=args.task_gpus,
        task_memory=args.task_memory,
        address=args.ray_address,
        progress=not getattr(args, "quiet", False),
    )
