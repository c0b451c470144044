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
features and aggregation in :mod:`retrieval.runner.shards`, detection in :mod:`detection.sharded`);
this module imports none of them.

This module is the executor's public face and picks an engine by name (:func:`make_executor`,
the ``--engine`` options); the stage/shard model, the shared driver and the serial engine are
:mod:`gldboxes.executor_base`, the Ray engine :mod:`gldboxes.executor_ray`. Their public names
are importable from here.
"""

from __future__ import annotations

import argparse
import os

from gldboxes.executor_base import (
    DONE_NAME,
    FORMAT_VERSION,
    Executor,
    NonRetryableError,
    Resources,
    SerialExecutor,
    Shard,
    ShardFailedError,
    Stage,
    StageReport,
    clear_model_cache,
    make_shards,
    model_loads,
    numbered_shards,
    read_done,
    run_shard,
)
from gldboxes.executor_ray import RayExecutor

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


ENGINES: tuple[str, ...] = ("serial", "ray")


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
